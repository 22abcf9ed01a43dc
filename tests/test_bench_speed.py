"""`unclutter bench speed`: the pipeline gives a row for every method on each family's micro preset, and the real
presets' processors expand the benchmark image to the published checkpoints' token counts (no 7B model is built)."""

import json

import pytest
from typer.testing import CliRunner

from unclutter.bench.dispatch import run_dispatch
from unclutter.bench.speed import bench_image, run_speed, to_markdown, write_results
from unclutter.cli import app
from unclutter.models.presets import PRESETS, gemma3_config, get_preset, qwen25_config


@pytest.mark.parametrize(
    "family, methods",
    [
        ("llava_next", ["stock", "spd", "vmtc", "cmai", "vmtc+cmai"]),
        ("qwen2_5_vl", ["stock", "vmtc", "cmai", "vmtc+cmai"]),
        ("gemma3", ["stock", "spd", "vmtc", "cmai", "vmtc+cmai"]),
    ],
)
def test_micro_preset_gives_a_row_per_method(family, methods):
    result = run_speed(f"micro-{family}", reps=1, warmup=0, new_tokens=2, text_tokens=6)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == methods
    assert set(result["meta"]["skipped"]) == ({"spd"} if "spd" not in methods else set())
    stock = rows["stock"]
    for name, row in rows.items():
        assert row["vision_ms"] > 0 and row["ttft_ms"] >= row["vision_ms"] and row["decode_ms_per_token"] > 0
        assert row["kv_cache_bytes"] > 0
        reduced = "vmtc" in name or name == "spd"
        # the LLM sees the method's token count: fewer image tokens (and a smaller cache) exactly when reducing
        assert (row["llm_image_tokens"] < stock["llm_image_tokens"]) == reduced
        assert (row["kv_cache_bytes"] < stock["kv_cache_bytes"]) == reduced
        assert (row["extra_state_bytes"] > 0) == ("cmai" in name)
    assert result["ratios"]["vmtc"]["llm_image_tokens"] == pytest.approx(
        rows["vmtc"]["llm_image_tokens"] / stock["llm_image_tokens"]
    )
    assert result["meta"]["family"] and len(result["meta"]["load"]) == 3


def test_results_files_and_cli(tmp_path):
    out = tmp_path / "micro.json"
    res = CliRunner().invoke(
        app, ["bench", "speed", "--preset", "micro-llava", "--out", str(out), "--reps", "1", "--warmup", "0",
              "--new-tokens", "2", "--methods", "stock,vmtc+cmai", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["stock", "vmtc+cmai"]
    md = out.with_suffix(".md").read_text()
    assert "| target | measured | bound | holds |" in md and "VMTC+CMAI time to first token" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert not out.with_suffix(".run").exists()  # the record of repetitions goes once the results hold them
    assert write_results(result, tmp_path / "again.json")[1].read_text() == to_markdown(result)
    bad = CliRunner().invoke(app, ["bench", "speed", "--preset", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown preset" in bad.output


@pytest.mark.parametrize(
    "preset, tokens",
    [
        ("llava-1.5-7b", 576),
        ("llava-next-7b-cpu", 2928),  # base 576 + 2x2 tiles as a 48x48 grid + 48 newlines
        ("qwen2.5-vl-7b-cpu", 391),  # 480x640 -> 476x644 px -> 34x46 patches -> 17x23 merged tokens
        ("gemma-3-4b-cpu", 256),
    ],
)
def test_real_presets_expand_the_image_like_the_published_models(preset, tokens):
    spec = get_preset(preset)
    processor = spec.processor()
    batch = processor(images=[[bench_image(spec.image)]], text=[f"{processor.image_token} what"], return_tensors="pt")
    tok = processor.tokenizer
    image_token = getattr(tok, "image_token", None) or processor.image_token
    if preset.startswith("gemma"):
        image_token = tok.image_token  # the soft token; processor.image_token is <start_of_image>
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids(image_token)).sum()) == tokens


def test_preset_shapes():
    qwen = qwen25_config(8, 7, tied=True)
    assert qwen.vision_config.fullatt_block_indexes == [1, 3, 5, 7]
    assert qwen25_config().vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    assert qwen.text_config.tie_word_embeddings and qwen.text_config.hidden_size == 3584
    gemma = gemma3_config(7, 9)
    assert gemma.text_config.layer_types.count("full_attention") == 1 and gemma.mm_tokens_per_image == 256
    assert gemma3_config().text_config.layer_types.count("full_attention") == 5
    assert PRESETS["cpu"] is PRESETS["llava-1.5-7b-cpu"]
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("llava-9b")


def test_dispatch_counts_show_where_each_method_adds_work(tmp_path):
    """`bench dispatch`: VMTC adds work to the vision pass only, CMAI to every decoder layer with one host sync per
    decode step; stock has none in decoding."""
    out = tmp_path / "ops.json"
    res = CliRunner().invoke(
        app, ["bench", "dispatch", "--out", str(out), "--presets", "micro-llava,micro-gemma3", "--new-tokens", "3"]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("| `micro-") == 10
    for preset in result["presets"]:
        rows = {r["method"]: r for r in preset["rows"]}
        stock, vmtc, cmai = rows["stock"], rows["vmtc"], rows["cmai"]
        assert stock["decode_syncs"] == vmtc["decode_syncs"] == 0 and cmai["decode_syncs"] == 1
        assert vmtc["vision_ops"] > stock["vision_ops"] == cmai["vision_ops"]
        assert vmtc["decode_layer_ops"] == stock["decode_layer_ops"] < cmai["decode_layer_ops"]
        assert 0 < stock["decode_layer_kernels"] < stock["decode_layer_ops"]  # views are not kernels
        assert stock["decode_layer_kernels"] < cmai["decode_layer_kernels"] < cmai["decode_layer_ops"]
        assert cmai["decode_ops"] > stock["decode_ops"] and rows["vmtc+cmai"]["decode_ops"] == cmai["decode_ops"]
    bad = CliRunner().invoke(app, ["bench", "dispatch", "--out", str(out), "--presets", "nope"])
    assert bad.exit_code != 0 and "unknown preset" in bad.output


def test_cpu_layers_on_a_micro_preset_is_refused_not_ignored(tmp_path):
    args = ["bench", "speed", "--preset", "micro-llava", "--cpu-layers", "16", "--out", str(tmp_path / "r.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    assert "fixed depth" in str(res.exception) + res.output


def test_every_repetition_is_kept_and_its_range_shown():
    """Medians hide how far single repetitions swing; the JSON keeps each one and the table names the range."""
    result = run_speed("micro-llava", methods=("stock", "cmai"), reps=3, warmup=0, new_tokens=2, text_tokens=6)
    rows = {r["method"]: r for r in result["rows"]}
    md = to_markdown(result)
    for method, samples in result["samples"].items():
        assert len(samples) == 3
        decode = sorted(s["decode_ms_per_token"] for s in samples)
        assert rows[method]["decode_ms_per_token"] == pytest.approx(decode[1])  # the median of three
        ttft = [s["ttft_ms"] for s in samples]
        assert f"{method} {min(ttft):.0f}-{max(ttft):.0f} / {decode[0]:.1f}-{decode[-1]:.1f}" in md


def test_arguments_are_checked_before_anything_is_built(tmp_path):
    for kwargs, match in [
        ({"batch": 0}, "batch must be >= 1"),
        ({"reps": 0}, "reps must be >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"new_tokens": 1}, "new_tokens must be >= 2"),
        ({"new_tokens": 0}, "new_tokens must be >= 2"),
        ({"cpu_layers": 0}, "cpu_layers must be >= 1"),
        ({"methods": ("stock", "stock")}, "methods must be distinct"),
        ({"methods": ("stock", "describe-then-answer")}, "got describe-then-answer"),  # timed as stock, unnoticed
        ({"text_tokens": -5}, "text_tokens must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_speed("micro-llava", **kwargs)
    with pytest.raises(ValueError, match="no method runs on Qwen2.5-VL"):
        run_speed("micro-qwen2_5_vl", methods=("spd",), reps=1, warmup=0, new_tokens=2)
    (tmp_path / "a_dir.json").mkdir()
    res = CliRunner().invoke(app, ["bench", "speed", "--preset", "micro-llava", "--out", str(tmp_path / "a_dir.json")])
    assert res.exit_code == 2 and "must name a JSON file" in " ".join(res.output.split())
    for device, match in (("foo", "not a device name"), ("cuda:7", "CUDA device")):
        res = CliRunner().invoke(app, ["bench", "speed", "--out", str(tmp_path / "r.json"), "--device", device])
        assert res.exit_code == 2 and match in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["bench", "dispatch", "--out", str(tmp_path / "a_dir.json")])
    assert res.exit_code == 2 and "must name a JSON file" in " ".join(res.output.split())
    with pytest.raises(ValueError, match="got checkpoint"):
        run_dispatch(["micro-llava"], methods=("checkpoint",))
    result = run_speed("micro-llava", methods=("vmtc",), reps=1, warmup=0, new_tokens=2, text_tokens=6)
    assert [p.suffix for p in write_results(result, tmp_path / "alone.json")] == [".json", ".md"]  # no stock: no chart


def test_a_killed_run_resumes_from_its_recorded_repetitions(tmp_path):
    """Each measured repetition is appended to the record as it finishes; a rerun with the same settings measures
    only the missing ones (after its own warm-up) and reports every repetition; other settings are refused."""
    record = tmp_path / "run"
    kwargs = dict(methods=("stock", "cmai"), reps=3, warmup=1, new_tokens=2, text_tokens=6, record=record)
    seen = []

    def stop_after_three(rep, method, row):
        seen.append((rep, method))
        if len(seen) == 2 + 3:  # the warm-up pair, then killed after three measured rows were written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_speed("micro-llava", progress=stop_after_three, **kwargs)
    recorded = [json.loads(line) for line in (record / "samples.jsonl").read_text().splitlines()]
    assert [r["method"] for r in recorded] == ["stock", "cmai", "stock"]
    seen.clear()
    result = run_speed("micro-llava", progress=lambda rep, m, row: seen.append((rep, m)), **kwargs)
    # a warm-up round, then only the missing repetitions, still interleaved
    assert seen == [(0, "stock"), (0, "cmai"), (2, "cmai"), (3, "stock"), (3, "cmai")]
    assert {m: len(rows) for m, rows in result["samples"].items()} == {"stock": 3, "cmai": 3}
    assert result["samples"]["stock"][:2] == [r for r in recorded if r["method"] == "stock"]
    with pytest.raises(ValueError, match="other settings"):
        run_speed("micro-llava", **{**kwargs, "reps": 4})


def test_compiled_vision_towers_are_timed_method_by_method(monkeypatch):
    """--compile-vision compiles every method's tower once, runs each method's warm-up and repetitions back to back,
    and restores the tower afterwards. The compiler here is dynamo with the aot_eager backend (inductor would need
    minutes of C++ compilation); that the compressed tower is one graph is tests/test_compile.py's business."""
    import torch

    from unclutter.bench import speed

    compiled, real_compile = [], torch.compile

    def compile_eagerly(fn, *, mode, dynamic):
        compiled.append((getattr(fn, "__self__", None), mode, dynamic))
        return real_compile(fn, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(speed.torch, "compile", compile_eagerly)
    seen = []
    result = run_speed(
        "micro-llava", methods=("stock", "vmtc"), reps=2, warmup=1, new_tokens=2, text_tokens=6,
        compile_vision="reduce-overhead", progress=lambda rep, m, row: seen.append((rep, m)),
    )  # fmt: skip
    assert seen == [(0, "stock"), (1, "stock"), (2, "stock"), (0, "vmtc"), (1, "vmtc"), (2, "vmtc")]
    towers = {id(tower) for tower, _, _ in compiled}
    assert len(compiled) == 2 and len(towers) == 1 and {(m, d) for _, m, d in compiled} == {("reduce-overhead", False)}
    tower = compiled[0][0]
    assert "forward" not in vars(tower)  # the class's forward again
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["vmtc"]["llm_image_tokens"] < rows["stock"]["llm_image_tokens"]
    assert result["meta"]["compile_vision"] == "reduce-overhead" and "consecutive" in to_markdown(result)
    for kwargs, match in [
        ({"compile_vision": "fast"}, "compile_vision must be one of"),
        ({"compile_vision": "default", "warmup": 0}, "needs warmup >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_speed("micro-llava", **kwargs)
    with pytest.raises(ValueError, match="starts inside it"):
        run_speed("micro-qwen2_5_vl", compile_vision="default", reps=1, new_tokens=2)


def test_a_static_cache_runs_methods_one_after_the_other(monkeypatch):
    """``cache="static"``: every timed generate decodes into a static cache with its decode step compiled, methods
    run consecutively (each method's warm-up compiles its decoding), and the setting is recorded and refused when
    bad."""
    from transformers import GenerationMixin

    caches, real_generate = [], GenerationMixin.generate

    def recording(self, *args, **kwargs):
        caches.append((kwargs.get("cache_implementation"), kwargs.get("compile_config") is not None))
        if "compile_config" in kwargs:  # dynamo's aot_eager backend here: inductor would need minutes of C++
            kwargs["compile_config"].backend, kwargs["compile_config"].mode = "aot_eager", None
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    seen = []
    result = run_speed(
        "micro-llava", methods=("stock", "cmai"), reps=1, warmup=1, new_tokens=3, text_tokens=6, cache="static",
        progress=lambda rep, m, row: seen.append((rep, m)),
    )  # fmt: skip
    assert seen == [(0, "stock"), (1, "stock"), (0, "cmai"), (1, "cmai")]
    assert caches == [("static", True)] * 4  # compiled on a CPU too
    assert result["meta"]["cache"] == "static" and "consecutive (static cache)" in to_markdown(result)
    assert {r["method"] for r in result["rows"]} == {"stock", "cmai"}
    for kwargs, match in [({"cache": "paged"}, "cache must be one of"), ({"cache": "static", "warmup": 0}, "warmup")]:
        with pytest.raises(ValueError, match=match):
            run_speed("micro-llava", **kwargs)


def test_a_failed_compile_leaves_the_model_as_it_was(monkeypatch):
    import unclutter
    from unclutter.bench import speed
    from unclutter.models.presets import build_preset

    model, processor, spec = build_preset("micro-llava")

    def broken(fn, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(speed.torch, "compile", broken)
    with (
        pytest.raises(RuntimeError, match="no compiler"),
        speed._applied_and_compiled(model, processor, "vmtc", spec.spd_grid, "default"),
    ):
        pass
    tower = speed.compiled_tower(unclutter.integrations.base.adapter_for(model)(model))
    assert "forward" not in vars(tower)
    unclutter.apply(model, processor, vmtc=unclutter.VMTCConfig()).remove()  # not "already applied"
