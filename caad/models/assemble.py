"""Assemble a composite student from pretrained parts: ``caad models assemble``.

:func:`assemble_student` takes a local Whisper checkpoint (its encoder is used; a
``WhisperForConditionalGeneration`` or ``WhisperModel`` directory) and a local causal LM checkpoint
(any architecture built into transformers; checkpoints that need remote code are refused), and
writes a :class:`~caad.models.composite.CompositeSpeechLM` checkpoint directory:

- the encoder's and the LM's weights as they are, a new :class:`~caad.models.composite.StackingProjector`
  (``stack_factor`` frames per audio token, initialised with ``seed``);
- the LM's tokenizer with the audio tokens ``<|audio_bos|>``, ``<|AUDIO|>``, ``<|audio_eos|>`` added as
  special tokens where missing (a pad token too: ``eos`` when the tokenizer has none), and the
  LM's input and output embeddings resized when the tokenizer outgrew them; its chat template is kept;
- the training plan in the config: ``freeze_audio_encoder``, ``freeze_language_model`` (or
  ``train_only_projector``: both) and ``lora`` (LoRA on the LM, applied by
  :meth:`CompositeSpeechLM.prepare_for_training`; needs ``peft``).

Everything is checked before anything is written; ``out`` must not exist unless ``overwrite``, and
the old directory is replaced only once the new one is complete (written beside it, then renamed).
Weights are read from safetensors only, the model is built on the meta device and filled from the
files (one copy in memory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AssembleOptions", "assemble_student"]

AUDIO_TOKENS = {"audio_bos_token": "<|audio_bos|>", "audio_token": "<|AUDIO|>", "audio_eos_token": "<|audio_eos|>"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AssembleOptions:
    """What :func:`assemble_student` builds (the ``caad models assemble`` options).

    ``lora_r`` 0 means no LoRA; ``lora_targets`` are module names inside the LM (``q_proj``, ``lm_head``...).
    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` (the LM checkpoint's).
    """

    stack_factor: int = 4
    projector_hidden_size: int | None = None
    freeze_audio_encoder: bool = False
    freeze_language_model: bool = False
    train_only_projector: bool = False
    lora_r: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = field(default_factory=lambda: ("q_proj", "k_proj", "v_proj", "o_proj"))
    dtype: str | None = None
    seed: int = 0

    def check(self) -> None:
        if isinstance(self.stack_factor, bool) or not isinstance(self.stack_factor, int) or self.stack_factor < 1:
            raise ValueError(f"stack_factor must be a positive int, got {self.stack_factor!r}")
        if self.projector_hidden_size is not None and (
            not isinstance(self.projector_hidden_size, int) or self.projector_hidden_size < 1
        ):
            raise ValueError(f"projector_hidden_size must be a positive int, got {self.projector_hidden_size!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an int >= 0 (0: no LoRA), got {self.lora_r!r}")
        if self.lora_r:
            if self.train_only_projector:
                raise ValueError("LoRA trains the LM, train_only_projector freezes it: choose one")
            if not self.lora_alpha > 0:
                raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
            if not 0 <= self.lora_dropout < 1:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
            if not self.lora_targets:
                raise ValueError("lora_targets is empty")
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ValueError("LoRA needs the peft package: pip install 'caad[lora]' (or pip install peft)")

    @property
    def lora_plan(self) -> dict[str, Any] | None:
        if not self.lora_r:
            return None
        return {
            "r": self.lora_r,
            "alpha": float(self.lora_alpha),
            "dropout": float(self.lora_dropout),
            "target_modules": list(self.lora_targets),
        }


def _read_config(path: str, what: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} checkpoint directory {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{what} checkpoint directory {path!r} has no config.json")
    with open(config_path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error


def _safetensors_files(path: str, what: str) -> list[str]:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{what} checkpoint directory {path!r} has no .safetensors weights")
    return [os.path.join(path, n) for n in files]


def _encoder_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path, "--audio-encoder"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                for prefix in ("model.encoder.", "encoder."):
                    if key.startswith(prefix):
                        out[key[len(prefix) :]] = handle.get_tensor(key)
    if not out:
        raise ValueError(f"--audio-encoder {path!r} holds no Whisper encoder weights (model.encoder.* or encoder.*)")
    return out


def _check_inputs(audio_encoder: str, llm: str, out: str, overwrite: bool, options: AssembleOptions) -> None:
    options.check()
    audio_config = _read_config(audio_encoder, "--audio-encoder")
    if audio_config.get("model_type") != "whisper":
        found = audio_config.get("model_type")
        raise ValueError(f"--audio-encoder must be a Whisper checkpoint (model_type 'whisper'), got {found!r}")
    _safetensors_files(audio_encoder, "--audio-encoder")
    llm_config = _read_config(llm, "--llm")
    if llm_config.get("auto_map"):
        raise ValueError(
            f"--llm {llm!r} needs remote code (auto_map in config.json); only LM types built into transformers work"
        )
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = llm_config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--llm {llm!r} has model_type {model_type!r}, which is not a causal LM known to transformers")
    AutoConfig.from_pretrained(llm, local_files_only=True)
    _safetensors_files(llm, "--llm")
    if not any(os.path.isfile(os.path.join(llm, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"--llm {llm!r} has no tokenizer (tokenizer.json)")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out!r} already exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not a directory")
    for name in (audio_encoder, llm):
        if os.path.exists(out) and os.path.samefile(name, out):
            raise ValueError(f"--out {out!r} is one of the inputs")


def _prepare_tokenizer(llm: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    if tokenizer.eos_token is None:
        raise ValueError(f"--llm {llm!r}: its tokenizer has no eos token")
    missing = [t for t in AUDIO_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:  # the models find these tokens by their default strings
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def assemble_student(
    audio_encoder: str | os.PathLike[str],
    llm: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: AssembleOptions | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the composite student from a Whisper encoder and a causal LM and write it to ``out``.

    Returns a summary: ``out``, parameter counts (``parameters``, ``trainable``), ``audio_token_id``,
    ``tokens_added``, ``lora_modules`` (adapters applied when the model is prepared for training).
    """
    from transformers import AutoModelForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from caad.models.composite import CompositeSpeechLM, CompositeSpeechLMConfig, CompositeSpeechLMForCausalLM

    options = options or AssembleOptions()
    audio_encoder, llm, out = os.fspath(audio_encoder), os.fspath(llm), os.path.abspath(os.fspath(out))
    _check_inputs(audio_encoder, llm, out, overwrite, options)

    dtype = DTYPES[options.dtype] if options.dtype else None
    tokenizer = _prepare_tokenizer(llm)
    language_model = AutoModelForCausalLM.from_pretrained(
        llm, local_files_only=True, use_safetensors=True, dtype=dtype, trust_remote_code=False
    )
    dtype = dtype or language_model.dtype
    rows = language_model.get_input_embeddings().weight.shape[0]
    added = max(0, len(tokenizer) - rows)
    if added:
        language_model.resize_token_embeddings(len(tokenizer))
    whisper_config = WhisperConfig.from_pretrained(audio_encoder, local_files_only=True)
    with torch.device("meta"):
        encoder = WhisperEncoder(whisper_config)
    encoder.load_state_dict(_encoder_state_dict(audio_encoder), strict=True, assign=True)
    encoder.to(dtype)

    audio_token_id = int(tokenizer.convert_tokens_to_ids(AUDIO_TOKENS["audio_token"]))
    config = CompositeSpeechLMConfig(
        audio_config=whisper_config.to_dict(),
        text_config=language_model.config.to_dict(),
        stack_factor=options.stack_factor,
        projector_hidden_size=options.projector_hidden_size,
        audio_token_id=audio_token_id,
        freeze_audio_encoder=options.freeze_audio_encoder or options.train_only_projector,
        freeze_language_model=options.freeze_language_model or options.train_only_projector,
        lora=options.lora_plan,
    )
    with torch.device("meta"):
        model = CompositeSpeechLMForCausalLM(config)
    model.audio_encoder = encoder
    model.language_model = language_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        projector = type(model.projector)(
            whisper_config.d_model,
            options.stack_factor,
            options.projector_hidden_size or language_model.config.hidden_size,
            language_model.config.hidden_size,
        )
        for module in projector.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=config.initializer_range)
                torch.nn.init.zeros_(module.bias)
    model.projector = projector.to(dtype)
    model.apply_freezing()
    speech_lm = CompositeSpeechLM(model, tokenizer)

    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".assemble-", dir=parent)
    try:
        speech_lm.save_pretrained(staging)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "out": out,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "audio_token_id": audio_token_id,
        "tokens_added": added,
        "lora": options.lora_plan,
    }
