"""Offline CAAD (``caad topk write`` + method ``caad_topk``): the stored top-k teacher against the teacher
model itself, training from a full (k = V) store against ``caad`` with the live teacher, and the store's
refusals (overwrite, mismatched settings or tokenizer)."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from methods_fixtures import FakeStep
from stage2_fixtures import prepare, stage2_settings

from caad.cli import UserError
from caad.data import read_manifest, write_manifest
from caad.methods.caad.batch import PseudoGTDataset
from caad.methods.caad.method import CAADMethod
from caad.methods.caad_topk import TopKConfig, TopKStore, write_topk_store
from caad.methods.caad_topk.method import CAADTopKMethod
from caad.models import IGNORE_INDEX, load_speech_lm
from caad.train import BatchInfo, SetupContext

ALPHA, TAU = 1.5, 2.0


@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    prepared = prepare(tiny_corpus, tmp_path_factory.mktemp("topk") / "prepared")
    small = prepared.root / "small.jsonl"  # 5 examples: enough for a batch, fast to write
    write_manifest(small, read_manifest(prepared.train)[:5])
    return prepared, small


@pytest.fixture(scope="module")
def models(prepared):
    prepared, _ = prepared
    return load_speech_lm(prepared.teacher), load_speech_lm(prepared.student)


def _config(prepared, store: Path, **overrides) -> TopKConfig:
    prepared, small = prepared
    settings = stage2_settings(prepared, prepared.root / "unused", train_manifest=str(small), alpha=ALPHA,
                               temperature=TAU, topk_store=str(store), topk_dtype="float32", write_device="cpu",
                               write_batch_size=2)
    settings.update(overrides)
    return TopKConfig(**settings)


@pytest.fixture(scope="module")
def full_store(prepared, models, tmp_path_factory):
    """A k = V store (V: the student's vocabulary, the tokenizer's size)."""
    store = tmp_path_factory.mktemp("stores") / "full"
    write_topk_store(_config(prepared, store, k=models[1].vocab_size), teacher=models[0], progress=False)
    return store


def _ctx(student, teacher=None):
    return SetupContext(student=student, device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1,
                        load_frozen=lambda path, **_: teacher)


def test_written_topk_equals_topk_of_the_naive_contrastive_logits(prepared, models, tmp_path):
    teacher, student = models
    store_path = tmp_path / "k8"
    config = _config(prepared, store_path, k=8, plausibility=0.05)
    write_topk_store(config, teacher=teacher, progress=False)
    store = TopKStore(store_path)
    rows = PseudoGTDataset(config.train_manifest).rows
    assert len(store) == len(rows) and store.meta["k"] == 8 and store.meta["alpha"] == ALPHA
    vocab = len(teacher.tokenizer)
    from caad.data.audio import load_audio

    for row in rows:  # one example at a time, the logits materialised: independent of the writer's batching
        audio = [load_audio(row.audio_path, 16000)]
        positive = teacher.build_inputs(audio, [row.instruction], [row.pseudo_gt])
        negative = teacher.negative_inputs(positive, audio, [row.instruction], [row.pseudo_gt], audio_mode="remove")
        with torch.no_grad():
            z = [teacher.logits(b)[0, :-1][b.labels[0, 1:] != IGNORE_INDEX, :vocab].double()
                 for b in (positive, negative)]
        z_hat = (1 + ALPHA) * z[0] - ALPHA * z[1]
        cutoff = z[0].amax(-1, keepdim=True) + torch.log(torch.tensor(0.05, dtype=torch.float64))
        z_hat = z_hat.masked_fill(z[0] < cutoff, float("-inf"))
        expected_lp, expected_idx = torch.log_softmax(z_hat / TAU, -1).topk(8, -1)
        indices, logprobs, labels = store.get(row.id)
        assert torch.equal(labels.long(), positive.labels[0, 1:][positive.labels[0, 1:] != IGNORE_INDEX])
        filled = expected_lp > float("-inf")
        assert torch.equal(indices.long()[filled], expected_idx[filled])
        torch.testing.assert_close(logprobs.double()[filled], expected_lp[filled], rtol=0, atol=2e-5)
        assert torch.isneginf(logprobs[~filled]).all()


def test_full_store_trains_like_caad_with_the_live_teacher(prepared, models, full_store):
    teacher, student = models
    examples = PseudoGTDataset(prepared[1]).rows[:3]
    info = BatchInfo("train", 0, 0, 1, 0, 1)
    results = []
    for method_class in (CAADMethod, CAADTopKMethod):
        model = copy.deepcopy(student).train()
        settings = dict(k=student.vocab_size) if method_class is CAADTopKMethod else {}
        config = _config(prepared, full_store, **settings)
        method = method_class(config if method_class is CAADTopKMethod else _stage2(config), "caad_topk")
        method.load_examples(config.train_manifest, "train_manifest")
        ctx = _ctx(model, teacher)
        method.build_teachers(ctx)
        batch = method.build_batch(method.fit_examples(examples, "train", ctx), info, torch.device("cpu"))
        step = FakeStep(model, num_items=method.num_items(batch) + 4)  # as if the global batch held more
        out = method.loss_step(batch, step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.components, grads))
    (loss_a, comp_a, grads_a), (loss_b, comp_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(comp_b["kd_loss"]), torch.as_tensor(comp_a["kd_loss"]),
                               rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def _stage2(config: TopKConfig):
    from dataclasses import fields

    from caad.config import Stage2Config

    return Stage2Config(**{f.name: getattr(config, f.name) for f in fields(Stage2Config)})


def test_existing_store_is_not_replaced_unless_asked(prepared, models, full_store, tmp_path):
    teacher, student = models
    store = tmp_path / "store"
    shutil.copytree(full_store, store)
    before = (store / "index.json").read_bytes()
    config = _config(prepared, store, k=4)
    with pytest.raises(UserError, match="caad_topk.topk_store: .* already exists; pass --overwrite"):
        write_topk_store(config, teacher=teacher, progress=False)
    assert (store / "index.json").read_bytes() == before
    write_topk_store(config, teacher=teacher, progress=False, overwrite=True)
    assert TopKStore(store).meta["k"] == 4 and not list(tmp_path.glob(".store.*"))
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not a top-k store; refusing"):
        write_topk_store(_config(prepared, other, k=4), teacher=teacher, progress=False, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep"


def test_mismatched_store_is_refused_naming_the_key(prepared, models, full_store, tmp_path):
    teacher, student = models
    with pytest.raises(UserError, match=r"caad_topk\.k: the top-k store .* k=400"):
        CAADTopKMethod(_config(prepared, full_store, k=64), "caad_topk").open_store()
    with pytest.raises(UserError, match=r"caad_topk\.temperature: "):
        CAADTopKMethod(_config(prepared, full_store, k=400, temperature=1.0), "caad_topk").open_store()
    tampered = tmp_path / "tampered"
    shutil.copytree(full_store, tampered)
    index = json.loads((tampered / "index.json").read_text())
    index["tokenizer_hash"] = "0" * 32
    (tampered / "index.json").write_text(json.dumps(index))
    method = CAADTopKMethod(_config(prepared, tampered, k=400), "caad_topk")
    with pytest.raises(UserError, match=r"caad_topk\.topk_store: .*tokenizer_hash"):
        method.build_teachers(_ctx(copy.deepcopy(student)))


def test_cli_writes_a_store(prepared, models, tmp_path):
    from caad.commands import topk

    prepared_, small = prepared
    parser = argparse.ArgumentParser()
    topk.register(parser.add_subparsers(dest="command"))
    store = tmp_path / "cli_store"
    args = parser.parse_args(["topk", "write", "--no-progress", f"caad_topk.train_manifest={small}",
                              f"caad_topk.teacher={prepared_.teacher}", f"caad_topk.topk_store={store}",
                              "caad_topk.k=3", "caad_topk.write_device=cpu"])
    assert args.func(args) == 0
    assert TopKStore(store).meta["k"] == 3 and len(TopKStore(store)) == 5
