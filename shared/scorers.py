"""Accuracy scorers: map a model's answer and the reference answers to a score in [0, 1].

Every scorer has the signature ``score(prediction: str, answers: list[str], **kwargs) -> float``
and returns a float in [0, 1]. Scorers compare the *answer* only: run `extract_answer` on the raw
generation first (the rollout does this, as the seed did). An empty ``answers`` list is a data
error and raises ValueError; an empty prediction simply scores as a wrong answer.

Metrics (registry keys in brackets):

- [vqa] `vqa_score`: the VQA v2 soft accuracy with the official answer normalisation and the
  official averaging over leave-one-out subsets of the human answers.
- [exact] `exact_match`: SQuAD-style normalised exact match (case, punctuation, whitespace).
- [mc] `multiple_choice`: a choice letter ("B", "(B)", "B.", "Answer: B") or the option text.
- [anls] `anls`: average normalised Levenshtein similarity (DocVQA / ST-VQA), threshold 0.5.
- [agreement] `agreement`: agreement with the full-compute answer of the same frozen model, for
  unlabelled data (answers = [reference]).

Where the seed's Molmo code (``molmo/eval/vqa.py``) differs:

- VQA: the seed used ``min(#matches / 3, 1)`` over all answers; we use the official leave-one-out
  average (see `vqa_score`). With 10 answers the two differ only when exactly 1-3 answers match.
- MC: the seed's ``select_mc_option`` falls back to the option nearest in edit distance, so any
  output (even garbage) picks some option and earns the chance rate on average. We score a
  prediction that names no option as 0, so the reward does not pay for unparseable answers.

Pure module: stdlib only.
"""
from __future__ import annotations

import re
import string
from typing import Callable, Sequence

__all__ = [
    "SCORERS",
    "agreement",
    "anls",
    "exact_match",
    "extract_answer",
    "get_scorer",
    "levenshtein",
    "multiple_choice",
    "normalize_text",
    "normalize_vqa_answer",
    "score",
    "vqa_score",
]


# ----------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------
_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """Extract the short answer from a raw generation, as the seed does.

    If the text contains "Answer:" (any case), the answer is the first non-empty line after the
    last such marker; otherwise it is the last non-empty line. The result is stripped.

    Args:
        text: the decoded generation.

    Returns:
        The answer string; "" if the text holds no non-empty line.

    Examples:
        >>> extract_answer("The sign is red.\\nAnswer: red")
        'red'
        >>> extract_answer("  two dogs \\n\\n")
        'two dogs'
    """
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        tail = text[marks[-1].end():]
        for line in tail.splitlines():
            if line.strip():
                return line.strip()
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------
# VQA answer normalisation (official VQA evaluation script, vqaEval.py)
# ----------------------------------------------------------------------------------------------
# The contraction table is the official one, quirks included: keys with capitals ("Im", "Ive")
# can never match because words are lowercased first, and "somebody'd" maps to "somebodyd".
# Both sides of a comparison go through the same table, so the quirks are harmless.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The official "manualMap": number words to digits ("none" counts as zero).
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!")
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a (mistyped) lookahead that
# is always true, so in effect a period is removed unless a digit FOLLOWS it: "3.5" and ".5" keep
# theirs, "yes." and "1." lose theirs. We reproduce that behaviour, not the intended lookbehind.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    For each punctuation mark p: if p is next to a space anywhere in the text, or the text contains
    a comma between two digits ("1,000"), every p is deleted; otherwise every p becomes a space
    ("red,blue" -> "red blue", "red, blue" -> "red  blue", "1,000" -> "1000"). Then periods not
    followed by a digit are deleted (see `_PERIOD_STRIP`).
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE as `count` (=32 replacements at most); we remove all.
    return _PERIOD_STRIP.sub("", out)


def _vqa_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words -> digits, drop articles,
    expand contractions, join with single spaces."""
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer as the official VQA evaluation script does.

    Steps, in order: newlines and tabs become spaces; strip; punctuation (`_vqa_punctuation`:
    marks removed or turned into spaces, the comma-between-digits rule, the period-not-decimal
    rule); lowercase; number words to digits ("two" -> "2", "none" -> "0"); articles a/an/the
    removed; contractions restored ("dont" -> "don't"); whitespace collapsed.

    Args:
        answer: a predicted or human answer.

    Returns:
        The normalised answer.

    Examples:
        >>> normalize_vqa_answer("The Two dogs.")
        '2 dogs'
        >>> normalize_vqa_answer("1,000")
        '1000'
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digit_article(_vqa_punctuation(text))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy with the official leave-one-out averaging.

    The VQA accuracy of one answer against a set of human answers is min(#matches / 3, 1). The
    official script averages it over the leave-one-out subsets of the (usually 10) human answers:

        acc = mean over i of min(1, #{j != i : answers[j] == prediction} / 3)

    after normalising every answer with `normalize_vqa_answer`. With 10 answers of which m match,
    this is 0, 0.3, 0.6, 0.9 for m = 0..3 and 1 for m >= 4 (the plain formula gives 0, 1/3, 2/3,
    1, 1). The formula applies unchanged to lists of any length n >= 2; note that it then caps at
    min(1, (n - 1) / 3), so lists of 2-3 answers can never score 1 (use "exact" for such data).
    A single answer is scored as normalised exact match (1 or 0).

    Unlike the official script, the human answers get the full normalisation, not only the
    punctuation step: the official annotations are pre-normalised, other datasets are not, and
    normalisation is idempotent on pre-normalised answers (as in the seed's Molmo code).

    Args:
        prediction: the extracted answer.
        answers: the human answers (duplicates are meaningful).

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: if `answers` is empty.
    """
    _check_answers(answers, "vqa")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    total_matches = sum(gt == pred for gt in gts)
    accs = []
    for gt in gts:
        # Matches among the other answers: leave answer i out of the count.
        others = total_matches - (gt == pred)
        accs.append(min(1.0, others / 3.0))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------------------------
# Exact match and agreement
# ----------------------------------------------------------------------------------------------
_PUNCT_CHARS = frozenset(string.punctuation) | frozenset("‘’“”«»…–—")
_DIGIT_SEPARATOR = re.compile(r"(?<=\d)[.,](?=\d)")


def normalize_text(text: str) -> str:
    """Normalise text for exact match (SQuAD-style, numbers kept intact).

    Lowercase; a comma between digits is deleted ("1,000" -> "1000") and a period between digits
    kept ("3.5"); every other punctuation mark is deleted ("don't" -> "dont", "u.s." -> "us");
    whitespace is collapsed and stripped. Articles and number words are left alone.

    Args:
        text: any string.

    Returns:
        The normalised string.
    """
    text = text.lower()
    out = []
    for i, ch in enumerate(text):
        if ch in _PUNCT_CHARS:
            if ch == "." and _DIGIT_SEPARATOR.match(text, i):
                out.append(ch)
            continue  # commas between digits and all other marks are dropped
        out.append(ch)
    return " ".join("".join(out).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0.

    Args:
        prediction: the extracted answer.
        answers: the accepted answers.

    Returns:
        1.0 or 0.0 (see `normalize_text` for the normalisation).

    Raises:
        ValueError: if `answers` is empty.
    """
    _check_answers(answers, "exact")
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(a) for a in answers))


def agreement(prediction: str, reference: str | Sequence[str]) -> float:
    """Agreement with the full-compute answer of the same frozen model (unlabelled data).

    Both answers are compared after the VQA normalisation (`normalize_vqa_answer`), so "Two
    dogs." and "2 dogs" agree: the answers come from the same model and should differ only in
    substance, not in surface form. Apply `extract_answer` to both generations first.

    Args:
        prediction: the answer produced under the controller's knobs.
        reference: the full-compute answer, or a list holding it (the registry passes
            ``answers=[reference]``; with several entries any match counts).

    Returns:
        1.0 if they agree after normalisation, else 0.0.

    Raises:
        ValueError: if `reference` is an empty list.
    """
    refs = [reference] if isinstance(reference, str) else list(reference)
    _check_answers(refs, "agreement")
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(r) for r in refs))


# ----------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------
_LETTERS = string.ascii_uppercase
# A bare letter: "B", "(B)", "B.", "B)", "B:".
_BARE_LETTER = re.compile(r"^\(?([A-Za-z])\s*[).:]?$")
# A letter followed by the option text: "B. red", "(B) red", "B) red", "B: red".
_LETTER_THEN_TEXT = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s+\S")
# "Answer: B", "The answer is (B).", "Correct option: C", "answer is B) red". A bare letter must
# end the text or be followed by ) . : or , so that "Answer: a dog" is not read as choice A.
_ANSWER_IS_LETTER = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*"
    r"(?:\(([A-Za-z])\)|([A-Za-z])(?=$|[).:,]))",
    re.IGNORECASE,
)


def _parse_letter(text: str, num_options: int | None) -> int | None:
    """Return the 0-based option index a choice letter in `text` names, or None.

    A letter counts only in the forms above, so "A cat" is not read as choice A. With
    `num_options` given, letters beyond the last option are rejected.
    """
    text = text.strip()
    match = _BARE_LETTER.match(text) or _LETTER_THEN_TEXT.match(text) or _ANSWER_IS_LETTER.match(text)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g).upper()
    index = _LETTERS.index(letter)
    if num_options is not None and index >= num_options:
        return None
    return index


def multiple_choice(prediction: str, answers: Sequence[str], options: Sequence[str] | None = None) -> float:
    """Multiple-choice accuracy: does the prediction name a correct option?

    The prediction names an option either by its letter ("B", "(B)", "B.", "B) red",
    "Answer: B", "The answer is (B)"; case-insensitive) or, when `options` is given, by the
    option's text (normalised exact match, `normalize_text`). Each correct answer may itself be a
    letter or an option text. Without `options`, letters are compared with letters and texts with
    texts. A prediction that names no option scores 0 (no nearest-option fallback).

    Args:
        prediction: the extracted answer.
        answers: the correct answer(s), as letters ("B") or option texts.
        options: the option texts in letter order (A, B, ...), if known.

    Returns:
        1.0 if the prediction names a correct option, else 0.0.

    Raises:
        ValueError: if `answers` is empty or `options` has more than 26 entries.
    """
    _check_answers(answers, "mc")
    n = None if options is None else len(options)
    if n is not None and n > len(_LETTERS):
        raise ValueError(f"mc: at most {len(_LETTERS)} options are supported, got {n}")
    option_texts = [normalize_text(o) for o in options] if options is not None else []

    def to_index(text: str) -> int | None:
        index = _parse_letter(text, n)
        if index is None and option_texts:
            norm = normalize_text(text)
            if norm in option_texts:
                index = option_texts.index(norm)
        return index

    gold_indices = {i for i in (to_index(a) for a in answers) if i is not None}
    pred_index = to_index(prediction)
    if pred_index is not None:
        return float(pred_index in gold_indices)
    if options is None:
        # No option list: a textual prediction can only match a textual answer.
        pred = normalize_text(prediction)
        return float(bool(pred) and any(
            _parse_letter(a, None) is None and pred == normalize_text(a) for a in answers))
    return 0.0


# ----------------------------------------------------------------------------------------------
# ANLS
# ----------------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each of cost 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity (Biten et al. 2019, ST-VQA; DocVQA), one sample.

    Both strings are lowercased, stripped and whitespace-collapsed. With NL = edit distance /
    max(len), the similarity to one answer is 1 - NL if NL < threshold, else 0 (so NL exactly at
    the threshold scores 0); the score is the maximum over the answers. Two empty strings have
    similarity 1.

    Args:
        prediction: the extracted answer.
        answers: the accepted answers.
        threshold: NL at or above which the similarity is 0.

    Returns:
        The similarity in [0, 1].

    Raises:
        ValueError: if `answers` is empty.
    """
    _check_answers(answers, "anls")
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        gt = " ".join(answer.lower().split())
        longest = max(len(pred), len(gt))
        nl = levenshtein(pred, gt) / longest if longest else 0.0
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
Scorer = Callable[..., float]

SCORERS: dict[str, Scorer] = {
    "vqa": vqa_score,
    "exact": exact_match,
    "mc": multiple_choice,
    "anls": anls,
    "agreement": agreement,
}


def get_scorer(name: str) -> Scorer:
    """Look up a scorer by metric name.

    Args:
        name: one of the keys of `SCORERS`.

    Returns:
        The scorer, called as ``scorer(prediction, answers, **kwargs)``.

    Raises:
        ValueError: naming the unknown metric and the known ones.
    """
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; known metrics: {sorted(SCORERS)}") from None


def score(metric: str, prediction: str, answers: Sequence[str], **kwargs) -> float:
    """Score `prediction` against `answers` with the named metric.

    Args:
        metric: a key of `SCORERS`.
        prediction: the extracted answer.
        answers: the reference answers (for "agreement", ``[full_compute_answer]``).
        **kwargs: passed to the scorer (``options=`` for "mc", ``threshold=`` for "anls").

    Returns:
        The score in [0, 1].
    """
    return float(get_scorer(metric)(prediction, answers, **kwargs))


def _check_answers(answers: Sequence[str], metric: str) -> None:
    if isinstance(answers, str):
        raise TypeError(f"{metric}: answers must be a list of strings, got the string {answers!r}")
    if len(answers) == 0:
        raise ValueError(f"{metric}: answers is empty (unlabelled samples must use 'agreement')")
