"""VMTC under torch.compile: the method's shared code reads nothing back to the host while traced, so it adds no
graph break, and a vision pass that stock transformers compiles to one graph (so CUDA graphs can capture it: at batch 1
on a GPU, kernel launches, not arithmetic, decide the tower's speed) stays one graph with the method on. And the
static-cache decode step `generate` compiles gives eager's tokens and logits with VMTC and CMAI on.

Not in the exactness suite run on both transformers releases: graph breaks are torch's business, and dynamo's
tracing costs seconds per model.
"""

import inspect

import pytest
import torch
from test_families import QUESTIONS, _setup

import unclutter
from unclutter import CMAIConfig, VMTCConfig

# the shared method code: it must never break a graph (an adapter may, where its family reads its layout from
# tensors on the host as the stock model does: LLaVA-NeXT's image sizes)
SHARED_MATH = ("unclutter/vmtc.py", "unclutter/kmeans.py", "unclutter/integrations/vision.py", "unclutter/_amp.py")
# families whose whole vision pass with VMTC compiles to one graph (CUDA-graph capturable)
ONE_GRAPH = ["llava", "gemma3", "internvl"]
# one family per way the shared code is called: CLS ranking from captured q/k (LLaVA's CLIP), received ranking inside
# SDPA over pooled units (Gemma 3's SigLIP), an adapter's own block forward over pixel-shuffle units (InternVL),
# received ranking from captured q/k under a patch mask (Idefics3). (Qwen's stage blocks run eagerly by design.)
FAMILIES = ["llava", "gemma3", "internvl", "idefics3"]
# the tiny towers leave all but LLaVA one cluster per stage by default, and K-means returns before its loop at c == 1
CLUSTERS = {"llava": None, "gemma3": 2, "internvl": 2, "idefics3": 2}


def _vision_pass(model, batch):
    """The base model's ``get_image_features`` with the batch's arguments it takes (pixels, grids, masks)."""
    features = model.model.get_image_features
    taken = inspect.signature(features).parameters
    kwargs = {k: v for k, v in batch.items() if k in taken and k != "input_ids"}
    return lambda: features(**kwargs)


def _flat(features) -> list[torch.Tensor]:
    """The feature tensors, whatever container the family returns them in."""
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, (list, tuple)):
        return [t for f in features for t in _flat(f)]
    return _flat(features.pooler_output if features.pooler_output is not None else features.last_hidden_state)


def _in_full(vision) -> list[torch.Tensor] | str:
    """The features of ``vision`` compiled as one graph, or why dynamo could not make one graph of it."""
    torch._dynamo.reset()
    try:
        return _flat(torch.compile(vision, fullgraph=True, backend="aot_eager")())
    except torch._dynamo.exc.Unsupported as exc:
        return str(exc).splitlines()[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_breaks_no_graph_under_torch_compile(name):
    """K-means, ranking and merging read nothing back to the host while traced: dynamo finds no graph break in
    them, and where the stock vision pass compiles to one graph the compressed one does too, with the eager
    features. (On torch 2.7 transformers' own config lookups keep the stock pass from one graph.)"""
    family, model, processor, images = _setup(name)
    batch = family.batch(processor, images, QUESTIONS)
    torch._dynamo.reset()
    with torch.no_grad():
        with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5, clusters=CLUSTERS[name])):
            vision = _vision_pass(model, batch)
            expected = _flat(vision())  # (a first call may install transformers' output-capturing hooks: a break)
            explained = torch._dynamo.explain(vision)()
            ours = [str(b.user_stack[-1]) for b in explained.break_reasons if b.user_stack]
            assert not [frame for frame in ours if any(f in frame for f in SHARED_MATH)], ours
            compressed = _in_full(vision) if name in ONE_GRAPH else None
        if isinstance(compressed, str):  # no one graph with VMTC: then there is none without it either
            stock = _in_full(_vision_pass(model, batch))
            assert isinstance(stock, str), f"stock compiles to one graph, VMTC does not: {compressed}"
        elif compressed is not None:
            assert explained.graph_break_count == 0, explained.break_reasons
            for got, eager in zip(compressed, expected, strict=True):
                torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# LLaVA and Gemma 3 have their own compiled-generation tests (test_llava_cmai.py, test_gemma3.py); one family per
# other way a decode step reaches CMAI: anyres newlines as image keys, M-RoPE positions with structural tokens
# (all nine passed on 2026-12-06; the others are left out for the suite's time, 5-10 s each)
COMPILED_DECODE = ["llava_next", "qwen2_5_vl"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", COMPILED_DECODE)
def test_compiled_static_decode_equals_eager(name):
    """`generate`'s compile of the static-cache decode step (by itself on a GPU; asked for here on CPU, with dynamo's
    aot_eager backend) on a left-padded batch under VMTC + CMAI: the same tokens and logits as eager decoding."""
    from helpers import generate
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    family, model, processor, images = _setup(name)
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers' own switch for compiling on CPU (its tests use it)
    methods = {"cmai": CMAIConfig(), **({"vmtc": VMTCConfig()} if family.vmtc else {})}
    with unclutter.apply(model, processor, **methods):
        batch = family.batch(processor, images, QUESTIONS)
        torch._dynamo.reset()
        counters.clear()
        eager = generate(model, batch, 4, cache_implementation="static", disable_compile=True)
        compiled = generate(model, batch, 4, cache_implementation="static", compile_config=config)
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] > 0, "the decode step was not compiled"
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
