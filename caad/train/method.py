"""The interface between the trainer and a distillation method.

Changes (newest first; the interface is otherwise stable):

- A method's ``config_class`` may be declared in the method's own module: a ``@dataclass`` subclass
  of :class:`caad.config.TrainerConfig` whose fields use :func:`caad.config.config_field` (a default
  and a one-line help). A config file holds it under the top-level key ``section``; overrides set
  ``<section>.<key>=value``; ``caad train --method NAME --config FILE`` reads it (defaults when the
  file has no such section). Register the method in :data:`caad.methods.BUILTIN` (``name ->
  "module:Class"``) so that the CLI and config loading find it without importing it first.
- Optional hook :meth:`Method.fit_examples` (after the models are loaded, before anything is
  written): e.g. a token-length limit that needs the tokenizer. Default: the examples unchanged.
- Every :class:`TrainerConfig` has the model-loading options ``chat_template``, ``allow_pickle``,
  ``trust_remote_code``, ``low_memory``; ``ctx.load_frozen(path)`` applies them with the default
  loader; a custom ``loader`` still gets ``(path, dtype=..., device=...)`` only, and
  ``ctx.load_options`` holds them for a method to pass on. Every :class:`TrainerConfig` also has
  ``data_check``, ``min_seconds``, ``max_seconds``, ``decode_check``: the trainer checks every row and
  audio file of the manifests before anything is written; ``Method.required_fields`` names the
  fields every row must fill.

The trainer (:class:`caad.train.Trainer`) owns everything general: processes, the output folder,
the data order, the student's DeepSpeed engine, precision, gradient accumulation with the loss
normalised over the whole global batch, checkpoints and exact resume, interruption, validation,
metrics and plots. A :class:`Method` owns what makes it that method, and nothing else:

===========================  ====================================================================
``config_class``, section    its config section: a :class:`~caad.config.TrainerConfig` subclass with
                             the method's own fields (in its own module, or in :mod:`caad.config`)
``load_examples``            read and check a manifest (before anything is written)
``build_teachers``           its frozen teachers, any number (``ctx.load_frozen``: dtype, device,
                             ZeRO-3 inference when ``teacher_zero3``)
``extra_modules``            trainable modules besides the student (projections...): optimised and
                             checkpointed with the student, never saved as part of it
``build_batch``              a micro-batch from manifest rows (tokenised, on the device)
``num_items``                what the loss is a mean over (label tokens, answer rows...), per batch
``loss_step``                teacher forwards, the student forward, the loss = (sum over items) /
                             (items in the global batch), and named scalar components to log
``state_dict``               the method's own state, if any, for resume
===========================  ====================================================================

The trainer calls them in this order: ``load_examples`` (train, validation), ``build_teachers``,
``fit_examples`` (train, validation), ``extra_modules``, then per optimizer step ``build_batch`` and
``num_items`` for each micro-batch, and ``loss_step`` for each. The same ``loss_step`` gives the
validation loss (under ``no_grad``, in eval mode, ``step.training`` False). A method never touches
the engine, the optimizer or the output folder; the trainer never names a method.

Conventions:

- ``loss_step`` returns the micro-batch's share of the global mean: the sum of its per-item losses
  divided by ``step.num_items``, the item count of the whole accumulated batch over all ranks. The
  trainer undoes DeepSpeed's averaging over ranks, so the accumulated gradient is that of the mean
  over the global batch, whatever the padding, the micro-batch split or the number of ranks.
- The student runs through ``step.student(...)`` / ``step.run(fn, ...)`` (the engine), never by
  calling the module directly: under ZeRO-3 that is what gathers its parameters.
- Weights read outside a forward (``lm_head`` for the fused loss, projections applied by hand) are
  gathered with ``step.gathered(...)``; when the student's gradient must flow through them, call
  ``step.backward(loss)`` inside that block. If the method does not call it, the trainer runs the
  backward on the returned loss.
- Components are scalars (tensors or floats) already normalised like the loss, so that their sum
  over micro-batches and ranks is the global value; names ending in ``_loss`` are drawn in the loss
  plot. Compute them only when ``step.with_components`` (logging steps) if they cost extra.
- Randomness inside a batch (noise inputs...) derives from ``info.index``, unique per micro-batch of
  the run and identical after a resume.

Examples for the methods the issues plan (how they map on this interface):

- cross-modal ``t2t``/``s2t``: one text teacher (``ctx.load_frozen(path, loader=<text LM loader>)``);
  ``build_batch`` builds the teacher's text sequence and the student's text or audio sequence; the
  fused-linear op on the answer rows of each (target hidden states line up on the answer tokens).
- source-wise: two teachers from ``build_teachers``, one term each, their weights as components.
- layer-wise: ``extra_modules`` returns the projections; ``step.run(fn, batch)`` computes the
  student's mapped hidden states and projects them inside the engine.
- TinyWave: unit LMs through the loader argument; attention-map terms as further components.
- SALAD: each round is one trainer run (a new ``train_manifest``, the previous round's student);
  the rounds loop lives in the method's command, which calls :func:`caad.train.train` per round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from caad.config import TrainerConfig

__all__ = ["BatchInfo", "LossOutput", "Method", "SetupContext", "StepContext"]


@dataclass(frozen=True)
class BatchInfo:
    """Where a micro-batch sits in the run (for seeds and logging).

    ``split`` is ``"train"`` or ``"validation"``; ``step`` the 0-based optimizer step (the step at
    which validation runs, for ``"validation"``); ``micro`` the micro-step (the validation batch).
    """

    split: str
    step: int
    micro: int
    grad_accum: int
    rank: int
    world_size: int

    @property
    def index(self) -> int:
        """A number unique to this micro-batch and rank in the run's training (same after a resume).

        ``(step * grad_accum + micro) * world_size + rank``; validation batches count from ``-1``
        downwards, so they never collide with training ones.
        """
        if self.split == "validation":
            return -1 - (self.micro * self.world_size + self.rank)
        return (self.step * self.grad_accum + self.micro) * self.world_size + self.rank


@dataclass
class LossOutput:
    """What :meth:`Method.loss_step` returns.

    ``loss``: scalar tensor, this micro-batch's share of the global mean (module docstring), with
    the graph to the student's parameters in training. ``components``: named scalars to log (e.g.
    ``{"kd_loss": ..., "ce_loss": ...}``), normalised like ``loss``.
    """

    loss: torch.Tensor
    components: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class SetupContext:
    """What :meth:`Method.build_teachers` and :meth:`Method.extra_modules` may use.

    ``student``: the loaded student (unwrapped; under ZeRO-3 its parameters are partitioned, read
    shapes with ``ds_shape`` or the :class:`~caad.models.SpeechLM` properties). ``device``, ``dtype``:
    where and in what the models run. ``rank``, ``world_size``: this process in the job.
    ``load_frozen(path, loader=...)``: a frozen teacher in eval mode, in the run's dtype, on the
    device or as a ZeRO-3 inference engine (``teacher_zero3``); ``loader(path, *, dtype, device)``
    defaults to :func:`caad.models.load_speech_lm` (with ``load_options``); a custom loader gets
    ``(path, dtype=..., device=...)`` only.
    """

    student: nn.Module
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    load_frozen: Callable[..., nn.Module]
    #: the config's model-loading options (``chat_template``, ``allow_pickle``, ``trust_remote_code``,
    #: ``low_memory``) as keyword arguments of :func:`caad.models.load_speech_lm`; ``load_frozen``
    #: applies them with the default loader, a method passes what its own loader accepts.
    load_options: dict[str, Any] = field(default_factory=dict)


class StepContext:
    """What :meth:`Method.loss_step` may use for one micro-batch (built by the trainer).

    Attributes:
        model: the student module (unwrapped; for ``lm_head_weight`` and the like, read inside
            :meth:`gathered` under ZeRO-3).
        extra: the method's extra modules (``nn.ModuleDict``; empty if none).
        num_items: items of the whole accumulated batch over all ranks: the loss divisor.
        with_components: whether this step's components are logged (compute them then).
        training: ``False`` during validation (no backward, eval mode, ``no_grad``).
    """

    def __init__(
        self,
        engine: Any,
        *,
        num_items: int,
        with_components: bool,
        training: bool,
        backward: Callable[[torch.Tensor], None],
        gather: Callable[[Iterable[torch.Tensor | None]], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._engine = engine
        self.model: nn.Module = engine.module.student
        self.extra: nn.ModuleDict = engine.module.extra
        self.num_items = num_items
        self.with_components = with_components
        self.training = training
        self._backward = backward
        self._gather = gather
        self.backward_done = False

    def student(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward through the engine (``SpeechLM.forward``: packed target hidden states)."""
        return self._engine(*args, **kwargs)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(student, extra, *args, **kwargs)`` through the engine (for anything beyond ``forward``)."""
        return self._engine(*args, _call=fn, **kwargs)

    def gathered(self, *params: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
        """Gather ZeRO-3-partitioned parameters (student's or teachers') for the block; no-op otherwise."""
        return self._gather(params)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this micro-batch's loss (once; a no-op in validation)."""
        if self.backward_done:
            raise RuntimeError("StepContext.backward was called twice in one loss_step")
        self.backward_done = True
        if self.training:
            self._backward(loss)


class Method:
    """Base class of a distillation method (module docstring). Subclass it and register it with
    :func:`caad.methods.register_method`.

    Class attributes:
        name: the registry name (``caad train --method NAME``).
        section: the config section read by default (e.g. ``"stage2"`` for CAAD).
        config_class: that section's dataclass (a :class:`~caad.config.TrainerConfig` subclass).
        resume_keys: config keys a resumed run must keep (besides the trainer's ``lr`` and the data
            order); ``--force-resume`` accepts a change.
        checkpoint_keys: config keys that hold checkpoint folders (teachers); a resume also checks
            that their content did not change.
        required_fields: manifest fields every row must fill (e.g. ``("pseudo_gt",)``); the trainer's
            data check (:func:`caad.data.checks.check_training_data`, before anything is written)
            reports rows without them.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str] = ""
    config_class: ClassVar[type[TrainerConfig]] = TrainerConfig
    resume_keys: ClassVar[tuple[str, ...]] = ()
    checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    required_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainerConfig, section: str | None = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"method {self.name!r} needs a {self.config_class.__name__} config, got {type(config).__name__}"
            )
        self.config = config
        self.section_name = section or self.section

    def key(self, name: str) -> str:
        """The dotted config key of field ``name`` (for error messages)."""
        return f"{self.section_name}.{name}" if self.section_name else name

    def describe(self) -> str:
        """One line for the log (default: the method's name)."""
        return self.name

    # ---- 1. inputs: called before anything is written -------------------------------------------------

    def load_examples(self, path: str, key: str) -> Sequence[Any]:
        """The examples of manifest ``path`` (``key``: its config key, for errors).

        Default: the manifest's rows (:func:`caad.data.read_manifest`), which must not be empty.
        Check here everything that would otherwise fail mid-training.
        """
        from caad.data.manifest import ManifestError, read_manifest

        rows = read_manifest(path)
        if not rows:
            raise ManifestError(f"has no rows ({key})", path)
        return rows

    def fit_examples(self, examples: Sequence[Any], split: str, ctx: SetupContext) -> Sequence[Any]:
        """The examples to train (``split`` ``"train"``) or validate on, once the models are loaded
        (after :meth:`build_teachers`; nothing written yet): e.g. a token-length limit. Default: as is."""
        return examples

    # ---- 2. models ------------------------------------------------------------------------------------

    def student_loader(self) -> Callable[..., nn.Module] | None:
        """How the trainer loads ``student``: ``loader(path, *, dtype, device)`` (a custom loader gets no
        other option), or ``None`` (the default) for :func:`caad.models.load_speech_lm` with the config's
        model-loading options."""
        return None

    def build_teachers(self, ctx: SetupContext) -> None:
        """Load the method's frozen teachers (keep them on ``self``); default: none."""

    def extra_modules(self, ctx: SetupContext) -> dict[str, nn.Module]:
        """Trainable modules besides the student (optimised and checkpointed, not saved); default none."""
        return {}

    # ---- 3. one micro-batch ---------------------------------------------------------------------------

    def build_batch(self, examples: Sequence[Any], info: BatchInfo, device: torch.device) -> Any:
        """The model inputs of one micro-batch from its examples, on ``device``."""
        raise NotImplementedError

    def num_items(self, batch: Any) -> int:
        """What the loss of ``batch`` is a sum over (label tokens, answer rows...)."""
        raise NotImplementedError

    def num_tokens(self, batch: Any) -> int:
        """Real input tokens of ``batch`` for the throughput figure (default: :meth:`num_items`)."""
        return self.num_items(batch)

    def loss_step(self, batch: Any, step: StepContext) -> LossOutput:
        """Teacher forwards, the student forward (through ``step``), the loss and its components."""
        raise NotImplementedError

    # ---- 4. resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The method's own state to checkpoint (picklable); default none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when resuming."""
