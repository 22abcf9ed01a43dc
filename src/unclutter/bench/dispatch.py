"""Operator launches and host syncs per forward call: what a method costs where the GPU waits on Python.

At batch 1 a GPU decodes faster than eager PyTorch can launch kernels (on an H200, a 7B model's decode step
takes ~25 ms for ~3 ms of weight traffic), so a method's overhead there is the number of operators it adds,
and every host-device sync (``.item()``, ``nonzero``, ``bool(tensor)``) drains the launch queue. Both counts are
the same on any device, so they are measured here, on CPU, with a dispatch mode that sees every ATen call
(views included) inside a normal ``generate()``: per method, the vision pass, the prefill call and the median
decode step. Wall-clock numbers stay in `unclutter.bench.speed`. One exception: the received-importance ranking
of towers without CLS (`vmtc._score_chunks`) sizes its score chunks by device (cache-sized on CPU, one chunk per
stage on an accelerator for the presets here), so for those towers the vision counts are CPU's, an upper bound.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import apply
from ..integrations.base import adapter_for
from ..models.presets import build_preset
from .speed import METHODS, bench_image, check_methods, make_inputs, method_configs, supported

# ATen operators that copy a device value to the host (the caller blocks until the device catches up), and the
# Tensor methods that do so on a GPU without an ATen call on CPU (counted by wrapping them while counting)
SYNC_OPS = frozenset(
    {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.nonzero_numpy", "aten.equal"}
    | {"tolist", "numpy"}
)


class _Counter(TorchDispatchMode):
    """Counts ATen calls into the currently open phase (phases are opened and closed by forward hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.phases: list[tuple[str, Counter]] = []
        self._open: list[Counter] = []

    def open(self, name: str) -> None:
        counter = Counter()
        self.phases.append((name, counter))
        self._open.append(counter)

    def close(self) -> None:
        self._open.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self._count(name)
        if not func.is_view:  # views only re-describe memory: no kernel runs for them on a GPU
            self._count(KERNEL + name)
        return func(*args, **(kwargs or {}))

    def _count(self, name: str) -> None:
        for counter in self._open:
            counter[name] += 1

    def __enter__(self):
        self._methods = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, self._wrap(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _wrap(self, name: str, method):
        def counted(tensor, *args, **kwargs):
            self._count(name)
            return method(tensor, *args, **kwargs)

        return counted


KERNEL = "kernel:"  # prefix of the second count an operator that is not a view gets


def _totals(counter: Counter) -> tuple[int, int]:
    """(operators, host syncs) of one phase."""
    ops = sum(v for k, v in counter.items() if not k.startswith(KERNEL))
    return ops, sum(v for k, v in counter.items() if k in SYNC_OPS)


def _kernels(counter: Counter) -> int:
    """Operators that are not views (on a GPU, roughly the kernels launched)."""
    return sum(v for k, v in counter.items() if k.startswith(KERNEL))


def count_method(model, processor, image, method: str, *, new_tokens: int, text_tokens: int, spd_grid: int) -> dict:
    """ATen calls and host syncs of one method: the vision pass, the prefill and the median decode step."""
    handle = apply(model, processor, **method_configs(method, spd_grid))
    counter = _Counter()
    hooks = []
    try:
        inputs = make_inputs(processor, image, 1, text_tokens, "cpu", next(model.parameters()).dtype)
        first, last = handle.adapter.vision_modules()
        in_vision = []

        def vision_start(*_):
            if not in_vision:  # a module re-entered inside its own pass (per-tile calls) stays one pass
                # some adapters encode the image before generate's first call: then the call does not hold it
                counter.open("vision-in-call" if counter._open else "vision")
            in_vision.append(1)

        def vision_end(*_):
            in_vision.pop()
            if not in_vision:
                counter.close()

        hooks = [
            model.register_forward_pre_hook(lambda *_: counter.open("call")),
            model.register_forward_hook(lambda *_: counter.close()),
            first.register_forward_pre_hook(vision_start),
            last.register_forward_hook(vision_end),
        ]
        for layer in model.get_decoder().layers:  # per decoder layer: where CMAI's cost sits
            hooks += [
                layer.register_forward_pre_hook(lambda *_: counter.open("layer")),
                layer.register_forward_hook(lambda *_: counter.close()),
            ]
        with counter, torch.inference_mode():
            model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=processor.tokenizer.pad_token_id,
            )  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    calls, layers = [], []  # each call, and the decoder layers' counts inside it
    for name, c in counter.phases:
        if name == "call":
            calls.append(c)
            layers.append([])
        elif name == "layer" and layers:
            layers[-1].append((_totals(c)[0], _kernels(c)))
    vision = [_totals(c) for name, c in counter.phases if name.startswith("vision")]
    inside = [_totals(c) for name, c in counter.phases if name == "vision-in-call"]
    vision_ops, vision_syncs = sum(v[0] for v in vision), sum(v[1] for v in vision)
    prefill_ops, prefill_syncs = _totals(calls[0])
    prefill_ops -= sum(v[0] for v in inside)
    prefill_syncs -= sum(v[1] for v in inside)
    decode = [_totals(c) for c in calls[1:]]
    return {
        "method": method,
        "vision_ops": vision_ops, "vision_syncs": vision_syncs,
        "prefill_ops": prefill_ops, "prefill_syncs": prefill_syncs,
        "decode_ops": int(statistics.median(d[0] for d in decode)),
        "decode_syncs": int(statistics.median(d[1] for d in decode)),
        # one decoder layer in the last decode step (median over layers): independent of the model's depth
        "decode_layer_ops": int(statistics.median(ops for ops, _ in layers[-1])),
        "decode_layer_kernels": int(statistics.median(k for _, k in layers[-1])),
    }  # fmt: skip


def run_dispatch(presets: list[str], *, methods: tuple[str, ...] = METHODS, new_tokens: int = 4) -> dict:
    """Counts for every preset and supported method (CPU; micro presets take seconds each)."""
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be >= 2 (a decode step is counted from the second token on), got {new_tokens}."
        )
    check_methods(methods)
    out = []
    for name in presets:
        model, processor, spec = build_preset(name)
        adapter = adapter_for(model)
        layers = model.config.get_text_config().num_hidden_layers
        rows = [
            count_method(model, processor, bench_image(spec.image), m, new_tokens=new_tokens, text_tokens=40,
                         spd_grid=spec.spd_grid)
            for m in methods
            if not supported(adapter, m)
        ]  # fmt: skip
        out.append({"preset": name, "family": adapter.family, "llm_layers": layers, "rows": rows})
        del model
    return {"meta": {"torch": torch.__version__, "new_tokens": new_tokens}, "presets": out}


def to_markdown(result: dict) -> str:
    lines = [
        "| preset | LLM layers | method | vision ops (syncs) | prefill ops (syncs) | decode ops per step (syncs) | "
        "one decoder layer in a decode step: ops / non-view ops |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["presets"]:
        stock = next((r for r in p["rows"] if r["method"] == "stock"), None)
        for r in p["rows"]:
            ratio = f" ({r['decode_layer_ops'] / stock['decode_layer_ops']:.2f}x)" if stock and r is not stock else ""
            k = r.get("decode_layer_kernels")
            kernels = (
                ""
                if k is None
                else f" / {k}" + (f" ({k / stock['decode_layer_kernels']:.2f}x)" if stock and r is not stock else "")
            )
            lines.append(
                f"| `{p['preset']}` | {p['llm_layers']} | {r['method']} | {r['vision_ops']} ({r['vision_syncs']}) | "
                f"{r['prefill_ops']} ({r['prefill_syncs']}) | {r['decode_ops']} ({r['decode_syncs']}) | {r['decode_layer_ops']}{ratio}{kernels} |"
            )
    return "\n".join(lines) + "\n"


def write_dispatch(result: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(to_markdown(result))
    return out, md
