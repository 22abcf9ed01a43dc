"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration` / `LlavaOnevisionModel`): SigLIP (no CLS), Qwen2.

Images: a single-image prompt is tiled like LLaVA-NeXT (base + high-res tiles, unpadding, then the grid
is interpolated down to about ``anyres_max_N`` tiles' worth, one ``image_newline`` per patch row); in a
multi-image prompt each image is one tile plus a newline. Videos: every frame is one tower pass whose
patch grid is bilinearly pooled 2x2 after the projector (`apply_pooling`); one newline closes the video.

- CMAI: the shared runtime. Image and video placeholders (``config.image_token_id``,
  ``config.video_token_id``) are both image keys; the newlines fill placeholders too, so they are image
  keys as well (see `llava_next`).
- VMTC on images: per tile, inside the SigLIP blocks (`stage_forward`), ranked by "received" importance
  (no CLS: the mean attention each patch receives); the per-tile budget and the compressed packer
  (`anyres`) replace unpadding, and ``<image>`` expands to exactly that count. Multi-image prompts: each
  image is one compressed tile plus its newline.
- The budget is a share of *stock's* count. Stock unpads an image's high-res grid and interpolates it
  down to about ``anyres_max_N`` tiles' worth when it is more than 1.1x that (real checkpoints: up to
  36 tiles cut to about 9). A per-tile budget alone ignores both (ratio 0.5 on 36 tiles: 18 tiles'
  worth, twice stock; an elongated image: its half-padding tiles count in full), so the high-res part
  gets the tiles' share of stock's count: ``h = min(t, floor(round(t / side^2 * H' * W') / (rows * cols)))``
  tokens per high-res tile (at least 1), H' x W' the grid stock sends (unpadded, interpolated where stock
  interpolates). Each high-res tile leaves the tower with ``t`` tokens (all tiles of a batch share the
  tower's stages); where ``h < t`` it is compressed again to ``h`` by `vmtc.compress` on its projected
  tokens, ranked and merge-weighted by `vmtc.output_importance` of the last stage (kept tokens their IPS,
  merged ones their members' sum). The base tile keeps ``t`` (stock keeps it whole too). Pictures draw
  that step as a last panel (``handle.post_infos``).
- VMTC on videos: compressed *after* OneVision's pooling, per frame. A frame's tower pass keeps every
  patch (a wrapper around `get_video_features` tells the stage blocks it is a video), the last stage
  block records each patch's received importance, the stock `apply_pooling` pools the features and (the
  same bilinear map) the importance, and `vmtc.compress` keeps/merges the pooled tokens down to the same
  share as the tiles (ratio 0.5: half of the 2x2-pooled tokens). Why not 2x2 units inside the tower:
  the real checkpoints have a 27x27 grid, which the pooling maps to 14x14 with overlapping
  neighbourhoods, so no unit partition exists; compressing after pooling works for every grid, keeps the
  pooling stock, and still merges redundant tokens by importance (one stage, after the tower: frames get
  no speed-up inside the tower). ``<video>`` expands to ``frames * per_frame + 1``.
- SPD: not supported (the projector also serves video frames, whose pooling expects the full grid).
"""

from __future__ import annotations

import functools
import math
from types import MethodType

import torch

from .. import vmtc as vmtc_math
from .anyres import AnyresAdapter
from .base import Handle, register
from .vision import VMTCStage, rank_in_attention, record, stage_importance, want_ranking


def images_per_prompt(batch_num_images, image_idx: int) -> int:
    """How many images the prompt holding image ``image_idx`` (flat index) has."""
    seen = 0
    for n in batch_num_images:
        seen += int(n)
        if image_idx < seen:
            return int(n)
    raise ValueError(f"image {image_idx} is beyond batch_num_images={list(batch_num_images)}.")


@register
class LlavaOnevisionAdapter(AnyresAdapter):
    family = "LLaVA-OneVision"
    classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    processor_classes = ("LlavaOnevisionProcessor",)
    vmtc = True
    has_cls = False
    default_importance = "received"

    _video = False  # True while get_video_features runs: the tower then sees video frames
    _frame_importance: torch.Tensor | None = None  # (frames, side*side) from the last stage block, for the pooling
    frame_info: vmtc_math.VMTCInfo | None = None  # what the last video compression did (per frame)

    # --- planning -------------------------------------------------------------------------------------
    def plan(self, handle: Handle) -> None:
        if handle.vmtc is not None:
            if handle.importance != "received":
                raise ValueError("SigLIP has no CLS token: LLaVA-OneVision's VMTC ranks by importance='received'.")
            if not hasattr(self.base.vision_tower, "encoder"):
                raise TypeError(f"VMTC needs a SigLIP-style tower; got {type(self.base.vision_tower).__name__}.")
        super().plan(handle)
        # a video frame's side x side grid is pooled to ceil(side/2)^2 tokens; VMTC keeps the tiles' share of them
        self.stock_frame_tokens = self.frame_tokens = math.ceil(self.side / 2) ** 2
        if handle.active_stages:
            share = handle.num_image_tokens / handle.stock_image_tokens
            self.frame_tokens = max(1, round(self.stock_frame_tokens * share))

    @property
    def compresses_frames(self) -> bool:
        return self.frame_tokens != self.stock_frame_tokens

    def frame_clusters(self, handle: Handle) -> int:
        """Merged tokens per compressed frame: the config's last stage choice, capped by the frame budget."""
        return self.clusters_for(handle, self.frame_tokens)

    # --- the anyres_max cap -----------------------------------------------------------------------------
    def stock_high_res_grid(self, image_size, grid: tuple[int, int]) -> tuple[int, int, bool]:
        """The unpadded grid (`AnyresAdapter.stock_high_res_grid`), interpolated down to about anyres_max_N tiles'
        worth when it is more than 1.1x that (as the model's pack_image_features does)."""
        height, width, _ = super().stock_high_res_grid(image_size, grid)
        most = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (most * self.side**2))
        if ratio <= 1.1:
            return height, width, False
        return int(height // ratio), int(width // ratio), True

    # --- hooks ----------------------------------------------------------------------------------------
    def install_vmtc(self, handle: Handle) -> None:
        layers = self.base.vision_tower.encoder.layers
        for stage in handle.active_stages:
            block = layers[stage.layer]
            rank_in_attention(handle, self.base.vision_tower, block.self_attn, stage.layer)
            handle.patch_forward(block, MethodType(self.stage_forward(handle, stage), block))
        handle.override(self.base, "get_video_features", self.video_features(self.base.get_video_features))
        if self.compresses_frames:
            handle.override(self.base, "apply_pooling", self.pool_and_compress(handle, self.base.apply_pooling))

    def stage_forward(self, handle: Handle, stage: VMTCStage):
        """A SigLIP encoder-layer forward: VMTC between attention and MLP for image tiles, stock for video frames."""
        adapter = self
        last = stage is handle.active_stages[-1]
        cfg = handle.vmtc

        def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
            if adapter._video:
                # the last stage ranks the frame's patches for the compression after pooling
                ranked = last and adapter.compresses_frames
                if ranked:
                    want_ranking(handle, stage.layer)
                out = type(self).forward(self, hidden_states, attention_mask, **kwargs)
                patches = hidden_states.shape[1]
                if ranked:
                    whole = VMTCStage(stage.layer, patches, patches, 0)
                    adapter._frame_importance = stage_importance(handle, whole, self.self_attn, patches, has_cls=False)
                else:
                    handle._qk.pop(stage.layer, None)
                return out
            if attention_mask is not None:
                raise ValueError("VMTC cannot compress a vision tower called with an attention mask.")
            residual = hidden_states
            want_ranking(handle, stage.layer)
            hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
            hidden_states = residual + hidden_states
            importance = stage_importance(handle, stage, self.self_attn, hidden_states.shape[1], has_cls=False)
            hidden_states, info = vmtc_math.compress(
                hidden_states, importance, stage.keep, stage.clusters, merge=cfg.merge, normalize=cfg.normalize,
                iters=cfg.kmeans_iters, has_cls=False,
            )  # fmt: skip
            record(handle, stage, info)
            return hidden_states + self.mlp(self.layer_norm2(hidden_states))

        return forward

    def video_features(self, get_video_features):
        """Wrap the model's get_video_features so the stage blocks know they see video frames."""

        @functools.wraps(get_video_features)  # keeps the signature generate() reads the encoder's inputs from
        def wrapper(*args, **kwargs):
            self._video, self._frame_importance = True, None
            try:
                return get_video_features(*args, **kwargs)
            finally:
                self._video, self._frame_importance = False, None

        return wrapper

    def pool_and_compress(self, handle: Handle, apply_pooling):
        """The stock 2x2 pooling of video frames, then VMTC's keep-and-merge on the pooled tokens of each frame."""
        cfg = handle.vmtc
        clusters = self.frame_clusters(handle)

        def pool(image_features: torch.Tensor) -> torch.Tensor:
            importance = self._frame_importance
            if not self._video or importance is None or importance.shape[0] != image_features.shape[0]:
                raise RuntimeError(
                    "unclutter compresses OneVision's pooled video frames with the importance their tower pass "
                    "recorded, but none matches this apply_pooling call; call it only through get_video_features."
                )
            pooled = apply_pooling(image_features)  # (frames, pooled, E)
            weights = apply_pooling(importance[..., None])[..., 0]  # the same bilinear map: (frames, pooled)
            out, self.frame_info = vmtc_math.compress(
                pooled, weights, self.frame_tokens - clusters, clusters, merge=cfg.merge, normalize=cfg.normalize,
                iters=cfg.kmeans_iters, has_cls=False,
            )  # fmt: skip
            return out

        return pool

    def stock_keys(self, image_size, rows: int, cols: int) -> list[tuple[int, int] | None]:
        height, width, interpolated = self.stock_high_res_grid(image_size, (rows, cols))
        if not interpolated:
            return super().stock_keys(image_size, rows, cols)
        # stock interpolates the grid down (as its pack_image_features does): each key mixes several patches
        return [None] * (height * (width + 1))

    # --- counts ---------------------------------------------------------------------------------------
    def video_tokens(self, handle: Handle, frames: int) -> int | None:
        return frames * self.frame_tokens + 1 if self.compresses_frames else None

    def single_tile(self, image_inputs: dict, image_idx: int) -> bool:
        # the processor sends every image of a multi-image prompt as one tile (no anyres)
        return images_per_prompt(image_inputs["batch_num_images"], image_idx) != 1

    def single_tile_flags(self, kwargs: dict, images: int) -> list[bool]:
        counts = kwargs.get("batch_num_images")
        if counts is None:  # the model then treats every image as a single-image prompt
            return [False] * images
        return [n != 1 for n in torch.as_tensor(counts).tolist() for _ in range(n)]

    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        super().check_prompt(handle, input_ids, kwargs)
        if not self.compresses_frames:
            return
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:
            want = encoded.pooler_output.shape[0] * encoded.pooler_output.shape[1]
        elif kwargs.get("pixel_values_videos") is not None:
            videos, frames = kwargs["pixel_values_videos"].shape[:2]
            want = videos * self.video_tokens(handle, frames)
        else:
            return
        found = int((input_ids == self.config.video_token_id).sum().item()) if input_ids is not None else -1
        if found != want:
            raise ValueError(
                f"the prompt has {found} video tokens but the compressed frames fill {want}. Pass processor= to "
                "unclutter.apply so the processor expands '<video>' to the compressed count."
            )
