"""Speed and memory of every method against stock transformers, on random-init real-shape models of any family.

One image (the preset's size) + ``text_tokens`` words per prompt, built by the family's own processor (with the
method applied, so it expands the image to the method's token count), then ``new_tokens`` greedy tokens with the
length forced. Methods are interleaved over repetitions (one warm-up round first) and reported as medians, with
ratios to stock taken in the same run; methods the family does not support are skipped and listed. Phases are
timed with forward hooks inside a normal ``generate()``: the vision phase runs between the adapter's
`Adapter.vision_modules`; time to first token runs from the start of the first vision pass (or of the first
forward call) to the end of the first forward call; every later forward call is one decode step.

``compile_vision``: the vision tower's forward is compiled with ``torch.compile(mode=...)`` for every method alike
(stock included), after the method is applied; VMTC adds no graph break there (`unclutter.kmeans`), so with
"reduce-overhead" on a GPU the tower of LLaVA, Gemma 3 or InternVL replays as CUDA graphs. A method's handle then
stays applied through its warm-up (which compiles) and its repetitions, methods one after the other: re-applying
would recompile.

``cache="static"``: ``generate`` decodes into a static cache (``cache_implementation="static"``) and compiles the
decode step, as it does by itself on a GPU (inductor, mode "reduce-overhead": CUDA graphs; on a CPU, where
transformers would not compile, mode "default"). With CMAI each decode step is then one graph (its per-call
bookkeeping runs before it, `unclutter.integrations.cmai_attention`); the first run of each method compiles, so
methods run one after the other, as with ``compile_vision``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import apply
from ..compat import output_cache
from ..config import SPDConfig
from ..evaluation.runner import append_rows, read_appended
from ..integrations.base import adapter_for
from ..methods import resolve
from ..models.presets import build_preset
from ..models.tiny import WORDS
from ..runlock import RunLock

METHODS = ("stock", "spd", "vmtc", "cmai", "vmtc+cmai")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CACHES = ("dynamic", "static")
FIELDS = (
    "method", "batch", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms",
    "peak_mem_bytes", "kv_cache_bytes", "extra_state_bytes", "llm_image_tokens",
)  # fmt: skip


@dataclass
class Row:
    method: str
    batch: int
    vision_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    e2e_ms: float
    peak_mem_bytes: int
    kv_cache_bytes: int
    extra_state_bytes: int
    llm_image_tokens: int


class _Clock:
    """Wall-clock marks from forward hooks; synchronises CUDA so marks are real."""

    def __init__(self, model: torch.nn.Module, vision: tuple[torch.nn.Module, torch.nn.Module], device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.calls: list[tuple[float, float]] = []
        self.vision: list[tuple[float, float]] = []
        first, last = vision
        self._handles = [
            model.register_forward_pre_hook(lambda *a: self._mark("call_start")),
            model.register_forward_hook(lambda *a: self._mark("call_end")),
            first.register_forward_pre_hook(lambda *a: self._mark("vision_start")),
            last.register_forward_hook(lambda *a: self._mark("vision_end")),
        ]
        self._open: dict[str, float] = {}

    @torch.compiler.disable  # a compiled decode step (a static cache) runs the marks eagerly, around its graph
    def _mark(self, what: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        kind, edge = what.split("_")
        if edge == "start":
            self._open.setdefault(kind, now)  # a module re-entered inside its own pass (per-tile calls) stays one pass
        elif kind == "call":
            self.calls.append((self._open.pop("call"), now))
        elif "vision" in self._open:
            self.vision.append((self._open.pop("vision"), now))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _PeakRSS:
    """Peak resident set size while a block runs, sampled every millisecond from /proc."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # give freed heap pages back so each method's peak RSS is its own
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def bench_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A deterministic noise image of (height, width)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_inputs(processor, image: Image.Image, batch: int, text_tokens: int, device: str, dtype: torch.dtype):
    """The processor's batch for ``batch`` copies of one prompt: the image placeholder, then ``text_tokens`` words."""
    words = " ".join(WORDS[i % len(WORDS)] for i in range(text_tokens))
    prompt = f"{processor.image_token} {words}"
    inputs = processor(images=[[image]] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)
    inputs = inputs.to(device)
    for key, value in inputs.items():
        if key.startswith("pixel_values") and value.is_floating_point():
            inputs[key] = value.to(dtype)
    return inputs


def method_configs(method: str, spd_grid: int) -> dict:
    """``apply``'s keyword arguments for ``method``, SPD pooled to the preset's grid."""
    configs = {k: v for k, v in resolve(method).items() if v is not None}
    if "spd" in configs:
        configs["spd"] = SPDConfig(grid=spd_grid)
    return configs


def run_once(
    model, processor, image, method: str, *, batch: int, text_tokens: int, new_tokens: int, device: str, spd_grid: int,
    applied=None, cache: str = "dynamic",
) -> Row:  # fmt: skip
    """One timed ``generate``. ``applied``: the method's handle, already applied and kept afterwards (compiled
    towers, a static cache's compiled decoding); else the method is applied for this call and removed after it.
    ``cache``: "static" decodes into a static cache with the decode step compiled (`_static_decoding`)."""
    handle = applied if applied is not None else apply(model, processor, **method_configs(method, spd_grid))
    dtype = next(model.parameters()).dtype
    _release_memory(device)
    clock = None
    try:
        inputs = make_inputs(processor, image, batch, text_tokens, device, dtype)
        media = torch.tensor(handle.adapter.media_token_ids(), device=inputs["input_ids"].device)
        tokens = int(torch.isin(inputs["input_ids"][0], media).sum())
        clock = _Clock(model, handle.adapter.vision_modules(), device)
        with _PeakRSS() as rss, torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                return_dict_in_generate=True, eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id,
                **(_static_decoding(device) if cache == "static" else {}),
            )  # fmt: skip
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            e2e = time.perf_counter() - start
        kv = cache_bytes(output_cache(out))
        extra = handle.cmai_state.allocated_bytes if handle.cmai_state is not None else 0
    finally:
        if clock is not None:
            clock.remove()
        if applied is None:
            handle.remove()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss.peak
    (c0, c1), decode = clock.calls[0], clock.calls[1:]
    passes = [(a, b) for a, b in clock.vision if b <= c1]  # generate() may encode the image before the first call
    if not passes:
        raise RuntimeError(
            f"no vision pass was timed: {type(handle.adapter).__name__}.vision_modules() names modules that did not "
            f"run for method {method!r}; the adapter must name the first and last module of every vision pass."
        )
    ttft = c1 - min(passes[0][0], c0)
    vision = sum(b - a for a, b in passes)
    step = statistics.median(b - a for a, b in decode) if decode else 0.0
    return Row(method, batch, 1e3 * vision, 1e3 * (ttft - vision), 1e3 * ttft, 1e3 * step, 1e3 * e2e, int(peak), kv,
               extra, tokens)  # fmt: skip


def supported(adapter, method: str) -> str | None:
    """Why ``method`` cannot run on this family (None: it can)."""
    configs = resolve(method)
    for name, flag in (("vmtc", adapter.vmtc), ("spd", adapter.spd)):
        if configs.get(name) is not None and not flag:
            return f"{name.upper()} is not available for {adapter.family}"
    return None


def run_speed(
    preset: str = "cpu",
    *,
    methods: tuple[str, ...] = METHODS,
    batch: int = 1,
    reps: int = 2,
    warmup: int = 1,
    text_tokens: int = 40,
    new_tokens: int | None = None,
    device: str = "cpu",
    cpu_layers: int | None = None,
    compile_vision: str | None = None,
    cache: str = "dynamic",
    progress=None,
    record: str | Path | None = None,
    finish=None,
):
    """Run the benchmark; returns {"meta", "rows", "ratios"} (rows are per-method medians), or, with ``finish``,
    (that, ``finish(it)``): ``finish`` runs while the record is still locked (writing the results, clearing the record).

    record: a folder where every measured repetition is appended (fsynced) as it finishes, under a one-writer lock:
    a killed run, rerun with the same settings, measures only what is missing (after its own warm-up round).
    compile_vision: a ``torch.compile`` mode (`COMPILE_MODES`) for the vision tower of every method (see the module
    docstring); None: eager.
    cache: "dynamic" (generate's default) or "static" (see the module docstring)."""
    check_arguments(
        methods, batch=batch, reps=reps, warmup=warmup, new_tokens=new_tokens, cpu_layers=cpu_layers,
        text_tokens=text_tokens, compile_vision=compile_vision, cache=cache,
    )  # fmt: skip
    with RunLock(record, what="unclutter bench speed") if record is not None else contextlib.nullcontext():
        result = _run_speed(
            preset, methods=methods, batch=batch, reps=reps, warmup=warmup, text_tokens=text_tokens,
            new_tokens=new_tokens, device=device, cpu_layers=cpu_layers, compile_vision=compile_vision, cache=cache,
            progress=progress, record=Path(record) if record is not None else None,
        )  # fmt: skip
        return result if finish is None else (result, finish(result))


def check_arguments(
    methods, *, batch: int, reps: int, warmup: int, new_tokens: int | None, cpu_layers: int | None, text_tokens: int = 0,
    compile_vision: str | None = None, cache: str = "dynamic",
):  # fmt: skip
    """Clear errors before anything is built (each run takes minutes)."""
    check_methods(methods)
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}.")
    if cache == "static" and warmup < 1:
        raise ValueError("a static cache needs warmup >= 1: the first run of each method compiles its decoding.")
    if compile_vision is not None:
        if compile_vision not in COMPILE_MODES:
            raise ValueError(f"compile_vision must be one of {', '.join(COMPILE_MODES)}, got {compile_vision!r}.")
        if warmup < 1:
            raise ValueError("compile_vision needs warmup >= 1: the first run of each method compiles its tower.")
    for name, value, least in (
        ("batch", batch, 1),
        ("reps", reps, 1),
        ("warmup", warmup, 0),
        ("text_tokens", text_tokens, 0),
    ):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}.")
    if new_tokens is not None and new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decoding is timed from the second token on), got {new_tokens}.")
    if cpu_layers is not None and cpu_layers < 1:
        raise ValueError(f"cpu_layers must be >= 1, got {cpu_layers}.")


def check_methods(methods) -> None:
    """The benchmarks time model patches; "describe-then-answer" (two generations) and "checkpoint" are not."""
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct and at least one, got {list(methods)}.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"the benchmarks time {', '.join(METHODS)}; got {', '.join(unknown)}.")


def compiled_tower(adapter) -> torch.nn.Module:
    """The module whose forward `compile_vision` compiles: the vision tower, where the timed vision pass starts."""
    first, _ = adapter.vision_modules()
    base = adapter.base
    if not any(getattr(base, name, None) is first for name in ("vision_tower", "vision_model", "visual")):
        raise ValueError(
            f"compile_vision compiles the vision tower, but {adapter.family}'s timed vision pass starts inside it "
            f"({type(first).__name__}); run this family eagerly (its stock tower reads its layout on the host anyway)."
        )
    return first


def _static_decoding(device: str) -> dict:
    """``generate`` arguments for a static cache whose decode step is compiled on any device (see the module
    docstring): transformers' own choice on a GPU, and its switch for compiling elsewhere."""
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if device.startswith("cuda") else "default")
    config._compile_all_devices = True  # (transformers compiles on a GPU by itself; its tests use this elsewhere)
    return {"cache_implementation": "static", "compile_config": config}


@contextlib.contextmanager
def _applied_and_compiled(model, processor, method: str, spd_grid: int, mode: str | None):
    """The method applied, then (``mode``) its vision tower's forward compiled (an instance attribute: the timing
    hooks, which run around ``forward``, stay outside the graph); both undone on exit, with whatever ``generate``
    compiled for a static cache's decoding (``model._compiled_call``): a method's graphs are its own."""
    handle = apply(model, processor, **method_configs(method, spd_grid))
    tower, own = None, None
    try:  # from here on: a refusal or an error in torch.compile must not leave the method applied
        torch._dynamo.reset()
        vars(model).pop("_compiled_call", None)
        if mode is not None:
            tower = compiled_tower(handle.adapter)
            own = vars(tower).get("forward")  # the method's own patched forward, if it patches the tower's
            tower.forward = torch.compile(tower.forward, mode=mode, dynamic=False)
        yield handle
    finally:
        if own is not None:
            tower.forward = own
        elif tower is not None and "forward" in vars(tower):
            del tower.forward
        handle.remove()
        vars(model).pop("_compiled_call", None)
        torch._dynamo.reset()


def _run_speed(
    preset, *, methods, batch, reps, warmup, text_tokens, new_tokens, device, cpu_layers, compile_vision, cache,
    progress, record,
) -> dict:  # fmt: skip
    model, processor, spec = build_preset(preset, device=device, cpu_layers=cpu_layers)
    new_tokens = new_tokens if new_tokens is not None else spec.new_tokens
    image = bench_image(spec.image)
    adapter = adapter_for(model)
    skipped = {m: why for m in methods if (why := supported(adapter, m))}
    methods = tuple(m for m in methods if m not in skipped)
    if not methods:
        raise ValueError(f"no method runs on {adapter.family}: {skipped}")
    if compile_vision is not None:
        compiled_tower(adapter(model))  # refuse before anything runs
    settings = {
        "preset": preset, "methods": list(methods), "batch": batch, "reps": reps, "text_tokens": text_tokens,
        "new_tokens": new_tokens, "device": device, "cpu_layers": cpu_layers,
    }  # fmt: skip
    if compile_vision is not None:  # (only then: an eager run resumes a record written before this setting existed)
        settings["compile_vision"] = compile_vision
    if cache != "dynamic":  # (likewise)
        settings["cache"] = cache
    samples = _recorded_samples(record, settings, methods, reps)
    missing = [(rep, m) for rep in range(reps) for m in methods if rep >= len(samples[m])]

    def measure(rep: int, m: str, applied=None) -> None:
        measured = rep >= warmup
        if measured and (rep - warmup, m) not in missing:
            return  # recorded by an earlier, interrupted run
        row = run_once(
            model, processor, image, m, batch=batch, text_tokens=text_tokens, new_tokens=new_tokens, device=device,
            spd_grid=spec.spd_grid, applied=applied, cache=cache,
        )  # fmt: skip
        if measured:
            samples[m].append(row)
            if record is not None:
                append_rows(record / "samples.jsonl", [asdict(row)])
        if progress:
            progress(rep, m, row)

    if compile_vision is None and cache == "dynamic":
        for rep in range(warmup + reps):
            for m in methods:  # interleaved: drift hits every method alike
                measure(rep, m)
    else:
        for m in methods:  # one method at a time: applying it again would recompile its tower
            if not any((rep, m) in missing for rep in range(reps)):
                continue
            with _applied_and_compiled(model, processor, m, spec.spd_grid, compile_vision) as handle:
                for rep in range(warmup + reps):  # the warm-up compiles (the tower, a static cache's decoding)
                    measure(rep, m, handle)
    rows = [_median(samples[m]) for m in methods]
    stock = next((r for r in rows if r.method == "stock"), None)
    ratios = {}
    if stock:
        for r in rows:
            ratios[r.method] = {
                k: (getattr(r, k) / getattr(stock, k) if getattr(stock, k) else None)
                for k in FIELDS[2:]
                if k != "extra_state_bytes"
            }
            ratios[r.method]["extra_state_over_kv"] = (
                r.extra_state_bytes / r.kv_cache_bytes if r.kv_cache_bytes else None
            )
    meta = {
        "preset": preset, "about": spec.about, "family": adapter.family, "image": list(spec.image),
        "spd_grid": spec.spd_grid if "spd" in methods else None,
        "device": device, "batch": batch, "reps": reps, "warmup": warmup, "text_tokens": text_tokens,
        "new_tokens": new_tokens, "llm_layers": model.config.get_text_config().num_hidden_layers,
        "compile_vision": compile_vision, "cache": cache,
        "dtype": str(next(model.parameters()).dtype), "skipped": skipped, "load": _load_average(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": _machine(device),
    }  # fmt: skip
    # every measured repetition too: on a loaded machine (or a GPU host whose CPU is shared) the medians hide how far
    # single repetitions swing, which decides how far a ratio can be read
    samples_out = {m: [asdict(r) for r in samples[m]] for m in methods}
    return {"meta": meta, "rows": [asdict(r) for r in rows], "ratios": ratios, "samples": samples_out}


def _recorded_samples(record: Path | None, settings: dict, methods, reps: int) -> dict[str, list[Row]]:
    """The repetitions an earlier run with the same settings recorded in ``record`` (none without a record)."""
    samples: dict[str, list[Row]] = {m: [] for m in methods}
    if record is None:
        return samples
    config = record / "settings.json"
    if config.is_file() and json.loads(config.read_text()) != settings:
        raise ValueError(
            f"{record} holds samples of a run with other settings ({config}); delete it, or rerun with those settings."
        )
    config.write_text(json.dumps(settings, indent=1) + "\n")
    for row in (Row(**fields) for fields in read_appended(record / "samples.jsonl")):
        if len(samples[row.method]) < reps:
            samples[row.method].append(row)
    return samples


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages when the run ended (a shared machine slows every method)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _median(rows: list[Row]) -> Row:
    values = {}
    for f in FIELDS:
        xs = [getattr(r, f) for r in rows]
        values[f] = xs[0] if isinstance(xs[0], str) else type(xs[0])(statistics.median(xs))
    return Row(**values)


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


TARGETS = [  # (label, method, ratio key, bound) for preset cpu, batch 1
    ("VMTC vision tower (K-means included)", "vmtc", "vision_ms", 1.0),
    ("VMTC+CMAI time to first token", "vmtc+cmai", "ttft_ms", 0.65),
    ("VMTC+CMAI decode ms per token", "vmtc+cmai", "decode_ms_per_token", 1.05),
    ("CMAI prefill", "cmai", "prefill_ms", 1.25),
    ("CMAI decode ms per token", "cmai", "decode_ms_per_token", 1.10),
    ("VMTC KV cache", "vmtc", "kv_cache_bytes", 0.60),
    ("CMAI extra state / KV cache", "cmai", "extra_state_over_kv", 0.05),
]


def to_markdown(result: dict) -> str:
    m = result["meta"]
    load = f", load average {' / '.join(map(str, m['load']))} (1/5/15 min) at the end" if m.get("load") else ""
    about = f" ({m['about']})" if m.get("about") else ""
    compiled = m.get("compile_vision")
    why = [f"vision tower compiled, mode {compiled!r}"] if compiled else []
    why += ["static cache"] if m.get("cache", "dynamic") == "static" else []
    order = f"consecutive ({', '.join(why)})" if why else "interleaved"
    head = (
        f"preset `{m['preset']}`{about}: {m['llm_layers']} LLM layers, {m['dtype']}, on {m['machine']}{load}; batch "
        f"{m['batch']}, {m['text_tokens']} text words, {m['new_tokens']} new tokens, median of {m['reps']} "
        f"{order} reps after {m['warmup']} warm-up, torch {m['torch']}.\n\n"
    )
    for method, why in (m.get("skipped") or {}).items():
        head += f"Skipped `{method}`: {why}.\n\n"
    lines = [
        "| method | image tokens | vision ms | prefill ms | TTFT ms | decode ms/token | e2e ms | peak mem MiB | KV cache MiB | CMAI state KiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = result["ratios"]
    for r in result["rows"]:
        q = ratios.get(r["method"], {})

        def cell(key, value, fmt="{:.0f}", q=q, stock=r["method"] == "stock"):
            ratio = q.get(key)
            return fmt.format(value) + (f" ({ratio:.2f}x)" if ratio is not None and not stock else "")

        lines.append(
            f"| {r['method']} | {cell('llm_image_tokens', r['llm_image_tokens'])} | {cell('vision_ms', r['vision_ms'])} | "
            f"{cell('prefill_ms', r['prefill_ms'])} | {cell('ttft_ms', r['ttft_ms'])} | "
            f"{cell('decode_ms_per_token', r['decode_ms_per_token'], '{:.1f}')} | {cell('e2e_ms', r['e2e_ms'])} | "
            f"{cell('peak_mem_bytes', r['peak_mem_bytes'] / 2**20)} | {cell('kv_cache_bytes', r['kv_cache_bytes'] / 2**20, '{:.1f}')} | "
            f"{r['extra_state_bytes'] / 1024:.0f} |"
        )
    out = head + "\n".join(lines) + "\n"
    samples = result.get("samples") or {}
    if any(len(rows) > 1 for rows in samples.values()):
        spread = "; ".join(
            f"{method} {_span(rows, 'ttft_ms', '{:.0f}')} / {_span(rows, 'decode_ms_per_token', '{:.1f}')}"
            for method, rows in samples.items()
        )
        out += f"\nRange over the measured repetitions, TTFT ms / decode ms per token: {spread}.\n"
    if m["batch"] == 1 and ratios:
        out += "\n| target | measured | bound | holds |\n|---|---|---|---|\n"
        for label, method, key, bound in TARGETS:
            value = ratios.get(method, {}).get(key)
            if value is not None:
                out += f"| {label} | {value:.3f}{'x' if 'over' not in key else ''} | <= {bound} | {'yes' if value <= bound else 'NO'} |\n"
    return out


def _span(rows: list[dict], key: str, fmt: str) -> str:
    values = [row[key] for row in rows]
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def chart(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("vision_ms", "vision"),
        ("prefill_ms", "prefill"),
        ("decode_ms_per_token", "decode/token"),
        ("kv_cache_bytes", "KV cache"),
    ]
    methods = [r["method"] for r in result["rows"] if r["method"] in result["ratios"]]  # ratios need stock
    if not methods:
        return  # nothing to draw against stock
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar(
            [j + i * width for j in range(len(keys))], [result["ratios"][m][k] or 0 for k, _ in keys], width, label=m
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(keys))], [lbl for _, lbl in keys])
    ax.set_ylabel("ratio to stock (lower is better)")
    ax.legend(fontsize=8)
    ax.set_title(f"unclutter speed, preset {result['meta']['preset']}, batch {result['meta']['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out: str | Path) -> tuple[Path, ...]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    md.write_text(to_markdown(result))
    chart(result, png)
    return tuple(p for p in (out, md, png) if p.is_file())
