"""DeepSpeed engines for the student (training) and the teacher (ZeRO-3 inference), and the LR schedule."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from caad.config import TrainConfig
from caad.models import SpeechLM, load_speech_lm

__all__ = [
    "build_student_engine",
    "build_teacher",
    "deepspeed_config",
    "gathered_lm_heads",
    "lr_lambda",
    "model_dtype",
    "register_external_parameters",
    "save_student",
]


def model_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the models run in: bfloat16 with ``precision: bf16``, else float32."""
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def deepspeed_config(
    config: TrainConfig, *, zero_stage: int | None = None, train: bool = True
) -> dict[str, Any]:
    """The DeepSpeed config dict for the student (``train``) or the ZeRO-3 teacher (inference)."""
    stage = config.zero_stage if zero_stage is None else zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # save_pretrained of the student needs the full weights gathered on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum if train else 1,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train and config.max_grad_norm > 0:
        out["gradient_clipping"] = config.max_grad_norm
    return out


def lr_lambda(config: TrainConfig, total_steps: int):
    """The learning-rate multiplier of optimizer step ``s`` (0-based): linear warm-up, then the schedule.

    Warm-up: ``warmup_steps`` (or ``warmup_ratio x total_steps``) steps rising linearly to 1 (step
    ``s`` gets ``(s + 1) / (W + 1)``); then ``cosine`` or ``linear`` decay towards ``min_lr_ratio``
    (reached just after the last step, so that no step is taken at the floor), or ``constant``.
    """
    warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)
    floor = config.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        if config.scheduler == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def _load(path: str, dtype: torch.dtype | None, ds_config: dict[str, Any] | None) -> SpeechLM:
    """Load a checkpoint; with a ZeRO-3 ``ds_config`` its weights are partitioned while loading.

    Partitioned loading (``zero.Init`` inside ``from_pretrained``) goes through transformers'
    ``HfDeepSpeedConfig``, which needs the ``accelerate`` package; without it every rank first
    loads the whole model and ``deepspeed.initialize`` partitions it afterwards (fine for models
    that fit in each rank's host memory).
    """
    if ds_config is None or importlib.util.find_spec("accelerate") is None:
        return load_speech_lm(path, dtype=dtype)
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained builds the model under zero.Init
    try:
        return load_speech_lm(path, dtype=dtype)
    finally:
        del keep_alive


def register_external_parameters(model: torch.nn.Module) -> int:
    """Tell ZeRO-3 about weights that a module reads from a child without calling the child.

    ZeRO-3 gathers a module's parameters when that module's ``forward`` runs. Qwen2-Audio's
    encoder reads ``self.embed_positions.weight`` directly (the ``nn.Embedding`` is never called), so
    under ZeRO-3 it would see an empty partition; registering the weight as an external parameter of
    the parent gathers it with the parent. Returns how many weights were registered.
    """
    import deepspeed

    count = 0
    for module in model.modules():
        child = getattr(module, "embed_positions", None)
        if isinstance(child, torch.nn.Embedding):
            deepspeed.zero.register_external_parameter(module, child.weight)
            count += 1
    return count


def build_student_engine(config: TrainConfig, total_steps: int) -> tuple[Any, torch.optim.Optimizer, Any]:
    """Load the student and wrap it: ``(engine, optimizer, lr_scheduler)``.

    The optimizer is a client ``torch.optim.AdamW`` (DeepSpeed's fused Adam needs CUDA), the
    schedule a ``LambdaLR`` (:func:`lr_lambda`) that the engine steps at each optimizer step.
    """
    import deepspeed

    ds_config = deepspeed_config(config)
    student = _load(config.student, None, ds_config if config.zero_stage == 3 else None)
    student.train()
    if config.zero_stage == 3:
        register_external_parameters(student)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def build_teacher(config: TrainConfig, device: torch.device) -> SpeechLM | None:
    """The frozen teacher in eval mode (``None`` when ``kd_weight`` is 0).

    With ``teacher_zero3`` it is wrapped in a DeepSpeed ZeRO-3 engine with no optimizer (its
    parameters partitioned across ranks, gathered layer by layer in the forward) and the module is
    returned; otherwise the whole teacher lives on every rank in the run's dtype.
    """
    if not config.needs_teacher:
        return None
    dtype = model_dtype(config)
    if not config.teacher_zero3:
        teacher = load_speech_lm(config.teacher, dtype=dtype, device=device)
        teacher.requires_grad_(False)
        return teacher.eval()
    import deepspeed

    ds_config = deepspeed_config(config, zero_stage=3, train=False)
    teacher = _load(config.teacher, dtype, ds_config)
    teacher.requires_grad_(False)
    register_external_parameters(teacher)
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine.module


@contextlib.contextmanager
def gathered_lm_heads(*models: SpeechLM | None) -> Iterator[None]:
    """Gather the ``lm_head`` weight and bias of each model partitioned by ZeRO-3 (no-op otherwise).

    The student's backward must run inside, so that its ``lm_head`` gradient reaches its partition.
    """
    import deepspeed

    params = []
    for model in models:
        if model is not None:
            params.append(model.lm_head_weight)
            if model.lm_head_bias is not None:
                params.append(model.lm_head_bias)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_student(engine: Any, path: str | os.PathLike[str], *, is_main: bool) -> None:
    """Write the student in ``save_pretrained`` form (weights, config, tokenizer, feature extractor).

    Every rank must call it (ZeRO-3 gathers the weights); rank 0 writes into a temporary folder that
    is renamed into place, so ``path`` never holds a half-written model.
    """
    state_dict = None
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
        if is_main:
            # keys of the SpeechLM wrapper start with "model."; the HF model's own keys do not
            state_dict = {k.removeprefix("model."): v for k, v in full.items()}
    if not is_main:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    module: SpeechLM = engine.module
    if state_dict is None:
        module.save_pretrained(tmp)
    else:
        module.save_pretrained(tmp, state_dict=state_dict)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
