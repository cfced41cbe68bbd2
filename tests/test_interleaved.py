"""Interleaved speech-text sequences, unit LMs and the TinyWave-style measures on the tiny corpus."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from caad.data import load_audio
from caad.data.interleaved import (
    IGNORE_INDEX,
    SPEECH_MARKER,
    TEXT_MARKER,
    Segment,
    UnitVocab,
    add_unit_tokens,
    build_examples,
    collate,
    corpus_clips,
    decode_ids,
    encode_examples,
    encode_segments,
    read_examples,
    synthesize_spans,
    unit_token,
    write_examples,
)
from caad.data.units import UnitTokenizer, train_unit_tokenizer
from caad.eval.speech_lm import (
    build_cloze_pairs,
    cloze_accuracy,
    compare_to_teacher,
    continuation_log_probs,
    continuation_perplexity,
    speech_continuations,
)
from caad.models.unit_lm import UnitLM, build_unit_lm, build_unit_lm_tokenizer, count_parameters, load_unit_lm

N_UNITS = 32


@pytest.fixture(scope="module")
def clips(tiny_corpus):
    return corpus_clips([tiny_corpus.train, tiny_corpus.validation, tiny_corpus.test])


@pytest.fixture(scope="module")
def units(clips):
    return train_unit_tokenizer([load_audio(clip.audio_path) for clip in clips[:12]], n_units=N_UNITS, seed=0)


@pytest.fixture(scope="module")
def tokenizer(clips):
    return build_unit_lm_tokenizer([clip.transcript for clip in clips], N_UNITS, vocab_size=400)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return UnitVocab.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def examples(clips, units):
    return build_examples(clips[:8], units, kinds=("speech", "text", "speech_text", "text_speech", "mixed"), seed=0)


def test_unit_tokens_are_contiguous_special_tokens(tokenizer, vocab):
    ids = tokenizer.convert_tokens_to_ids([unit_token(i) for i in range(N_UNITS)])
    assert ids == list(range(vocab.first_unit_id, vocab.first_unit_id + N_UNITS))
    assert tokenizer.convert_tokens_to_ids([SPEECH_MARKER, TEXT_MARKER]) == [vocab.speech_id, vocab.text_id]
    assert len(tokenizer) == vocab.first_unit_id + N_UNITS
    # a unit token is one token even inside text, never split by the BPE
    assert tokenizer("x<u3>y", add_special_tokens=False)["input_ids"].count(vocab.first_unit_id + 3) == 1
    assert add_unit_tokens(tokenizer, N_UNITS) == vocab  # idempotent
    with pytest.raises(ValueError, match="already has 32 unit tokens"):
        add_unit_tokens(tokenizer, N_UNITS + 1)


def test_encode_layout_and_round_trip_of_random_sequences(tokenizer, vocab, clips):
    rng = random.Random(0)
    texts = [clip.transcript for clip in clips] + ["naïve café, 3½ — ok?", " leading and trailing space ", "a\nb"]
    for _ in range(50):
        segments = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.5:
                segments.append(Segment.speech(rng.randrange(N_UNITS) for _ in range(rng.randint(1, 30))))
            else:
                segments.append(Segment.of_text(rng.choice(texts)))
        ids = encode_segments(tokenizer, vocab, segments)
        assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
        # independent layout check: marker, then the content
        position = 1
        for segment in segments:
            if segment.modality == "speech":
                assert ids[position] == vocab.speech_id
                assert ids[position + 1 : position + 1 + len(segment.units)] == [
                    vocab.first_unit_id + u for u in segment.units
                ]
                position += 1 + len(segment.units)
            else:
                text_ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
                assert ids[position] == vocab.text_id and ids[position + 1 : position + 1 + len(text_ids)] == text_ids
                position += 1 + len(text_ids)
        assert position == len(ids) - 1
        assert decode_ids(tokenizer, vocab, ids) == segments
        assert decode_ids(tokenizer, vocab, ids + [vocab.pad_id] * 3) == segments


def test_format_errors(tokenizer, vocab):
    with pytest.raises(ValueError, match="reserved"):
        encode_segments(tokenizer, vocab, [Segment.of_text("say <speech> now")])
    with pytest.raises(ValueError, match=r"units must lie in \[0, 32\)"):
        encode_segments(tokenizer, vocab, [Segment.speech([0, 32])])
    with pytest.raises(ValueError, match="before any modality marker"):
        decode_ids(tokenizer, vocab, [vocab.bos_id, vocab.first_unit_id, vocab.eos_id])
    with pytest.raises(ValueError, match="non-unit"):
        decode_ids(tokenizer, vocab, [vocab.speech_id, vocab.first_unit_id, vocab.text_id - 5])
    with pytest.raises(ValueError, match="needs units"):
        Segment.speech([])


def test_examples_follow_the_corpus_and_are_deterministic(clips, units, examples):
    assert [example.kind for example in examples[:5]] == ["speech", "text", "speech_text", "text_speech", "mixed"]
    again = build_examples(clips[:8], units, kinds=("speech", "text", "speech_text", "text_speech", "mixed"), seed=0)
    assert again == examples
    by_id = {example.id: example for example in examples}
    for clip in clips[:8]:
        clip_units = tuple(units.encode(load_audio(clip.audio_path)).tolist())
        assert by_id[f"{clip.id}-speech"].segments == (Segment.speech(clip_units),)
        assert by_id[f"{clip.id}-text"].segments == (Segment.of_text(clip.transcript),)
        assert by_id[f"{clip.id}-speech_text"].segments == (
            Segment.speech(clip_units),
            Segment.of_text(clip.transcript),
        )
        mixed = by_id[f"{clip.id}-mixed"].segments
        assert {segment.modality for segment in mixed} == {"speech", "text"} and len(mixed) == 2
        text = next(segment.text for segment in mixed if segment.modality == "text")
        words = clip.words
        if mixed[0].modality == "text":  # text = a word prefix; the speech is the rest, rendered alone
            k = len(text.split())
            assert words[:k] == text.split() and 0 < k < len(words)
            spoken = words[k:]
        else:
            k = len(words) - len(text.split())
            assert words[k:] == text.split() and 0 < k < len(words)
            spoken = words[:k]
        span = synthesize_spans([(" ".join(spoken), clip.voice, clip.rate_wpm, clip.pitch)])[0]
        speech = next(segment for segment in mixed if segment.modality == "speech")
        assert speech.units == tuple(units.encode(span).tolist())
    # another seed draws other switch points somewhere
    other = build_examples(clips[:8], units, kinds=("mixed",), seed=1)
    assert [e.segments for e in other] != [e.segments for e in examples if e.kind == "mixed"]


def test_examples_file_round_trip(tmp_path, examples):
    path = write_examples(tmp_path / "examples.jsonl", examples)
    assert read_examples(path) == examples
    with pytest.raises(FileExistsError):
        write_examples(path, examples)


def test_collate(tokenizer, vocab, examples):
    sequences = encode_examples(tokenizer, vocab, examples[:6])
    batch = collate(sequences, vocab, pad_to_multiple_of=8)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(map(len, sequences))
    for row, sequence in enumerate(sequences):
        assert batch["input_ids"][row, : len(sequence)].tolist() == sequence
        assert batch["attention_mask"][row].tolist() == [1] * len(sequence) + [0] * (width - len(sequence))
        assert batch["labels"][row, len(sequence) :].eq(IGNORE_INDEX).all()
        expected = [vocab.first_unit_id <= t < vocab.first_unit_id + N_UNITS for t in sequence]
        assert batch["unit_mask"][row, : len(sequence)].tolist() == expected
    assert not batch["unit_mask"][batch["attention_mask"] == 0].any()
    assert encode_examples(tokenizer, vocab, examples[:1], max_length=5)[0] == sequences[0][:5]


def test_teacher_and_student_sizes_and_save_load(tmp_path, tokenizer, units):
    teacher = build_unit_lm(tokenizer, "teacher", seed=0)
    student = build_unit_lm(tokenizer, "student", seed=1, arch="qwen2")
    ratio = count_parameters(teacher) / count_parameters(student)
    assert 2.5 < ratio < 4.0, ratio
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert teacher.config.num_hidden_layers % student.config.num_hidden_layers == 0
    bundle = UnitLM(teacher, tokenizer, units)
    bundle.save(tmp_path / "teacher")
    with pytest.raises(FileExistsError, match="not empty"):
        bundle.save(tmp_path / "teacher")
    loaded = load_unit_lm(tmp_path / "teacher")
    assert loaded.vocab == bundle.vocab
    np.testing.assert_array_equal(loaded.units.centroids, units.centroids)
    ids = torch.tensor([[bundle.vocab.bos_id, bundle.vocab.speech_id, bundle.vocab.first_unit_id + 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, teacher(input_ids=ids).logits)
    two_units = UnitTokenizer(config=units.config, centroids=units.centroids[:2], mean=units.mean, std=units.std)
    with pytest.raises(ValueError, match="has 2 units but the LM tokenizer 32"):
        UnitLM(teacher, tokenizer, two_units)


def test_a_few_training_steps_lower_the_loss(tokenizer, vocab, examples):
    # the data side a trainer method calls (encode_examples + collate), under a plain torch loop
    model = build_unit_lm(tokenizer, "teacher", seed=0).train()
    batch = collate(encode_examples(tokenizer, vocab, examples[:5]), vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _naive_log_probs(model, prompt, continuation, restrict):
    """Full and restricted log-probabilities, one forward per prefix (no batching, no padding)."""
    full, restricted = [], []
    with torch.no_grad():
        for j, token in enumerate(continuation):
            logits = model(input_ids=torch.tensor([list(prompt) + list(continuation[:j])])).logits[0, -1].double()
            full.append(torch.log_softmax(logits, -1)[token].item())
            restricted.append(torch.log_softmax(logits[restrict], -1)[restrict.index(token)].item())
    return np.array(full), np.array(restricted)


def test_continuation_log_probs_against_one_prefix_at_a_time(tokenizer, vocab):
    model = build_unit_lm(tokenizer, "student", seed=3)
    rng = random.Random(1)
    prompts = [[vocab.bos_id, vocab.speech_id] + [vocab.first_unit_id + rng.randrange(N_UNITS)] * rng.randint(0, 6)
               for _ in range(3)]  # fmt: skip
    continuations = [[vocab.first_unit_id + rng.randrange(N_UNITS) for _ in range(rng.randint(1, 5))] for _ in range(3)]
    restrict = list(vocab.unit_ids)
    full = continuation_log_probs(model, prompts, continuations, vocab.pad_id, batch_size=2)
    restricted = continuation_log_probs(model, prompts, continuations, vocab.pad_id, batch_size=2, restrict_to=restrict)
    for index, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        naive_full, naive_restricted = _naive_log_probs(model, prompt, continuation, restrict)
        np.testing.assert_allclose(full[index], naive_full, atol=1e-5)
        np.testing.assert_allclose(restricted[index], naive_restricted, atol=1e-5)
    with pytest.raises(ValueError, match="not in restrict_to"):
        continuation_log_probs(model, prompts[:1], [[vocab.text_id]], vocab.pad_id, restrict_to=restrict)


def _uniform_model(tokenizer):
    model = build_unit_lm(tokenizer, "student", seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over the vocabulary
    return model


def test_perplexity_of_a_uniform_model(clips, units, tokenizer, vocab):
    items = speech_continuations(clips[12:18], units, prompt_fraction=0.5)
    assert len(items) == 6
    for item, clip in zip(items, clips[12:18]):
        merged, durations = units.encode_with_durations(load_audio(clip.audio_path))
        assert item.prompt_units + item.continuation_units == tuple(merged.tolist())
        assert item.continuation_seconds == pytest.approx(durations[len(item.prompt_units) :].sum() / 50.0)
        assert durations[: len(item.prompt_units)].sum() == pytest.approx(durations.sum() / 2, abs=int(durations.max()))
    model = _uniform_model(tokenizer)
    n = sum(len(item.continuation_units) for item in items)
    seconds = sum(item.continuation_seconds for item in items)
    full = continuation_perplexity(model, vocab, items)
    assert full["unit_perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)
    assert full["normalised_perplexity"] == pytest.approx(len(tokenizer) ** (n / (seconds * 50.0)), rel=1e-5)
    assert full["bits_per_second"] == pytest.approx(n * math.log2(len(tokenizer)) / seconds, rel=1e-5)
    restricted = continuation_perplexity(model, vocab, items, restrict_to_units=True, reference_rate_hz=25.0)
    assert restricted["unit_perplexity"] == pytest.approx(N_UNITS, rel=1e-5)
    assert restricted["normalised_perplexity"] == pytest.approx(N_UNITS ** (n / (seconds * 25.0)), rel=1e-5)


@pytest.fixture(scope="module")
def cloze_pairs(clips, units):
    return build_cloze_pairs(clips, units, seed=0, max_pairs=6)


def test_cloze_pairs_are_deterministic_and_well_formed(clips, units, cloze_pairs):
    assert len(cloze_pairs) == 6
    assert build_cloze_pairs(clips, units, seed=0, max_pairs=6) == cloze_pairs
    transcripts = {clip.id: clip.transcript for clip in clips}
    for pair in cloze_pairs:
        assert f"{pair.prompt_text} {pair.ending_text}" == transcripts[pair.id]
        assert pair.distractor_source != pair.id
        assert transcripts[pair.distractor_source].endswith(pair.distractor_text)
        assert pair.distractor_text.split()[0].lower() != pair.ending_text.split()[0].lower()
        assert pair.prompt_units and pair.ending_units and pair.distractor_units
    # the parts are rendered alone in the prompt clip's voice
    clip = next(clip for clip in clips if clip.id == cloze_pairs[0].id)
    settings = (clip.voice, clip.rate_wpm, clip.pitch)
    spans = synthesize_spans([(cloze_pairs[0].prompt_text, *settings), (cloze_pairs[0].distractor_text, *settings)])
    assert cloze_pairs[0].prompt_units == tuple(units.encode(spans[0]).tolist())
    assert cloze_pairs[0].distractor_units == tuple(units.encode(spans[1]).tolist())
    other = build_cloze_pairs(clips, units, seed=1, max_pairs=6)
    assert [(p.id, p.distractor_source) for p in other] != [(p.id, p.distractor_source) for p in cloze_pairs]


def test_cloze_accuracy_of_a_uniform_model_prefers_the_shorter_ending(tokenizer, vocab, cloze_pairs):
    result = cloze_accuracy(_uniform_model(tokenizer), vocab, cloze_pairs)
    # uniform: the summed log-likelihood is -len * log(V), so the shorter ending wins
    expected = [np.sign(len(p.distractor_units) - len(p.ending_units)) / 2 + 0.5 for p in cloze_pairs]
    assert result["n"] == len(cloze_pairs)
    assert result["accuracy"] == pytest.approx(sum(expected) / len(cloze_pairs))
    for pair, margin in zip(cloze_pairs, result["margins"]):
        assert margin == pytest.approx((len(pair.distractor_units) - len(pair.ending_units)) * math.log(len(tokenizer)))


def test_cloze_mean_and_pmi_scorings(tokenizer, vocab, cloze_pairs):
    uniform = _uniform_model(tokenizer)
    for scoring in ("mean", "pmi"):  # every ending scores the same under a uniform model
        result = cloze_accuracy(uniform, vocab, cloze_pairs, scoring=scoring)
        assert result["accuracy"] == 0.5 and np.allclose(result["margins"], 0.0)
    model = build_unit_lm(tokenizer, "student", seed=4)
    got = cloze_accuracy(model, vocab, cloze_pairs, scoring="pmi")
    head = [vocab.bos_id, vocab.speech_id]
    for pair, margin in zip(cloze_pairs, got["margins"]):
        prompt = head + [vocab.first_unit_id + u for u in pair.prompt_units]
        endings = [[vocab.first_unit_id + u for u in e] for e in (pair.ending_units, pair.distractor_units)]
        given = continuation_log_probs(model, [prompt, prompt], endings, vocab.pad_id)
        alone = continuation_log_probs(model, [head, head], endings, vocab.pad_id)
        expected = (given[0].sum() - alone[0].sum()) - (given[1].sum() - alone[1].sum())
        assert margin == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="scoring"):
        cloze_accuracy(model, vocab, cloze_pairs, scoring="max")


def test_compare_to_teacher():
    teacher = {"cloze_accuracy": 0.8, "normalised_perplexity": 10.0}
    student = {"cloze_accuracy": 0.7, "normalised_perplexity": 11.5}
    out = compare_to_teacher(student, teacher)
    assert out["cloze_accuracy_fraction"] == pytest.approx(0.875)
    assert out["cloze_above_chance_fraction"] == pytest.approx(2 / 3)
    assert out["normalised_perplexity_gap"] == pytest.approx(1.5)
    assert math.isnan(compare_to_teacher(student, {**teacher, "cloze_accuracy": 0.5})["cloze_above_chance_fraction"])
