"""Layer-wise distillation (caad.methods.layers, caad.methods.layerwise): the layer map, captured layer
outputs, projections, the loss against a reference, bad configs, and a tiny run through the trainer."""

from __future__ import annotations

import pytest
import torch
from methods_fixtures import (
    FakeStep,
    answer_positions,
    naive_answer_loss,
    setup_context,
    text_logits,
    trainer_settings,
)

from caad.cli import UserError
from caad.config import ConfigError
from caad.data import read_manifest
from caad.methods import get_method
from caad.methods.layers import (
    LayerMap,
    LayerProjections,
    answer_rows,
    capture_layers,
    decoder_layers,
    hidden_state_loss,
)
from caad.methods.layerwise import LayerWiseConfig, LayerWiseMethod
from caad.methods.layerwise.method import PROJECTIONS_KEY
from caad.models import load_speech_lm
from caad.train import BatchInfo, train

INFO = BatchInfo("train", 0, 0, 1, 0, 1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def models(method_models):
    return method_models


# ---- the layer map and projections ----------------------------------------------------------------


def test_uniform_layer_map():
    assert LayerMap.uniform(2, 4).pairs == ((1, 2), (2, 4))
    assert LayerMap.uniform(4, 2).pairs == ((1, 1), (2, 1), (3, 2), (4, 2))
    assert LayerMap.uniform(3, 12).pairs == ((1, 4), (2, 8), (3, 12))
    assert LayerMap.uniform(2, 2).pairs == ((1, 1), (2, 2))
    assert LayerMap.from_config([], 2, 4) == LayerMap.uniform(2, 4)
    assert LayerMap.from_config([[2, 1]], 2, 4).pairs == ((2, 1),)
    assert LayerMap.from_config([[2, 3], [1, 1]], 2, 4).teacher_layers == [1, 3]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([[3, 1]], r"layer_map\[0\]: unknown student layer 3; the student has layers 1..2"),
        ([[1, 1], [2, 5]], r"layer_map\[1\]: unknown teacher layer 5; the teacher has layers 1..4"),
        ([[0, 1]], "unknown student layer 0"),
        ([[1, 1], [1, 2]], "student layer 1 is mapped twice"),
        ([[1]], r"layer_map\[0\] must be a pair"),
    ],
)
def test_bad_layer_maps(pairs, message):
    with pytest.raises(ValueError, match=message):
        LayerMap.from_config(pairs, 2, 4)


def test_projections_where_widths_differ():
    layer_map = LayerMap.uniform(2, 4)
    auto = LayerProjections(layer_map, 64, 128, "auto")
    assert sorted(auto.proj) == ["s1_t2", "s2_t4"]
    hidden = torch.randn(5, 64)
    out = auto(1, 2, hidden)
    assert out.shape == (5, 128)
    # identity initialisation: the student's states land in the first 64 columns, zeros after
    assert torch.equal(out[:, :64], hidden) and torch.equal(out[:, 64:], torch.zeros(5, 64))
    assert len(LayerProjections(layer_map, 64, 64, "auto").proj) == 0
    same = LayerProjections(layer_map, 64, 64, "auto")
    assert same(1, 2, hidden) is hidden
    assert sorted(LayerProjections(layer_map, 64, 64, "linear").proj) == ["s1_t2", "s2_t4"]
    with pytest.raises(ValueError, match=r"projection is 'none' but .*\(64 wide, layer 1\).*\(128 wide, layer 2\)"):
        LayerProjections(layer_map, 64, 128, "none")
    with pytest.raises(KeyError, match="not a pair"):
        same(2, 2, hidden)
    a = LayerProjections(layer_map, 64, 128, "linear", init="default", seed=3)
    b = LayerProjections(layer_map, 64, 128, "linear", init="default", seed=3)
    assert torch.equal(a.proj["s1_t2"].weight, b.proj["s1_t2"].weight)


def test_hidden_state_losses_against_their_formulas():
    s, t = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    mse = sum(float(((s[i] - t[i]) ** 2).mean()) for i in range(6))
    cos = sum(1 - float(s[i] @ t[i] / (s[i].norm() * t[i].norm())) for i in range(6))
    assert float(hidden_state_loss(s, t, "mse")) == pytest.approx(mse, rel=1e-6)
    assert float(hidden_state_loss(s, t, "cosine")) == pytest.approx(cos, rel=1e-6)
    assert float(hidden_state_loss(t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_state_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="kind must be one of"):
        hidden_state_loss(s, t, "l1")


def test_captured_layers_are_the_block_outputs(models):
    from caad.models.text_lm import build_text_batch, load_text_lm

    teacher, tokenizer = load_text_lm(models.text_teacher)
    student = load_speech_lm(models.student)
    assert len(decoder_layers(teacher)) == 2 and len(decoder_layers(student)) == 2
    assert len(decoder_layers(load_speech_lm(models.acoustic_teacher))) == 2
    batch = build_text_batch(tokenizer, ["What is two plus three?", "Which day follows Monday?"], ["five", "tuesday"])
    with torch.no_grad(), capture_layers(teacher, [1]) as captured:
        out = teacher(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
        )
    # hidden_states[l] is the output of block l (the last one is after the final norm, so compare block 1)
    assert torch.allclose(captured[1], out.hidden_states[1], atol=1e-6)
    assert captured[1].shape == out.hidden_states[1].shape
    hooks = decoder_layers(teacher)[0]._forward_hooks.values()  # transformers adds its own: ours are gone
    assert not any("capture_layers" in hook.__qualname__ for hook in hooks)
    rows = answer_rows(captured[1], batch.labels)
    assert torch.equal(rows, captured[1][:, :-1][answer_positions(batch.labels)])
    with pytest.raises(ValueError, match="layer 3 does not exist: the model has layers 1..2"):
        with capture_layers(teacher, [3]):
            pass


# ---- the method ---------------------------------------------------------------------------------


def _method(models, tmp_path, **overrides):
    settings = trainer_settings(models, tmp_path / "out", teacher=str(models.text_teacher))
    settings.update(overrides)
    method = LayerWiseMethod(LayerWiseConfig(**settings), "layerwise")
    student = load_speech_lm(models.student)
    ctx = setup_context(student)
    method.build_teachers(ctx)
    extra = method.extra_modules(ctx)
    return method, student, extra


@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_loss_equals_a_reference(models, tmp_path, hidden_loss):
    method, student, extra = _method(
        models, tmp_path, hidden_loss=hidden_loss, layer_map=[[1, 2], [2, 1]], layer_weights=[0.25, 2.0],
        hidden_weight=3.0, kd_weight=0.6, ce_weight=0.4, projection="auto",
    )  # fmt: skip
    projections = extra[PROJECTIONS_KEY]
    with torch.no_grad():  # away from the identity start, so that the projection matters
        for linear in projections.proj.values():
            linear.weight.add_(0.05 * torch.randn_like(linear.weight))
    assert sorted(projections.proj) == ["s1_t2", "s2_t1"]  # student 64 wide, text teacher 128
    batch = method.build_batch(read_manifest(models.train)[:3], INFO, torch.device("cpu"))
    total = batch.paired.num_items + 2
    step = FakeStep(student, extra, num_items=total)
    out = method.loss_step(batch, step)
    grads = (student.lm_head_weight.grad.clone(), projections.proj["s1_t2"].weight.grad.clone())
    student.zero_grad()
    projections.zero_grad()

    # reference: teacher block outputs from output_hidden_states, the student's from the hooks
    inputs, text = batch.paired.student["s2t"], batch.paired.teacher
    with torch.no_grad():
        t_out = method.teacher(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            position_ids=text.position_ids,
            output_hidden_states=True,
        )
    t_mask = answer_positions(text.labels)
    t_rows = {layer: t_out.hidden_states[layer][:, :-1][t_mask] for layer in (1, 2)}
    t_rows[2] = None  # block 2's output is not in hidden_states (the last entry is after the norm)
    with torch.no_grad(), capture_layers(method.teacher, [2]) as cap:
        method.teacher(input_ids=text.input_ids, attention_mask=text.attention_mask, position_ids=text.position_ids)
    t_rows[2] = cap[2][:, :-1][t_mask]
    with capture_layers(student, [1, 2]) as s_cap:
        s_logits = student.logits(inputs)[:, :-1][answer_positions(inputs.labels)]
    s_mask = answer_positions(inputs.labels)

    def distance(a, b):
        a, b = a.double(), b.double()
        if hidden_loss == "mse":
            return ((a - b) ** 2).mean(-1).sum()
        return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum()

    hidden = 0.0
    for (s, t), w in zip(((1, 2), (2, 1)), (0.25, 2.0)):
        linear = projections.proj[f"s{s}_t{t}"]
        projected = s_cap[s][:, :-1][s_mask].double() @ linear.weight.double().T + linear.bias.double()
        term = distance(projected, t_rows[t]) / total
        assert out.components[f"hidden_s{s}_t{t}_loss"] == pytest.approx(float(term.detach()), rel=1e-5)
        hidden = hidden + w * term
    t_logits = text_logits(method.teacher, text)[:, :-1][t_mask].detach()
    rows, _, _ = naive_answer_loss(s_logits, t_logits, batch.paired.labels, tau=2.0, kd_weight=0.6, ce_weight=0.4)
    reference = rows.sum() / total + 3.0 * hidden
    assert float(out.loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert out.components["hidden_loss"] == pytest.approx(float(hidden.detach()), rel=1e-5)
    reference.backward()
    assert torch.allclose(grads[0], student.lm_head_weight.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(grads[1], projections.proj["s1_t2"].weight.grad, atol=1e-6, rtol=1e-4)


def test_speech_teacher_and_bad_configs(models, tmp_path):
    method, _, extra = _method(models, tmp_path, teacher=str(models.acoustic_teacher), teacher_kind="speech")
    assert method.layer_map.pairs == ((1, 1), (2, 2))
    batch = method.build_batch(read_manifest(models.train)[:2], INFO, torch.device("cpu"))
    assert torch.equal(batch.teacher_speech.labels[batch.teacher_speech.labels != -100], batch.paired.labels)

    with pytest.raises(UserError, match=r"layerwise.layer_map\[0\]: unknown student layer 3"):
        _method(models, tmp_path, layer_map=[[3, 1]])
    with pytest.raises(UserError, match=r"layerwise.layer_map\[0\]: unknown teacher layer 7"):
        _method(models, tmp_path, layer_map=[[1, 7]])
    with pytest.raises(UserError, match="layerwise.projection is 'none' but .* differ in width"):
        _method(models, tmp_path, projection="none")
    with pytest.raises(UserError, match="layerwise.layer_weights has 1 entries but the layer map 2"):
        _method(models, tmp_path, layer_weights=[1.0])
    base = trainer_settings(models, tmp_path / "out", teacher=str(models.text_teacher))
    for overrides, message in [
        (dict(hidden_weight=-1.0), "layerwise.hidden_weight must be >= 0"),
        (dict(layer_weights=[0.0, 0.0]), "layerwise.layer_weights must be non-negative with a positive sum"),
        (dict(layer_map=[[1, 1]], layer_weights=[1.0, 1.0]), "layerwise.layer_weights has 2 entries"),
        (dict(layer_map=[[0, 1]]), r"layerwise.layer_map\[0\] must be"),
        (dict(kd_weight=0.0, ce_weight=0.0, hidden_weight=0.0), "layerwise.kd_weight"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LayerWiseConfig(**{**base, **overrides}).validate("layerwise")
    LayerWiseConfig(**{**base, "kd_weight": 0.0, "ce_weight": 0.0}).validate("layerwise")  # hidden terms alone
    with pytest.raises(ConfigError, match="layerwise.teacher is required"):
        LayerWiseConfig(**{**base, "teacher": None}).check_paths("layerwise")
    assert get_method("layerwise") is LayerWiseMethod


@pytest.mark.slow
def test_tiny_run_trains_the_projections_and_keeps_them_out_of_the_student(models, tmp_path):
    config = LayerWiseConfig(**trainer_settings(models, tmp_path / "run", teacher=str(models.text_teacher)))
    result = train(LayerWiseMethod(config, "layerwise"))
    states = torch.load(
        next((result.output_dir / "checkpoints" / "step_0000002").glob("*model_states.pt")), weights_only=False
    )["module"]
    weight = states[f"extra.{PROJECTIONS_KEY}.proj.s1_t1.weight"]
    start = torch.zeros_like(weight)
    start.fill_diagonal_(1.0)
    assert weight.shape == (128, 64) and not torch.allclose(weight, start)
    assert load_speech_lm(result.final_model).state_dict().keys() == load_speech_lm(models.student).state_dict().keys()
    assert {"hidden_loss", "hidden_s1_t1_loss", "hidden_s2_t2_loss", "kd_loss", "ce_loss"} <= set(result.last)
