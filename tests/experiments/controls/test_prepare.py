"""The controls inside `fastsel continual` on the tiny model: the matched sets are what the control methods train
on, the reversion rows cover the task, results.json and the report carry both, a rerun reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import fastsel.training.loop
from fastsel.experiments.config import validate_config
from fastsel.experiments.continual import run_continual
from fastsel.experiments.report import controls_markdown

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny.yaml"


def _config() -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw.update(tasks=[{"name": "gsm8k", "max_train": 24, "max_eval": 2}],
               methods=["matched_high", "matched_moderate", "matched_short", "matched_long"],
               controls={"matched": True, "max_pairs": 4, "max_smd": 1.5, "reversion": True, "layers": [-1],
                         "topk": 100})
    return raw


def test_controls_train_on_their_matched_sets_and_are_reported(tmp_path: Path, monkeypatch) -> None:
    real_train = fastsel.training.loop.train
    trained: dict[str, list[str]] = {}

    def spy(model, rows, **opts):  # noqa: ANN001, ANN003, ANN202
        trained[Path(opts["out_dir"]).parts[-4]] = [r["id"] for r in rows]
        return real_train(model, rows, **opts)

    monkeypatch.setattr(fastsel.training.loop, "train", spy)
    out = tmp_path / "out"
    results = run_continual(_config(), out)
    matching = json.loads((out / "controls" / "matching.json").read_text())
    norm, length = matching["designs"]["norm"], matching["designs"]["length"]
    assert trained["matched_high"] == [r for r in trained["matched_high"] if r in norm["treated"]]
    assert sorted(trained["matched_high"]) == sorted(norm["treated"])
    assert sorted(trained["matched_moderate"]) == sorted(norm["control"])
    assert sorted(trained["matched_short"]) == sorted(length["treated"])
    assert sorted(trained["matched_long"]) == sorted(length["control"])
    assert len(norm["treated"]) == len(norm["control"]) >= 2
    by_id = {r["id"]: r for r in matching["rows"]}
    high = [by_id[i]["norm"] for i in norm["treated"]]
    moderate = [by_id[i]["norm"] for i in norm["control"]]
    assert min(high) >= max(moderate)  # upper third against middle third
    reversion = json.loads((out / "controls" / "reversion.json").read_text())
    assert len(reversion["rows"]["id"]) == 24 and all(".layers.1." in w for w in reversion["weights"])
    controls = results["controls"]
    assert set(controls["designs"]) == {"norm", "length"}
    assert set(controls["reversion"]["correlations"]) == {"cosine ~ lora_norm", "cosine ~ norm",
                                                          "topk_cosine ~ lora_norm", "topk_cosine ~ norm"}
    assert [c["pair"] for c in results["contrasts"]] == [["matched_high", "matched_moderate"],
                                                         ["matched_short", "matched_long"]]
    report = (out / "report.md").read_text()
    for heading in ("Matched designs", "Reversion toward the pretrained weights"):
        assert heading in report
    assert (out / "plots" / "reversion.png").read_bytes()[:4] == b"\x89PNG"
    page = controls_markdown(results)  # docs/controls.md's generated block
    for part in ("SMD before", "matched_high - matched_moderate", "topk_cosine ~ lora_norm", "matched_long"):
        assert part in page
    monkeypatch.setattr(fastsel.training.loop, "train", lambda *a, **k: pytest.fail("trained again"))
    again = run_continual(_config(), out, report=False)
    assert again["controls"] == results["controls"]


def test_control_methods_need_the_matched_designs_and_one_task() -> None:
    raw = _config()
    with pytest.raises(ValueError, match=r"\['matched_high'\] train on the matched sets: set controls.matched"):
        validate_config({**raw, "methods": ["matched_high"], "controls": {"matched": False}})
    with pytest.raises(ValueError, match="exactly one task"):
        validate_config({**raw, "tasks": [{"name": "dolly"}, {"name": "gsm8k"}]})
    with pytest.raises(ValueError, match="controls.reversion: .*alignment.enabled"):
        validate_config({**raw, "alignment": {"enabled": False}})
