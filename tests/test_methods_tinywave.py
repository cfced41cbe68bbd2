"""TinyWave (method ``tinywave``): each term against a materialising reference built from the models'
own outputs (eager attention maps, logits, block outputs), the layer map and projections, the
no-teacher mode, the checks before anything is written, and a tiny run through the trainer with resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from methods_fixtures import FakeStep, setup_context

from caad.cli import UserError
from caad.config import ConfigError
from caad.data.interleaved import InterleavedExample, Segment, UnitVocab, collate, encode_segments, write_examples
from caad.methods.layers import LayerMap
from caad.methods.tinywave import TinyWaveConfig, TinyWaveMethod, UnitBatch, UnitLMModule, load_unit_lm_module
from caad.methods.tinywave.loss import attention_term, logit_term, unit_lm_states
from caad.methods.tinywave.method import PROJECTIONS_KEY
from caad.models.unit_lm import UnitLM, build_unit_lm, build_unit_lm_tokenizer, load_unit_lm
from caad.train.method import Method

N_UNITS = 12
TEXTS = [
    "the cat sat on the mat",
    "a bird sings in the morning",
    "she reads a long book at night",
    "we walk to the river after lunch",
    "the old man paints the blue door",
    "children play near the green hill",
]
TEACHER = dict(hidden=32, layers=4, heads=4, kv_heads=2, mlp=64)
STUDENT = dict(hidden=24, layers=2, heads=2, kv_heads=1, mlp=48)


def _examples(seed: int, count: int) -> list[InterleavedExample]:
    rng = random.Random(seed)
    out = []
    for index in range(count):
        units = [rng.randrange(N_UNITS) for _ in range(rng.randint(4, 14))]
        text = rng.choice(TEXTS)
        kind = rng.choice(["speech", "text", "speech_text", "text_speech"])
        segments = {
            "speech": (Segment.speech(units),),
            "text": (Segment.of_text(text),),
            "speech_text": (Segment.speech(units), Segment.of_text(text)),
            "text_speech": (Segment.of_text(text), Segment.speech(units)),
        }[kind]
        out.append(InterleavedExample(f"ex{seed}-{index}", kind, f"clip{index}", segments, 1.0))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer, a teacher and a student unit LM (4 vs 2 layers, width 32 vs 24, 4 vs 2 heads), saved."""
    root = tmp_path_factory.mktemp("tinywave")
    tokenizer = build_unit_lm_tokenizer(TEXTS, N_UNITS, vocab_size=300)
    UnitLM(build_unit_lm(tokenizer, TEACHER, seed=0), tokenizer).save(root / "teacher")
    UnitLM(build_unit_lm(tokenizer, STUDENT, seed=1), tokenizer).save(root / "student")
    write_examples(root / "train.jsonl", _examples(0, 12))
    write_examples(root / "validation.jsonl", _examples(1, 3))
    return root


def _batch(tiny, count: int = 3) -> UnitBatch:
    module = load_unit_lm_module(tiny / "student")
    vocab = UnitVocab.from_tokenizer(module.tokenizer)
    ids = [encode_segments(module.tokenizer, vocab, e.segments) for e in _examples(7, count)]
    batch = collate(ids, vocab)
    assert (batch["attention_mask"] == 0).any(), "the test batch should hold padding"
    return UnitBatch(batch["input_ids"], batch["attention_mask"], batch["labels"])


def _eager(module: UnitLMModule) -> UnitLMModule:
    module.model.set_attn_implementation("eager")
    return module


def _method(tiny, **settings) -> tuple[TinyWaveMethod, UnitLMModule, dict]:
    settings = {"teacher": str(tiny / "teacher"), **settings}
    config = TinyWaveConfig(
        train_manifest=str(tiny / "train.jsonl"),
        student=str(tiny / "student"),
        output_dir=str(tiny / "unused"),
        **settings,
    )
    config.validate("tinywave")
    method = TinyWaveMethod(config)
    student = _eager(load_unit_lm_module(tiny / "student")).train()
    ctx = setup_context(student)
    base = ctx.load_frozen

    def load_frozen(path, loader):
        return _eager(base(path, loader=loader))

    ctx.load_frozen = load_frozen
    method.build_teachers(ctx)
    extra = method.extra_modules(ctx)
    return method, student, extra


def _reference_forward(model, batch):
    """Logits, eager attention maps and the block outputs (hooks on the blocks) of a Hugging Face causal LM."""
    blocks = {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: blocks.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits, out.attentions, blocks


def _kl_rows(p, log_q):
    """``sum_j p log(p / q)`` over the last dimension, with ``0 log 0 = 0``."""
    log_p = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _attention_reference(maps_s, maps_t, mask, groups, tau=1.0):
    """Sum over valid query rows of the mean over student heads of KL(p_t || q_s), from ``[B, H, T, T]``
    probability maps; ``tau`` re-tempers them (``softmax(log p / tau)`` over the visible keys), teacher heads
    first, then averaged over each student head's group."""

    def temper(p):
        p = p.double()
        if tau == 1.0:
            return p
        logits = torch.where(p > 0, p.clamp_min(1e-300).log() / tau, torch.full_like(p, -torch.inf))
        return torch.softmax(logits, -1).nan_to_num(0.0)

    p = torch.stack([temper(maps_t[:, g]).mean(1) for g in groups], 1)  # [B, Hs, T, T]
    q = temper(maps_s)
    kl = _kl_rows(p, torch.where(q > 0, q.clamp_min(1e-300).log(), torch.zeros_like(q)))  # [B, Hs, T]
    return (kl.mean(1) * mask).sum() * tau**2


# ---- layer map, projections, checks ---------------------------------------------------------------------


def test_uniform_map_and_projections_where_widths_differ(tiny):
    method, student, extra = _method(tiny)
    assert method.layer_map == LayerMap(((1, 2), (2, 4)))
    proj = extra[PROJECTIONS_KEY].proj
    assert sorted(proj) == ["s1_t2", "s2_t4"] and proj["s1_t2"].weight.shape == (32, 24)
    method, _, extra = _method(tiny, layer_map=[[2, 3]], hidden_weight=0.0)
    assert method.layer_map.pairs == ((2, 3),) and extra == {}  # no hidden term, no projection


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(layer_map=[[3, 1]]), "unknown student layer 3"),
        (dict(layer_map=[[1, 5]]), "unknown teacher layer 5"),
        (dict(attention_head_map=[0, 1, 2]), "has 3 entries, the student has 2"),
        (dict(attention_head_map=[0, 4]), "names teacher head 4"),
        (dict(attention_head_groups=[[0, 1], [2, 9]]), "names teacher head 9"),
    ],
)
def test_bad_maps_fail_before_training(tiny, settings, message):
    with pytest.raises(UserError, match=message):
        _method(tiny, **settings)


def test_projection_none_and_other_vocabularies_and_config_checks(tiny, tmp_path):
    method, student, _ = _method(tiny, projection="none", hidden_weight=0.0)  # no hidden term: allowed
    with pytest.raises(UserError, match="projection is 'none'"):
        _method(tiny, projection="none")
    other = build_unit_lm_tokenizer(TEXTS[:3], N_UNITS, vocab_size=280)
    UnitLM(build_unit_lm(other, TEACHER, seed=0), other).save(tmp_path / "other")
    with pytest.raises(UserError, match="another vocabulary"):
        _method(tiny, teacher=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="tinywave.teacher is required"):
        TinyWaveConfig(
            train_manifest=str(tiny / "train.jsonl"), student=str(tiny / "student"), output_dir=str(tmp_path / "o")
        ).check_paths("tinywave")
    with pytest.raises(ConfigError, match="tinywave.ce_weight must be > 0"):
        TinyWaveConfig(hidden_weight=0.0, attention_weight=0.0, logit_weight=0.0, ce_weight=0.0).validate("tinywave")
    with pytest.raises(ConfigError, match="tinywave.data_check must be false"):
        TinyWaveConfig(data_check=True).validate("tinywave")
    with pytest.raises(ConfigError, match="not both"):
        TinyWaveConfig(attention_head_map=[0, 1], attention_head_groups=[[0], [1]]).validate("tinywave")


def test_examples_fail_with_their_key(tiny, tmp_path):
    method, student, _ = _method(tiny)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "kind": "speech", "source": "c", "segments": [{"speech": [99]}]}) + "\n")
    examples = method.load_examples(str(bad), "tinywave.train_manifest")
    with pytest.raises(UserError, match=r"tinywave.train_manifest: example 'x'.*units must lie in \[0, 12\)"):
        method.fit_examples(examples, "train", setup_context(student))
    bad.write_text("")
    with pytest.raises(UserError, match="holds no interleaved example"):
        method.load_examples(str(bad), "tinywave.train_manifest")


# ---- each term against a materialising reference --------------------------------------------------------


def test_states_are_the_models_own(tiny):
    batch = _batch(tiny)
    model = _eager(load_unit_lm_module(tiny / "teacher")).model
    with torch.no_grad():
        states = unit_lm_states(model, batch.input_ids, batch.attention_mask, batch.labels, [1, 4], [2])
        logits, maps, blocks = _reference_forward(model, batch)
    rows = batch.labels[:, 1:] != -100
    torch.testing.assert_close(states.final @ model.lm_head.weight.T, logits[:, :-1][rows], rtol=1e-5, atol=1e-5)
    for layer in (1, 4):
        torch.testing.assert_close(states.hidden[layer], blocks[layer][:, :-1][rows])
    captured = states.attention[2]
    assert captured.query.shape == (3, 4, batch.input_ids.shape[1], 8) and captured.key.shape[1] == 2


@pytest.mark.parametrize("heads", [None, [3, 0], [[0, 2], [1, 2, 3]]])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_attention_term_against_eager_maps(tiny, heads, tau):
    batch = _batch(tiny)
    teacher = _eager(load_unit_lm_module(tiny / "teacher")).model
    student = _eager(load_unit_lm_module(tiny / "student")).model
    with torch.no_grad():
        t_states = unit_lm_states(teacher, batch.input_ids, batch.attention_mask, batch.labels, (), [3])
        _, t_maps, _ = _reference_forward(teacher, batch)
    s_states = unit_lm_states(student, batch.input_ids, batch.attention_mask, batch.labels, (), [2])
    got = attention_term(
        s_states.attention[2], t_states.attention[3], batch.attention_mask, teacher_heads=heads, temperature=tau
    )
    got.backward()
    grad = student.model.layers[1].self_attn.q_proj.weight.grad.clone()
    student.zero_grad()
    if heads is None:
        groups = [[0, 1], [2, 3]]  # 4 teacher heads averaged in pairs for 2 student heads
    else:
        groups = [[h] if isinstance(h, int) else h for h in heads]
    _, s_maps, _ = _reference_forward(student, batch)
    want = _attention_reference(s_maps[1], t_maps[2], batch.attention_mask, groups, tau)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, student.model.layers[1].self_attn.q_proj.weight.grad, rtol=1e-3, atol=1e-6)
    assert float(want.detach()) > 0


def test_logit_term_against_materialised_logits(tiny):
    batch = _batch(tiny)
    teacher = load_unit_lm_module(tiny / "teacher").model
    student = load_unit_lm_module(tiny / "student").model
    rows = batch.labels[:, 1:] != -100
    labels = batch.labels[:, 1:][rows]
    with torch.no_grad():
        t_states = unit_lm_states(teacher, batch.input_ids, batch.attention_mask, batch.labels)
        z_t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][rows]
    s_states = unit_lm_states(student, batch.input_ids, batch.attention_mask, batch.labels)
    out = logit_term(
        s_states.final,
        student.lm_head.weight,
        t_states.final,
        teacher.lm_head.weight,
        labels,
        50,
        logit_weight=0.7,
        ce_weight=0.3,
        temperature=2.0,
        backend="torch",
    )
    z_s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][rows].double()
    kd = _kl_rows(torch.softmax(z_t.double() / 2, -1), torch.log_softmax(z_s / 2, -1)).sum() * 4 / 50
    ce = torch.nn.functional.cross_entropy(z_s, labels, reduction="sum") / 50
    torch.testing.assert_close(out.kd_loss.double(), kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.ce_loss.double(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), 0.7 * kd + 0.3 * ce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_loss_step_equals_the_reference_with_gradients(tiny, hidden_loss):
    weights = dict(hidden_weight=0.6, attention_weight=0.4, logit_weight=0.5, ce_weight=0.2)
    method, student, extra = _method(tiny, hidden_loss=hidden_loss, temperature=2.0, loss_backend="torch", **weights)
    batch = _batch(tiny)
    n = batch.num_items + 5  # the global batch holds more items than this micro-batch
    with torch.no_grad():  # the identity-initialised projections move, so the test covers a general one
        for linear in extra[PROJECTIONS_KEY].proj.values():
            linear.weight.add_(0.05 * torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(0)))
    step = FakeStep(student, extra, num_items=n)
    out = method.loss_step(batch, step)
    params = [p for p in list(student.parameters()) + list(step.extra.parameters())]
    got_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    teacher = method.teacher.model
    with torch.no_grad():
        z_t, t_maps, t_blocks = _reference_forward(teacher, batch)
    z_s, s_maps, s_blocks = _reference_forward(student.model, batch)
    rows = batch.labels[:, 1:] != -100
    hidden, attention = [], []
    for s, t in ((1, 2), (2, 4)):
        linear = extra[PROJECTIONS_KEY].proj[f"s{s}_t{t}"]
        h_s = s_blocks[s][:, :-1][rows].double() @ linear.weight.double().T + linear.bias.double()
        h_t = t_blocks[t][:, :-1][rows].double()
        if hidden_loss == "mse":
            hidden.append(((h_s - h_t) ** 2).mean(-1).sum() / n)
        else:
            hidden.append((1 - torch.nn.functional.cosine_similarity(h_s, h_t, dim=-1)).sum() / n)
        attention.append(_attention_reference(s_maps[s - 1], t_maps[t - 1], batch.attention_mask, [[0, 1], [2, 3]]) / n)
    labels = batch.labels[:, 1:][rows]
    s_rows = z_s[:, :-1][rows].double()
    kd = _kl_rows(torch.softmax(z_t[:, :-1][rows].double() / 2, -1), torch.log_softmax(s_rows / 2, -1)).sum() * 4 / n
    ce = torch.nn.functional.cross_entropy(s_rows, labels, reduction="sum") / n
    want = 0.6 * sum(hidden) / 2 + 0.4 * sum(attention) / 2 + 0.5 * kd + 0.2 * ce
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-4, atol=1e-6)
    for name, value in (
        ("hidden_loss", sum(hidden) / 2),
        ("attention_loss", sum(attention) / 2),
        ("kd_loss", kd),
        ("ce_loss", ce),
        ("hidden_s2_t4_loss", hidden[1]),
        ("attention_s1_t2_loss", attention[0]),
    ):
        torch.testing.assert_close(out.components[name].double(), value.detach(), rtol=1e-4, atol=1e-6)
    for p, got in zip(params, got_grads):
        torch.testing.assert_close(got, p.grad, rtol=2e-3, atol=2e-6)


def test_without_a_teacher_it_is_next_token_training(tiny):
    method, student, extra = _method(tiny, teacher=None, hidden_weight=0.0, attention_weight=0.0, logit_weight=0.0)
    assert method.teacher is None and extra == {}
    batch = _batch(tiny)
    out = method.loss_step(batch, FakeStep(student, extra, num_items=batch.num_items))
    logits = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert set(out.components) == {"ce_loss"}


# ---- through the trainer --------------------------------------------------------------------------------

needs_hook = pytest.mark.skipif(
    not hasattr(Method, "student_loader"),
    reason="the trainer does not load a method's own student yet (Method.student_loader, see caad/methods/tinywave)",
)


def _settings(tiny, output_dir, **overrides):
    settings = dict(
        train_manifest=str(tiny / "train.jsonl"),
        validation_manifest=str(tiny / "validation.jsonl"),
        student=str(tiny / "student"),
        teacher=str(tiny / "teacher"),
        output_dir=str(output_dir),
        batch_size=3,
        max_steps=2,
        lr=3e-3,
        scheduler="constant",
        eval_every=2,
        progress=False,
        tensorboard=False,
        loss_backend="torch",
    )
    settings.update(overrides)
    return TinyWaveConfig(**settings)


class _Stop(Exception):
    pass


@pytest.mark.slow
@needs_hook
def test_teacher_first_then_distillation_through_the_trainer_with_resume(tiny, tmp_path, monkeypatch):
    from caad.train import Trainer, train
    from caad.train.metrics import read_metrics

    # the teacher first: the same method with no teacher is next-token training
    pre = train(
        TinyWaveMethod(
            _settings(
                tiny,
                tmp_path / "teacher",
                student=str(tiny / "teacher"),
                teacher=None,
                hidden_weight=0.0,
                attention_weight=0.0,
                logit_weight=0.0,
            )
        )
    )
    teacher = load_unit_lm(pre.final_model)
    assert teacher.tokenizer.get_vocab() == load_unit_lm(tiny / "teacher").tokenizer.get_vocab()

    result = train(TinyWaveMethod(_settings(tiny, tmp_path / "a", teacher=str(pre.final_model))))
    records = read_metrics(result.metrics)
    last = records[-1]
    for name in ("hidden_loss", "attention_loss", "kd_loss", "ce_loss", "attention_s2_t4_loss", "val_loss"):
        assert last[name] is not None and last[name] >= 0, name
    expected = last["hidden_loss"] + last["attention_loss"] + last["kd_loss"] + last["ce_loss"]
    assert last["loss"] == pytest.approx(expected, rel=1e-5)
    student = load_unit_lm(result.final_model)  # a unit-LM folder; the projections stay out of it
    assert student.model.state_dict().keys() == load_unit_lm(tiny / "student").model.state_dict().keys()
    assert not torch.equal(student.model.lm_head.weight, load_unit_lm(tiny / "student").model.lm_head.weight)

    original = Trainer._save_checkpoint

    def save_then_crash(self, step, with_student=True):
        original(self, step, with_student)
        if step == 1:
            raise _Stop

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(_Stop):
        train(TinyWaveMethod(_settings(tiny, tmp_path / "b", teacher=str(pre.final_model), save_every=1)))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    resumed = train(
        TinyWaveMethod(_settings(tiny, tmp_path / "b", teacher=str(pre.final_model), save_every=1)), resume=True
    )
    got = read_metrics(resumed.metrics)[-1]
    assert got["step"] == 2 and got["loss"] == pytest.approx(last["loss"], rel=1e-6, abs=1e-7)
