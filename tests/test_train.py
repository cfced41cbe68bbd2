"""The method-agnostic trainer with a method that is not CAAD: registry, extra trainable modules
(optimised, checkpointed and restored, never saved with the student), components, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage2_fixtures import prepare
from torch import nn

from caad.config import Stage2Config, TrainerConfig
from caad.data.audio import load_audio
from caad.methods import available_methods, get_method, register_method
from caad.models import SAMPLING_RATE, load_speech_lm
from caad.train import BatchInfo, LossOutput, Method, SetupContext, StepContext, Trainer, train
from caad.train.metrics import read_metrics


@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    return prepare(tiny_corpus, tmp_path_factory.mktemp("train") / "prepared")


class ProjectedCE(Method):
    """Cross-entropy of ``lm_head(proj(h))`` on the pseudo-GT, with ``proj`` an extra trainable
    ``Linear(H, H)`` that starts as the identity (a stand-in for layer-wise projections)."""

    name = "test-projected-ce"
    section = "toy"
    config_class = TrainerConfig

    def build_teachers(self, ctx: SetupContext) -> None:
        self.student = ctx.student  # no teachers; keep the student to tokenise

    def extra_modules(self, ctx: SetupContext) -> dict[str, nn.Module]:
        width = ctx.student.hidden_size
        proj = nn.Linear(width, width)
        with torch.no_grad():
            proj.weight.copy_(torch.eye(width))
            proj.bias.zero_()
        return {"proj": proj}

    def build_batch(self, examples, info: BatchInfo, device: torch.device):
        audio = [load_audio(row.audio_path, SAMPLING_RATE) for row in examples]
        batch = self.student.build_inputs(audio, [r.instruction for r in examples], [r.pseudo_gt for r in examples])
        return batch.to(device)

    def num_items(self, batch) -> int:
        return batch.num_target_tokens

    def loss_step(self, batch, step: StepContext) -> LossOutput:
        def logits(student, extra, inputs):
            hidden, labels = student(inputs)
            return student.lm_head(extra["proj"](hidden)), labels

        scores, labels = step.run(logits, batch)
        loss = nn.functional.cross_entropy(scores.float(), labels, reduction="sum") / step.num_items
        return LossOutput(loss, {"ce_loss": loss.detach()})


register_method(ProjectedCE)


def _config(prepared, out: Path, **overrides) -> TrainerConfig:
    settings = dict(
        train_manifest=str(prepared.train),
        student=str(prepared.student),
        output_dir=str(out),
        batch_size=4,
        max_steps=2,
        lr=3e-3,
        scheduler="constant",
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return TrainerConfig(**settings)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def test_registry():
    from caad.methods.caad import CAADMethod

    assert get_method("caad") is CAADMethod
    assert {"caad", ProjectedCE.name} <= set(available_methods())
    assert get_method(ProjectedCE.name) is ProjectedCE
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*caad"):
        get_method("nope")
    with pytest.raises(TypeError, match="needs a Stage2Config config"):
        CAADMethod(TrainerConfig())
    assert isinstance(CAADMethod(Stage2Config()).config, Stage2Config)


class _Stop(Exception):
    pass


def test_extra_modules_train_checkpoint_resume_and_stay_out_of_the_student(prepared, tmp_path, monkeypatch):
    result = train(ProjectedCE(_config(prepared, tmp_path / "a"), "toy"))
    expected = _losses(result.output_dir)
    records = read_metrics(result.metrics)
    assert sorted(expected) == [1, 2] and records[-1]["ce_loss"] == pytest.approx(records[-1]["loss"])

    # the projection was trained and is in the checkpoint; the saved student is the student alone
    states = torch.load(
        next((result.output_dir / "checkpoints" / "step_0000002").glob("*model_states.pt")), weights_only=False
    )["module"]
    proj = states["extra.proj.weight"]
    assert not torch.allclose(proj, torch.eye(proj.shape[0]))
    saved = load_speech_lm(result.final_model).state_dict()
    assert saved.keys() == load_speech_lm(prepared.student).state_dict().keys()

    # resume restores the projection too: step 2 after a crash equals the uninterrupted step 2
    original = Trainer._save_checkpoint

    def save_then_crash(self, step, with_student=True):
        original(self, step, with_student)
        if step == 1:
            raise _Stop

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(_Stop):
        train(ProjectedCE(_config(prepared, tmp_path / "b", save_every=1), "toy"))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    resumed = train(ProjectedCE(_config(prepared, tmp_path / "b", save_every=1), "toy"), resume=True)
    got = _losses(resumed.output_dir)
    assert got[2] == pytest.approx(expected[2], rel=1e-6, abs=1e-7)


def test_zero_offload_reaches_the_deepspeed_config():
    from caad.train.engine import deepspeed_config

    config = TrainerConfig(zero_stage=3, offload_optimizer="cpu", offload_param="nvme", offload_nvme_path="/nvme")
    zero = deepspeed_config(config)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": torch.cuda.is_available(), "nvme_path": "/nvme"}
    teacher = deepspeed_config(config, zero_stage=3, train=False)["zero_optimization"]
    assert "offload_optimizer" not in teacher and teacher["offload_param"]["device"] == "nvme"
    assert "offload_optimizer" not in deepspeed_config(TrainerConfig(zero_stage=2))["zero_optimization"]


def test_zero3_models_are_partitioned_while_they_load(prepared):
    """Under ZeRO-3 the weights are cut into partitions as they load (zero.Init in from_pretrained), so
    no rank holds a full copy first; the values are the checkpoint's (gathered back for the check)."""
    import deepspeed

    from caad.train.distributed import init_distributed
    from caad.train.engine import deepspeed_config, load_model, partitioned_loading_available

    assert partitioned_loading_available()  # accelerate is part of the train extra
    init_distributed()
    zero3 = deepspeed_config(TrainerConfig(zero_stage=3))
    model = load_model(str(prepared.teacher), dtype=torch.float32, ds_config=zero3)
    parameters = dict(model.named_parameters())
    assert all(hasattr(p, "ds_id") for p in parameters.values())  # ZeRO-3 parameters from the start
    reference = load_speech_lm(prepared.teacher).state_dict()
    name = "model.lm_head.weight"
    with deepspeed.zero.GatheredParameters([parameters[name]]):
        torch.testing.assert_close(parameters[name].detach().clone(), reference[name])


def test_train_command_reads_the_section_a_method_declares(prepared, tmp_path, capsys):
    """``caad train --method NAME``: the method's own section (declared outside caad.config) in the file,
    overridden on the command line; the process group is gone afterwards."""
    import torch.distributed as dist
    import yaml

    from caad.cli import main

    out = tmp_path / "out"
    section = dict(
        train_manifest=str(prepared.train),
        student=str(prepared.student),
        output_dir=str(out),
        batch_size=4,
        max_steps=1,
        progress=False,
        tensorboard=False,
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"toy": section}))
    assert main(["train", "--method", ProjectedCE.name, "--config", str(config), "toy.lr=0.02"]) == 0
    assert f"{ProjectedCE.name} [toy]: 1 steps" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["toy"]["lr"] == 0.02
    assert not dist.is_initialized()
    assert main(["train", "--method", ProjectedCE.name, "--config", str(config), "toy.lrr=1"]) == 2
    assert "unknown key 'toy.lrr'; did you mean 'toy.lr'" in capsys.readouterr().err
