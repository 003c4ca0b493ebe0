"""What `fastsel score` reads: columns found or named, chat messages, ids; every bad input named before any model
work; the filtered copy written in the input's own schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import need_module

need_module("datasets")
from scoring_case import rows, write_jsonl  # noqa: E402

from fastsel.experiments.data.records import DataError  # noqa: E402
from fastsel.experiments.scoring import ScoreInput, load_input, write_filtered  # noqa: E402


def test_columns_found_or_named(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows(3))
    loaded = load_input(ScoreInput(data, id_column="uid"))  # question / answer found
    assert [e.id for e in loaded.examples] == ["ex00", "ex01", "ex02"] and loaded.examples[1].response == "Yes."
    assert loaded.columns == {"id": "uid", "messages": None, "prompt": "question", "response": "answer"}
    assert [e.id for e in load_input(ScoreInput(data)).examples] == ["0", "1", "2"]  # no id column: positions


def test_chat_messages(tmp_path: Path) -> None:
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    loaded = load_input(ScoreInput(write_jsonl(tmp_path / "c.jsonl", chats)))
    assert loaded.systems == ["Be brief.", None] and [e.response for e in loaded.examples] == ["4", "Hello!"]
    bad = chats + [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    with pytest.raises(DataError, match=r"row 2: messages must be \[system\?, user, assistant\]"):
        load_input(ScoreInput(write_jsonl(tmp_path / "bad.jsonl", bad)))


def test_bad_input_is_named(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(DataError, match="no prompt column 'prompt' .*columns: answer, question, uid"):
        load_input(ScoreInput(data, prompt_column="prompt", response_column="answer"))
    with pytest.raises(DataError, match="no id column 'id' .*columns: answer, question, uid"):
        load_input(ScoreInput(data, id_column="id"))
    with pytest.raises(DataError, match="no prompt/response columns found .*columns: text"):
        load_input(ScoreInput(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])))
    with pytest.raises(DataError, match="row 1 has no column 'answer'"):
        load_input(ScoreInput(write_jsonl(tmp_path / "m.jsonl", [rows(1)[0], {"uid": "b", "question": "q"}])))
    with pytest.raises(DataError, match="id 'a' of column 'uid' occurs more than once"):
        load_input(ScoreInput(write_jsonl(tmp_path / "u.jsonl", [{**r, "uid": "a"} for r in rows(2)]), id_column="uid"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: the dataset is empty"):
        load_input(ScoreInput(tmp_path / "empty.jsonl"))


def test_a_response_without_tokens_is_named_or_dropped(tmp_path: Path) -> None:
    from scoring_case import tiny_scorer

    from fastsel.experiments.scoring import ScoreSettings
    from fastsel.experiments.scoring.run import make_plan

    _, tok = tiny_scorer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% else %}"
                         "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{% endif %}")
    loaded = load_input(ScoreInput(write_jsonl(tmp_path / "d.jsonl", rows(2) + [{"uid": "e", "question": "q",
                                                                                  "answer": ""}]), id_column="uid"))
    with pytest.raises(ValueError, match="example 'e' \\(row 2\\).*drop_empty=True"):
        make_plan(loaded, tok, ScoreSettings())
    plan = make_plan(loaded, tok, ScoreSettings(drop_empty=True))
    assert plan.stats["dropped_empty"] == 1 and plan.index == [0, 1]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_the_filtered_copy_keeps_the_input_schema(tmp_path: Path, ext: str) -> None:
    import datasets

    items = rows(4)
    path = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        write_jsonl(path, items)
    elif ext == "json":
        path.write_text(json.dumps(items))
    else:
        getattr(datasets.Dataset.from_list(items), f"to_{ext}")(str(path))
    written = write_filtered(load_input(ScoreInput(path, id_column="uid")), [1, 3], str(tmp_path / "filtered"))
    assert written.endswith(f".{ext}")
    again = load_input(ScoreInput(written, id_column="uid"))
    assert [r for r in again.rows] == [items[1], items[3]]
