"""Task metrics and continual-learning metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from fastsel.experiments.data import Example
from fastsel.experiments.eval.forgetting import (
    average_performance,
    backward_transfer,
    continual_metrics,
    forgetting_measure,
    max_stage_drop,
)
from fastsel.experiments.eval.metrics import (
    clean_squad_prediction,
    extract_number,
    gsm8k_correct,
    is_no_answer,
    normalize_answer,
    numbers_equal,
    parse_option_letter,
    rouge_l,
    score_predictions,
    squad_exact,
    squad_f1,
    token_f1,
)


@pytest.mark.parametrize("text,expected", [
    ("She has 28 left.\n#### 28", "28"),
    ("#### 1,234", "1234"),
    ("The answer is 1,234.", "1234"),
    ("So the total is $5.50.", "5.5"),
    ("It costs $1,000,000 in total", "1000000"),
    ("The temperature falls to -7 degrees.", "-7"),
    ("The answer is \u221215", "-15"),
    ("5 - 3 = 2, and 2-1 = 1.", "1"),
    ("Answer: 42. Because 6 * 7 = 42 and 40 + 2 = 42.", "42"),
    ("The answer is 12 apples, not 13.", "12"),
    ("First 3 boxes, then 4 boxes, so 7", "7"),
    ("It takes 2.50 hours.", "2.5"),
    ("#### 100.", "100"),
    ("He had 0 left", "0"),
    ("no digits here", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_number(text) == expected


def test_gsm8k_correct_is_numeric():
    assert gsm8k_correct("The answer is 5.50", "5.5") and gsm8k_correct("#### 1,000", "1000")
    assert not gsm8k_correct("I think 7", "8") and not gsm8k_correct("", "8")
    assert numbers_equal("-3", "-3.0") and not numbers_equal(None, "1")


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("(b)", "B"), ("Answer: C", "C"), ("The correct option is D.", "D"), ("b)", "B"),
    ("C. Paracetamol is the drug of choice.", "C"), ("answer is (a)", "A"), ("The answer: option b.", "B"),
    ("I would choose (c) here.", "C"), ("A", "A"),
    ("A patient with fever needs fluids.", None), ("The answer is a bit unclear.", None),
    ("Answer: Bradykinesia", None), ("", None),
])
def test_medmcqa_letter_parsing(text, expected):
    assert parse_option_letter(text) == expected


def test_medmcqa_option_text_fallback():
    options = {"A": "Insulin", "B": "Glucagon", "C": "Cortisol", "D": "Adrenaline"}
    assert parse_option_letter("It is glucagon, released by alpha cells.", options) == "B"
    assert parse_option_letter("insulin or glucagon", options) is None  # ambiguous
    assert parse_option_letter("Cortisol", ["Insulin", "Glucagon", "Cortisol", "Adrenaline"]) == "C"


def test_squad_normalization_and_scores():
    assert normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert squad_exact("Paris.", ["paris", "Paris, France"]) == 1.0
    assert squad_f1("the Eiffel Tower", ["Eiffel Tower in Paris"]) == pytest.approx(2 / 3)
    assert squad_exact("the Eiffel Tower", ["Eiffel Tower in Paris"]) == 0.0
    assert squad_f1("Tower Eiffel tall", ["Eiffel Tower", "tower"]) == pytest.approx(0.8)  # max over golds
    # unanswerable: the gold is "" and only an empty prediction matches
    assert squad_exact("", []) == squad_f1("", []) == 1.0
    assert squad_exact("Paris", []) == squad_f1("Paris", []) == 0.0
    assert squad_f1("", ["Paris"]) == 0.0


def test_squad_no_answer_phrases():
    assert is_no_answer("") and is_no_answer("Unanswerable.") and is_no_answer("The context does not say.")
    assert not is_no_answer("Paris")
    assert clean_squad_prediction("The question is unanswerable from the context.") == ""
    assert clean_squad_prediction("Answer: 1,642 metres\nBecause the text says so.") == "1,642 metres"
    assert squad_exact(clean_squad_prediction("unanswerable"), []) == 1.0


def test_rouge_l_and_token_f1():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.75)
    # normalized [mat, on, cat] vs [cat, on, mat]: the LCS has length 1, so P = R = 1/3
    assert rouge_l("mat the on cat", "cat on the mat") == pytest.approx(1 / 3)
    assert token_f1("mat the on cat", "cat on the mat") == 1.0  # bag of tokens ignores order
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("abc", "xyz") == 0.0


def test_score_predictions_per_task():
    gsm = [Example("g:0", "gsm8k", "q", "#### 4", "gsm8k", {"gold": "4"}),
           Example("g:1", "gsm8k", "q", "#### 10", "gsm8k", {"gold": "10"})]
    out = score_predictions("gsm8k", gsm, ["so 4", "The answer is 9."])
    assert out["score"] == 50.0 and out["metric"] == "exact_match" and out["n"] == 2
    assert out["per_example"][1]["parsed"] == "9"
    squad = [Example("s:0", "squad_v2", "q", "Paris", "squad_v2", {"answers": ["Paris"]}),
             Example("s:1", "squad_v2", "q", "unanswerable", "squad_v2", {"answers": []})]
    out = score_predictions("squad_v2", squad, ["Paris", "Paris"])
    assert out["score"] == out["f1"] == 50.0 and out["exact_match"] == 50.0
    med = [Example("m:0", "medmcqa", "q", "Answer: B", "medmcqa", {"gold": "B", "options": {}})]
    assert score_predictions("medmcqa", med, ["(b)"])["score"] == 100.0
    dolly = [Example("d:0", "dolly", "q", "cat is on mat", "open_qa", {"reference": "the cat is on the mat"})]
    assert score_predictions("dolly", dolly, ["the cat sat on the mat"])["score"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no metric"):
        score_predictions("mmlu", dolly, ["x"])
    with pytest.raises(ValueError, match="predictions"):
        score_predictions("dolly", dolly, [])


# ---- continual metrics --------------------------------------------------------------------------------------

R = [[80, 10, 20],
     [70, 60, 25],
     [50, 40, 90]]


def test_continual_metrics_by_hand():
    # avg = (50 + 40 + 90) / 3; BWT = ((50 - 80) + (40 - 60)) / 2; FM = ((80 - 50) + (60 - 40)) / 2;
    # stage drops: 80 -> 70 (10), 70 -> 50 (20), 60 -> 40 (20)
    assert average_performance(R) == pytest.approx(60.0)
    assert backward_transfer(R) == pytest.approx(-25.0)
    assert forgetting_measure(R) == pytest.approx(25.0)
    assert max_stage_drop(R) == pytest.approx(20.0)
    assert continual_metrics(R) == pytest.approx({"avg": 60.0, "bwt": -25.0, "fm": 25.0, "max_drop": 20.0})


def test_forgetting_uses_the_best_earlier_score_not_the_diagonal():
    # task 0 improves after stage 0 and then drops: BWT compares with R[0][0] = 60, FM with the max 80
    R2 = [[60, 0, 0], [80, 50, 0], [70, 45, 30]]
    assert backward_transfer(R2) == pytest.approx(((70 - 60) + (45 - 50)) / 2)
    assert forgetting_measure(R2) == pytest.approx(((80 - 70) + (50 - 45)) / 2)
    assert max_stage_drop(R2) == pytest.approx(10.0)
    assert average_performance(R2) == pytest.approx(145 / 3)


def test_continual_edge_cases():
    assert math.isnan(backward_transfer([[50.0]])) and math.isnan(forgetting_measure([[50.0]]))
    assert average_performance([[50.0]]) == 50.0
    assert max_stage_drop([[10, 0], [30, 5]]) == -20.0  # improvement only
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[1, 2], [3]])
    nan = float("nan")
    assert forgetting_measure([[80, nan, 0], [nan, 50, 0], [60, 40, 30]]) == pytest.approx(((80 - 60) + (50 - 40)) / 2)


def _mix(kind: str, gold: str, labels: list[str] | None = None) -> Example:
    return Example(f"format_mix:{kind}", "format_mix", "q", gold, kind,
                   {"gold": gold, "format": "terse", "labels": labels or []})


@pytest.mark.parametrize("kind,gold,labels,prediction,correct", [
    ("math", "28", None, "Mia buys 4 x 4 = 16. With 12 that is 28. The answer is 28.", True),
    ("math", "28", None, "28", True),
    ("math", "28", None, "She buys 16 and has 12, so 12 + 16", False),  # the last number is not the answer
    ("classification", "negative", ["positive", "negative"], "The sentiment is negative: it broke.", True),
    ("classification", "negative", ["positive", "negative"], "Positive. Not negative at all.", False),  # first label
    ("classification", "science", ["sports", "business", "science", "weather"], "science", True),
    ("extraction", "Denver", None, "The flight leaves from Denver.", True),
    ("extraction", "Ines Tanaka", None, "The passenger is Ines.", False),
    ("closed_qa", "1267", None, "It was founded in 1267.", True),
    ("closed_qa", "1267", None, "12670", False),
])
def test_format_mix_scoring(kind: str, gold: str, labels: list[str] | None, prediction: str, correct: bool) -> None:
    out = score_predictions("format_mix", [_mix(kind, gold, labels)], [prediction])
    assert out["score"] == (100.0 if correct else 0.0) and out["metric"] == "accuracy"
    assert out["terse"] == (100.0 if len(prediction.split()) <= 3 else 0.0)
