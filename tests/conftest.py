"""Shared pytest fixtures.

``tiny_corpus``: a 24-example built-in speech corpus (seed 0), synthesised once per test session;
every voice x rate x pitch combination appears once among its 24 audio items (19 train, 3
validation, 2 test). ``train.jsonl`` has one row per item; ``validation.jsonl`` and ``test.jsonl``
one row per item and text condition (neutral, faithful, adversarial, irrelevant: 12 and 8 rows,
sharing their item's audio and ``group``). Returns a :class:`caad.data.CorpusPaths` (``.root``,
``.train``, ``.validation``, ``.test``, ``.text_prior``, ``.manifests``). Treat it as read-only.

``method_models``: the spoken-QA set, text teacher and student of the method tests
(:func:`tests.methods_fixtures.prepare_methods`), built once per session; read-only too.
``one_thread``: run a test with one torch thread (tiny models are faster so on a loaded machine).
"""

from __future__ import annotations

import pytest

TINY_CORPUS_SIZE = 24
TINY_CORPUS_SEED = 0


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory):
    from caad.data import synthesize_corpus

    root = tmp_path_factory.mktemp("tiny_corpus") / "corpus"
    return synthesize_corpus(root, num_examples=TINY_CORPUS_SIZE, seed=TINY_CORPUS_SEED, progress=False)


@pytest.fixture(scope="session")
def tiny_corpus_rows(tiny_corpus):
    """All rows of ``tiny_corpus`` (train, validation, test), as :class:`caad.data.ManifestRow`
    (validation and test items appear once per text condition)."""
    from caad.data import read_manifest

    return [row for manifest in tiny_corpus.manifests.values() for row in read_manifest(manifest)]


@pytest.fixture(scope="session")
def method_models(tmp_path_factory: pytest.TempPathFactory):
    from methods_fixtures import prepare_methods

    return prepare_methods(tmp_path_factory.mktemp("method_models"))


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
