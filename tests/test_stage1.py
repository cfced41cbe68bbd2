"""caad.stage1: pseudo-GT generation with the template and the local-LM generators, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caad.cli import main as cli_main
from caad.data import ManifestError, ManifestRow, load_audio, read_manifest, write_manifest
from caad.eval import is_correct, normalize_text
from caad.stage1 import (
    LMGenerator,
    build_prompt,
    contains_label,
    generate_pseudo_gt,
    postprocess,
    template_answer,
)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture(scope="module")
def tiny_lm(tiny_corpus_rows, tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32) with a tokenizer trained on the corpus text, saved locally."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from caad.models.tokenizer import train_tokenizer

    texts = []
    for row in tiny_corpus_rows:
        texts += [row.instruction, row.metadata["transcript"], template_answer(row), build_prompt(row)]
    tokenizer = train_tokenizer(texts * 4, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_lm") / "lm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------- template


def test_template_answers(tiny_corpus, tmp_path):
    out = tmp_path / "train.pgt.jsonl"
    result = generate_pseudo_gt(tiny_corpus.train, out, progress=False)
    rows, source = read_manifest(out), read_manifest(tiny_corpus.train)
    assert result.num_generated == len(rows) == len(source) and result.num_skipped == 0
    assert [row.id for row in rows] == [row.id for row in source]
    attribute_words = {"male", "female", "slow", "normal", "fast", "low", "high"}
    for row, original in zip(rows, source):
        assert row.pseudo_gt_generator == "template"
        # the answer to the question asked: right under the scorer, the label first and once
        assert is_correct(row.pseudo_gt, row.label, row.choices), row.pseudo_gt
        words = normalize_text(row.pseudo_gt).split()
        assert words[0] == row.label and words.count(row.label) == 1, row.pseudo_gt
        # and not a list of the other attributes, nor the distractor, nor what a context says
        assert not (set(words) - {row.label}) & (attribute_words | {row.metadata["distractor"]}), row.pseudo_gt
        # everything else is carried over, and the audio still resolves from the new folder
        assert (row.instruction, row.label, row.metadata, row.hint_contradicting) == (
            original.instruction,
            original.label,
            original.metadata,
            original.hint_contradicting,
        )
        assert row.audio_path.resolve() == original.audio_path.resolve()
    load_audio(rows[0].audio_path)
    # deterministic: a second run writes the same bytes
    again = tmp_path / "again.jsonl"
    generate_pseudo_gt(tiny_corpus.train, again, progress=False)
    assert again.read_bytes() == out.read_bytes()


def test_template_answer_examples():
    row = ManifestRow(
        id="r",
        audio="a.wav",
        sampling_rate=16000,
        instruction="Q",
        task="speaker_gender",
        metadata={"gender": "female", "rate": "slow", "pitch": "high", "transcript": "Hi."},
        label="female",
    )
    assert template_answer(row) == "Female. It is a woman's voice."
    row.task, row.label = "speaking_rate", "slow"
    assert template_answer(row) == "Slow. The speaker takes their time."
    row.task, row.label = "pitch_level", "high"
    assert template_answer(row) == "High. The voice is raised for this speaker."
    row.task, row.label = "spoken_content", "violin"
    assert template_answer(row) == "Violin. That word is in the sentence."
    row.task, row.label = "emotion_recognition", "happy"
    assert template_answer(row) == "happy."
    row.label = "It is raining!"
    assert template_answer(row) == "It is raining!"
    row.label = None  # no label: a description of the recording
    assert template_answer(row).startswith("The recording has a female voice talking at a slow pace")
    row.metadata = {}
    with pytest.raises(ValueError, match="'r'.*no label"):
        template_answer(row)
    assert contains_label("The speaker is female.", "female") and not contains_label("The speaker is female.", "male")
    assert contains_label("It's at a Normal pace!", "normal pace") and not contains_label("slowly", "slow")


# ---------------------------------------------------------------------------------------------- resume


def test_template_resume_generates_only_the_rest(tiny_corpus, tmp_path):
    full = tmp_path / "full.jsonl"
    generate_pseudo_gt(tiny_corpus.train, full, progress=False)
    lines = _lines(full)
    k = 5
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:k]) + lines[k][:40], encoding="utf-8")  # interrupted mid-row
    result = generate_pseudo_gt(tiny_corpus.train, partial, progress=False)
    assert (result.num_skipped, result.num_generated) == (k, len(lines) - k)
    assert partial.read_bytes() == full.read_bytes()
    # complete: nothing left to do; resume=False refuses; overwrite starts again
    assert generate_pseudo_gt(tiny_corpus.train, partial, progress=False).num_generated == 0
    with pytest.raises(FileExistsError, match="already exists"):
        generate_pseudo_gt(tiny_corpus.train, partial, resume=False, progress=False)
    redo = generate_pseudo_gt(tiny_corpus.train, partial, overwrite=True, resume=False, progress=False)
    assert redo.num_generated == len(lines) and partial.read_bytes() == full.read_bytes()
    # a last row written whole but without its newline counts as written
    partial.write_text("".join(lines[:k]).rstrip("\n"), encoding="utf-8")
    assert generate_pseudo_gt(tiny_corpus.train, partial, progress=False).num_skipped == k
    assert partial.read_bytes() == full.read_bytes()


# ---------------------------------------------------------------------------------------------- errors


def test_stage1_errors(tiny_corpus, tmp_path):
    train = tiny_corpus.train
    before = train.read_bytes()
    with pytest.raises(ValueError, match="never overwrites its input"):
        generate_pseudo_gt(train, train, progress=False)
    with pytest.raises(ValueError, match="never overwrites its input"):
        generate_pseudo_gt(train, train.parent / "audio" / ".." / train.name, overwrite=True, progress=False)
    assert train.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="input manifest not found"):
        generate_pseudo_gt(tmp_path / "missing.jsonl", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(ValueError, match="unknown generator 'gpt'"):
        generate_pseudo_gt(train, tmp_path / "o.jsonl", generator="gpt", progress=False)
    with pytest.raises(ValueError, match="needs model_path"):
        generate_pseudo_gt(train, tmp_path / "o.jsonl", generator="lm", progress=False)
    with pytest.raises(FileNotFoundError, match="language model folder not found"):
        generate_pseudo_gt(train, tmp_path / "o.jsonl", generator="lm", model_path=tmp_path / "nolm", progress=False)
    (tmp_path / "notlm").mkdir()
    with pytest.raises(ValueError, match="cannot load"):
        generate_pseudo_gt(train, tmp_path / "o.jsonl", generator="lm", model_path=tmp_path / "notlm", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_pseudo_gt(train, tmp_path / "o.jsonl", batch_size=0, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_lines(train)[0] + '{"id": "x", "audio": "a.wav", "sampling_rate": 16000, "task": "t"}\n')
    with pytest.raises(ManifestError, match="line 2: field 'instruction': missing"):
        generate_pseudo_gt(bad, tmp_path / "o.jsonl", progress=False)
    # a row the template cannot answer fails before anything is written
    write_manifest(
        tmp_path / "empty.jsonl",
        [{"id": "e", "audio": "a.wav", "sampling_rate": 16000, "instruction": "Q", "task": "t"}],
    )
    with pytest.raises(ValueError, match="no label"):
        generate_pseudo_gt(tmp_path / "empty.jsonl", tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()
    # an empty manifest fails clearly, and writes nothing
    (tmp_path / "none.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="none.jsonl: the manifest has no rows"):
        generate_pseudo_gt(tmp_path / "none.jsonl", tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()
    # an existing file that is not a partial Stage 1 output of this input is never appended to
    mine = tmp_path / "mine.jsonl"
    mine.write_bytes(tiny_corpus.validation.read_bytes())
    with pytest.raises(FileExistsError, match="refusing to append"):
        generate_pseudo_gt(train, mine, progress=False)
    assert mine.read_bytes() == tiny_corpus.validation.read_bytes()
    generate_pseudo_gt(train, tmp_path / "t.jsonl", progress=False)
    with pytest.raises(FileExistsError, match="generator 'lm:"):
        generate_pseudo_gt(train, tmp_path / "t.jsonl", generator="lm", model_path=tmp_path / "notlm", progress=False)


# -------------------------------------------------------------------------------------------------- lm


def test_lm_generator_batched_greedy(tiny_corpus, tiny_lm, tmp_path):
    rows = read_manifest(tiny_corpus.train)[:6]
    generator = LMGenerator(tiny_lm, max_new_tokens=6)
    assert generator.tokenizer.padding_side == "left"
    batched = generator.generate(rows)
    one_by_one = [generator.generate([row])[0] for row in rows]
    assert batched == one_by_one  # left padding does not change greedy decoding
    assert generator.generate(rows) == batched
    assert any(text.strip() for text in batched)

    out = tmp_path / "lm.jsonl"
    source = tmp_path / "six.jsonl"
    write_manifest(source, rows)
    result = generate_pseudo_gt(
        source,
        out,
        generator="lm",
        model_path=tiny_lm,
        batch_size=4,
        max_new_tokens=6,
        require_label=False,
        progress=False,
    )
    written = read_manifest(out)
    assert result.generator == f"lm:{tiny_lm.resolve()}" and result.num_generated == 6
    assert result.num_fallback_no_label == 0
    for row, raw in zip(written, batched):
        assert row.pseudo_gt_generator == result.generator
        assert row.pseudo_gt == (postprocess(raw) or template_answer(row))
    assert result.num_fallback_empty == sum(1 for raw in batched if not postprocess(raw))

    # require_label (the default): answers without the label are replaced by the template answer
    strict = generate_pseudo_gt(
        source, tmp_path / "strict.jsonl", generator="lm", model_path=tiny_lm, max_new_tokens=6, progress=False
    )
    strict_rows = read_manifest(tmp_path / "strict.jsonl")
    assert all(is_correct(row.pseudo_gt, row.label, row.choices) for row in strict_rows)
    kept = [
        bool(postprocess(raw)) and is_correct(postprocess(raw), row.label, row.choices)
        for row, raw in zip(rows, batched)
    ]
    assert strict.num_fallbacks == kept.count(False)


def test_lm_resume_and_fallbacks(tiny_corpus, tiny_lm, tmp_path, monkeypatch):
    source = tmp_path / "source.jsonl"
    write_manifest(source, read_manifest(tiny_corpus.train)[:7])
    full = tmp_path / "full.jsonl"
    generate_pseudo_gt(
        source,
        full,
        generator="lm",
        model_path=tiny_lm,
        batch_size=3,
        max_new_tokens=4,
        require_label=False,
        progress=False,
    )
    seen: list[str] = []
    real_generate = LMGenerator.generate

    def counting_generate(self, rows):
        seen.extend(row.id for row in rows)
        return real_generate(self, rows)

    monkeypatch.setattr(LMGenerator, "generate", counting_generate)
    partial = tmp_path / "partial.jsonl"
    lines = _lines(full)
    partial.write_text("".join(lines[:4]) + lines[4][:25], encoding="utf-8")
    result = generate_pseudo_gt(
        source,
        partial,
        generator="lm",
        model_path=tiny_lm,
        batch_size=3,
        max_new_tokens=4,
        require_label=False,
        progress=False,
    )
    assert (result.num_skipped, result.num_generated) == (4, 3)
    assert seen == [json.loads(line)["id"] for line in lines[4:]]
    assert partial.read_bytes() == full.read_bytes()

    # empty answers fall back to the template answer and are counted
    monkeypatch.setattr(LMGenerator, "generate", lambda self, rows: ["", "Answer:  \n"] + ["The speaker is male."] * 5)
    result = generate_pseudo_gt(
        source, tmp_path / "fb.jsonl", generator="lm", model_path=tiny_lm, require_label=False, progress=False
    )
    assert result.num_fallback_empty == 2
    rows = read_manifest(tmp_path / "fb.jsonl")
    assert rows[0].pseudo_gt == template_answer(rows[0]) and rows[2].pseudo_gt == "The speaker is male."


def test_postprocess():
    assert postprocess("  Answer: The speaker is   female.\nQuestion: more") == "The speaker is female."
    assert postprocess("\n\n  \nIt is fast.") == "It is fast."
    assert postprocess(" \n ") == ""
    assert len(postprocess("word " * 500, max_chars=50)) <= 50


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_stage1(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["stage1", "--manifest", str(tiny_corpus.test), "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    assert "rows generated" in capsys.readouterr().out
    assert cli_main(args) == 0  # resume: nothing left to do
    assert "0 rows generated" in capsys.readouterr().out
    assert cli_main(args + ["--no-resume"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["stage1", "--manifest", str(tiny_corpus.test), "--out", str(tiny_corpus.test)]) == 2
    assert cli_main(args + ["--generator", "lm"]) == 2
    assert "--model" in capsys.readouterr().err


def test_lm_prompt_leaves_out_the_context(tiny_corpus):
    """The LM writes the answer from the audio's facts: a (possibly contradicting) context is not shown."""
    from caad.stage1.lm import question_of

    rows = [row for row in read_manifest(tiny_corpus.test) if row.condition == "adversarial"]
    assert rows
    for row in rows:
        prompt = build_prompt(row)
        assert row.context not in prompt and question_of(row) in prompt
        assert row.instruction == f"{row.context} {question_of(row)}"
