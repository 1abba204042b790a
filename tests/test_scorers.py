"""Tests for shared/scorers.py; every expected value is worked out by hand in the comments."""
from __future__ import annotations

import pytest

from shared import scorers
from shared.scorers import (
    SCORERS,
    agreement,
    anls,
    exact_match,
    extract_answer,
    get_scorer,
    levenshtein,
    multiple_choice,
    normalize_text,
    normalize_vqa_answer,
    score,
    vqa_score,
)


# ----------------------------------------------------------------------------------------------
# VQA normalisation, one rule at a time
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    # Punctuation: a mark next to a space is deleted, otherwise it becomes a space.
    ("yes!", "yes"),
    ("red, blue", "red blue"),
    ("red,blue", "red blue"),
    ("black/white", "black white"),
    ("t-shirt", "t shirt"),
    ("(left)", "left"),
    ('"stop"', "stop"),
    ("what?", "what"),
    # Apostrophes and colons are not in the official list: they survive.
    ("man's", "man's"),
    ("10:30", "10:30"),
])
def test_vqa_punctuation(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("1,000", "1000"),             # comma between digits: deleted, not turned into a space
    ("10,000,000", "10000000"),
    # Once the text has a digit-comma, EVERY mark is deleted rather than spaced ("-" included).
    ("1,000-2", "10002"),
    ("a,b", "b"),                   # no digit-comma: "a b", then the article "a" goes
])
def test_vqa_comma_between_digits(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("3.5", "3.5"),                 # decimal point kept
    (".5", ".5"),                   # followed by a digit: kept
    ("yes.", "yes"),                # sentence period removed
    ("u.s.", "us"),
    ("1.", "1"),                    # the official regex only looks ahead: a trailing period goes
    ("mr. smith", "mr smith"),
])
def test_vqa_period_not_decimal(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("The cat", "cat"),
    ("the the cat", "cat"),
    ("ant", "ant"),                 # only whole words
    ("a", ""),
])
def test_vqa_articles(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("two", "2"),
    ("Two", "2"),
    ("none", "0"),
    ("zero", "0"),
    ("ten", "10"),
    ("two dogs", "2 dogs"),
    ("twenty", "twenty"),           # outside the official map
    ("someone", "someone"),         # whole words only
])
def test_vqa_number_words(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Dont", "don't"),              # lowercased before the lookup
    ("it isnt", "it isn't"),
    ("don't", "don't"),             # already contracted: unchanged
    ("oclock", "o'clock"),
])
def test_vqa_contractions(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_case_and_whitespace() -> None:
    assert normalize_vqa_answer("  Red\tCar \n") == "red car"
    assert normalize_vqa_answer("RED   car") == "red car"


def test_vqa_normalisation_combined() -> None:
    # "The" dropped, "Two" -> "2", "." dropped, "dont" -> "don't".
    assert normalize_vqa_answer("The Two dogs dont bark.") == "2 dogs don't bark"


# ----------------------------------------------------------------------------------------------
# VQA score: leave-one-out averaging
# ----------------------------------------------------------------------------------------------
def test_vqa_leave_one_out_two_of_ten() -> None:
    # m = 2 matches of 10. The 2 matching answers each see 1 match among the other 9 -> 1/3;
    # the 8 others each see 2 -> 2/3. Mean = (2 * 1/3 + 8 * 2/3) / 10 = 6/10 = 0.6
    # (the plain min(m/3, 1) would give 2/3).
    answers = ["red", "red"] + ["blue"] * 8
    assert vqa_score("red", answers) == pytest.approx(0.6)


def test_vqa_leave_one_out_three_of_ten_with_normalisation() -> None:
    # "Two", "2" and "two." all normalise to "2": m = 3 matches.
    # Matching answers see 2 others -> 2/3 each; the 7 others see 3 -> 1.
    # Mean = (3 * 2/3 + 7 * 1) / 10 = 9/10.
    answers = ["Two", "2", "two.", "3", "3", "3", "4", "4", "many", "several"]
    assert vqa_score("two", answers) == pytest.approx(0.9)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_table(matches: int, expected: float) -> None:
    # m = 1: the match sees 0 others -> 0; the 9 others see 1 -> 1/3; mean = 9 * (1/3) / 10 = 0.3.
    # m = 4: the matches see 3 -> 1; the others see 4 -> 1; mean = 1.
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_score("yes", answers) == pytest.approx(expected)


def test_vqa_fewer_than_ten_answers() -> None:
    # 5 answers, 2 match: matches see 1 other -> 1/3 (x2); others see 2 -> 2/3 (x3).
    # Mean = (2/3 + 2) / 5 = 8/15.
    assert vqa_score("cat", ["cat", "cat", "dog", "dog", "bird"]) == pytest.approx(8 / 15)
    # 2 answers, both match: each sees 1 other -> 1/3; the cap is (n - 1) / 3.
    assert vqa_score("cat", ["cat", "a cat"]) == pytest.approx(1 / 3)


def test_vqa_single_answer_is_exact_match_after_normalisation() -> None:
    assert vqa_score("Two.", ["2"]) == 1.0
    assert vqa_score("the dog", ["dog"]) == 1.0
    assert vqa_score("dogs", ["dog"]) == 0.0


def test_vqa_empty_prediction() -> None:
    assert vqa_score("", ["yes"] * 10) == 0.0
    assert vqa_score("   ", ["yes"]) == 0.0


def test_vqa_empty_answers_raises() -> None:
    with pytest.raises(ValueError, match="vqa"):
        vqa_score("yes", [])


# ----------------------------------------------------------------------------------------------
# Exact match and agreement
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("  Hello,  World! ", "hello world"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("U.S.", "us"),
    ("don't", "dont"),
    ("“quoted”", "quoted"),
])
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_exact_match() -> None:
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("  NEW   york ", ["New York"]) == 1.0
    assert exact_match("3.5", ["35"]) == 0.0           # the decimal point is kept
    assert exact_match("1,000", ["1000"]) == 1.0
    assert exact_match("london", ["paris", "London!"]) == 1.0
    assert exact_match("two", ["2"]) == 0.0            # exact match maps no number words
    assert exact_match("", ["paris"]) == 0.0
    with pytest.raises(ValueError, match="exact"):
        exact_match("x", [])


def test_agreement() -> None:
    assert agreement("Two dogs.", "2 dogs") == 1.0
    assert agreement("a red car", ["red car"]) == 1.0
    assert agreement("red", "blue") == 0.0
    assert agreement("", "blue") == 0.0
    assert score("agreement", "Yes", ["yes"]) == 1.0
    with pytest.raises(ValueError, match="agreement"):
        agreement("x", [])


# ----------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------
OPTIONS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("prediction", [
    "B", "b", "(B)", "B.", "B)", "B:", "Answer: B", "answer: (b)", "The answer is B.",
    "The answer is (B)", "B. green", "(B) green", "B) green", "green", "Green.",
])
def test_mc_formats_correct(prediction: str) -> None:
    assert multiple_choice(prediction, ["B"], OPTIONS) == 1.0
    assert multiple_choice(prediction, ["green"], OPTIONS) == 1.0   # gold given as option text


@pytest.mark.parametrize("prediction", ["A", "(C)", "Answer: D", "red", "blue.", "C. blue"])
def test_mc_formats_wrong(prediction: str) -> None:
    assert multiple_choice(prediction, ["B"], OPTIONS) == 0.0


@pytest.mark.parametrize("prediction", [
    "", "E", "Answer: E", "purple", "A cat", "I am not sure", "Answer: a dog",
])
def test_mc_unparseable_scores_zero(prediction: str) -> None:
    # "E" is beyond the 4 options; "A cat" and "Answer: a dog" must not read as choice A.
    assert multiple_choice(prediction, ["A"], OPTIONS) == 0.0


def test_mc_without_options() -> None:
    assert multiple_choice("(C)", ["C"]) == 1.0
    assert multiple_choice("Answer: C", ["c"]) == 1.0
    assert multiple_choice("C", ["B"]) == 0.0
    assert multiple_choice("blue", ["blue"]) == 1.0     # text against text
    assert multiple_choice("blue", ["C"]) == 0.0        # text cannot be mapped to a letter
    assert multiple_choice("", ["C"]) == 0.0


def test_mc_via_registry_with_options() -> None:
    assert score("mc", "Answer: C", ["blue"], options=OPTIONS) == 1.0


def test_mc_errors() -> None:
    with pytest.raises(ValueError, match="mc"):
        multiple_choice("A", [], OPTIONS)
    with pytest.raises(ValueError, match="26"):
        multiple_choice("A", ["A"], [str(i) for i in range(27)])


# ----------------------------------------------------------------------------------------------
# ANLS
# ----------------------------------------------------------------------------------------------
def test_levenshtein() -> None:
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Invoice", ["invoice"], 1.0),                 # case-insensitive
    ("  total   due ", ["total due"], 1.0),        # whitespace collapsed
    ("abcd", ["abce"], 0.75),                      # NL = 1/4
    ("abc", ["abd"], 2 / 3),                       # NL = 1/3
    ("abcdefg", ["abcdxyz"], 4 / 7),               # NL = 3/7 < 0.5: just under the threshold
    ("ab", ["ac"], 0.0),                           # NL = 1/2 exactly: at the threshold -> 0
    ("abcd", ["abxy"], 0.0),                       # NL = 2/4 exactly -> 0
    ("abc", ["xyz"], 0.0),                         # NL = 1
    ("abcd", ["wxyz", "abcx"], 0.75),              # max over answers
    ("", ["abc"], 0.0),                            # empty prediction: NL = 1
    ("", [""], 1.0),                               # both empty: similarity 1
])
def test_anls(prediction: str, answers: list[str], expected: float) -> None:
    assert anls(prediction, answers) == pytest.approx(expected)


def test_anls_custom_threshold_and_errors() -> None:
    assert anls("ab", ["ac"], threshold=0.51) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="anls"):
        anls("x", [])


# ----------------------------------------------------------------------------------------------
# extract_answer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Answer: red", "red"),
    ("The sign shows a word.\nAnswer: stop ", "stop"),
    ("answer: yes", "yes"),
    ("Answer:\n  B\nbecause...", "B"),             # first non-empty line after the marker
    ("Answer: no. Final Answer: yes", "yes"),      # the last marker wins
    ("line one\nline two\n\n", "line two"),        # no marker: last non-empty line
    ("  just this  ", "just this"),
    ("", ""),
    ("\n \n", ""),
    ("Answer:", ""),
])
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def test_registry_keys_and_lookup() -> None:
    assert set(SCORERS) == {"vqa", "exact", "mc", "anls", "agreement"}
    assert get_scorer("vqa") is scorers.vqa_score
    assert score("exact", "Paris", ["paris"]) == 1.0
    assert score("vqa", "two", ["2"] * 10) == 1.0
    assert score("anls", "abcd", ["abce"]) == pytest.approx(0.75)


def test_unknown_metric_names_it_and_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        get_scorer("cider")
    message = str(err.value)
    assert "cider" in message
    for known in SCORERS:
        assert known in message
    with pytest.raises(ValueError, match="cider"):
        score("cider", "x", ["x"])


@pytest.mark.parametrize("metric", sorted(SCORERS))
def test_scores_are_floats_in_unit_interval(metric: str) -> None:
    for prediction in ["", "B", "two dogs", "zzzz"]:
        value = score(metric, prediction, ["two dogs", "B", "2 dogs"])
        assert isinstance(value, float)
        assert 0.0 <= value <= 1.0


def test_string_answers_rejected() -> None:
    with pytest.raises(TypeError, match="list"):
        vqa_score("yes", "yes")
