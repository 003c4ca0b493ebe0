"""Task metrics on generated text: GSM8K final-number exact match, MedMCQA option-letter accuracy, SQuAD v2
EM/F1 (official normalization, unanswerables), and ROUGE-L / token F1 for open-ended answers (Dolly, Alpaca).

All functions are pure (strings in, numbers out); `score_predictions` turns a task's examples and predictions
into a score in [0, 100] plus per-example details.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

# ---- GSM8K --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_CUE = re.compile(r"answer\s*(?:is\s*:?|:|=)", re.IGNORECASE)


def _to_decimal(token: str) -> Decimal | None:
    cleaned = token.replace("\u2212", "-").replace("$", "").replace(",", "")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_number(text: str) -> str | None:
    """The final numeric answer in `text`, normalized ("1,234.50" -> "1234.5", "-$5" -> "-5"), or None.

    Order: the first number after the last ``####``; else the first number after the last "answer is" /
    "answer:"; else the last number in the text. Handles thousands separators, "$", negative numbers (also the
    Unicode minus) and trailing periods; a hyphen directly after a digit or letter ("5-3") is not a minus sign.
    """
    for cue in (re.compile(r"####"), _ANSWER_CUE):
        hits = list(cue.finditer(text))
        if hits:
            m = _NUMBER.search(text, hits[-1].end())
            if m:
                return _format(m.group(0))
    numbers = _NUMBER.findall(text)
    return _format(numbers[-1]) if numbers else None


def _format(token: str) -> str | None:
    value = _to_decimal(token)
    if value is None:
        return None
    value = value.normalize()
    return format(value, "f") if value != 0 else "0"


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two number strings (so "5.50" == "5.5" and "1,000" == "1000")."""
    if a is None or b is None:
        return False
    x, y = _to_decimal(a), _to_decimal(b)
    return x is not None and y is not None and x == y


def gsm8k_correct(prediction: str, gold: str) -> bool:
    """Exact match of the extracted final number with the gold number."""
    return numbers_equal(extract_number(prediction), gold)


# ---- MedMCQA ------------------------------------------------------------------------------------------------

_LETTERS = "ABCD"
# a letter after a cue word: "(b)", "B" (not followed by a word character), or "b" closed by ")", ".", ":" or end
_CUED = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:|=|-)?\s*(?i:option\s*|choice\s*)?"
                   r"(?:[(\[]([A-Da-d])[)\]]|([A-D])(?!\w)|([a-d])(?=[).:]|\s*$))")
_LEADING = re.compile(r"^\s*[(\[]?([A-D])[)\].:](?:\s|$)|^\s*([A-D])\s*$|^\s*[(\[]?([a-d])[)\]]")
_PARENS = re.compile(r"[(\[]([A-Da-d])[)\]]")


def parse_option_letter(text: str, options: Mapping[str, str] | Sequence[str] | None = None) -> str | None:
    """The option letter (A-D) a free-form answer picks, or None.

    Tried in order: a cue ("Answer: C", "The correct option is D.", "answer is (b)"); a leading letter ("B",
    "B.", "(b)", "C) ..."); a parenthesized letter anywhere ("... (c) ..."); else, if `options` are given, the one
    option whose text appears in the answer. A bare leading "A " followed by words ("A patient ...") is not
    taken as a letter.
    """
    m = _CUED.search(text)
    if m:
        return next(g for g in m.groups() if g).upper()
    m = _LEADING.search(text)
    if m:
        return next(g for g in m.groups() if g).upper()
    m = _PARENS.search(text)
    if m:
        return m.group(1).upper()
    if options:
        items = options.items() if isinstance(options, Mapping) else zip(_LETTERS, options, strict=False)
        low = text.lower()
        hits = [letter for letter, opt in items if opt and opt.strip() and opt.strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


# ---- SQuAD v2 -----------------------------------------------------------------------------------------------

NO_ANSWER_PHRASES = ("unanswerable", "no answer", "not answerable", "cannot be answered", "can't be answered",
                     "cannot answer", "not mentioned", "not stated", "not provided", "does not say",
                     "doesn't say", "does not contain", "doesn't contain", "not in the context",
                     "no information")


def normalize_answer(s: str) -> str:
    """The official SQuAD normalization: lowercase, drop punctuation, drop articles (a/an/the), fix whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def is_no_answer(prediction: str) -> bool:
    """True for an empty prediction or one containing a no-answer phrase ("unanswerable", "not mentioned", ...)."""
    low = prediction.lower()
    return not normalize_answer(prediction) or any(p in low for p in NO_ANSWER_PHRASES)


def clean_squad_prediction(text: str) -> str:
    """First non-empty line, without a leading "Answer:"; "" for a no-answer reply."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^answer\s*:\s*", "", line, flags=re.IGNORECASE)
    return "" if is_no_answer(line) else line


def _f1_tokens(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_exact(prediction: str, gold_answers: Sequence[str]) -> float:
    """Max exact match (0/1) over the gold answers; an empty gold list means unanswerable (gold = "")."""
    golds = [g for g in gold_answers if normalize_answer(g)] or [""]
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Max token F1 over the gold answers, as the official SQuAD v2 script computes it (in [0, 1])."""
    golds = [g for g in gold_answers if normalize_answer(g)] or [""]
    pred = normalize_answer(prediction).split()
    return max(_f1_tokens(pred, normalize_answer(g).split()) for g in golds)


# ---- open-ended (Dolly, Alpaca) -----------------------------------------------------------------------------


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 after SQuAD normalization, in [0, 1]."""
    return _f1_tokens(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of SQuAD-normalized tokens, beta = 1), in [0, 1]."""
    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


# ---- format_mix ---------------------------------------------------------------------------------------------


def first_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label (whole word, case-insensitive) that occurs first in `prediction`, or None."""
    hits = [(m.start(), label) for label in labels
            if (m := re.search(rf"\b{re.escape(label)}\b", prediction, re.IGNORECASE))]
    return min(hits)[1] if hits else None


def contains_answer(prediction: str, gold: str) -> bool:
    """True if the SQuAD-normalized gold tokens occur as a contiguous run in the normalized prediction."""
    pred, want = normalize_answer(prediction).split(), normalize_answer(gold).split()
    return bool(want) and any(pred[i:i + len(want)] == want for i in range(len(pred) - len(want) + 1))


def is_terse(prediction: str, max_words: int = 3) -> bool:
    """A bare-value answer: at most `max_words` words (the format the terse third of format_mix teaches)."""
    return len(prediction.split()) <= max_words


def format_mix_correct(kind: str, prediction: str, gold: str, labels: Sequence[str] = ()) -> bool:
    """Correct in either format: classification -> the first label named is the gold one; math -> the final
    number (`extract_number`) equals the gold; extraction / closed QA -> the gold value occurs in the answer."""
    if labels:
        return first_label(prediction, labels) == gold
    if kind == "math":
        return numbers_equal(extract_number(prediction), gold)
    return contains_answer(prediction, gold)


# ---- per task -----------------------------------------------------------------------------------------------

#: What `score_predictions` reports as the task score (the others are in its details).
PRIMARY_METRIC = {"gsm8k": "exact_match", "medmcqa": "accuracy", "squad_v2": "f1", "dolly": "rouge_l",
                  "alpaca": "rouge_l", "format_mix": "accuracy"}


def score_example(task: str, example: Any, prediction: str) -> dict[str, Any]:
    """Per-example metrics (each in [0, 1]) and the parsed answer."""
    meta = example.meta
    if task == "gsm8k":
        parsed = extract_number(prediction)
        return {"exact_match": float(numbers_equal(parsed, meta["gold"])), "parsed": parsed}
    if task == "medmcqa":
        parsed = parse_option_letter(prediction, meta.get("options"))
        return {"accuracy": float(parsed == meta["gold"]), "parsed": parsed}
    if task == "squad_v2":
        parsed = clean_squad_prediction(prediction)
        return {"exact_match": squad_exact(parsed, meta["answers"]), "f1": squad_f1(parsed, meta["answers"]),
                "parsed": parsed}
    if task == "format_mix":
        return {"accuracy": float(format_mix_correct(example.category, prediction, meta["gold"],
                                                     meta.get("labels") or ())),
                "terse": float(is_terse(prediction))}
    if task in ("dolly", "alpaca"):
        reference = meta.get("reference", example.response)
        return {"rouge_l": rouge_l(prediction, reference), "token_f1": token_f1(prediction, reference)}
    raise ValueError(f"no metric for task {task!r}; known: {', '.join(sorted(PRIMARY_METRIC))}")


def score_predictions(task: str, examples: Sequence[Any], predictions: Sequence[str]) -> dict[str, Any]:
    """Mean metrics x 100 over examples: {"score": primary metric, "<metric>": ..., "n": ..., "per_example": [...]}.

    Primary metrics: GSM8K exact match of the final number, MedMCQA letter accuracy, SQuAD v2 F1 (EM reported
    too), Dolly/Alpaca ROUGE-L F1 against the reference (token F1 reported too), format_mix accuracy in either
    answer format (`format_mix_correct`; "terse" = % of answers of <= 3 words, the format-collapse signal).
    """
    if len(examples) != len(predictions):
        raise ValueError(f"got {len(examples)} examples but {len(predictions)} predictions")
    if task not in PRIMARY_METRIC:
        raise ValueError(f"no metric for task {task!r}; known: {', '.join(sorted(PRIMARY_METRIC))}")
    rows = [score_example(task, ex, pred) for ex, pred in zip(examples, predictions, strict=True)]
    keys = [k for k in (rows[0] if rows else {}) if k != "parsed"]
    means = {k: 100.0 * sum(r[k] for r in rows) / len(rows) for k in keys} if rows else {}
    per_example = [{"id": ex.id, "prediction": pred, **r} for ex, pred, r in zip(examples, predictions, rows,
                                                                                  strict=True)]
    return {"score": means.get(PRIMARY_METRIC[task], 0.0), "metric": PRIMARY_METRIC[task], **means,
            "n": len(rows), "per_example": per_example}
