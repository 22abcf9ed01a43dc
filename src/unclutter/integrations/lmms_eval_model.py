"""The lmms-eval model class: a checkpoint of any family `unclutter.apply` supports, with a method applied."""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .. import apply
from ..evaluation.generation import build_prompt, generate, load_model
from ..evaluation.images import to_rgb
from ..methods import resolve


class UnclutterVLM(lmms):
    """Any supported family (loaded through ``AutoModelForImageTextToText``), prompts in the processor's chat
    template, one or several images per prompt.

    model_args: ``pretrained`` (hub id / dir), ``method`` (a preset of `unclutter.methods`),
    ``set`` (overrides joined by ';', e.g. ``set=vmtc.num_tokens=64;cmai.gamma_max=0.5``),
    ``device``, ``dtype``, ``batch_size``, ``max_new_tokens``."""

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-1.5-7b-hf",
        method: str = "vmtc+cmai",
        set: str = "",  # noqa: A002 - the model_args key users type
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        **kwargs,
    ) -> None:
        super().__init__()
        if method == "describe-then-answer":
            raise ValueError(
                "describe-then-answer is an `unclutter eval` strategy, not a model patch; pick another method."
            )
        self.model, self.processor = load_model(str(pretrained), dtype=dtype, device=device)
        overrides = [s for s in str(set).split(";") if s]
        self.handle = apply(
            self.model, self.processor, **{k: v for k, v in resolve(method, overrides).items() if v is not None}
        )
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            groups: dict[tuple, list[int]] = {}
            for i, req in enumerate(chunk):  # one generate() call per distinct generation setting
                gen_kwargs = dict(req.args[1])
                key = tuple(sorted((k, str(v)) for k, v in gen_kwargs.items()))
                groups.setdefault(key, []).append(i)
            answers: list[str] = [""] * len(chunk)
            for idxs in groups.values():
                reqs = [chunk[i] for i in idxs]
                gen_kwargs = dict(reqs[0].args[1])
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                prompts, images = [], []
                for req in reqs:
                    context, _, doc_to_visual, doc_id, task, split = req.args
                    visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
                    text = context
                    for placeholder in {self.processor.image_token, "<image>"}:  # the chat template places images
                        text = text.replace(placeholder, "")
                    prompts.append(build_prompt(self.processor, text.strip(), with_image=len(visuals)))
                    images.append([to_rgb(v) for v in visuals])
                if any(images) and not all(images):
                    raise ValueError("a batch mixes prompts with and without images; use batch_size=1 for this task.")
                outs = generate(
                    self.model, self.processor, prompts, images if any(images) else None,
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                    do_sample=float(gen_kwargs.get("temperature", 0) or 0) > 0,
                    temperature=float(gen_kwargs.get("temperature", 1.0) or 1.0),
                )  # fmt: skip
                for i, text in zip(idxs, outs, strict=True):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    answers[i] = text
            results.extend(answers)
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError("unclutter's lmms-eval model supports generation tasks (generate_until) only.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("unclutter's lmms-eval model supports single-round generation only.")


UnclutterLlava = UnclutterVLM  # the class's name before it served every family (kept for saved configs)
