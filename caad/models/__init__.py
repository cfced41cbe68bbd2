"""Teacher and student speech LMs behind one interface, tiny factories and a locally trained tokenizer.

Everything loads from local directories; nothing is downloaded (safetensors only unless asked, no
remote code unless asked). See :mod:`caad.models.interface` for the input, label, logit and
negative-path conventions, :mod:`caad.models.assemble` for building a student from pretrained parts,
:mod:`caad.models.lora` for LoRA and :mod:`caad.models.compat` for the supported transformers range.
"""

from caad.models.assemble import AssembleOptions, assemble_student
from caad.models.composite import (
    CompositeSpeechLM,
    CompositeSpeechLMConfig,
    CompositeSpeechLMForCausalLM,
    StackingProjector,
)
from caad.models.feature_cache import FeatureCache, feature_cache
from caad.models.interface import (
    AUDIO_MODES,
    DEFAULT_NEGATIVE_MODE,
    DEFAULT_SILENCE_SECONDS,
    IGNORE_INDEX,
    NEGATIVE_MODE_ALIASES,
    NEGATIVE_MODES,
    SAMPLING_RATE,
    SpeechBatch,
    SpeechLM,
    TargetHiddenStates,
    check_audio,
    concat_batches,
    load_speech_lm,
    logit_postprocessing,
    position_ids_from_mask,
    resolve_audio_mode,
    unique_clips,
    whisper_feature_extractor,
)
from caad.models.lora import apply_lora, effective_weight, has_lora, merged_state_dict
from caad.models.qwen2_audio import Qwen2AudioSpeechLM
from caad.models.text_lm import (
    build_text_batch,
    build_tiny_text_lm,
    check_shared_vocabulary,
    evaluate_text_lm,
    generate_text_answers,
    load_text_lm,
    save_text_lm,
    text_prompt,
    text_target_hidden_states,
    train_text_lm,
)
from caad.models.tiny import (
    build_speech_lm,
    build_tiny_speech_lm,
    tiny_composite_config,
    tiny_qwen2_audio_config,
    tiny_student,
    tiny_teacher,
)
from caad.models.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    DEFAULT_SPECIAL_TOKENS,
    QWEN2_AUDIO_CHAT_TEMPLATE,
    audio_token_ids,
    build_prompt,
    chat_prompt,
    end_of_turn_token,
    train_tokenizer,
)
from caad.models.unit_lm import (
    UNIT_LM_SIZES,
    UnitLM,
    build_unit_lm,
    build_unit_lm_tokenizer,
    count_parameters,
    load_unit_lm,
)

__all__ = [
    "AUDIO_MODES",
    "AssembleOptions",
    "CHAT_SPECIAL_TOKENS",
    "DEFAULT_NEGATIVE_MODE",
    "DEFAULT_SILENCE_SECONDS",
    "DEFAULT_SPECIAL_TOKENS",
    "IGNORE_INDEX",
    "NEGATIVE_MODES",
    "NEGATIVE_MODE_ALIASES",
    "QWEN2_AUDIO_CHAT_TEMPLATE",
    "SAMPLING_RATE",
    "CompositeSpeechLM",
    "CompositeSpeechLMConfig",
    "CompositeSpeechLMForCausalLM",
    "Qwen2AudioSpeechLM",
    "SpeechBatch",
    "SpeechLM",
    "StackingProjector",
    "TargetHiddenStates",
    "apply_lora",
    "assemble_student",
    "audio_token_ids",
    "build_prompt",
    "build_speech_lm",
    "build_tiny_speech_lm",
    "chat_prompt",
    "check_audio",
    "concat_batches",
    "effective_weight",
    "end_of_turn_token",
    "has_lora",
    "load_speech_lm",
    "logit_postprocessing",
    "merged_state_dict",
    "position_ids_from_mask",
    "resolve_audio_mode",
    "tiny_composite_config",
    "tiny_qwen2_audio_config",
    "tiny_student",
    "tiny_teacher",
    "train_tokenizer",
    "whisper_feature_extractor",
]
# features once per clip (evaluation, experiments): caad.models.feature_cache, caad.models.interface
__all__ += ["FeatureCache", "feature_cache", "unique_clips"]
# text LMs as teachers (cross-modal distillation): caad.models.text_lm
__all__ += [
    "build_text_batch",
    "build_tiny_text_lm",
    "check_shared_vocabulary",
    "evaluate_text_lm",
    "generate_text_answers",
    "load_text_lm",
    "save_text_lm",
    "text_prompt",
    "text_target_hidden_states",
    "train_text_lm",
]
# unit (speech-token) LMs over interleaved speech-text sequences (TinyWave): caad.models.unit_lm
__all__ += [
    "UNIT_LM_SIZES",
    "UnitLM",
    "build_unit_lm",
    "build_unit_lm_tokenizer",
    "count_parameters",
    "load_unit_lm",
]
