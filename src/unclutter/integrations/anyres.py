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
its tokens, then one newline. Length: ``t + rows * cols * h + rows``, or ``t + 1`` for a single tile, where
``h`` is the high-res tiles' budget under VMTC: the budget's share of the high-res tokens stock sends (unpadded;
OneVision's interpolated), per tile, at most ``t`` (`AnyresAdapter.high_res_tokens`); tiles above it are compressed
once more after the tower (`AnyresAdapter.cap_high_res`). SPD keeps ``h = t``.
`Adapter.patch_processor` makes the processor expand ``<image>`` to exactly this count, and
`image_key_map` names the (tile, token) behind every image key, for the stock and the compressed layout.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from .. import vmtc as vmtc_math
from .base import Adapter, Handle
from .llava import feature_block
from .vision import plan_vmtc, pool_grid


def packed_count(tokens: int, grid: tuple[int, int] | None, high: int | None = None) -> int:
    """Tokens one image sends under the compressed packing: ``tokens`` for the base tile (or the single tile),
    ``high`` (default ``tokens``) per high-res tile, ``grid`` (rows, cols) or None."""
    if grid is None:
        return tokens + 1
    rows, cols = grid
    return tokens + rows * cols * (tokens if high is None else high) + rows


def pack_tiles(
    base: torch.Tensor, high: torch.Tensor | None, grid: tuple[int, int] | None, newline: torch.Tensor
) -> torch.Tensor:
    """One image's projected tile features in the layout above.

    base: (t, E), the base tile (or the single tile); high: (rows * cols, h, E) high-res tiles in raster order,
    None for a single tile. Returns (packed_count(t, grid, h), E).
    """
    row = newline.to(base.device, base.dtype)[None]  # (1, E)
    if grid is None:
        if high is not None and len(high):
            raise ValueError(f"an image without a tile grid should be one tile, got {1 + len(high)}.")
        return torch.cat([base, row])
    rows, cols = grid
    tiles = 1 + (0 if high is None else len(high))
    if tiles != 1 + rows * cols:
        raise ValueError(
            f"an image laid out as {rows}x{cols} high-res tiles should have {1 + rows * cols} tiles (base "
            f"included), got {tiles}: the processor's image_grid_pinpoints differ from the model config's."
        )
    _, h, e = high.shape
    high = high.reshape(rows, cols * h, e)
    high = torch.cat([high, row.expand(rows, 1, e)], dim=1).reshape(-1, e)
    return torch.cat([base, high])


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
        if single_tile:
            return packed_count(handle.num_image_tokens, None)
        grid = self.image_grid(image_size)
        return packed_count(handle.num_image_tokens, grid, self.high_res_tokens(handle, image_size, grid))

    def stock_high_res_grid(self, image_size, grid: tuple[int, int]) -> tuple[int, int, bool]:
        """(rows, cols) of the high-res patch grid stock packs for this image, and whether stock interpolated it:
        here the unpadded grid (the tiles' patches minus the padding rows or columns), never interpolated.
        OneVision interpolates large grids down (`llava_onevision`)."""
        rows, cols = grid
        _, height, width = unpad_image(torch.empty(0, rows * self.side, cols * self.side), image_size).shape
        return height, width, False

    def high_res_tokens(self, handle: Handle, image_size, grid: tuple[int, int]) -> int:
        """Tokens each high-res tile of this image sends under VMTC: the budget's share of the high-res tokens stock
        sends, spread over the tiles, at most the per-tile budget ``t`` and at least 1:
        ``max(1, min(t, round(H' * W' * t / side^2) // (rows * cols)))``, H' x W' = `stock_high_res_grid`. Stock unpads
        (and OneVision interpolates), a per-tile budget counts padding in full: without the share an elongated
        image would keep more tokens than stock (a 16:9 photo on LLaVA-NeXT at ratio 0.75: 1.11x stock's). SPD
        keeps its grid per tile."""
        t = handle.num_image_tokens
        if not handle.active_stages:
            return t
        height, width, _ = self.stock_high_res_grid(image_size, grid)
        return max(1, min(t, round(height * width * t / self.side**2) // (grid[0] * grid[1])))

    def cap_high_res(
        self, handle: Handle, high: torch.Tensor, tile_rows: range, tokens: int
    ) -> tuple[torch.Tensor, vmtc_math.VMTCInfo]:
        """(tiles, t, E) projected high-res tile features (``tile_rows``: their rows in the tower's batch) ->
        (tiles, tokens, E), compressed again by `vmtc.compress`, ranked and merge-weighted by
        `vmtc.output_importance` of the tower's last stage (kept tokens their IPS, merged ones their members'
        sum), and what that did (pictures draw it as a step after the tower, ``handle.post_infos``)."""
        infos = handle.stage_infos
        if len(infos) != len(handle.active_stages) or infos[-1].importance.shape[0] < tile_rows.stop:
            raise RuntimeError(
                f"unclutter fits {self.family}'s high-res tiles to the budget's share of stock's count with the "
                "importance the tower's last VMTC stage recorded, but this pack_image_features call does not follow "
                "a VMTC tower pass over these tiles."
            )
        weights = vmtc_math.output_importance(infos[-1])[tile_rows.start : tile_rows.stop]
        clusters = self.clusters_for(handle, tokens)
        return vmtc_math.compress(
            high, weights.to(high.device), tokens - clusters, clusters, merge=handle.vmtc.merge,
            normalize=handle.vmtc.normalize, iters=handle.vmtc.kmeans_iters, has_cls=False,
        )  # fmt: skip

    @staticmethod
    def clusters_for(handle: Handle, tokens: int) -> int:
        """Merged tokens of a compression after the tower down to ``tokens``: the last stage's choice, capped."""
        cfg = handle.vmtc
        if cfg.merge != "cluster":
            return 0 if cfg.merge == "drop" else 1
        chosen = cfg.clusters[-1] if isinstance(cfg.clusters, tuple) else cfg.clusters
        return min(chosen or vmtc_math.default_clusters(tokens), tokens)

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
                raise ValueError(
                    f"SPD grid {handle.spd.grid} is larger than the {self.side}x{self.side} tile grid: choose grid <= "
                    f"{self.side}."
                )
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
            handle.override(self.base, "pack_image_features", self.packer(handle))

    def packer(self, handle: Handle):
        """A replacement for the model's ``pack_image_features`` (same call, same return) for compressed tiles."""

        def pack_image_features(image_features, image_sizes, *args, image_newline=None, **kwargs):
            if image_newline is None:
                raise ValueError(
                    "unclutter's tile packer needs image_newline (the model's get_image_features passes it); "
                    "it was called without."
                )
            packed, first = [], 0  # first: the image's first row in the tower's batch of tiles
            handle.post_infos = {}
            for feats, size in zip(image_features, image_sizes, strict=True):
                grid = None if feats.shape[0] == 1 else self.image_grid(size)
                high = feats[1:]
                if grid is not None and (h := self.high_res_tokens(handle, size, grid)) < high.shape[1]:
                    rows = range(first + 1, first + len(feats))
                    high, info = self.cap_high_res(handle, high, rows, h)
                    handle.post_infos.update({row: info.select(i) for i, row in enumerate(rows)})
                packed.append(pack_tiles(feats[0], high, grid, image_newline))
                first += len(feats)
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
        h = self.high_res_tokens(handle, sizes[0], (rows, cols))  # t, or less after the cap's compression
        for r in range(rows):
            keys += [(1 + r * cols + c, j) for c in range(cols) for j in range(h)] + [None]
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
