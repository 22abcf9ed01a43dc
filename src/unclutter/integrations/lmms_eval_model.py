"""The lmms-eval model class: a checkpoint of any family `unclutter.apply` supports, with a method applied."""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

from .. import apply
from ..evaluation.generation import ImagesRefused, build_prompt, continuation_logprob, generate, load_model
from ..evaluation.images import to_rgb
from ..methods import resolve


class UnclutterVLM(lmms):
    """Any supported family (loaded through ``AutoModelForImageTextToText``), prompts in the processor's chat
    template, one or several images per prompt, or none.

    model_args: ``pretrained`` (hub id / dir), ``method`` (a preset of `unclutter.methods`, or ``checkpoint`` for
    the configs a checkpoint of `unclutter train` / `unclutter model export` recorded), ``set`` (overrides joined
    by ';', e.g. ``set=vmtc.num_tokens=64;cmai.gamma_max=0.5``), ``device``, ``dtype``, ``batch_size`` (an integer
    >= 1; lmms-eval's ``auto`` means 1), ``max_new_tokens``. Per request, as lmms-eval's own models: ``until``,
    ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p``, ``num_beams``."""

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-1.5-7b-hf",
        method: str = "vmtc+cmai",
        set: str = "",  # noqa: A002 - the model_args key users type
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        max_batch_size: int | None = None,  # lmms-eval's evaluator may pass it; unused
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            stray = [k for k in unknown if k.split(".")[0] in ("vmtc", "cmai", "spd")]
            hint = (
                f" {stray} look like overrides cut off by lmms-eval's ',' separator: join them with ';' inside set="
                if stray
                else ""
            )
            raise ValueError(
                f"unknown model_args {sorted(unknown)}; valid: pretrained, method, set, device, dtype, batch_size, "
                f"max_new_tokens.{hint}"
            )
        if method == "describe-then-answer":
            raise ValueError(
                "describe-then-answer is an `unclutter eval` strategy, not a model patch; pick another method."
            )
        self.batch_size_per_gpu = _positive("batch_size", 1 if str(batch_size) == "auto" else batch_size)
        self.max_new_tokens = _positive("max_new_tokens", max_new_tokens)
        self.model, self.processor = load_model(str(pretrained), dtype=dtype, device=device)
        overrides = [s for s in str(set).split(";") if s]
        recorded = getattr(self.model.config, "unclutter", None)  # what `method=checkpoint` re-applies
        configs = resolve(method, overrides, recorded)
        self.handle = apply(self.model, self.processor, **{k: v for k, v in configs.items() if v is not None})

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; a batch groups requests by generation settings and by whether they bring
        images (a processor call takes images for all its prompts or for none)."""
        results = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            prepared = [self._prepare(req) for req in chunk]
            groups: dict[tuple, list[int]] = {}
            for i, (settings, _, images) in enumerate(prepared):
                key = (tuple(sorted((k, str(v)) for k, v in settings.items())), bool(images))
                groups.setdefault(key, []).append(i)
            answers: list[str] = [""] * len(chunk)
            for idxs in groups.values():
                settings = dict(prepared[idxs[0]][0])
                until = settings.pop("until")
                while True:  # images the processor refuses answer "" (logged); the others are answered
                    images = [prepared[i][2] for i in idxs]
                    try:
                        outs = generate(
                            self.model, self.processor, [prepared[i][1] for i in idxs],
                            images if any(images) else None, **settings,
                        )  # fmt: skip
                        break
                    except ImagesRefused as exc:
                        for k, message in exc.refused.items():
                            logger.warning(f"unclutter: request {start + idxs[k]}: the processor refuses its image: "
                                           f"{message}; answering ''")  # fmt: skip
                        idxs = [i for k, i in enumerate(idxs) if k not in exc.refused]
                        outs = []
                        if not idxs:
                            break
                for i, text in zip(idxs, outs, strict=True):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    answers[i] = text
            results.extend(answers)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding gives exactly it) per request,
        in request order (`evaluation.generation.continuation_logprob`), one request at a time. A request whose image
        the processor refuses gets (-inf, False), logged."""
        results = []
        for k, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if not (isinstance(target, str) or callable(target)):
                raise ValueError(
                    f"{task}: a loglikelihood request carries a continuation string or a doc_to_target function, got "
                    f"{type(target).__name__}."
                )
            continuation = target if isinstance(target, str) else target(doc)
            prompt, images = self._prompt(context, doc_to_visual(doc), task)
            try:
                results.append(continuation_logprob(self.model, self.processor, prompt, str(continuation), images))
            except ImagesRefused as exc:
                logger.warning(f"unclutter: request {k}: the processor refuses its image: {exc}; scoring -inf")
                results.append((float("-inf"), False))
        return results

    def _prepare(self, req: Instance) -> tuple[dict, str, list]:
        """(generation settings with ``until``, prompt, RGB images) of one request, lmms-eval's defaults filled in."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        temperature = float(gen_kwargs.get("temperature") or 0)
        top_p = gen_kwargs.get("top_p")
        settings = {
            "until": [until] if isinstance(until, str) else list(until),
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": temperature > 0,
            "temperature": temperature if temperature > 0 else 1.0,
            "top_p": float(top_p) if top_p is not None else None,
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
        }
        prompt, images = self._prompt(context, doc_to_visual(self.task_dict[task][split][doc_id]), task)
        return settings, prompt, images

    def _prompt(self, context: str, visuals, task: str) -> tuple[str, list]:
        """(chat-formatted prompt, RGB images) of a request's context and its doc's visuals."""
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(
                    f"{task}: unclutter's lmms-eval model takes images (PIL), not {type(v).__name__} visuals such as "
                    "videos given as paths; run video tasks with `unclutter eval` or transformers directly."
                )
        text = context
        for placeholder in {self.processor.image_token, "<image>"}:  # the chat template places images
            text = text.replace(placeholder, "")
        prompt = build_prompt(self.processor, text.strip(), with_image=len(visuals))
        return prompt, [to_rgb(v) for v in visuals]

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("unclutter's lmms-eval model supports single-round generation only.")


UnclutterLlava = UnclutterVLM  # the class's name before it served every family (kept for saved configs)


def _positive(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"model_args {name} must be a positive integer, got {value!r}.")
    return number
