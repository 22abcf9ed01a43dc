"""InternVL (`InternVLForConditionalGeneration` / `InternVLModel`): InternViT with CLS, pixel shuffle, tiles.

The processor cuts each image into tiles (dynamic tiling plus a thumbnail; a video frame is one tile); every
tile runs through the ViT on its own, loses its CLS token, and a pixel shuffle folds each ``s x s`` block of
patches (``s = 1 / downsample_ratio``, 2 in every checkpoint) into one token of ``s*s*D`` channels, laid out
block by block: top-left patch, top-right, bottom-left, bottom-right. Token counts are per tile.

- VMTC (per tile, in units): a *unit* is one ``s x s`` block, i.e. one post-shuffle token. At the first
  active stage the patches are reordered unit by unit (the shuffle's own channel order), so the sequence is
  (B, 1 + U*s*s, D) = CLS + U units of s*s consecutive patches. Each stage ranks units by the mean CLS
  importance of their patches and compresses the (B, U, s*s*D) unit view with `vmtc.compress(has_cls=False)`:
  kept units pass whole, merged units are importance-weighted means, patch position by patch position. After
  the tower the unit-wise shuffle is a reshape: a kept unit becomes exactly the vector the stock pixel shuffle
  makes for its block. Budgets (``ratio``, ``num_tokens``, ``stage_tokens``) count units = post-shuffle tokens.
- Importance: the CLS query's head-averaged softmax attention, from q and k as the block's attention uses
  them, i.e. the outputs of ``q_norm`` / ``k_norm`` (RMS norms when ``use_qk_norm``, identities otherwise).
- The block: InternViT is ``h += lambda_1 * attn(layernorm_before(h)); h += lambda_2 * mlp(layernorm_after(h))``;
  VMTC sits between the two residual steps (paper Fig. 3). `install` checks the layout against the stock block.
- SPD: as on every family, ``grid x grid`` tokens per tile reach the LLM: the stock pixel shuffle makes the tile's
  ``(side / s) x (side / s)`` grid of tokens, which is average-pooled to ``grid x grid`` before the projector.
- CMAI: ``<IMG_CONTEXT>`` tokens are the image keys; the ``<img>`` / ``</img>`` markers around each image (and
  each video frame) are structural: neither image keys nor inhibited text queries, and not in A_t2n. Their ids
  come from the processor given to `apply`, else from InternVL's id layout (``<img>``, ``</img>``,
  ``<IMG_CONTEXT>`` consecutive); every prefill checks that each image run is bracketed by them.
- Processor: each tile's ``<IMG_CONTEXT>`` run shrinks to the compressed count in `replace_image_token` /
  `replace_video_token` (the processor's expansion hooks), and `_get_num_multimodal_tokens` agrees.
"""

from __future__ import annotations

import dataclasses
import re
from types import MethodType

import torch
from torch import nn

from .. import vmtc as vmtc_math
from .base import Adapter, Handle, check_placeholders, encoded_rows, register
from .llava import num_images
from .vision import VMTCStage, capture_qk, plan_vmtc, pool_grid, record


def unit_order(side: int, s: int) -> torch.Tensor:
    """(side*side,) patch indices of a row-major ``side x side`` grid, regrouped unit by unit.

    Units (s x s blocks) in row-major order; inside a unit, patches row-major, which is the channel order
    of InternVL's pixel shuffle: entry ``u*s*s + a*s + b`` is patch ``(s*i + a, s*j + b)`` of unit ``u = (i, j)``.
    """
    blocks = torch.arange(side * side).view(side // s, s, side // s, s)  # (i, a, j, b)
    return blocks.permute(0, 2, 1, 3).reshape(-1)


def units_to_tokens(patches: torch.Tensor, s: int) -> torch.Tensor:
    """The pixel shuffle of unit-ordered patches: (B, U*s*s, D) -> (B, U, s*s*D)."""
    b, n, d = patches.shape
    return patches.reshape(b, n // (s * s), s * s * d)


def _block_attention(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """InternViT's first residual step: (B, T, D) -> (B, T, D)."""
    attention_output, _ = block.attention(block.layernorm_before(hidden))
    return block.lambda_1 * attention_output + hidden


def _block_mlp(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """InternViT's second residual step: (B, T, D) -> (B, T, D)."""
    out = block.dropout(block.mlp(block.layernorm_after(hidden)))
    return block.lambda_2 * out + hidden


def check_block_layout(block: nn.Module) -> None:
    """Raise unless the block computes exactly `_block_attention` then `_block_mlp` (what VMTC splits apart)."""
    names = ("attention", "layernorm_before", "layernorm_after", "mlp", "lambda_1", "lambda_2", "dropout")
    missing = [n for n in names if not hasattr(block, n)]
    missing += [f"attention.{n}" for n in ("q_norm", "k_norm", "num_heads", "scale") if not hasattr(block.attention, n)]
    if missing:
        raise TypeError(
            f"VMTC: {type(block).__name__} lacks {', '.join(missing)}: not the InternViT block layout unclutter knows."
        )
    if any(p.device.type == "meta" for p in block.parameters()):
        return  # offloaded by accelerate (its weights arrive only inside a call): the names are all we can check
    param = block.lambda_1
    probe = torch.randn(1, 5, param.shape[-1], generator=torch.Generator().manual_seed(0), device="cpu").to(param)
    with torch.no_grad():
        stock = type(block).forward(block, probe)
        ours = _block_mlp(block, _block_attention(block, probe))
    tol = 1e-5 if param.dtype == torch.float32 else 1e-2
    if not torch.allclose(stock, ours, atol=tol, rtol=tol):
        raise RuntimeError(
            f"VMTC: {type(block).__name__}.forward no longer computes h + l1*attn(ln(h)), then + l2*mlp(ln(.)); "
            "unclutter's InternViT layer forward needs updating for this transformers release."
        )


def _patch_importance(handle: Handle, stage: VMTCStage, attn: nn.Module, tokens: int) -> torch.Tensor:
    """(B, N) importance of the block's N patches from the q/k its attention just used (after q_norm/k_norm)."""
    grab = handle._qk.pop(stage.layer, None)
    if grab is None or "q" not in grab or "k" not in grab:
        raise RuntimeError(
            f"VMTC stage at InternViT block {stage.layer}: q_norm/k_norm did not run (the attention changed?)."
        )
    b, t, _ = grab["q"].shape
    if t != tokens:
        raise RuntimeError(f"VMTC stage at block {stage.layer}: captured q/k cover {t} tokens, the block has {tokens}.")
    heads = attn.num_heads
    q = grab["q"].view(b, t, heads, -1).transpose(1, 2)
    k = grab["k"].view(b, t, heads, -1).transpose(1, 2)
    if handle.importance == "received":
        return vmtc_math.received_importance(q, k, attn.scale)[:, 1:]
    return vmtc_math.cls_importance(q[:, :, :1], k, attn.scale)


def vmtc_block_forward(stage: VMTCStage, handle: Handle, s: int, order: torch.Tensor | None):
    """An InternViT layer forward with unit-wise VMTC between attention and MLP.

    ``order``: the grid -> unit permutation, given to the first active stage only (its input is still the
    stock row-major grid; every later stage receives units).
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = _block_attention(self, hidden_states)
        b, t, d = hidden_states.shape
        if t - 1 != stage.tokens_in * s * s:
            raise ValueError(
                f"VMTC stage at InternViT block {stage.layer} expected 1 + {stage.tokens_in * s * s} tokens per tile, "
                f"got {t}: the tiles' size does not match the vision config's image_size."
            )
        importance = _patch_importance(handle, stage, self.attention, t)  # (B, N) in the sequence's order
        cls, patches = hidden_states[:, :1], hidden_states[:, 1:]
        if order is not None:
            idx = order.to(patches.device)
            patches, importance = patches[:, idx], importance[:, idx]
        unit_importance = importance.view(b, stage.tokens_in, s * s).mean(dim=-1)
        cfg = handle.vmtc
        units, info = vmtc_math.compress(
            units_to_tokens(patches, s), unit_importance, stage.keep, stage.clusters,
            merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters, has_cls=False,
        )  # fmt: skip
        record(handle, stage, info)
        hidden_states = torch.cat([cls, units.reshape(b, -1, d)], dim=1)
        return _block_mlp(self, hidden_states)

    return forward


@register
class InternVLAdapter(Adapter):
    family = "InternVL"
    classes = ("InternVLForConditionalGeneration", "InternVLModel")
    processor_classes = ("InternVLProcessor",)
    vmtc = True
    spd = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        self.markers: tuple[int, int] = (cfg.image_token_id - 2, cfg.image_token_id - 1)  # InternVL's id layout

    @property
    def scale(self) -> int:
        """Side ``s`` of the pixel-shuffle block (2 for ``downsample_ratio`` 0.5)."""
        s = round(1 / self.config.downsample_ratio)
        if abs(s * self.config.downsample_ratio - 1) > 1e-6:
            raise ValueError(f"InternVL downsample_ratio {self.config.downsample_ratio} is not 1/integer.")
        return s

    @property
    def grid(self) -> int:
        """Side of one tile's patch grid."""
        vcfg = self.config.vision_config
        (h, w), (ph, pw) = vcfg.image_size, vcfg.patch_size
        if h // ph != w // pw:
            raise ValueError(f"InternVL tiles must have a square patch grid; got {h}x{w} px with {ph}x{pw} patches.")
        return h // ph

    def structural_token_ids(self) -> list[int]:
        return list(self.markers)

    def plan(self, handle: Handle) -> None:
        s, side = self.scale, self.grid
        if side % s:
            raise ValueError(f"the {side}x{side} patch grid does not split into {s}x{s} pixel-shuffle blocks.")
        processor = handle.processor
        if processor is not None and hasattr(processor, "start_image_token_id"):
            self.markers = (processor.start_image_token_id, processor.end_image_token_id)
        units = (side // s) ** 2
        handle.stock_image_tokens = handle.num_image_tokens = units
        if handle.vmtc is not None:
            layer = self.config.vision_feature_layer
            if not isinstance(layer, int) or self.config.vision_feature_select_strategy != "default":
                raise ValueError(
                    "VMTC on InternVL needs one int vision_feature_layer and vision_feature_select_strategy "
                    f"'default' (CLS dropped); got {layer!r} and {self.config.vision_feature_select_strategy!r}."
                )
            blocks = self.config.vision_config.num_hidden_layers
            handle.stages = plan_vmtc(handle.vmtc, units, vmtc_math.feature_block(blocks, layer))
            handle.num_image_tokens = handle.stages[-1].tokens_out
        if handle.spd is not None:
            grid, tokens_side = handle.spd.grid, side // s
            if grid > tokens_side:
                raise ValueError(
                    f"SPD grid {grid} is larger than the {tokens_side}x{tokens_side} grid of tokens an InternVL tile "
                    f"makes ({side}x{side} patches, pixel shuffle {s}x{s}): choose grid <= {tokens_side}."
                )
            handle.num_image_tokens = grid**2

    def install(self, handle: Handle) -> None:
        stages = handle.active_stages
        if not stages and handle.spd is None:
            return  # nothing reduces tokens: the stock vision path runs untouched
        layers = self.base.vision_tower.encoder.layer
        order = unit_order(self.grid, self.scale)
        for i, stage in enumerate(stages):
            block = layers[stage.layer]
            check_block_layout(block)
            capture_qk(handle, block.attention, stage.layer, names=("q_norm", "k_norm"))
            forward = vmtc_block_forward(stage, handle, self.scale, order if i == 0 else None)
            handle.patch_forward(block, MethodType(forward, block))
        handle.override(self.base, "get_image_features", self._image_features(handle))

    def _image_features(self, handle: Handle):
        """``get_image_features`` for compressed tiles: the stock path with a unit-wise (or pooled) pixel shuffle."""
        base, s = self.base, self.scale
        planned_layer = self.config.vision_feature_layer

        def get_image_features(
            pixel_values: torch.Tensor, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
        ):
            layer = planned_layer if vision_feature_layer is None else vision_feature_layer
            strategy = vision_feature_select_strategy or base.config.vision_feature_select_strategy
            if strategy != "default" or (handle.active_stages and layer != planned_layer):
                raise ValueError(
                    f"unclutter planned InternVL's reduction for vision_feature_layer={planned_layer} with the CLS "
                    f"dropped; got vision_feature_layer={layer}, vision_feature_select_strategy={strategy!r}."
                )
            return_dict = kwargs.pop("return_dict", True)
            kwargs["output_hidden_states"] = bool(kwargs.get("output_hidden_states")) or layer != -1
            out = base.vision_tower(pixel_values=pixel_values.to(dtype=base.dtype), return_dict=True, **kwargs)
            features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            patches = features[:, 1:]  # (tiles, P, D), CLS dropped
            if handle.spd is not None:  # the stock pixel shuffle, then pool its grid of tokens
                side = int(round(patches.shape[1] ** 0.5))
                square = patches.reshape(patches.shape[0], side, side, -1)
                shuffled = base.pixel_shuffle(square, scale_factor=base.config.downsample_ratio)
                tokens = pool_grid(shuffled.flatten(1, 2), handle.spd.grid)
            else:  # VMTC left whole units, in unit order
                tokens = units_to_tokens(patches, s)
            out.pooler_output = base.multi_modal_projector(tokens)
            return out if return_dict else out.to_tuple()

        return get_image_features

    def patch_processor(self, handle: Handle, processor) -> None:
        for name in ("image_token", "image_seq_length", "replace_image_token", "_get_num_multimodal_tokens"):
            if not hasattr(processor, name):
                raise TypeError(
                    f"processor must be an InternVLProcessor (it has no {name}); got {type(processor).__name__}."
                )
        stock, new = handle.stock_image_tokens, handle.num_image_tokens
        if processor.image_seq_length != stock:
            raise ValueError(
                f"the processor expands {processor.image_seq_length} <IMG_CONTEXT> per tile but the model makes "
                f"{stock}: processor and model do not belong together."
            )
        token = processor.image_token
        run = re.compile(f"(?:{re.escape(token)})+")

        def shrink(text: str, tiles: int) -> str:
            """Rewrite each run of ``m * stock`` context tokens as ``m * new``; check ``tiles`` tiles were seen."""
            seen = []

            def sub(match: re.Match) -> str:
                count = len(match.group()) // len(token)
                if count % stock:
                    raise RuntimeError(f"the processor expanded a run of {count} {token}, not a multiple of {stock}.")
                seen.append(count // stock)
                return token * (new * (count // stock))

            out = run.sub(sub, text)
            if sum(seen) != tiles:
                raise RuntimeError(
                    f"the processor's expansion holds {sum(seen)} tiles of {token} for {tiles} tiles: its format "
                    "changed; unclutter's InternVL processor patch needs updating."
                )
            return out

        original_image = processor.replace_image_token
        original_video = getattr(processor, "replace_video_token", None)
        original_counts = processor._get_num_multimodal_tokens

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            tiles = int(image_inputs["num_patches"][image_idx])
            return shrink(original_image(image_inputs, image_idx, **kwargs), tiles)

        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs) -> str:
            frames = int(video_inputs["pixel_values_videos"][video_idx].shape[0])
            return shrink(original_video(video_inputs, video_idx, **kwargs), frames)

        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_counts(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None:
                counts = [
                    n + (new - stock) * t for n, t in zip(data.num_image_tokens, data.num_image_patches, strict=True)
                ]
                data = dataclasses.replace(data, num_image_tokens=counts)  # a MultiModalData dataclass
            return data

        handle.override(processor, "replace_image_token", replace_image_token)
        if original_video is not None:
            handle.override(processor, "replace_video_token", replace_video_token)
        handle.override(processor, "_get_num_multimodal_tokens", get_num_multimodal_tokens)

    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        tiles, rows = num_images(kwargs), encoded_rows(kwargs)
        if input_ids is None:
            if tiles or rows is not None:
                raise ValueError("unclutter needs input_ids (not inputs_embeds) to find InternVL's image tokens.")
            return
        is_image = input_ids == self.config.image_token_id
        if rows is not None:  # features encoded before the call: one row per <IMG_CONTEXT> (a chunk: its share)
            check_placeholders(handle, input_ids, 0, self.config.image_token_id, rows)
        elif tiles:
            found, want = int(is_image.sum()), tiles * handle.num_image_tokens
            if found != want:
                hint = (
                    " That is the stock count: pass processor= to unclutter.apply so it expands <IMG_CONTEXT> "
                    "to the compressed count."
                    if found == tiles * handle.stock_image_tokens
                    else ""
                )
                raise ValueError(
                    f"the prompt has {found} <IMG_CONTEXT> tokens for {tiles} tiles; the compressed vision tower "
                    f"yields {handle.num_image_tokens} per tile ({want} in all).{hint}"
                )
        if handle.cmai_state is not None and (tiles or rows):  # a call that brings images (the prefill)
            self._check_markers(input_ids, is_image)

    def _check_markers(self, input_ids: torch.Tensor, is_image: torch.Tensor) -> None:
        """Every run of image tokens sits between the structural ids CMAI was given (``<img>`` ... ``</img>``); a run
        cut by the call's first or last column (a chunk of a chunked prefill) is checked on its side inside the call."""
        start, end = self.markers
        edge = torch.zeros_like(is_image[:, :1])
        before = torch.cat([edge, is_image[:, :-1]], dim=1)
        after = torch.cat([is_image[:, 1:], edge], dim=1)
        prev_ids = torch.cat([torch.full_like(input_ids[:, :1], start), input_ids[:, :-1]], dim=1)
        next_ids = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], end)], dim=1)
        opened = (is_image & ~before & (prev_ids != start)).any()
        closed = (is_image & ~after & (next_ids != end)).any()
        if bool(opened) or bool(closed):
            raise ValueError(
                f"CMAI on InternVL treats ids {start} and {end} as the <img> / </img> markers around each image, "
                "but an <IMG_CONTEXT> run in this prompt is not enclosed by them. Pass processor= to unclutter.apply "
                "(it reads the markers' ids from it) and build prompts with that processor."
            )
