"""The SALAD loop: Stage I cross-modal distillation, then rounds of measure -> select -> synthesise -> train.

:func:`run_salad` reads like the paper's algorithm (arXiv 2510.13632), with the baselines as arms:

1. **base** (once): the spoken-QA set, the text teacher and the initial student (built when the config
   gives none); the teacher's text accuracy on the evaluation items;
2. **pool** (once): the set's training questions as text, embedded by the teacher (mean-pooled hidden
   states), clustered with k-means; a small probe per cluster, spoken once with every voice in turn (probe
   questions only measure: no round speaks them for training, so the probe stays held out);
3. per seed, **Stage I**: cross-modal distillation (``t2t`` + ``s2t`` from the text teacher, the shared
   trainer) on the set's training speech; then its probe measures and its measures on the evaluation set;
4. per seed and arm, for each round ``r = 1..rounds``:
   a. **measure**: every cluster's misalignment on its probe (KL, JS, accuracy gap) with the student of the
      previous round (the probe measures taken after that round's training);
   b. **select**: active arms rank the clusters by their metric and plan items of the worst ``top_clusters``;
      the random arm plans items of the whole pool;
   c. **synthesise** the plan within the round's budget (utterances or seconds; several voices, rates and
      pitches in a balanced cycle);
   d. **train**: one trainer run of the cross-modal method from the previous student on the new speech
      (plus Stage I's data and earlier rounds' with ``replay``);
   e. its probe measures and measures on the evaluation set.

Layout of ``output_dir`` (every record JSON, written when its step completes)::

    salad.json                  marker: the config the run was started with
    base/                       set/, text_teacher/, student/ (when built), base.json
    pool/                       pool.json (items, clusters, probe rows), embeddings.pt, probe/ (audio, probe.jsonl)
    seed_<s>/stage1/            train/ (trainer run), probe_after.json, eval.json, round.json (done)
    seed_<s>/<arm>/round_<r>/   selection.json (budget, scores, chosen clusters and items), selected.jsonl,
                                audio/, train_manifest.jsonl, train/, probe_after.json, eval.json, round.json
    report.json, report.md, gap_per_cluster.png, measures_vs_budget.png   (:mod:`caad.methods.salad.report`)

Resumable between (and inside) rounds: every step is skipped when its record exists, a trainer run that
was cut off continues from its last checkpoint. An existing run is never overwritten: without ``resume``
a non-empty ``output_dir`` is refused, and with it the recorded config must match (only ``rounds``,
``seeds``, ``arms``, ``progress`` and ``bootstrap`` may change: more rounds, seeds or arms extend it).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from caad.cli import UserError
from caad.data.files import write_text_atomic
from caad.data.manifest import ManifestRow, read_manifest, write_manifest
from caad.methods.salad.config import ARM_RANDOM, SaladConfig
from caad.methods.salad.selection import Budget, plan_active, plan_random

__all__ = ["RESUMABLE_KEYS", "SaladRun", "run_salad"]

MARKER = "salad.json"
#: Keys a resumed run may change (everything else must match the recorded config).
RESUMABLE_KEYS = ("rounds", "seeds", "arms", "progress", "bootstrap")


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _log(message: str) -> None:
    print(f"salad: {message}", flush=True)


class SaladRun:
    """One SALAD run in ``config.output_dir`` (module docstring). ``resume`` continues an earlier one.

    ``trainer``: the function that runs one training (default :func:`caad.train.train`; tests may wrap it).
    """

    def __init__(self, config: SaladConfig, *, resume: bool = False, trainer: Callable[..., Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.root = Path(config.output_dir)
        self.resume = resume
        self._trainer = trainer
        self._check_output_dir()

    # ---- the folder -------------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise UserError(f"salad.output_dir: {root} exists and is not a folder")
        empty = not root.exists() or not any(root.iterdir())
        if empty:
            return
        if not (root / MARKER).is_file():
            raise UserError(
                f"salad.output_dir: {root} is not empty and holds no SALAD run ({MARKER}); refusing to write "
                "into it: choose another folder"
            )
        if not self.resume:
            raise UserError(
                f"salad.output_dir: {root} already holds a SALAD run; it is never overwritten: pass --resume to "
                "continue it, or choose another output_dir"
            )
        recorded = _read_json(root / MARKER).get("config", {})
        now = dataclasses.asdict(self.config)
        changed = sorted(k for k in now if k not in RESUMABLE_KEYS and recorded.get(k) != now[k])
        if changed:
            raise UserError(
                f"--resume: {root} was started with different {', '.join(f'salad.{k}' for k in changed)}; only "
                f"{', '.join(RESUMABLE_KEYS)} may change when resuming. Use the same settings or another output_dir"
            )

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        info = {"format": "caad-salad", "version": 1, "config": dataclasses.asdict(self.config)}
        _write_json(marker, info)

    # ---- the algorithm ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every step not yet done; returns the report (:func:`caad.methods.salad.report.write_report`)."""
        from caad.methods.salad.report import write_report

        cfg = self.config
        self._start()
        self.base = self._base()
        self.pool = self._pool()
        for seed in cfg.seeds:
            self._stage1(seed)
            for arm in cfg.arms:
                for round_index in range(1, cfg.rounds + 1):
                    self._round(seed, arm, round_index)
        return write_report(self.root, cfg)

    # 1. base
    def _base(self) -> dict[str, Any]:
        from caad.methods.salad.prepare import prepare_base

        path = self.root / "base" / "base.json"
        if not path.is_file():
            _log("preparing the spoken-QA set, the text teacher and the student")
            _write_json(path, prepare_base(self.config, self.root / "base"))
        return _read_json(path)

    def _models(self, student_path: str) -> tuple[Any, Any, Any]:
        from caad.models import load_speech_lm
        from caad.models.text_lm import load_text_lm

        teacher, tokenizer = load_text_lm(self.base["teacher"])
        return teacher, tokenizer, load_speech_lm(student_path)

    # 2. pool
    def _pool(self) -> dict[str, Any]:
        from caad.data.spoken_qa import read_text_items, synthesize_items
        from caad.methods.salad.embed import embed_texts
        from caad.methods.salad.kmeans import kmeans

        folder = self.root / "pool"
        path = folder / "pool.json"
        if path.is_file():
            return _read_json(path)
        cfg = self.config
        items = read_text_items(self.base["text_train"])
        if len(items) < cfg.clusters:
            raise UserError(f"salad.clusters: {cfg.clusters} clusters but the pool has only {len(items)} questions")
        teacher, tokenizer, _ = self._models(self.base["student"])
        _log(f"embedding and clustering {len(items)} pool questions into {cfg.clusters} clusters")
        embeddings = embed_texts(teacher, tokenizer, [item.text_query for item in items])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(embeddings, folder / "embeddings.pt")
        result = kmeans(embeddings, cfg.clusters, seed=cfg.set_seed)
        labels = result.labels.tolist()
        rng = random.Random(f"salad-probe-{cfg.set_seed}")
        probe_indices, probe_clusters = [], []
        for cluster in range(cfg.clusters):
            members = [i for i, label in enumerate(labels) if label == cluster]
            for index in rng.sample(members, min(cfg.probe_per_cluster, len(members))):
                probe_indices.append(index)
                probe_clusters.append(cluster)
        synthesis = synthesize_items(
            [items[i] for i in probe_indices],
            folder / "probe",
            voices=cfg.voices,
            rates=cfg.rates,
            pitches=cfg.pitches,
            seed=cfg.set_seed,
            id_prefix="probe",
            progress=cfg.progress,
            progress_label="synthesising probe questions",
            overwrite=True,  # leftovers of an interrupted pool step (this folder is ours)
        )
        write_manifest(folder / "probe" / "probe.jsonl", synthesis.rows, overwrite=True)
        pool = {
            "items": [item.id for item in items],
            "texts": [item.text_query for item in items],
            "tasks": [item.task for item in items],
            "labels": labels,
            "inertia": result.inertia,
            "cluster_sizes": [labels.count(c) for c in range(cfg.clusters)],
            "cluster_tasks": [
                {
                    task: sum(1 for i, lab in enumerate(labels) if lab == c and items[i].task == task)
                    for task in sorted({it.task for it in items})
                }
                for c in range(cfg.clusters)
            ],  # fmt: skip
            "probe_manifest": str(folder / "probe" / "probe.jsonl"),
            "probe_items": probe_indices,
            "probe_clusters": probe_clusters,
            "probe_utterances": synthesis.num_utterances,
            "probe_seconds": round(synthesis.audio_seconds, 3),
        }
        _write_json(path, pool)
        return pool

    # 3./4e. probe and measures of a trained student
    def _after_training(self, folder: Path, student_path: Path) -> None:
        from caad.methods.salad.measures import evaluate_student
        from caad.methods.salad.misalignment import cluster_scores, probe_items

        cfg = self.config
        if (folder / "probe_after.json").is_file() and (folder / "eval.json").is_file():
            return
        teacher, tokenizer, student = self._models(str(student_path))
        if not (folder / "probe_after.json").is_file():
            probe_rows = read_manifest(self.pool["probe_manifest"])
            records = probe_items(teacher, tokenizer, student, probe_rows, temperature=cfg.probe_temperature)
            scores = cluster_scores(records, self.pool["probe_clusters"], cfg.clusters)
            _write_json(folder / "probe_after.json", {"cluster_scores": scores, "records": records})
        if not (folder / "eval.json").is_file():
            rows = read_manifest(self.base["eval_manifest"])
            if cfg.eval_max_items is not None:
                rows = rows[: cfg.eval_max_items]
            _write_json(folder / "eval.json", {"records": evaluate_student(student, rows)})

    def _train(self, folder: Path, manifest: Path, student: str, seed: int, steps: int) -> Path:
        from caad.methods.crossmodal import CrossModalMethod
        from caad.train import train

        out = folder / "train"
        final = out / "final"
        if (final / "config.json").is_file():
            return final
        config = self.config.train_config(
            train_manifest=str(manifest),
            student=student,
            teacher=self.base["teacher"],
            output_dir=str(out),
            seed=seed,
            max_steps=steps,
        )
        run = self._trainer or train
        result = run(CrossModalMethod(config, "salad.train"), resume=out.exists())
        return Path(result.final_model)

    # 3. Stage I
    def _stage1(self, seed: int) -> None:
        folder = self.root / f"seed_{seed}" / "stage1"
        if (folder / "round.json").is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        _log(f"seed {seed}: Stage I (cross-modal distillation on {self.base['stage1_utterances']} utterances)")
        manifest = Path(self.base["train_manifest"])
        final = self._train(folder, manifest, self.base["student"], seed, self.config.stage1_steps)
        self._after_training(folder, final)
        _write_json(folder / "round.json", {"seed": seed, "round": 0, "arm": "stage1", "student": str(final),
                                           "spent_utterances": 0, "spent_seconds": 0.0})  # fmt: skip

    # 4. one round
    def _round(self, seed: int, arm: str, index: int) -> None:
        from caad.data.spoken_qa import read_text_items, synthesize_items

        cfg = self.config
        arm_dir = self.root / f"seed_{seed}" / arm
        folder = arm_dir / f"round_{index}"
        if (folder / "round.json").is_file():
            return
        previous = self.root / f"seed_{seed}" / "stage1" if index == 1 else arm_dir / f"round_{index - 1}"
        before = _read_json(previous / "round.json")
        folder.mkdir(parents=True, exist_ok=True)
        budget = Budget(cfg.budget_unit, float(cfg.budget_per_round))

        # a. measure, b. select (recorded before synthesis, reused on resume)
        selection_path = folder / "selection.json"
        if not selection_path.is_file():
            scores = _read_json(previous / "probe_after.json")["cluster_scores"]
            used: dict[int, int] = {}
            for earlier in range(1, index):
                for item in _read_json(arm_dir / f"round_{earlier}" / "selection.json")["spoken_items"]:
                    used[item] = used.get(item, 0) + 1
            plan_seed = seed * 100_003 + index
            # the probe items only measure: never spoken for training, so the probe stays held out
            probe = set(self.pool["probe_items"])
            candidates = [i for i in range(len(self.pool["items"])) if i not in probe]
            local_used = {k: used[i] for k, i in enumerate(candidates) if i in used}
            if arm == ARM_RANDOM:
                local, chosen = plan_random(len(candidates), budget, seed=plan_seed, used=local_used), []
            else:
                labels = [self.pool["labels"][i] for i in candidates]
                local, chosen = plan_active(
                    scores[arm], labels, budget, top=cfg.top_clusters, seed=plan_seed, used=local_used
                )
            plan = [candidates[k] for k in local]
            _write_json(selection_path, {
                "seed": seed, "arm": arm, "round": index, "metric": None if arm == ARM_RANDOM else arm,
                "cluster_scores": scores, "chosen_clusters": chosen, "plan": plan,
                "budget": {"unit": budget.unit, "amount": budget.amount},
            })  # fmt: skip
        selection = _read_json(selection_path)

        # c. synthesise within the budget
        selected_path = folder / "selected.jsonl"
        if "spoken_items" not in selection:
            items = read_text_items(self.base["text_train"])
            _log(f"seed {seed}, {arm}, round {index}: synthesising within {budget.amount:g} {budget.unit}")
            synthesis = synthesize_items(
                [items[i] for i in selection["plan"]],
                folder,
                voices=cfg.voices,
                rates=cfg.rates,
                pitches=cfg.pitches,
                seed=seed,
                id_prefix=f"salad-{arm}-s{seed}-r{index}",
                progress=cfg.progress,
                progress_label=f"synthesising round {index} ({arm})",
                overwrite=True,  # leftovers of this round's interrupted synthesis (this folder is ours)
                **budget.synthesis_limits(),
            )
            write_manifest(selected_path, synthesis.rows, overwrite=True)
            spoken = selection["plan"][: synthesis.num_utterances]
            labels = self.pool["labels"]
            selection.update({
                "spoken_items": spoken,
                "spoken_ids": [self.pool["items"][i] for i in spoken],
                "spoken_per_cluster": [sum(1 for i in spoken if labels[i] == c) for c in range(cfg.clusters)],
                "spent": {"utterances": synthesis.num_utterances, "seconds": round(synthesis.audio_seconds, 3),
                          "budget_units": budget.spent(synthesis.num_utterances, synthesis.audio_seconds),
                          "stopped_by_budget": synthesis.stopped_by_budget},
                "voices": _count([row.metadata["voice"] for row in synthesis.rows]),
                "cumulative": {
                    "utterances": before["spent_utterances"] + synthesis.num_utterances,
                    "seconds": round(before["spent_seconds"] + synthesis.audio_seconds, 3),
                },
            })  # fmt: skip
            _write_json(selection_path, selection)
        # d. train
        manifest = folder / "train_manifest.jsonl"
        if not manifest.is_file():
            rows: list[ManifestRow] = list(read_manifest(self.base["train_manifest"])) if cfg.replay else []
            for earlier in range(1, index + 1) if cfg.replay else (index,):
                rows += read_manifest(arm_dir / f"round_{earlier}" / "selected.jsonl")
            write_manifest(manifest, rows, overwrite=True)
        final = self._train(folder, manifest, before["student"], seed * 1000 + index, cfg.round_steps)
        # e. measures
        self._after_training(folder, final)
        _write_json(folder / "round.json", {
            "seed": seed, "round": index, "arm": arm, "student": str(final),
            "spent_utterances": selection["cumulative"]["utterances"],
            "spent_seconds": selection["cumulative"]["seconds"],
        })  # fmt: skip


def _count(values: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[str(value)] = out.get(str(value), 0) + 1
    return dict(sorted(out.items()))


def run_salad(config: SaladConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) SALAD as configured; returns the report."""
    return SaladRun(config, resume=resume).run()
