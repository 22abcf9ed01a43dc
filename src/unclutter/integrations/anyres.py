"""What the anyres families (LLaVA-NeXT, LLaVA-OneVision) share: tiles, the compressed packer, token counts.

Anyres. An image becomes a *base tile* (the whole image resized to the tower's input size) plus
``rows x cols`` *high-res tiles* (the image resized into the best of ``image_grid_pinpoints``, padded, cut
into tower-sized tiles); every tile is one vision-tower pass. Stock packing lays the high-res tiles'
patch grids side by side, crops the padding ("unpadding"), OneVision then interpolates the grid down to
about ``anyres_max_N`` tiles' worth, and one ``image_newline`` embedding closes every patch row; the base
tile's tokens go first. Every packed token, newlines included, fills an image placeholder, so for CMAI
newlines are image keys like the patches around them.

Compressed packing (VMTC, SPD). VMTC keeps ``t`` of each tile's patches (its token budget applies per
tile) and SPD pools each tile to ``grid x grid``; neither result can be unpadded row by row (a VMTC tile
is no longer a grid at all), so both use one packer, and at equal ``t`` both send exactly the same count
(the paper compares them at equal budget). Per image::

    [base tile] [tile 0,0] [tile 0,1] ... [tile 0,cols-1] <newline> ... [tile rows-1,cols-1] <newline>

Base first as in stock; high-res tiles in raster tile order; one ``image_newline`` after each *row of
tiles*, so the LLM still sees where a row of the image ends, at tile granularity, for ``rows`` tokens
(stock spends one per patch row). Tiles are kept whole, padding included: which patches of a tile are
padding is unknown after compression, and VMTC's ranking tends to merge such uniform patches into
clusters anyway. An image given as a single tile (OneVision's multi-image prompts) keeps stock's layout:
its tokens, then one newline. Length: ``t * (1 + rows * cols) + rows``, or ``t + 1`` for a single tile.
`Adapter.patch_processor` makes the processor expand ``<image>`` to exactly this count, and
`image_key_map` names the (tile, token) behind every image key, for the stock and the compressed layout.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from .base import Adapter, Handle
from .llava import feature_block
from .vision import plan_vmtc, pool_grid


def packed_count(tokens: int, grid: tuple[int, int] | None) -> int:
    """Tokens one image sends under the compressed packing: ``tokens`` per tile, ``grid`` (rows, cols) or None."""
    if grid is None:
        return tokens + 1
    rows, cols = grid
    return tokens * (1 + rows * cols) + rows


def pack_tiles(features: torch.Tensor, grid: tuple[int, int] | None, newline: torch.Tensor) -> torch.Tensor:
    """One image's (tiles, t, E) projected tile features -> (packed_count(t, grid), E) in the layout above."""
    tiles, t, e = features.shape
    row = newline.to(features.device, features.dtype)[None]  # (1, E)
    if grid is None:
        if tiles != 1:
            raise ValueError(f"an image without a tile grid should be one tile, got {tiles}.")
        return torch.cat([features[0], row])
    rows, cols = grid
    if tiles != 1 + rows * cols:
        raise ValueError(
            f"an image laid out as {rows}x{cols} high-res tiles should have {1 + rows * cols} tiles (base "
            f"included), got {tiles}: the processor's image_grid_pinpoints differ from the model config's."
        )
    high = features[1:].reshape(rows, cols * t, e)
    high = torch.cat([high, row.expand(rows, 1, e)], dim=1).reshape(-1, e)
    return torch.cat([features[0], high])


class AnyresAdapter(Adapter):
    """LLaVA-NeXT-style towers: tiled images, a per-tile budget, the compressed packer above.

    Subclasses set ``has_cls`` (the tower's CLS token, dropped by ``vision_feature_select_strategy=
    "default"``) and install their tower's VMTC stages in `install_vmtc`.
    """

    has_cls: ClassVar[bool] = True

    @property
    def side(self) -> int:
        """Patches per side of one tile."""
        vcfg = self.config.vision_config
        return vcfg.image_size // vcfg.patch_size

    def image_grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of high-res tiles for an image of (height, width), as the model's packing computes it."""
        size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
        height, width = select_best_resolution(size, self.config.image_grid_pinpoints)
        tile = self.config.vision_config.image_size
        return height // tile, width // tile

    def image_tokens(self, handle: Handle, image_size, single_tile: bool = False) -> int:
        """Placeholders one image needs under the compressed packing."""
        return packed_count(handle.num_image_tokens, None if single_tile else self.image_grid(image_size))

    # --- planning and hooks --------------------------------------------------------------------------
    def plan(self, handle: Handle) -> None:
        patches = self.side**2
        handle.stock_image_tokens = handle.num_image_tokens = patches  # per tile
        if handle.vmtc is None and handle.spd is None:
            return
        strategy = "default" if self.has_cls else "full"
        if self.config.vision_feature_select_strategy != strategy:
            raise ValueError(
                f"{self.family} token reduction expects vision_feature_select_strategy={strategy!r} (the tiles' "
                f"patch tokens only, {'CLS dropped' if self.has_cls else 'no CLS'}); this config has "
                f"{self.config.vision_feature_select_strategy!r}."
            )
        if handle.vmtc is not None:
            handle.stages = plan_vmtc(handle.vmtc, patches, feature_block(self.config))
            handle.num_image_tokens = handle.stages[-1].tokens_out
        if handle.spd is not None:
            if handle.spd.grid > self.side:
                raise ValueError(f"SPD grid {handle.spd.grid} is larger than the {self.side}x{self.side} tile grid.")
            handle.num_image_tokens = handle.spd.grid**2

    def install_vmtc(self, handle: Handle) -> None:
        """Attach the VMTC stages to the tower's blocks."""
        raise NotImplementedError

    def install(self, handle: Handle) -> None:
        if handle.active_stages:
            self.install_vmtc(handle)
        if handle.spd is not None:
            grid = handle.spd.grid

            def pool(module, args: tuple):
                return (pool_grid(args[0], grid),) + args[1:]  # (tiles, side*side, E) -> (tiles, grid*grid, E)

            handle.add_hook(self.base.multi_modal_projector.register_forward_pre_hook(pool))
        if handle.num_image_tokens != handle.stock_image_tokens:
            handle.override(self.base, "pack_image_features", self.packer())

    def packer(self):
        """A replacement for the model's ``pack_image_features`` (same call, same return) for compressed tiles."""

        def pack_image_features(image_features, image_sizes, *args, image_newline=None, **kwargs):
            if image_newline is None:
                raise ValueError(
                    "unclutter's tile packer needs image_newline (the model's get_image_features passes it); "
                    "it was called without."
                )
            packed = [
                pack_tiles(feats, None if feats.shape[0] == 1 else self.image_grid(size), image_newline)
                for feats, size in zip(image_features, image_sizes, strict=True)
            ]
            lengths = torch.tensor([len(p) for p in packed], dtype=torch.long, device=packed[0].device)
            return packed, lengths

        return pack_image_features

    # --- processor -------------------------------------------------------------------------------------
    def single_tile(self, image_inputs: dict, image_idx: int) -> bool:
        """Whether the processor sent this image as a single tile (OneVision's multi-image prompts)."""
        return False

    def video_tokens(self, handle: Handle, frames: int) -> int | None:
        """Placeholders one video of ``frames`` frames needs when compressed; None: the stock count applies."""
        return None

    def patch_processor(self, handle: Handle, processor) -> None:
        if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_processor"):
            raise TypeError(f"processor must be the {self.family} processor, got {type(processor).__name__}.")
        pinpoints = [list(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or []]
        if pinpoints != [list(p) for p in self.config.image_grid_pinpoints]:
            raise ValueError(
                f"the processor tiles images with image_grid_pinpoints={pinpoints} but the model packs them with "
                f"{self.config.image_grid_pinpoints}; load both from the same checkpoint."
            )
        original_counts = processor._get_num_multimodal_tokens

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            size = image_inputs["image_sizes"][image_idx]
            single = self.single_tile(image_inputs, image_idx)
            return processor.image_token * self.image_tokens(handle, size, single)

        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs) -> str:
            frames = len(video_inputs["pixel_values_videos"][video_idx])
            return processor.video_token * self.video_tokens(handle, frames)

        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_counts(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None:  # like stock: every image counted as a single-image prompt (tiled)
                data.num_image_tokens = [self.image_tokens(handle, size) for size in image_sizes]
            videos = kwargs.get("video_sizes")
            if videos is not None and compressed_videos:
                data.num_video_tokens = [self.video_tokens(handle, frames) for frames, _, _ in videos]
            return data

        compressed_videos = self.video_tokens(handle, 1) is not None
        handle.override(processor, "replace_image_token", replace_image_token)
        if compressed_videos:
            handle.override(processor, "replace_video_token", replace_video_token)
        handle.override(processor, "_get_num_multimodal_tokens", get_num_multimodal_tokens)

    # --- pictures ------------------------------------------------------------------------------------------
    def image_key_map(self, handle: Handle, inputs: dict) -> list[tuple[int, int] | None]:
        """(tile, token) per image key of a one-image prompt, in sequence order; None for the newlines."""
        sizes = inputs["image_sizes"]
        if len(sizes) != 1:
            raise ValueError(f"{self.family}: the key map is drawn for one image, got {len(sizes)}.")
        t = handle.num_image_tokens
        keys: list[tuple[int, int] | None] = [(0, j) for j in range(t)]  # the base tile first, in every layout
        if self.single_tile_flags(inputs, 1)[0]:
            return keys + [None]
        rows, cols = self.image_grid(sizes[0])
        if t == handle.stock_image_tokens:
            return keys + self.stock_keys(sizes[0], rows, cols)
        for r in range(rows):
            keys += [(1 + r * cols + c, j) for c in range(cols) for j in range(t)] + [None]
        return keys

    def stock_keys(self, image_size, rows: int, cols: int) -> list[tuple[int, int] | None]:
        """Stock packing of the high-res tiles: the unpadded patch grid row by row, a newline closing each row."""
        side, width = self.side, cols * self.side
        flat = unpad_image(torch.arange(rows * side * width).view(1, rows * side, width), image_size)[0]
        keys: list[tuple[int, int] | None] = []
        for line in flat.tolist():
            for y, x in (divmod(i, width) for i in line):
                keys.append((1 + (y // side) * cols + x // side, (y % side) * side + x % side))
            keys.append(None)
        return keys

    # --- prompt check ------------------------------------------------------------------------------------
    def single_tile_flags(self, kwargs: dict, images: int) -> list[bool]:
        """Per image of a forward call: sent as a single tile (see `single_tile`)."""
        return [False] * images

    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        if handle.num_image_tokens == handle.stock_image_tokens:
            return  # stock packing: the model's own placeholder check applies
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encoded the images already: their packed lengths are known
            want = sum(len(f) for f in encoded.pooler_output)
        elif kwargs.get("pixel_values") is not None:
            sizes = kwargs.get("image_sizes")
            if sizes is None:
                raise ValueError(f"{self.family} needs image_sizes with pixel_values (the processor returns both).")
            flags = self.single_tile_flags(kwargs, len(sizes))
            want = sum(self.image_tokens(handle, s, f) for s, f in zip(sizes, flags, strict=True))
        else:
            return
        if input_ids is None:
            raise ValueError("unclutter needs input_ids (not inputs_embeds) to find the image placeholders.")
        found = int((input_ids == self.config.image_token_id).sum().item())
        if found != want:
            raise ValueError(
                f"the prompt has {found} image tokens but the compressed tiles of these images fill {want}. Pass "
                "processor= to unclutter.apply so the processor expands '<image>' to the compressed count."
            )
