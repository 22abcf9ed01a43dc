"""LLaVA-NeXT (`LlavaNextForConditionalGeneration` / `LlavaNextModel`): CLIP tower with CLS, anyres tiles.

- CMAI: the shared runtime. Every packed image embedding fills an ``<image>`` placeholder, the
  ``image_newline`` embeddings included, so newlines are image keys (ranked and inhibited like patches):
  they carry no text and the paper's split is text vs. image positions. Images of different sizes give
  different counts per sample; CMAI pads them per sample.
- VMTC: every tile (base and high-res) is one CLIP pass, so the shared CLIP VMTC layer forward
  (`vision.py`) compresses each tile to the per-tile budget (ratio 0.5 -> half of each tile's patches),
  ranked by each tile's own CLS attention (the paper's importance). The high-res part then gets the budget's
  share of what stock sends for it (stock crops the padding, a tile budget would count it): where that is
  less than the tiles' budget, each high-res tile is compressed once more after the projector, ranked and
  weighted by the last stage's importance (`anyres.AnyresAdapter.high_res_tokens`), so an elongated image no
  longer sends more than stock (ratio 0.5: about half of stock's tokens; a strip whose base tile dominates keeps
  more than half). One exception: a strip so thin that stock keeps none of its high-res patches (its unpadded
  grid is empty; stock sends the base tile alone) still gets at least 1 token per high-res tile and a newline per
  tile row, more than stock when ``t > side^2 - rows * cols - rows`` (LLaVA-NeXT-7B: 573 or more of 576).
- SPD: a projector pre-hook average-pools each tile's patch grid to ``grid x grid``.
- Packing and processor: compressed tiles are packed by `anyres.pack_tiles` (base, high-res tiles in
  raster order, one newline per row of tiles; see `anyres`), and ``<image>`` expands to exactly that
  count through the processor's `replace_image_token` and `_get_num_multimodal_tokens`. Ratio 1.0
  installs nothing: stock packing, stock count.
"""

from __future__ import annotations

from .anyres import AnyresAdapter
from .base import Handle, register
from .vision import install_vmtc_layers


@register
class LlavaNextAdapter(AnyresAdapter):
    family = "LLaVA-NeXT"
    classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    processor_classes = ("LlavaNextProcessor",)
    vmtc = True
    spd = True
    has_cls = True

    def plan(self, handle: Handle) -> None:
        tower = self.base.vision_tower
        if handle.vmtc is not None and not hasattr(getattr(tower, "embeddings", None), "class_embedding"):
            raise TypeError(
                f"VMTC on LLaVA-NeXT needs a CLIP tower with a CLS token; this model's {type(tower).__name__} has none."
            )
        super().plan(handle)

    def install_vmtc(self, handle: Handle) -> None:
        install_vmtc_layers(handle, self.base.vision_tower.encoder.layers)
