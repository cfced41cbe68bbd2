"""caad.models: tokenizer, the SpeechLM interface, both model kinds on real (espeak-ng) speech."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CohereConfig, Gemma2Config, GraniteConfig

from caad.data.audio import resample
from caad.data.espeak import synthesize
from caad.models import (
    AUDIO_MODES,
    CHAT_SPECIAL_TOKENS,
    DEFAULT_NEGATIVE_MODE,
    IGNORE_INDEX,
    NEGATIVE_MODES,
    QWEN2_AUDIO_CHAT_TEMPLATE,
    CompositeSpeechLM,
    Qwen2AudioSpeechLM,
    SpeechLM,
    audio_token_ids,
    build_prompt,
    build_speech_lm,
    build_tiny_speech_lm,
    chat_prompt,
    concat_batches,
    end_of_turn_token,
    load_speech_lm,
    logit_postprocessing,
    resolve_audio_mode,
    tiny_composite_config,
    tiny_student,
    tiny_teacher,
    train_tokenizer,
)
from caad_kernels.reference import fused_linear_contrastive_kd_loss_reference

KINDS = ("qwen2_audio", "composite")
NEGATIVE = ("remove", "silence_fixed_length", "zero_features_keep_length", "noise_keep_length")

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
    specials = audio_token_ids(model.tokenizer).values()
    for mode in NEGATIVE:
        batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS, audio_mode=mode)
        negative = packed(model, batch)
        assert batch.audio_mode == mode
        assert torch.equal(negative.labels, positive.labels), mode
        assert (negative.hidden - positive.hidden).abs().max() > 1e-3, mode
        if mode == "remove":
            assert batch.input_features is None
            assert not any(bool((batch.input_ids == i).any()) for i in specials)
            assert batch.input_ids.shape[1] < positive_batch.input_ids.shape[1]
        elif mode == "silence_fixed_length":
            # every row: the same audio token count (1 s of silence) and the same features
            counts = (batch.input_ids == model.audio_token_id).sum(-1)
            expected = model.num_audio_tokens(torch.tensor([16000 // 160]))
            assert (counts == expected).all()
            assert (batch.input_features == batch.input_features[:1]).all()
            silence, _ = model.extract_features([np.zeros(16000, np.float32)])
            assert torch.equal(batch.input_features[0], silence[0])
        else:  # the *_keep_length modes keep the clip's duration (token count and feature mask)
            assert torch.equal(batch.input_ids, positive_batch.input_ids)
            assert torch.equal(batch.feature_attention_mask, positive_batch.feature_attention_mask)
        if mode == "zero_features_keep_length":
            assert not batch.input_features.any()
    noise = [
        model.build_inputs(speech, INSTRUCTIONS, TARGETS, audio_mode="noise_keep_length", noise_seed=s)
        for s in (0, 0, 1)
    ]
    assert torch.equal(noise[0].input_features, noise[1].input_features)
    assert not torch.equal(noise[0].input_features, noise[2].input_features)


@pytest.mark.parametrize("kind", KINDS)
def test_default_negative_hides_content_and_duration(kind, teachers, speech):
    """Two clips of different lengths: the default negative inputs (and hidden states) are identical."""
    model = teachers[kind]
    short, long = speech[2], speech[1]
    instruction, target = [INSTRUCTIONS[2]], [TARGETS[2]]
    positives = [model.build_inputs([clip], instruction, target) for clip in (short, long)]
    assert positives[0].input_ids.shape[1] < positives[1].input_ids.shape[1]  # the durations differ
    assert DEFAULT_NEGATIVE_MODE == "remove"
    for mode in ("remove", "silence_fixed_length"):
        batches = []
        for clip in (short, long):
            positive = model.build_inputs([clip], instruction, target)
            default = model.negative_inputs(positive, [clip], instruction, target)
            batches.append(model.negative_inputs(positive, [clip], instruction, target, audio_mode=mode))
            if mode == "remove":
                assert default.audio_mode == "remove"
                batches[-1] = default
        a, b = batches
        for name in ("input_ids", "attention_mask", "labels", "input_features", "feature_attention_mask"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), (mode, name)
        assert torch.equal(packed(model, a).hidden, packed(model, b).hidden)
    for mode in ("zero_features_keep_length", "noise_keep_length"):  # these leak the duration
        a, b = (model.build_inputs([clip], instruction, target, audio_mode=mode) for clip in (short, long))
        assert a.input_ids.shape != b.input_ids.shape, mode


def test_negative_mode_names_and_aliases(teachers, speech):
    model = teachers["composite"]
    assert NEGATIVE_MODES[0] == DEFAULT_NEGATIVE_MODE
    assert resolve_audio_mode("zero") == "zero_features_keep_length"
    assert resolve_audio_mode("noise", negative=True) == "noise_keep_length"
    old = model.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2], audio_mode="zero")
    new = model.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2], audio_mode="zero_features_keep_length")
    assert old.audio_mode == "zero_features_keep_length" and torch.equal(old.input_ids, new.input_ids)
    with pytest.raises(ValueError, match=r"audio_mode must be one of .*'zero' \(= 'zero_features_keep_length'\)"):
        model.build_inputs(speech[:1], INSTRUCTIONS[:1], audio_mode="mute")
    with pytest.raises(ValueError, match="audio_mode must be one of"):
        model.negative_inputs(old, speech[:2], INSTRUCTIONS[:2], TARGETS[:2], audio_mode="positive")
    with pytest.raises(ValueError, match="silence_seconds"):
        model.build_inputs(speech[:1], INSTRUCTIONS[:1], audio_mode="silence_fixed_length", silence_seconds=60.0)


def test_noise_negative_does_not_depend_on_batch_composition(students, speech):
    """Issue 12 item 10: noise is seeded per clip, so a row's negative path and its contrastive decoding
    are the same alone and inside a batch (at any position)."""
    model = students["qwen2_audio"]
    batch = model.build_inputs(speech, INSTRUCTIONS, audio_mode="noise_keep_length", noise_seed=5)
    for index in range(len(speech)):
        alone = model.build_inputs(
            [speech[index]], [INSTRUCTIONS[index]], audio_mode="noise_keep_length", noise_seed=5
        )
        assert torch.equal(batch.input_features[index], alone.input_features[0])
    reordered = model.build_inputs(speech[::-1], INSTRUCTIONS[::-1], audio_mode="noise_keep_length", noise_seed=5)
    assert torch.equal(reordered.input_features.flip(0), batch.input_features)
    from caad.eval.generation import contrastive_generate_ids

    options = dict(alpha=3.0, negative_mode="noise_keep_length", max_new_tokens=4, noise_seed=5)
    together = contrastive_generate_ids(model, speech, INSTRUCTIONS, **options)
    assert [contrastive_generate_ids(model, [c], [i], **options)[0] for c, i in zip(speech, INSTRUCTIONS)] == together


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


# ---- chat templates -------------------------------------------------------------------------------

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A tiny tokenizer laid out like Qwen2-Audio-Instruct's: ChatML tokens and an audio chat template."""
    texts = [*INSTRUCTIONS, *TARGETS, *(u[0] for u in UTTERANCES), "You are a helpful assistant."] * 4
    return train_tokenizer(
        texts, vocab_size=384, special_tokens=CHAT_SPECIAL_TOKENS, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def chat_models(chat_tokenizer) -> dict[str, SpeechLM]:
    return {
        "teacher": tiny_teacher(chat_tokenizer, kind="qwen2_audio", seed=0),
        "student": tiny_student(chat_tokenizer, kind="composite", seed=1),
    }


def _collapse_audio(ids: list[int], audio_id: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        if token == audio_id and out and out[-1] == audio_id:
            continue
        out.append(token)
    return out


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_chat_template_prompts_and_targets(role, chat_models, chat_tokenizer, speech, tmp_path):
    model = chat_models[role]
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.uses_chat_template and model.end_of_turn_id == im_end
    assert model.stop_token_ids == (im_end, chat_tokenizer.eos_token_id)
    assert model.format_prompt("Is it fast?") == (
        QWEN_SYSTEM + "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nIs it fast?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert model.format_prompt("Is it fast?", with_audio=False) == (
        QWEN_SYSTEM + "<|im_start|>user\nIs it fast?<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = model.build_inputs(speech, INSTRUCTIONS, TARGETS)
    negative = model.negative_inputs(batch, speech, INSTRUCTIONS, TARGETS)
    for row, (instruction, target) in enumerate(zip(INSTRUCTIONS, TARGETS)):
        # independent reference: the template's own rendering of the whole conversation, cut after <|im_end|>
        content = [{"type": "audio", "audio_url": "x.wav"}, {"type": "text", "text": instruction}]
        conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": target}]
        text = chat_tokenizer.apply_chat_template(conversation, tokenize=False)
        reference = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        collapsed = _collapse_audio(ids, model.audio_token_id)
        assert collapsed == reference[: len(collapsed)] and collapsed[-1] == im_end
        labels = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert labels == chat_tokenizer(target, add_special_tokens=False)["input_ids"] + [im_end]
        # the text-only path: the same conversation without the audio item, same targets
        text_only = [{"role": "user", "content": instruction}, {"role": "assistant", "content": target}]
        reference = chat_tokenizer(
            chat_tokenizer.apply_chat_template(text_only, tokenize=False), add_special_tokens=False
        )["input_ids"]
        ids = negative.input_ids[row][negative.attention_mask[row].bool()].tolist()
        assert ids == reference[: len(ids)] and ids[-1] == im_end
    with torch.no_grad():
        pos, neg = model.paired_target_hidden_states(batch, negative)
    assert torch.equal(pos.labels, neg.labels)

    # generation uses the same prompt; the cached loop equals the argmax of one full forward
    ids = model.generate_ids(speech[:1], INSTRUCTIONS[:1], max_new_tokens=4)[0]
    assert im_end not in ids and chat_tokenizer.eos_token_id not in ids
    assert model.cut_at_stop([[100, 101, im_end, 9], [100, chat_tokenizer.eos_token_id]]) == [[100, 101], [100]]
    prompt = model.build_inputs(speech[:1], INSTRUCTIONS[:1])
    if ids:
        full = replace(
            prompt,
            input_ids=torch.cat([prompt.input_ids, torch.tensor([ids])], dim=1),
            attention_mask=torch.ones(1, prompt.input_ids.shape[1] + len(ids), dtype=torch.long),
        )
        with torch.no_grad():
            logits = model.logits(full)[0, :, : len(chat_tokenizer)]
        start = prompt.input_ids.shape[1]
        assert logits[start - 1 : start - 1 + len(ids)].argmax(-1).tolist() == ids

    model.save_pretrained(tmp_path)
    loaded = load_speech_lm(tmp_path)
    assert loaded.uses_chat_template and loaded.format_prompt("x") == model.format_prompt("x")
    plain = load_speech_lm(tmp_path, chat_template=False)
    assert plain.end_of_turn_id == chat_tokenizer.eos_token_id
    assert plain.format_prompt("x") == "<|bos|><|audio_bos|><|AUDIO|><|audio_eos|>x\n"


def test_chat_template_without_audio_items_and_no_template(chat_tokenizer, students, tokenizer):
    """A template that only renders string content gets the audio block in the text; no template: chat-free."""
    simple = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    texts = [*INSTRUCTIONS, *TARGETS] * 4
    plain_chat = train_tokenizer(texts, vocab_size=320, special_tokens=CHAT_SPECIAL_TOKENS, chat_template=simple)
    assert chat_prompt(plain_chat, "Is it fast?") == (
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Is it fast?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert end_of_turn_token(plain_chat) == "<|im_end|>"
    model = students["composite"]
    assert not model.uses_chat_template and model.end_of_turn_id == tokenizer.eos_token_id
    assert model.stop_token_ids == (tokenizer.eos_token_id,)
    with pytest.raises(ValueError, match="no chat template"):
        model.set_chat_template(True)
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tokenizer, "x")


# ---- logit post-processing ------------------------------------------------------------------------


def _tiny_lm_config(name: str, tokenizer):
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if name == "cohere":
        return CohereConfig(**common, logit_scale=0.25), 0.25, None
    if name == "granite":
        return GraniteConfig(**common, logits_scaling=4.0, tie_word_embeddings=False), 0.25, None
    return Gemma2Config(**common, head_dim=32, final_logit_softcapping=0.5), 1.0, 0.5


@pytest.mark.parametrize("lm", ["cohere", "granite", "gemma2"])
def test_logits_match_the_lms_own_forward(lm, tokenizer, speech, tmp_path):
    text_config, scale, cap = _tiny_lm_config(lm, tokenizer)
    model = build_speech_lm(tiny_composite_config(tokenizer, "student", text_model=text_config), tokenizer, seed=2)
    assert model.model.language_model.config.model_type == lm
    assert (model.logit_scale, model.final_softcap) == (scale, cap)
    batch = model.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2])
    with torch.no_grad():
        mine = model.logits(batch)
        own = model.model(
            input_ids=batch.input_ids,
            input_features=batch.input_features,
            feature_attention_mask=batch.feature_attention_mask,
            attention_mask=batch.attention_mask,
            position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
        raw = model.lm_head(model.hidden_states(batch))
    real = batch.attention_mask.bool()
    torch.testing.assert_close(mine[real], own[real], rtol=0, atol=1e-5)
    assert (raw[real] - own[real]).abs().max() > 1e-3  # the post-processing matters for this LM
    # the packed hidden states + the model's two numbers reproduce the same logits (what the loss gets)
    out = packed(model, batch)
    z = out.hidden @ model.lm_head_weight.T * model.logit_scale
    z = z if cap is None else cap * torch.tanh(z / cap)
    shift = batch.labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(z, own[:, :-1][shift], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = load_speech_lm(tmp_path)
    assert (loaded.logit_scale, loaded.final_softcap) == (scale, cap)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), mine, rtol=0, atol=0)


def test_logit_options_of_plain_lms(teachers):
    for model in teachers.values():
        assert (model.logit_scale, model.final_softcap) == (1.0, None)
    with pytest.raises(ValueError, match="logits_scaling"):
        logit_postprocessing(GraniteConfig(logits_scaling=0.0))


# ---- gradient checkpointing -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_in_training(kind, tokenizer, speech):
    """Same loss and gradients with checkpointing on; the layers really run twice (recomputed in backward)."""
    results = []
    for checkpointing in (False, True):
        model = build_tiny_speech_lm(tokenizer, kind, "student", seed=4).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        # the attention inside each LM layer: its forward runs again when the backward recomputes the layer
        layers = [m.self_attn for m in model.model.modules() if m.__class__.__name__.endswith("DecoderLayer")]
        calls = [0]

        def count(*_: object, calls: list[int] = calls) -> None:
            calls[0] += 1

        for layer in layers:
            layer.register_forward_hook(count)
        batch = model.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2])
        out = model(batch)
        loss = torch.nn.functional.cross_entropy(out.hidden @ model.lm_head_weight.T, out.labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, calls[0], len(layers)))
    (loss0, grads0, calls0, n), (loss1, grads1, calls1, _) = results
    assert calls0 == n and calls1 == 2 * n
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)


# ---- transformers warnings, safe loading ----------------------------------------------------------


def test_normal_use_emits_no_transformers_warnings(tokenizer, speech, tmp_path):
    """Building, training with checkpointing, generating, saving and loading: no FutureWarning/DeprecationWarning
    and no deprecation log line from transformers (issue 17)."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kind in KINDS:
                model = build_tiny_speech_lm(tokenizer, kind, "student", seed=5)
                model.generate(speech[:2], INSTRUCTIONS[:2], max_new_tokens=3)
                model.train().gradient_checkpointing_enable()
                out = model(model.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2]))
                (out.hidden @ model.lm_head_weight.T).logsumexp(-1).sum().backward()
                model.save_pretrained(tmp_path / kind)
                load_speech_lm(tmp_path / kind).generate(speech[:1], INSTRUCTIONS[:1], max_new_tokens=2)
    finally:
        logger.removeHandler(handler)
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, [str(w.message) for w in bad]
    logged = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not logged, logged


def test_safe_loading(students, speech, tmp_path):
    model = students["composite"]
    batch = model.build_inputs(speech[:1], INSTRUCTIONS[:1], TARGETS[:1])
    model.save_pretrained(tmp_path)
    # pickled weights only: refused unless asked, then read with weights_only=True
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
        load_speech_lm(tmp_path)
    loaded = load_speech_lm(tmp_path, allow_pickle=True)
    assert torch.equal(packed(loaded, batch).hidden, packed(model, batch).hidden)
    # a tokenizer that ships code is not executed unless trust_remote_code=True
    marker = tmp_path / "executed"
    (tmp_path / "my_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "my_tokenizer.MyTokenizer"]}
    config_path.write_text(json.dumps(config))
    load_speech_lm(tmp_path, allow_pickle=True)  # the built-in fast tokenizer; the file is not run
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - asked for: the code runs (and lacks the class)
        load_speech_lm(tmp_path, allow_pickle=True, trust_remote_code=True)
    assert marker.exists()


def test_low_memory_loading_onto_a_device(students, speech, tmp_path):
    model = students["qwen2_audio"]
    model.save_pretrained(tmp_path)
    batch = model.build_inputs(speech[:1], INSTRUCTIONS[:1], TARGETS[:1])
    direct = load_speech_lm(tmp_path, device="cpu", low_memory=True, dtype=torch.bfloat16)
    moved = load_speech_lm(tmp_path, device="cpu", low_memory=False, dtype=torch.bfloat16)
    assert direct.dtype == torch.bfloat16 and direct.device.type == "cpu"
    for (name, a), (_, b) in zip(direct.model.state_dict().items(), moved.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(packed(direct, batch).hidden, packed(moved, batch).hidden)


# ---- assembling a student from pretrained parts ---------------------------------------------------


def _bpe_tokenizer(texts, specials, eos):
    """A tokenizer like a plain LLM's: no audio tokens, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny Whisper checkpoint and a tiny Qwen2 causal LM (tied embeddings, ChatML template) on disk."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("parts")
    whisper_config = tiny_composite_config(train_tokenizer(["a b"] * 3), "student").audio_config
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig(**whisper_config.to_dict())).save_pretrained(root / "whisper")
    tokenizer = _bpe_tokenizer(
        [*INSTRUCTIONS, *TARGETS, "You are a helpful assistant."] * 4,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    )
    tokenizer.chat_template = QWEN2_AUDIO_CHAT_TEMPLATE
    for name, tied in (("llm", True), ("llm_untied", False)):
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=tied,
            eos_token_id=tokenizer.eos_token_id,
        )
        Qwen2ForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_assemble_student_from_parts(parts, speech, tmp_path):
    from transformers import Qwen2ForCausalLM, WhisperModel

    from caad.models.assemble import AssembleOptions, assemble_student

    out = tmp_path / "student"
    summary = assemble_student(
        parts / "whisper", parts / "llm", out, AssembleOptions(stack_factor=4, train_only_projector=True)
    )
    assert summary["tokens_added"] == 3
    student = load_speech_lm(out)
    assert isinstance(student, CompositeSpeechLM)
    tokenizer = student.tokenizer
    assert audio_token_ids(tokenizer)["audio"] == student.audio_token_id == summary["audio_token_id"]
    assert tokenizer.pad_token is not None and student.uses_chat_template
    assert student.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the parts' weights, unchanged
    whisper = WhisperModel.from_pretrained(parts / "whisper").encoder.state_dict()
    for name, value in student.model.audio_encoder.state_dict().items():
        assert torch.equal(value, whisper[name]), name
    llm = Qwen2ForCausalLM.from_pretrained(parts / "llm")
    old_rows = llm.get_input_embeddings().weight.shape[0]
    assert student.vocab_size == old_rows + 3
    embeddings = student.model.language_model.get_input_embeddings().weight
    assert torch.equal(embeddings[:old_rows], llm.get_input_embeddings().weight)
    assert student.lm_head_weight.data_ptr() == embeddings.data_ptr()  # still tied after the round trip
    # the training plan: only the projector trains
    trainable = {n.split(".")[0] for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    out_hidden = student(student.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2]))
    assert torch.isfinite(out_hidden.hidden).all()


def test_assemble_refuses_and_validates_before_writing(parts, tmp_path, capsys):
    from caad.cli import main
    from caad.models.assemble import AssembleOptions, assemble_student

    out = tmp_path / "student"
    with pytest.raises(FileNotFoundError, match="--llm"):
        assemble_student(parts / "whisper", tmp_path / "nothing", out)
    with pytest.raises(ValueError, match="Whisper checkpoint"):
        assemble_student(parts / "llm", parts / "llm", out)
    with pytest.raises(ValueError, match="stack_factor"):
        assemble_student(parts / "whisper", parts / "llm", out, AssembleOptions(stack_factor=0))
    assert not out.exists()
    args = ["models", "assemble", "--audio-encoder", str(parts / "whisper"), "--llm", str(parts / "llm")]
    assert main([*args, "--out", str(out), "--freeze-encoder"]) == 0
    assert "wrote" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert main([*args, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main([*args, "--out", str(out), "--overwrite", "--seed", "3"]) == 0
    assert (out / "model.safetensors").read_bytes() != before  # a new projector
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".assemble-")]


def test_lora_student_and_lm_head_weight(parts, speech, tmp_path):
    pytest.importorskip("peft")
    from caad.models.assemble import AssembleOptions, assemble_student
    from caad.models.lora import has_lora

    options = AssembleOptions(lora_r=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj", "lm_head"), seed=1)
    assemble_student(parts / "whisper", parts / "llm_untied", tmp_path / "s", options)
    student = load_speech_lm(tmp_path / "s")
    batch = student.build_inputs(speech[:2], INSTRUCTIONS[:2], TARGETS[:2])
    with torch.no_grad():
        before = student.logits(batch)
    assert student.prepare_for_training() == 2 * 2 + 1 and has_lora(student.model)
    assert student.prepare_for_training() == 0  # once
    with torch.no_grad():
        torch.testing.assert_close(student.logits(batch), before, rtol=0, atol=0)  # B = 0 at the start
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable if ".language_model." in n)
    assert any("lm_head.lora_A" in n for n in trainable), sorted(trainable)
    assert any(n.startswith("model.projector") for n in trainable), sorted(trainable)
    # train the adapters a little: lm_head's LoRA B becomes non-zero
    student.train()
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        out = student(batch)
        loss = torch.nn.functional.cross_entropy(out.hidden @ student.lm_head_weight.T, out.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    student.eval()
    head = student.lm_head
    assert head.lora_B["default"].weight.abs().max() > 0
    # lm_head_weight is what the lm_head module computes with (the loss sees the adapter)
    hidden = torch.randn(5, student.hidden_size)
    torch.testing.assert_close(hidden @ student.lm_head_weight.T, head(hidden), rtol=1e-5, atol=1e-5)
    expected = head.base_layer.weight + head.scaling["default"] * (
        head.lora_B["default"].weight @ head.lora_A["default"].weight
    )
    torch.testing.assert_close(student.lm_head_weight, expected)
    with torch.no_grad():
        trained = student.logits(batch)
    # saving merges the adapters: the checkpoint loads as a plain model with the same outputs
    student.save_pretrained(tmp_path / "merged")
    merged = load_speech_lm(tmp_path / "merged")
    assert not has_lora(merged.model)
    with torch.no_grad():
        torch.testing.assert_close(merged.logits(batch), trained, rtol=1e-5, atol=1e-5)
    # what a weight cannot express raises
    head.lora_dropout["default"] = torch.nn.Dropout(0.1)
    student.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        student.lm_head_weight  # noqa: B018


def test_generation_on_a_chosen_audio_path(students, speech):
    """Greedy decoding on the text-only path (to measure it), through caad.eval.generation."""
    from caad.eval.generation import generate_answers, generate_ids

    model = students["composite"]
    text_only = generate_ids(model, speech, INSTRUCTIONS, max_new_tokens=4, audio_mode="remove")
    assert text_only == model.generate_ids(speech, INSTRUCTIONS, max_new_tokens=4, audio_mode="remove")
    # the text-only path does not see the audio: any clips give the same answers
    silent = [np.zeros_like(clip) for clip in speech]
    assert generate_ids(model, silent, INSTRUCTIONS, max_new_tokens=4, audio_mode="remove") == text_only
    answers = generate_answers(model, speech, INSTRUCTIONS, audio_mode="remove", batch_size=2, max_new_tokens=4)
    assert answers == [model.tokenizer.decode(r, skip_special_tokens=True).strip() for r in text_only]
    with pytest.raises(ValueError, match="positive path"):
        generate_ids(model, speech, INSTRUCTIONS, contrastive_alpha=1.0, audio_mode="remove")
