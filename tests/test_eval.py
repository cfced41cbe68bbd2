"""caad.eval: answer normalisation and matching (that cannot be gamed), the MCR-BENCH metrics and their
bootstrap intervals, greedy and contrastive decoding on tiny models (against a slow no-cache reference),
and ``caad eval`` end to end."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from caad.cli import main as cli_main
from caad.commands.eval import _default_name
from caad.data.audio import resample, write_wav
from caad.data.espeak import synthesize
from caad.eval import (
    ScoredItem,
    accuracy_metrics,
    contains_words,
    contrastive_generate_ids,
    contrastive_logits,
    default_run_name,
    follows_context,
    follows_hint,
    hinted_instruction,
    is_correct,
    markdown_table,
    normalize_text,
    number_to_words,
    score_answer,
    score_records,
    summarize,
)
from caad.models import SpeechLM, tiny_student, tiny_teacher, train_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared machine OpenMP threads
    that wait for each other make every forward many times slower: one thread in this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- normalisation and matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The speaker is MALE.", "the speaker is male"),
        ("  fast ,  really\tfast!! ", "fast really fast"),
        ("It\u2019s a high-pitched voice", "it is a high pitched voice"),
        ("I can't tell; won't guess. They're here", "i can not tell will not guess they are here"),
        ("The speaker's voice", "the speakers voice"),
        ("21 or twenty-one", "twenty one or twenty one"),
        ("one hundred and five = 105", "one hundred five one hundred five"),
        ("1,000 apples, 1st place, 3.5%", "one thousand apples first place three point five percent"),
        ('"Caf\u00e9" / na\u00efve', "cafe naive"),
        ("?!...", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_number_to_words():
    assert number_to_words("0") == "zero"
    assert number_to_words("15") == "fifteen"
    assert number_to_words("40") == "forty"
    assert number_to_words("1200345") == "one million two hundred thousand three hundred forty five"
    assert number_to_words("007") == "zero zero seven"
    with pytest.raises(ValueError, match="digits"):
        number_to_words("12a")


@pytest.mark.parametrize(
    ("prediction", "label", "correct"),
    [
        ("Male.", "male", True),  # punctuation, case
        ("The speaker is MALE!", "Male", True),
        ("female", "male", False),  # partial word: "male" inside "female"
        ("It is a concatenated answer", "cat", False),
        ("There are cats here", "cat", False),
        ("the cat sat", "cat", True),
        ("I think it is normal speed.", "normal", True),
        ("The speaker said the word red apple.", "red apple", True),  # multi-word label
        ("The apple was red.", "red apple", False),  # words present but not contiguous / in order
        ("apple red", "red apple", False),
        ("slow,   fast", "Slow  , fast", True),  # extra spaces and punctuation on both sides
        ("It's  high", "it is high", True),  # contraction
        ("twenty-one", "21", True),  # numbers
        ("", "male", False),
        ("slowly", "slow", False),
    ],
)
def test_is_correct(prediction, label, correct):
    assert is_correct(prediction, label) is correct


def test_is_correct_rejects_empty_label():
    with pytest.raises(ValueError, match="no words"):
        is_correct("anything", " ?! ")
    assert contains_words(["a", "b"], []) is False


# ---- accuracies and the shift on hand-made sets -----------------------------------------------------


def test_accuracy_metrics_per_task_and_category():
    items = [
        ScoredItem("gender", True, "speaker"),
        ScoredItem("gender", False, "speaker"),
        ScoredItem("rate", True, "para"),
        ScoredItem("rate", True, "para"),
        ScoredItem("rate", False, "para"),
        ScoredItem("rate", True, "para"),
        ScoredItem("pitch", False, "para"),
        ScoredItem("content", True, None),  # no category: counts for overall and per task only
    ]
    metrics = accuracy_metrics(items)
    assert metrics["num_items"] == 8 and metrics["num_correct"] == 5
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["accuracy_per_task"] == pytest.approx(
        {"content": 1.0, "gender": 0.5, "pitch": 0.0, "rate": 0.75}
    )
    assert list(metrics["accuracy_per_task"]) == ["content", "gender", "pitch", "rate"]
    assert metrics["num_items_per_task"] == {"content": 1, "gender": 2, "pitch": 1, "rate": 4}
    # category means are means of task accuracies: para = (0.75 + 0.0) / 2, not 3/5 of the items
    assert metrics["accuracy_per_category"] == pytest.approx({"para": 0.375, "speaker": 0.5})
    empty = accuracy_metrics([])
    assert empty["accuracy"] is None and empty["accuracy_per_task"] == {}


GENDER = ["male", "female"]
RATE = ["slow", "normal", "fast"]


@pytest.mark.parametrize(
    ("prediction", "label", "candidates", "correct"),
    [
        # echoed instructions name every option: wrong for every label
        ("Is the speaker male or female? Answer with one word.", "male", GENDER, False),
        ("Is the speaker male or female? Answer with one word.", "female", GENDER, False),
        ("Is the speaking rate slow, normal or fast?", "normal", RATE, False),
        ("Which of these two words did the speaker say: apple or tiger?", "tiger", ["apple", "tiger"], False),
        # both (or all) options named
        ("male or female", "male", GENDER, False),
        ("It could be slow, or maybe fast.", "fast", RATE, False),
        ("female", "male", GENDER, False),
        # negation
        ("It is not normal.", "normal", RATE, False),
        ("It isn't male.", "male", GENDER, False),
        ("Neither male nor female.", "female", GENDER, False),
        ("It is not slow or fast.", "fast", RATE, False),
        ("The speaker is not male, she is female.", "female", GENDER, True),
        ("Not slow but fast.", "fast", RATE, True),
        ("No, it is male.", "male", GENDER, True),
        ("It is a non-native accent", "native", ["native", "foreign"], False),
        # multi-word labels
        ("The speaker said red apple.", "red apple", ["red apple", "apple"], True),
        ("The speaker said red apple.", "apple", ["red apple", "apple"], False),  # the longer candidate
        ("The apple was red.", "red apple", ["red apple", "green pear"], False),
        ("very high pitch", "high pitch", ["high pitch", "low pitch"], True),
        # partial words never match
        ("It is a female voice.", "male", GENDER, False),
        ("The speech is slowly paced.", "slow", RATE, False),
        ("Female. It is a woman's voice.", "female", GENDER, True),
        # without candidates, only containment and negation
        ("male or female", "male", [], True),
        ("not male", "male", [], False),
    ],
)
def test_scoring_cannot_be_gamed(prediction, label, candidates, correct):
    assert is_correct(prediction, label, candidates) is correct, score_answer(prediction, label, candidates)


def test_score_answer_reasons_and_candidate_limit():
    assert score_answer("male or female", "male", GENDER).reason == "names 2 candidates: male, female"
    assert score_answer("It is not normal.", "normal", RATE).reason == "the label is negated"
    assert score_answer("fast", "slow", RATE).reason == "the label is not named (names fast)"
    many = [f"word{i}" for i in range(60)]  # not a classification task: no one-candidate rule
    assert is_correct("word1 and word2", "word1", many)
    assert not is_correct("word1 and word2", "word1", many[:10])


def test_follows_context():
    assert follows_context("It is slow.", "slow", "fast", RATE) is True
    assert follows_context("slow or fast", "slow", "fast", RATE) is False  # names both
    assert follows_context("normal", "slow", "fast", RATE) is False
    assert follows_context("It is not slow.", "slow", "fast", RATE) is False
    assert follows_context("male", None, "female", GENDER) is None
    assert follows_context("x", "apple", "red apple") is None  # cannot be told apart
    assert follows_hint("The speech is slow.", "fast", "slow") is True  # legacy argument order


def _record(group, condition, task, correct, follows=None, category=None):
    return {"group": group, "condition": condition, "task": task, "correct": correct, "follows_context": follows,
            "category": category}  # fmt: skip


#: Five items of two tasks under the four conditions: (task, category, neutral, faithful, adversarial,
#: adversarial follows the text, irrelevant).
TABLE = [
    ("rate", "para", True, True, True, False, True),
    ("rate", "para", True, True, False, True, True),
    ("rate", "para", False, True, False, True, True),
    ("gender", "speaker", True, True, False, False, False),
    ("gender", "speaker", False, False, True, False, False),
]


def _table_records():
    records = []
    for index, (task, category, neutral, faithful, adversarial, follows, irrelevant) in enumerate(TABLE):
        for condition, correct, follow in (
            ("neutral", neutral, None),
            ("faithful", faithful, None),
            ("adversarial", adversarial, follows),
            ("irrelevant", irrelevant, None),
        ):
            records.append(_record(f"item{index}", condition, task, correct, follow, category))
    return records


def _values(estimates):
    return {key: estimate["value"] for key, estimate in estimates.items()}


def test_metrics_on_hand_made_records():
    summary = summarize(_table_records(), num_bootstrap=0)
    assert summary["num_items"] == 5 and summary["num_records"] == 20 and summary["num_seeds"] == 1
    assert summary["accuracy"]["value"] == pytest.approx(3 / 5)
    assert _values(summary["accuracy_per_condition"]) == pytest.approx(
        {"neutral": 3 / 5, "faithful": 4 / 5, "adversarial": 2 / 5, "irrelevant": 3 / 5}
    )
    assert summary["accuracy_all"]["value"] == pytest.approx(12 / 20)
    assert _values(summary["accuracy_per_task"]) == pytest.approx({"gender": 1 / 2, "rate": 2 / 3})
    assert summary["accuracy_per_condition_task"]["adversarial"]["rate"]["value"] == pytest.approx(1 / 3)
    assert _values(summary["accuracy_per_category"]) == pytest.approx({"para": 2 / 3, "speaker": 1 / 2})
    assert _values(summary["normalized_accuracy"]) == pytest.approx(
        {"faithful": 4 / 3, "adversarial": 2 / 3, "irrelevant": 1.0}
    )
    assert summary["text_influence_rate"]["value"] == pytest.approx(2 / 5)  # items 1 and 2 follow the text
    # right under neutral (items 0, 1, 3), wrong under adversarial (items 1, 3)
    assert summary["shift"]["value"] == pytest.approx(2 / 3) and summary["shift"]["n"] == 3
    assert _values(summary["flip_rate"]) == pytest.approx(
        {"faithful": 1 / 5, "adversarial": 2 / 5, "irrelevant": 2 / 5}  # item 2 up; items 3 down, 4 no change
    )
    assert summary["modal_robustness"]["value"] == pytest.approx(0.8 * 2 / 3 + 0.2 * 1.0)
    assert summary["accuracy"]["low"] is None and summary["accuracy"]["n"] == 5
    # a task with items only under some conditions: its neutral accuracy is undefined, not 0
    extra = summarize([*_table_records(), _record("x", "faithful", "pitch", True)], num_bootstrap=0)
    assert extra["accuracy_per_task"]["pitch"] == {"value": None, "low": None, "high": None, "n": 0}
    # plain records (no condition, no group): all neutral, each its own item
    plain = summarize([{"task": "t", "correct": c} for c in (True, False, True, True)], num_bootstrap=0)
    assert plain["accuracy"]["value"] == pytest.approx(0.75) and plain["num_items"] == 4
    assert plain["shift"]["value"] is None and plain["text_influence_rate"]["n"] == 0


def test_metrics_average_over_seeds():
    first = _table_records()
    second = [dict(r, correct=True) for r in first]
    summary = summarize({1: first, 2: second}, num_bootstrap=0)
    assert summary["num_seeds"] == 2 and summary["num_items"] == 5
    assert summary["accuracy"]["value"] == pytest.approx((3 / 5 + 1.0) / 2)
    assert summary["shift"]["value"] == pytest.approx((2 / 3 + 0.0) / 2)
    with pytest.raises(ValueError, match="condition"):
        summarize([_record("a", "sarcastic", "t", True)])
    with pytest.raises(ValueError, match="no 'correct'"):
        summarize([{"task": "t"}])


def test_bootstrap_intervals():
    # all right: every replicate is 1, so the interval is [1, 1]
    perfect = summarize([_record(f"i{k}", "neutral", "t", True) for k in range(50)], num_bootstrap=200)
    assert (perfect["accuracy"]["low"], perfect["accuracy"]["high"]) == (1.0, 1.0)
    # a binomial case: 400 items, 200 right: the 95% interval is about +-1.96 sqrt(.25/400) = +-0.049
    half = [_record(f"i{k}", "neutral", "t", k % 2 == 0) for k in range(400)]
    estimate = summarize(half, num_bootstrap=2000, seed=1)["accuracy"]
    assert estimate["value"] == 0.5 and estimate["low"] < 0.5 < estimate["high"]
    assert estimate["high"] - estimate["low"] == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.12)
    assert summarize(half, num_bootstrap=2000, seed=1)["accuracy"] == estimate  # reproducible for a seed
    # coverage: over 150 simulated test sets of 120 items at p = 0.3, the interval holds p about 95% of the time
    rng = np.random.default_rng(7)
    hits = 0
    for trial in range(150):
        outcomes = rng.random(120) < 0.3
        records = [_record(f"i{k}", "neutral", "t", bool(o)) for k, o in enumerate(outcomes)]
        interval = summarize(records, num_bootstrap=400, seed=trial)["accuracy"]
        hits += interval["low"] <= 0.3 <= interval["high"]
    assert 0.85 <= hits / 150 <= 1.0
    # seeds that disagree widen the interval: the seed draw is part of the bootstrap
    same = summarize({s: half for s in range(3)}, num_bootstrap=1000, seed=2)["accuracy"]
    shifted = [dict(r, correct=True) if k < 80 else r for k, r in enumerate(half)]  # 60% right
    mixed = summarize({0: half, 1: shifted, 2: half}, num_bootstrap=1000, seed=2)["accuracy"]
    assert mixed["high"] - mixed["low"] > same["high"] - same["low"]


def test_small_test_sets_warn():
    small = summarize([_record(f"i{k}", "neutral", "t", True) for k in range(3)], num_bootstrap=10)
    assert len(small["warnings"]) == 1 and "only 3 scored items" in small["warnings"][0]
    big = summarize([_record(f"i{k}", "neutral", "t", k % 3 > 0) for k in range(150)], num_bootstrap=10)
    assert big["warnings"] == []


def test_score_records_and_markdown_table():
    records = _table_records()
    metrics = score_records(records, num_bootstrap=100)
    greedy = {**metrics, "decoding": {"method": "greedy"}}
    contrastive = {
        **score_records([r for r in records if r["task"] == "rate"], num_bootstrap=0),
        "decoding": {"method": "contrastive", "alpha": 2.0, "negative_mode": "remove", "plausibility": 0.0},
    }
    table = markdown_table({"teacher": greedy, "teacher+cd": contrastive})
    lines = table.strip().splitlines()
    assert lines[0] == (
        "| model | decoding | items | accuracy | gender | rate | faithful | adversarial | irrelevant | "
        "text influence | shift | modal robustness |"
    )
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:3] == ["teacher", "greedy", "5"]
    assert cells[3].startswith("60.0 +-") and cells[5].startswith("66.7 +-") and cells[10].startswith("66.7 +-")
    assert cells[11].startswith("0.73 +-")
    second = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert second[:5] == ["teacher+cd", "contrastive a=2 (remove)", "3", "66.7", "no items"]  # no gender item
    plain = markdown_table({"m": score_records([{"task": "t", "correct": True}], num_bootstrap=0)})
    assert plain.splitlines()[0] == "| model | decoding | items | accuracy | t |"  # no condition columns


def test_contrastive_logits_and_hints():
    z_pos = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    z_neg = torch.tensor([[2.0, -1.0, 0.0, -9.0]])
    assert torch.equal(contrastive_logits(z_pos, z_neg, 0.0), z_pos)
    assert torch.allclose(contrastive_logits(z_pos, z_neg, 1.0), torch.tensor([[2.0, 3.0, 0.0, 3.0]]))
    # cutoff 0.1: keep v with z_pos_v >= 2 + log(0.1) = -0.30: the last token is dropped
    cut = contrastive_logits(z_pos, z_neg, 1.0, plausibility=0.1)
    assert torch.isinf(cut[0, 3]) and torch.equal(cut[0, :3], torch.tensor([2.0, 3.0, 0.0]))
    assert hinted_instruction("Is it fast?", "Listen.") == "Listen. Is it fast?"
    assert hinted_instruction("Is it fast?", "  ") == "Is it fast?"


# ---- generation on tiny models --------------------------------------------------------------------

UTTERANCES = (  # (text, voice, rate wpm, pitch)
    ("There is a red apple in the kitchen.", "m3", 175, 50),
    ("Please bring the tiny violin to the school.", "f3", 240, 80),
    ("My sister found a dragon.", "m3", 120, 20),
)
INSTRUCTIONS = [
    "Is the speaker male or female? Answer with one word.",
    "Which of these two words did the speaker say: violin or rabbit?",
    "Is the speaking rate slow, normal or fast?",
]
LABELS = ["male", "violin", "slow"]
HINTS_NEUTRAL = ["Here is a short recording of one person speaking.", "The recording is one sentence.", ""]
HINTS_CONTRA = ["The speaker is a woman.", 'The speaker clearly says the word "rabbit".', ""]
MAX_NEW = 6


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Real speech (espeak-ng), mono float32 at 16 kHz, three different lengths."""
    out = []
    for text, voice, rate, pitch in UTTERANCES:
        samples, rate_hz = synthesize(text, voice, rate, pitch)
        out.append(resample(samples.astype(np.float32) / 32768.0, rate_hz, 16000))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    texts = [*INSTRUCTIONS, *LABELS, *HINTS_NEUTRAL, *HINTS_CONTRA, *(u[0] for u in UTTERANCES)] * 3
    return train_tokenizer(texts, vocab_size=320)


def _with_early_eos(model: SpeechLM, clips, instructions) -> SpeechLM:
    """A copy whose greedy answers stop at different steps, to exercise the eos handling.

    The ``eos`` row of ``lm_head`` becomes 1.01 times the row of a token ``t`` that greedy decoding
    produces in some rows, first at a step >= 1, so eos wins about where ``t`` would have won.
    """
    original = model.generate_ids(clips, instructions, max_new_tokens=MAX_NEW)
    candidates = sorted({token for row in original for token in row[1:] if token not in [r[0] for r in original]})
    for token in candidates:
        trial = copy.deepcopy(model)
        with torch.no_grad():
            weight = trial.lm_head.weight
            weight[trial.tokenizer.eos_token_id] = 1.01 * weight[token]
        lengths = {len(row) for row in trial.generate_ids(clips, instructions, max_new_tokens=MAX_NEW)}
        if len(lengths) > 1 and min(lengths) > 0:
            return trial
    raise AssertionError("no token gives rows of different lengths: change the model seed")


@pytest.fixture(scope="module")
def models(tokenizer, clips) -> dict[str, SpeechLM]:
    """A tiny composite student and a tiny Qwen2-Audio teacher (padded vocabulary), with early eos."""
    return {
        "composite": _with_early_eos(tiny_student(tokenizer, seed=4), clips, INSTRUCTIONS),
        "qwen2_audio": _with_early_eos(tiny_teacher(tokenizer, seed=3), clips, INSTRUCTIONS),
    }


def _append(batch, token: int):
    one = torch.tensor([[token]], dtype=batch.input_ids.dtype)
    return replace(
        batch,
        input_ids=torch.cat([batch.input_ids, one], dim=1),
        attention_mask=torch.cat([batch.attention_mask, torch.ones_like(one)], dim=1),
    )


@torch.no_grad()
def slow_contrastive_reference(
    model: SpeechLM, clip, instruction: str, alpha: float, negative_mode: str, plausibility: float
) -> tuple[list[int], list[float]]:
    """One example, no padding, no KV cache: a full forward of each path for every new token.

    Returns the new token ids (``eos`` excluded) and, per step, the float64 margin between the best
    and the second-best contrastive logit (a near-tie may legitimately go either way).
    """
    positive = model.build_inputs([clip], [instruction])
    negative = model.negative_inputs(positive, [clip], [instruction], None, audio_mode=negative_mode)
    usable, eos = len(model.tokenizer), model.tokenizer.eos_token_id
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(MAX_NEW):
        z_pos = model.logits(positive)[0, -1, :usable].double()
        z_neg = model.logits(negative)[0, -1, :usable].double()
        z_hat = (1 + alpha) * z_pos - alpha * z_neg
        if plausibility > 0:
            z_hat[z_pos < z_pos.max() + np.log(plausibility)] = -np.inf
        top = z_hat.topk(2).values
        margins.append(float(top[0] - top[1]))
        token = int(z_hat.argmax())
        if token == eos:
            break
        tokens.append(token)
        positive, negative = _append(positive, token), _append(negative, token)
    return tokens, margins


@pytest.mark.parametrize("kind", ["composite", "qwen2_audio"])
def test_alpha_zero_equals_greedy(kind, models, clips):
    model = models[kind]
    greedy = model.generate_ids(clips, INSTRUCTIONS, max_new_tokens=MAX_NEW)
    lengths = [len(row) for row in greedy]
    assert min(lengths) < MAX_NEW and len(set(lengths)) > 1, "eos handling is not exercised"
    for mode in ("zero", "remove", "noise"):
        ids = contrastive_generate_ids(
            model, clips, INSTRUCTIONS, alpha=0.0, negative_mode=mode, max_new_tokens=MAX_NEW
        )
        assert ids == greedy, mode
    assert all(max(row, default=0) < len(model.tokenizer) for row in greedy)


@pytest.mark.parametrize(
    ("kind", "mode", "alpha", "plausibility"),
    [
        # (the tiny composite's audio moves its logits little: a large alpha makes zeroing matter)
        ("composite", "zero", 30.0, 0.0),
        ("composite", "remove", 5.0, 0.95),
        ("qwen2_audio", "zero", 0.5, 0.0),
        ("qwen2_audio", "remove", 5.0, 0.8),
    ],
)
def test_contrastive_matches_slow_reference(kind, mode, alpha, plausibility, models, clips):
    model = models[kind]
    fast = contrastive_generate_ids(
        model,
        clips,
        INSTRUCTIONS,
        alpha=alpha,
        negative_mode=mode,
        plausibility=plausibility,
        max_new_tokens=MAX_NEW,
    )
    for row, (clip, instruction) in enumerate(zip(clips, INSTRUCTIONS)):
        slow, margins = slow_contrastive_reference(model, clip, instruction, alpha, mode, plausibility)
        if fast[row] == slow:
            continue
        # Only a near-tie (float32 cached vs float64 uncached) may make the two disagree.
        step = next(i for i, (a, b) in enumerate(zip([*fast[row], -1], [*slow, -1])) if a != b)
        assert margins[step] < 1e-3, (row, step, fast[row], slow)


@pytest.mark.parametrize(
    ("kind", "mode", "alpha", "plausibility"), [("composite", "zero", 30.0, 0.0), ("qwen2_audio", "remove", 5.0, 0.8)]
)
def test_contrastive_and_cutoff_change_answers(kind, mode, alpha, plausibility, models, clips):
    """The settings above are not vacuous: contrastive decoding and the cutoff change some answers."""
    model = models[kind]
    greedy = model.generate_ids(clips, INSTRUCTIONS, max_new_tokens=MAX_NEW)
    options = dict(alpha=alpha, negative_mode=mode, max_new_tokens=MAX_NEW)
    plain = contrastive_generate_ids(model, clips, INSTRUCTIONS, **options)
    assert plain != greedy
    if plausibility:
        assert contrastive_generate_ids(model, clips, INSTRUCTIONS, plausibility=plausibility, **options) != plain


def test_generation_option_errors(models, clips):
    model = models["composite"]
    with pytest.raises(ValueError, match="alpha"):
        contrastive_generate_ids(model, clips, INSTRUCTIONS, alpha=-1.0)
    with pytest.raises(ValueError, match="negative_mode"):
        contrastive_generate_ids(model, clips, INSTRUCTIONS, alpha=1.0, negative_mode="positive")
    with pytest.raises(ValueError, match="plausibility"):
        contrastive_generate_ids(model, clips, INSTRUCTIONS, alpha=1.0, plausibility=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        contrastive_generate_ids(model, clips, INSTRUCTIONS, alpha=1.0, max_new_tokens=0)


# ---- caad eval end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tokenizer, clips):
    """A saved tiny student and a 4-row manifest: three labelled rows (two with hints), one unlabelled."""
    root = tmp_path_factory.mktemp("eval_cli")
    model_dir = root / "student"
    tiny_student(tokenizer, seed=5).save_pretrained(model_dir)
    rows = []
    for index, (clip, instruction, label) in enumerate(zip(clips, INSTRUCTIONS, LABELS)):
        (root / "audio").mkdir(exist_ok=True)
        write_wav(root / "audio" / f"{index}.wav", clip, 16000)
        row = {
            "id": f"ex{index}",
            "audio": f"audio/{index}.wav",
            "sampling_rate": 16000,
            "instruction": instruction,
            "task": ["speaker_gender", "spoken_content", "speaking_rate"][index],
            "category": ["speaker", "content", "paralinguistics"][index],
            "label": label,
        }
        if HINTS_NEUTRAL[index]:
            row |= {"hint_neutral": HINTS_NEUTRAL[index], "hint_contradicting": HINTS_CONTRA[index],
                    "hint_contradicting_label": ["female", "rabbit"][index]}  # fmt: skip
        rows.append(row)
    rows.append({**rows[0], "id": "unlabelled", "label": None})
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return model_dir, manifest, root / "results"


def test_cli_eval_end_to_end(saved_run, capsys):
    model_dir, manifest, out = saved_run
    argv = ["eval", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(out)]
    argv += ["--batch-size", "2", "--max-new-tokens", "4", "--no-progress", "--bootstrap", "200"]
    assert cli_main([*argv, "--name", "greedy"]) == 0
    captured = capsys.readouterr()
    assert "| greedy | greedy | 3 |" in captured.out
    # 3 items: far too few to mean anything, and the command says so
    assert "warning: only 3 scored items" in captured.err

    metrics = json.loads((out / "greedy.json").read_text())
    records = [json.loads(line) for line in (out / "greedy.predictions.jsonl").read_text().splitlines()]
    # the two rows with legacy hints are asked under three conditions each
    assert [r["id"] for r in records] == [
        "ex0", "ex0-irrelevant", "ex0-adversarial", "ex1", "ex1-irrelevant", "ex1-adversarial", "ex2",
    ]  # fmt: skip
    assert [r["condition"] for r in records[:3]] == ["neutral", "irrelevant", "adversarial"]
    assert {r["group"] for r in records} == {"ex0", "ex1", "ex2"}
    assert metrics["num_rows"] == 4 and metrics["num_unlabelled"] == 1 and metrics["num_records"] == 7
    assert metrics["num_items"] == 3 and metrics["decoding"]["method"] == "greedy"
    candidates = {"speaker_gender": ["male"], "spoken_content": ["violin", "rabbit"], "speaking_rate": ["slow"]}
    for record in records:
        expected = is_correct(record["prediction"], record["label"], candidates[record["task"]])
        assert record["correct"] == expected, record
    neutral = [r for r in records if r["condition"] == "neutral"]
    assert metrics["accuracy"]["value"] == pytest.approx(sum(r["correct"] for r in neutral) / 3)
    assert metrics["accuracy"]["n"] == 3
    assert [r["context_label"] for r in records[:6]] == [None, None, "female", None, None, "rabbit"]
    for record in records:
        if record["condition"] == "adversarial":
            assert record["follows_context"] == is_correct(
                record["prediction"], record["context_label"], [record["label"], *candidates[record["task"]]]
            )
    assert set(metrics["accuracy_per_task"]) == {"speaker_gender", "spoken_content", "speaking_rate"}
    assert set(metrics["accuracy_per_category"]) == {"speaker", "content", "paralinguistics"}
    assert metrics["shift"]["n"] == sum(r["correct"] for r in neutral[:2])
    rescored = score_records(records, num_bootstrap=200)
    assert rescored["accuracy_per_condition"] == metrics["accuracy_per_condition"]
    markdown = (out / "greedy.md").read_text()
    assert markdown_table({"greedy": metrics}) in markdown and "**Warning:** only 3 scored items" in markdown

    # no silent overwrite; --overwrite replaces (here with a contrastive-decoding run)
    stamp = (out / "greedy.json").stat().st_mtime_ns
    assert cli_main([*argv, "--name", "greedy"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "greedy.json").stat().st_mtime_ns == stamp
    contrastive_argv = ["--contrastive-alpha", "1.5", "--negative-mode", "remove", "--batch-size", "4"]
    assert cli_main([*argv, *contrastive_argv, "--name", "greedy", "--overwrite"]) == 0
    contrastive = json.loads((out / "greedy.json").read_text())
    assert "contrastive a=1.5 (remove)" in (out / "greedy.md").read_text()
    assert contrastive["decoding"] == {
        "method": "contrastive",
        "alpha": 1.5,
        "negative_mode": "remove",
        "plausibility": 0.0,
        "audio_mode": "positive",
    }
    # the default name comes from the model and the decoding
    assert cli_main([*argv, "--audio-mode", "remove"]) == 0
    assert (out / "student-greedy-remove.json").is_file()
    assert "greedy, remove path" in (out / "student-greedy-remove.md").read_text()


def test_eval_writes_answers_as_it_goes(saved_run, tmp_path, monkeypatch):
    """An evaluation stopped after its first batch leaves that batch's answers on disk (and no metrics)."""
    import caad.eval.runner as runner

    model_dir, manifest, _ = saved_run
    real, calls = runner.decode_ids, []

    def stop_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "decode_ids", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(str(model_dir), str(manifest), str(tmp_path), name="run", batch_size=2, max_new_tokens=2,
                        progress=False)  # fmt: skip
    lines = (tmp_path / "run.predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["ex0", "ex0-irrelevant"]
    assert not (tmp_path / "run.json").exists()


def test_default_run_name():
    assert default_run_name("runs/x/teacher/", None) == "teacher-greedy"
    assert default_run_name("runs/demo/stage2/final", None) == "stage2-final-greedy"
    assert default_run_name("runs/demo/stage2/checkpoints/step-300", None) == "checkpoints-step-300-greedy"
    assert default_run_name("runs/demo/warmup/final", 2.0) == "warmup-final-cd-a2-remove"
    name = default_run_name("teacher-7b", 1.0, "silence_fixed_length", 0.1)
    assert name == "teacher-7b-cd-a1-silence_fixed_length-p0.1"
    assert default_run_name("teacher-7b", None, audio_mode="remove") == "teacher-7b-greedy-remove"
    assert _default_name("runs/x/stage2/final", None) == "stage2-final-greedy"  # what caad eval uses


def test_cli_eval_errors(saved_run, tmp_path, capsys):
    model_dir, manifest, _ = saved_run
    base = ["eval", "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli_main([*base, "--model", str(tmp_path / "nope"), "--manifest", str(manifest)]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert cli_main([*base, "--model", str(tmp_path), "--manifest", str(manifest)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli_main([*base, "--model", str(model_dir), "--manifest", str(tmp_path / "x.jsonl")]) == 2
    assert "--manifest" in capsys.readouterr().err
    argv = [*base, "--model", str(model_dir), "--manifest", str(manifest)]
    assert cli_main([*argv, "--contrastive-alpha", "-1"]) == 2
    assert "alpha" in capsys.readouterr().err
    assert cli_main([*argv, "--name", "a/b"]) == 2
    assert "--name" in capsys.readouterr().err
    assert cli_main([*argv, "--contrastive-alpha", "1", "--audio-mode", "remove"]) == 2
    assert "--audio-mode" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    unlabelled.write_text(json.dumps({**rows[3], "audio": str(manifest.parent / rows[3]["audio"])}) + "\n")
    assert cli_main([*argv[:-1], str(unlabelled)]) == 2
    assert "no row with a label" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
