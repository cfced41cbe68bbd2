"""A byte-level BPE tokenizer trained locally, shared by the tiny teacher and student.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library on the texts given
(usually the corpus instructions, transcripts and pseudo-GT answers) and wrapped as a
:class:`transformers.PreTrainedTokenizerFast`, so ``save_pretrained``/``from_pretrained`` work.

Special tokens take the lowest ids, in the order of :data:`DEFAULT_SPECIAL_TOKENS` (``<|pad|>`` is 0).
The tokenizer adds no special tokens by itself (``add_special_tokens`` has no effect): the prompt
convention below places them explicitly.

Prompt conventions, used by every model in :mod:`caad.models` (teacher paths, student, generation):

- **Chat-free** (the tokenizer has no chat template, e.g. the tiny tokenizer trained here)::

      <|bos|><|audio_bos|><|AUDIO|><|audio_eos|>{instruction}\\n{target}<|eos|>

- **Chat template** (the checkpoint's tokenizer has one, e.g. Qwen2-Audio-Instruct): one user turn
  holding the audio and the instruction, rendered by the template with the generation prompt
  (:func:`chat_prompt`), then the target and the template's end-of-turn token
  (:func:`end_of_turn_token`, ``<|im_end|>`` for Qwen), which is the target's last token. The user
  turn is first rendered with structured content (``[{"type": "audio", ...}, {"type": "text", ...}]``,
  as Qwen2-Audio's processor does: ``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>``); a template that
  does not render exactly one audio placeholder from it gets plain string content
  ``<|audio_bos|><|AUDIO|><|audio_eos|>{instruction}``. Without audio (the ``"remove"`` negative path)
  the user turn is the instruction alone.

``<|AUDIO|>`` is a single placeholder in text; the models expand it to as many audio tokens as the
clip has encoder frames after downsampling. Prompt and target are tokenized separately, so the
target's tokens never merge with the prompt's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Args:
        texts: training texts (any iterable of ``str``; consumed once).
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens;
            the result may be smaller when the texts do not support that many merges.
        special_tokens: role -> token string, merged over :data:`DEFAULT_SPECIAL_TOKENS` (pad, bos,
            eos and the three audio tokens are always present). ``None`` means the defaults.
        chat_template: a Jinja chat template to attach (e.g. :data:`QWEN2_AUDIO_CHAT_TEMPLATE`, whose
            ``<|im_start|>``/``<|im_end|>`` must then be among ``special_tokens``); ``None``: none
            (the chat-free prompt convention).

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
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError(f"chat_template must be a non-empty Jinja string or None, got {chat_template!r}")
        tokenizer.chat_template = chat_template
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


#: A chat template in the style of Qwen2-Audio-Instruct's (ChatML turns, a default system turn, audio
#: content items rendered as ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>``), for tiny test tokenizers.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Special tokens to train a tokenizer with for :data:`QWEN2_AUDIO_CHAT_TEMPLATE`.
CHAT_SPECIAL_TOKENS: dict[str, str] = {"im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>"}

# Stands for the assistant's answer when the template is rendered to find the end-of-turn token.
_TARGET_SENTINEL = "CAADTARGETSENTINEL"


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` carries a chat template (``tokenizer.chat_template`` set and non-empty)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _audio_block(tokenizer: PreTrainedTokenizerBase) -> str:
    def token(role: str) -> str:
        return getattr(tokenizer, role, None) or DEFAULT_SPECIAL_TOKENS[role]

    return token("audio_bos_token") + token("audio_token") + token("audio_eos_token")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"the tokenizer's chat template rendered {type(text).__name__}, expected str")
    return text


def chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, with_audio: bool = True) -> str:
    """The prompt text of the chat-template convention (module docstring): a user turn + generation prompt.

    Raises ``ValueError`` when the tokenizer has no chat template, or when the rendered prompt does not
    hold exactly one audio placeholder (``with_audio``) or holds one without audio.
    """
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template; use build_prompt (the chat-free convention)")
    placeholder = getattr(tokenizer, "audio_token", None) or DEFAULT_SPECIAL_TOKENS["audio_token"]
    if not with_audio:
        text = _render(tokenizer, [{"role": "user", "content": instruction}], True)
        if placeholder in text:
            raise ValueError("the chat template put an audio placeholder into a prompt without audio")
        return text
    structured = [
        {"type": "audio", "audio": "audio", "audio_url": "audio"},
        {"type": "text", "text": instruction},
    ]
    try:
        text = _render(tokenizer, [{"role": "user", "content": structured}], True)
    except Exception:  # a text-only template may fail on list content: use string content
        text = ""
    if text.count(placeholder) != 1 or instruction not in text:
        content = _audio_block(tokenizer) + instruction
        text = _render(tokenizer, [{"role": "user", "content": content}], True)
    if text.count(placeholder) != 1:
        raise ValueError(
            f"the chat template rendered {text.count(placeholder)} audio placeholders {placeholder!r} "
            "for one clip; expected exactly one"
        )
    return text


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that ends an assistant turn under the tokenizer's chat template (e.g. ``<|im_end|>``).

    Found by rendering a user turn and an assistant turn and reading the special token right after the
    assistant's text; the ``eos`` token when the template puts no special token there or there is no template.
    """
    eos = tokenizer.eos_token
    if not has_chat_template(tokenizer):
        return eos
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _TARGET_SENTINEL}]
    try:
        text = _render(tokenizer, messages, False)
    except Exception:  # a template that refuses this conversation: fall back to eos
        return eos
    if _TARGET_SENTINEL not in text:
        return eos
    after = text.split(_TARGET_SENTINEL, 1)[1]
    candidates = {str(t) for t in tokenizer.all_special_tokens}
    candidates |= {str(t) for t in tokenizer.get_added_vocab()}
    matches = [t for t in candidates if t and after.startswith(t)]
    return max(matches, key=len) if matches else eos
