"""Logit distillation in the Hugging Face ``Trainer``: :class:`ContrastiveKDTrainer` and its mixin.

::

    from caad_kernels.integrations.hf import ContrastiveKDTrainer

    trainer = ContrastiveKDTrainer(model=student, teacher_model=teacher, args=training_args,
                                   train_dataset=dataset, loss_options={"temperature": 2.0})
    trainer.train()

The student learns from the teacher's distribution on the same batch (``input_ids``,
``attention_mask``, ``labels``: the rows whose *shifted* label is not ``-100`` are distilled; a
``shift_labels`` key, when the collator gives one, is used as is). With ``negative_inputs`` (a
function from the batch to the teacher's text-only inputs) the teacher is contrastive:
``z_hat = z_pos + alpha (z_pos - z_neg)`` (CAAD). Options are those of
:func:`caad_kernels.fused_linear_contrastive_kd_loss` with *our* defaults (``alpha=1.0`` when a
negative path is given, ``temperature_scaling=True``); see ``docs/integrations.md`` for the mapping
to TRL's and Liger's names.

Correctness under data parallelism and gradient accumulation, the two things an overridden
``compute_loss`` usually gets wrong:

- **Forward through the wrapper.** The fused form (default) needs the student's final hidden
  states and its ``lm_head`` weight, not its logits. Calling the inner model
  (``unwrap_model(model).model(...)``) skips the DDP wrapper's forward, so the gradients are never
  all-reduced and the ranks drift apart. Here the whole student computation, backbone and loss,
  runs *as* the wrapped model's forward (:func:`~caad_kernels.integrations.redirect.forward_through`),
  so DDP, FSDP and DeepSpeed see a normal forward.
- **Loss scaling exactly as transformers' own loss path** (checked against transformers 5.24's
  ``Trainer.compute_loss``/``training_step``): the trainer counts the valid (shifted) label
  tokens of the whole accumulated batch, across ranks when ``average_tokens_across_devices``
  (the default), and passes it as ``num_items_in_batch``; the loss divides by it and is then
  multiplied by the number of processes (DDP averages gradients over ranks), and it is not
  divided again by the accumulation steps. So the gradient of one optimizer step is that of the
  mean over every valid token of the global batch, whatever the split over ranks and
  micro-batches. Without labels the loss is a per-micro-batch mean and transformers' default
  scaling applies. ``num_items_in_batch == 0`` (no valid token anywhere) gives a zero loss and
  zero gradients (the op's own definition).

The fused form reads the models' final-logit transforms from their configs
(:mod:`caad_kernels.integrations.model_config`: Cohere's ``logit_scale``, Granite's
``logits_scaling`` as ``1/x``, Gemma-2's ``final_logit_softcapping``, ...), and folds a PEFT
LoRA adapter on the ``lm_head`` into the weight or refuses it clearly
(:mod:`caad_kernels.integrations.lm_head`). The logits form (``fused=False``) runs the models
normally and needs neither (their logits carry the transforms and the adapters).

Mixed precision: the backbones and the fused loss run under the accelerator's autocast (as the
models' own forwards would); the loss's GEMMs then run in the autocast dtype, as for an
``nn.Linear``, and the weight gradient is summed in float32 and returned in the weight's dtype
(the op's dtype rules: ``caad_kernels.fused_linear``). Without autocast the op runs each GEMM in
its weight's dtype.

Hooks for models that do not fit the defaults (override them in a subclass):
:meth:`ContrastiveKDMixin.student_hidden_states`, :meth:`ContrastiveKDMixin.teacher_hidden_states`
(final hidden states ``[B, T, H]``, aligned with the student's positions) and
:meth:`ContrastiveKDMixin.model_inputs`.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import transformers
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "caad_kernels.integrations.hf needs transformers: pip install 'caad[integrations]' (or pip install "
        "transformers accelerate)"
    ) from error

from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels.contrastive_kd import KDLossOutput
from caad_kernels.integrations.lm_head import output_projection
from caad_kernels.integrations.model_config import logit_transform
from caad_kernels.integrations.redirect import forward_through
from caad_kernels.options import KDOptions

Batch = Mapping[str, Any]
#: Batch keys that belong to the loss, never passed to a model.
LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch")
_TRANSFORM_KEYS = ("student_logit_scale", "teacher_logit_scale", "student_softcap", "teacher_softcap")


def core_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside a PEFT wrapper (``get_base_model()``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module that returns the final (normed) hidden states: ``base_model`` of a ``*ForCausalLM``."""
    core = core_model(model)
    base = getattr(core, "base_model", None)
    if base is None or base is core:
        raise TypeError(
            f"cannot find the backbone of {type(core).__name__} (its base_model is itself): override "
            "student_hidden_states / teacher_hidden_states, or use the logits form (fused=False)"
        )
    return base


def _accepts(module: torch.nn.Module, name: str) -> bool:
    parameters = inspect.signature(module.forward).parameters
    return name in parameters or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def final_hidden_states(model: torch.nn.Module, inputs: Batch) -> torch.Tensor:
    """``backbone(model)(**inputs).last_hidden_state`` (``use_cache=False`` where accepted): ``[B, T, H]``."""
    body = backbone(model)
    kwargs = dict(inputs)
    if _accepts(body, "use_cache"):
        kwargs["use_cache"] = False
    output = body(**kwargs)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    return hidden


def _check_loss_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"loss_options must be a mapping of loss option -> value, got {type(options).__name__}")
    allowed = set(KDOptions.__dataclass_fields__)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"loss_options has unknown keys {unknown}; allowed: {sorted(allowed)}")
    if options.get("reduction", "mean") != "mean":
        raise ValueError(
            "loss_options['reduction'] must be 'mean' in a Trainer (the trainer divides by the number of valid "
            f"tokens of the global batch), got {options['reduction']!r}"
        )
    if isinstance(options.get("alpha"), torch.Tensor):
        raise TypeError("loss_options['alpha'] must be a number here (a per-row alpha tensor depends on the batch)")
    KDOptions(**options)  # validates every value now, before training starts
    return dict(options)


class ContrastiveKDMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) for logit distillation; see the module docstring.

    Keyword arguments (all others go to the trainer):
        teacher_model: the teacher ``nn.Module`` (a ``*ForCausalLM``-like model; its vocabulary
            may be larger than the student's, extra columns are dropped). It is put in eval mode,
            frozen, and placed by the accelerator like TRL's ``GKDTrainer`` does.
        loss_options: options of :func:`caad_kernels.fused_linear_contrastive_kd_loss`
            (``alpha``, ``temperature``, ``beta``, ``kd_weight``, ``ce_weight``,
            ``temperature_scaling``, ``plausibility``, ``ignore_index``, ``backend``, the logit
            scales and softcaps, ...); ``reduction`` must stay ``"mean"``. An explicit scale or
            softcap overrides the value read from the model's config (fused form); in the logits
            form it applies on top of the models' logits, which already carry their transform.
        fused: ``True`` (default): hidden states and ``lm_head`` weights in, no logits
            materialised. ``False``: the models' logits and :func:`caad_kernels.contrastive_kd_loss`.
        negative_inputs: ``None`` (plain KD) or a function ``batch -> teacher inputs`` for the
            text-only (negative) path of the contrastive teacher. Its hidden states (or logits)
            must have the positive path's ``[B, T]`` positions (e.g. left-pad the shorter
            text-only prompt to the same length); a mismatch raises.
        teacher_inputs, student_inputs: optional functions ``batch -> model inputs`` (default:
            the batch without ``labels``/``shift_labels``).
        chunk_size: rows per chunk of the fused op (``None``: its default).
    """

    def __init__(self, *args: Any, teacher_model: torch.nn.Module, loss_options: Mapping[str, Any] | None = None,
                 fused: bool = True, negative_inputs: Callable[[Batch], Batch] | None = None,
                 teacher_inputs: Callable[[Batch], Batch] | None = None,
                 student_inputs: Callable[[Batch], Batch] | None = None, chunk_size: int | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        for name, fn in (("negative_inputs", negative_inputs), ("teacher_inputs", teacher_inputs),
                         ("student_inputs", student_inputs)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable batch -> inputs or None, got {type(fn).__name__}")
        if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func cannot be combined with a distillation trainer (it computes the loss)")
        self.loss_options = _check_loss_options(loss_options)
        self.fused, self.chunk_size = fused, chunk_size
        self.negative_inputs, self.teacher_inputs, self.student_inputs = negative_inputs, teacher_inputs, student_inputs
        super().__init__(*args, **kwargs)
        # What makes transformers count `num_items_in_batch` (over the shifted labels) and treat the loss as
        # normalised by it, exactly as for a model that takes loss kwargs (Trainer.__init__/_get_num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.teacher_model = self._prepare_teacher(teacher_model)
        self._component_log: list[tuple[int, torch.Tensor]] = []

    # ---- set-up -----------------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher.eval()
        teacher.requires_grad_(False)
        if getattr(self, "is_deepspeed_enabled", False):
            return teacher.to(self.args.device)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ---- hooks ------------------------------------------------------------------------------------------------

    def model_inputs(self, inputs: Batch) -> dict[str, Any]:
        """The batch without the loss-only keys (:data:`LOSS_KEYS`)."""
        return {key: value for key, value in inputs.items() if key not in LOSS_KEYS}

    def student_hidden_states(self, student: torch.nn.Module, inputs: Batch) -> torch.Tensor:
        """Final hidden states ``[B, T, H_s]`` of the (unwrapped) student; runs inside the wrapper's forward."""
        return final_hidden_states(student, inputs)

    def teacher_hidden_states(self, teacher: torch.nn.Module, inputs: Batch) -> torch.Tensor:
        """Final hidden states ``[B, T, H_t]`` of the (unwrapped) teacher on one path."""
        return final_hidden_states(teacher, inputs)

    # ---- the loss ---------------------------------------------------------------------------------------------

    def _rows(self, inputs: Batch, length: int) -> tuple[slice, torch.Tensor | None, torch.Tensor | None]:
        """Which positions are rows (``slice``), their labels ``[B, R]`` and a row mask (no labels) or None."""
        if inputs.get("shift_labels") is not None:
            return slice(0, length), inputs["shift_labels"], None
        labels = inputs.get("labels")
        if labels is not None:
            return slice(0, length - 1), labels[:, 1:], None
        attention_mask = inputs.get("attention_mask")
        mask = None if attention_mask is None else attention_mask[:, 1:].bool()
        return slice(0, length - 1), None, mask

    def _label_args(self, labels: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, Any]:
        ignore_index = self.loss_options.get("ignore_index", -100)
        if labels is None:
            return {"labels": None, "mask": mask}
        if self.loss_options.get("ce_weight", 0.0) > 0:
            return {"labels": labels, "mask": mask}
        return {"labels": None, "mask": labels != ignore_index}

    def _teacher_paths(self, inputs: Batch, run: Callable[[torch.nn.Module, Batch], torch.Tensor]):
        teacher_batch = self.teacher_inputs(inputs) if self.teacher_inputs else self.model_inputs(inputs)
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            positive = forward_through(self.teacher_model, unwrapped, lambda b: run(unwrapped, b), teacher_batch)
            negative = None
            if self.negative_inputs is not None:
                negative_batch = self.negative_inputs(inputs)
                negative = forward_through(self.teacher_model, unwrapped, lambda b: run(unwrapped, b), negative_batch)
                if negative.shape[:-1] != positive.shape[:-1]:
                    raise ValueError(
                        f"the negative path gives {tuple(negative.shape[:-1])} positions, the positive path "
                        f"{tuple(positive.shape[:-1])}: negative_inputs must keep the positive path's [B, T] layout "
                        "(left-pad the text-only prompt), or override teacher_hidden_states to align them"
                    )
        return positive, negative

    def _autocast(self) -> contextlib.AbstractContextManager:
        autocast = getattr(self.accelerator, "autocast", None)
        return autocast() if callable(autocast) else contextlib.nullcontext()

    def _fused_loss(self, student: torch.nn.Module, inputs: Batch, num_items_in_batch: Any) -> KDLossOutput:
        student_batch = self.student_inputs(inputs) if self.student_inputs else self.model_inputs(inputs)
        with self._autocast():  # the backbones and the loss's GEMMs in the autocast dtype, as the models would
            hidden = self.student_hidden_states(student, student_batch)
            teacher_hidden, negative_hidden = self._teacher_paths(inputs, self.teacher_hidden_states)
            rows, labels, mask = self._rows(inputs, hidden.shape[1])
            teacher = core_model(self.accelerator.unwrap_model(self.teacher_model))
            student_core = core_model(student)
            weight, bias = output_projection(student_core.get_output_embeddings())
            teacher_weight, teacher_bias = output_projection(teacher.get_output_embeddings())
            options = {**logit_transform(student_core.config).as_student(),
                       **logit_transform(teacher.config).as_teacher(), **self.loss_options}
            return fused_linear_contrastive_kd_loss(
                hidden[:, rows], weight, teacher_hidden[:, rows], teacher_weight,
                None if negative_hidden is None else negative_hidden[:, rows], student_bias=bias,
                teacher_bias=teacher_bias, chunk_size=self.chunk_size, num_items_in_batch=num_items_in_batch,
                return_components=True, **self._label_args(labels, mask), **options,
            )

    def _logits_loss(self, model: torch.nn.Module, inputs: Batch, num_items_in_batch: Any) -> KDLossOutput:
        student_batch = self.student_inputs(inputs) if self.student_inputs else self.model_inputs(inputs)
        logits = model(**student_batch).logits
        teacher_logits, negative_logits = self._teacher_paths(inputs, lambda m, b: m(**b).logits)
        rows, labels, mask = self._rows(inputs, logits.shape[1])
        return contrastive_kd_loss(
            logits[:, rows], teacher_logits[:, rows],
            None if negative_logits is None else negative_logits[:, rows],
            num_items_in_batch=num_items_in_batch, return_components=True,
            **self._label_args(labels, mask), **self.loss_options,
        )

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The distillation loss of one micro-batch, scaled as transformers scales its own loss (module docstring)."""
        if self.fused:
            unwrapped = self.accelerator.unwrap_model(model)
            run = lambda batch: self._fused_loss(unwrapped, batch, num_items_in_batch)  # noqa: E731
            out = forward_through(model, unwrapped, run, inputs)
        else:
            out = self._logits_loss(model, inputs, num_items_in_batch)
        # transformers 5.24 Trainer.compute_loss, for a loss normalised by num_items_in_batch: DDP averages the
        # gradients over the ranks, so the per-rank loss is multiplied back by the number of data-parallel ranks.
        scale = 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu
        loss = out.loss * scale if scale != 1 else out.loss
        if model.training:
            # in the units of the `loss` transformers logs (it divides an unnormalised loss by the accumulation steps)
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            share = scale if num_items_in_batch is not None else 1 / steps
            components = torch.stack([out.kd_loss.detach(), out.ce_loss.detach()]).float() * share
            self._component_log.append((self.state.global_step, components))
        if return_outputs:
            return loss, {"kd_loss": out.kd_loss.detach(), "ce_loss": out.ce_loss.detach()}
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``kd_loss`` and ``ce_loss`` (``loss = kd_weight * kd_loss + ce_weight * ce_loss``, this rank's)."""
        if self._component_log and "loss" in logs:
            steps = len({step for step, _ in self._component_log})
            kd, ce = (torch.stack([c for _, c in self._component_log]).sum(dim=0) / steps).tolist()
            logs = {**logs, "kd_loss": kd, "ce_loss": ce}
            self._component_log.clear()
        return super().log(logs, *args, **kwargs)


class ContrastiveKDTrainer(ContrastiveKDMixin, transformers.Trainer):
    __doc__ = ContrastiveKDMixin.__doc__


__all__ = ["ContrastiveKDMixin", "ContrastiveKDTrainer", "backbone", "core_model", "final_hidden_states"]
