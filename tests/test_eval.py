"""caad.eval: answer normalisation and matching, accuracies, the bias shift, greedy and contrastive
decoding on tiny models (against a slow no-cache reference), and ``caad eval`` end to end."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from caad.cli import main as cli_main
from caad.commands.eval import _default_name
from caad.data.audio import resample, write_wav
from caad.data.espeak import synthesize
from caad.eval import (
    BiasItem,
    ScoredItem,
    accuracy_metrics,
    bias_metrics,
    contains_words,
    contrastive_generate_ids,
    contrastive_logits,
    follows_hint,
    hinted_instruction,
    is_correct,
    markdown_table,
    normalize_text,
    number_to_words,
    score_records,
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


def test_bias_metrics_hand_computed():
    # (task, correct neutral, correct contradicting, follows hint)
    table = [
        ("rate", True, True, False),
        ("rate", True, False, True),  # flipped
        ("rate", True, False, False),  # flipped (wrong, but not the hint's answer)
        ("rate", False, False, True),  # wrong both times: not a flip
        ("gender", True, True, None),
        ("gender", False, True, None),  # fixed by the hint: not a flip either
        ("gender", True, False, True),  # flipped
    ]
    metrics = bias_metrics(BiasItem(*row) for row in table)
    assert metrics["num_items"] == 7
    assert metrics["accuracy_neutral"] == pytest.approx(5 / 7)
    assert metrics["accuracy_contradicting"] == pytest.approx(3 / 7)
    assert metrics["num_correct_neutral"] == 5 and metrics["num_flipped"] == 3
    assert metrics["shift"] == pytest.approx(3 / 5)
    assert metrics["hint_following"] == pytest.approx(3 / 5)  # 5 items know the hint's answer
    rate, gender = metrics["per_task"]["rate"], metrics["per_task"]["gender"]
    assert rate["shift"] == pytest.approx(2 / 3) and gender["shift"] == pytest.approx(1 / 2)
    assert rate["accuracy_neutral"] == pytest.approx(3 / 4)
    assert gender["accuracy_contradicting"] == pytest.approx(2 / 3)
    assert gender["hint_following"] == pytest.approx(1.0)
    none_correct = bias_metrics([BiasItem("x", False, False)])
    assert none_correct["shift"] is None and none_correct["hint_following"] is None


def test_follows_hint():
    assert follows_hint("The speech is slow.", "fast", "slow") is True
    assert follows_hint("slow or fast", "fast", "slow") is False  # gives the label too
    assert follows_hint("normal", "fast", "slow") is False
    assert follows_hint("male", "female", None) is None
    assert follows_hint("x", "red apple", "apple") is None  # cannot be told apart


def test_score_records_and_markdown_table():
    records = [
        {"task": "t1", "category": "c", "correct": True, "correct_neutral": True, "correct_contradicting": False},
        {"task": "t1", "category": "c", "correct": False, "correct_neutral": True, "correct_contradicting": True},
        {"task": "t2", "category": "c", "correct": True},  # no hints
    ]
    metrics = score_records(records)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy_per_category"] == pytest.approx({"c": 0.75})
    assert metrics["bias"]["num_items"] == 2 and metrics["bias"]["shift"] == pytest.approx(0.5)
    assert score_records(records[2:])["bias"] is None

    greedy = {**metrics, "decoding": {"method": "greedy"}}
    contrastive = {
        **metrics,
        "decoding": {"method": "contrastive", "alpha": 2.0, "negative_mode": "zero", "plausibility": 0.0},
        "accuracy_per_task": {"t1": 1.0, "t3": 0.25},
        "bias": None,
    }
    table = markdown_table({"teacher": greedy, "teacher+cd": contrastive})
    lines = table.strip().splitlines()
    assert lines[0] == (
        "| model | decoding | items | accuracy | t1 | t2 | t3 | neutral hint | contradicting hint | shift |"
    )
    assert len(lines) == 4
    assert lines[2] == "| teacher | greedy | 3 | 66.7 | 50.0 | 100.0 | - | 100.0 | 50.0 | 50.0 |"
    assert lines[3] == "| teacher+cd | contrastive a=2 (zero) | 3 | 66.7 | 100.0 | - | 25.0 | - | - | - |"


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
            row |= {"hint_neutral": HINTS_NEUTRAL[index], "hint_contradicting": HINTS_CONTRA[index]}
        rows.append(row)
    rows.append({**rows[0], "id": "unlabelled", "label": None})
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return model_dir, manifest, root / "results"


def test_cli_eval_end_to_end(saved_run, capsys):
    model_dir, manifest, out = saved_run
    argv = ["eval", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(out)]
    argv += ["--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]
    assert cli_main([*argv, "--name", "greedy"]) == 0
    printed = capsys.readouterr().out
    assert "| greedy | greedy | 3 |" in printed

    metrics = json.loads((out / "greedy.json").read_text())
    records = [json.loads(line) for line in (out / "greedy.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["ex0", "ex1", "ex2"]
    assert metrics["num_rows"] == 4 and metrics["num_unlabelled"] == 1 and metrics["num_items"] == 3
    assert metrics["decoding"]["method"] == "greedy"
    for record in records:
        assert record["correct"] == is_correct(record["prediction"], record["label"])
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 3)
    assert set(metrics["accuracy_per_task"]) == {"speaker_gender", "spoken_content", "speaking_rate"}
    assert set(metrics["accuracy_per_category"]) == {"speaker", "content", "paralinguistics"}
    assert metrics["bias"]["num_items"] == 2  # the row without hints is not in the bias measure
    assert "prediction_neutral" in records[0] and "prediction_neutral" not in records[2]
    assert metrics["bias"] == score_records(records)["bias"]
    markdown = (out / "greedy.md").read_text()
    assert markdown_table({"greedy": metrics}) in markdown

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
    }


def test_default_run_name():
    assert _default_name("runs/x/teacher/", None) == "teacher-greedy"
    assert _default_name("teacher", 2.0) == "teacher-contrastive-a2"


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
    unlabelled = tmp_path / "unlabelled.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    unlabelled.write_text(json.dumps({**rows[3], "audio": str(manifest.parent / rows[3]["audio"])}) + "\n")
    assert cli_main([*argv[:-1], str(unlabelled)]) == 2
    assert "no row with a label" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
