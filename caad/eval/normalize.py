"""English text normalisation for Dynamic-SUPERB-style answer matching.

:func:`normalize_text` maps a prediction or a label to a canonical string of lower-case words
separated by single spaces. The steps, in order:

1. Unicode NFKC; typographic apostrophes, quotes and dashes become their ASCII forms; lower case.
2. Contractions are expanded: ``n't`` -> `` not`` (``can't`` -> ``can not``, ``won't`` -> ``will not``,
   ``shan't`` -> ``shall not``, ``ain't`` -> ``is not``), ``'re`` -> `` are``, ``'ve`` -> `` have``,
   ``'ll`` -> `` will``, ``'m`` -> `` am``, ``'d`` -> `` would`` (the common reading; ``had`` is not
   guessed), ``let's`` -> ``let us``, and ``'s`` after a pronoun or question word (``it's``,
   ``that's``, ``he's``, ``what's`` ...) -> `` is``. Any other ``'s`` is a possessive: the apostrophe
   is dropped (``speaker's`` -> ``speakers``), which keeps it one word, so the label ``speaker``
   does not match it (partial words never match).
3. Numbers: thousands separators are dropped (``1,000`` -> ``1000``), ``%`` -> `` percent``,
   ``&`` -> `` and ``; digit strings are spelled out in words (``21`` -> ``twenty one``,
   ``3.5`` -> ``three point five``, ``1st`` -> ``first``; a string with a leading zero such as
   ``007`` is read digit by digit), so ``21`` and ``twenty-one`` normalise alike. An ``and`` between
   two number words (``one hundred and five``) is dropped, as in ``105``.
4. Every character that is not a letter or a digit (of any script) (punctuation, hyphens, slashes, quotes) becomes
   a space; whitespace runs collapse to one space; leading and trailing spaces go.

Not done (deliberately): article removal (``a``/``an``/``the`` stay — a label ``the cat`` is a
different answer from ``a cat`` only when the prediction says so), spelling variants
(British/American), years read as pairs (``1990`` becomes ``one thousand nine hundred ninety``,
not ``nineteen ninety``), and stemming.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text", "normalized_words", "number_to_words"]

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
_NUMBER_WORDS = frozenset(
    [*_ONES, *_TENS[2:], "hundred", *(name for _, name in _SCALES)]
)

_TYPOGRAPHIC = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u02bc": "'",
        "\u0060": "'",
        "\u00b4": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
    }
)
_IS_CONTRACTION_HOSTS = (
    "it that what there here he she who where how when why this everyone everybody nobody something "
    "nothing someone"
).split()

_CONTRACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"\bain't\b"), "is not"),
    (re.compile(r"\blet's\b"), "let us"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"),
    (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'ll\b"), " will"),
    (re.compile(r"\bi'm\b"), "i am"),
    (re.compile(r"'d\b"), " would"),
    (re.compile(r"\b(" + "|".join(_IS_CONTRACTION_HOSTS) + r")'s\b"), r"\1 is"),
)
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}\b)")
_ORDINAL = re.compile(r"\b([0-9]+)(st|nd|rd|th)\b")
_DECIMAL = re.compile(r"\b([0-9]+)\.([0-9]+)\b")
_DIGITS = re.compile(r"[0-9]+")
_NOT_ALNUM = re.compile(r"[\W_]+")  # keeps letters of any script


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_TENS[tens])
        if ones:
            words.append(_ONES[ones])
    elif rest or not words:
        words.append(_ONES[rest])
    return words


def number_to_words(digits: str) -> str:
    """Spell a string of ASCII digits in English words (lower case, no hyphens, no "and").

    ``"21"`` -> ``"twenty one"``, ``"1000"`` -> ``"one thousand"``, ``"0"`` -> ``"zero"``. A string
    with a leading zero (``"007"``), or one of more than 15 digits, is read digit by digit.
    """
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"expected a string of ASCII digits, got {digits!r}")
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > 15:
        return " ".join(_ONES[int(d)] for d in digits)
    n = int(digits)
    if n == 0:
        return "zero"
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            count, n = divmod(n, value)
            words += [*_below_thousand(count), name]
    if n:
        words += _below_thousand(n)
    return " ".join(words)


def _ordinal_words(digits: str) -> str:
    words = number_to_words(digits).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _drop_number_and(words: list[str]) -> list[str]:
    out: list[str] = []
    for index, word in enumerate(words):
        if (
            word == "and"
            and out
            and out[-1] in _NUMBER_WORDS
            and index + 1 < len(words)
            and words[index + 1] in _NUMBER_WORDS
        ):
            continue
        out.append(word)
    return out


def normalized_words(text: str) -> list[str]:
    """The words of :func:`normalize_text` (an empty list for text with no letters or digits)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHIC).lower()
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    text = text.replace("'", "")  # possessives and any other apostrophe: one word
    text = _THOUSANDS.sub("", text)
    text = text.replace("%", " percent ").replace("&", " and ")
    text = _ORDINAL.sub(lambda m: f" {_ordinal_words(m.group(1))} ", text)
    text = _DECIMAL.sub(
        lambda m: f" {number_to_words(m.group(1))} point {' '.join(_ONES[int(d)] for d in m.group(2))} ", text
    )
    text = _DIGITS.sub(lambda m: f" {number_to_words(m.group(0))} ", text)
    # Letters with diacritics keep their base letter (é -> e) before the non-alphanumeric sweep.
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return _drop_number_and(_NOT_ALNUM.sub(" ", text).split())


def normalize_text(text: str) -> str:
    """Canonical form of an answer: lower-case words joined by single spaces (module docstring)."""
    return " ".join(normalized_words(text))
