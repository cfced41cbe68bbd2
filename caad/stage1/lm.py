"""The language-model pseudo-GT generator: any local HF causal LM, batched greedy decoding.

The prompt lists the recording's metadata, the question (without the row's text context) and (when
the row has one) the reference label, and asks for a one-sentence answer that starts with it.
Loading is from a local folder only
(``local_files_only=True``): nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caad.data.manifest import ManifestRow

__all__ = ["LMGenerator", "build_prompt", "postprocess", "question_of"]

_METADATA_NAMES = {
    "transcript": "transcript",
    "gender": "speaker gender",
    "rate": "speaking rate",
    "rate_wpm": "speaking rate (words per minute)",
    "pitch": "pitch (relative to the voice)",
    "f0_hz": "median fundamental frequency (Hz)",
    "duration_s": "duration (seconds)",
}
#: Metadata keys not shown to the LM (not properties of the audio, or confusing).
_HIDDEN_METADATA = {"distractor", "keyword", "pitch_setting", "num_words", "speaker"}
_ANSWER_PREFIX = re.compile(r"^\s*(answer|a|assistant|response)\s*[:\-]\s*", re.IGNORECASE)


def question_of(row: ManifestRow) -> str:
    """The row's instruction without its text context (a context may contradict the audio, and the
    pseudo-GT answers from the audio's facts)."""
    if row.context and row.instruction.startswith(row.context):
        return row.instruction[len(row.context) :].strip() or row.instruction
    return row.instruction


def build_prompt(row: ManifestRow) -> str:
    """The instruction text given to the LM for one row (before any chat template)."""
    facts = []
    for key, value in (row.metadata or {}).items():
        if key in _HIDDEN_METADATA or value is None:
            continue
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        facts.append(f"- {_METADATA_NAMES.get(key, key.replace('_', ' '))}: {shown}")
    lines = ["You write the answer to a question about a speech recording, using facts about it."]
    if facts:
        lines += ["Facts about the recording:", *facts]
    lines.append(f"Question: {question_of(row)}")
    if row.label:
        lines.append(f"Correct short answer: {row.label}")
    lines.append(
        "Write the answer as one short sentence that starts with the correct answer and names no other option."
    )
    return "\n".join(lines)


def postprocess(text: str, max_chars: int = 400) -> str:
    """Clean a decoded LM answer: the first non-empty line, an ``Answer:`` prefix removed,
    whitespace collapsed, cut at ``max_chars`` (at a word boundary). May return ``""``."""
    for line in text.replace("\r", "\n").split("\n"):
        line = _ANSWER_PREFIX.sub("", line)
        line = " ".join(line.split())
        if line:
            if len(line) > max_chars:
                line = line[:max_chars].rsplit(" ", 1)[0]
            return line
    return ""


class LMGenerator:
    """Batched greedy decoding with a local causal LM (left padding)."""

    def __init__(self, model_path: str | os.PathLike[str], max_new_tokens: int = 64, device: str = "cpu") -> None:
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"language model folder not found: {path}")
        if not path.is_dir():
            raise ValueError(f"model_path must be a folder with a saved HF causal LM, got the file {path}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as error:  # noqa: BLE001 - transformers raises OSError/ValueError/...
            raise ValueError(f"cannot load a tokenizer from {path}: {error}") from error
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"cannot load a causal LM from {path}: {error}") from error
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an eos token; cannot batch")
        tokenizer.padding_side = "left"
        self.path = path
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.pad_id = int(pad_id)
        self.eos_id = tokenizer.eos_token_id

    def _prompt_text(self, row: ManifestRow) -> tuple[str, bool]:
        prompt = build_prompt(row)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return text, False  # the template already holds the special tokens
        return prompt + "\nAnswer:", True

    def generate(self, rows: Sequence[ManifestRow]) -> list[str]:
        """Raw decoded continuations (special tokens skipped), one per row, greedy."""
        import torch
        from transformers import GenerationConfig

        if not rows:
            return []
        texts, add_special = zip(*(self._prompt_text(row) for row in rows))
        encoded = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, add_special_tokens=bool(add_special[0])
        )
        encoded = {
            key: value.to(self.device) for key, value in encoded.items() if key in ("input_ids", "attention_mask")
        }
        config: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.pad_id,
        }
        if self.eos_id is not None:
            config["eos_token_id"] = self.eos_id
        with torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=GenerationConfig(**config))
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
