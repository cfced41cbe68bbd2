"""caad.models: tokenizer, the SpeechLM interface, both model kinds on real (espeak-ng) speech."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from caad.data.audio import resample
from caad.data.espeak import synthesize
from caad.models import (
    AUDIO_MODES,
    IGNORE_INDEX,
    CompositeSpeechLM,
    Qwen2AudioSpeechLM,
    SpeechLM,
    audio_token_ids,
    build_prompt,
    build_speech_lm,
    build_tiny_speech_lm,
    concat_batches,
    load_speech_lm,
    tiny_composite_config,
    tiny_student,
    tiny_teacher,
    train_tokenizer,
)
from caad_kernels.reference import fused_linear_contrastive_kd_loss_reference

KINDS = ("qwen2_audio", "composite")
NEGATIVE = ("zero", "remove", "noise")

UTTERANCES = (  # (text, voice, rate wpm, pitch)
    ("The cat sat on the mat.", "m3", 175, 50),
    ("Please open the window before noon.", "f3", 240, 80),
    ("Slow words.", "m3", 110, 20),
)
INSTRUCTIONS = [
    "What did the speaker say?",
    "Is the speaker male or female?",
    "Is the speech fast or slow?",
]
TARGETS = ["The cat sat on the mat.", "female", "slow"]


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    """Real speech: three espeak-ng utterances, mono float32 at 16 kHz."""
    clips = []
    for text, voice, rate, pitch in UTTERANCES:
        samples, rate_hz = synthesize(text, voice, rate, pitch)
        clips.append(resample(samples.astype(np.float32) / 32768.0, rate_hz, 16000))
    return clips


@pytest.fixture(scope="module")
def tokenizer():
    texts = [*INSTRUCTIONS, *TARGETS, *(u[0] for u in UTTERANCES)] * 4 + [
        "The speaker is male. The speaker is female. The speech is fast, normal or slow.",
        "Which word was said: cat or window? The pitch is low or high.",
    ]
    return train_tokenizer(texts, vocab_size=384)


@pytest.fixture(scope="module")
def teachers(tokenizer) -> dict[str, SpeechLM]:
    return {kind: tiny_teacher(tokenizer, kind=kind, seed=0) for kind in KINDS}


@pytest.fixture(scope="module")
def students(tokenizer) -> dict[str, SpeechLM]:
    return {kind: tiny_student(tokenizer, kind=kind, seed=1) for kind in KINDS}


def packed(model: SpeechLM, batch):
    with torch.no_grad():
        return model(batch)


# ---- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_train_save_load_round_trip(tokenizer, tmp_path):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = audio_token_ids(tokenizer)
    assert ids == {"audio_bos": 3, "audio": 4, "audio_eos": 5}
    assert len(tokenizer) <= 384
    prompt = build_prompt(tokenizer, "Is the speaker male?")
    assert prompt == "<|bos|><|audio_bos|><|AUDIO|><|audio_eos|>Is the speaker male?\n"
    encoded = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded[:4] == [1, 3, 4, 5]  # special tokens are single tokens, never split
    assert build_prompt(tokenizer, "x", with_audio=False) == "<|bos|>x\n"

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert audio_token_ids(loaded) == ids
    assert loaded.audio_token == "<|AUDIO|>"
    assert loaded(prompt, add_special_tokens=False)["input_ids"] == encoded
    for text in ("Unseen wörds, ünïcode 你好 and \t tabs!", "The cat sat on the mat."):
        assert (
            loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
        )  # byte-level: lossless
    assert loaded.decode(encoded, skip_special_tokens=True) == "Is the speaker male?\n"


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["abc", 3])
    with pytest.raises(ValueError, match="distinct"):
        train_tokenizer(["abc"], special_tokens={"pad_token": "<|eos|>"})


# ---- forward, save/load ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_forward_on_speech_and_save_load(kind, teachers, speech, tmp_path):
    model = teachers[kind]
    batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS)
    out = packed(model, batch)

    # labels: exactly the target tokens + eos of every example, in order
    expected = []
    for target in TARGETS:
        expected += model.tokenizer(target, add_special_tokens=False)["input_ids"] + [
            model.tokenizer.eos_token_id
        ]
    assert out.labels.tolist() == expected
    assert out.hidden.shape == (len(expected), model.hidden_size)
    assert torch.isfinite(out.hidden).all()
    # audio expanded as the model says; prompt/audio/padding positions are -100
    counts = model.num_audio_tokens(batch.feature_attention_mask.sum(-1))
    assert ((batch.input_ids == model.audio_token_id).sum(-1) == counts).all()
    assert counts[0] != counts[1]  # clips of different lengths
    assert (batch.labels[batch.input_ids == model.audio_token_id] == IGNORE_INDEX).all()
    assert batch.input_features.shape[-1] == model.window_frames

    model.save_pretrained(tmp_path)
    loaded = load_speech_lm(tmp_path)
    assert type(loaded) is type(model)
    assert not loaded.training
    reloaded = packed(loaded, loaded.build_inputs(speech, INSTRUCTIONS, TARGETS))
    assert torch.equal(reloaded.labels, out.labels)
    assert torch.equal(reloaded.hidden, out.hidden)
    assert torch.equal(loaded.lm_head_weight, model.lm_head_weight)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model.model_type


@pytest.mark.parametrize("kind", KINDS)
def test_target_hidden_states_reproduce_own_logits(kind, teachers, speech):
    model = teachers[kind]
    batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS)
    out = packed(model, batch)
    with torch.no_grad():
        own = model.model(
            input_ids=batch.input_ids,
            input_features=batch.input_features,
            feature_attention_mask=batch.feature_attention_mask,
            attention_mask=batch.attention_mask,
        ).logits
    shift = batch.labels[:, 1:] != IGNORE_INDEX
    mine = out.hidden @ model.lm_head_weight.T
    if model.lm_head_bias is not None:
        mine = mine + model.lm_head_bias
    torch.testing.assert_close(mine, own[:, :-1][shift], rtol=0, atol=1e-5)
    # each packed row predicts the next input token
    assert torch.equal(out.labels, batch.input_ids[:, 1:][shift])
    assert mine.shape[-1] == len(model.tokenizer) + 64  # teacher: padded vocabulary


# ---- negative paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_negative_paths_differ_with_aligned_labels(kind, teachers, speech):
    model = teachers[kind]
    positive_batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS)
    positive = packed(model, positive_batch)
    for mode in NEGATIVE:
        batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS, audio_mode=mode)
        negative = packed(model, batch)
        assert torch.equal(negative.labels, positive.labels), mode
        assert (negative.hidden - positive.hidden).abs().max() > 1e-3, mode
        if mode == "remove":
            assert batch.input_features is None
            specials = audio_token_ids(model.tokenizer).values()
            assert not any(bool((batch.input_ids == i).any()) for i in specials)
            assert batch.input_ids.shape[1] < positive_batch.input_ids.shape[1]
        else:
            assert torch.equal(batch.input_ids, positive_batch.input_ids)
            assert torch.equal(batch.feature_attention_mask, positive_batch.feature_attention_mask)
        if mode == "zero":
            assert not batch.input_features.any()
    noise = [
        model.build_inputs(speech, INSTRUCTIONS, TARGETS, audio_mode="noise", noise_seed=s) for s in (0, 0, 1)
    ]
    assert torch.equal(noise[0].input_features, noise[1].input_features)
    assert not torch.equal(noise[0].input_features, noise[2].input_features)


@pytest.mark.parametrize("mode", NEGATIVE)
@pytest.mark.parametrize("kind", KINDS)
def test_one_batched_forward_equals_two_separate(kind, mode, teachers, speech):
    model = teachers[kind]
    positive_batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS)
    negative_batch = model.negative_inputs(positive_batch, speech, INSTRUCTIONS, TARGETS, audio_mode=mode)
    rebuilt = model.build_inputs(speech, INSTRUCTIONS, TARGETS, audio_mode=mode)
    for name in ("input_ids", "attention_mask", "labels", "input_features"):
        a, b = getattr(negative_batch, name), getattr(rebuilt, name)
        assert (a is None and b is None) or torch.equal(a, b), name

    with torch.no_grad():
        pos, neg = model.paired_target_hidden_states(positive_batch, negative_batch)
    separate_pos, separate_neg = packed(model, positive_batch), packed(model, negative_batch)
    assert torch.equal(pos.labels, separate_pos.labels) and torch.equal(neg.labels, separate_neg.labels)
    torch.testing.assert_close(pos.hidden, separate_pos.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(neg.hidden, separate_neg.hidden, rtol=0, atol=1e-5)
    both = concat_batches(positive_batch, negative_batch, model.tokenizer.pad_token_id)
    assert both.batch_size == 2 * len(speech)


# ---- teacher vs student ---------------------------------------------------------------------------


def test_teacher_student_rows_align_with_larger_teacher_vocab(teachers, students, tokenizer, speech):
    teacher, student = teachers["qwen2_audio"], students["composite"]
    assert teacher.vocab_size == len(tokenizer) + 64 and student.vocab_size == len(tokenizer)
    assert teacher.hidden_size == 128 and student.hidden_size == 64
    t_batch = teacher.build_inputs(speech, INSTRUCTIONS, TARGETS)
    s_batch = student.build_inputs(speech, INSTRUCTIONS, TARGETS)
    assert t_batch.input_ids.shape != s_batch.input_ids.shape  # different audio token counts...
    with torch.no_grad():
        pos, neg = teacher.paired_target_hidden_states(
            t_batch, teacher.negative_inputs(t_batch, speech, INSTRUCTIONS, TARGETS)
        )
    s_out = student(s_batch)
    assert torch.equal(s_out.labels, pos.labels)  # ...but the same packed target rows

    loss, kd, ce = fused_linear_contrastive_kd_loss_reference(
        s_out.hidden,
        student.lm_head_weight,
        pos.hidden,
        teacher.lm_head_weight,
        neg.hidden,
        s_out.labels,
        alpha=2.0,
        temperature=2.0,
        kd_weight=0.7,
        ce_weight=0.3,
    )
    assert torch.isfinite(loss) and kd > 0 and ce > 0
    loss.backward()  # the student's audio path is trained through the target hidden states
    for module in (student.model.audio_encoder, student.model.projector, student.model.language_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    student.zero_grad(set_to_none=True)


@pytest.mark.parametrize("text_model", ["llama", "qwen2"])
def test_composite_with_either_causal_lm(text_model, tokenizer, speech, tmp_path):
    config = tiny_composite_config(tokenizer, "student", text_model=text_model)
    model = build_speech_lm(config, tokenizer, seed=3)
    assert isinstance(model, CompositeSpeechLM)
    assert model.model.language_model.config.model_type == text_model
    batch = model.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2])
    model.save_pretrained(tmp_path)
    assert torch.equal(packed(load_speech_lm(tmp_path), batch).hidden, packed(model, batch).hidden)


# ---- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_is_deterministic_and_batch_invariant(kind, students, speech):
    model = students[kind]
    first = model.generate(speech, INSTRUCTIONS, max_new_tokens=6)
    assert isinstance(first, list) and len(first) == len(speech) and all(isinstance(t, str) for t in first)
    assert model.generate(speech, INSTRUCTIONS, max_new_tokens=6) == first
    # left padding in the batch changes nothing: each row alone gives the same text
    assert [model.generate([c], [i], max_new_tokens=6)[0] for c, i in zip(speech, INSTRUCTIONS)] == first


def test_generate_uses_kv_cache_consistently(students, speech):
    """Greedy ids of the cached loop equal the argmax of one full forward over prompt + those ids."""
    model = students["qwen2_audio"]
    ids = model.generate_ids(speech[:1], INSTRUCTIONS[:1], max_new_tokens=5)[0]
    assert 1 <= len(ids) <= 5
    prompt = model.build_inputs(speech[:1], INSTRUCTIONS[:1])
    full = replace(
        prompt,
        input_ids=torch.cat([prompt.input_ids, torch.tensor([ids])], dim=1),
        attention_mask=torch.ones(1, prompt.input_ids.shape[1] + len(ids), dtype=torch.long),
    )
    with torch.no_grad():
        logits = model.logits(full)[0, :, : len(model.tokenizer)]
    start = prompt.input_ids.shape[1]
    assert logits[start - 1 : start - 1 + len(ids)].argmax(-1).tolist() == ids


# ---- errors ---------------------------------------------------------------------------------------


def test_clear_errors(students, speech, tmp_path):
    model = students["composite"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_speech_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_speech_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_speech_lm(tmp_path)
    with pytest.raises(ValueError, match="sampling_rate"):
        model.build_inputs(speech, INSTRUCTIONS, TARGETS, sampling_rate=22050)
    with pytest.raises(ValueError, match=r"audio\[0\] must be a 1-D"):
        model.build_inputs([np.stack([speech[0], speech[0]])], INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="2-D"):
        model.build_inputs(np.zeros((1, 2, 16000), np.float32), INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match=r"audio\[0\] is 12.00 s long"):
        model.build_inputs([np.zeros(12 * 16000, np.float32)], INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match=r"audio\[0\] has 10 samples"):
        model.build_inputs([np.zeros(10, np.float32)], INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="float samples"):
        model.build_inputs([np.zeros(16000, np.int16)], INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="NaN"):
        model.build_inputs([np.full(16000, np.nan, np.float32)], INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="instructions has 2 entries"):
        model.build_inputs(speech, INSTRUCTIONS[:2])
    with pytest.raises(ValueError, match=r"targets\[0\] contains the special token"):
        model.build_inputs(speech[:1], INSTRUCTIONS[:1], ["<|AUDIO|> hi"])
    with pytest.raises(ValueError, match="audio_mode"):
        model.build_inputs(speech, INSTRUCTIONS, TARGETS, audio_mode="mute")
    with pytest.raises(ValueError, match="no labels"):
        model(model.build_inputs(speech, INSTRUCTIONS))
    assert set(AUDIO_MODES) == {"positive", *NEGATIVE}


def test_tokenizer_must_match_model(tokenizer):
    config = tiny_composite_config(tokenizer, "student")
    config.audio_token_id = 7
    with pytest.raises(ValueError, match="audio token id"):
        build_speech_lm(config, tokenizer)
    small = train_tokenizer(["tiny"] * 3)
    with pytest.raises(ValueError, match="lm_head only"):
        build_speech_lm(tiny_composite_config(small, "student"), tokenizer)
    assert isinstance(build_tiny_speech_lm(tokenizer, "qwen2_audio", "student"), Qwen2AudioSpeechLM)
