"""The spoken question-answering set (caad.data.spoken_qa*) and the text teacher (caad.models.text_lm)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from caad.data import load_audio, read_manifest
from caad.data.spoken_qa import (
    SPOKEN_INSTRUCTION,
    SynthesisResult,
    load_spoken_qa,
    plan_utterances,
    qa_tokenizer_texts,
    read_text_items,
    synthesize_items,
    synthesize_spoken_qa,
    write_text_items,
)
from caad.data.spoken_qa_items import (
    NUMBER_WORDS,
    QA_SPLITS,
    QA_TASKS,
    all_items,
    chance_accuracy,
    split_items,
)
from caad.eval.scoring import is_correct
from caad.models import IGNORE_INDEX, tiny_student, train_tokenizer
from caad.models.text_lm import (
    build_text_batch,
    build_tiny_text_lm,
    check_shared_vocabulary,
    evaluate_text_lm,
    generate_text_answers,
    load_text_lm,
    save_text_lm,
    text_target_hidden_states,
    train_text_lm,
)
from caad.models.tokenizer import CHAT_SPECIAL_TOKENS, QWEN2_AUDIO_CHAT_TEMPLATE

ITEMS = all_items()


# ---- the questions ------------------------------------------------------------------------------


def _numbers(text: str) -> list[int]:
    return [NUMBER_WORDS.index(word) for word in re.findall(r"[a-z]+", text.lower()) if word in NUMBER_WORDS]


#: A few facts written out independently of the table.
KNOWN_FACTS = {
    "What colour is the sky?": "blue",
    "What sound does a cow make?": "moo",
    "How many legs does a spider have?": "eight",
    "What is the opposite of hot?": "cold",
    "What day comes after Sunday?": "monday",
    "Which month follows December?": "january",
}


def test_every_answer_follows_from_the_spoken_words():
    assert Counter(item.task for item in ITEMS) == {
        "addition": 200, "subtraction": 110, "comparison": 360, "counting": 80, "facts": 146,
    }  # fmt: skip
    assert len({item.id for item in ITEMS}) == len(ITEMS)
    assert len({item.text_query for item in ITEMS}) == len(ITEMS)
    by_query = {item.text_query: item for item in ITEMS}
    for query, answer in KNOWN_FACTS.items():
        assert by_query[query].answer == answer
    for item in ITEMS:
        assert item.answer in item.choices and len(item.answer.split()) == 1
        assert is_correct(item.answer, item.answer, item.choices)
        numbers = _numbers(item.text_query)
        words = item.text_query.lower()
        if item.task == "addition":
            expected = numbers[0] + numbers[1]
        elif item.task == "subtraction":
            expected = numbers[0] - numbers[1]
        elif item.task == "comparison":
            assert len(numbers) == 2 and numbers[0] != numbers[1]
            expected = max(numbers) if ("larger" in words or "bigger" in words) else min(numbers)
            echo = f"{NUMBER_WORDS[numbers[0]]} or {NUMBER_WORDS[numbers[1]]}"
            assert not is_correct(echo, item.answer, item.choices)  # names two candidates: wrong
        elif item.task == "counting":
            expected = numbers[0] + 1 if ("after" in words or "follows" in words) else numbers[0] - 1
        else:
            assert item.category == "knowledge"
            continue
        assert item.answer == NUMBER_WORDS[expected], item


def test_splits_hold_out_whole_keys_and_are_seeded():
    splits = split_items(ITEMS, seed=0, holdout_fraction=0.2)
    assert split_items(ITEMS, seed=0, holdout_fraction=0.2) == splits
    assert split_items(ITEMS, seed=1, holdout_fraction=0.2)["test"] != splits["test"]
    assert sum(len(v) for v in splits.values()) == len(ITEMS)
    keys = {name: {item.key for item in splits[name]} for name in QA_SPLITS}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    for task in QA_TASKS:
        task_keys = {item.key for item in ITEMS if item.task == task}
        held = {key for key in keys["validation"] | keys["test"] if key.startswith(f"{task}:")}
        assert abs(len(held) - 0.2 * len(task_keys)) <= 1
    eval_queries = {item.text_query for name in ("validation", "test") for item in splits[name]}
    for item in splits["train"]:
        a_b = _numbers(item.text_query)
        if item.task == "addition":  # commutativity cannot make a test question a training one
            assert f"What is {NUMBER_WORDS[a_b[1]]} plus {NUMBER_WORDS[a_b[0]]}?".capitalize() not in eval_queries
    def facts(items):
        return {(item.metadata["relation"], item.metadata["subject"]) for item in items if item.task == "facts"}

    assert facts(splits["train"]) == facts(ITEMS)  # every fact keeps a training phrasing
    assert all(len(split_items(ITEMS, 3, 0.0)[name]) == 0 for name in ("validation", "test"))
    assert 0.2 < chance_accuracy(splits["test"]) < 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [({"holdout_fraction": 1.0}, "holdout_fraction"), ({"holdout_fraction": "x"}, "holdout_fraction"),
     ({"seed": 1.5}, "seed")],
)  # fmt: skip
def test_split_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_items(ITEMS, **kwargs)
    with pytest.raises(ValueError, match="tasks"):
        all_items(["addition", "poetry"])


def test_plan_is_task_balanced_and_cycles_questions():
    items = all_items(("comparison", "facts"))
    plan = plan_utterances(items, 20, seed=0)
    assert Counter(item.task for item in plan) == {"comparison": 10, "facts": 10}
    assert len({item.id for item in plan}) == 20  # no question twice before its task's are all spoken
    few = [item for item in items if item.task == "facts"][:3]
    assert Counter(item.id for item in plan_utterances(few, 7, seed=0)).most_common(1)[0][1] == 3
    assert plan_utterances(items, 20, seed=0) == plan
    with pytest.raises(ValueError, match="no items"):
        plan_utterances([], 1, seed=0)


def test_text_items_round_trip_and_errors(tmp_path):
    path = write_text_items(tmp_path / "items.jsonl", ITEMS[:5])
    assert read_text_items(path) == ITEMS[:5]
    with pytest.raises(FileExistsError):
        write_text_items(path, ITEMS[:1])
    bad = dict(ITEMS[0].to_dict(), answer="purple")
    path.write_text(json.dumps(ITEMS[0].to_dict()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="line 2.*answer"):
        read_text_items(path)


# ---- synthesis ----------------------------------------------------------------------------------

SET_ARGS = dict(num_examples=10, seed=0, voices=("m3", "f3"), rates=(150, 200), pitches=(50,), progress=False)


@pytest.fixture(scope="module")
def spoken_set(tmp_path_factory):
    return synthesize_spoken_qa(tmp_path_factory.mktemp("sqa") / "set", **SET_ARGS)


def test_spoken_set_pairs_text_and_speech(spoken_set):
    paths = load_spoken_qa(spoken_set.root)
    info = json.loads(paths.info.read_text())
    rows = {name: read_manifest(paths[name]) for name in QA_SPLITS}
    assert [len(rows[name]) for name in QA_SPLITS] == [8, 1, 1]
    texts = {name: {item.id: item for item in paths.items(name)} for name in QA_SPLITS}
    assert sum(len(t) for t in texts.values()) == len(ITEMS)
    assert not {i.key for i in texts["train"].values()} & {i.key for i in texts["test"].values()}
    assert set(info["stats"]["test"]["held_out_keys"]) == {i.key for i in texts["test"].values()}
    assert Counter(row.task for row in rows["train"]).most_common(1)[0][1] <= 2  # 8 rows over 5 tasks
    for name in QA_SPLITS:
        for row in rows[name]:
            item = texts[name][row.group]  # the spoken question is a question of the same split
            assert row.extra["text_query"] == row.metadata["transcript"] == item.text_query
            assert row.label == row.pseudo_gt == item.answer and row.choices == list(item.choices)
            assert row.instruction == SPOKEN_INSTRUCTION and row.task == item.task and row.category == item.category
            assert row.metadata["voice"] in ("m3", "f3") and row.metadata["rate_wpm"] in (150, 200)
            audio = load_audio(row.audio_path, None)
            assert row.sampling_rate == 16000
            assert row.metadata["duration_s"] == pytest.approx(audio.size / 16000, abs=1e-3)
            assert 0.5 < audio.size / 16000 < 5 and np.abs(audio).max() > 0.05
    settings = Counter((r.metadata["voice"], r.metadata["rate_wpm"]) for r in rows["train"])
    assert sorted(settings.values()) == [2, 2, 2, 2]  # blocks of the 4 combinations
    female = [r.metadata["f0_hz"] for r in rows["train"] if r.metadata["voice"] == "f3"]
    male = [r.metadata["f0_hz"] for r in rows["train"] if r.metadata["voice"] == "m3"]
    assert min(female) > max(male)


def test_spoken_set_is_deterministic_and_never_overwritten_by_accident(spoken_set, tmp_path):
    again = synthesize_spoken_qa(tmp_path / "again", **SET_ARGS)
    for name in ("spoken_qa.json", "train.jsonl", "test.jsonl", "text_test.jsonl"):
        assert (again.root / name).read_bytes() == (spoken_set.root / name).read_bytes()
    for wav in (spoken_set.root / "audio" / "train").iterdir():
        assert (again.root / "audio" / "train" / wav.name).read_bytes() == wav.read_bytes()
    small = dict(SET_ARGS, num_examples=2, splits=(1.0, 0.0, 0.0))
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_spoken_qa(again.root, **small)
    replaced = synthesize_spoken_qa(again.root, overwrite=True, **small)
    assert len(read_manifest(replaced.train)) == 2 and read_manifest(replaced.test) == []
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a spoken-QA set"):
        synthesize_spoken_qa(foreign, overwrite=True, **small)
    assert (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="voices"):
        synthesize_spoken_qa(tmp_path / "bad", **dict(SET_ARGS, voices=("robot",)))
    with pytest.raises(ValueError, match="validation split has no questions"):
        synthesize_spoken_qa(tmp_path / "bad", **dict(SET_ARGS, holdout_fraction=0.0))
    assert not (tmp_path / "bad").exists()


def test_synthesize_items_counts_utterances_and_respects_budgets(tmp_path):
    items = [item for item in ITEMS if item.task == "counting"][:3]
    args = dict(voices=("m1", "f2"), rates=(175,), pitches=(50,), seed=5, id_prefix="r1", progress=False)
    full = synthesize_items(items, tmp_path / "full", renderings_per_item=2, **args)
    assert isinstance(full, SynthesisResult) and full.num_utterances == 6 and not full.stopped_by_budget
    durations = [row.metadata["duration_s"] for row in full.rows]
    assert full.audio_seconds == pytest.approx(sum(durations), abs=1e-2)
    assert [row.group for row in full.rows] == [item.id for item in items for _ in range(2)]
    assert Counter(row.metadata["voice"] for row in full.rows) == {"m1": 3, "f2": 3}
    assert [row.audio for row in full.rows] == [f"audio/r1-{k:06d}.wav" for k in range(6)]

    budget = sum(durations[:3]) + 0.01
    capped = synthesize_items(items, tmp_path / "capped", renderings_per_item=2, max_seconds=budget, **args)
    assert capped.num_utterances == 3 and capped.stopped_by_budget and capped.audio_seconds <= budget
    assert sorted(p.name for p in (tmp_path / "capped" / "audio").iterdir()) == [f"r1-{k:06d}.wav" for k in range(3)]
    assert synthesize_items(items, tmp_path / "few", max_utterances=2, **args).num_utterances == 2
    with pytest.raises(FileExistsError, match="id_prefix"):
        synthesize_items(items, tmp_path / "few", max_utterances=1, **args)
    with pytest.raises(ValueError, match="rates"):
        synthesize_items(items, tmp_path / "x", **dict(args, rates=(20,)))
    with pytest.raises(TypeError, match="QAItem"):
        synthesize_items(["What is one plus one?"], tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


# ---- the text teacher ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads per
    # process slow these tests down several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qa_tokenizer():
    return train_tokenizer(qa_tokenizer_texts(ITEMS), vocab_size=400)


def _silence(count: int) -> list[np.ndarray]:
    return [np.zeros(8000, dtype=np.float32)] * count


@pytest.mark.parametrize("chat", [False, True])
def test_text_sequences_line_up_with_the_speech_students(chat, qa_tokenizer):
    tokenizer = qa_tokenizer
    if chat:
        texts = qa_tokenizer_texts(ITEMS) + ["system", "user", "assistant", "You are a helpful assistant."]
        tokenizer = train_tokenizer(
            texts, 400, special_tokens=CHAT_SPECIAL_TOKENS, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE
        )
    student = tiny_student(tokenizer)
    items = ITEMS[::150]
    queries, answers = [i.text_query for i in items], [i.answer for i in items]
    text = build_text_batch(tokenizer, queries, answers)
    # t2t: the student's text-only path is the teacher's sequence, token for token
    t2t = student.build_inputs(_silence(len(items)), queries, answers, audio_mode="remove")
    assert torch.equal(text.input_ids, t2t.input_ids) and torch.equal(text.labels, t2t.labels)
    # s2t: the spoken prompt differs, the answer rows are the same
    s2t = student.build_inputs(_silence(len(items)), [SPOKEN_INSTRUCTION] * len(items), answers)
    assert s2t.input_ids.shape[1] > text.input_ids.shape[1]
    assert torch.equal(text.labels[text.labels != IGNORE_INDEX], s2t.labels[s2t.labels != IGNORE_INDEX])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>" if chat else tokenizer.eos_token)
    assert all(row[row != IGNORE_INDEX][-1] == end for row in text.labels)


def test_tiny_text_lm_shares_the_students_vocabulary(qa_tokenizer, tmp_path):
    model = build_tiny_text_lm(qa_tokenizer)
    assert model.config.vocab_size == len(qa_tokenizer) + 64
    assert check_shared_vocabulary(qa_tokenizer, qa_tokenizer, model.config.vocab_size) == len(qa_tokenizer)
    with pytest.raises(ValueError, match="rows"):
        check_shared_vocabulary(qa_tokenizer, qa_tokenizer, len(qa_tokenizer) - 1)
    other = train_tokenizer(["completely different words about boats and harbours"] * 20, vocab_size=300)
    with pytest.raises(ValueError, match="do not line up"):
        check_shared_vocabulary(other, qa_tokenizer)
    with pytest.raises(ValueError, match="audio"):
        build_tiny_text_lm(qa_tokenizer, audio_layers=1)

    batch = build_text_batch(qa_tokenizer, [i.text_query for i in ITEMS[:4]], [i.answer for i in ITEMS[:4]])
    packed = text_target_hidden_states(model, batch)
    with torch.no_grad():
        out = model(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "position_ids")},
                    output_hidden_states=True)  # fmt: skip
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    assert torch.allclose(packed.hidden, out.hidden_states[-1][:, :-1][mask], atol=1e-6)
    assert torch.allclose(model.lm_head(packed.hidden), out.logits[:, :-1][mask], atol=1e-5)
    assert torch.equal(packed.labels, batch.input_ids[:, 1:][mask])

    save_text_lm(model, qa_tokenizer, tmp_path / "teacher")
    loaded, tokenizer = load_text_lm(tmp_path / "teacher")
    assert tokenizer.get_vocab() == qa_tokenizer.get_vocab()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch.input_ids).logits, model(input_ids=batch.input_ids).logits)
    with pytest.raises(FileExistsError):
        save_text_lm(model, qa_tokenizer, tmp_path / "teacher")
    with pytest.raises(FileNotFoundError):
        load_text_lm(tmp_path / "nothing")


def test_batched_greedy_answers_equal_one_by_one(qa_tokenizer):
    model = build_tiny_text_lm(qa_tokenizer, seed=3)
    queries = [item.text_query for item in ITEMS[::150]]  # different lengths: left padding in the batch
    batched = generate_text_answers(model, qa_tokenizer, queries, max_new_tokens=4)
    assert batched == [generate_text_answers(model, qa_tokenizer, [q], max_new_tokens=4)[0] for q in queries]


def test_text_teacher_learns_held_out_phrasings_of_the_facts(qa_tokenizer):
    splits = split_items(all_items(["facts"]), seed=0, holdout_fraction=0.2)
    model = build_tiny_text_lm(qa_tokenizer, hidden=64, mlp=128, heads=2, kv_heads=1, seed=0)
    train = splits["train"]
    held_out = splits["validation"] + splits["test"]  # phrasings never seen with these facts
    before = evaluate_text_lm(model, qa_tokenizer, held_out)["accuracy"]
    result = train_text_lm(
        model, qa_tokenizer, [i.text_query for i in train], [i.answer for i in train],
        steps=200, learning_rate=5e-3, progress=False,
    )  # fmt: skip
    assert result.losses[-1] < 0.05 * result.losses[0]
    assert evaluate_text_lm(model, qa_tokenizer, train)["accuracy"] >= 0.9
    after = evaluate_text_lm(model, qa_tokenizer, held_out)
    chance = chance_accuracy(held_out)  # about 0.11; seeds 0-2 measured 0.76-0.86 after training
    assert before <= chance + 0.1 and after["accuracy"] >= 0.4 > 3 * chance
    assert sum(record["correct"] for record in after["predictions"]) == after["num_correct"]


def test_train_text_lm_errors(qa_tokenizer):
    model = build_tiny_text_lm(qa_tokenizer)
    with pytest.raises(ValueError, match="answers has 1 entries"):
        train_text_lm(model, qa_tokenizer, ["a?", "b?"], ["x"], progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_text_lm(model, qa_tokenizer, ["a?"], ["x"], steps=0, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        train_text_lm(model, qa_tokenizer, ["a?"], ["x"], learning_rate=-1.0, progress=False)
    with pytest.raises(ValueError, match=r"queries\[0\]"):
        build_text_batch(qa_tokenizer, [""], ["x"])
