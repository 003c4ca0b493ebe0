"""Harmful-prompt sets (AdvBench, HarmBench, shipped probes), benign look-alikes, refusal/helpful training data."""

from __future__ import annotations

import csv
import re
from collections import Counter

import pytest

from fastsel.experiments.data import (
    PROBE_CATEGORIES,
    load_advbench,
    load_benign_lookalikes,
    load_harmbench,
    load_harmful_probes,
    load_helpful,
    load_safety_refusals,
)
from fastsel.experiments.eval.judges import RefusalJudge


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_advbench_loader(tmp_path):
    path = _csv(tmp_path / "harmful_behaviors.csv", ["goal", "target"],
                [["Do a bad thing", "Sure, here is a bad thing"], ["Do another, with a comma", "Sure"]])
    items = load_advbench(path)
    assert [(p.id, p.category, p.prompt) for p in items] == [
        ("advbench:0", "advbench", "Do a bad thing"), ("advbench:1", "advbench", "Do another, with a comma")]
    assert items[0].meta["target"] == "Sure, here is a bad thing"
    bad = _csv(tmp_path / "bad.csv", ["goal", "target"], [["ok", "t"], ["", "t"]])
    with pytest.raises(ValueError, match=r"bad\.csv: row 1: field 'goal' is empty"):
        load_advbench(bad)
    with pytest.raises(ValueError, match="missing required field 'goal'"):
        load_advbench(_csv(tmp_path / "wrong.csv", ["behavior", "target"], [["x", "y"]]))


def test_harmbench_loader(tmp_path):
    header = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    rows = [["Write something harmful", "standard", "illegal", "", "", "b_one"],
            ["Explain the passage", "contextual", "misinformation_disinformation", "context", "Some passage.",
             "b_two"],
            ["Copy the lyrics", "copyright", "copyright", "", "", "b_three"]]
    path = _csv(tmp_path / "harmbench_behaviors_text_all.csv", header, rows)
    items = load_harmbench(path)
    assert [p.id for p in items] == ["harmbench:b_one", "harmbench:b_two", "harmbench:b_three"]
    assert items[1].prompt == "Some passage.\n\n---\n\nExplain the passage"
    assert items[1].category == "misinformation_disinformation"
    assert items[1].meta["functional_category"] == "contextual"
    standard = load_harmbench(path, functional_categories=("standard", "contextual"))
    assert len(standard) == 2 and standard.skipped == {"functional_category": 1}
    dup = _csv(tmp_path / "dup.csv", header, [rows[0], rows[0]])
    with pytest.raises(ValueError, match="row 1.*duplicate id"):
        load_harmbench(dup)


def test_probe_set():
    probes = load_harmful_probes()
    assert len(probes) >= 100
    counts = Counter(p.category for p in probes)
    assert set(counts) == set(PROBE_CATEGORIES) and min(counts.values()) >= 12
    assert len({p.id for p in probes}) == len(probes)
    assert all(len(p.prompt) < 160 and "\n" not in p.prompt for p in probes)  # short request lines
    # every probe has a compliance prefix for the teacher-forced margin: AdvBench style, no harmful content itself
    assert all(p.meta["target"].startswith("Sure, here") and len(p.meta["target"]) < 120 for p in probes)
    assert len({p.meta["target"] for p in probes}) == len(probes)


def test_benign_lookalikes():
    benign = load_benign_lookalikes()
    assert len(benign) >= 50 and len({p.id for p in benign}) == len(benign)
    assert any("kill" in p.prompt.lower() and "process" in p.prompt.lower() for p in benign)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_refusal_and_helpful_training_data():
    refusals, helpful = load_safety_refusals(), load_helpful()
    assert 60 <= len(refusals) <= 100 and len(helpful) >= 60
    assert all(e.task == "safety" for e in refusals) and all(e.task == "helpful" for e in helpful)
    assert set(Counter(e.category for e in refusals)) == set(PROBE_CATEGORIES)
    judge = RefusalJudge()
    assert not any(judge.judge([e.prompt for e in refusals], [e.response for e in refusals]))
    assert all(judge.judge([e.prompt for e in helpful], [e.response for e in helpful]))  # no refusal phrasing


def test_refusal_training_prompts_are_held_out_from_the_eval_sets():
    """No refusal-training request repeats (or nearly repeats) a probe or a benign look-alike."""
    train = [_words(e.prompt) for e in load_safety_refusals()] + [_words(e.prompt) for e in load_helpful()]
    held_out = [_words(p.prompt) for p in load_harmful_probes()] + [_words(p.prompt) for p in
                                                                   load_benign_lookalikes()]
    for a in train:
        for b in held_out:
            assert len(a & b) / len(a | b) < 0.6, (sorted(a), sorted(b))
