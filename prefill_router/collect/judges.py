"""Judges: score one model answer against a reference, as small pure functions.

Every judge has the shape `judge(answer, reference) -> float` in [0, 1]. An answer the judge cannot read
(no letter, no number) scores 0: the model did not give the expected answer in a usable form, which is
what a router should learn. The LLM judge (`llm_judge.py`) differs: when the judge model itself fails,
the label is recorded as missing, never guessed.

A reference may be a list of acceptable answers for `exact`, `contains` and `numeric`; any match counts.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence

from prefill_router.errors import ConfigError, DataError

Reference = str | int | float | Sequence[str | int | float]

# MMLU-Pro has up to 10 options (A-J); most multiple-choice sets use A-D.
DEFAULT_LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------------------------------------------
# choice


def _choice_patterns(letters: str) -> list[re.Pattern]:
    """Patterns from most to least explicit. Each captures the letter in group 'L'.

    Cue words match in any case but the letter itself is case-sensitive: a lowercase letter is only
    accepted right after an explicit cue and before punctuation or the end ("Answer: c"), so the article
    "a" ("the answer is a bit subtle") never counts.
    """
    up = f"[{letters}]"
    low = f"[{letters.lower()}]"
    end = r"(?![A-Za-z0-9])"  # "Ab", "B12" are not choices
    low_end = r"(?=\s*(?:[).:,;!\]*]|$))"
    open_ = r"[\s(\[*_\"']*"
    cue = (r"(?i:\b(?:final\s+answer|correct\s+answer|right\s+answer|best\s+answer|correct\s+option|"
           r"correct\s+choice|best\s+option|answer|option|choice)\b)")
    verb = r"(?i:\s*(?:(?:is|would\s+be|should\s+be|will\s+be|must\s+be)\s*[:=-]?|[:=-])\s*)"
    filler = r"(?i:(?:therefore|thus|clearly|definitely|probably|likely|most\s+likely|option|choice|letter)[\s:]*)*"
    judged = r"(?i:\s+(?:is|seems|would\s+be)\s+(?:the\s+)?(?:correct|right|best)\b)"
    return [
        # \boxed{C}, \boxed{(C)}, \boxed{\text{C}}
        re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?(?P<L>{up}|{low})\)?\s*\}}"),
        # "The answer is (C)", "Final answer: **B**", "correct option is D."; "Answer: c"
        re.compile(rf"{cue}{verb}{filler}{open_}(?:(?P<L>{up}){end}|(?P<l>{low}){low_end})"),
        # "Answer (C)" without a verb
        re.compile(rf"(?i:\banswer\b)\s*[\(\[](?P<L>{up}|{low})[\)\]]"),
        # "Option C is correct", "(C) is the right answer"
        re.compile(rf"(?:(?i:\b(?:option|choice)\s+)|[\s(*]|^)\(?(?P<L>{up})\)?\**{judged}"),
    ]


def _letter(m: re.Match) -> str:
    return (m.groupdict().get("L") or m.groupdict().get("l")).upper()


def _is_pronoun_i(m: re.Match, text: str) -> bool:
    # "Answer: I think B" - the pronoun, not option I.
    return _letter(m) == "I" and re.match(r"\s*'|\s+[a-z]", text[m.end():]) is not None


def extract_choice(text: str, letters: str = DEFAULT_LETTERS) -> str | None:
    """The multiple-choice letter a reply commits to, or None.

    Order: \\boxed{}, an explicit answer cue (the LAST one wins: replies often reason first and conclude
    last), "Option C is correct", a reply that is only a decorated letter ("C", "(C)", "**C**", "c."),
    a reply that opens with "C." / "(C)" / "C)" (unless it just lists the options), a bold letter, a single
    parenthesised letter, and finally a lone letter ending the reply ("... so I pick C."). A capital in
    prose ("A good point", "I think") never counts.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    letters = letters.upper()
    text = unicodedata.normalize("NFKC", text).strip()
    up = f"[{letters}]"
    for pattern in _choice_patterns(letters):
        matches = [m for m in pattern.finditer(text) if not _is_pronoun_i(m, text)]
        if matches:
            return _letter(matches[-1])
    m = re.match(rf"^[\s*_\"'(\[]*(?P<L>[{letters}{letters.lower()}])[\s*_\"')\].:]*$", text)
    if m:
        return _letter(m)
    option_lines = set(re.findall(rf"(?m)^\s*\(?({up})[.)]\s", text))
    if len(option_lines) < 2:  # a reply listing "A. ... B. ... C. ..." commits to nothing
        m = re.match(rf"^[\s*_]*\(?(?P<L>{up})(?:[).:]|\*\*[).:]?)", text)
        if m:
            return _letter(m)
    bold = re.findall(rf"\*\*\s*\(?({up})\)?[.):]?\s*\*\*", text)
    if bold:
        return bold[-1]
    # "(B)" mentioned alone is an answer; "(A) is wrong, (C) is right" is ambiguous: refuse to guess.
    parens = set(re.findall(rf"\(({up})\)", text))
    if len(parens) == 1:
        return parens.pop()
    m = re.search(rf"(?:^|[\s:,])(?P<L>{up})[.!)]?\s*$", text)
    if m and m.group("L") != "I":  # "... better than I."
        return m.group("L")
    return None


def _reference_letter(reference: Reference, letters: str) -> str:
    if isinstance(reference, int) and not isinstance(reference, bool):
        if not 0 <= reference < len(letters):
            raise DataError(f"choice reference index {reference} is outside 0..{len(letters) - 1}")
        return letters[reference]
    ref = extract_choice(str(reference), letters)
    if ref is None:
        raise DataError(f"choice reference {reference!r} is not a letter among {letters}")
    return ref


def judge_choice(answer: str, reference: Reference, letters: str = DEFAULT_LETTERS) -> float:
    """1.0 when the reply's letter equals the reference letter (given as "C", "(C)" or a 0-based index)."""
    return float(extract_choice(answer, letters) == _reference_letter(reference, letters))


# ---------------------------------------------------------------------------------------------------------
# numeric

# A sign must touch the number (or its "$"): "10 - 5" is a subtraction, "-5" and "-$5" are negative.
_NUMBER = re.compile(
    r"(?P<sign>-)?\$?(?P<sign2>-)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+)(?!\d|[.,]\d))?"
    r"(?P<exp>[eE][-+]?\d+)?"
)


def _numbers(text: str, fractions: bool) -> list[float]:
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
        den = m.group("den")
        if den is not None:
            if not fractions or int(den) == 0:
                # Without fraction support "3/4" is no single number; take neither part.
                continue
            value = value / int(den)
        # A hyphen glued to a word or digit is a dash ("3-4", "COVID-19"), not a minus sign.
        glued = m.start() > 0 and text[m.start() - 1].isalnum()
        if (m.group("sign") and not glued) or m.group("sign2"):
            value = -value
        out.append(value)
    return out


def _clean_numeric_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    # Unicode minus; LaTeX escapes and fractions that would hide numbers.
    text = text.replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%").replace("\\,", "")
    text = re.sub(r"\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*([\d]+)\s*\}", r"\1/\2", text)
    return text


def extract_number(text: str, *, fractions: bool = True) -> float | None:
    """The final numeric answer in a reply, or None.

    Order: the GSM8K marker "#### 42"; \\boxed{42}; the last "answer is 42" / "answer: 42" (in "answer is
    5 + 3 = 8", the number after the last "="); else the last number in the text. Thousands separators, "$", "%"
    and trailing units are ignored; negatives, decimals
    and scientific notation are read; "3/4" and \\frac{3}{4} are 0.75 when `fractions` is on.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str) or not text.strip():
        return None
    text = _clean_numeric_text(text)
    regions: list[str] = []
    marker = text.rfind("####")
    if marker >= 0:
        regions.append(text[marker + 4:])
    boxed = re.findall(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", text)
    if boxed:
        regions.append(boxed[-1])
    cues = list(re.finditer(r"\banswer\b\s*(?:is|would\s+be|should\s+be|will\s+be|=|:)\s*:?", text, re.IGNORECASE))
    if cues:
        # The cue's sentence; in "answer is 0.1 + 0.2 = 0.3" the result follows the last "=".
        sentence = re.split(r"\n|[.!?](?:\s|$)", text[cues[-1].end():], maxsplit=1)[0]
        regions.append(sentence.rsplit("=", 1)[-1])
        regions.append(text[cues[-1].end():])
    for region in regions:
        found = _numbers(region, fractions)
        if found:
            # After a marker or cue the first number is the answer ("#### 18 dollars for 3 days").
            return found[0]
    found = _numbers(text, fractions)
    return found[-1] if found else None


def _as_list(reference: Reference) -> list:
    if isinstance(reference, (list, tuple)):
        if not reference:
            raise DataError("reference list is empty")
        return list(reference)
    return [reference]


def judge_numeric(answer: str, reference: Reference, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9,
                  fractions: bool = True) -> float:
    """1.0 when the reply's final number equals the reference number within tolerance."""
    got = extract_number(answer, fractions=fractions)
    if got is None:
        return 0.0
    for ref in _as_list(reference):
        want = extract_number(ref, fractions=fractions)
        if want is None:
            raise DataError(f"numeric reference {ref!r} contains no number")
        if math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol):
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# exact and contains

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d"})


def normalize_text(text: str) -> str:
    """Lowercase, Unicode-NFKC, punctuation and the articles a/an/the removed, whitespace collapsed.

    The SQuAD convention: "The Eiffel Tower." and "eiffel tower" compare equal. A text that is nothing but
    an article ("A", an option letter) keeps it rather than becoming empty.
    """
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = " ".join(text.translate(_PUNCT).split())
    # An answer that is only an article ("A" as an option letter) keeps it.
    return " ".join(_ARTICLES.sub(" ", text).split()) or text


def _strip_answer_prefix(answer: str) -> str:
    # "Answer: Paris" and "Final answer - Paris" are the same reply as "Paris".
    return re.sub(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*", "", answer, flags=re.IGNORECASE)


def judge_exact(answer: str, reference: Reference) -> float:
    """1.0 when the normalised reply equals a normalised reference."""
    if not isinstance(answer, str):
        return 0.0
    got = normalize_text(_strip_answer_prefix(answer))
    refs = [normalize_text(str(r)) for r in _as_list(reference)]
    if not all(refs):
        raise DataError(f"exact reference {reference!r} is empty after normalisation")
    return float(got in refs)


def judge_contains(answer: str, reference: Reference) -> float:
    """1.0 when a normalised reference appears in the normalised reply as whole words."""
    if not isinstance(answer, str):
        return 0.0
    got = f" {normalize_text(answer)} "
    for ref in _as_list(reference):
        want = normalize_text(str(ref))
        if not want:
            raise DataError(f"contains reference {ref!r} is empty after normalisation")
        if f" {want} " in got:
            return 1.0
    return 0.0


Judge = Callable[[str, Reference], float]

JUDGES: dict[str, Judge] = {
    "choice": judge_choice,
    "numeric": judge_numeric,
    "exact": judge_exact,
    "contains": judge_contains,
}

# Kinds that run a model instead of a function; implemented in llm_judge.py.
MODEL_JUDGES = ("llm",)
JUDGE_KINDS = tuple(JUDGES) + MODEL_JUDGES


def check_reference(kind: str, reference: Reference, *, letters: str = DEFAULT_LETTERS) -> None:
    """Raise ValueError when judge `kind` cannot use `reference` (checked before any paid call)."""
    if kind == "choice":
        _reference_letter(reference, letters)
    elif kind == "numeric":
        for ref in _as_list(reference):
            if extract_number(ref) is None:
                raise DataError(f"numeric reference {ref!r} contains no number")
    elif kind in ("exact", "contains"):
        for ref in _as_list(reference):
            if not normalize_text(str(ref)):
                raise DataError(f"{kind} reference {ref!r} is empty after normalisation")
    elif kind not in MODEL_JUDGES:
        raise ConfigError(f"unknown judge {kind!r}; choose one of {', '.join(JUDGE_KINDS)}")
