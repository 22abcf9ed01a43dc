"""Pictures (VMTC token map, CMAI inhibition trace), `unclutter demo` and `unclutter visualize`."""

import json

import torch
from typer.testing import CliRunner

from unclutter import CMAIConfig, VMTCConfig, apply
from unclutter.cli import app
from unclutter.demo import correct
from unclutter.evaluation.generation import build_prompt
from unclutter.viz import inhibition_grid, trace_groups
from unclutter.vmtc import VMTCInfo


def test_trace_groups_partitions_patches_per_stage():
    # stage 1: 6 patches -> keep 2, three redundant into 2 clusters (patch 5 alone), drop none
    s1 = VMTCInfo(
        kept_index=torch.tensor([[1, 4]]), merged_index=torch.tensor([[0, 2, 3, 5]]),
        cluster=torch.tensor([[0, 0, 1, 1]]), importance=torch.rand(1, 6),
    )  # fmt: skip
    # stage 2: 4 tokens [p1, p4, c0={0,2}, c1={3,5}] -> keep token 2, merge 0,1,3 into one
    s2 = VMTCInfo(
        kept_index=torch.tensor([[2]]), merged_index=torch.tensor([[0, 1, 3]]),
        cluster=torch.tensor([[0, 0, 0]]), importance=torch.rand(1, 4),
    )  # fmt: skip
    stages = trace_groups([s1, s2], 6)
    assert [(g.patches, g.kept, g.cluster) for g in stages[0]] == [
        ([1], True, -1), ([4], True, -1), ([0, 2], False, 0), ([3, 5], False, 1),
    ]  # fmt: skip
    assert [(g.patches, g.kept) for g in stages[1]] == [([0, 2], True), ([1, 3, 4, 5], False)]
    heat = inhibition_grid(torch.tensor([True, False]), [g.patches for g in stages[1]], 3)[:2].ravel()
    assert heat.tolist() == [1, 0, 1, 0, 0, 0]


def test_cmai_trace_matches_the_mask_it_applied(model, processor, images):
    """The traced last-row inhibition has gamma's share of image keys, and tracing changes no output."""
    prompt = build_prompt(processor, "what is the color of the shape ?")
    with apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig(gamma_max=0.5)) as handle:
        inputs = processor(images=[images[0]], text=[prompt], return_tensors="pt")  # expands to the new count
        plain = model(**inputs).logits
        handle.cmai_state.tracing = True
        traced = model(**inputs).logits
        trace = handle.cmai_state.trace
        n = handle.num_image_tokens
        gammas = handle.cmai_state.gammas
    torch.testing.assert_close(plain, traced, rtol=0, atol=0)
    layers = [layer for layer, g in gammas.items() if g > 0]
    assert sorted(trace) == layers
    for layer in layers:
        (row,) = trace[layer]
        assert row.shape == (1, n)
        share = row.float().mean().item()
        assert abs(share - gammas[layer]) <= 1.5 / n + 1e-6, (layer, share, gammas[layer])


def test_visualize_cli_writes_both_pictures(model_dir, tmp_path, images):
    images[0].save(tmp_path / "x.png")
    res = CliRunner().invoke(
        app, ["visualize", "--model", str(model_dir), "--image", str(tmp_path / "x.png"),
              "--prompt", "what is the color of the shape ?", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("vmtc_tokens.png", "cmai_inhibition.png"):
        assert (tmp_path / "o" / name).stat().st_size > 5000


def test_demo_on_a_given_model_and_image(model_dir, tmp_path, images):
    images[1].save(tmp_path / "y.png")
    res = CliRunner().invoke(
        app, ["demo", "--model", str(model_dir), "--image", str(tmp_path / "y.png"), "--out", str(tmp_path / "d"),
              "--bench-size", "2", "--max-new-tokens", "4"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert set(record["methods"]) == {"stock", "spd", "vmtc+cmai"}
    assert record["methods"]["stock"]["tokens"] == 64
    assert record["methods"]["vmtc+cmai"]["tokens"] == 32
    assert record["methods"]["spd"]["tokens"] == 36  # round(8 / sqrt 2) = 6 -> 6x6
    assert record["items"][0]["truth"] is None
    for name in ("vmtc_tokens.png", "cmai_inhibition.png", "if_vqa_chart.png", "images/y.png"):
        assert (tmp_path / "d" / name).is_file()
    missing = CliRunner().invoke(app, ["demo", "--image", str(tmp_path / "nope.png")])
    assert missing.exit_code != 0 and "no such file" in " ".join(missing.output.split())


def test_correct_matches_whole_words():
    assert correct("red", "red") and correct("The circle is red.", "red") and not correct("The circle is blue.", "red")
    assert correct("It is at the top left.", "top left") and not correct("There are 12 shapes.", "2")
    assert not correct("I am tired.", "red")


def test_cli_verbs_name_bad_arguments_before_loading(model_dir, tmp_path, images):
    """Output paths that are files, a model folder that does not exist, counts below their minimum, a family the
    demo does not compare: one `error:` line each (exit 2), no traceback."""
    from unclutter.models.tiny import tiny_vlm

    images[0].save(tmp_path / "x.png")
    (tmp_path / "file").write_text("not a folder")
    qwen = tmp_path / "qwen"
    tiny_vlm("qwen2_5_vl").model().save_pretrained(qwen)
    tiny_vlm("qwen2_5_vl").processor().save_pretrained(qwen)
    see = ["--image", str(tmp_path / "x.png"), "--prompt", "what is it ?"]
    cases = [
        (["demo", "--model", str(model_dir), "--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["visualize", "--model", str(model_dir), *see, "--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["model", "export", "--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["visualize", "--model", str(model_dir), *see, "--token-index", "-1"], "counts generated tokens from 0"),
        # these two were silently ignored: SPD's override, and an index past the answer (the last token was drawn)
        (["visualize", "--model", str(model_dir), *see, "--set", "spd.grid=4"], "SPD has none"),
        (
            ["visualize", "--model", str(model_dir), *see, "--token-index", "1000", "--out", str(tmp_path / "v")],
            "token index 1000 is past the answer",
        ),
        (["visualize", "--model", str(tmp_path / "nowhere"), *see, "--out", str(tmp_path / "v")], "no model folder"),
        (["demo", "--model", str(model_dir), "--bench-size", "0", "--out", str(tmp_path / "d")], "must be >= 1"),
        (["demo", "--model", str(qwen), "--out", str(tmp_path / "d")], "not Qwen2.5-VL"),
    ]
    for args, match in cases:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, (args, res.output)
        assert match in " ".join(res.output.split()), (args, res.output)
