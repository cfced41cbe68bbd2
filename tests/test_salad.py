"""SALAD (caad.methods.salad): k-means, misalignment metrics and selection on a hand-made pool with a known
worst cluster, budget accounting, probe measures against a materialising reference, config errors, and a
tiny two-round run end to end (resume between rounds, refusal to overwrite)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caad.cli import UserError
from caad.config import ConfigError
from caad.methods.salad import (
    METRICS,
    Budget,
    SaladConfig,
    cluster_scores,
    kmeans,
    load_salad_config,
    plan_active,
    plan_random,
    rank_clusters,
)
from caad.methods.salad.measures import summarize_measures
from caad.methods.salad.rounds import SaladRun


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _blobs(sizes=(7, 5, 9), dim=4, seed=0):
    """Well-separated Gaussian blobs: points ``[N, dim]`` and the blob of each point."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[: len(sizes)] * 10.0
    points = np.concatenate([c + 0.1 * rng.standard_normal((n, dim)) for c, n in zip(centers, sizes)])
    blob = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(len(blob))  # shuffled, so the clusters are not contiguous
    return torch.tensor(points[order]), blob[order]


# ---- k-means -----------------------------------------------------------------------------------------


def test_kmeans_recovers_separated_blobs_deterministically():
    points, blob = _blobs()
    result = kmeans(points, 3, seed=5)
    labels = result.labels.numpy()
    # the same partition as the blobs, up to renaming the clusters
    assert {(int(b), int(lab)) for b, lab in zip(blob, labels)} == {(b, int(labels[blob == b][0])) for b in range(3)}
    assert len(set(labels.tolist())) == 3
    # inertia and centers against numpy on that partition
    x = points.numpy()
    inertia = sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in range(3))
    assert result.inertia == pytest.approx(inertia, rel=1e-9)
    for c in range(3):
        assert np.allclose(result.centers[c].numpy(), x[labels == c].mean(0))
    again = kmeans(points, 3, seed=5)
    assert torch.equal(again.labels, result.labels) and torch.equal(again.centers, result.centers)


def test_kmeans_edge_cases_and_errors():
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    one = kmeans(points, 1)
    assert one.labels.tolist() == [0, 0, 0]
    assert one.inertia == pytest.approx(float(((points - points.mean(0)) ** 2).sum()))
    two = kmeans(points, 2).labels.tolist()
    assert two[0] == two[1] != two[2]
    # fewer distinct points than k: a cluster stays empty (as scikit-learn warns), nothing fails
    assert len(set(kmeans(points, 3).labels.tolist())) == 2
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        kmeans(points, 4)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[float("nan")], [0.0]]), 1)


# ---- misalignment and selection on a hand-made pool ----------------------------------------------------


def _hand_made_pool(worst_blob=2):
    """Blobs as the pool; per item a probe record whose misalignment is large only in ``worst_blob``."""
    points, blob = _blobs()
    labels = kmeans(points, 3, seed=0).labels.tolist()
    records = []
    for b in blob:
        bad = b == worst_blob
        records.append(
            {"kl": 2.0 if bad else 0.1, "js": 0.5 if bad else 0.02, "teacher_correct": True, "student_correct": not bad}
        )
    worst_cluster = labels[int(np.flatnonzero(blob == worst_blob)[0])]
    return labels, records, worst_cluster


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_selection_picks_the_worst_cluster(metric):
    labels, records, worst = _hand_made_pool()
    scores = cluster_scores(records, labels, 3)
    assert rank_clusters(scores[metric])[0] == worst
    plan, chosen = plan_active(scores[metric], labels, Budget("utterances", 12), top=1, seed=0)
    assert chosen == [worst] and len(plan) == 12
    assert {labels[i] for i in plan} == {worst}
    members = [i for i, lab in enumerate(labels) if lab == worst]
    # no item is spoken twice before every item of the cluster was spoken once
    assert len(set(plan[: len(members)])) == len(members)


def test_cluster_scores_match_hand_computed_values():
    records = [
        {"kl": 1.0, "js": 0.1, "teacher_correct": True, "student_correct": False},
        {"kl": 3.0, "js": 0.3, "teacher_correct": True, "student_correct": True},
        {"kl": 0.5, "js": 0.05, "teacher_correct": False, "student_correct": False},
    ]
    scores = cluster_scores(records, [0, 0, 1], 3)
    assert scores["kl"] == [2.0, 0.5, None]
    assert scores["js"][0] == pytest.approx(0.2)
    assert scores["acc_gap"] == [0.5, 0.0, None]
    assert rank_clusters([None, 0.5, 2.0, 0.5]) == [2, 1, 3, 0]


def test_top_clusters_share_the_budget_and_random_spans_the_pool():
    labels, records, worst = _hand_made_pool()
    scores = cluster_scores(records, labels, 3)["kl"]
    plan, chosen = plan_active(scores, labels, Budget("utterances", 10), top=2, seed=1)
    assert chosen[0] == worst and len(chosen) == 2
    counts = [sum(1 for i in plan if labels[i] == c) for c in chosen]
    assert counts == [5, 5]
    # earlier renderings count: items already spoken come last
    used = {i: 1 for i, lab in enumerate(labels) if lab == worst}
    fresh = [i for i in plan_active(scores, labels, Budget("utterances", 4), top=1, seed=2, used=used)[0]]
    assert all(used.get(i) == 1 for i in fresh)  # every item of the cluster was used once: cycling again
    rand = plan_random(len(labels), Budget("utterances", len(labels)), seed=3)
    assert sorted(rand) == list(range(len(labels)))  # a permutation: each item once
    assert rand != plan_random(len(labels), Budget("utterances", len(labels)), seed=4)
    assert rand == plan_random(len(labels), Budget("utterances", len(labels)), seed=3)


def test_budget_accounting_in_utterances_and_seconds(tmp_path):
    from caad.data.spoken_qa import synthesize_items
    from caad.data.spoken_qa_items import all_items

    assert Budget("utterances", 3).synthesis_limits() == {"max_utterances": 3}
    assert Budget("utterances", 3).spent(3, 9.5) == 3.0 and Budget("seconds", 4.0).spent(3, 2.5) == 2.5
    with pytest.raises(ValueError, match="whole"):
        Budget("utterances", 2.5)
    with pytest.raises(ValueError, match="unit"):
        Budget("minutes", 2)
    items = all_items(["addition"])[:6]
    result = synthesize_items(items, tmp_path / "u", voices=["m3"], progress=False,
                              **Budget("utterances", 2).synthesis_limits())  # fmt: skip
    assert result.num_utterances == 2 and len(result.rows) == 2
    durations = [r.metadata["duration_s"] for r in result.rows]
    # a seconds budget that fits the first clip and not the second: the second is not written
    budget = Budget("seconds", durations[0] + durations[1] / 2)
    result = synthesize_items(items, tmp_path / "s", voices=["m3"], progress=False, **budget.synthesis_limits())
    assert result.num_utterances == 1 and result.stopped_by_budget
    assert result.audio_seconds <= budget.amount < result.audio_seconds + durations[1]
    assert len(list((tmp_path / "s" / "audio").iterdir())) == 1


def test_measures_and_paired_gap_with_intervals():
    def records(speech, text, voices):
        return [
            {"id": f"u{i}", "voice": v, "speech_correct": s, "text_correct": t}
            for i, (s, t, v) in enumerate(zip(speech, text, voices))
        ]

    voices = ["m3", "f3", "m3", "f3"]
    per_seed = {0: records([1, 0, 0, 0], [1, 1, 1, 0], voices), 1: records([1, 1, 0, 0], [1, 1, 1, 1], voices)}
    summary = summarize_measures(per_seed, num_bootstrap=200)
    assert summary["speech_accuracy"]["value"] == pytest.approx((0.25 + 0.5) / 2)
    assert summary["text_accuracy"]["value"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["gap"]["value"] == pytest.approx(0.5)
    assert summary["gap"]["low"] <= 0.5 <= summary["gap"]["high"]
    assert summary["per_voice"]["m3"]["gap"]["value"] == pytest.approx(0.5)  # m3: (1-1 + 1-0) / 2 per seed
    assert summary["per_voice"]["f3"]["speech_accuracy"]["value"] == pytest.approx(0.25)


# ---- probe measures against a materialising reference -----------------------------------------------------


@pytest.fixture(scope="module")
def models(method_models):
    return method_models


def test_probe_items_match_a_per_item_reference(models):
    from methods_fixtures import answer_positions, text_logits

    from caad.data import read_manifest
    from caad.data.audio import load_audio
    from caad.methods.salad import probe_items
    from caad.models import SAMPLING_RATE, load_speech_lm
    from caad.models.text_lm import build_text_batch, load_text_lm

    teacher, tokenizer = load_text_lm(models.text_teacher)
    student = load_speech_lm(models.student)
    rows = read_manifest(models.train)[:4]
    records = probe_items(teacher, tokenizer, student, rows, temperature=2.0, batch_size=3)
    assert [r["id"] for r in records] == [r.id for r in rows]
    for row, record in zip(rows, records):
        text = build_text_batch(tokenizer, [row.extra["text_query"]], [row.pseudo_gt])
        with torch.no_grad():
            t = text_logits(teacher, text)[:, :-1][answer_positions(text.labels)][:, : student.vocab_size].double()
            speech = student.build_inputs(
                [load_audio(row.audio_path, SAMPLING_RATE)], [row.instruction], [row.pseudo_gt]
            )
            s = student.logits(speech)[:, :-1][answer_positions(speech.labels)].double()
        p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
        kl = (p * (p.log() - q.log())).sum(-1).mean()
        m = (p + q) / 2
        js = (0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)).mean()
        labels = text.labels[:, 1:][text.labels[:, 1:] != -100]
        usable = len(student.tokenizer)
        assert record["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
        assert record["js"] == pytest.approx(float(js), rel=1e-4, abs=1e-6)
        assert 0 <= record["js"] <= np.log(2) + 1e-6
        assert record["teacher_correct"] == bool((t[:, :usable].argmax(-1) == labels).all())
        assert record["student_correct"] == bool((s[:, :usable].argmax(-1) == labels).all())


# ---- config ------------------------------------------------------------------------------------------------


def test_config_file_overrides_and_errors(tmp_path):
    config = load_salad_config(
        "configs/salad.yaml", ["salad.rounds=3", "salad.train.lr=1e-3", "salad.arms=[js,random]"]
    )
    assert config.rounds == 3 and config.train["lr"] == 1e-3 and config.arms == ["js", "random"]
    assert (
        config.train_config(student="s", output_dir="o", train_manifest="m", teacher="t", seed=1, max_steps=2).lr
        == 1e-3
    )
    cases = [
        (["salad.arms=[kl,kl]"], "salad.arms must be"),
        (["salad.arms=[entropy]"], "salad.arms must be"),
        (["salad.budget_unit=minutes"], "salad.budget_unit must be one of"),
        (["salad.budget_per_round=2.5"], "whole number of utterances"),
        (["salad.top_clusters=9"], "salad.top_clusters must be <= clusters"),
        (["salad.voices=[m9]"], "salad.voices must be"),
        (["salad.train.output_dir=x"], "SALAD sets output_dir itself"),
        (["salad.train.lrr=1"], "salad.train.lrr: unknown key"),
        (["salad.train.temperature=0"], "salad.train.temperature must be > 0"),
        (["salad.clusterz=3"], "salad.clusterz: unknown key"),
        (["rounds=3"], "expected salad.KEY=VALUE"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_salad_config("configs/salad.yaml", overrides)
    assert load_salad_config("configs/salad.yaml", ["salad.budget_unit=seconds", "salad.budget_per_round=2.5"])


# ---- end to end ---------------------------------------------------------------------------------------------


def _tiny_config(root, **overrides) -> SaladConfig:
    settings = dict(
        output_dir=str(root),
        set_examples=10,
        voices=["m3", "f3"],
        rates=[175],
        pitches=[50],
        teacher_steps=5,
        seeds=[0],
        arms=["kl", "random"],
        clusters=3,
        probe_per_cluster=1,
        rounds=1,
        budget_per_round=2,
        top_clusters=1,
        stage1_steps=2,
        round_steps=2,
        eval_max_items=2,
        bootstrap=50,
        progress=False,
        train={"batch_size": 3, "lr": 3e-3, "scheduler": "constant", "data_check": False, "save_every": 0},
    )
    settings.update(overrides)
    config = SaladConfig(**settings)
    config.validate()
    return config


@pytest.mark.slow
def test_two_rounds_end_to_end_with_resume_and_no_overwrite(tmp_path):
    from caad.train import train

    calls = []

    def counting_train(method, **kwargs):
        calls.append(method.config.output_dir)
        return train(method, **kwargs)

    root = tmp_path / "salad"
    report = SaladRun(_tiny_config(root), trainer=counting_train).run()
    assert len(calls) == 3  # Stage I, then round 1 of each arm
    first_round = {arm: (root / "seed_0" / arm / "round_1" / "selection.json").read_text() for arm in ("kl", "random")}

    # never overwritten: the same folder again without --resume, or a foreign non-empty folder
    with pytest.raises(UserError, match="never overwritten"):
        SaladRun(_tiny_config(root))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no SALAD run"):
        SaladRun(_tiny_config(tmp_path / "foreign"))
    with pytest.raises(UserError, match="salad.clusters"):
        SaladRun(_tiny_config(root, rounds=2, clusters=2), resume=True)

    # resume with one more round: round 1 is neither re-selected nor retrained
    report = SaladRun(_tiny_config(root, rounds=2), resume=True, trainer=counting_train).run()
    assert len(calls) == 5 and all("round_2" in c for c in calls[3:])
    for arm in ("kl", "random"):
        assert (root / "seed_0" / arm / "round_1" / "selection.json").read_text() == first_round[arm]

    # resume inside a round: its measures lost after training; they are redone, the training is not
    folder = root / "seed_0" / "random" / "round_2"
    measured = json.loads((folder / "eval.json").read_text())
    for name in ("round.json", "eval.json", "probe_after.json"):
        (folder / name).unlink()
    report = SaladRun(_tiny_config(root, rounds=2), resume=True, trainer=counting_train).run()
    assert len(calls) == 5  # no training ran again
    assert json.loads((folder / "eval.json").read_text()) == measured  # greedy answers: the same records

    pool = json.loads((root / "pool" / "pool.json").read_text())
    labels = pool["labels"]
    for arm in ("kl", "random"):
        rounds = report["arms"][arm]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert [r["spent"]["utterances"] for r in rounds] == [0, 2, 4]  # the budget, spent exactly
        for index in (1, 2):
            folder = root / "seed_0" / arm / f"round_{index}"
            selection = json.loads((folder / "selection.json").read_text())
            assert selection["spent"]["utterances"] == 2 == len(selection["spoken_items"])
            assert sum(selection["spoken_per_cluster"]) == 2
            assert len((folder / "selected.jsonl").read_text().splitlines()) == 2
            manifest = (folder / "train_manifest.jsonl").read_text().splitlines()
            stage1 = json.loads((root / "base" / "base.json").read_text())["stage1_utterances"]
            assert len(manifest) == stage1 + 2 * index  # replay: Stage I's utterances + every round's
            if arm == "kl":
                # the worst cluster by KL on the previous student's probe, and only its items
                previous = root / "seed_0" / ("stage1" if index == 1 else f"kl/round_{index - 1}")
                scores = json.loads((previous / "probe_after.json").read_text())["cluster_scores"]["kl"]
                assert selection["chosen_clusters"] == [int(np.nanargmax(np.array(scores, dtype=float)))]
                assert {labels[i] for i in selection["spoken_items"]} == set(selection["chosen_clusters"])
            assert not set(selection["spoken_items"]) & set(pool["probe_items"])  # the probe stays held out
            for key in ("speech_accuracy", "text_accuracy", "gap"):
                assert key in rounds[index]["measures"]
    # Stage I is shared: round 0 identical in both arms
    assert report["arms"]["kl"][0]["measures"] == report["arms"]["random"][0]["measures"]
    assert (root / "gap_per_cluster.png").stat().st_size > 0 and (root / "measures_vs_budget.png").stat().st_size > 0
    assert json.loads((root / "report.json").read_text())["budget_unit"] == "utterances"
    table = (root / "report.md").read_text()
    assert "| Stage I | 0 | 0 |" in table and "| kl | 2 | 4 |" in table and "| random | 2 | 4 |" in table


def test_command_parses_and_reports_config_errors(tmp_path):
    import argparse

    from caad.commands import salad

    parser = argparse.ArgumentParser(prog="caad")
    salad.register(parser.add_subparsers(dest="command"))
    argv = ["salad", "--config", "configs/salad.yaml", "--resume", "salad.rounds=0", "salad.arms=[x]"]
    args = parser.parse_args(argv)
    assert args.command == "salad" and args.resume and args.overrides == ["salad.rounds=0", "salad.arms=[x]"]
    args.overrides.append(f"salad.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match="salad.arms must be"):
        args.func(args)
    assert not (tmp_path / "run").exists()  # a bad config writes nothing
