"""The Stage 2 recipe: synchronised teacher forcing and contrastive distillation on DeepSpeed ZeRO.

Read top to bottom, :meth:`Stage2Trainer.train` is the algorithm:

1. set up the process group, the output folder and the seeds;
2. load the pseudo-GT manifest and plan which examples each optimizer step uses;
3. build the student's DeepSpeed engine (ZeRO 0-3, AdamW, LR schedule) and the frozen teacher
   (optionally a ZeRO-3 inference engine); with ``--resume``, load the last checkpoint;
4. for each optimizer step:
   a. build ``prompt + pseudo-GT`` once per micro-batch, for the student and both teacher paths;
   b. count the label tokens of the whole accumulated batch over every rank (the loss divisor);
   c. per micro-batch: the teacher's positive and negative paths in ONE forward under
      ``no_grad``; the student's positive path; the fused-linear contrastive KD loss on the target
      hidden states with both ``lm_head`` weights (gathered under ZeRO-3) - no logits
      materialised; ``engine.backward`` (not rescaled by the accumulation steps);
   d. ``engine.step()`` (clipping, optimizer, LR schedule at the accumulation boundary);
   e. log total / KD / CE loss, LR and tokens/s; checkpoint every ``save_every`` steps;
5. save the final checkpoint and the student (``save_pretrained`` form), plot the losses.

Special cases: ``alpha: 0`` is standard KD (the teacher runs the positive path only);
``kd_weight: 0`` is CE-only fine-tuning with no teacher (used to warm the teacher up).

Loss normalisation: with ``N`` label tokens in the whole accumulated batch over all ranks, each
micro-batch's loss is ``sum over its rows / N`` (``num_items_in_batch=N``), so the accumulated
gradient is that of the mean over the global batch whatever the padding, micro-batch split or rank
count. DeepSpeed averages gradients over the ``W`` data-parallel ranks, so the loss handed to
``engine.backward`` is multiplied by ``W``; the reported loss is the all-reduced sum (the true mean).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caad.cli import UserError
from caad.config import TrainConfig, dump_config
from caad.models import SpeechLM, TargetHiddenStates
from caad.stage2.data import PseudoGTDataset, StepBatch, StepPlan, build_step_batch
from caad.stage2.distributed import all_reduce_sum, barrier, broadcast_object, init_distributed
from caad.stage2.engine import (
    build_student_engine,
    build_teacher,
    gathered_lm_heads,
    model_dtype,
    save_student,
)
from caad.stage2.metrics import MetricsLogger, plot_losses, truncate_metrics
from caad.stage2.outputs import check_output_dir, prepare_output_dir
from caad_kernels import fused_linear_contrastive_kd_loss

__all__ = ["Stage2Result", "Stage2Trainer", "distillation_loss", "teacher_forward", "train_stage2"]

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"
#: Fields that fix which examples each step sees: a resumed run must keep them.
RESUME_INVARIANTS = ("train_manifest", "batch_size", "grad_accum", "seed", "epochs", "max_steps")


@dataclass
class Stage2Result:
    """Where a run's products are, and its last logged metrics."""

    output_dir: Path
    final_model: Path
    metrics: Path
    plot: Path | None
    steps: int
    last: dict[str, Any]


def train_stage2(
    config: TrainConfig, *, resume: bool = False, name: str = "stage 2", section: str = "stage2"
) -> Stage2Result:
    """Run Stage 2 (or, with ``kd_weight: 0``, CE-only fine-tuning) as configured (module docstring).

    ``section`` is the config section the settings came from (``stage2`` or ``warmup``): error
    messages name its keys.
    """
    return Stage2Trainer(config, resume=resume, name=name, section=section).train()


class Stage2Trainer:
    """One training run. ``config`` must have passed :meth:`TrainConfig.validate`."""

    def __init__(
        self, config: TrainConfig, *, resume: bool = False, name: str = "stage 2", section: str = "stage2"
    ) -> None:
        config.validate(section)
        config.check_paths(section)
        self.config = config
        self.resume = resume
        self.name = name
        self.section = section
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINTS
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # refuse an earlier run's folder before anything is loaded (several ranks: in _prepare_output)
            check_output_dir(
                self.output_dir, overwrite=config.overwrite, resume=resume, key=self._key("output_dir")
            )

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}"

    # ---- the recipe -------------------------------------------------------------------------------------

    def train(self) -> Stage2Result:
        cfg = self.config
        # 1. processes, output folder, seeds
        self.dist = init_distributed()
        self._prepare_output()
        _seed_everything(cfg.seed + self.dist.rank)

        # 2. data and the step plan
        self.dataset = PseudoGTDataset(cfg.train_manifest)
        self.plan = StepPlan(
            num_examples=len(self.dataset),
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=cfg.seed,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
        )
        if self.plan.steps_per_epoch == 0:
            raise UserError(
                f"{self._key('train_manifest')} {cfg.train_manifest} has {len(self.dataset)} examples, "
                f"fewer than one optimizer step needs (batch_size {cfg.batch_size} x "
                f"{self.dist.world_size} ranks x grad_accum {cfg.grad_accum} = {self.plan.global_batch}); "
                "lower batch_size or grad_accum"
            )
        total_steps = self.plan.total_steps

        # 3. student engine, teacher, resume
        self.dtype = model_dtype(cfg)
        self.engine, self.optimizer, self.scheduler = build_student_engine(cfg, total_steps)
        self.student: SpeechLM = self.engine.module
        self.teacher = build_teacher(cfg, self.dist.device)
        start_step = self._load_checkpoint() if self.resume else 0
        self._check_vocabularies()

        logger = (
            MetricsLogger(self.output_dir / METRICS, tensorboard=cfg.tensorboard)
            if self.dist.is_main
            else None
        )
        bar = self._progress_bar(start_step, total_steps)
        last: dict[str, Any] = {}
        try:
            # 4. the optimizer steps
            for step in range(start_step, total_steps):
                started = time.perf_counter()
                micro_batches = self._build_step(step)  # a
                num_items = int(
                    all_reduce_sum(sum(b.num_targets for b in micro_batches), self.dist.device)
                )  # b
                with_components = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
                lr = self.scheduler.get_last_lr()[0]  # the LR of this step (the engine steps the schedule)
                sums = torch.zeros(3, dtype=torch.float64)
                for batch in micro_batches:  # c
                    sums += self._micro_step(batch, num_items, with_components)
                # d. engine.step() ran after each micro-batch; the update happened at the boundary
                totals = all_reduce_sum(sums.to(self.dist.device), self.dist.device).cpu()
                tokens = int(all_reduce_sum(sum(b.num_tokens for b in micro_batches), self.dist.device))
                elapsed = time.perf_counter() - started
                last = self._record(step + 1, totals, with_components, lr, num_items, tokens, elapsed)
                if logger is not None and with_components:  # e
                    logger.log(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                    self._save_checkpoint(step + 1)
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
        return Stage2Result(self.output_dir, final, self.output_dir / METRICS, plot, total_steps, last)

    # ---- one step ---------------------------------------------------------------------------------------

    def _build_step(self, step: int) -> list[StepBatch]:
        """``prompt + pseudo-GT`` for every micro-batch of this rank in optimizer step ``step``."""
        cfg = self.config
        batches = []
        for micro, indices in enumerate(self.plan.micro_batches(step)):
            batches.append(
                build_step_batch(
                    self.dataset,
                    indices,
                    self.student,
                    self.teacher,
                    negative_mode=cfg.negative_mode if cfg.alpha > 0 else None,
                    noise_seed=cfg.noise_seed
                    + (step * cfg.grad_accum + micro) * self.dist.world_size
                    + self.dist.rank,
                    device=self.dist.device,
                    student_dtype=self.dtype,
                )
            )
        return batches

    def _micro_step(self, batch: StepBatch, num_items: int, with_components: bool) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; returns its ``[total, kd, ce]`` loss sums / N."""
        # the teacher: positive and negative paths in one batched forward, no gradient
        teacher_out = teacher_forward(self.teacher, batch)
        # the student: positive path, with gradient (through the engine, so ZeRO-3 fetches weights)
        student_out = self.engine(batch.student)
        with gathered_lm_heads(self.student, self.teacher):
            out = distillation_loss(
                student_out, self.student, teacher_out, self.teacher, self.config, num_items, with_components
            )
            loss = out.loss if with_components else out
            # DeepSpeed averages gradients over ranks: undo it, the divisor N already spans them
            self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)
        self.engine.step()
        if with_components:
            return torch.stack([out.loss.detach(), out.kd_loss.detach(), out.ce_loss.detach()]).double().cpu()
        return torch.tensor([float(loss.detach()), float("nan"), float("nan")], dtype=torch.float64)

    def _record(
        self,
        step: int,
        totals: torch.Tensor,
        with_components: bool,
        lr: float,
        targets: int,
        tokens: int,
        elapsed: float,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": step,
            "epoch": self.plan.epoch_of(step - 1),
            "loss": float(totals[0]),
            "kd_loss": float(totals[1]) if with_components else None,
            "ce_loss": float(totals[2]) if with_components else None,
            "lr": lr,
            "target_tokens": targets,
            "tokens": tokens,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "step_time_s": elapsed,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    # ---- setup helpers ----------------------------------------------------------------------------------

    def _prepare_output(self) -> None:
        """Create or clear the output folder (main rank), record the config; resuming checks it first.

        A refusal on the main rank is raised on every rank (no rank is left waiting).
        """
        error = None
        if self.dist.is_main:
            try:
                action = prepare_output_dir(
                    self.output_dir,
                    overwrite=self.config.overwrite,
                    resume=self.resume,
                    key=self._key("output_dir"),
                    kind="stage2",
                )
                if action == "resume":
                    self._check_resume_config()
                dump_config(self.config, self.output_dir / "config.yaml")
                info = {"world_size": self.dist.world_size, "name": self.name}
                (self.output_dir / "run_info.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
            except UserError as caught:
                error = str(caught)
        error = broadcast_object(error)
        if error is not None:
            raise UserError(error)

    def _check_resume_config(self) -> None:
        """A resumed run must keep what fixes its data order (:data:`RESUME_INVARIANTS`, world size)."""
        path = self.output_dir / "config.yaml"
        info_path = self.output_dir / "run_info.json"
        if not path.is_file():
            return
        import yaml

        before = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        now = asdict(self.config)
        changed = [k for k in RESUME_INVARIANTS if before.get(k) != now.get(k)]
        if info_path.is_file():
            world = json.loads(info_path.read_text(encoding="utf-8")).get("world_size")
            if world is not None and world != self.dist.world_size:
                changed.append(f"world size ({world} -> {self.dist.world_size})")
        if changed:
            raise UserError(
                f"--resume: {self.output_dir} was trained with different {', '.join(changed)}; "
                "resuming would "
                "not continue the same data order. Use the same settings, or start a new output_dir"
            )

    def _check_vocabularies(self) -> None:
        if self.teacher is not None and self.teacher.vocab_size < self.student.vocab_size:
            raise UserError(
                f"the teacher's vocabulary ({self.teacher.vocab_size}) is smaller than the student's "
                f"({self.student.vocab_size}); the teacher must cover every student token"
            )

    def _progress_bar(self, start: int, total: int) -> Any:
        if not (self.dist.is_main and self.config.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=start, desc=self.name, unit="step", dynamic_ncols=True)

    # ---- checkpoints ------------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int, with_student: bool = True) -> None:
        """DeepSpeed checkpoint (to resume from) + the student in save_pretrained form, at ``step``."""
        tag = _tag(step)
        client_state = {"caad_step": step}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state)
        tag_dir = self.checkpoint_dir / tag
        torch.save(_rng_state(), tag_dir / f"rng_state_rank{self.dist.rank}.pt")
        if with_student:
            save_student(self.engine, tag_dir / "student", is_main=self.dist.is_main)
        barrier()
        if self.dist.is_main and self.config.keep_checkpoints:
            tags = sorted(
                p for p in self.checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
            )
            for old in tags[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _load_checkpoint(self) -> int:
        """Restore engine, optimizer, scheduler and RNG from the latest checkpoint; returns the next step."""
        latest = self.checkpoint_dir / "latest"
        if not latest.is_file():
            if self.dist.is_main:
                truncate_metrics(self.output_dir / METRICS, 0)
                print(
                    f"{self.name}: --resume: no checkpoint in {self.checkpoint_dir} yet, starting from step 0"
                )
            return 0
        tag = latest.read_text(encoding="utf-8").strip()
        path, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        if path is None:
            raise UserError(f"--resume: could not load the checkpoint {self.checkpoint_dir / tag}")
        step = int(client_state["caad_step"])
        rng_file = self.checkpoint_dir / tag / f"rng_state_rank{self.dist.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        if self.dist.is_main:
            truncate_metrics(self.output_dir / METRICS, step)
            print(f"{self.name}: resumed from {self.checkpoint_dir / tag} (step {step})")
        return step


def teacher_forward(
    teacher: SpeechLM | None, batch: StepBatch
) -> tuple[TargetHiddenStates, TargetHiddenStates | None] | None:
    """The teacher's target hidden states under ``no_grad``: ``(positive, negative)``.

    Both paths run in ONE batched forward (:meth:`SpeechLM.paired_target_hidden_states`); without a
    negative batch (alpha 0) only the positive path runs and ``negative`` is ``None``; ``None``
    without a teacher.
    """
    if teacher is None:
        return None
    with torch.no_grad():
        if batch.teacher_negative is not None:
            return teacher.paired_target_hidden_states(batch.teacher_positive, batch.teacher_negative)
        return teacher.target_hidden_states(batch.teacher_positive), None


def distillation_loss(
    student_out: TargetHiddenStates,
    student: SpeechLM,
    teacher_out: tuple[TargetHiddenStates, TargetHiddenStates | None] | None,
    teacher: SpeechLM | None,
    config: TrainConfig,
    num_items: int | None = None,
    return_components: bool = True,
) -> Any:
    """The CAAD loss of one micro-batch from target hidden states and ``lm_head`` weights (no logits).

    ``fused_linear_contrastive_kd_loss`` with the student's and the teacher's ``lm_head`` weight and
    bias (gather them first under ZeRO-3: :func:`caad.stage2.engine.gathered_lm_heads`) and the
    config's loss options; ``num_items`` is the label-token count of the whole accumulated batch
    over all ranks (``None``: this micro-batch's). Without a teacher (``kd_weight: 0``) the KD term
    has weight 0 and is computed against the student itself, so only CE remains. Returns a
    ``KDLossOutput`` (loss, kd_loss, ce_loss) with ``return_components``, else the loss tensor.
    """
    student_hidden = student_out.hidden
    labels = student_out.labels.to(student_hidden.device)
    if teacher_out is None:
        bias = student.lm_head_bias
        teacher_hidden, teacher_weight = student_hidden.detach(), student.lm_head_weight.detach()
        teacher_bias = None if bias is None else bias.detach()
        negative_hidden = None
    else:
        positive, negative = teacher_out
        teacher_hidden, teacher_weight, teacher_bias = (
            positive.hidden,
            teacher.lm_head_weight,
            teacher.lm_head_bias,
        )
        negative_hidden = None if negative is None else negative.hidden
    return fused_linear_contrastive_kd_loss(
        student_hidden,
        student.lm_head_weight,
        teacher_hidden,
        teacher_weight,
        negative_hidden,
        labels,
        student_bias=student.lm_head_bias,
        teacher_bias=teacher_bias,
        alpha=config.alpha if negative_hidden is not None else 0.0,
        temperature=config.temperature,
        beta=config.beta,
        plausibility=config.plausibility,
        kd_weight=config.kd_weight,
        ce_weight=config.ce_weight,
        temperature_scaling=config.temperature_scaling,
        num_items_in_batch=num_items,
        chunk_size=config.loss_chunk_size,
        accum_dtype=torch.float32 if student_hidden.dtype != torch.float32 else None,
        backend=config.loss_backend,
        return_components=return_components,
        check_finite=False,
    )


def _tag(step: int) -> str:
    return f"step_{step:07d}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
