"""Stage 2: the loss, the teacher's batched paths, training, resume, DeepSpeed ZeRO on 2 ranks (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stage2_fixtures import prepare, stage2_settings, write_config

from caad.config import TrainConfig
from caad.models import load_speech_lm
from caad.stage2 import Stage2Trainer, train_stage2
from caad.stage2.data import PseudoGTDataset, StepPlan, build_step_batch
from caad.stage2.distributed import find_free_port
from caad.stage2.metrics import read_metrics
from caad.stage2.trainer import distillation_loss, teacher_forward
from caad_kernels.reference import fused_linear_contrastive_kd_loss_reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    return prepare(tiny_corpus, tmp_path_factory.mktemp("stage2") / "prepared")


def _config(prepared, output_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**stage2_settings(prepared, output_dir, **overrides))


def _losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl")}


# ---- the step's pieces ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(prepared):
    teacher = load_speech_lm(prepared.teacher)
    student = load_speech_lm(prepared.student)
    return teacher, student


@pytest.mark.parametrize("negative_mode", ["zero", "remove", "noise"])
def test_one_batched_forward_equals_two_forwards(prepared, models, negative_mode):
    teacher, student = models
    batch = build_step_batch(
        PseudoGTDataset(prepared.train),
        [0, 1, 2],
        student,
        teacher,
        negative_mode=negative_mode,
        noise_seed=3,
        device=torch.device("cpu"),
        student_dtype=torch.float32,
    )
    positive, negative = teacher_forward(teacher, batch)
    with torch.no_grad():
        separate_pos = teacher.target_hidden_states(batch.teacher_positive)
        separate_neg = teacher.target_hidden_states(batch.teacher_negative)
    assert positive.hidden.shape[0] == batch.num_targets
    torch.testing.assert_close(positive.hidden, separate_pos.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(negative.hidden, separate_neg.hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(positive.labels, separate_neg.labels)
    assert not torch.allclose(positive.hidden, negative.hidden)  # the audio matters


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # CAAD defaults: alpha 2, tau 2, 0.7 KD + 0.3 CE
        dict(alpha=0.0),  # plain KD: no negative path
        dict(alpha=1.0, beta=0.5, plausibility=0.1, negative_mode="remove"),
        dict(kd_weight=0.0, ce_weight=1.0),  # CE only, no teacher
    ],
)
def test_trainer_loss_equals_materialising_reference(prepared, models, options):
    teacher, student = models
    config = _config(prepared, prepared.root / "unused", **options)
    use_teacher = teacher if config.needs_teacher else None
    batch = build_step_batch(
        PseudoGTDataset(prepared.train),
        [3, 4, 5],
        student,
        use_teacher,
        negative_mode=config.negative_mode if config.alpha > 0 else None,
        noise_seed=0,
        device=torch.device("cpu"),
        student_dtype=torch.float32,
    )
    teacher_out = teacher_forward(use_teacher, batch)
    assert (teacher_out is None) == (not config.needs_teacher)
    if teacher_out is not None:
        assert (teacher_out[1] is None) == (config.alpha == 0)
    num_items = batch.num_targets + 7  # as if other micro-batches/ranks held 7 more label tokens

    student.zero_grad()
    student_out = student.target_hidden_states(batch.student)
    out = distillation_loss(student_out, student, teacher_out, use_teacher, config, num_items)
    out.loss.backward()
    grad = student.lm_head_weight.grad.clone()

    student.zero_grad()
    hidden = student.target_hidden_states(batch.student).hidden
    if teacher_out is None:
        t_hidden, t_weight, negative = hidden.detach(), student.lm_head_weight.detach(), None
    else:
        t_hidden, t_weight = teacher_out[0].hidden, teacher.lm_head_weight
        negative = None if teacher_out[1] is None else teacher_out[1].hidden
    ref_loss, ref_kd, ref_ce = fused_linear_contrastive_kd_loss_reference(
        hidden,
        student.lm_head_weight,
        t_hidden,
        t_weight,
        negative,
        student_out.labels,
        alpha=config.alpha if negative is not None else 0.0,
        temperature=config.temperature,
        beta=config.beta,
        plausibility=config.plausibility,
        kd_weight=config.kd_weight,
        ce_weight=config.ce_weight,
        num_items_in_batch=num_items,
        compute_dtype=torch.float64,
    )
    ref_loss.backward()
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd_loss.double(), ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce_loss.double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, student.lm_head_weight.grad.float(), rtol=1e-4, atol=1e-6)
    student.zero_grad()


def test_step_plan_splits_the_global_batch_over_ranks_and_micro_steps():
    one = StepPlan(num_examples=20, batch_size=4, grad_accum=1, world_size=1, rank=0, seed=5, epochs=2)
    ranks = [
        StepPlan(num_examples=20, batch_size=2, grad_accum=1, world_size=2, rank=r, seed=5, epochs=2)
        for r in (0, 1)
    ]
    accum = StepPlan(num_examples=20, batch_size=1, grad_accum=2, world_size=2, rank=0, seed=5, epochs=2)
    assert one.total_steps == 10 and one.steps_per_epoch == 5
    for step in range(one.total_steps):
        (whole,) = one.micro_batches(step)
        assert ranks[0].micro_batches(step)[0] + ranks[1].micro_batches(step)[0] == whole
        assert accum.micro_batches(step) == [whole[0:1], whole[2:3]]
    assert one.order(0) != one.order(1)
    assert sorted(one.order(1)) == list(range(20))


# ---- training ---------------------------------------------------------------------------------------


def test_loss_falls_on_a_fixed_batch(prepared, tmp_path):
    from caad.data import read_manifest, write_manifest

    fixed = tmp_path / "fixed.jsonl"
    write_manifest(fixed, read_manifest(prepared.train)[:4])
    config = _config(prepared, tmp_path / "out", train_manifest=str(fixed), max_steps=8, lr=5e-3)
    result = train_stage2(config)
    losses = _losses(result.output_dir)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < 0.8 * losses[1], losses
    records = read_metrics(result.metrics)
    assert {"loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"} <= set(records[-1])
    assert (result.final_model / "config.json").is_file()
    assert (result.final_model / "tokenizer.json").is_file()
    assert result.plot is not None and result.plot.stat().st_size > 0
    reloaded = load_speech_lm(result.final_model)
    assert reloaded.vocab_size == load_speech_lm(prepared.student).vocab_size


class _Stop(Exception):
    pass


def test_resume_continues_exactly(prepared, tmp_path, monkeypatch):
    settings = dict(max_steps=4, save_every=2, batch_size=2, grad_accum=2, scheduler="cosine", warmup_steps=1)
    uninterrupted = train_stage2(_config(prepared, tmp_path / "a", **settings))
    expected = _losses(uninterrupted.output_dir)

    original = Stage2Trainer._save_checkpoint

    def save_then_crash(self, step, with_student=True):
        original(self, step, with_student)
        if step == 2:
            raise _Stop

    monkeypatch.setattr(Stage2Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(_Stop):
        train_stage2(_config(prepared, tmp_path / "b", **settings))
    monkeypatch.setattr(Stage2Trainer, "_save_checkpoint", original)
    assert sorted(_losses(tmp_path / "b")) == [1, 2]
    assert (tmp_path / "b" / "checkpoints" / "step_0000002" / "student" / "config.json").is_file()

    # without --resume the interrupted run's folder is refused, and left as it is
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    with pytest.raises(Exception, match="already holds an earlier run"):
        train_stage2(_config(prepared, tmp_path / "b", **settings))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before

    resumed = train_stage2(_config(prepared, tmp_path / "b", **settings), resume=True)
    got = _losses(resumed.output_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)

    # a resumed run must keep the settings that fix the data order
    with pytest.raises(Exception, match="different batch_size"):
        train_stage2(
            _config(prepared, tmp_path / "b", **dict(settings, batch_size=4, grad_accum=1)), resume=True
        )


def _launch(config_path: Path, world_size: int, log_dir: Path) -> None:
    """``caad stage2`` on ``world_size`` CPU processes (gloo), as a launcher would start them."""
    port = find_free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "caad.cli", "stage2", "--config", str(config_path)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                ),
                log,
            )
        )
    try:
        for proc, _ in procs:
            proc.wait(timeout=400)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (log_dir / f"rank{rank}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def single_process_reference(prepared, tmp_path_factory):
    """One process, no ZeRO, batch 4: the run that 2 ranks x batch 2 must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train_stage2(_config(prepared, out, batch_size=4, max_steps=3))
    return _losses(out), out / "final"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [3, 2])
def test_two_process_zero_matches_one_process(prepared, tmp_path, single_process_reference, zero_stage):
    out = tmp_path / "out"
    settings = stage2_settings(
        prepared, out, batch_size=2, max_steps=3, zero_stage=zero_stage, teacher_zero3=zero_stage == 3
    )
    _launch(write_config(tmp_path / "config.yaml", settings), 2, tmp_path)
    losses = _losses(out)
    reference_losses, reference_final = single_process_reference
    assert sorted(losses) == [1, 2, 3]
    for step, expected in reference_losses.items():
        assert losses[step] == pytest.approx(expected, rel=2e-5), (zero_stage, losses, reference_losses)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    # the saved student (gathered from the ZeRO partitions) is the single-process one
    got = load_speech_lm(out / "final").state_dict()
    expected_state = load_speech_lm(reference_final).state_dict()
    assert got.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
    assert (out / "checkpoints" / "step_0000003").is_dir()
