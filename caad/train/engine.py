"""DeepSpeed engines: the student's training engine (with a method's extra modules), frozen teachers
(optionally ZeRO-3 inference engines), partitioned loading, the LR schedule, saving the student.

What the engine trains is a :class:`TrainModule`: ``student`` (a :class:`~caad.models.SpeechLM`) and
``extra`` (an ``nn.ModuleDict`` of the method's trainable modules, e.g. layer-wise projections). Both
are in the optimizer and in every checkpoint (so a resumed run continues them); only ``student`` is
saved as the trained model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caad.config import TrainerConfig
from caad.models import SpeechLM, load_speech_lm

__all__ = [
    "ModelLoader",
    "TrainModule",
    "align_requires_grad",
    "build_engine",
    "deepspeed_config",
    "gathered_lm_heads",
    "gathered_parameters",
    "global_grad_norm",
    "load_frozen",
    "load_model",
    "lr_lambda",
    "model_dtype",
    "partitioned_loading_available",
    "register_external_parameters",
    "save_student",
]

#: ``loader(path, dtype=..., device=...) -> nn.Module``: how a checkpoint folder becomes a model
#: (:func:`caad.models.load_speech_lm` by default; a method may pass a text-LM loader for its teachers).
ModelLoader = Callable[..., nn.Module]


def model_dtype(config: TrainerConfig) -> torch.dtype:
    """The dtype the models run in: bfloat16 with ``precision: bf16``, else float32."""
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def _offload(device: str, config: TrainerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"device": device, "pin_memory": torch.cuda.is_available()}
    if device == "nvme":
        out["nvme_path"] = config.offload_nvme_path
    return out


def deepspeed_config(config: TrainerConfig, *, zero_stage: int | None = None, train: bool = True) -> dict[str, Any]:
    """The DeepSpeed config dict for the student (``train``) or a ZeRO-3 teacher (inference).

    ``offload_optimizer`` (student only) and ``offload_param`` (ZeRO-3 only, teachers too) become
    ZeRO's ``offload_optimizer`` / ``offload_param`` blocks (``device`` cpu or nvme).
    """
    stage = config.zero_stage if zero_stage is None else zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # save_pretrained of the student needs the full weights gathered on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if config.offload_param != "none":
            zero["offload_param"] = _offload(config.offload_param, config)
    if train and config.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(config.offload_optimizer, config)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum if train else 1,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train and config.offload_optimizer != "none" and not torch.cuda.is_available():
        # no DeepSpeed CPU Adam build on CPU-only machines: the client torch AdamW steps on the host
        out["zero_force_ds_cpu_optimizer"] = False
    if train and config.max_grad_norm > 0:
        out["gradient_clipping"] = config.max_grad_norm
    return out


def lr_lambda(config: TrainerConfig, total_steps: int) -> Callable[[int], float]:
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


# ---- loading ----------------------------------------------------------------------------------------


def partitioned_loading_available() -> bool:
    """Whether ZeRO-3 models can be partitioned while they load (transformers needs ``accelerate``)."""
    return importlib.util.find_spec("accelerate") is not None


def load_model(
    path: str,
    *,
    dtype: torch.dtype | None,
    ds_config: dict[str, Any] | None = None,
    device: torch.device | None = None,
    loader: ModelLoader = load_speech_lm,
    **options: Any,
) -> nn.Module:
    """Load a checkpoint; with a ZeRO-3 ``ds_config`` its weights are partitioned while loading.

    ``options`` go to ``loader`` (e.g. ``chat_template``, ``allow_pickle`` of :func:`load_speech_lm`).

    Partitioned loading (``zero.Init`` inside ``from_pretrained``, through transformers'
    ``HfDeepSpeedConfig``) means no rank ever holds the whole model in host memory: each parameter is
    materialised once, copied from the checkpoint, and cut into its rank's partition. It needs the
    ``accelerate`` package; without it every rank first loads the whole model and
    ``deepspeed.initialize`` partitions it afterwards (fine for models that fit in each rank's memory).
    ``device`` is used only without ``ds_config`` (ZeRO places partitions itself).
    """
    if ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        return loader(path, dtype=dtype, device=device, **options)
    if not partitioned_loading_available():
        return loader(path, dtype=dtype, **options)
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained builds the model under zero.Init
    try:
        return loader(path, dtype=dtype, **options)
    finally:
        del keep_alive


def align_requires_grad(model: nn.Module) -> list[str]:
    """Freeze the parameters the model's own class freezes; returns their names.

    transformers' ``from_pretrained`` re-creates every loaded parameter with ``requires_grad=True``
    (so Whisper's fixed sinusoidal ``embed_positions``, frozen in ``WhisperEncoder.__init__``, comes
    back trainable), except under ZeRO-3's ``zero.Init``, which keeps the constructor's flag. Taking
    the flags from a fresh construction of the same class (on the ``meta`` device: no memory) makes
    the trainable set the same for every ZeRO stage and every loading path. Parameters the loader
    froze stay frozen. ``model`` is a :class:`SpeechLM` or a Hugging Face ``PreTrainedModel``.
    """
    inner = model.model if isinstance(model, SpeechLM) else model
    config = getattr(inner, "config", None)
    if config is None:
        return []
    with torch.device("meta"):
        fresh = type(inner)(copy.deepcopy(config))
    frozen = {name for name, parameter in fresh.named_parameters() if not parameter.requires_grad}
    changed = []
    for name, parameter in inner.named_parameters():
        if name in frozen and parameter.requires_grad:
            parameter.requires_grad_(False)
            changed.append(name)
    return changed


def register_external_parameters(model: nn.Module) -> int:
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
        if isinstance(child, nn.Embedding):
            deepspeed.zero.register_external_parameter(module, child.weight)
            count += 1
    return count


def load_frozen(
    path: str, config: TrainerConfig, device: torch.device, *, loader: ModelLoader = load_speech_lm, **options: Any
) -> nn.Module:
    """A frozen model in eval mode in the run's dtype (a method's teacher); ``options`` go to ``loader``.

    With ``teacher_zero3`` it is wrapped in a DeepSpeed ZeRO-3 engine with no optimizer (parameters
    partitioned across ranks while loading, gathered layer by layer in the forward; ``offload_param``
    applies) and the module is returned; otherwise the whole model lives on every rank.
    """
    dtype = model_dtype(config)
    if not config.teacher_zero3:
        model = load_model(path, dtype=dtype, device=device, loader=loader, **options)
        model.requires_grad_(False)
        return model.eval()
    import deepspeed

    ds_config = deepspeed_config(config, zero_stage=3, train=False)
    model = load_model(path, dtype=dtype, ds_config=ds_config, loader=loader, **options)
    model.requires_grad_(False)
    register_external_parameters(model)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine.module


# ---- the training engine ----------------------------------------------------------------------------


class TrainModule(nn.Module):
    """What the engine trains: ``student`` and the method's ``extra`` modules (an ``nn.ModuleDict``).

    ``forward(*args)`` runs the student; ``forward(*args, _call=fn)`` runs ``fn(student, extra, *args)``,
    so that a method's own student computation (intermediate layers, projections) goes through the
    engine, where ZeRO-3 gathers the parameters it needs.
    """

    def __init__(self, student: SpeechLM, extra: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.student = student
        self.extra = nn.ModuleDict(extra or {})

    def forward(self, *args: Any, _call: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        if _call is None:
            return self.student(*args, **kwargs)
        return _call(self.student, self.extra, *args, **kwargs)


def _optimizer(config: TrainerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's CPU Adam when the optimizer is offloaded on a GPU machine, else torch's."""
    kwargs = dict(lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay)
    if config.offload_optimizer != "none" and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_engine(
    module: TrainModule, config: TrainerConfig, total_steps: int
) -> tuple[Any, torch.optim.Optimizer, Any]:
    """Wrap the student and extra modules in a DeepSpeed engine: ``(engine, optimizer, lr_scheduler)``.

    Every parameter with ``requires_grad`` is optimised with AdamW (one group, the config's
    hyperparameters); the schedule is a ``LambdaLR`` (:func:`lr_lambda`) that the engine steps at each
    optimizer step.
    """
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter of the student and the extra modules is frozen")
    optimizer = _optimizer(config, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config)
    )
    return engine, optimizer, scheduler


@contextlib.contextmanager
def gathered_parameters(params: Iterable[torch.Tensor | None]) -> Iterator[None]:
    """Gather parameters partitioned by ZeRO-3 for the block (no-op for others).

    A backward that must reach the partitions (the student's gradients) runs inside the block.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if p is not None], modifier_rank=None):
        yield


def gathered_lm_heads(*models: SpeechLM | None) -> contextlib.AbstractContextManager[None]:
    """:func:`gathered_parameters` of each model's ``lm_head`` weight and bias (``None`` models skipped)."""
    params: list[torch.Tensor | None] = []
    for model in models:
        if model is not None:
            params += [model.lm_head_weight, model.lm_head_bias]
    return gathered_parameters(params)


def global_grad_norm(module: nn.Module) -> float:
    """The L2 norm of all gradients of ``module`` (ZeRO-0 / 1 rank: DeepSpeed does not report it)."""
    squares = [p.grad.detach().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    if not squares:
        return 0.0
    return float(torch.stack(squares).sum().sqrt())


def save_student(engine: Any, path: str | os.PathLike[str], *, is_main: bool) -> None:
    """Write the student (not the extra modules) in ``save_pretrained`` form (weights, config, tokenizer).

    Every rank must call it (ZeRO-3 gathers the weights); rank 0 writes into a temporary folder that
    is renamed into place, so ``path`` never holds a half-written model.
    """
    state_dict = None
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
        if is_main:
            # keys are "student.model.<the HF model's own key>" (and "extra.*", not saved)
            prefix = "student.model."
            state_dict = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    if not is_main:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    student: SpeechLM = engine.module.student
    if state_dict is None:
        student.save_pretrained(tmp)
    else:
        student.save_pretrained(tmp, state_dict=state_dict)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
