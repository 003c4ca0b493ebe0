"""Loaders for the continual-learning tasks: Dolly-15k, GSM8K, MedMCQA, SQuAD v2, and Alpaca.

Each task reads rows in the dataset's own schema, from the Hugging Face hub (`datasets.load_dataset`) or from a
local JSON / JSONL / CSV / Parquet file, and normalizes them into `Example`s. A malformed row raises a DataError
(a ValueError) naming the file and row; no row is dropped silently.

Prompt formats (the user message; the chat template is applied at tokenization/generation time):

* dolly: ``instruction`` or ``instruction + "\\n\\nContext:\\n" + context``; response = the reference response.
* gsm8k: the question; response = the worked solution ending ``#### <number>``; meta["gold"] = that number.
* medmcqa: question, the options as ``A. ...`` to ``D. ...`` and an instruction to answer with the letter;
  response = ``"Answer: B. <option text>"``; meta["gold"] = the letter (``cop`` 0-3 = A-D, as on the HF hub).
* squad_v2: context, question and the instruction to answer with a span or say ``unanswerable``; response =
  the first gold answer, or ``unanswerable``; meta["answers"] = all gold answers ([] if unanswerable).
* alpaca: ``instruction`` or ``instruction + "\\n\\n" + input``; response = output.
* format_mix: the instruction; response = the long or terse answer; category = the kind (math, classification,
  extraction, closed_qa); meta: gold value, format (long | terse), labels (classification). Written by fastsel
  (`fastsel.experiments.data.format_mix`); no hub dataset.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from fastsel.experiments.data.examples import TEST_FRACTION, Example, ExampleList, select_split
from fastsel.experiments.data.records import (
    DataError,
    Row,
    get_int,
    get_json_field,
    get_str,
    read_rows,
    rows_from_records,
)

log = logging.getLogger(__name__)
FILES_DIR = os.path.join(os.path.dirname(__file__), "files")
DOLLY_CATEGORIES = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                    "information_extraction", "summarization", "creative_writing")
OPTION_LETTERS = ("A", "B", "C", "D")
NO_ANSWER = "unanswerable"
MEDMCQA_INSTRUCTION = "Answer with the letter of the correct option."
SQUAD_INSTRUCTION = ("Answer with a short span copied from the context, or reply \"unanswerable\" if the context "
                     "does not contain the answer.")
_GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def _dolly(row: Row) -> Example:
    instruction = get_str(row, "instruction")
    context = get_str(row, "context", required=False)
    response = get_str(row, "response")
    category = get_str(row, "category")
    prompt = f"{instruction}\n\nContext:\n{context}" if context.strip() else instruction
    return Example(f"dolly:{row.key}", "dolly", prompt, response, category,
                   {"reference": response, "context": context})


def gsm8k_gold(answer: str) -> str | None:
    """The final number after ``####`` in a GSM8K answer, commas removed (None if absent)."""
    m = _GSM8K_FINAL.search(answer.strip())
    if not m:
        return None
    try:
        value = Decimal(m.group(1).replace(",", "")).normalize()
        return format(value, "f") if value != 0 else "0"
    except InvalidOperation:
        return None


def _gsm8k(row: Row) -> Example:
    question = get_str(row, "question")
    answer = get_str(row, "answer")
    gold = gsm8k_gold(answer)
    if gold is None:
        raise row.error("field 'answer' does not end with '#### <number>'")
    return Example(f"gsm8k:{row.key}", "gsm8k", question, answer, "gsm8k", {"gold": gold})


def format_medmcqa(question: str, options: list[str]) -> str:
    lines = [question.strip(), *(f"{letter}. {opt}" for letter, opt in zip(OPTION_LETTERS, options, strict=True))]
    return "\n".join(lines) + "\n" + MEDMCQA_INSTRUCTION


def _medmcqa(row: Row) -> Example:
    question = get_str(row, "question")
    options = [get_str(row, k, allow_empty=True) for k in ("opa", "opb", "opc", "opd")]
    cop = get_int(row, "cop")
    if not 0 <= cop <= 3:
        raise row.error(f"field 'cop' must be 0-3 (the index of the correct option), got {cop}"
                        + (" (the hub's test split has no labels: use split='test' -> validation)" if cop < 0 else ""))
    own_id = row.fields.get("id")
    ident = own_id if isinstance(own_id, str) and own_id else row.key
    letter = OPTION_LETTERS[cop]
    meta = {"gold": letter, "options": dict(zip(OPTION_LETTERS, options, strict=True)),
            "subject": get_str(row, "subject_name", required=False),
            "explanation": row.fields.get("exp") if isinstance(row.fields.get("exp"), str) else ""}
    return Example(f"medmcqa:{ident}", "medmcqa", format_medmcqa(question, options),
                   f"Answer: {letter}. {options[cop]}", "medmcqa", meta)


def format_squad(context: str, question: str) -> str:
    return f"Context: {context.strip()}\n\nQuestion: {question.strip()}\n\n{SQUAD_INSTRUCTION}"


def _squad_answers(row: Row) -> list[str]:
    answers = get_json_field(row, "answers")
    if not isinstance(answers, Mapping) or "text" not in answers:
        raise row.error("field 'answers' must be {'text': [...], 'answer_start': [...]}")
    texts, starts = answers.get("text"), answers.get("answer_start", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise row.error(f"answers['text'] must be a list of non-empty strings, got {texts!r}")
    if not isinstance(starts, list) or len(starts) != len(texts) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in starts):
        raise row.error("answers['answer_start'] must be a list of integers as long as answers['text']")
    return list(texts)


def _squad_v2(row: Row) -> Example:
    ident = get_str(row, "id")
    context = get_str(row, "context")
    question = get_str(row, "question")
    answers = _squad_answers(row)
    meta = {"answers": answers, "answerable": bool(answers), "title": get_str(row, "title", required=False)}
    return Example(f"squad_v2:{ident}", "squad_v2", format_squad(context, question),
                   answers[0] if answers else NO_ANSWER, "squad_v2", meta)


def alpaca_row(row: Row, task: str = "alpaca") -> Example:
    instruction = get_str(row, "instruction")
    extra = get_str(row, "input", required=False)
    output = get_str(row, "output")
    category = row.fields.get("category")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(f"{task}:{row.key}", task, prompt, output,
                   category if isinstance(category, str) and category else task, {"reference": output})


def _format_mix(row: Row) -> Example:
    ident = get_str(row, "id")
    kind = get_str(row, "kind")
    fmt = get_str(row, "format")
    if fmt not in ("long", "terse"):
        raise row.error(f"field 'format' must be 'long' or 'terse', got {fmt!r}")
    labels = row.fields.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise row.error(f"field 'labels' must be a list of strings, got {labels!r}")
    return Example(f"format_mix:{ident}", "format_mix", get_str(row, "instruction"), get_str(row, "response"), kind,
                   {"gold": get_str(row, "gold"), "format": fmt, "labels": list(labels)})


def _flatten_official_squad(rows: list[Row]) -> list[Row]:
    """Rows of the official SQuAD v2 JSON ({"data": [{title, paragraphs: [{context, qas}]}]}) -> HF-style rows."""
    if not rows or "paragraphs" not in rows[0].fields:
        return rows
    flat: list[Row] = []
    for article in rows:
        for para in article.fields.get("paragraphs") or []:
            for qa in para.get("qas") or []:
                answers = [] if qa.get("is_impossible") else (qa.get("answers") or [])
                flat.append(Row(len(flat), {
                    "id": qa.get("id"), "title": article.fields.get("title", ""), "context": para.get("context"),
                    "question": qa.get("question"),
                    "answers": {"text": [a.get("text") for a in answers],
                                "answer_start": [a.get("answer_start") for a in answers]}}, article.source))
    return flat


@dataclass(frozen=True)
class TaskSpec:
    """How to load one task: its row normalizer, hub id/config, hub split names, and the shipped mini file."""

    name: str
    normalize: Callable[[Row], Example]
    hub_id: str  # "" = no hub dataset (a project-written file only)
    hub_config: str | None
    hub_splits: Mapping[str, str | None]  # our split -> hub split; None: hash-split the hub's train split
    mini_file: str
    prepare_rows: Callable[[list[Row]], list[Row]] = lambda rows: rows
    response_field: str | None = None  # the free-text target field that `skip_empty_response` checks


TASKS: dict[str, TaskSpec] = {
    "dolly": TaskSpec("dolly", _dolly, "databricks/databricks-dolly-15k", None,
                      {"train": None, "test": None}, "dolly_mini.jsonl", response_field="response"),
    "gsm8k": TaskSpec("gsm8k", _gsm8k, "openai/gsm8k", "main", {"train": "train", "test": "test"},
                      "gsm8k_mini.jsonl", response_field="answer"),
    "medmcqa": TaskSpec("medmcqa", _medmcqa, "openlifescienceai/medmcqa", None,
                        {"train": "train", "test": "validation"}, "medmcqa_mini.jsonl"),
    "squad_v2": TaskSpec("squad_v2", _squad_v2, "rajpurkar/squad_v2", None,
                         {"train": "train", "test": "validation"}, "squad_v2_mini.jsonl",
                         _flatten_official_squad),
    "alpaca": TaskSpec("alpaca", alpaca_row, "tatsu-lab/alpaca", None, {"train": None, "test": None},
                       "helpful.jsonl", response_field="output"),
    "format_mix": TaskSpec("format_mix", _format_mix, "", None, {"train": None, "test": None}, "format_mix.jsonl",
                           response_field="response"),
}


def normalize_rows(spec: TaskSpec, rows: list[Row], source: str, *, skip_empty_response: bool = False
                   ) -> ExampleList:
    """Normalize every row; duplicate ids are an error (ids must be stable and unique).

    skip_empty_response: rows whose response field is a blank string are skipped and counted in
    `.skipped["empty_response"]` instead of raising (the original Alpaca release has such rows)."""
    examples = ExampleList(source=source, skipped={"empty_response": 0} if skip_empty_response else None)
    seen: dict[str, int] = {}
    for row in spec.prepare_rows(rows):
        if skip_empty_response and spec.response_field:
            value = row.fields.get(spec.response_field)
            if isinstance(value, str) and not value.strip():
                examples.skipped["empty_response"] += 1
                continue
        try:
            ex = spec.normalize(row)
        except DataError as e:
            if spec.response_field and f"field {spec.response_field!r} is empty" in str(e):
                raise DataError(f"{e} (load with skip_empty_response=True to skip and count such rows)") from e
            raise
        if ex.id in seen:
            raise row.error(f"duplicate id {ex.id!r} (first seen at row {seen[ex.id]})")
        seen[ex.id] = row.index
        examples.append(ex)
    if examples.skipped.get("empty_response"):
        log.warning("%s: skipped %d rows with an empty %r", source, examples.skipped["empty_response"],
                    spec.response_field)
    return examples


def is_hub_id(source: str) -> bool:
    """Whether a data (or model) source names the hub: 'hub', or 'owner/name' (one slash, no file extension, not
    starting with . / ~) that is not an existing local path. Everything else is a local path."""
    if source == "hub":
        return True
    return source.count("/") == 1 and not os.path.splitext(source)[1] \
        and not source.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(source))


def load_task(name: str, source: str | os.PathLike[str] | None = None, split: str = "train", *,
              test_fraction: float = TEST_FRACTION, limit: int | None = None, skip_empty_response: bool = False,
              **hub_kwargs: Any) -> ExampleList:
    """Load task `name` (dolly, gsm8k, medmcqa, squad_v2, alpaca) as normalized examples.

    source: None -> the shipped offline mini file (`fastsel/data/files/<task>_mini.jsonl`; Alpaca:
    `helpful.jsonl`); a local .json/.jsonl/.csv/.parquet path in the dataset's own schema; "hub" -> the
    dataset's hub id; any other "owner/name" -> that hub id (same schema).
    split: "train", "test" or "all". Local files and hub datasets without a test split (Dolly, Alpaca) are split
    by `split_of` (sha256 of the id < test_fraction -> test). Hub datasets with a held-out split use it: GSM8K
    test, MedMCQA validation (its test split is unlabeled), SQuAD v2 validation; any other split name is passed
    to the hub as is. `limit` keeps the first `limit` examples (after splitting) and is recorded in `.skipped`;
    skip_empty_response skips (and counts) rows with a blank response instead of raising. Extra keyword
    arguments go to `datasets.load_dataset` (revision, cache_dir, ...).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    if source is not None and is_hub_id(os.fspath(source)) and not spec.hub_id:
        raise ValueError(f"task {name!r} has no hub dataset; pass a local file in its schema or None for the "
                         f"shipped {spec.mini_file}")
    if source is not None and is_hub_id(os.fspath(source)):
        examples = _load_hub(spec, os.fspath(source), split, test_fraction, skip_empty_response, **hub_kwargs)
    else:
        path = os.path.join(FILES_DIR, spec.mini_file) if source is None else os.fspath(source)
        examples = normalize_rows(spec, read_rows(path), path, skip_empty_response=skip_empty_response)
        examples = ExampleList(select_split(examples, split, test_fraction), source=f"{path} [{split}]",
                               skipped=examples.skipped)
    if limit is not None and len(examples) > limit:
        examples.skipped["limit"] = len(examples) - limit
        del examples[limit:]
    return examples


def _load_hub(spec: TaskSpec, source: str, split: str, test_fraction: float, skip_empty_response: bool,
              **kwargs: Any) -> ExampleList:
    import datasets

    hub_id = spec.hub_id if source == "hub" else source
    single_split = all(v is None for v in spec.hub_splits.values())  # Dolly, Alpaca: only "train" on the hub
    if split in spec.hub_splits:
        hub_splits = [spec.hub_splits[split] or "train"]
    elif split == "all":
        hub_splits = ["train"] if single_split else list(dict.fromkeys(v for v in spec.hub_splits.values() if v))
    else:
        hub_splits = [split]
    args = (hub_id, spec.hub_config) if spec.hub_config else (hub_id,)
    examples = ExampleList(source=f"{hub_id}[{'+'.join(hub_splits)}]")
    for hub_split in hub_splits:
        ds = datasets.load_dataset(*args, split=hub_split, **kwargs)
        where = f"{hub_id}[{hub_split}]"
        # rows are numbered per hub split, so ids of datasets without an own id carry the split name
        scope = "" if single_split else f"{hub_split}:"
        part = normalize_rows(spec, rows_from_records(ds, where, scope), where, skip_empty_response=skip_empty_response)
        examples.extend(part)
        for key, count in part.skipped.items():
            examples.skipped[key] = examples.skipped.get(key, 0) + count
    if single_split and split in ("train", "test"):
        examples = ExampleList(select_split(examples, split, test_fraction), source=f"{examples.source} [{split}]",
                               skipped=examples.skipped)
    return examples


def check_row(name: str, fields: Mapping[str, Any]) -> Example:
    """Normalize one raw row dict of task `name` (raises DataError if malformed)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name].normalize(Row(0, fields, "<row>"))


__all__ = ["TASKS", "TaskSpec", "load_task", "is_hub_id", "check_row", "gsm8k_gold", "DataError", "NO_ANSWER",
           "DOLLY_CATEGORIES", "OPTION_LETTERS", "format_medmcqa", "format_squad"]
