"""The LLaVA-1.5 two-stage recipe with VMTC / CMAI active in the forward pass, on HF Trainer.

Stage ``pretrain`` trains the projector only on captions ("plain" format); stage ``finetune`` trains
projector + LLM (full, or LoRA through PEFT, merged at the end) on conversations (Vicuna v1), the
vision tower frozen. The method's configs are written into the checkpoint's ``config.json``
(``unclutter`` field) so that evaluation re-applies them (`unclutter eval --method checkpoint`).
A rerun with the same ``output`` resumes from its last ``checkpoint-*``. ``prompt_format: chat`` trains stage 2
in the processor's chat template instead of Vicuna v1 (for an instruction-tuned LLM, whose own format is what
its instruction following is tied to); with LoRA, the adapter is also saved unmerged under ``adapter/``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from .. import apply
from ..ifeval.scoring import DataError, write_json_atomic
from ..methods import resolve, to_dict
from ..runlock import main_process_lock
from .data import load_llava_json, modality_length_order
from .families import collator, load_loose, make_dataset, save_loose, trainable_parameters

MODULES = ("vision", "projector", "llm")
STAGE_DEFAULTS = {  # LLaVA-1.5: (learning rate, global batch, prompt format)
    "pretrain": (1e-3, 256, "plain"),
    "finetune": (2e-5, 128, "v1"),
}
DEFAULT_TUNE = {"pretrain": ["projector"], "finetune": ["projector", "llm"]}  # LLaVA-1.5's trained parts per stage
SETTINGS = "unclutter_train.json"  # the settings a run folder was trained with: a rerun must match them to resume
NOT_SETTINGS = {
    "output",
    "save_steps",
    "logging_steps",
    "dataloader_workers",
    "gradient_checkpointing",
}  # same training
log = logging.getLogger(__name__)


# (field, lowest value, what it must be): checked on construction, so 0 or a negative number is refused instead of
# being read as "the default" (`x or default`) or failing inside the Trainer
NUMBERS = [
    ("learning_rate", 0, "a number >= 0 (or unset: the stage's default)"),
    ("batch_size", 1, "an integer >= 1 (or unset: the stage's default)"),
    ("per_device_batch_size", 1, "an integer >= 1"),
    ("epochs", 0, "a number >= 0"),
    ("max_steps", -1, "an integer"),
    ("max_length", 1, "an integer >= 1"),
    ("warmup_ratio", 0, "a number >= 0"),
    ("weight_decay", 0, "a number >= 0"),
    ("lora_r", 1, "an integer >= 1"),
    ("lora_alpha", 0, "a number >= 0"),
    ("lora_dropout", 0, "a number >= 0"),
    ("save_steps", 1, "an integer >= 1"),
    ("logging_steps", 1, "an integer >= 1"),
    ("seed", 0, "an integer >= 0"),
    ("dataloader_workers", 0, "an integer >= 0"),
]
INTEGERS = {"batch_size", "per_device_batch_size", "max_steps", "max_length", "lora_r", "save_steps", "logging_steps",
            "seed", "dataloader_workers"}  # fmt: skip
OPTIONAL = {"learning_rate", "batch_size"}


@dataclass
class TrainConfig:
    """Every `unclutter train` option (also the keys of its YAML config file)."""

    stage: str
    data: str
    output: str
    images: str | None = None
    model: str | None = None  # an existing LLaVA checkpoint (hub id or dir) ...
    vision: str | None = None  # ... or a CLIP vision tower ...
    llm: str | None = None  # ... plus a causal LM, joined by a fresh 2-layer GELU projector
    method: str = "vmtc+cmai"
    overrides: list[str] = field(default_factory=list)
    learning_rate: float | None = None
    batch_size: int | None = None  # global batch; gradient accumulation makes up the difference
    per_device_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int = -1
    max_length: int = 2048
    warmup_ratio: float = 0.03  # a fraction of the total steps
    weight_decay: float = 0.0
    tune: list[str] | None = None  # modules trained; default: projector (pretrain), projector + llm (finetune)
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    deepspeed: str | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    group_by_modality_length: bool = False
    prompt_format: str | None = None  # "plain", "v1" or "chat"; default: the stage's (plain / v1)
    save_steps: int = 500
    logging_steps: int = 1
    seed: int = 0
    dataloader_workers: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {self.stage!r}.")
        if (self.model is None) == (self.vision is None or self.llm is None):
            raise ValueError("give --model (a LLaVA checkpoint) or both --vision and --llm (to assemble one).")
        unknown = sorted(set(self.tune or ()) - set(MODULES))
        if unknown or (self.tune is not None and not self.tune):
            raise ValueError(f"--tune takes a non-empty subset of {', '.join(MODULES)}; got {self.tune}.")
        if self.prompt_format not in (None, "plain", "v1", "chat"):
            raise ValueError(f"prompt_format must be 'plain', 'v1' or 'chat', got {self.prompt_format!r}.")
        if self.lora and self.stage != "finetune":
            raise ValueError("--lora applies to the finetune stage (stage 1 trains only the projector).")
        if self.lora and self.tune is not None and "llm" not in self.tune:
            raise ValueError("--lora puts adapters on the LLM: include llm in --tune, or drop --lora.")
        for name, low, what in NUMBERS:
            value = getattr(self, name)
            kind = int if name in INTEGERS else (int, float)
            if value is None and name in OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, kind) or not value >= low:
                raise ValueError(f"{name} must be {what}, got {value!r}.")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, or -1 to train for `epochs`; got {self.max_steps}.")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 when max_steps is not set, got {self.epochs}.")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"warmup_ratio and lora_dropout are fractions in [0, 1); got {self.warmup_ratio}, {self.lora_dropout}."
            )
        global_batch = self.global_batch
        if global_batch % self.per_device_batch_size and self.per_device_batch_size < global_batch:
            raise ValueError(
                f"the global batch {global_batch} is not a multiple of the per-device batch "
                f"{self.per_device_batch_size}: gradient accumulation could not make it; choose sizes that divide."
            )

    @property
    def global_batch(self) -> int:
        return STAGE_DEFAULTS[self.stage][1] if self.batch_size is None else self.batch_size

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(names)}.")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def assemble(vision: str, llm: str):
    """A LLaVA-1.5 model from a CLIP vision tower and a causal LM, with a fresh 2-layer GELU projector."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(vision, use_safetensors=True)
    lm = AutoModelForCausalLM.from_pretrained(llm, use_safetensors=True)
    return assemble_from(tower, lm, AutoTokenizer.from_pretrained(llm), AutoImageProcessor.from_pretrained(vision))


def assemble_from(tower, lm, tokenizer, image_processor, chat_template: str | None = None):
    """`assemble` from loaded parts (a tower, a causal LM, its tokenizer, the tower's image processor)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    config = LlavaConfig(
        vision_config=tower.config, text_config=lm.config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template,
    )  # fmt: skip
    return model, processor


def _load(cfg: TrainConfig):
    if cfg.model is not None:
        from ..evaluation.generation import load_model

        # fp32 weights even with bf16: the Trainer's autocast (or DeepSpeed's bf16 engine) does mixed precision
        # over fp32 master weights; AdamW steps on bf16 weights would lose small updates
        model, processor = load_model(cfg.model, dtype="float32", device="cpu")
    else:
        model, processor = assemble(cfg.vision, cfg.llm)
    processor.tokenizer.padding_side = "right"
    return model.train(), processor


def _freeze(model, tune: list[str]) -> dict[str, torch.nn.Parameter]:
    """Train the parts in ``tune`` (LLaVA-1.5: the projector in stage 1, projector + LLM in stage 2, `DEFAULT_TUNE`;
    a from-scratch vision tower, as in the shapes model, must be trained too). Returns the tuned loose parameters
    (`trainable_parameters`)."""
    for p in model.parameters():
        p.requires_grad = False
    parts = {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }
    for module in (m for name in tune for m in parts[name]):
        for p in module.parameters():
            p.requires_grad = True
    loose = trainable_parameters(model, tune)  # a tuned part's loose parameters (LLaVA-NeXT's image_newline)
    for p in loose.values():
        p.requires_grad = True
    return loose


def _touch_image_path(model):
    """A forward hook on the VLM: every tuned parameter of the image path (the projector, a tuned tower,
    image_newline) takes part in every training forward. A batch without images reaches none of them (stage 1 tunes
    nothing else, so backward() would fail), and a tuned tower's blocks after the feature layer (LLaVA reads the
    penultimate one) never do; under DDP a rank would then leave those parameters unreduced (a hang with gradient
    checkpointing, or, with find_unused_parameters, a "marked ready twice" error for a term added after forward).
    As LLaVA passes an empty slice of image features through, the loss takes 0 x their sum *inside* forward: zero
    gradients, every rank in step."""

    # fixed once the model is frozen and wrapped (the hook goes on last): listed once, not per forward
    image_path = [p for name, p in model.named_parameters() if p.requires_grad
                  and not name.startswith(("model.language_model.", "language_model.", "lm_head."))]  # fmt: skip

    def hook(module, args, kwargs, output):
        if module.training and torch.is_grad_enabled() and image_path and getattr(output, "loss", None) is not None:
            output.loss = output.loss + 0.0 * sum(p.sum() for p in image_path)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


class _LlavaTrainer(Trainer):
    def __init__(self, *args, order_fn=None, loose=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._order_fn = order_fn
        self._loose = loose or {}  # parameters a (PEFT) checkpoint leaves out: saved and restored beside it

    def _save_checkpoint(self, model, trial):
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as exc:  # torch.save on a full disk raises RuntimeError ("unexpected pos ...")
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            raise OSError(
                f"could not write {folder} ({exc}): is the disk full? Fix that and rerun the same command: it "
                "resumes from the last complete checkpoint."
            ) from exc

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self._loose and self.args.should_save:
            save_loose(self._loose, output_dir or self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if hasattr(model, "peft_config"):  # adapters load by PEFT's own path, under their own names
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_loose(self._loose, resume_from_checkpoint)
            return
        # A full checkpoint: save_pretrained writes the checkpoint format's key names (e.g. language_model.model.*),
        # which Trainer's raw load matches against the module's names without complaint, so nothing would load and
        # training would go on from the untrained weights. from_pretrained converts the names; every tensor must come.
        trained = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {resume_from_checkpoint} does not match the model (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}): it was written by another model or transformers release; delete it to restart."
            )

    def _get_train_sampler(self, *args, **kwargs):
        if self._order_fn is None:
            return super()._get_train_sampler(*args, **kwargs)
        return _EpochOrder(self._order_fn, len(self.train_dataset))


class _EpochOrder(torch.utils.data.Sampler):
    """``order_fn(epoch)``'s indices, drawn anew each epoch (Trainer calls `set_epoch` before every epoch, resumed
    ones included, so a resumed epoch replays its own order)."""

    def __init__(self, order_fn, size: int) -> None:
        self.order_fn, self.size, self.epoch = order_fn, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.order_fn(self.epoch))

    def __len__(self) -> int:
        return self.size


def _settings(cfg: TrainConfig) -> dict:
    from ..evaluation.generation import local_or_hub

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SETTINGS}
    for key in ("data", "images", "model", "vision", "llm"):  # local files by their absolute path
        settings[key] = settings[key] and local_or_hub(settings[key])
    return settings


def _check_or_write_settings(output: Path, cfg: TrainConfig) -> None:
    """A rerun resumes the run in ``output`` only with the settings it was started with: a checkpoint trained one way
    and continued another would be recorded (config.json, train_log.json) as the second alone."""
    path, settings = output / SETTINGS, _settings(cfg)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if not diff:
            return
        # refused only once something was trained under them: a first attempt that stopped before its first
        # checkpoint (a mistyped --model, data without --images, an out-of-memory first step) left nothing to resume
        if any(output.glob("checkpoint-*")) or (output / "train_log.json").is_file():
            raise ValueError(
                f"--output {output} holds a training run with different settings ({', '.join(diff)}; see {path}): "
                "rerun with those settings to resume it, or use a new --output."
            )
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def last_complete_checkpoint(output: str | Path) -> tuple[Path | None, dict | None]:
    """The newest ``checkpoint-N`` whose save finished, and its trainer state. Trainer writes trainer_state.json last,
    so a checkpoint without a readable one is a save that a kill or a full disk cut short: it is skipped (and written
    again when training reaches step N)."""
    found = sorted(
        ((int(m.group(1)), path) for path in Path(output).glob("checkpoint-*")
         if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))),
        reverse=True,
    )  # fmt: skip
    for _, path in found:
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning(
                "%s: skipping %s, whose save did not finish (no readable trainer_state.json)", output, path.name
            )
            continue
        return path, state
    return None, None


def train(cfg: TrainConfig, callbacks=None) -> Path:
    """Run one stage; returns the output directory (a `from_pretrained`-loadable checkpoint).

    The output folder has one writer: a second `unclutter train` into it is refused while the first lives (two
    would resume from the same checkpoint and overwrite each other's). Only global rank 0 locks it."""
    with main_process_lock(cfg.output, what="unclutter train", option="--output"):
        return _train(cfg, callbacks)


def zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage of ``cfg.deepspeed`` (0 without DeepSpeed), after checking what the final save needs.

    Under ZeRO-3 every rank holds a shard of each weight: the final checkpoint is the state dict the DeepSpeed engine
    gathers (``stage3_gather_16bit_weights_on_model_save`` must be on), and LoRA is refused (merging the adapters
    into sharded base weights is not what `merge_and_unload` does; ZeRO-2 keeps whole weights on every rank)."""
    if cfg.deepspeed is None:
        return 0
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ValueError(f"--deepspeed {cfg.deepspeed}: no such DeepSpeed config file.")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
        zero = ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"--deepspeed {cfg.deepspeed}: not a DeepSpeed JSON config ({exc}).") from None
    if stage == 3 and cfg.lora:
        raise ValueError(
            f"--deepspeed {cfg.deepspeed} is ZeRO-3, which shards the base weights that --lora merges its adapters "
            "into at the end; use configs/deepspeed/zero2.json for LoRA runs."
        )
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise ValueError(
            f"--deepspeed {cfg.deepspeed} is ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save"
            ": true, so no rank could write the trained weights whole; set it (configs/deepspeed/zero3.json does)."
        )
    return stage


def _train(cfg: TrainConfig, callbacks=None) -> Path:
    # checked before the model loads: transformers would fail later, naming no extra
    stage = zero_stage(cfg)
    if cfg.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f"--deepspeed {cfg.deepspeed}: DeepSpeed is not installed; pip install 'unclutter[deepspeed]' "
            "(or drop --deepspeed to train with plain DDP)."
        )
    if cfg.lora and importlib.util.find_spec("peft") is None:
        raise ValueError("--lora trains PEFT adapters, and PEFT is not installed: pip install 'unclutter[train]'.")
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 holds the lock and checks for the job
        _check_or_write_settings(Path(cfg.output), cfg)
    lr_default, _, fmt = STAGE_DEFAULTS[cfg.stage]
    fmt = cfg.prompt_format or fmt
    # the processes of a torchrun / accelerate / DeepSpeed job (every node's), or the GPUs that one process drives
    # (a launcher sets WORLD_SIZE, 1 included: a single torchrun process drives one GPU, not all it sees)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else max(torch.cuda.device_count(), 1)
    global_batch = cfg.global_batch
    per_device = min(cfg.per_device_batch_size, global_batch)
    if global_batch % (per_device * world):  # TrainConfig checked the per-device batch; here the devices count too
        raise ValueError(
            f"the global batch {global_batch} is not a multiple of {per_device} per device x {world} devices: "
            "gradient accumulation could not make it; choose sizes that divide."
        )
    accumulation = global_batch // (per_device * world)
    records = load_llava_json(cfg.data, cfg.images)  # every record validated before anything trains
    if any(r.get("image") for r in records) and cfg.images is None:
        raise DataError("the data has image samples: give --images.")
    # Seed before the model exists: a freshly assembled projector is initialised here, before the Trainer
    # would seed anything, and an unseeded init made two runs of the same config differ from the first step.
    set_seed(cfg.seed)
    model, processor = _load(cfg)
    configs = resolve(cfg.method, cfg.overrides)
    handle = apply(model, processor, **{k: v for k, v in configs.items() if v is not None})
    dataset = make_dataset(
        records, model, processor, cfg.images,
        fmt=fmt, image_tokens=handle.num_image_tokens, max_length=cfg.max_length,
        chat_template=getattr(processor, "chat_template", None),
    )  # fmt: skip
    tuned = cfg.tune or DEFAULT_TUNE[cfg.stage]
    loose = _freeze(model, tuned)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            # fully trained beside the adapters (and saved in every checkpoint): the other tuned parts
            modules_to_save=[{"projector": "multi_modal_projector", "vision": "vision_tower"}[name] for name in tuned
                             if name != "llm"],
        )  # fmt: skip
        model = get_peft_model(model, lora)
        for p in loose.values():  # PEFT froze all but the adapter and modules_to_save: image_newline is in neither
            p.requires_grad = True
    touch = _touch_image_path(model.get_base_model() if cfg.lora else model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    args = TrainingArguments(
        output_dir=cfg.output, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        learning_rate=lr_default if cfg.learning_rate is None else cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
        # only without any accelerator (CUDA, MPS, XPU...): also what lets bf16 autocast run on CPU
        use_cpu=not torch.accelerator.is_available(),
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed,
        deepspeed=cfg.deepspeed, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_workers, disable_tqdm=True,
    )  # fmt: skip
    pad_id = processor.tokenizer.pad_token_id
    order_fn = None
    if cfg.group_by_modality_length:
        lengths, group = dataset.lengths(), per_device * world * accumulation

        def order_fn(epoch: int) -> list[int]:
            return modality_length_order(lengths, group, cfg.seed + int(epoch))

    trainer = _LlavaTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator(dataset, pad_id),
        callbacks=callbacks, order_fn=order_fn, loose=loose if cfg.lora else None,
    )  # fmt: skip
    checkpoint, state = last_complete_checkpoint(cfg.output)
    if state is not None and state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]:
        # trained to the end already (a rerun, or a kill after the last checkpoint): Trainer would train one more step
        from transformers import TrainerState

        if stage == 3:  # loading a whole checkpoint into ZeRO-3's shards is DeepSpeed's resume path, not this one
            raise ValueError(
                f"{checkpoint} is this run's last step and only the final save is left, which under ZeRO-3 needs the "
                f"engine's gathered weights: delete {checkpoint} and rerun the same command (it resumes from the "
                "checkpoint before it and writes the output), or load that folder's gathered model.safetensors with "
                "from_pretrained."
            )

        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    main = trainer.is_world_process_zero()  # one writer: every rank holds the same weights, rank 0 saves them
    # ZeRO-3: each rank holds shards; the engine gathers the whole weights (every rank must take part) for rank 0 to
    # write, as Trainer.save_model does (save_pretrained of the sharded module would write empty tensors)
    gathered = trainer.accelerator.get_state_dict(trainer.model_wrapped) if stage == 3 else None
    if cfg.lora:
        if main:
            model.save_pretrained(Path(cfg.output) / "adapter")  # the trained delta alone (a few MB), for shipping
            if loose:
                save_loose(loose, Path(cfg.output) / "adapter")
        model = model.merge_and_unload()
    touch.remove()
    handle.remove()  # save the plain model; the configs travel in config.json
    model.config.unclutter = {"method": cfg.method, "overrides": list(cfg.overrides), "configs": to_dict(configs)}
    processor.tokenizer.padding_side = "left"
    if main:
        model.save_pretrained(cfg.output, safe_serialization=True, state_dict=gathered)
        processor.save_pretrained(cfg.output)
        history = [h for h in trainer.state.log_history if "loss" in h]
        summary = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
        log_path = Path(cfg.output) / "train_log.json"
        if not summary and log_path.is_file():  # a finished run, rerun: keep its summary
            try:
                summary = json.loads(log_path.read_text(encoding="utf-8")).get("summary", {})
            except ValueError:  # cut short (a kill, a full disk): its summary is lost, the rest is rewritten
                summary = {}
        # atomic: train_log.json marks a finished stage (mini.build skips it), so it is never left half written
        write_json_atomic(log_path, {"config": dataclasses.asdict(cfg), "log": history, "summary": summary})
    trainer.accelerator.wait_for_everyone()  # no rank returns (and reads the output) before it is written
    return Path(cfg.output)
