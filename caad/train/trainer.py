"""The method-agnostic trainer: one training run of any :class:`~caad.train.method.Method` on DeepSpeed ZeRO.

Read top to bottom, :meth:`Trainer.run` is the algorithm:

1. inputs, checked before anything is written: the config; the output folder (an earlier run is
   refused unless ``overwrite`` or ``--resume``; a resumed run must keep its data order, learning
   rate and the method's key settings); the train and validation examples (``method.load_examples``);
2. the models and the data, still before anything is written: the student (the config's loading
   options: chat template, safetensors only...; partitioned while it loads under ZeRO-3, its
   trainable set as its class declares it, its training plan, gradient checkpointing); every row and
   audio file of the manifests checked (``data_check``: all problems listed at once; clips over the
   student's audio window counted); the method's frozen teachers, its ``fit_examples`` (e.g. a token
   limit) and extra trainable modules; the data order; the DeepSpeed engine (ZeRO 0-3, offload,
   AdamW, LR schedule);
3. the output folder: created, or the earlier run replaced - only now, when the new run can start;
   with ``--resume``, the last checkpoint (engine, optimizer, schedule, RNG, method state) loaded;
4. for each optimizer step:
   a. this rank's micro-batches (``method.build_batch`` on the step's examples);
   b. the items of the whole accumulated batch over every rank (``method.num_items``): the divisor N;
   c. per micro-batch ``method.loss_step`` (teachers, student, loss = sum / N) and its backward,
      multiplied by the world size to undo DeepSpeed's average over ranks; ``engine.step()`` after
      each (the update, clipping and LR schedule happen at the accumulation boundary);
   d. log loss, components, LR, gradient norm and throughput; the validation loss every
      ``eval_every`` steps; a checkpoint every ``save_every`` steps; on SIGINT/SIGTERM a checkpoint,
      then stop (:class:`~caad.train.interrupt.TrainingInterrupted`);
5. the final checkpoint, the student (``save_pretrained`` form, without the extra modules), the plot.

Loss normalisation: with ``N`` items in the whole accumulated batch over all ranks, each
micro-batch's loss is ``sum over its items / N``, so the accumulated gradient is that of the mean over
the global batch whatever the padding, micro-batch split or rank count; the reported loss is the
all-reduced sum (the true mean).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caad.cli import UserError
from caad.config import TrainerConfig
from caad.models import load_speech_lm
from caad.train.checkpoint import (
    SETTING_KEYS,
    checkpoint_fingerprint,
    read_json,
    resume_conflicts,
    rng_state,
    set_rng_state,
    tag,
)
from caad.train.distributed import all_reduce_max, all_reduce_sum, barrier, broadcast_object, init_distributed
from caad.train.engine import (
    TrainModule,
    align_requires_grad,
    build_engine,
    deepspeed_config,
    gathered_parameters,
    global_grad_norm,
    load_frozen,
    load_model,
    model_dtype,
    register_external_parameters,
    save_student,
)
from caad.train.interrupt import Interruption, TrainingInterrupted
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext
from caad.train.metrics import MetricsLogger, plot_losses, truncate_metrics
from caad.train.outputs import check_output_dir, prepare_output_dir
from caad.train.plan import StepPlan, validation_shards

__all__ = ["TrainResult", "Trainer", "train"]

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"


@dataclass
class TrainResult:
    """Where a run's products are, and its last logged metrics."""

    output_dir: Path
    final_model: Path
    metrics: Path
    plot: Path | None
    steps: int
    last: dict[str, Any]


def train(
    method: Method | str,
    config: TrainerConfig | None = None,
    *,
    section: str | None = None,
    resume: bool = False,
    force_resume: bool = False,
    name: str | None = None,
) -> TrainResult:
    """Run one training: ``method`` a :class:`Method`, or a registered name with its ``config`` section.

    ``section`` names the config section the settings came from (error messages name its keys;
    default: the method's own). ``resume`` continues the run in ``output_dir`` from its last
    checkpoint; ``force_resume`` also accepts a changed learning rate or method setting.
    """
    if isinstance(method, str):
        from caad.methods import get_method

        if config is None:
            raise TypeError("train(): a method name needs its config")
        method = get_method(method)(config, section)
    elif config is not None or section is not None:
        raise TypeError("train(): pass config and section to the Method, not here")
    return Trainer(method, resume=resume or force_resume, force_resume=force_resume, name=name).run()


class Trainer:
    """One training run of ``method`` (module docstring). Checks the config when constructed."""

    def __init__(
        self, method: Method, *, resume: bool = False, force_resume: bool = False, name: str | None = None
    ) -> None:
        self.method = method
        self.config: TrainerConfig = method.config
        self.section = method.section_name
        self.config.validate(self.section)
        self.config.check_paths(self.section)
        self.resume = resume
        self.force_resume = force_resume
        self.name = name or method.describe()
        self.output_dir = Path(self.config.output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINTS
        # refuse an earlier run's folder before anything is loaded (read-only)
        self.action = check_output_dir(
            self.output_dir, overwrite=self.config.overwrite, resume=resume, key=self._key("output_dir")
        )

    def _key(self, name: str) -> str:
        return self.method.key(name)

    # ---- the recipe -------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, method = self.config, self.method
        # 1. processes and inputs (nothing written yet)
        self.dist = init_distributed()
        if self.action == "resume":
            self._check_resume()
        _seed_everything(cfg.seed + self.dist.rank)
        self.examples = method.load_examples(cfg.train_manifest, self._key("train_manifest"))
        self.validation = (
            method.load_examples(cfg.validation_manifest, self._key("validation_manifest"))
            if cfg.validation_manifest is not None
            else None
        )

        # 2. models: the student, the method's teachers and extra modules, the engine (nothing written yet)
        self.dtype = model_dtype(cfg)
        student = self._load_student()
        self._check_data(student)
        setup = SetupContext(
            student=student,
            device=self.dist.device,
            dtype=self.dtype,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            load_frozen=self._load_frozen,
            load_options=self._load_options(),
        )
        method.build_teachers(setup)
        self.examples = method.fit_examples(self.examples, "train", setup)
        if self.validation is not None:
            self.validation = method.fit_examples(self.validation, "validation", setup)
        self.plan = self._step_plan()
        total_steps = self.plan.total_steps
        extra = method.extra_modules(setup)
        self.engine, self.optimizer, self.scheduler = build_engine(TrainModule(student, extra), cfg, total_steps)

        # 3. the output folder, only now that the run can start; resume
        barrier()
        self._prepare_output()
        start_step = self._load_checkpoint() if self.resume else 0

        # 4. the optimizer steps
        logger = MetricsLogger(self.output_dir / METRICS, tensorboard=cfg.tensorboard) if self.dist.is_main else None
        bar = self._progress_bar(start_step, total_steps)
        last: dict[str, Any] = {}
        try:
            with Interruption(self.name) as interruption:
                for step in range(start_step, total_steps):
                    with_components = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
                    last = self._train_step(step, with_components)
                    if self._validation_due(step + 1, total_steps):
                        last.update(self._validate(step))
                    if logger is not None and (with_components or "val_loss" in last):
                        logger.log(last if with_components else {"step": last["step"], **_validation_only(last)})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                    signal_number = int(all_reduce_max(interruption.requested, self.dist.device))
                    if step + 1 < total_steps and (signal_number or _due(step + 1, cfg.save_every)):
                        self._save_checkpoint(step + 1)
                    if signal_number and step + 1 < total_steps:
                        hint = (
                            f"caad train --method {method.name} --section {self.section} "
                            f"--config {self.output_dir / 'config.yaml'} --resume"
                        )
                        raise TrainingInterrupted(
                            signal_number, step + 1, str(self.checkpoint_dir / tag(step + 1)), hint
                        )
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()

        # 5. final checkpoint, the student, the plot
        if start_step < total_steps:
            self._save_checkpoint(total_steps, with_student=False)  # the student goes to final/
        final = self.output_dir / FINAL
        save_student(self.engine, final, is_main=self.dist.is_main)
        plot = None
        if self.dist.is_main:
            plot = plot_losses(self.output_dir / METRICS, self.output_dir / PLOT, title=self.name)
        barrier()
        return TrainResult(self.output_dir, final, self.output_dir / METRICS, plot, total_steps, last)

    # ---- one optimizer step -----------------------------------------------------------------------------

    def _train_step(self, step: int, with_components: bool) -> dict[str, Any]:
        """Steps 4a-c for optimizer step ``step`` (0-based); returns its metrics record."""
        started = time.perf_counter()
        method, device = self.method, self.dist.device
        batches = [  # a
            method.build_batch([self.examples[i] for i in indices], self._info("train", step, micro), device)
            for micro, indices in enumerate(self.plan.micro_batches(step))
        ]
        num_items = int(all_reduce_sum(sum(method.num_items(b) for b in batches), device))  # b
        if num_items == 0:
            raise ValueError(f"optimizer step {step + 1}: the batch has no items to learn from (all labels empty)")
        lr = self.scheduler.get_last_lr()[0]  # the LR of this step (the engine steps the schedule)
        outputs, grad_norm = [], None
        for micro, batch in enumerate(batches):  # c
            context = self._step_context(num_items, with_components, training=True)
            out = method.loss_step(batch, context)
            if not context.backward_done:
                context.backward(out.loss)
            if micro == len(batches) - 1 and self.engine.zero_optimization_stage() == 0:
                grad_norm = global_grad_norm(self.engine.module)  # DeepSpeed reports none at ZeRO-0
            self.engine.step()
            outputs.append(out)
        names, totals = self._reduce(outputs)
        tokens = int(all_reduce_sum(sum(method.num_tokens(b) for b in batches), device))
        elapsed = time.perf_counter() - started
        record: dict[str, Any] = {
            "step": step + 1,
            "epoch": self.plan.epoch_of(step),
            "loss": float(totals[0]),
            **{k: (float(v) if with_components else None) for k, v in zip(names, totals[1:])},
            "lr": lr,
            "items": num_items,
            "tokens": tokens,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "step_time_s": elapsed,
        }
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            grad_norm = float(reported)
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def _step_context(self, num_items: int, with_components: bool, training: bool) -> StepContext:
        return StepContext(
            self.engine,
            num_items=num_items,
            with_components=with_components,
            training=training,
            backward=self._backward,
            gather=gathered_parameters,
        )

    def _backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks: undo it, the divisor N already spans them
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def _info(self, split: str, step: int, micro: int) -> BatchInfo:
        return BatchInfo(split, step, micro, self.config.grad_accum, self.dist.rank, self.dist.world_size)

    def _reduce(self, outputs: list[LossOutput], weights: list[bool] | None = None) -> tuple[list[str], torch.Tensor]:
        """Component names and ``[loss, *components]`` summed over micro-batches (``weights``: which count)
        and ranks. Every rank must produce the same names (a method's components are fixed)."""
        names = sorted({name for out in outputs for name in out.components})
        sums = torch.zeros(1 + len(names), dtype=torch.float64)
        for index, out in enumerate(outputs):
            if weights is not None and not weights[index]:
                continue
            sums[0] += float(out.loss.detach())
            for j, name in enumerate(names, start=1):
                value = out.components.get(name)
                sums[j] += float(value.detach() if isinstance(value, torch.Tensor) else (value or 0.0))
        return names, all_reduce_sum(sums.to(self.dist.device), self.dist.device).cpu()

    # ---- validation ---------------------------------------------------------------------------------------

    def _validation_due(self, done: int, total: int) -> bool:
        return self.validation is not None and (_due(done, self.config.eval_every) or done == total)

    def _validate(self, step: int) -> dict[str, float]:
        """The validation loss (and components): sums over every validation item / their count.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank
        without examples left runs one on the first example and drops it. The training RNG state is
        kept as it was, so validating does not change the training run.
        """
        assert self.validation is not None
        saved = rng_state()
        self.engine.eval()
        outputs, real, items = [], [], 0
        shards = validation_shards(len(self.validation), self.config.batch_size, self.dist.world_size, self.dist.rank)
        with torch.no_grad():
            for micro, indices in enumerate(shards):
                examples = [self.validation[i] for i in (indices or [0])]
                batch = self.method.build_batch(examples, self._info("validation", step, micro), self.dist.device)
                # num_items=1: the loss step returns sums; divided by the global count below
                outputs.append(self.method.loss_step(batch, self._step_context(1, True, training=False)))
                real.append(bool(indices))
                items += self.method.num_items(batch) if indices else 0
        self.engine.train()
        set_rng_state(saved)
        names, totals = self._reduce(outputs, real)
        count = max(1.0, float(all_reduce_sum(items, self.dist.device)))
        record = {"val_loss": float(totals[0]) / count}
        record.update({f"val_{name}": float(value) / count for name, value in zip(names, totals[1:])})
        return record

    # ---- setup helpers ------------------------------------------------------------------------------------

    def _step_plan(self) -> StepPlan:
        cfg = self.config
        plan = StepPlan(
            num_examples=len(self.examples),
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=cfg.seed,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
        )
        if plan.steps_per_epoch == 0:
            raise UserError(
                f"{self._key('train_manifest')} {cfg.train_manifest} has {len(self.examples)} examples, "
                f"fewer than one optimizer step needs (batch_size {cfg.batch_size} x "
                f"{self.dist.world_size} ranks x grad_accum {cfg.grad_accum} = {plan.global_batch}); "
                "lower batch_size or grad_accum"
            )
        return plan

    def _load_options(self) -> dict[str, Any]:
        """The config's model-loading options, as keyword arguments of :func:`caad.models.load_speech_lm`."""
        cfg = self.config
        return {
            "chat_template": cfg.chat_template,
            "allow_pickle": cfg.allow_pickle,
            "trust_remote_code": cfg.trust_remote_code,
            "low_memory": cfg.low_memory,
        }

    def _check_data(self, student: Any) -> None:
        """Every row and audio file of the manifests (``data_check``), before anything is written.

        Errors (missing or corrupt files, clips too short, rows without the method's required fields)
        stop the run with one message listing them; clips longer than the student's audio window are
        counted (they are cut to it, as the Qwen2-Audio processor does). Rank 0 reads the files; its
        verdict is raised on every rank.
        """
        cfg = self.config
        if not cfg.data_check:
            return
        from caad.data.checks import DataCheckError, check_training_data
        from caad.models import SAMPLING_RATE

        samples = getattr(student, "max_audio_samples", None)
        window = None if samples is None else samples / SAMPLING_RATE
        error, notes = None, []
        if self.dist.is_main:
            for key in ("train_manifest", "validation_manifest"):
                path = getattr(cfg, key)
                if path is None:
                    continue
                try:
                    report = check_training_data(
                        path,
                        window_seconds=window,
                        require=tuple(self.method.required_fields),
                        min_seconds=cfg.min_seconds,
                        max_seconds=cfg.max_seconds,
                        decode=cfg.decode_check,
                    )
                except (DataCheckError, FileNotFoundError, ValueError) as caught:
                    error = f"{self._key(key)}: {caught}"
                    break
                if report.num_truncated or report.warnings:
                    notes.append(f"{self._key(key)}: {report.summary(max_shown=5)}")
        error = broadcast_object(error)
        if error is not None:
            raise UserError(error)
        for note in notes:
            print(f"{self.name}: {note}", flush=True)

    def _load_student(self) -> Any:
        """The student in training mode: partitioned while loading under ZeRO-3, its trainable set as its
        class declares it, its training plan applied (``SpeechLM.prepare_for_training``: LoRA...)."""
        cfg = self.config
        ds_config = deepspeed_config(cfg) if cfg.zero_stage == 3 else None
        loader = self.method.student_loader()
        options = self._load_options() if loader is None else {}
        with _loading(self._key("student"), cfg.student):
            student = load_model(
                cfg.student, dtype=None, ds_config=ds_config, loader=loader or load_speech_lm, **options
            )
        align_requires_grad(student)
        prepare = getattr(student, "prepare_for_training", None)
        if prepare is not None:
            prepare()  # the checkpoint's training plan (e.g. LoRA adapters), before the optimizer exists
        student.train()
        if cfg.zero_stage == 3:
            register_external_parameters(student)
        if cfg.gradient_checkpointing:
            self._enable_gradient_checkpointing(student)
        return student

    def _load_frozen(self, path: str, loader: Any = load_speech_lm) -> Any:
        """A method's frozen teacher (:func:`caad.train.engine.load_frozen`); a load failure is a UserError.

        The config's loading options apply with the default loader (a custom one gets path, dtype and
        device only)."""
        options = self._load_options() if loader is load_speech_lm else {}
        with _loading("teacher", path):
            return load_frozen(path, self.config, self.dist.device, loader=loader, **options)

    def _enable_gradient_checkpointing(self, student: Any) -> None:
        """Activation recomputation in the student's layers, or a clear error before anything is written."""
        key = self._key("gradient_checkpointing")
        enable = getattr(student, "gradient_checkpointing_enable", None)
        inner = getattr(student, "model", None)
        if enable is None and getattr(inner, "supports_gradient_checkpointing", False):

            def enable() -> None:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        if enable is None:
            raise UserError(
                f"{key}: the student ({type(student).__name__}) does not support gradient checkpointing; "
                f"set {key}=false"
            )
        try:
            enable()
        except (AttributeError, NotImplementedError, ValueError) as error:
            raise UserError(
                f"{key}: the student ({type(student).__name__}) cannot use gradient checkpointing ({error}); "
                f"set {key}=false"
            ) from error

    def _prepare_output(self) -> None:
        """Create or replace the output folder (main rank), record config and run info.

        A refusal on the main rank is raised on every rank (no rank is left waiting).
        """
        error = None
        if self.dist.is_main:
            try:
                prepare_output_dir(
                    self.output_dir,
                    overwrite=self.config.overwrite,
                    resume=self.resume,
                    key=self._key("output_dir"),
                    kind="train",
                )
                self._write_config()
                now = asdict(self.config)
                info = {
                    "world_size": self.dist.world_size,
                    "name": self.name,
                    "method": self.method.name,
                    "section": self.section,
                    "checkpoints": {
                        key: {"path": now[key], "fingerprint": checkpoint_fingerprint(now[key])}
                        for key in self.method.checkpoint_keys
                        if now.get(key) is not None
                    },
                }
                (self.output_dir / "run_info.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
            except UserError as caught:
                error = str(caught)
        error = broadcast_object(error)
        if error is not None:
            raise UserError(error)

    def _write_config(self) -> None:
        """``<output_dir>/config.yaml``: this run's section as a config file, so that
        ``caad train --method M --section S --config <output_dir>/config.yaml --resume`` continues it."""
        import yaml

        text = yaml.safe_dump({self.section: asdict(self.config)}, sort_keys=False)
        (self.output_dir / "config.yaml").write_text(text, encoding="utf-8")

    def _check_resume(self) -> None:
        """A resumed run must keep its data order, and (unless forced) its LR and the method's key settings."""
        import yaml

        path = self.output_dir / "config.yaml"
        if not path.is_file():
            return
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        before = recorded.get(self.section, recorded) if isinstance(recorded, dict) else {}
        info = read_json(self.output_dir / "run_info.json")
        if info.get("method", self.method.name) != self.method.name:
            raise UserError(
                f"resume=True: {self.output_dir} holds a run of the method {info['method']!r}, not {self.method.name!r}"
            )
        order, settings = resume_conflicts(
            before,
            asdict(self.config),
            info,
            world_size=self.dist.world_size,
            setting_keys=SETTING_KEYS + tuple(self.method.resume_keys),
            checkpoint_keys=tuple(self.method.checkpoint_keys),
        )
        if order:
            raise UserError(
                f"resume=True: {self.output_dir} was trained with different {', '.join(order)}; resuming would "
                "not continue the same data order. Use the same settings, or start a new output_dir"
            )
        if settings and not self.force_resume:
            raise UserError(
                f"resume=True: {self.output_dir} was trained with different {', '.join(settings)}; the resumed "
                "run would not continue the same training. Use the same settings, or pass force_resume=True "
                "to continue with the new ones"
            )
        if settings and self.dist.is_main:
            print(f"{self.name}: --force-resume: continuing with changed {', '.join(settings)}", flush=True)

    def _progress_bar(self, start: int, total: int) -> Any:
        if not (self.dist.is_main and self.config.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=start, desc=self.name, unit="step", dynamic_ncols=True)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int, with_student: bool = True) -> None:
        """DeepSpeed checkpoint (to resume from) + the student in save_pretrained form, at ``step``."""
        name = tag(step)
        client_state = {"caad_step": step, "method_state": self.method.state_dict()}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=name, client_state=client_state)
        tag_dir = self.checkpoint_dir / name
        torch.save(rng_state(), tag_dir / f"rng_state_rank{self.dist.rank}.pt")
        if with_student:
            save_student(self.engine, tag_dir / "student", is_main=self.dist.is_main)
        barrier()
        if self.dist.is_main and self.config.keep_checkpoints:
            tags = sorted(p for p in self.checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for old in tags[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _load_checkpoint(self) -> int:
        """Restore engine, optimizer, scheduler, RNG and method state from the latest checkpoint; the next step."""
        latest = self.checkpoint_dir / "latest"
        if not latest.is_file():
            if self.dist.is_main:
                truncate_metrics(self.output_dir / METRICS, 0)
                print(f"{self.name}: --resume: no checkpoint in {self.checkpoint_dir} yet, starting from step 0")
            return 0
        name = latest.read_text(encoding="utf-8").strip()
        path, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=name)
        if path is None:
            raise UserError(f"resume=True: could not load the checkpoint {self.checkpoint_dir / name}")
        step = int(client_state["caad_step"])
        self.method.load_state_dict(client_state.get("method_state") or {})
        rng_file = self.checkpoint_dir / name / f"rng_state_rank{self.dist.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        if self.dist.is_main:
            truncate_metrics(self.output_dir / METRICS, step)
            print(f"{self.name}: resumed from {self.checkpoint_dir / name} (step {step})")
        return step


@contextlib.contextmanager
def _loading(what: str, path: str) -> Iterator[None]:
    """Turn a failure to read a checkpoint into one clear line (the cause stays chained)."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{what}: could not load the checkpoint {path}: {type(error).__name__}: {error}") from error


def _due(done: int, every: int) -> bool:
    return every > 0 and done % every == 0


def _validation_only(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k.startswith("val_")}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
