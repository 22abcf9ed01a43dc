"""`apply` for Hugging Face LLaVA-1.5 (`LlavaForConditionalGeneration` / `LlavaModel`).

Everything is attached to one model instance and detached by `Handle.remove()`:
- VMTC: a per-instance forward on each stage block of the CLIP tower (attention, compress, MLP),
  with forward hooks on the block's q/k projections so the CLS importance comes from the block's
  own attention (no second forward).
- SPD: a forward pre-hook on the projector that average-pools the patch grid.
- CMAI: the language model's attention implementation is switched to the registered
  ``unclutter_cmai`` function; each active attention module gets a weak reference to the state.
- A forward pre-hook on `LlavaModel` validates the prompt's image placeholders and feeds CMAI the
  per-call facts (image positions, text rows) that `generate()` cannot carry as kwargs.
- Given the processor, its ``<image>`` expansion is set to the compressed token count.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel

from .. import vmtc as vmtc_math
from ..cmai import gamma_schedule
from ..config import CMAIConfig, SPDConfig, VMTCConfig
from . import cmai_attention

_HANDLE_ATTR = "_unclutter_handle"
DEFAULT_STAGES = 4


@dataclass
class VMTCStage:
    """One compression step: where it sits and how many tokens it keeps and makes."""

    layer: int
    tokens_in: int  # patch tokens entering (CLS excluded)
    keep: int
    clusters: int

    @property
    def tokens_out(self) -> int:
        return self.keep + self.clusters


@dataclass
class _Geometry:
    grid: int  # patches per side
    feature_block: int  # 0-based block whose output feeds the projector (smallest, for layer lists)
    has_cls_in_features: bool  # vision_feature_select_strategy == "full"

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


def _geometry(model: LlavaModel) -> _Geometry:
    cfg = model.config
    vcfg = cfg.vision_config
    num_layers = vcfg.num_hidden_layers
    feature_layers = cfg.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    blocks = [vmtc_math.feature_block(num_layers, f) for f in feature_layers]
    return _Geometry(
        grid=vcfg.image_size // vcfg.patch_size,
        feature_block=min(blocks),
        has_cls_in_features=cfg.vision_feature_select_strategy == "full",
    )


def plan_vmtc(cfg: VMTCConfig, num_patches: int, feature_block: int) -> list[VMTCStage]:
    """Resolve a `VMTCConfig` into stages for a tower with ``num_patches`` patches."""
    budget = cfg.num_tokens if cfg.num_tokens is not None else max(1, round(cfg.ratio * num_patches))
    if not 1 <= budget <= num_patches:
        raise ValueError(
            f"VMTC token budget {budget} is impossible for {num_patches} patches: choose num_tokens in "
            f"[1, {num_patches}] or ratio in (0, 1]."
        )
    n_stages = cfg.num_stages if cfg.num_stages is not None else min(DEFAULT_STAGES, feature_block + 1)
    layers = list(cfg.layers) if cfg.layers is not None else vmtc_math.stage_layers(feature_block, n_stages)
    if layers[-1] > feature_block or layers[0] < 0:
        raise ValueError(
            f"VMTC layers {layers} must lie in [0, {feature_block}]: blocks after the feature layer never "
            "reach the LLM (and a stage between two feature layers would break their concatenation)."
        )
    counts = (
        list(cfg.stage_tokens)
        if cfg.stage_tokens is not None
        else vmtc_math.stage_token_counts(num_patches, budget, len(layers))
    )
    if len(counts) != len(layers) or counts[-1] != budget:
        raise ValueError(
            f"VMTCConfig.stage_tokens={counts} must give one count per stage ({len(layers)}) ending at the budget {budget}."
        )
    if isinstance(cfg.clusters, tuple) and len(cfg.clusters) != len(layers):
        raise ValueError(f"VMTCConfig.clusters has {len(cfg.clusters)} values for {len(layers)} stages.")
    stages, tokens_in = [], num_patches
    for i, (layer, tokens_out) in enumerate(zip(layers, counts, strict=True)):
        if not 1 <= tokens_out <= tokens_in:
            raise ValueError(
                f"VMTC stage {i} (block {layer}) cannot go from {tokens_in} to {tokens_out} tokens: counts must "
                "be non-increasing and >= 1."
            )
        if cfg.merge == "drop":
            c = 0
        elif cfg.merge == "single":
            c = 1
        elif cfg.clusters is None:
            c = vmtc_math.default_clusters(tokens_out)
        else:
            c = cfg.clusters if isinstance(cfg.clusters, int) else cfg.clusters[i]
        if c > tokens_out or c < 0:
            raise ValueError(f"VMTC stage {i} wants {c} clusters but outputs only {tokens_out} tokens; lower clusters.")
        stages.append(VMTCStage(layer=layer, tokens_in=tokens_in, keep=tokens_out - c, clusters=c))
        tokens_in = tokens_out
    return stages


def _vmtc_block_forward(stage: VMTCStage, handle: Handle):
    """A CLIP/SigLIP encoder-layer forward with VMTC between attention and MLP (paper Fig. 3)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("VMTC cannot compress a vision tower called with an attention mask.")
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=None, **kwargs)
        hidden_states = residual + hidden_states
        grab = handle._qk.pop(stage.layer)
        attn = self.self_attn
        b, t, _ = grab["q"].shape
        q = grab["q"][:, :1].view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = grab["k"].view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        patches = t - 1  # tokens after CLS
        if patches != stage.tokens_in:
            raise ValueError(
                f"VMTC stage at block {stage.layer} expected {stage.tokens_in} patch tokens, got "
                f"{patches}: the image size does not match the vision config."
            )
        cfg = handle.vmtc
        # both run with autocast off themselves: float32 ranking and merging even under bf16 mixed precision
        importance = vmtc_math.cls_importance(q, k, attn.scale)
        hidden_states, info = vmtc_math.compress(
            hidden_states, importance, stage.keep, stage.clusters,
            merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters,
        )  # fmt: skip
        if stage is handle.stages[0]:
            handle.stage_infos = []
        handle.stage_infos.append(info)
        residual = hidden_states
        hidden_states = self.mlp(self.layer_norm2(hidden_states))
        return residual + hidden_states

    return forward


def _spd_pre_hook(grid: int, has_cls: bool):
    def hook(module: nn.Module, args: tuple):
        features = args[0]  # (B, [1+]P, E)
        cls, patches = (features[:, :1], features[:, 1:]) if has_cls else (None, features)
        b, p, e = patches.shape
        side = int(round(p**0.5))
        grid_in = patches.transpose(1, 2).reshape(b, e, side, side)
        pooled = F.adaptive_avg_pool2d(grid_in.float(), grid).to(features.dtype).flatten(2).transpose(1, 2)
        return ((pooled if cls is None else torch.cat([cls, pooled], dim=1)),) + args[1:]

    return hook


@dataclass
class Handle:
    """What `apply` attached to a model; `remove()` detaches all of it. Also a context manager."""

    model: nn.Module
    processor: object | None
    vmtc: VMTCConfig | None
    cmai: CMAIConfig | None
    spd: SPDConfig | None
    num_image_tokens: int  # image tokens per image that enter the LLM
    stock_image_tokens: int
    stages: list[VMTCStage] = field(default_factory=list)
    stage_infos: list[vmtc_math.VMTCInfo] = field(default_factory=list)  # last vision forward, per stage
    cmai_state: cmai_attention.CMAIState | None = None
    _hooks: list = field(default_factory=list)
    _patched_forwards: list = field(default_factory=list)
    _cmai_modules: list = field(default_factory=list)
    _prev_attn: str | None = None
    _processor_attrs: list = field(default_factory=list)
    _qk: dict = field(default_factory=dict)
    _removed: bool = False

    def remove(self) -> None:
        """Restore the model (and processor) exactly as they were before `apply`."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        for module in self._patched_forwards:
            del module.forward
        for module in self._cmai_modules:
            del module._unclutter_cmai
        if self._prev_attn is not None:
            _llava_model(self.model).language_model.set_attn_implementation(self._prev_attn)
        for name in self._processor_attrs:
            delattr(self.processor, name)
        delattr(_llava_model(self.model), _HANDLE_ATTR)
        self._removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _llava_model(model: nn.Module) -> LlavaModel:
    return model.model if isinstance(model, LlavaForConditionalGeneration) else model


def _num_images(kwargs: dict) -> int:
    """Images in this forward call: from pixel_values, or from the image features generate() pre-encodes."""
    if kwargs.get("pixel_values") is not None:
        return kwargs["pixel_values"].shape[0]
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    return len(encoded.pooler_output) if encoded is not None else 0


def _check_prompt(handle: Handle, input_ids: torch.Tensor | None, images: int, token_id: int):
    if images == 0:
        return
    if input_ids is None:
        raise ValueError("unclutter needs input_ids (not inputs_embeds) to find the image placeholders.")
    found = int((input_ids == token_id).sum().item())
    want = images * handle.num_image_tokens
    if found == 0:
        raise ValueError(
            "an image was given but the prompt has no image token: put the processor's image token "
            "(e.g. '<image>') in the text where the image belongs."
        )
    if found == want:
        return
    if found == images * handle.stock_image_tokens and handle.num_image_tokens != handle.stock_image_tokens:
        raise ValueError(
            f"the prompt carries {handle.stock_image_tokens} image placeholders per image, the stock count, but "
            f"the compressed vision tower yields {handle.num_image_tokens}. Pass processor= to unclutter.apply so "
            f"it expands '<image>' correctly, or repeat the image token handle.num_image_tokens times yourself."
        )
    raise ValueError(
        f"the prompt has {found} image tokens for {images} image(s); expected {handle.num_image_tokens} per image."
    )


def _adjust_processor(handle: Handle, processor) -> None:
    if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
        raise TypeError(
            f"processor must be a LLaVA processor (with image_token and replace_image_token), got "
            f"{type(processor).__name__}."
        )
    tokens = handle.num_image_tokens
    original_counts = processor._get_num_multimodal_tokens

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
        return processor.image_token * tokens

    def get_num_multimodal_tokens(image_sizes=None, **kwargs):
        data = original_counts(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [tokens] * len(image_sizes)
        return data

    for name, fn in (
        ("replace_image_token", replace_image_token),
        ("_get_num_multimodal_tokens", get_num_multimodal_tokens),
    ):
        if name in vars(processor):
            raise ValueError(
                f"processor.{name} is already overridden on this instance; unclutter will not stack on it."
            )
        setattr(processor, name, fn)
        handle._processor_attrs.append(name)


def apply(
    model: nn.Module,
    processor=None,
    *,
    vmtc: VMTCConfig | None = None,
    cmai: CMAIConfig | None = None,
    spd: SPDConfig | None = None,
) -> Handle:
    """Attach VMTC / CMAI / SPD to a LLaVA model in place. Returns a `Handle` (call ``remove()``)."""
    if not isinstance(model, LlavaForConditionalGeneration | LlavaModel):
        raise TypeError(
            f"unclutter.apply supports LLaVA-1.5 models (transformers LlavaForConditionalGeneration or "
            f"LlavaModel, e.g. 'llava-hf/llava-1.5-7b-hf'), got {type(model).__name__}."
        )
    for name, value, kind in (("vmtc", vmtc, VMTCConfig), ("cmai", cmai, CMAIConfig), ("spd", spd, SPDConfig)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name}= takes a {kind.__name__}, got {type(value).__name__}.")
    llava = _llava_model(model)
    if getattr(llava, _HANDLE_ATTR, None) is not None:
        raise ValueError("unclutter is already applied to this model; call handle.remove() before applying again.")
    if vmtc is not None and spd is not None:
        raise ValueError("VMTC and SPD both reduce image tokens and cannot be combined; choose one.")

    geo = _geometry(llava)
    extra = 1 if geo.has_cls_in_features else 0
    stock_tokens = geo.num_patches + extra
    tokens = stock_tokens
    stages: list[VMTCStage] = []
    if vmtc is not None:
        if not hasattr(llava.vision_tower, "encoder") or not hasattr(llava.vision_tower.embeddings, "class_embedding"):
            raise TypeError(
                "VMTC needs a ViT vision tower with a CLS token (CLIP); this model's "
                f"{type(llava.vision_tower).__name__} has none."
            )
        stages = plan_vmtc(vmtc, geo.num_patches, geo.feature_block)
        tokens = stages[-1].tokens_out + extra
    if spd is not None:
        if spd.grid > geo.grid:
            raise ValueError(f"SPD grid {spd.grid} is larger than the {geo.grid}x{geo.grid} patch grid.")
        tokens = spd.grid * spd.grid + extra

    handle = Handle(model, processor, vmtc, cmai, spd, tokens, stock_tokens, stages=stages)
    try:
        _install(handle, llava, geo)
        if processor is not None and tokens != stock_tokens:
            _adjust_processor(handle, processor)
    except Exception:
        setattr(llava, _HANDLE_ATTR, handle)
        handle.remove()
        raise
    setattr(llava, _HANDLE_ATTR, handle)
    return handle


def _install(handle: Handle, llava: LlavaModel, geo: _Geometry) -> None:
    layers = llava.vision_tower.encoder.layers
    for stage in handle.stages:
        block = layers[stage.layer]
        for name in ("q", "k"):
            proj = getattr(block.self_attn, f"{name}_proj")

            def grab(module, args, output, name=name, layer=stage.layer):
                handle._qk.setdefault(layer, {})[name] = output

            handle._hooks.append(proj.register_forward_hook(grab))
        block.forward = MethodType(_vmtc_block_forward(stage, handle), block)
        handle._patched_forwards.append(block)

    if handle.spd is not None:
        hook = _spd_pre_hook(handle.spd.grid, geo.has_cls_in_features)
        handle._hooks.append(llava.multi_modal_projector.register_forward_pre_hook(hook))

    token_id = llava.config.image_token_id
    if handle.cmai is not None:
        lm = llava.language_model
        num_layers = lm.config.num_hidden_layers
        gammas = gamma_schedule(num_layers, handle.cmai.gamma_max, handle.cmai.layers, handle.cmai.gammas)
        state = cmai_attention.CMAIState(token_id, gammas, handle.cmai.focus, handle.cmai.discount)
        handle.cmai_state = state
        cmai_attention.register()
        handle._prev_attn = lm.config._attn_implementation
        lm.set_attn_implementation(cmai_attention.ATTN_NAME)
        ref = weakref.ref(state)
        for module in lm.modules():
            if getattr(module, "layer_idx", None) in gammas and hasattr(module, "q_proj"):
                module._unclutter_cmai = ref
                handle._cmai_modules.append(module)

    def pre_forward(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        _check_prompt(handle, input_ids, _num_images(kwargs), token_id)
        if handle.cmai_state is not None:
            if input_ids is None:
                raise ValueError("CMAI needs input_ids (not inputs_embeds) to locate the image tokens.")
            handle.cmai_state.begin(input_ids, kwargs.get("attention_mask"), kwargs.get("past_key_values"))

    handle._hooks.append(llava.register_forward_pre_hook(pre_forward, with_kwargs=True))
    if handle.cmai_state is not None:  # a prefill without past_key_values creates its cache inside

        def post_forward(module, args, output):
            handle.cmai_state.adopt(getattr(output, "past_key_values", None))

        handle._hooks.append(llava.register_forward_hook(post_forward))
