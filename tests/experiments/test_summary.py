"""The experiment's summary (results.json "strategies", CIs, ordering, margin curves), its report and README block,
and `configs/experiment.yaml` run end to end on a tiny random model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fastsel.experiments.config import load_config
from fastsel.experiments.continual import run_continual
from fastsel.experiments.report import (
    RENDERERS,
    experiment_markdown,
    ordering_text,
    safety_table,
    update_readme,
)
from fastsel.experiments.summary import HYPOTHESIS, safety_summary

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "configs" / "experiment.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def _stage(unsafe: list[int], labels: list[str], margin: list[float], kl: list[float], task: list[float],
           curve: list[tuple[int, float]], steps: int) -> dict:
    return {"stage": 1, "per_prompt": {"ids": [str(i) for i in range(len(unsafe))], "unsafe": unsafe,
                                       "label": labels, "margin": margin, "kl": kl},
            "lookalikes": {"ids": ["b0", "b1"], "label": ["refusal", "compliance"]},
            "task_per_row": {"t": {"ids": ["r0", "r1"], "score": task, "terse": [0.0, 100.0]}},
            "margin_curve": [{"step": s, "margin": m} for s, m in curve], "train": {"steps": steps}}


def _runs(shift: dict[str, float]) -> tuple[dict, dict]:
    """Four strategies x two seeds on three prompts; each strategy's margin is the base margin - its shift."""
    base = _stage([0, 0, 0], ["refusal"] * 3, [2.0, 1.0, 3.0], [0.0] * 3, [0.0, 100.0], [], 0)
    base["safety"] = {"refusal_margin": 2.0}
    per_run = {}
    for name, d in shift.items():
        per_run[name] = {}
        for seed in (0, 1):
            unsafe = [1, 0, 0] if d > 1 else [0, 0, 0]
            labels = ["compliance" if u else "refusal" for u in unsafe]
            stage = _stage(unsafe, labels, [2.0 - d - 0.01 * seed, 1.0 - d, 3.0 - d], [d / 10] * 3,
                           [100.0, 100.0 * seed], [(2, 2.0 - d / 2)], 4)
            per_run[name][seed] = [base, stage]
    return per_run, base


def test_summary_means_intervals_and_ordering() -> None:
    per_run, base = _runs({"high": 1.5, "random": 1.0, "moderate": 0.5, "low": 0.2})
    out = safety_summary(per_run, base)
    assert out["seeds"] == [0, 1] and out["n_prompts"] == 3
    high = out["strategies"]["high"]
    assert high["asr"]["mean"] == pytest.approx(100 / 3) and high["asr"]["per_seed"] == pytest.approx([100 / 3] * 2)
    assert high["refusal_margin"]["mean"] == pytest.approx(2.0 - 1.5 - 0.005 / 3)
    assert high["refusal_margin"]["ci95"][0] <= high["refusal_margin"]["mean"] <= high["refusal_margin"]["ci95"][1]
    assert high["task"]["per_seed"] == [50.0, 100.0] and high["over_refusal"]["mean"] == 50.0
    assert high["task_terse"]["mean"] == 50.0
    assert out["base"]["kl_harmful"] == {"mean": 0.0, "ci95": [0.0, 0.0], "per_seed": [0.0]}
    margin = out["ordering"]["refusal_margin"]
    assert margin["holds"] and margin["hypothesis"] == list(HYPOTHESIS) and margin["observed"] == list(HYPOTHESIS)
    assert [p["pair"] for p in margin["pairs"]] == [["high", "random"], ["random", "moderate"], ["moderate", "low"]]
    # the shift is the same on every prompt and seed: the paired differences are exact, the marginal CIs wide
    assert margin["pairs"][0]["diff_ci95"] == pytest.approx([-0.5, -0.5]) and margin["pairs"][0]["diff_excludes_zero"]
    assert not margin["all_cis_separate"]
    assert out["ordering"]["kl_harmful"]["holds"]
    assert out["curves"]["low"]["1"] == [{"step": 0, "stage": 0, "margin": 2.0},
                                         {"step": 2, "stage": 1, "margin": pytest.approx(1.9)}]
    text = ordering_text(out)
    assert "**refusal margin** (lower = more harm): the order high >= random >= moderate >= low holds" in text
    # the reverse order: does not hold, and the report says so
    flipped = safety_summary(*_runs({"high": 0.2, "random": 0.5, "moderate": 1.0, "low": 1.5}))
    assert not flipped["ordering"]["refusal_margin"]["holds"]
    assert flipped["ordering"]["refusal_margin"]["observed"] == ["low", "moderate", "random", "high"]
    assert "does not hold" in ordering_text(flipped)
    table = safety_table(out)
    assert table.splitlines()[2].startswith("| aligned base | 0.0 [0.0, 0.0]")
    assert "| high | 33.3 [" in table


def test_experiment_config_is_the_issue_design() -> None:
    cfg = load_config(EXPERIMENT)
    assert {"low", "moderate", "random", "high", "full", "gradshield"} <= set(cfg.methods)
    assert len(cfg.seeds) >= 3 and cfg.training.ratio == 0.2 and cfg.model == "smollm2"
    assert cfg.alignment.enabled and cfg.task_names == ["format_mix"]
    sa = cfg.safety
    assert sa.judge == "three_way" and sa.prompts == "probes" and sa.max_prompts >= 100
    assert sa.teacher_forced and sa.kl and sa.max_lookalikes > 0 and sa.margin_every > 0


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/experiment.yaml with its strategies and design, shrunk onto the tiny random model."""
    raw = yaml.safe_load(EXPERIMENT.read_text())
    raw.update(model="tiny-random", seeds=[0, 1], lora={"r": 4, "alpha": 8})
    raw["tasks"] = [{"name": "format_mix", "max_train": 8, "max_eval": 2, "max_new_tokens": 4}]
    raw["training"].update(batch_size=4, ratio=0.5, max_length=96, backend="torch")
    raw["safety"].update(max_prompts=3, max_lookalikes=2, max_new_tokens=4, margin_every=1)
    raw["alignment"]["enabled"] = False
    raw["eval"] = {"max_new_tokens": 4, "batch_size": 4}
    out = tmp_path_factory.mktemp("experiment")
    run_continual(raw, out)
    return out


def test_tiny_experiment_results_schema(tiny_experiment: Path) -> None:
    results = json.loads((tiny_experiment / "results.json").read_text())
    methods = yaml.safe_load(EXPERIMENT.read_text())["methods"]
    assert results["seeds"] == [0, 1] and results["n_prompts"] == 3
    assert list(results["strategies"]) == methods
    for entry in results["strategies"].values():
        for key in ("asr", "refusal_margin", "degenerate_rate", "kl_harmful", "task", "over_refusal", "task_loss"):
            assert set(entry[key]) == {"mean", "ci95", "per_seed"} and len(entry[key]["per_seed"]) == 2
            lo, hi = entry[key]["ci95"]
            assert lo <= entry[key]["mean"] <= hi
    for name in methods:
        for seed in ("0", "1"):  # base point, one point per step (batch 4, 8 rows: 2 steps)
            assert [p["step"] for p in results["curves"][name][seed]] == [0, 1, 2]
            measured = (tiny_experiment / "runs" / name / f"seed{seed}" / "stage1" / "margin_curve.jsonl").read_text()
            assert [json.loads(line)["step"] for line in measured.splitlines()] == [1]  # step 2: the final evaluation
    report = (tiny_experiment / "report.md").read_text()
    for heading in ("Safety after the last stage (Table 2 shape)", "Ordering high >= random >= moderate >= low",
                    "Refusal margin vs training step", "Sample audit", "terse answers (%)"):
        assert heading in report
    assert (tiny_experiment / "plots" / "refusal_margin.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_block(tiny_experiment: Path, tmp_path: Path) -> None:
    """update_readme fills the pending marker, then replaces its own block; the committed pages show exactly what
    the renderers draw from the committed results (the full block in docs/continual.md, the safety table in the
    README)."""
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- experiment results: pending -->\nnot measured yet\n<!-- end pending -->\noutro\n")
    results = tiny_experiment / "results.json"
    update_readme(readme, results)
    update_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- generated by") and text.endswith("<!-- end generated -->\noutro\n")
    assert text.count("<!-- generated by") == 1
    assert experiment_markdown(json.loads(results.read_text())) in text and "not measured yet" not in text
    blocks = []
    for page in (ROOT / "README.md", ROOT / "docs" / "continual.md", ROOT / "docs" / "controls.md"):
        found = re.findall(r"<!-- generated by fastsel\.experiments\.report\.(\w+)\((.+?)\); do not edit by "
                           r"hand -->\n(.*?)<!-- end generated -->", page.read_text(), flags=re.S)
        blocks += [(page.parent / path, renderer, body) for renderer, path, body in found]
    assert {renderer for _, renderer, _ in blocks} == {"experiment_markdown", "readme_safety_table", "reproduce_table",
                                                       "controls_markdown"}
    for path, renderer, body in blocks:
        assert body.strip() == RENDERERS[renderer](json.loads(path.read_text())).strip(), (path, renderer)
