"""Teacher and student speech LMs behind one interface, tiny factories and a locally trained tokenizer.

Everything loads from local directories; nothing is downloaded. See :mod:`caad.models.interface` for
the input, label and hidden-state conventions.
"""

from caad.models.composite import (
    CompositeSpeechLM,
    CompositeSpeechLMConfig,
    CompositeSpeechLMForCausalLM,
    StackingProjector,
)
from caad.models.interface import (
    AUDIO_MODES,
    IGNORE_INDEX,
    NEGATIVE_MODES,
    SAMPLING_RATE,
    SpeechBatch,
    SpeechLM,
    TargetHiddenStates,
    check_audio,
    concat_batches,
    load_speech_lm,
    position_ids_from_mask,
    whisper_feature_extractor,
)
from caad.models.qwen2_audio import Qwen2AudioSpeechLM
from caad.models.tiny import (
    build_speech_lm,
    build_tiny_speech_lm,
    tiny_composite_config,
    tiny_qwen2_audio_config,
    tiny_student,
    tiny_teacher,
)
from caad.models.tokenizer import DEFAULT_SPECIAL_TOKENS, audio_token_ids, build_prompt, train_tokenizer

__all__ = [
    "AUDIO_MODES",
    "DEFAULT_SPECIAL_TOKENS",
    "IGNORE_INDEX",
    "NEGATIVE_MODES",
    "SAMPLING_RATE",
    "CompositeSpeechLM",
    "CompositeSpeechLMConfig",
    "CompositeSpeechLMForCausalLM",
    "Qwen2AudioSpeechLM",
    "SpeechBatch",
    "SpeechLM",
    "StackingProjector",
    "TargetHiddenStates",
    "audio_token_ids",
    "build_prompt",
    "build_speech_lm",
    "build_tiny_speech_lm",
    "check_audio",
    "concat_batches",
    "load_speech_lm",
    "position_ids_from_mask",
    "tiny_composite_config",
    "tiny_qwen2_audio_config",
    "tiny_student",
    "tiny_teacher",
    "train_tokenizer",
    "whisper_feature_extractor",
]
