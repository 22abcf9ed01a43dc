"""The shared runtime: `apply`, the `Handle` that undoes it, and the `Adapter` each model family fills in.

An adapter (one short file per family, registered with `@register`) says only what differs between
families: where the vision blocks are and how to compress them, which token ids are image/video
placeholders and which are structural, and how the processor expands a placeholder. Everything else
is shared here: CMAI (one registered attention function for every language model), the forward
hooks that feed it, processor patching and its undo, and the version check.

Everything `apply` attaches is recorded as an undo action on the handle; `Handle.remove()` runs them
in reverse order, so the model and processor come back exactly as they were.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import transformers
from torch import nn

from .. import vmtc as vmtc_math
from ..cmai import gamma_schedule
from ..compat import find_cache, output_cache, warn_if_untested
from ..config import CMAIConfig, SPDConfig, VMTCConfig
from . import cmai_attention
from .vision import VMTCStage

_HANDLE_ATTR = "_unclutter_handle"
ADAPTERS: list[type[Adapter]] = []


class ConcurrentUseError(RuntimeError):
    """Two threads use one applied model at the same time (`Handle.enter`)."""


def register(adapter: type[Adapter]) -> type[Adapter]:
    """Class decorator: make `apply` accept the adapter's model classes."""
    ADAPTERS.append(adapter)
    return adapter


@dataclass
class Tile:
    """One tower input of an image (a tile, a crop, the whole image), for pictures (`Adapter.vision_tiles`)."""

    pixels: torch.Tensor  # (3, H, W) as the tower receives it (normalised)
    grid: tuple[int, int]  # VMTC units per column and per row of the tile (rows, cols)
    row: int  # its batch row in every VMTCInfo of handle.stage_infos
    name: str
    # the grid cell (raster index, row-major in ``grid``) of each unit entering the first stage, in the order that
    # stage indexes them; None: raster order
    units: list[int] | None = None
    # per entry of handle.stage_infos, the order in which the stage's outputs (its kept units in ascending order,
    # then clusters 0..c-1) move on to the next stage or out of the tower: ``orders[s][j]`` is the output index of
    # the j-th unit the next stage (or, after the last stage, the tower's end) receives; None: in output order
    orders: list[list[int]] | None = None


class Adapter:
    """How one model family plugs in. Subclasses override what their family does differently.

    ``classes`` names the transformers classes (the ``*ForConditionalGeneration`` and its base
    ``*Model``) the adapter accepts; names missing from the installed transformers are ignored.
    """

    family: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    # the family's processor classes (subclasses too): the one whose expansion `patch_processor` changes
    processor_classes: ClassVar[tuple[str, ...]] = ()
    vmtc: ClassVar[bool] = False  # VMTC supported
    spd: ClassVar[bool] = False  # SPD supported
    default_importance: ClassVar[str] = "cls"  # "received" for towers without a CLS token

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.model if isinstance(getattr(model, "model", None), nn.Module) else model

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        types = tuple(t for t in (getattr(transformers, name, None) for name in cls.classes) if t is not None)
        return bool(types) and isinstance(model, types)

    # --- token ids ---------------------------------------------------------------------------------
    @property
    def config(self):
        return self.base.config

    @property
    def language_model(self) -> nn.Module:
        return self.base.language_model

    def media_token_ids(self) -> list[int]:
        """Image (and video) placeholder ids: the image keys CMAI ranks and inhibits."""
        ids = [getattr(self.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")]
        return sorted({i for i in ids if i is not None})

    def structural_token_ids(self) -> list[int]:
        """Ids that are neither image keys nor text queries (row/col tags, image begin/end markers)."""
        return []

    # --- token reduction (VMTC / SPD) ------------------------------------------------------------
    def plan(self, handle: Handle) -> None:
        """Resolve VMTC/SPD into ``handle.stages`` and the token counts; raise if impossible."""

    def install(self, handle: Handle) -> None:
        """Attach the vision-side hooks (VMTC stages, SPD pooling)."""

    def patch_processor(self, handle: Handle, processor) -> None:
        """Make the processor expand each image placeholder to the compressed count."""
        raise NotImplementedError(f"{type(self).__name__} cannot adjust its processor")

    def check_prompt(self, handle: Handle, input_ids: torch.Tensor | None, kwargs: dict) -> None:
        """Fail early, with a fix, when the prompt's placeholders cannot match the images."""

    # --- tools above the core: `unclutter bench speed` and `unclutter visualize` ---------------------------------
    def vision_modules(self) -> tuple[nn.Module, nn.Module]:
        """(first, last): one vision pass runs from ``first``'s forward to the end of ``last``'s (pixels to the
        projected features the LLM receives). The speed benchmark times it with a forward pre-hook on ``first`` and
        a forward hook on ``last``, so both must run once per pass, stock and compressed alike.

        Default: the base model's ``vision_tower`` (or ``vision_model``) and ``multi_modal_projector`` (or
        ``connector``). Override when a compressed path bypasses them (a tower whose VMTC runs the blocks itself).
        """
        first = next((getattr(self.base, n) for n in ("vision_tower", "vision_model") if hasattr(self.base, n)), None)
        last = next(
            (getattr(self.base, n) for n in ("multi_modal_projector", "connector") if hasattr(self.base, n)), None
        )
        if first is None or last is None:
            raise NotImplementedError(
                f"{type(self).__name__} does not say where {self.family}'s vision path starts and ends: override "
                "Adapter.vision_modules."
            )
        return first, last

    def vision_tiles(self, handle: Handle, inputs: dict) -> list[Tile]:
        """The tower inputs of a one-prompt, one-image ``inputs`` (a processor output), as pictures draw them.

        One `Tile` per batch row of the last vision forward's ``handle.stage_infos`` (every `VMTCInfo` holds one
        row per tower input), in that order. Default: each (3, H, W) slice of ``pixel_values`` (5-D: the first
        sample's) is one tile, its VMTC units a square grid (side: the square root of the first stage's input
        count). Override when the tower's inputs are not ``pixel_values`` rows (packed patches) or grids are not
        square.
        """
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.dim() not in (4, 5):
            raise ValueError(f"{self.family}: pictures need (tiles, 3, H, W) pixel_values; override vision_tiles.")
        tiles = pixels[0] if pixels.dim() == 5 else pixels
        if not handle.stage_infos:
            raise ValueError(f"{self.family}: the last vision forward recorded no VMTC stage (handle.stage_infos).")
        rows, units = handle.stage_infos[0].importance.shape
        side = math.isqrt(units)
        if rows != len(tiles) or side * side != units:
            raise ValueError(
                f"{self.family}: VMTC ranked {rows} tower inputs of {units} units, not {len(tiles)} square tiles of "
                "pixel_values; this family needs its own Adapter.vision_tiles."
            )
        name = ["image"] if len(tiles) == 1 else [f"tile {i}" for i in range(len(tiles))]
        return [Tile(tile, (side, side), i, name[i]) for i, tile in enumerate(tiles)]

    def stage_blocks(self, handle: Handle) -> list[int]:
        """The vision block of each entry of ``handle.stage_infos`` (pictures title their panels with it). Default:
        the blocks of ``handle.active_stages``. Override when stages are planned per input (per image size)."""
        return [stage.layer for stage in handle.active_stages]

    def image_key_map(self, handle: Handle, inputs: dict) -> list[tuple[int, int] | None]:
        """For each image key of the first prompt (its media tokens, in sequence order): ``(tile, token)``, the
        index of the `vision_tiles` entry and of that tile's output token after the last VMTC stage it holds, or
        None for a key that holds no tile token (a newline embedding, a CLS token). Pictures map CMAI's
        per-key inhibition back onto the tiles with it. Default: every tile's ``handle.num_image_tokens`` tokens,
        tile after tile. Override when the LLM sees another layout (newlines, CLS, reordering). A tile's tokens
        are numbered in the order its last stage's outputs leave it (`Tile.orders`).
        """
        tiles = len(self.vision_tiles(handle, inputs))
        return [(t, j) for t in range(tiles) for j in range(handle.num_image_tokens)]


@dataclass
class Handle:
    """What `apply` attached to a model; `remove()` detaches all of it. Also a context manager."""

    model: nn.Module
    processor: object | None
    adapter: Adapter
    vmtc: VMTCConfig | None
    cmai: CMAIConfig | None
    spd: SPDConfig | None
    num_image_tokens: int | None = None  # image tokens per image (per tile for tiled families) entering the LLM
    stock_image_tokens: int | None = None
    stages: list[VMTCStage] = field(default_factory=list)
    stage_infos: list[vmtc_math.VMTCInfo] = field(default_factory=list)  # last vision forward, per active stage
    # last vision forward: tower row -> a one-row compression after the tower (the anyres high-res share)
    post_infos: dict[int, vmtc_math.VMTCInfo] = field(default_factory=dict)
    cmai_state: cmai_attention.CMAIState | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _qk: dict = field(default_factory=dict)
    # stage block -> its `vision.RankingSlot` (the block ranks inside its own attention)
    _ranked: dict = field(default_factory=dict)
    _removed: bool = False
    # The thread using the model now (a generate or a forward call) and how deeply: the method's per-call state
    # (VMTC's captured q/k and rankings, CMAI's rows) serves one thread at a time; see `enter`
    _owner: int | None = None
    _depth: int = 0

    CONCURRENT = (
        "unclutter's state on an applied model serves one thread at a time: serve concurrent requests as one batch, "
        "or give each thread its own model"
    )

    def enter(self) -> None:
        """A generate or forward call starts: refuse it while another thread is inside one (re-entrant per thread;
        a mark left by a thread that left without `leave`, on Ctrl+C, is stale and taken over)."""
        me = threading.get_ident()
        if self._owner not in (None, me) and _using(self._owner, self.adapter.base):
            raise ConcurrentUseError(f"two threads use the model at once. {self.CONCURRENT}.")
        if self._owner != me:
            self._owner, self._depth = me, 0
        self._depth += 1

    def leave(self) -> bool:
        """A call ends (or fails): whether it was this thread's."""
        if self._owner != threading.get_ident():
            return False
        self._depth -= 1
        if self._depth <= 0:
            self._owner = None
        return True

    @property
    def importance(self) -> str:
        """How VMTC ranks patches: the config's choice, else the adapter's default for its tower."""
        chosen = self.vmtc.importance if self.vmtc is not None else None
        return chosen or self.adapter.default_importance

    @property
    def active_stages(self) -> list[VMTCStage]:
        """The stages that change something (a stage keeping every token is not installed)."""
        return [s for s in self.stages if not s.identity]

    # --- recording what was attached ---------------------------------------------------------------
    def add_hook(self, hook_handle) -> None:
        self._undo.append(hook_handle.remove)

    def patch_forward(self, module: nn.Module, forward) -> None:
        """Replace ``module``'s forward on the instance. A module dispatched by accelerate (``device_map`` over
        several devices, offload) already has an instance forward, accelerate's wrapper, which moves the inputs and
        then calls ``module._old_forward``: that inner forward is replaced instead, so the wrapper keeps its work."""
        if getattr(module, "_hf_hook", None) is not None and "_old_forward" in vars(module):
            inner = module._old_forward
            module._old_forward = forward

            def undo() -> None:
                if vars(module).get("_old_forward") is forward:  # accelerate's wrapper still there
                    module._old_forward = inner
                elif vars(module).get("forward") is forward:  # its hooks were removed: ours became the forward
                    if getattr(inner, "__func__", None) is type(module).forward:
                        del module.forward
                    else:
                        module.forward = inner

            self._undo.append(undo)
            return
        if "forward" in vars(module):
            raise ValueError(
                f"{type(module).__name__}.forward is already replaced on this instance (by another library, or by a "
                "second unclutter.apply); unclutter does not stack on it."
            )
        module.forward = forward
        self._undo.append(lambda: delattr(module, "forward"))

    def override(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute that shadows the class's (a processor method); undone by remove()."""
        if name in vars(obj):
            raise ValueError(f"{type(obj).__name__}.{name} is already overridden on this instance; not stacking.")
        setattr(obj, name, value)
        self._undo.append(lambda: delattr(obj, name))

    def remove(self) -> None:
        """Restore the model (and processor) exactly as they were before `apply`."""
        if self._removed:
            return
        while self._undo:
            self._undo.pop()()
        self._removed = True

    def __deepcopy__(self, memo) -> Handle:
        # The handle's undo actions, hooks and CMAI state point at the original model: a copy would share CMAI's
        # state with it and its remove() would undo the original.
        raise TypeError(
            "copy.deepcopy of a model with unclutter applied: call handle.remove() first, copy, then "
            "unclutter.apply to each model."
        )

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _generate_exclusively(handle: Handle, generate: Callable, args: tuple, kwargs: dict):
    """The model's own generate, one thread at a time: generate encodes the images before its first forward call,
    so the forward pre-hook alone would leave the vision pass unguarded."""
    handle.enter()
    try:
        return generate(*args, **kwargs)
    finally:
        handle.leave()


def _using(thread: int, base: nn.Module) -> bool:
    """Whether ``thread`` is inside a guarded generate or a call of ``base`` now (its stack shows it)."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code is _generate_exclusively.__code__ or (
            frame.f_code is nn.Module._call_impl.__code__ and frame.f_locals.get("self") is base
        ):
            return True
        frame = frame.f_back
    return False


def adapter_for(model: nn.Module) -> type[Adapter]:
    for adapter in ADAPTERS:
        if adapter.accepts(model):
            return adapter
    names = sorted(name for a in ADAPTERS for name in a.classes)
    raise TypeError(
        f"unclutter.apply does not support {type(model).__name__}. Supported transformers classes: {', '.join(names)}."
    )


def apply(
    model: nn.Module,
    processor=None,
    *,
    vmtc: VMTCConfig | None = None,
    cmai: CMAIConfig | None = None,
    spd: SPDConfig | None = None,
) -> Handle:
    """Attach VMTC / CMAI / SPD to a vision-language model in place. Returns a `Handle` (call ``remove()``).

    Given the processor, its own call then expands image placeholders to the compressed token count.
    """
    warn_if_untested()
    for name, value, kind in (("vmtc", vmtc, VMTCConfig), ("cmai", cmai, CMAIConfig), ("spd", spd, SPDConfig)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name}= takes a {kind.__name__}, got {type(value).__name__}.")
    adapter = adapter_for(model)(model)
    if getattr(adapter.base, _HANDLE_ATTR, None) is not None:
        raise ValueError("unclutter is already applied to this model; call handle.remove() before applying again.")
    if vmtc is not None and spd is not None:
        raise ValueError("VMTC and SPD both reduce image tokens and cannot be combined; choose one.")
    methods = {"VMTC": adapter.vmtc, "SPD": adapter.spd}
    for name, value in (("VMTC", vmtc), ("SPD", spd)):
        if value is not None and not methods[name]:
            available = " and ".join([m for m, ok in methods.items() if ok] + ["CMAI"])
            raise NotImplementedError(
                f"{name} is not available for {adapter.family} yet; {available} "
                f"{'are' if ' and ' in available else 'is'}. See the README's support matrix."
            )

    if processor is not None:
        check_processor(adapter, processor)
    handle = Handle(model, processor, adapter, vmtc, cmai, spd)
    adapter.plan(handle)
    setattr(adapter.base, _HANDLE_ATTR, handle)
    handle._undo.append(lambda: delattr(adapter.base, _HANDLE_ATTR))
    try:
        adapter.install(handle)
        if cmai is not None:
            _install_cmai(handle, adapter, cmai)
        _install_prompt_hooks(handle, adapter)
        if processor is not None and handle.num_image_tokens != handle.stock_image_tokens:
            adapter.patch_processor(handle, processor)
    except Exception:
        handle.remove()
        raise
    return handle


def check_processor(adapter: Adapter, processor) -> None:
    """Refuse another family's processor (each has the expansion hooks, so it would be patched, then fail later
    in the model or in unclutter's own hooks)."""
    names = adapter.processor_classes
    if names and not any(c.__name__ in names for c in type(processor).__mro__):
        raise TypeError(
            f"{adapter.family} takes its own processor ({' or '.join(names)}), got {type(processor).__name__}: "
            "load the processor from the model's checkpoint (AutoProcessor.from_pretrained)."
        )


def _install_cmai(handle: Handle, adapter: Adapter, cfg: CMAIConfig) -> None:
    lm = adapter.language_model
    num_layers = adapter.config.get_text_config().num_hidden_layers
    gammas = gamma_schedule(num_layers, cfg.gamma_max, cfg.layers, cfg.gammas)
    media = adapter.media_token_ids()
    if not media:
        raise ValueError(f"{type(adapter.model).__name__}'s config names no image token id; CMAI cannot find images.")
    state = cmai_attention.CMAIState(media, gammas, cfg.focus, cfg.discount, adapter.structural_token_ids())
    handle.cmai_state = state
    cmai_attention.register()
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(cmai_attention.ATTN_NAME)
    # (a user who switched the implementation after apply keeps that choice; the pre-hook refuses to run then)
    handle._undo.append(lambda: cmai_active(lm) and lm.set_attn_implementation(previous))
    ref = weakref.ref(state)
    found = set()
    for module in lm.modules():
        layer = getattr(module, "layer_idx", None)
        if layer in gammas and hasattr(module, "q_proj"):
            module._unclutter_cmai = ref
            handle._undo.append(lambda m=module: delattr(m, "_unclutter_cmai"))
            found.add(layer)
    if found != set(gammas):
        raise RuntimeError(
            f"CMAI found attention modules for LLM layers {sorted(found)} but needs {sorted(gammas)}: "
            f"{type(lm).__name__}'s attention layout is not the one unclutter knows."
        )


def cmai_active(lm: nn.Module) -> bool:
    """Whether the language model still dispatches attention to CMAI's registered function."""
    return lm.config._attn_implementation == cmai_attention.ATTN_NAME


def _install_prompt_hooks(handle: Handle, adapter: Adapter) -> None:
    """A forward pre-hook on the VLM validates placeholders and feeds CMAI the per-call facts."""
    state = handle.cmai_state

    # the hooks run eagerly under torch.compile (generate compiles the decode step of a static cache): they read the
    # thread and host numbers, and CMAI's state changes every call, which compiled guards would recompile for
    @torch.compiler.disable
    def pre_forward(module, args, kwargs):
        handle.enter()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        adapter.check_prompt(handle, input_ids, kwargs)
        if state is not None:
            if not cmai_active(adapter.language_model):
                raise ValueError(
                    "the language model's attn_implementation was changed to "
                    f"{adapter.language_model.config._attn_implementation!r} after unclutter.apply, which turns CMAI "
                    "off: call handle.remove(), set the implementation, then apply again."
                )
            state.begin(
                input_ids,
                kwargs.get("attention_mask"),
                find_cache(args, kwargs),
                media_inputs=_media_inputs(args, kwargs),
            )

    @torch.compiler.disable
    def post_forward(module, args, output):  # also after a failed call (always_call), which gives no output
        if handle.leave() and state is not None:
            state.capturable = False  # (a layer called outside a forward of the VLM takes the checked path)
            if state.chunk is not None:  # a call's layouts hold (B, 1, q, K) masks: none outlives its call
                state.chunk.layouts.clear()
            if output is not None:
                state.adopt(output_cache(output))  # a prefill without a cache argument creates its cache inside

    handle.add_hook(adapter.base.register_forward_pre_hook(pre_forward, with_kwargs=True))
    handle.add_hook(adapter.base.register_forward_hook(post_forward, always_call=True))
    model = handle.model
    if callable(getattr(model, "generate", None)):
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            return _generate_exclusively(handle, original, args, kwargs)

        handle.override(model, "generate", generate)


def _media_inputs(args: tuple, kwargs: dict) -> bool:
    """Whether a forward call may bring image or video features: pixels (every family passes them as
    ``pixel_values*``), features encoded before the call (``mm_encoder_outputs``: generate's chunked prefill hands
    each chunk the rows of its placeholders), or positional arguments other than input_ids."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    return (
        len(args) > 1
        or any(v is not None for k, v in kwargs.items() if k.startswith("pixel_values"))
        or any(v is not None for v in encoded.values())
    )


def encoded_rows(kwargs: dict, modality: str = "image") -> int | None:
    """Feature rows of the ``modality`` features encoded before this call (``mm_encoder_outputs``: by generate, by the
    user, or a chunk's share of them in generate's chunked prefill), one per placeholder; None if the call has none."""
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get(modality)
    if encoded is None or getattr(encoded, "pooler_output", None) is None:
        return None
    return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in encoded.pooler_output)


def check_placeholders(
    handle: Handle, input_ids: torch.Tensor | None, images: int, token_id: int, rows: int | None = None
) -> None:
    """For families with a fixed count per image: the prompt carries exactly ``num_image_tokens`` per image of the
    call's pixels, or one placeholder per row of the features encoded before the call (``rows``, `encoded_rows`: a
    chunk of a chunked prefill holds any share of an image's rows, so only the total can be checked)."""
    if images == 0 and rows is None:
        return
    if input_ids is None:
        raise ValueError("unclutter needs input_ids (not inputs_embeds) to find the image placeholders.")
    found = int((input_ids == token_id).sum().item())
    stale = handle.num_image_tokens != handle.stock_image_tokens and (
        f"the prompt carries {handle.stock_image_tokens} image placeholders per image, the stock count, but the "
        f"compressed vision tower yields {handle.num_image_tokens}. Pass processor= to unclutter.apply so it expands "
        f"'<image>' correctly, or repeat the image token handle.num_image_tokens times yourself."
    )
    if rows is not None:
        if found == rows:
            return
        if stale and found * handle.num_image_tokens == rows * handle.stock_image_tokens:
            raise ValueError(stale)
        per_image = handle.num_image_tokens
        if per_image and rows % per_image == 0:  # whole images (generate encodes them before its first forward)
            raise ValueError(
                f"the prompt has {found} image tokens for {rows // per_image} image(s); expected {per_image} per "
                "image. Expand the prompt with the processor passed to unclutter.apply."
            )
        raise ValueError(
            f"the prompt has {found} image tokens but the image features encoded before this call (by generate, or "
            f"passed as mm_encoder_outputs) hold {rows} rows: encode the images with the model unclutter was applied "
            "to, and expand the prompt with the processor passed to unclutter.apply."
        )
    want = images * handle.num_image_tokens
    if found == 0:
        raise ValueError(
            "an image was given but the prompt has no image token: put the processor's image token "
            "(e.g. '<image>') in the text where the image belongs."
        )
    if found == want:
        return
    if stale and found == images * handle.stock_image_tokens:
        raise ValueError(stale)
    raise ValueError(
        f"the prompt has {found} image tokens for {images} image(s); expected {handle.num_image_tokens} per image."
    )
