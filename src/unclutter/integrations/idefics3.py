"""Idefics3 and SmolVLM (`Idefics3*` / `SmolVLM*`; SmolVLM does not subclass Idefics3): tiled images, SigLIP
tower without CLS, pixel-shuffle connector.

The processor splits an image into a grid of tiles plus a global image; every tile goes through the tower
alone and reaches the LLM as ``<fake_token_around_image> <row_i_col_j>`` (``<global-img>`` for the global
image) followed by its ``<image>`` tokens. The connector's pixel shuffle concatenates each
``scale_factor x scale_factor`` block of patches (a *unit*) into one LLM token.

- CMAI: ``<image>`` tokens are the image keys. ``<fake_token_around_image>``, ``<global-img>`` and
  ``<row_i_col_j>`` are structural (neither keys nor inhibited text queries): they frame the image, the
  user did not write them. Their ids come from the processor passed to `apply`, else from the model config
  (``fake_image_token_id``, ``global_image_token_id``, ``row_col_token_ids``); with neither, CMAI refuses.
- VMTC: the tower works in unit-major order (permuting patches before block 0 changes nothing in a ViT
  whose positions are already embedded), so a stage ranks, keeps and clusters whole units viewed as
  (B, U, s*s*D): importance "received" (padding patches are neither queries nor keys), unit importance =
  mean over its valid patches. The connector then takes units as they are: a unit-wise equivalent of its
  pixel shuffle (bit-for-bit at ratio 1.0) feeding its projection; each tile yields exactly the budget.
- SPD: the connector average-pools the grid of units of each tile.
- Processor: each tile's run of ``<image>`` is re-counted in the expansion hooks (`replace_image_token`,
  SmolVLM's `replace_video_token`, Idefics3's `_get_num_multimodal_tokens`); tags and layout are unchanged.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput

from .. import vmtc as vmtc_math
from .base import Adapter, Handle, check_placeholders, encoded_rows, register
from .vision import VMTCStage, capture_qk, plan_vmtc, pool_grid, record

ROW_COL_TAGS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # the processors' tag spellings
CONFIG_TAG_FIELDS = ("fake_image_token_id", "global_image_token_id", "row_col_token_ids")


# ---- the unit layout of the pixel shuffle -------------------------------------------------------------------


def to_units(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, side*side, D) raster patches -> (B, side*side/s^2, s^2*D) units, as the connector's pixel shuffle.

    Unit (i, j) concatenates patches (i*s + r, j*s + c) in r-major, then c order: the shuffle's layout.
    """
    b, t, d = x.shape
    side = int(round(t**0.5))
    if side * side != t or side % scale:
        raise ValueError(f"the pixel shuffle needs a square patch grid divisible by {scale}; got {t} patches.")
    g = side // scale
    return x.reshape(b, g, scale, g, scale, d).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, scale * scale * d)


def unit_major(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, T, ...) raster patches -> the same patches ordered unit by unit: (B, T, ...)."""
    b, t = x.shape[:2]
    flat = x.reshape(b, t, -1)
    return to_units(flat, scale).reshape(b, t, *x.shape[2:])


# ---- VMTC inside the tower -----------------------------------------------------------------------------------


def unit_importance(importance: torch.Tensor, valid: torch.Tensor, u: int) -> torch.Tensor:
    """(B, U*u) patch importance and validity (unit-major) -> (B, U) mean importance of each unit's valid patches."""
    b, t = importance.shape
    imp, ok = importance.view(b, t // u, u), valid.view(b, t // u, u).to(importance.dtype)
    return (imp * ok).sum(-1) / ok.sum(-1).clamp_min(1)


def compress_units(
    hidden: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor, stage: VMTCStage, u: int, cfg
) -> tuple[torch.Tensor, torch.Tensor, vmtc_math.VMTCInfo]:
    """Keep and cluster whole units of a unit-major sequence.

    hidden: (B, U*u, D); importance, valid: (B, U*u). Returns hidden (B, U'*u, D), valid (B, U'*u) and the
    step's `VMTCInfo` over units. A kept unit keeps its patches' validity; a merged unit's patch slot is valid
    where any member's is (fully padded units rank last: importance 0).
    """
    b, t, d = hidden.shape
    units = hidden.reshape(b, t // u, u * d)
    out, info = vmtc_math.compress(
        units, unit_importance(importance, valid, u), stage.keep, stage.clusters,
        merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters, has_cls=False,
    )  # fmt: skip
    slots = valid.view(b, t // u, u)
    pieces = [slots.gather(1, info.kept_index[..., None].expand(-1, -1, u))]
    merged = out.shape[1] - stage.keep
    if merged:
        members = slots.gather(1, info.merged_index[..., None].expand(-1, -1, u)).float()  # (B, R, u)
        one_hot = F.one_hot(info.cluster, merged).float()  # (B, R, c)
        pieces.append(one_hot.transpose(1, 2) @ members > 0)
    return out.reshape(b, -1, d), torch.cat(pieces, dim=1).reshape(b, -1), info


class TowerVMTC:
    """VMTC in an Idefics3/SmolVLM vision tower: unit-major order, compressing stage blocks, rebuilt masks."""

    def __init__(self, handle: Handle, tower, scale: int) -> None:
        self.handle, self.tower, self.scale, self.u = handle, tower, scale, scale * scale
        self.stages = {s.layer: s for s in handle.active_stages}
        self.valid: torch.Tensor | None = None  # (B, T) patch validity of the current tower call

    def install(self) -> None:
        handle = self.handle
        handle.add_hook(self.tower.register_forward_pre_hook(self.remember_padding, with_kwargs=True))
        encoder = self.tower.encoder
        handle.patch_forward(encoder, MethodType(self.encoder_forward(), encoder))
        for layer, stage in self.stages.items():
            block = encoder.layers[layer]
            capture_qk(handle, block.self_attn, layer)
            handle.patch_forward(block, MethodType(self.block_forward(stage), block))

    def remember_padding(self, module, args: tuple, kwargs: dict) -> None:
        """Keep the call's patch validity (B, T): the encoder gets it only as a backend-specific mask."""
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        mask = kwargs.get("patch_attention_mask", args[1] if len(args) > 1 else None)
        if mask is None:
            p = self.tower.config.patch_size
            mask = torch.ones(pixels.shape[0], pixels.shape[2] // p, pixels.shape[3] // p, dtype=torch.bool)
        self.valid = mask.reshape(mask.shape[0], -1).bool().to(pixels.device)

    def mask(self, hidden: torch.Tensor):
        return create_bidirectional_mask(config=self.tower.config, inputs_embeds=hidden, attention_mask=self.valid)

    def encoder_forward(self):
        ctx = self

        def forward(self, inputs_embeds: torch.Tensor, attention_mask=None, **kwargs) -> BaseModelOutput:
            if ctx.valid is None or ctx.valid.shape != inputs_embeds.shape[:2]:
                raise RuntimeError(
                    "VMTC: the Idefics3/SmolVLM vision encoder was called without its vision transformer (or with "
                    "other patches than it embedded); call the vision model, not its encoder."
                )
            # unit-major order from here on: attention does not depend on the order, the stages need units
            hidden = unit_major(inputs_embeds, ctx.scale)
            ctx.valid = unit_major(ctx.valid, ctx.scale)
            mask = ctx.mask(hidden)
            for layer in self.layers:
                tokens = hidden.shape[1]
                hidden = layer(hidden, mask)
                if hidden.shape[1] != tokens:  # a stage compressed: the next blocks see the new tokens only
                    mask = ctx.mask(hidden)
            ctx.valid = None
            return BaseModelOutput(last_hidden_state=hidden)

        return forward

    def block_forward(self, stage: VMTCStage):
        ctx, handle = self, self.handle

        def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
            residual = hidden_states
            hidden, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
            hidden = residual + hidden
            importance = ctx.importance(stage, self.self_attn, hidden.shape[1])
            hidden, ctx.valid, info = compress_units(hidden, importance, ctx.valid, stage, ctx.u, handle.vmtc)
            record(handle, stage, info)
            return hidden + self.mlp(self.layer_norm2(hidden))

        return forward

    def importance(self, stage: VMTCStage, attn, tokens: int) -> torch.Tensor:
        """(B, T) attention each patch receives from the tile's valid patches, from the block's own q/k."""
        grab = self.handle._qk.pop(stage.layer, None)
        if grab is None or "q" not in grab or "k" not in grab:
            raise RuntimeError(f"VMTC stage at block {stage.layer}: the block's q/k projections did not run.")
        b, t, _ = grab["q"].shape
        if t != tokens or t != stage.tokens_in * self.u:
            raise ValueError(
                f"VMTC stage at block {stage.layer} expected {stage.tokens_in} units of {self.u} patches per tile, "
                f"got {t} patches: the tile size does not match the vision config's image_size."
            )
        q = grab["q"].view(b, t, attn.num_heads, -1).transpose(1, 2)
        k = grab["k"].view(b, t, attn.num_heads, -1).transpose(1, 2)
        return vmtc_math.received_importance(q, k, attn.scale, valid=self.valid)


# ---- the adapter ---------------------------------------------------------------------------------------------


def tile_count(kwargs: dict) -> int:
    """Tiles (and global images, video frames) in this forward's pixels: the real (non-zero) ones (features encoded
    before the call: `encoded_rows`)."""
    pixels = kwargs.get("pixel_values")
    if pixels is None:
        return 0
    return int((pixels.flatten(2) != 0).any(dim=-1).sum().item())  # the model drops all-zero tiles (padding)


@register
class Idefics3Adapter(Adapter):
    family = "Idefics3"
    classes = ("Idefics3ForConditionalGeneration", "Idefics3Model")
    processor_classes = ("Idefics3Processor",)
    vmtc = True
    spd = True
    default_importance = "received"
    global_tag_attr = "global_image_tag"  # the processor attribute spelling '<global-img>'

    def __init__(self, model) -> None:
        super().__init__(model)
        self._tags_from_processor: list[int] | None = None

    @property
    def language_model(self):
        return self.base.text_model

    @property
    def scale(self) -> int:
        return self.config.scale_factor

    @property
    def tile_grid(self) -> int:
        """Units per side of one tile: the LLM gets tile_grid**2 tokens per tile."""
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        if side % self.scale:
            raise ValueError(f"the {side}x{side} patch grid is not divisible by scale_factor {self.scale}.")
        return side // self.scale

    # --- structural tokens ----------------------------------------------------------------------------------
    def processor_tag_ids(self, processor) -> list[int]:
        tok = getattr(processor, "tokenizer", None)
        names = [getattr(processor, "fake_image_token", None), getattr(processor, self.global_tag_attr, None)]
        if tok is None or None in names:
            raise TypeError(
                f"processor must be a {self.family} processor with a tokenizer, got {type(processor).__name__}."
            )
        ids = [tok.convert_tokens_to_ids(name) for name in names + ROW_COL_TAGS]
        # a tag the vocabulary lacks is spelled with ordinary text tokens: those stay text
        return sorted({i for i in ids if i is not None and i != tok.unk_token_id})

    def config_tag_ids(self) -> list[int] | None:
        values = [getattr(self.config, name, None) for name in CONFIG_TAG_FIELDS]
        if all(v is None for v in values):
            return None
        flat = [i for v in values if v is not None for i in (v if isinstance(v, list | tuple) else [v])]
        return sorted(set(flat))

    def structural_token_ids(self) -> list[int]:
        """The image tags; from the processor given to `apply`, else from the config (see the module docstring)."""
        ids = self._tags_from_processor if self._tags_from_processor is not None else self.config_tag_ids()
        if ids is None:
            raise ValueError(
                f"CMAI on {self.family} needs the ids of the image tags (<fake_token_around_image>, <global-img>, "
                "<row_i_col_j>), which are neither image nor text tokens, and the model config does not name them: "
                f"pass the processor, unclutter.apply(model, processor, ...), or set config.{CONFIG_TAG_FIELDS[0]}, "
                f"config.{CONFIG_TAG_FIELDS[1]} and config.{CONFIG_TAG_FIELDS[2]}."
            )
        return ids

    # --- token reduction ------------------------------------------------------------------------------------
    def plan(self, handle: Handle) -> None:
        units = self.tile_grid**2
        handle.stock_image_tokens = handle.num_image_tokens = units
        processor = handle.processor
        if processor is not None:
            tags, known = self.processor_tag_ids(processor), self.config_tag_ids()
            if known is not None and tags != known:
                raise ValueError(f"the processor's image tag ids {tags} differ from the model config's {known}.")
            self._tags_from_processor = tags
            expands = getattr(processor, "image_seq_len", None)
            if expands != units:
                raise ValueError(
                    f"the processor expands each tile to {expands} image tokens but the model yields {units} "
                    "(image_size, patch_size, scale_factor): processor and model do not match."
                )
        if handle.vmtc is not None:
            if handle.importance != "received":
                raise ValueError(
                    f"{self.family}'s SigLIP tower has no CLS token: use VMTCConfig(importance='received')."
                )
            layers = self.config.vision_config.num_hidden_layers
            handle.stages = plan_vmtc(handle.vmtc, units, layers - 1)  # the connector reads the last block
            handle.num_image_tokens = handle.stages[-1].tokens_out
        if handle.spd is not None:
            if handle.spd.grid > self.tile_grid:
                raise ValueError(
                    f"SPD grid {handle.spd.grid} is larger than the {self.tile_grid}x{self.tile_grid} grid of tokens "
                    f"per tile: choose grid <= {self.tile_grid}."
                )
            handle.num_image_tokens = handle.spd.grid**2

    def install(self, handle: Handle) -> None:
        if handle.vmtc is None and handle.spd is None:
            return
        if handle.active_stages:
            TowerVMTC(handle, self.base.vision_model, self.scale).install()
        compressed = bool(handle.active_stages)
        spd_grid = handle.spd.grid if handle.spd is not None else None
        scale, budget = self.scale, handle.num_image_tokens

        def connector_forward(self, image_hidden_states: torch.Tensor) -> torch.Tensor:
            b, t, d = image_hidden_states.shape
            if compressed:  # the tower already emits whole units, in order
                if t != budget * scale * scale:
                    raise ValueError(f"VMTC: the connector got {t} patches per tile, expected {budget} units.")
                units = image_hidden_states.reshape(b, budget, scale * scale * d)
            else:
                units = to_units(image_hidden_states, scale)  # == the stock pixel shuffle, bit for bit
            if spd_grid is not None:
                units = pool_grid(units, spd_grid)
            return self.modality_projection(units)

        connector = self.base.connector
        handle.patch_forward(connector, MethodType(connector_forward, connector))

    # --- processor ------------------------------------------------------------------------------------------
    def recount(self, handle: Handle, processor, text: str) -> str:
        """Give every run of stock-count image tokens in an expansion the compressed count."""
        token, stock, new = processor.image_token, handle.stock_image_tokens, handle.num_image_tokens
        runs = text.count(token * stock)
        if text.count(token) != runs * stock:
            raise ValueError(
                f"the processor expanded an image into {text.count(token)} image tokens, not runs of {stock} per "
                "tile: its layout is not the one unclutter knows."
            )
        return text.replace(token * stock, token * new)

    def patch_processor(self, handle: Handle, processor) -> None:
        original = processor.replace_image_token

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            return self.recount(handle, processor, original(image_inputs, image_idx, **kwargs))

        handle.override(processor, "replace_image_token", replace_image_token)
        if hasattr(processor, "_get_num_multimodal_tokens"):  # Idefics3's (SmolVLM's from 5.25), for serving code
            original_counts = processor._get_num_multimodal_tokens
            per_tile = handle.stock_image_tokens - handle.num_image_tokens

            def get_num_multimodal_tokens(image_sizes=None, video_sizes=None, **kwargs):
                if video_sizes is not None:  # Idefics3's own takes no video_sizes (and warns about one, even None)
                    kwargs["video_sizes"] = video_sizes
                data = original_counts(image_sizes=image_sizes, **kwargs)
                if image_sizes is not None:  # one run per tile; an image that is not split is one global run
                    data.num_image_tokens = [
                        n - max(tiles, 1) * per_tile
                        for n, tiles in zip(data.num_image_tokens, data.num_image_patches, strict=True)
                    ]
                if video_sizes is not None and getattr(data, "num_video_tokens", None) is not None:
                    # SmolVLM: videos are never split, one global run per frame (size: frames, height, width)
                    data.num_video_tokens = [
                        n - size[0] * per_tile for n, size in zip(data.num_video_tokens, video_sizes, strict=True)
                    ]
                return data

            handle.override(processor, "_get_num_multimodal_tokens", get_num_multimodal_tokens)

    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        check_placeholders(handle, input_ids, tile_count(kwargs), self.config.image_token_id, encoded_rows(kwargs))


@register
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout under its own classes; its processor also expands videos into frames."""

    family = "SmolVLM"
    classes = ("SmolVLMForConditionalGeneration", "SmolVLMModel")
    processor_classes = ("SmolVLMProcessor",)
    global_tag_attr = "global_image_token"

    def patch_processor(self, handle: Handle, processor) -> None:
        super().patch_processor(handle, processor)
        original = processor.replace_video_token

        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs) -> str:
            return self.recount(handle, processor, original(video_inputs, video_idx, **kwargs))

        handle.override(processor, "replace_video_token", replace_video_token)
