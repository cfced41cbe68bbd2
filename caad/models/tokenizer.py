"""A byte-level BPE tokenizer trained locally, shared by the tiny teacher and student.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library on the texts given
(usually the corpus instructions, transcripts and pseudo-GT answers) and wrapped as a
:class:`transformers.PreTrainedTokenizerFast`, so ``save_pretrained``/``from_pretrained`` work.

Special tokens take the lowest ids, in the order of :data:`DEFAULT_SPECIAL_TOKENS` (``<|pad|>`` is 0).
The tokenizer adds no special tokens by itself (``add_special_tokens`` has no effect): the prompt
convention below places them explicitly.

Prompt convention (chat-free), used by every model in :mod:`caad.models`::

    <|bos|><|audio_bos|><|AUDIO|><|audio_eos|>{instruction}\\n{target}<|eos|>

``<|AUDIO|>`` is a single placeholder in text; the models expand it to as many audio tokens as the
clip has encoder frames after downsampling. Prompt and target are tokenized separately, so the
target's tokens never merge with the prompt's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Role -> token string. Roles ending in ``audio...`` become named extra special tokens, so a loaded
#: tokenizer has ``tokenizer.audio_token``, ``tokenizer.audio_bos_token`` and ``tokenizer.audio_eos_token``.
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_token": "<|AUDIO|>",
    "audio_eos_token": "<|audio_eos|>",
}

_REQUIRED_ROLES = tuple(DEFAULT_SPECIAL_TOKENS)
_STANDARD_ROLES = ("pad_token", "bos_token", "eos_token")
_BYTE_ALPHABET_SIZE = 256


def _check_special_tokens(special_tokens: Mapping[str, str] | None) -> dict[str, str]:
    if special_tokens is None:
        return dict(DEFAULT_SPECIAL_TOKENS)
    if not isinstance(special_tokens, Mapping):
        raise TypeError(
            f"special_tokens must be a mapping of role -> token string, got {type(special_tokens).__name__}"
        )
    merged = dict(DEFAULT_SPECIAL_TOKENS)
    merged.update(special_tokens)
    for role, token in merged.items():
        if not isinstance(role, str) or not role.endswith("_token"):
            raise ValueError(f"special_tokens: role names must end with '_token', got {role!r}")
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens[{role!r}] must be a non-empty string, got {token!r}")
    if len(set(merged.values())) != len(merged):
        raise ValueError(f"special_tokens: token strings must be distinct, got {merged}")
    return merged


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    special_tokens: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Args:
        texts: training texts (any iterable of ``str``; consumed once).
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens;
            the result may be smaller when the texts do not support that many merges.
        special_tokens: role -> token string, merged over :data:`DEFAULT_SPECIAL_TOKENS` (pad, bos,
            eos and the three audio tokens are always present). ``None`` means the defaults.

    Returns:
        A :class:`~transformers.PreTrainedTokenizerFast` with ``pad/bos/eos`` set, the audio tokens
        as named extra special tokens (``tokenizer.audio_token`` etc.), right padding, and
        ``model_max_length`` unbounded. Any byte string round-trips through encode/decode.
    """
    specials = _check_special_tokens(special_tokens)
    minimum = _BYTE_ALPHABET_SIZE + len(specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an int >= {minimum} (256 byte symbols + {len(specials)} special tokens), "
            f"got {vocab_size!r}"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_checked_texts(texts), trainer=trainer)

    standard = {role: token for role, token in specials.items() if role in _STANDARD_ROLES}
    extra = {role: token for role, token in specials.items() if role not in _STANDARD_ROLES}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=extra,
        padding_side="right",
        model_max_length=int(1e30),
        **standard,
    )
    return tokenizer


def audio_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the three audio tokens: keys ``audio_bos``, ``audio``, ``audio_eos``.

    Raises a ``ValueError`` naming the missing token when the tokenizer lacks one of them.
    """
    out = {}
    for role, key in (
        ("audio_bos_token", "audio_bos"),
        ("audio_token", "audio"),
        ("audio_eos_token", "audio_eos"),
    ):
        token = getattr(tokenizer, role, None) or DEFAULT_SPECIAL_TOKENS[role]
        token_id = None if token is None else tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {role} (train it with caad.models.train_tokenizer)")
        out[key] = int(token_id)
    return out


def build_prompt(tokenizer: PreTrainedTokenizerFast, instruction: str, with_audio: bool = True) -> str:
    """The prompt text of the chat-free convention (module docstring), ending with ``"\\n"``.

    With ``with_audio=False`` the audio block (``<|audio_bos|><|AUDIO|><|audio_eos|>``) is left out,
    which is what a text-only model or the "remove" negative path sees.
    """
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")

    # Tokenizers of real checkpoints may lack a bos token or the named audio attributes (Qwen2's has
    # no bos and knows "<|AUDIO|>" only as an added token): fall back to the default strings.
    def token(role: str) -> str:
        return getattr(tokenizer, role, None) or DEFAULT_SPECIAL_TOKENS[role]

    audio = token("audio_bos_token") + token("audio_token") + token("audio_eos_token") if with_audio else ""
    bos = getattr(tokenizer, "bos_token", None) or ""
    return f"{bos}{audio}{instruction}\n"
