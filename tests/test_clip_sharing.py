"""One clip asked several questions is featurised and encoded once (``SpeechLM.share_clip_encoding``,
``caad.models.feature_cache``), and the answers are exactly those of encoding every row on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caad.eval import contrastive_generate_ids
from caad.models import FeatureCache, feature_cache, tiny_student, tiny_teacher, train_tokenizer, unique_clips
from caad.models.feature_cache import active_feature_cache

INSTRUCTIONS = [
    "Is the speaker male or female?",
    "Caption: a woman reads aloud. Is the speaker male or female?",
    "Is the speaking rate slow, normal or fast?",
    "Note: the recording is short. Is the pitch high or low?",
    "Which word did the speaker say: apple or tiger?",
    "Caption: a man reads one sentence aloud. Which word did the speaker say: apple or tiger?",
]
ORDER = [0, 1, 0, 2, 1, 0]  # clip of each row: 3 distinct clips, repeated


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for seconds, hz in ((1.3, 140.0), (2.1, 220.0), (0.7, 90.0)):
        t = np.arange(int(seconds * 16000)) / 16000
        out.append((0.3 * np.sin(2 * np.pi * hz * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def models():
    tokenizer = train_tokenizer(INSTRUCTIONS * 4, vocab_size=300)
    return {"composite": tiny_student(tokenizer, seed=5), "qwen2_audio": tiny_teacher(tokenizer, seed=6)}


def _encoder(model) -> torch.nn.Module:
    composite = model.model_type == "caad_composite_speech_lm"
    return model.model.audio_encoder if composite else model.model.model.audio_tower


class _RowCounter:
    """Counts the clips the audio encoder is run on (a forward hook sees the inputs forward got)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = module.register_forward_hook(self, with_kwargs=True, prepend=True)

    def __call__(self, module, args, kwargs, output):
        features = args[0] if args else kwargs["input_features"]
        self.rows += int(features.shape[0])

    def close(self) -> None:
        self.handle.remove()


def _sharing(model, on: bool):
    model.share_clip_encoding = on
    return model


def test_unique_clips_on_hand_made_rows():
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    features = torch.stack([a, b, a, b, a])
    mask = torch.ones(5, 4, dtype=torch.long)
    first, inverse = unique_clips(features, mask)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 1, 0]
    assert unique_clips(features[:2], mask[:2]) is None  # all distinct: nothing to share
    other = mask.clone()
    other[2, 3] = 0  # same features, another length: a different clip
    first, inverse = unique_clips(features, other)
    assert first.tolist() == [0, 1, 2] and inverse.tolist() == [0, 1, 2, 1, 0]
    swapped = torch.stack([a, a.flip(0), a])  # equal sums, different rows
    assert unique_clips(swapped, mask[:3])[1].tolist() == [0, 1, 0]


@pytest.mark.parametrize("kind", ["composite", "qwen2_audio"])
def test_features_once_per_clip_equal_per_clip_features(kind, models, clips):
    model = models[kind]
    batch_clips = [clips[i] for i in ORDER]
    shared = model.extract_features(batch_clips)
    plain = _sharing(model, False).extract_features(batch_clips)
    _sharing(model, True)
    for row, index in enumerate(ORDER):
        alone = model._run_feature_extractor([clips[index]])
        assert torch.equal(shared[0][row], alone[0][0]) and torch.equal(shared[1][row], alone[1][0])
        assert torch.equal(plain[0][row], alone[0][0])


@pytest.mark.parametrize("kind", ["composite", "qwen2_audio"])
def test_encoder_runs_once_per_clip_and_answers_do_not_change(kind, models, clips):
    model = models[kind]
    batch_clips = [clips[i] for i in ORDER]
    counter = _RowCounter(_encoder(model))
    try:
        results = {}
        for on in (True, False):
            _sharing(model, on)
            counter.rows = 0
            greedy = model.generate_ids(batch_clips, INSTRUCTIONS, max_new_tokens=6)
            greedy_rows = counter.rows
            contrastive = {
                mode: contrastive_generate_ids(
                    model, batch_clips, INSTRUCTIONS, alpha=1.0, negative_mode=mode, max_new_tokens=6
                )
                for mode in ("remove", "zero_features_keep_length", "silence_fixed_length")
            }
            batch = model.build_inputs(batch_clips, INSTRUCTIONS, padding_side="left")
            assert bool((batch.attention_mask[:, 0] == 0).any()), "left padding is not exercised"
            with torch.no_grad():
                hidden = model.hidden_states(batch)
            results[on] = (greedy, contrastive, hidden, greedy_rows)
    finally:
        _sharing(model, True)
        counter.close()
    assert results[True][3] == len(set(ORDER)) and results[False][3] == len(ORDER)
    assert results[True][0] == results[False][0]
    assert results[True][1] == results[False][1]
    torch.testing.assert_close(results[True][2], results[False][2], rtol=1e-5, atol=1e-6)
    # and each row as if asked alone
    alone = [model.generate_ids([clips[i]], [text], max_new_tokens=6)[0] for i, text in zip(ORDER, INSTRUCTIONS)]
    assert alone == results[True][0]


@pytest.mark.parametrize("kind", ["composite", "qwen2_audio"])
def test_no_sharing_under_autograd(kind, models, clips):
    """Training gradients are computed exactly as before: with autograd on, every row is encoded."""
    model = models[kind]
    counter = _RowCounter(_encoder(model))
    try:
        model.hidden_states(model.build_inputs([clips[i] for i in ORDER], INSTRUCTIONS)).sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        counter.close()
    assert counter.rows == len(ORDER)


def test_feature_cache_reuses_exact_features_across_calls_and_models(models, clips):
    student, teacher = models["composite"], models["qwen2_audio"]
    expected = student._run_feature_extractor(clips)
    assert active_feature_cache() is None
    with feature_cache() as cache:
        first = student.extract_features(clips)
        assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)
        with feature_cache(max_bytes=1) as inner:
            assert inner is cache  # nested blocks share the outer cache
        again = teacher.extract_features(clips[::-1])  # same extractor settings: all hits
        assert cache.hits == 3
        assert cache.bytes < 3 * expected[0][0].numel() * 4  # the padded tail is stored as one number
    assert active_feature_cache() is None
    assert torch.equal(first[0], expected[0]) and torch.equal(first[1], expected[1])
    assert torch.equal(again[0], expected[0].flip(0)) and torch.equal(again[1], expected[1].flip(0))


def test_feature_cache_evicts_least_recently_used():
    cache = FeatureCache(max_bytes=3 * (8 * 8 * 4 + 8 * 8))  # three entries of 8 x 8 float32 + 8 int64
    mask = torch.ones(8, dtype=torch.long)
    for key in "abc":
        cache.put(("s", key.encode()), torch.rand(8, 8), mask)  # no constant tail: stored whole
    assert cache.get(("s", b"a")) is not None  # a is now the most recently used
    cache.put(("s", b"d"), torch.rand(8, 8), mask)
    assert cache.get(("s", b"b")) is None and cache.get(("s", b"a")) is not None and len(cache) == 3
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=-1)
