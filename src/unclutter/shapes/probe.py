"""Where a shapes-world LLaVA looks when a question names an object: a diagnostic for its failures.

For benchmark-phrased questions that name one object by a single attribute ("What shape is the red
object?" names it by colour, "What color is the square?" by shape), this measures, in every LLM layer
and head, the attention that the attribute word and the last prompt token pay to the named object's
grid cell, against the mean over each other object's cell. A head that finds objects by that attribute
gives the named cell far more than the others. Run R (a trained projector) had such a head for colour
in its first layer, at the colour word, but for shape only in its last layer, at the last token, too late
to count shapes or check a "red star" (the retired 4.6 M shapes model's history, in the git log).

``python -m unclutter.shapes.probe --data DIR [--model DIR] [--num N]`` (default: the shipped mini-LLaVA)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..evaluation.generation import build_prompt, load_model
from ..evaluation.images import open_image
from ..evaluation.runner import SHORT_ANSWER
from ..ifeval.scoring import read_jsonl
from .vision import CELLS, cell_of_patch

KEYS = {  # attribute that names the object -> (question, the word that names it)
    "color": lambda o: (f"What shape is the {o['color']} object?", o["color"]),
    "shape": lambda o: (f"What color is the {o['shape']}?", o["shape"]),
}


@torch.no_grad()
def lookup_attention(
    model, processor, scenes: list[dict], images_dir: str | Path
) -> dict[tuple[str, str], torch.Tensor]:
    """{(attribute, "word" | "last"): (layers, heads, 2) mean attention to the named object's cell and to
    each other object's cell}, over the objects of scenes with 2+ objects whose attribute is unique."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    cells = cell_of_patch(grid)
    sums: dict[tuple[str, str], list[torch.Tensor]] = {}
    for scene in scenes:
        objects = scene["objects"]
        if len(objects) < 2:
            continue
        image = open_image(Path(images_dir) / scene["image"])
        for key, make in KEYS.items():
            for o in (o for o in objects if sum(p[key] == o[key] for p in objects) == 1):
                question, word = make(o)
                prompt = build_prompt(processor, f"{question}\n{SHORT_ANSWER}")
                inputs = processor(images=image, text=prompt, return_tensors="pt")
                ids = inputs["input_ids"][0].tolist()
                word_id = tokenizer.convert_tokens_to_ids("Ġ" + word)  # byte-level BPE: the word after a space
                if word_id not in ids:
                    continue
                word_pos = len(ids) - 1 - ids[::-1].index(word_id)
                attentions = model(**inputs, output_attentions=True).attentions  # each (1, H, T, T)
                image_pos = torch.tensor([i for i, t in enumerate(ids) if t == image_id])
                target = cells == o["row"] * CELLS + o["col"]
                others = [cells == p["row"] * CELLS + p["col"] for p in objects if p is not o]
                for where, pos in (("word", word_pos), ("last", len(ids) - 1)):
                    rows = torch.stack([a[0, :, pos, image_pos] for a in attentions])  # (L, H, P)
                    other = torch.stack([rows[..., m].sum(-1) for m in others]).mean(0)
                    sums.setdefault((key, where), []).append(torch.stack([rows[..., target].sum(-1), other], -1))
    return {k: torch.stack(v).mean(0) for k, v in sums.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclutter.shapes.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a LLaVA checkpoint (default: the shipped stock mini-LLaVA)")
    parser.add_argument("--data", required=True, help="a `unclutter data shapes` directory (scenes.jsonl, images/)")
    parser.add_argument("--num", type=int, default=100, help="scenes to read")
    args = parser.parse_args(argv)
    if args.model:
        model, processor = load_model(args.model, dtype="float32", device="cpu")
    else:
        from ..mini.ship import load_shipped

        model, processor = load_shipped("stock")
    model.set_attn_implementation("eager")  # attention weights are only returned by the eager path
    scenes = [s for _, s in read_jsonl(Path(args.data) / "scenes.jsonl")][: args.num]
    for (key, where), table in sorted(lookup_attention(model, processor, scenes, Path(args.data) / "images").items()):
        print(f"named by {key}, from the {where} token: per layer, per head 'named cell / each other object'")
        for layer, heads in enumerate(table):
            print(f"  layer {layer}: " + "  ".join(f"{t:.2f}/{o:.2f}" for t, o in heads.tolist()))


if __name__ == "__main__":
    main()
