"""Task loaders: every dataset in its own schema from JSON / JSONL / CSV / Parquet, malformed rows, the hub
path (datasets.load_dataset monkeypatched), the shipped mini files and the split rule."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastsel.experiments.data as fd
from fastsel.experiments.data import DataError, format_mix, load_task
from fastsel.experiments.data.examples import hash_fraction, split_of
from fastsel.experiments.data.tasks import DOLLY_CATEGORIES, NO_ANSWER, TASKS, gsm8k_gold

DOLLY = [
    {"instruction": "What is 2+2?", "context": "", "response": "4", "category": "open_qa"},
    {"instruction": "Summarize.", "context": "Cats sleep a lot.", "response": "Cats sleep much.",
     "category": "summarization"},
]
GSM8K = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
         {"question": "A debt of 1,000 halves. What is left?", "answer": "1000 / 2 = 500\n#### 500"}]
MEDMCQA = [{"id": "q-1", "question": "Antidote for opioids?", "opa": "Naloxone", "opb": "Atropine",
            "opc": "Flumazenil", "opd": "Protamine", "cop": 0, "choice_type": "single", "exp": None,
            "subject_name": "Pharmacology", "topic_name": None},
           {"id": "q-2", "question": "Longest bone?", "opa": "Tibia", "opb": "Femur", "opc": "Ulna",
            "opd": "Radius", "cop": 1, "choice_type": "single", "exp": "Femur.", "subject_name": "Anatomy",
            "topic_name": "Bones"}]
SQUAD = [{"id": "a1", "title": "T", "context": "Paris is the capital of France.", "question": "Capital?",
          "answers": {"text": ["Paris"], "answer_start": [0]}},
         {"id": "a2", "title": "T", "context": "Paris is the capital of France.", "question": "Population?",
          "answers": {"text": [], "answer_start": []}}]
ALPACA = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
ROWS = {"dolly": DOLLY, "gsm8k": GSM8K, "medmcqa": MEDMCQA, "squad_v2": SQUAD, "alpaca": ALPACA}


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else v)
                            for k, v in r.items()})
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("task", sorted(ROWS))
def test_each_loader_each_format(tmp_path, task, fmt):
    path = write(tmp_path / f"{task}.{fmt}", ROWS[task], fmt)
    exs = load_task(task, path, split="all")
    assert len(exs) == 2 and all(e.task == task for e in exs)
    assert all(e.prompt.strip() and e.response.strip() for e in exs)
    first = exs[0]
    if task == "dolly":
        assert [e.id for e in exs] == ["dolly:0", "dolly:1"]
        assert first.category == "open_qa" and first.prompt == "What is 2+2?" and first.response == "4"
        assert exs[1].prompt == "Summarize.\n\nContext:\nCats sleep a lot."
    elif task == "gsm8k":
        assert first.meta["gold"] == "7" and exs[1].meta["gold"] == "500" and first.category == "gsm8k"
    elif task == "medmcqa":
        assert [e.id for e in exs] == ["medmcqa:q-1", "medmcqa:q-2"]
        assert first.meta["gold"] == "A" and exs[1].meta["gold"] == "B"
        assert "A. Naloxone" in first.prompt and "D. Protamine" in first.prompt
        assert exs[1].response == "Answer: B. Femur" and exs[1].meta["subject"] == "Anatomy"
    elif task == "squad_v2":
        assert first.id == "squad_v2:a1" and first.response == "Paris" and first.meta["answerable"]
        assert exs[1].meta["answers"] == [] and not exs[1].meta["answerable"] and exs[1].response == NO_ANSWER
    else:
        assert first.prompt == "Add.\n\n2 and 3" and first.response == "5" and exs[1].prompt == "Say hi."


BAD = [
    ("dolly", {"instruction": "x", "context": "", "category": "open_qa"}, "missing required field 'response'"),
    ("dolly", {"instruction": 3, "context": "", "response": "r", "category": "open_qa"}, "must be a string"),
    ("dolly", {"instruction": "  ", "context": "", "response": "r", "category": "open_qa"}, "is empty"),
    ("gsm8k", {"question": "q", "answer": "the answer is 5"}, "#### <number>"),
    ("medmcqa", {**MEDMCQA[0], "cop": 4}, "must be 0-3"),
    ("medmcqa", {**MEDMCQA[0], "cop": -1}, "must be 0-3"),
    ("medmcqa", {**MEDMCQA[0], "cop": "b"}, "must be an integer"),
    ("medmcqa", {**MEDMCQA[0], "cop": True}, "must be an integer"),
    ("squad_v2", {**SQUAD[0], "answers": {"text": ["Paris"], "answer_start": []}}, "answer_start"),
    ("squad_v2", {**SQUAD[0], "answers": ["Paris"]}, "must be {'text'"),
    ("alpaca", {"instruction": "i", "input": "", "output": 5}, "must be a string"),
]


@pytest.mark.parametrize("task,bad,message", BAD)
def test_malformed_row_names_file_and_row(tmp_path, task, bad, message):
    rows = [ROWS[task][0], ROWS[task][1], bad]
    if "id" in bad:
        bad["id"] = "bad-id"
    path = write(tmp_path / "data.jsonl", rows, "jsonl")
    with pytest.raises(ValueError, match=message) as err:
        load_task(task, path, split="all")
    assert str(path) in str(err.value) and "row 2 (line 3)" in str(err.value)
    assert isinstance(err.value, DataError)


def test_malformed_csv_and_parquet_rows_name_row(tmp_path):
    rows = [dict(r) for r in MEDMCQA] + [{**MEDMCQA[0], "id": "q-3", "cop": 7}]
    with pytest.raises(ValueError, match=r"medmcqa\.csv: row 2: .*0-3"):
        load_task("medmcqa", write(tmp_path / "medmcqa.csv", rows, "csv"), split="all")
    with pytest.raises(ValueError, match=r"medmcqa\.parquet: row 2: .*0-3"):
        load_task("medmcqa", write(tmp_path / "medmcqa.parquet", rows, "parquet"), split="all")


def test_unreadable_files(tmp_path):
    bad_json = tmp_path / "x.jsonl"
    bad_json.write_text(json.dumps(DOLLY[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"x\.jsonl: row 1 \(line 3\): invalid JSON"):
        load_task("dolly", bad_json, split="all")
    not_obj = tmp_path / "y.json"
    not_obj.write_text(json.dumps([DOLLY[0], [1, 2]]))
    with pytest.raises(ValueError, match=r"y\.json: row 1: expected a JSON object"):
        load_task("dolly", not_obj, split="all")
    extra = tmp_path / "z.csv"
    extra.write_text("instruction,context,response,category\na,,b,open_qa\na,,b,open_qa,EXTRA\n")
    with pytest.raises(ValueError, match=r"z\.csv: unreadable CSV file: .*line 3"):
        load_task("dolly", extra, split="all")
    with pytest.raises(ValueError, match="unknown file type"):
        load_task("dolly", write(tmp_path / "d.txt", DOLLY, "jsonl"), split="all")
    with pytest.raises(FileNotFoundError):
        load_task("dolly", tmp_path / "missing.jsonl")


def test_duplicate_ids_are_an_error(tmp_path):
    path = write(tmp_path / "s.jsonl", [SQUAD[0], SQUAD[0]], "jsonl")
    with pytest.raises(ValueError, match="row 1.*duplicate id 'squad_v2:a1'"):
        load_task("squad_v2", path, split="all")


def test_official_squad_json_is_flattened(tmp_path):
    official = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Paris is nice.", "qas": [
        {"id": "q1", "question": "What is nice?", "answers": [{"text": "Paris", "answer_start": 0}],
         "is_impossible": False},
        {"id": "q2", "question": "Who?", "answers": [], "plausible_answers": [{"text": "Paris", "answer_start": 0}],
         "is_impossible": True}]}]}]}
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(official))
    exs = load_task("squad_v2", path, split="all")
    assert [e.id for e in exs] == ["squad_v2:q1", "squad_v2:q2"]
    assert exs[0].meta["answers"] == ["Paris"] and exs[1].meta["answers"] == []


def test_registry_and_unknown_task():
    assert set(fd.TASK_NAMES) == set(TASKS)
    with pytest.raises(ValueError, match="known tasks: alpaca, dolly, format_mix, gsm8k, medmcqa, squad_v2"):
        load_task("mmlu")
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("dolly", split="dev")


def test_gsm8k_gold():
    assert gsm8k_gold("x\n#### 1,234") == "1234"
    assert gsm8k_gold("#### -7") == "-7" and gsm8k_gold("#### 2.50") == "2.5"
    assert gsm8k_gold("no marker 5") is None


# ---- hub ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []
    tables = {"openai/gsm8k": {"train": GSM8K, "test": GSM8K[:1]}, "databricks/databricks-dolly-15k":
              {"train": DOLLY * 20}, "openlifescienceai/medmcqa": {"train": MEDMCQA, "validation": MEDMCQA[1:]},
              "rajpurkar/squad_v2": {"train": SQUAD, "validation": SQUAD[1:]}, "tatsu-lab/alpaca":
              {"train": ALPACA}, "me/my-dolly": {"train": DOLLY}}

    def load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(tables[path][split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_loading_uses_datasets(fake_hub):
    test = load_task("gsm8k", "hub", split="test")
    assert fake_hub[-1][:3] == ("openai/gsm8k", "main", "test")
    assert [e.id for e in test] == ["gsm8k:test:0"] and test[0].meta["gold"] == "7"
    both = load_task("gsm8k", "hub", split="all")
    assert [e.id for e in both] == ["gsm8k:train:0", "gsm8k:train:1", "gsm8k:test:0"]
    assert load_task("medmcqa", "hub", split="test")[0].id == "medmcqa:q-2"
    assert fake_hub[-1][:3] == ("openlifescienceai/medmcqa", None, "validation")
    assert load_task("squad_v2", "hub", split="test")[0].meta["answers"] == []
    assert load_task("alpaca", "hub", split="all")[0].id == "alpaca:0"
    assert load_task("dolly", "me/my-dolly", split="all", revision="abc")[0].id == "dolly:0"
    assert fake_hub[-1] == ("me/my-dolly", None, "train", {"revision": "abc"})


def test_hub_without_test_split_is_hash_split(fake_hub):
    train = load_task("dolly", "hub", split="train")
    test = load_task("dolly", "hub", split="test")
    assert {c[2] for c in fake_hub} == {"train"}
    assert len(train) + len(test) == 40 and test and train
    assert {e.id for e in train}.isdisjoint({e.id for e in test})
    assert all(split_of(e.id) == "test" for e in test)
    limited = load_task("dolly", "hub", split="train", limit=5)
    assert len(limited) == 5 and limited.skipped == {"limit": len(train) - 5}


# ---- shipped files and the split rule -----------------------------------------------------------------------

SHIPPED = {"dolly": 80, "gsm8k": 60, "medmcqa": 60, "squad_v2": 52, "alpaca": 60, "format_mix": 320}


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_mini_files(task):
    everything = load_task(task, split="all")
    train, test = load_task(task), load_task(task, split="test")
    assert len(everything) == SHIPPED[task]
    assert len(train) + len(test) == len(everything) and len(test) >= 5 and len(train) > len(test)
    assert {e.id for e in train}.isdisjoint({e.id for e in test})
    assert [e.id for e in load_task(task, split="test")] == [e.id for e in test]  # deterministic


def test_shipped_mini_contents():
    dolly = load_task("dolly", split="all")
    counts = Counter(e.category for e in dolly)
    assert set(counts) == set(DOLLY_CATEGORIES) and min(counts.values()) >= 8
    lengths = sorted(len(e.response.split()) for e in dolly)
    assert lengths[10] <= 3 and lengths[-10] >= 40  # terse and long answers
    assert sum(bool(e.meta["context"]) for e in dolly) >= 25
    gsm = load_task("gsm8k", split="all")
    assert all(e.response.rstrip().endswith(f"#### {e.meta['gold']}") for e in gsm)
    med = load_task("medmcqa", split="all")
    assert Counter(e.meta["gold"] for e in med) == {"A": 15, "B": 15, "C": 15, "D": 15}
    squad = load_task("squad_v2", split="all")
    unanswerable = sum(not e.meta["answerable"] for e in squad)
    assert 0.25 <= unanswerable / len(squad) <= 0.4
    assert len({e.meta["title"] for e in squad}) == 12


def test_gsm8k_mini_arithmetic_is_correct():
    """Every calculator annotation <<expr=value>> in the shipped solutions evaluates to its value."""
    import re
    from fractions import Fraction

    def ev(expr):
        return eval(re.sub(r"(\d+(?:\.\d+)?)", r"Fraction('\1')", expr), {"Fraction": Fraction})

    n = 0
    for e in load_task("gsm8k", split="all"):
        for expr, value in re.findall(r"<<([^=>]+)=([^>]+)>>", e.response):
            assert ev(expr) == Fraction(value), (e.id, expr, value)
            n += 1
    assert n > 100


def test_squad_mini_spans_match_context(tmp_path):
    from fastsel.experiments.data.records import read_rows
    from fastsel.experiments.data.tasks import FILES_DIR

    for row in read_rows(f"{FILES_DIR}/squad_v2_mini.jsonl"):
        answers = row.fields["answers"]
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            assert row.fields["context"][start:start + len(text)] == text


def test_split_rule_is_a_hash_of_the_id():
    assert split_of("dolly:0") == split_of("dolly:0")
    assert 0 <= hash_fraction("x") < 1
    ids = [f"t:{i}" for i in range(4000)]
    share = sum(split_of(i) == "test" for i in ids) / len(ids)
    assert 0.22 < share < 0.28
    assert all(split_of(i, 0.0) == "train" for i in ids[:50])
    assert all(split_of(i, 1.0) == "test" for i in ids[:50])


def test_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, fastsel.experiments.data, fastsel.experiments.eval; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_empty_responses_raise_or_are_skipped_and_counted(tmp_path, monkeypatch):
    rows = [ALPACA[0], {"instruction": "Do nothing.", "input": "", "output": ""}, ALPACA[1]]
    path = write(tmp_path / "alpaca.json", rows, "json")
    with pytest.raises(ValueError, match=r"row 1: field 'output' is empty.*skip_empty_response=True"):
        load_task("alpaca", path, split="all")
    kept = load_task("alpaca", path, split="all", skip_empty_response=True)
    assert [e.id for e in kept] == ["alpaca:0", "alpaca:2"] and kept.skipped == {"empty_response": 1}
    assert "skipped: empty_response: 1" in kept.report()
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: datasets.Dataset.from_list(rows))
    hub = load_task("alpaca", "hub", split="all", skip_empty_response=True)
    assert len(hub) == 2 and hub.skipped == {"empty_response": 1}


def test_format_mix_file_is_what_the_generator_writes():
    """The shipped mix is exactly `build_rows()`'s output (provenance: written by fastsel, regenerable)."""
    with open(format_mix.shipped_path()) as f:
        assert f.read() == format_mix.render_jsonl(format_mix.build_rows())


def test_gsm8k_long_file_is_what_the_generator_writes_and_its_arithmetic_holds():
    """GSM8K-length problems: the shipped file is `build_rows()`'s output, every `<<expr=value>>` annotation
    computes, and the final answer is the last step's value; loadable as the gsm8k task from its path."""
    import re

    from fastsel.experiments.data import gsm8k_long

    with open(gsm8k_long.shipped_path()) as f:
        assert f.read() == format_mix.render_jsonl(gsm8k_long.build_rows())
    examples = load_task("gsm8k", gsm8k_long.shipped_path(), split="all")
    assert len(examples) == gsm8k_long.ROWS
    for e in examples:
        values = []
        for expr, value in re.findall(r"<<([^=]+)=(-?\d+)>>", e.response):
            assert eval(expr, {"__builtins__": {}}) == int(value), (e.id, expr)  # noqa: S307 - digits and + - * /
            values.append(value)
        assert values and e.meta["gold"] == values[-1], e.id


def test_format_mix_rows():
    """Every kind in both formats; a terse answer is the gold value itself, a long one contains it."""
    mix = load_task("format_mix", split="all")
    assert Counter(e.category for e in mix) == {"math": 80, "classification": 80, "extraction": 80,
                                                "closed_qa": 80}
    assert len({e.prompt for e in mix}) == len(mix)
    for kind in ("math", "classification", "extraction", "closed_qa"):
        formats = Counter(e.meta["format"] for e in mix if e.category == kind)
        assert formats["terse"] >= 15 and formats["long"] >= 40, (kind, formats)
    for e in mix:
        if e.meta["format"] == "terse":
            assert e.response == e.meta["gold"]
        else:
            assert e.meta["gold"] in e.response and len(e.response.split()) >= len(e.meta["gold"].split()) + 3
        assert (e.category == "classification") == bool(e.meta["labels"])
    with pytest.raises(ValueError, match="no hub dataset"):
        load_task("format_mix", "hub")
