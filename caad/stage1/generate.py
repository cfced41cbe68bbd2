"""Stage 1: write a new manifest with one pseudo-GT answer per example (``caad stage1``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from caad.data.manifest import ManifestError, ManifestRow, ManifestWriter, read_manifest
from caad.stage1.lm import LMGenerator, postprocess
from caad.stage1.templates import template_answer

__all__ = ["GENERATORS", "Stage1Result", "generate_pseudo_gt"]

GENERATORS = ("template", "lm")


@dataclass(frozen=True)
class Stage1Result:
    """What a Stage 1 run did."""

    output: Path
    generator: str
    """The generator tag written to each row's ``pseudo_gt_generator``."""
    num_rows: int
    """Rows in the input manifest."""
    num_skipped: int
    """Rows already in the output (resume) and left as they were."""
    num_generated: int
    """Rows written by this run."""
    num_fallback_empty: int = 0
    """``lm``: rows where the LM's answer was empty after post-processing (template used instead)."""
    num_fallback_no_label: int = 0
    """``lm`` with ``require_label``: rows whose LM answer lacked the label (template used instead)."""

    @property
    def num_fallbacks(self) -> int:
        return self.num_fallback_empty + self.num_fallback_no_label


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _existing_output(output: Path, rows: list[ManifestRow], tag: str) -> set[str]:
    """Ids already written by an earlier run of the same generator on the same input, or an error."""
    written = read_manifest(output, allow_partial_last_line=True)
    input_ids = {row.id for row in rows}
    for row in written:
        if row.id not in input_ids or row.pseudo_gt is None or row.pseudo_gt_generator != tag:
            raise FileExistsError(
                f"{output} exists but is not a partial Stage 1 output of this input with generator {tag!r} "
                f"(row {row.id!r}: "
                + ("not in the input" if row.id not in input_ids else f"generator {row.pseudo_gt_generator!r}")
                + "); refusing to append to it. Pass overwrite=True to replace it, "
                "or choose another output"
            )
    return {row.id for row in written}


def generate_pseudo_gt(
    input_manifest: str | os.PathLike[str],
    output_manifest: str | os.PathLike[str],
    generator: str = "template",
    model_path: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    resume: bool = True,
    overwrite: bool = False,
    require_label: bool = True,
    device: str = "cpu",
    progress: bool = True,
) -> Stage1Result:
    """Write ``output_manifest``: the input's rows, in order, each with a ``pseudo_gt``.

    Args:
        input_manifest: a JSONL manifest (never modified).
        output_manifest: the new manifest; must differ from the input. Audio paths are rewritten
            so they still point at the same files.
        generator: ``"template"`` (offline, deterministic) or ``"lm"`` (a local causal LM).
        model_path: ``lm`` only: a folder with a saved HF causal LM and its tokenizer.
        batch_size: rows per LM batch (and per write for the template generator).
        max_new_tokens: ``lm`` only: the longest answer in tokens.
        resume: when the output exists (and ``overwrite`` is false), keep the rows it has (an
            earlier run of the same generator on the same input, possibly interrupted) and generate
            only the missing ones. With ``resume=False`` an existing output is an error.
        overwrite: replace an existing output, starting from scratch (wins over ``resume``).
        require_label: ``lm`` only: an answer that is not right under the evaluation's scorer (the
            label named, no other candidate, not negated: :func:`caad.eval.scoring.score_answer`)
            is replaced by the template answer and counted.
        device: ``lm`` only: torch device of the model.
        progress: show a progress bar (stderr).

    Rows are written one at a time and flushed, so an interrupted run leaves a valid prefix that
    the next run (with ``resume``) continues.
    """
    from tqdm.auto import tqdm

    source, output = Path(input_manifest), Path(output_manifest)
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}: expected one of {', '.join(GENERATORS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if generator == "lm":
        if model_path is None:
            raise ValueError("generator 'lm' needs model_path (--model): a folder with a saved causal LM")
        if not Path(model_path).exists():
            raise FileNotFoundError(f"language model folder not found: {model_path}")
    if not source.exists():
        raise FileNotFoundError(f"input manifest not found: {source}")
    if _same_file(source, output):
        raise ValueError(
            f"the output manifest {output} is the input manifest; Stage 1 never overwrites its input: "
            "choose another output path"
        )
    if output.is_dir():
        raise IsADirectoryError(f"the output manifest {output} is a directory")
    rows = read_manifest(source)
    if not rows:
        raise ManifestError("the manifest has no rows: there is nothing to write a pseudo-GT for", source)
    tag = "template" if generator == "template" else f"lm:{Path(model_path).resolve()}"

    done: set[str] = set()
    mode = "w"
    if output.exists() and not overwrite:
        if not resume:
            raise FileExistsError(
                f"{output} already exists; pass overwrite=True to replace it, "
                "or resume=True to continue it"
            )
        done = _existing_output(output, rows, tag)
        mode = "a"
    todo = [row for row in rows if row.id not in done]
    # Template answers first, for every row to do: a row that cannot get one fails before anything is
    # written, and the lm generator falls back on them.
    templates = {row.id: template_answer(row) for row in todo}

    if generator == "lm" and todo:
        from caad.eval.runner import row_candidates, task_labels
        from caad.eval.scoring import is_correct

        labels = task_labels(rows)

        def names_label(answer: str, row: ManifestRow) -> bool:
            return is_correct(answer, row.label, row_candidates(row, labels.get(row.task, ())))

    lm = LMGenerator(model_path, max_new_tokens=max_new_tokens, device=device) if generator == "lm" and todo else None
    fallback_empty = fallback_no_label = 0
    with (
        ManifestWriter(output, mode=mode) as writer,
        tqdm(
            total=len(rows),
            initial=len(done),
            desc=f"stage 1 ({generator})",
            unit="row",
            disable=not progress,
        ) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            if lm is None:
                answers = [templates[row.id] for row in batch]
            else:
                answers = []
                for row, raw in zip(batch, lm.generate(batch)):
                    answer = postprocess(raw)
                    if not answer:
                        fallback_empty += 1
                        answer = templates[row.id]
                    elif require_label and row.label and not names_label(answer, row):
                        fallback_no_label += 1
                        answer = templates[row.id]
                    answers.append(answer)
            for row, answer in zip(batch, answers):
                writer.write(dataclasses.replace(row, pseudo_gt=answer, pseudo_gt_generator=tag))
                bar.update(1)
    return Stage1Result(
        output=output,
        generator=tag,
        num_rows=len(rows),
        num_skipped=len(done),
        num_generated=len(todo),
        num_fallback_empty=fallback_empty,
        num_fallback_no_label=fallback_no_label,
    )
