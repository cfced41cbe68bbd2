"""Data: JSONL manifests, audio I/O and features, and the built-in synthetic speech corpus."""

from caad.data.audio import (
    AudioError,
    estimate_f0,
    load_audio,
    log_mel_features,
    resample,
    whisper_feature_extractor,
    write_wav,
)
from caad.data.espeak import VOICES, EspeakError, synthesize
from caad.data.manifest import (
    ManifestError,
    ManifestRow,
    ManifestWriter,
    as_dataset,
    read_manifest,
    write_manifest,
)
from caad.data.synth import CorpusPaths, synthesize_corpus
from caad.data.tasks import CATEGORIES, TASKS

__all__ = [
    "CATEGORIES",
    "TASKS",
    "VOICES",
    "AudioError",
    "CorpusPaths",
    "EspeakError",
    "ManifestError",
    "ManifestRow",
    "ManifestWriter",
    "as_dataset",
    "estimate_f0",
    "load_audio",
    "log_mel_features",
    "read_manifest",
    "resample",
    "synthesize",
    "synthesize_corpus",
    "whisper_feature_extractor",
    "write_manifest",
    "write_wav",
]
