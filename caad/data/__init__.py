"""Data: JSONL manifests, audio I/O and features, the built-in synthetic speech corpus (MCR-BENCH in
miniature, :mod:`caad.data.tasks`), data checks before training (:mod:`caad.data.checks`), and
importers from Dynamic-SUPERB and MCR-BENCH (:mod:`caad.data.importers`)."""

from caad.data.audio import (
    AudioError,
    estimate_f0,
    load_audio,
    log_mel_features,
    resample,
    whisper_feature_extractor,
    write_wav,
)
from caad.data.checks import (
    DataCheckError,
    DataIssue,
    LengthReport,
    ManifestReport,
    check_manifest,
    check_training_data,
    fit_max_length,
    load_clip,
)
from caad.data.espeak import VOICES, EspeakError, synthesize
from caad.data.files import default_file_mode, write_text_atomic
from caad.data.importers import DatasetImportError, ImportResult, import_dynamic_superb, import_mcr_bench
from caad.data.interleaved import (
    Clip,
    InterleavedExample,
    Segment,
    UnitVocab,
    add_unit_tokens,
    build_examples,
    collate,
    corpus_clips,
    encode_examples,
)
from caad.data.manifest import (
    CONDITIONS,
    ManifestError,
    ManifestRow,
    ManifestWriter,
    as_dataset,
    read_manifest,
    write_manifest,
)
from caad.data.spoken_qa import (
    SpokenQAPaths,
    SynthesisResult,
    load_spoken_qa,
    read_text_items,
    synthesize_items,
    synthesize_spoken_qa,
)
from caad.data.spoken_qa_items import QA_TASKS, QAItem
from caad.data.synth import CorpusPaths, read_text_prior, synthesize_corpus
from caad.data.tasks import CATEGORIES, TASKS, ContextSettings, make_text_prior
from caad.data.units import UnitFeatureConfig, UnitTokenizer, train_unit_tokenizer

__all__ = [
    "CATEGORIES",
    "CONDITIONS",
    "TASKS",
    "VOICES",
    "AudioError",
    "ContextSettings",
    "CorpusPaths",
    "DataCheckError",
    "DataIssue",
    "DatasetImportError",
    "EspeakError",
    "ImportResult",
    "LengthReport",
    "ManifestError",
    "ManifestReport",
    "ManifestRow",
    "ManifestWriter",
    "as_dataset",
    "check_manifest",
    "check_training_data",
    "default_file_mode",
    "estimate_f0",
    "fit_max_length",
    "import_dynamic_superb",
    "import_mcr_bench",
    "load_audio",
    "load_clip",
    "log_mel_features",
    "make_text_prior",
    "read_manifest",
    "read_text_prior",
    "resample",
    "synthesize",
    "synthesize_corpus",
    "whisper_feature_extractor",
    "write_manifest",
    "write_text_atomic",
    "write_wav",
]
# the spoken question-answering set (cross-modal distillation, SALAD): caad.data.spoken_qa
__all__ += [
    "QA_TASKS",
    "QAItem",
    "SpokenQAPaths",
    "SynthesisResult",
    "load_spoken_qa",
    "read_text_items",
    "synthesize_items",
    "synthesize_spoken_qa",
]
# speech units and interleaved speech-text sequences (TinyWave): caad.data.units, caad.data.interleaved
__all__ += [
    "Clip",
    "InterleavedExample",
    "Segment",
    "UnitFeatureConfig",
    "UnitTokenizer",
    "UnitVocab",
    "add_unit_tokens",
    "build_examples",
    "collate",
    "corpus_clips",
    "encode_examples",
    "train_unit_tokenizer",
]
