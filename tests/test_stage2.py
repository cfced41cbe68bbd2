"""Stage 2: the loss, the teacher's batched paths, training, resume, DeepSpeed ZeRO on 2 ranks (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stage2_fixtures import prepare, stage2_settings, write_config

from caad.config import Stage2Config
from caad.methods.caad import (
    CAADMethod,
    PseudoGTDataset,
    build_step_batch,
    distillation_loss,
    teacher_forward,
    train_stage2,
)
from caad.models import load_speech_lm
from caad.train import Trainer
from caad.train.distributed import find_free_port
from caad.train.metrics import read_metrics
from caad.train.plan import StepPlan
from caad_kernels.reference import fused_linear_contrastive_kd_loss_reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    return prepare(tiny_corpus, tmp_path_factory.mktemp("stage2") / "prepared")


def _config(prepared, output_dir: Path, **overrides) -> Stage2Config:
    return Stage2Config(**stage2_settings(prepared, output_dir, **overrides))


def _losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl")}


# ---- the step's pieces ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(prepared):
    teacher = load_speech_lm(prepared.teacher)
    student = load_speech_lm(prepared.student)
    return teacher, student


@pytest.mark.parametrize("negative_mode", ["zero", "remove", "noise", "silence_fixed_length"])
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


RESUME_SETTINGS = dict(max_steps=4, save_every=2, batch_size=2, grad_accum=2, scheduler="cosine", warmup_steps=1)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The losses of a 4-step run (2 micro-steps of 2 examples per step) that nothing interrupts."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    return _losses(train_stage2(_config(prepared, out, **RESUME_SETTINGS)).output_dir)


def test_resume_continues_exactly(prepared, tmp_path, monkeypatch, uninterrupted):
    settings = RESUME_SETTINGS
    expected = uninterrupted

    original = Trainer._save_checkpoint

    def save_then_crash(self, step, with_student=True):
        original(self, step, with_student)
        if step == 2:
            raise _Stop

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(_Stop):
        train_stage2(_config(prepared, tmp_path / "b", **settings))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
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


def _interrupt_at(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process while optimizer step ``step`` (1-based) builds its first batch."""
    original = CAADMethod.build_batch

    def build_batch(self, examples, info, device):
        if info.split == "train" and info.step == step - 1 and info.micro == 0:
            os.kill(os.getpid(), signum)
        return original(self, examples, info, device)

    monkeypatch.setattr(CAADMethod, "build_batch", build_batch)


def test_signal_saves_a_checkpoint_and_resume_checks_settings(prepared, tmp_path, monkeypatch, capsys, uninterrupted):
    import shutil

    from caad.cli import main

    teacher = tmp_path / "teacher"  # a copy, so that the test can change it
    shutil.copytree(prepared.teacher, teacher)
    settings = dict(RESUME_SETTINGS, save_every=0, teacher=str(teacher))  # only the signal saves
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", stage2_settings(prepared, out, **settings))
    handler = signal.getsignal(signal.SIGINT)
    _interrupt_at(monkeypatch, 2, signal.SIGINT)
    assert main(["stage2", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert "SIGINT received: stopped after optimizer step 2" in err
    assert f"caad train --method caad --section stage2 --config {out / 'config.yaml'} --resume" in err
    monkeypatch.undo()
    assert sorted(_losses(out)) == [1, 2]
    assert (out / "checkpoints" / "step_0000002" / "student" / "config.json").is_file()
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is removed again

    # --resume refuses a changed learning rate, alpha or teacher, naming them and the flag that forces it
    for override, named in (
        ("stage2.lr=1e-3", "lr (0.003 -> 0.001)"),
        ("stage2.alpha=1", "alpha (2.0 -> 1.0)"),
        (f"stage2.teacher={prepared.teacher}", "teacher ("),
    ):
        assert main(["stage2", "--config", str(config), override, "--resume"]) == 2
        err = capsys.readouterr().err
        assert named in err and "--force-resume" in err, err
    config_json = teacher / "config.json"
    original = config_json.read_text()
    config_json.write_text(original.replace("{", '{"_edited": true,', 1))
    assert main(["stage2", "--config", str(config), "--resume"]) == 2
    assert "the checkpoint in" in capsys.readouterr().err
    config_json.write_text(original)
    assert sorted(_losses(out)) == [1, 2]  # refusals leave the run as it was

    assert main(["train", "--method", "caad", "--config", str(out / "config.yaml"), "--resume"]) == 0  # as hinted
    got = _losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), (step, got, uninterrupted)
    # --force-resume accepts the change (the run is finished: nothing left to do)
    assert main(["stage2", "--config", str(config), "stage2.lr=1e-3", "--force-resume"]) == 0
    assert "--force-resume: continuing with changed lr" in capsys.readouterr().out


def test_interruption_flag_and_handlers():
    from caad.train.interrupt import Interruption

    before = signal.getsignal(signal.SIGTERM)
    with Interruption("test") as interruption:
        assert interruption.requested == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert interruption.requested == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # a second signal acts as usual
    assert signal.getsignal(signal.SIGTERM) is before


def test_grad_norm_is_logged_with_zero0_as_with_zero2(prepared, tmp_path):
    norms = {}
    for stage in (0, 2):
        result = train_stage2(_config(prepared, tmp_path / f"z{stage}", max_steps=2, zero_stage=stage))
        norms[stage] = [r["grad_norm"] for r in read_metrics(result.metrics)]
    assert len(norms[0]) == 2 and all(n > 0 for n in norms[0])
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)


def test_zero3_with_optimizer_and_parameter_offload_trains_like_zero0(prepared, tmp_path):
    plain = train_stage2(_config(prepared, tmp_path / "z0", max_steps=2))
    offloaded = train_stage2(
        _config(prepared, tmp_path / "z3", max_steps=2, zero_stage=3, offload_optimizer="cpu", offload_param="cpu")
    )
    assert _losses(offloaded.output_dir) == pytest.approx(_losses(plain.output_dir), rel=2e-5)


def test_gradient_checkpointing_trains_the_same(prepared, tmp_path, monkeypatch):
    plain = train_stage2(_config(prepared, tmp_path / "plain", max_steps=2))
    checkpointed = train_stage2(_config(prepared, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True))
    expected, got = _losses(plain.output_dir), _losses(checkpointed.output_dir)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
    a, b = load_speech_lm(plain.final_model).state_dict(), load_speech_lm(checkpointed.final_model).state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-4, atol=1e-6, msg=name)

    # a student that cannot do it: a clear error before the output folder exists
    from caad.cli import UserError
    from caad.models import CompositeSpeechLM

    def unsupported(self, *args, **kwargs):
        raise NotImplementedError("no checkpointable layers")

    monkeypatch.setattr(CompositeSpeechLM, "gradient_checkpointing_enable", unsupported)
    out = tmp_path / "refused"
    with pytest.raises(UserError, match="stage2.gradient_checkpointing: the student .* cannot use gradient"):
        train_stage2(_config(prepared, out, max_steps=2, gradient_checkpointing=True))
    assert not out.exists()


def test_trainable_set_is_the_same_for_every_zero_stage(prepared, tmp_path):
    from caad.models import tiny_student
    from caad.train.distributed import init_distributed

    init_distributed()
    built = tiny_student(load_speech_lm(prepared.student).tokenizer, seed=1)
    declared = {name for name, p in built.named_parameters() if p.requires_grad}
    assert "model.audio_encoder.embed_positions.weight" not in declared  # Whisper's fixed sinusoids
    for stage in (0, 2, 3):
        trainer = Trainer(CAADMethod(_config(prepared, tmp_path / f"z{stage}", zero_stage=stage)))
        student = trainer._load_student()
        trainable = {name for name, p in student.named_parameters() if p.requires_grad}
        assert trainable == declared, (stage, trainable ^ declared)
        assert not (tmp_path / f"z{stage}").exists()  # loading models writes nothing


def test_validation_loss_every_k_steps(prepared, tiny_corpus, tmp_path, uninterrupted):
    from caad.stage1 import generate_pseudo_gt

    validation = tmp_path / "validation.jsonl"
    generate_pseudo_gt(tiny_corpus.validation, validation, progress=False)
    config = _config(prepared, tmp_path / "out", validation_manifest=str(validation), eval_every=2, **RESUME_SETTINGS)
    result = train_stage2(config)
    records = read_metrics(result.metrics)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert _losses(result.output_dir) == pytest.approx(uninterrupted, rel=1e-6)  # validating changes nothing
    assert result.plot is not None and result.plot.stat().st_size > 0

    # the last validation loss is the final student's mean loss over every validation target token
    student, teacher = load_speech_lm(result.final_model), load_speech_lm(prepared.teacher)
    dataset = PseudoGTDataset(validation)
    batch = build_step_batch(
        dataset,
        list(range(len(dataset))),
        student,
        teacher,
        negative_mode=config.negative_mode,
        noise_seed=0,
        device=torch.device("cpu"),
        student_dtype=torch.float32,
    )
    positive, negative = teacher_forward(teacher, batch)
    with torch.no_grad():
        hidden = student.target_hidden_states(batch.student)
        expected = fused_linear_contrastive_kd_loss_reference(
            hidden.hidden,
            student.lm_head_weight,
            positive.hidden,
            teacher.lm_head_weight,
            negative.hidden,
            hidden.labels,
            alpha=config.alpha,
            temperature=config.temperature,
            kd_weight=config.kd_weight,
            ce_weight=config.ce_weight,
            compute_dtype=torch.float64,
        )
    last = records[-1]
    assert last["val_loss"] == pytest.approx(float(expected[0]), rel=1e-4)
    assert last["val_kd_loss"] == pytest.approx(float(expected[1]), rel=1e-4)
    assert last["val_ce_loss"] == pytest.approx(float(expected[2]), rel=1e-4)


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


# ---- real checkpoints and real data (issue 12) ---------------------------------------------------------


def test_data_problems_stop_the_run_before_anything_is_written(prepared, tmp_path):
    """A missing file, a corrupt WAV and a clip too short are all reported at once, naming row and file,
    before the output folder exists."""
    import dataclasses
    import shutil

    from caad.cli import UserError
    from caad.data import read_manifest, write_manifest

    rows = read_manifest(prepared.train)
    audio = tmp_path / "audio"
    audio.mkdir()
    corrupt = audio / "corrupt.wav"
    shutil.copy(rows[1].audio_path, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[: len(corrupt.read_bytes()) // 2])  # truncated data chunk
    short = audio / "short.wav"
    import numpy as np
    import soundfile

    soundfile.write(short, np.zeros(160, dtype=np.float32), 16000)  # 0.01 s
    bad = [dataclasses.replace(r, audio=str(r.audio_path)) for r in rows]
    bad[0] = dataclasses.replace(bad[0], audio=str(audio / "missing.wav"))
    bad[1] = dataclasses.replace(bad[1], audio=str(corrupt))
    bad[2] = dataclasses.replace(bad[2], audio=str(short))
    manifest = tmp_path / "bad.jsonl"
    write_manifest(manifest, bad)
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        train_stage2(_config(prepared, out, train_manifest=str(manifest), max_steps=1))
    message = str(caught.value)
    assert message.startswith("stage2.train_manifest:")
    for row, name in ((bad[0], "missing.wav"), (bad[1], "corrupt.wav"), (bad[2], "short.wav")):
        assert row.id in message and name in message, message
    assert "3 errors" in message
    assert not out.exists()


def _method_with_models(config, teacher, student):
    """A CAADMethod whose teachers are built as the trainer builds them (the models given)."""
    from caad.train import SetupContext

    ctx = SetupContext(
        student=student,
        device=torch.device("cpu"),
        dtype=torch.float32,
        rank=0,
        world_size=1,
        load_frozen=lambda path, **_: teacher,
    )
    method = CAADMethod(config)
    method.build_teachers(ctx)
    return method, ctx


def test_max_length_truncates_or_filters_and_counts(prepared, models, capsys):
    from caad.cli import UserError
    from caad.data.audio import load_audio
    from caad.methods.caad.batch import prompt_length

    teacher, student = models
    rows = PseudoGTDataset(prepared.train).rows
    # the prompt length is the real one: the built sequence minus the target tokens (end token included)
    for model in (teacher, student):
        for row in rows[:3]:
            batch = model.build_inputs([load_audio(row.audio_path, 16000)], [row.instruction], [row.pseudo_gt])
            assert prompt_length(model, row) == int(batch.attention_mask.sum()) - batch.num_target_tokens

    def length(row) -> int:
        target = len(student.tokenizer(row.pseudo_gt, add_special_tokens=False)["input_ids"]) + 1
        return max(prompt_length(m, row) for m in (teacher, student)) + target

    limit = max(length(r) for r in rows) - 3
    too_long = sum(length(r) > limit for r in rows)
    assert too_long > 0
    for policy in ("truncate", "filter"):
        config = _config(prepared, prepared.root / "unused", max_length=limit, max_length_policy=policy)
        method, ctx = _method_with_models(config, teacher, student)
        kept = method.fit_examples(rows, "train", ctx)
        printed = capsys.readouterr().out
        assert all(length(row) <= limit for row in kept)  # every kept example fits, on both models
        if policy == "truncate":
            assert len(kept) == len(rows) and f"{too_long} targets truncated, 0 rows dropped" in printed
        else:
            assert len(rows) - len(kept) == too_long and f"0 targets truncated, {too_long} rows dropped" in printed
    config = _config(prepared, prepared.root / "unused", max_length=limit, max_length_policy="error")
    method, ctx = _method_with_models(config, teacher, student)
    with pytest.raises(UserError, match=f"stage2.max_length: row .* more than max_length {limit}"):
        method.fit_examples(rows, "train", ctx)


def test_each_models_logit_postprocessing_reaches_the_loss(prepared):
    """Cohere-style logit_scale on the student, Gemma-2-style softcap on the teacher: the loss equals the
    one on the logits each model's own post-processing gives (materialised, no loss options)."""
    from caad_kernels.reference import contrastive_kd_loss_reference

    teacher, student = load_speech_lm(prepared.teacher), load_speech_lm(prepared.student)
    student.text_config.logit_scale = 0.5
    teacher.text_config.final_logit_softcapping = 3.0
    assert (student.logit_scale, student.final_softcap) == (0.5, None)
    assert (teacher.logit_scale, teacher.final_softcap) == (1.0, 3.0)
    config = _config(prepared, prepared.root / "unused")
    batch = build_step_batch(
        PseudoGTDataset(prepared.train),
        [0, 1],
        student,
        teacher,
        negative_mode=config.negative_mode,
        noise_seed=0,
        device=torch.device("cpu"),
        student_dtype=torch.float32,
    )
    teacher_out = teacher_forward(teacher, batch)
    student_out = student.target_hidden_states(batch.student)
    got = distillation_loss(student_out, student, teacher_out, teacher, config)
    with torch.no_grad():
        logits = [
            model.logits_from_hidden(out.hidden)  # lm_head, then the model's own post-processing
            for model, out in ((student, student_out), (teacher, teacher_out[0]), (teacher, teacher_out[1]))
        ]
        expected = contrastive_kd_loss_reference(
            *logits,
            student_out.labels,
            alpha=config.alpha,
            temperature=config.temperature,
            kd_weight=config.kd_weight,
            ce_weight=config.ce_weight,
            compute_dtype=torch.float64,
        )
    for value, reference in zip((got.loss, got.kd_loss, got.ce_loss), expected):
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
    plain = distillation_loss(
        student_out, load_speech_lm(prepared.student), teacher_out, load_speech_lm(prepared.teacher), config
    )
    assert abs(float(plain.loss) - float(got.loss)) > 1e-3  # the post-processing changes the loss


def test_chat_template_on_both_teacher_paths_and_the_student(tiny_corpus, tmp_path):
    """Checkpoints whose tokenizer has a chat template get it on every sequence: the student's, the
    teacher's audio path and its text-only path (ChatML turns, targets ending in <|im_end|>)."""
    from caad.cli import UserError
    from caad.data import read_manifest
    from caad.models import tiny_student, tiny_teacher, train_tokenizer
    from caad.models.tokenizer import CHAT_SPECIAL_TOKENS, QWEN2_AUDIO_CHAT_TEMPLATE
    from caad.stage1 import generate_pseudo_gt
    from caad.train import BatchInfo

    train = tmp_path / "train.jsonl"
    generate_pseudo_gt(tiny_corpus.train, train, progress=False)
    rows = read_manifest(train)
    texts = [r.instruction for r in rows] + [r.pseudo_gt for r in rows]
    chat = train_tokenizer(texts, 400, special_tokens=CHAT_SPECIAL_TOKENS, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    tiny_teacher(chat, seed=0).save_pretrained(tmp_path / "teacher")
    tiny_student(chat, seed=1).save_pretrained(tmp_path / "student")
    teacher, student = load_speech_lm(tmp_path / "teacher"), load_speech_lm(tmp_path / "student")
    assert teacher.uses_chat_template and student.uses_chat_template
    settings = dict(train_manifest=str(train), teacher=str(tmp_path / "teacher"), student=str(tmp_path / "student"))
    config = Stage2Config(output_dir=str(tmp_path / "out"), **settings)
    method, _ = _method_with_models(config, teacher, student)
    batch = method.build_batch(rows[:2], BatchInfo("train", 0, 0, 1, 0, 1), torch.device("cpu"))
    im_start, im_end = chat.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for name in ("student", "teacher_positive", "teacher_negative"):
        path = getattr(batch, name)
        for row in range(2):
            ids = path.input_ids[row][path.attention_mask[row].bool()].tolist()
            assert ids.count(im_start) >= 2, name  # the user turn and the assistant turn
            assert ids[-1] == im_end, name  # the target ends the assistant turn
    assert batch.teacher_negative.input_features is None  # "remove": the text-only path has no audio
    # teacher and student must follow the same convention (their targets end with the same token)
    config = Stage2Config(output_dir=str(tmp_path / "out"), chat_template=False, **settings)
    plain_student = load_speech_lm(tmp_path / "student", chat_template=False)
    with pytest.raises(UserError, match="stage2.chat_template: the teacher uses a chat template and the student"):
        _method_with_models(config, teacher, plain_student)


def test_chat_template_the_checkpoint_cannot_follow_is_refused_before_writing(prepared, tmp_path):
    from caad.cli import UserError

    out = tmp_path / "out"
    with pytest.raises(UserError, match="stage2.student: could not load .*chat_template=True but the tokenizer has no"):
        train_stage2(_config(prepared, out, chat_template=True))
    assert not out.exists()
