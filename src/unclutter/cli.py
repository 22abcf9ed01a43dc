"""The `unclutter` command line. Each verb is a thin wrapper over a Python function."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="unclutter: VMTC + CMAI for vision-language models.", no_args_is_help=True)
ifeval_app = typer.Typer(help="IFEval-exact instruction checking and the 16-task image suite.", no_args_is_help=True)
app.add_typer(ifeval_app, name="ifeval")
bench_app = typer.Typer(help="Speed and memory benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(help="Benchmark data: converters and generated worlds.", no_args_is_help=True)
app.add_typer(data_app, name="data")
model_app = typer.Typer(help="The shipped mini-LLaVA.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def check_out_dir(out: Path) -> None:
    """An output folder must be a folder or not exist yet (checked before anything loads)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder: give a folder (it is created if missing).")


@app.callback()
def main() -> None:
    """unclutter: VMTC + CMAI for vision-language models."""


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    typer.echo(__version__)


@ifeval_app.command("score")
def ifeval_score(
    input: Annotated[
        Path, typer.Option("--input", help="IFEval input JSONL {key, prompt, instruction_id_list, kwargs}")
    ],
    responses: Annotated[Path, typer.Option(help="response JSONL {prompt|key, response}")],
    out: Annotated[Path, typer.Option(help="output directory")],
) -> None:
    """Score responses: eval_results_{strict,loose}.jsonl and summary.json in OUT."""
    from .ifeval.scoring import DataError, score_files

    check_out_dir(out)
    try:
        summary = score_files(input, responses, out)
    except DataError as exc:
        fail(str(exc))
    t = Table(title=f"IFEval ({summary['num_prompts']} prompts, {summary['num_instructions']} instructions)")
    for col in ("", "strict", "loose"):
        t.add_column(col, justify="right" if col else "left")
    for level in ("prompt_level", "instruction_level"):
        t.add_row(
            level,
            *(f"{100 * summary[f'{level}_{m}']:.2f} ({summary[f'{level}_{m}_count']})" for m in ("strict", "loose")),
        )
    for task, e in summary.get("per_task", {}).items():
        t.add_row(task, f"{100 * e['strict_rate']:.1f}", f"{100 * e['loose_rate']:.1f}")
    console.print(t)
    console.print(f"wrote {out}/summary.json")


@ifeval_app.command("build")
def ifeval_build(
    source: Annotated[str, typer.Option(help="LLaVA question JSONL, or a Hugging Face dataset id / saved dir")],
    out: Annotated[Path, typer.Option(help="suite JSONL to write")],
    images: Annotated[Path | None, typer.Option(help="image folder (checks that every image exists)")] = None,
    per_task: Annotated[int, typer.Option(help="records per task")] = 218,
    seed: Annotated[int, typer.Option()] = 0,
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. T1,T5,T9")] = None,
) -> None:
    """Build the paper's 16-task instruction-following suite over an image-question set."""
    from .ifeval.scoring import DataError
    from .ifeval.suite import build_suite_file

    if out.is_dir():
        fail(f"--out {out} is a folder: give the suite JSONL file to write.")
    try:
        records = build_suite_file(
            source, out, images=images, per_task=per_task, seed=seed, tasks=tasks.split(",") if tasks else None
        )
    except (DataError, ValueError) as exc:
        fail(str(exc))
    console.print(f"wrote {len(records)} records to {out}")


@ifeval_app.command("report")
def ifeval_report(
    runs: Annotated[list[Path], typer.Argument(help="run directories (or summary.json files)")],
    out: Annotated[Path, typer.Option(help="where to write if_table.{md,json,png}")] = Path("if-report"),
    mode: Annotated[str, typer.Option(help="strict or loose")] = "strict",
) -> None:
    """Table 1 layout (T1..T16, AVG; one row per run) as markdown, JSON and a bar chart."""
    from .ifeval.report import to_markdown, write_report

    check_out_dir(out)
    try:
        tab = write_report(runs, out, mode)
    except (ValueError, OSError) as exc:  # OSError: an --out that cannot be created or written
        fail(str(exc))
    console.print(to_markdown(tab))
    console.print(f"wrote {out}/if_table.md, if_table.json, if_table.png")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="hub id or local dir (safetensors weights)")],
    method: Annotated[str, typer.Option(help="stock, spd, vmtc, cmai, vmtc+cmai, describe-then-answer, checkpoint")],
    bench: Annotated[str, typer.Option(help="vqav2, textvqa, gqa, mme, mmbench, if16")],
    data: Annotated[Path, typer.Option(help="benchmark JSONL in unclutter's format")],
    images: Annotated[Path, typer.Option(help="image folder")],
    out: Annotated[Path, typer.Option(help="run directory (rerun the same command to resume)")],
    batch_size: Annotated[int, typer.Option()] = 8,
    limit: Annotated[int | None, typer.Option(help="first N records only")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. vmtc.num_tokens=64")] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, auto")] = "auto",
) -> None:
    """Evaluate a method on a benchmark; predictions are saved as they come and a rerun resumes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .evaluation.runner import metrics_markdown, run_eval
    from .ifeval.scoring import DataError

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task(f"{method} on {bench}", total=None, rate="")
        start = {}

        def progress(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            first = start.setdefault("t", (now, done))
            rate = (done - first[1]) / (now - first[0]) if now > first[0] else 0.0
            bar.update(task, completed=done, total=total, rate=f"{rate:.2f} samples/s")

        try:
            metrics = run_eval(
                model_name=model, method=method, bench=bench, data=data, images=images, out=out,
                batch_size=batch_size, limit=limit, overrides=set_ or [], max_new_tokens=max_new_tokens,
                dtype=dtype, device=device, progress=progress,
            )  # fmt: skip
        except (DataError, ValueError, NotImplementedError, TypeError, OSError) as exc:  # a method the family lacks,
            fail(str(exc))  # a bad class, a model folder or hub id that cannot be read
    console.print(metrics_markdown(out.name, metrics))


@app.command("train")
def train_cmd(
    stage: Annotated[
        str | None, typer.Option(help="pretrain (projector, captions) or finetune (projector + LLM)")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="LLaVA JSON / JSONL")] = None,
    images: Annotated[Path | None, typer.Option(help="image folder")] = None,
    output: Annotated[Path | None, typer.Option(help="checkpoint directory (a rerun resumes)")] = None,
    model: Annotated[str | None, typer.Option(help="existing LLaVA checkpoint (hub id or dir)")] = None,
    vision: Annotated[str | None, typer.Option(help="CLIP vision tower to assemble from")] = None,
    llm: Annotated[str | None, typer.Option(help="causal LM to assemble from")] = None,
    method: Annotated[str | None, typer.Option(help="method active in training (default vmtc+cmai)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. vmtc.ratio=0.5")] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(help="global batch (default 256 / 128)")] = None,
    per_device_batch_size: Annotated[int | None, typer.Option()] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_length: Annotated[
        int | None, typer.Option(help="tokens per sample, image tokens included (default 2048)")
    ] = None,
    tune: Annotated[
        str | None, typer.Option(help="modules to train, comma-separated from vision,projector,llm")
    ] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--no-lora")] = None,
    deepspeed: Annotated[str | None, typer.Option(help="DeepSpeed config JSON (configs/deepspeed/zero2.json)")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with the same fields")] = None,
) -> None:
    """Train a stage of the LLaVA-1.5 recipe with the method active; writes a HF checkpoint."""
    from .ifeval.scoring import DataError
    from .training.trainer import TrainConfig, train

    given = {
        "stage": stage, "data": str(data) if data else None, "images": str(images) if images else None,
        "output": str(output) if output else None, "model": model, "vision": vision, "llm": llm, "method": method,
        "overrides": set_ or None, "max_steps": max_steps, "learning_rate": learning_rate, "batch_size": batch_size,
        "per_device_batch_size": per_device_batch_size, "epochs": epochs, "max_length": max_length,
        "tune": [t.strip() for t in tune.split(",")] if tune else None, "lora": lora, "deepspeed": deepspeed, "bf16": bf16,
        "gradient_checkpointing": gradient_checkpointing,
    }  # fmt: skip
    try:
        cfg = (
            TrainConfig.from_yaml(config, **given)
            if config
            else TrainConfig(**{k: v for k, v in given.items() if v is not None})
        )
        out = train(cfg)
    except (DataError, ValueError, TypeError, NotImplementedError, OSError) as exc:  # NotImplementedError: a family
        fail(str(exc))  # not yet supported; OSError: a checkpoint or hub id that cannot be read
    console.print(f"wrote checkpoint {out}")


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run directories of `unclutter eval`")],
    out: Annotated[Path, typer.Option(help="where to write comparison.{md,json,png}")] = Path("report"),
) -> None:
    """Compare runs side by side (Table 1 / Table 2 style): markdown, JSON and charts."""
    from .evaluation.report import compare_markdown, write_comparison

    check_out_dir(out)
    try:
        tab = write_comparison(runs, out)
    except (ValueError, OSError) as exc:  # OSError: an --out that cannot be created or written
        fail(str(exc))
    console.print(compare_markdown(tab))
    console.print(f"wrote {out}/comparison.md")


@data_app.command("convert")
def data_convert(
    bench: Annotated[str, typer.Option(help="vqav2, textvqa, gqa, mme, mmbench")],
    out: Annotated[Path, typer.Option(help="JSONL to write")],
    llava_questions: Annotated[
        Path | None, typer.Option(help="LLaVA eval question JSONL (vqav2, textvqa, gqa)")
    ] = None,
    annotations: Annotated[Path | None, typer.Option(help="official answers file for --llava-questions")] = None,
    mme_root: Annotated[Path | None, typer.Option(help="MME release folder")] = None,
    mmbench_tsv: Annotated[Path | None, typer.Option(help="MMBench TSV with base64 images")] = None,
    hf: Annotated[str | None, typer.Option(help="lmms-lab dataset id or save_to_disk dir")] = None,
    split: Annotated[str | None, typer.Option()] = None,
    hf_images: Annotated[
        str | None, typer.Option(help="GQA: the dataset/config holding the images (id, image)")
    ] = None,
    images_out: Annotated[Path | None, typer.Option(help="where decoded images go (TSV / HF)")] = None,
) -> None:
    """Convert LLaVA eval files, MME/MMBench releases or lmms-lab datasets to unclutter's format."""
    from .evaluation import data as D
    from .ifeval.scoring import DataError

    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
        fail(f"--out {out} must name a JSONL file in a folder (the folder is created if missing).")
    try:
        if llava_questions and annotations:
            n = D.convert_llava(bench, llava_questions, annotations, out)
        elif mme_root:
            n = D.convert_mme(mme_root, out)
        elif mmbench_tsv:
            n = D.convert_mmbench_tsv(mmbench_tsv, out, images_out or out.parent / "images")
        elif hf:
            n = D.convert_hf(bench, hf, out, images_out or out.parent / "images", split=split, image_dataset=hf_images)
        else:
            fail("give --llava-questions with --annotations, --mme-root, --mmbench-tsv or --hf.")
    except (DataError, ValueError, KeyError) as exc:
        fail(str(exc))
    console.print(f"wrote {n} records to {out}")


@app.command("demo")
def demo_cmd(
    model: Annotated[str | None, typer.Option(help="hub id or LLaVA dir (default: the shipped mini-LLaVA)")] = None,
    image: Annotated[
        list[Path] | None, typer.Option(help="your own image(s); default: generated shapes images")
    ] = None,
    out: Annotated[Path, typer.Option(help="where pictures and demo.json go")] = Path("demo-output"),
    bench_size: Annotated[int, typer.Option(help="VQA and IF prompts each in the chart's benchmark")] = 16,
    max_new_tokens: Annotated[int, typer.Option()] = 48,
) -> None:
    """Stock-trained vs SPD vs trained with VMTC+CMAI (the shipped mini-LLaVA; with --model: stock / SPD /
    VMTC+CMAI plug-ins) side by side, a small benchmark chart, and VMTC / CMAI pictures."""
    from .demo import run_demo

    for path in image or []:
        if not path.is_file():
            fail(f"--image {path}: no such file.")
    check_out_dir(out)
    try:
        run_demo(model, image, out, bench_size=bench_size, max_new_tokens=max_new_tokens, console=console)
    except (ValueError, TypeError, OSError) as exc:  # OSError: a model folder or hub id that cannot be read
        fail(str(exc))


@app.command("visualize")
def visualize_cmd(
    image: Annotated[Path, typer.Option(help="image file")],
    prompt: Annotated[str, typer.Option(help="question (with an instruction, if you like)")],
    model: Annotated[
        str | None, typer.Option(help="hub id or dir of any supported family (default: the shipped shapes model)")
    ] = None,
    out: Annotated[Path, typer.Option()] = Path("demo-output"),
    token_index: Annotated[int, typer.Option(help="which generated token's CMAI map to draw (0 = first)")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. vmtc.ratio=0.25")] = None,
) -> None:
    """Draw VMTC's kept / merged patches per stage and CMAI's inhibited patches per layer for one prompt (one row
    per tile for tiled families)."""
    from .demo import load
    from .evaluation.images import open_image
    from .methods import resolve
    from .viz import visualize

    if token_index < 0:
        fail(f"--token-index counts generated tokens from 0, got {token_index}.")
    check_out_dir(out)
    try:
        configs = resolve("vmtc+cmai", set_ or [])
        if configs.get("spd") is not None:
            fail("visualize draws VMTC's and CMAI's pictures; SPD has none: drop the spd.* overrides.")
        llava, processor = load(model)
        result = visualize(
            llava, processor, open_image(image), prompt, out, vmtc=configs.get("vmtc"), cmai=configs.get("cmai"),
            token_index=token_index,
        )  # fmt: skip
    except (ValueError, NotImplementedError, TypeError, OSError) as exc:  # a family without pictures or a reduction
        fail(str(exc))
    console.print(f"answer: {result['answer']}")
    for name, path in result["paths"].items():
        console.print(f"{name}: {path}")


@data_app.command("shapes")
def data_shapes(
    out: Annotated[
        Path,
        typer.Option(
            help="folder for images/, pretrain.json, finetune.json, scenes.jsonl, vqa.jsonl, if16.jsonl, questions.jsonl"
        ),
    ],
    num: Annotated[int, typer.Option(help="number of images")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    if_per_task: Annotated[int | None, typer.Option(help="if16 records per task (default max(1, num // 16))")] = None,
    if_rate: Annotated[
        float, typer.Option(help="share of stage-2 turns that are instruction-following turns (LLaVA's mix: 0)")
    ] = 0.0,
) -> None:
    """Generate the shapes world: training data (LLaVA JSON) and benchmarks (vqa as gqa, if16)."""
    from .shapes.dataset import build_shapes

    check_out_dir(out)
    try:
        counts = build_shapes(out, num, seed, if_per_task=if_per_task, if_rate=if_rate)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    console.print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@model_app.command("export")
def model_export(
    out: Annotated[Path, typer.Option(help="folder for the Hugging Face checkpoint")],
    which: Annotated[str, typer.Option(help="stock (trained stock) or method (trained with VMTC + CMAI)")] = "stock",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Write the shipped mini-LLaVA as a plain checkpoint (config, safetensors, processor) that stock
    `LlavaForConditionalGeneration` / `AutoProcessor.from_pretrained` load; `--method checkpoint` re-applies its
    training-time configs."""
    import torch

    from .mini.ship import export

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        fail(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}.")
    check_out_dir(out)
    try:
        path = export(out, which, dtypes[dtype])
    except (ValueError, OSError) as exc:
        fail(str(exc))
    console.print(f"wrote {which}-trained mini-LLaVA to {path}")


@bench_app.command("speed")
def bench_speed(
    out: Annotated[Path, typer.Option(help="results JSON (a .md table and a .png chart are written beside it)")],
    preset: Annotated[
        str,
        typer.Option(
            help="llava-1.5-7b, llava-next-7b, qwen2.5-vl-7b, gemma-3-4b, each also as NAME-cpu (sized for 2 CPU "
            "cores; cpu = llava-1.5-7b-cpu), or micro-FAMILY (a tiny test model)"
        ),
    ] = "cpu",
    batch: Annotated[int, typer.Option()] = 1,
    reps: Annotated[int, typer.Option(help="measured repetitions (after one warm-up round)")] = 2,
    warmup: Annotated[int, typer.Option()] = 1,
    new_tokens: Annotated[int | None, typer.Option(help="generated tokens (default: the preset's)")] = None,
    text_tokens: Annotated[int, typer.Option()] = 40,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    cpu_layers: Annotated[int | None, typer.Option(help="LLM layers (default: the preset's)")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated")] = "stock,spd,vmtc,cmai,vmtc+cmai",
    compile_vision: Annotated[
        str | None,
        typer.Option(
            help="compile every method's vision tower with torch.compile in this mode (default, reduce-overhead: "
            "CUDA graphs, max-autotune); the first run of each method compiles"
        ),
    ] = None,
    cache: Annotated[
        str,
        typer.Option(
            help="generate's cache: dynamic, or static (the decode step compiled on any device, as generate does "
            "by itself on a GPU: CUDA graphs there; methods run one after the other)"
        ),
    ] = "dynamic",
) -> None:
    """Speed and memory of every method against stock on a random-init real-shape model of any family."""
    from .bench.speed import run_speed, to_markdown, write_results
    from .evaluation.generation import resolve_device

    try:
        device = resolve_device(device)
    except ValueError as exc:
        fail(str(exc))

    def progress(rep, method, row):
        console.print(
            f"rep {rep} {method:>10}: TTFT {row.ttft_ms:8.0f} ms  decode {row.decode_ms_per_token:7.1f} ms/token"
        )

    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
        fail(
            f"--out {out} must name a JSON file in a folder (the .md, .png and the {out.stem}.run/ record go beside it)."
        )
    record = out.with_suffix(".run")  # every measured repetition, as it finishes: a rerun resumes

    def finish(result: dict) -> tuple[Path, ...]:  # under the record's lock: no second run starts from these samples
        written = write_results(result, out)
        shutil.rmtree(record)  # the results hold every repetition
        return written

    try:
        result, paths = run_speed(
            preset, methods=tuple(methods.split(",")), batch=batch, reps=reps, warmup=warmup,
            text_tokens=text_tokens, new_tokens=new_tokens, device=device, cpu_layers=cpu_layers,
            compile_vision=compile_vision, cache=cache, progress=progress, record=record, finish=finish,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        fail(str(exc))
    console.print(to_markdown(result))
    console.print("wrote " + ", ".join(map(str, paths)))


@bench_app.command("dispatch")
def bench_dispatch(
    out: Annotated[Path, typer.Option(help="results JSON (a .md table is written beside it)")],
    presets: Annotated[
        str, typer.Option(help="comma-separated presets (micro-FAMILY: seconds each; op counts do not depend on width)")
    ] = ",".join(f"micro-{f}" for f in ("llava", "llava_next", "qwen2_5_vl", "gemma3", "internvl", "idefics3")),
    methods: Annotated[str, typer.Option(help="comma-separated")] = "stock,spd,vmtc,cmai,vmtc+cmai",
    new_tokens: Annotated[int, typer.Option()] = 4,
) -> None:
    """Operator calls and host syncs per vision pass, prefill and decode step, per method (on CPU): the overhead
    that decides GPU speed at batch 1, where eager PyTorch launches kernels slower than the GPU runs them."""
    from .bench.dispatch import run_dispatch, to_markdown, write_dispatch

    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
        fail(f"--out {out} must name a JSON file in a folder (the .md goes beside it).")
    try:
        result = run_dispatch(presets.split(","), methods=tuple(methods.split(",")), new_tokens=new_tokens)
    except ValueError as exc:
        fail(str(exc))
    paths = write_dispatch(result, out)
    console.print(to_markdown(result))
    console.print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    app()
