"""`fastsel continual` on a tiny random model: schema of results.json, report, resume, config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import fastsel.training.loop
from fastsel.experiments.continual import load_config, run_continual, validate_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _fail(*args, **kwargs):
    raise AssertionError("training ran although it should not have")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("continual")
    run_continual(TINY, out)
    return out


def test_results_schema(tiny_run: Path) -> None:
    cfg = load_config(TINY)
    results = json.loads((tiny_run / "results.json").read_text())
    tasks = cfg.task_names
    assert results["stages"] == ["base", *tasks]
    assert results["tasks"] == tasks
    assert list(results["methods"]) == cfg.methods
    for entry in results["methods"].values():
        assert len(entry["asr"]) == len(tasks) + 1
        assert all(0 <= a <= 100 for a in entry["asr"])
        assert set(entry["scores"]) == set(tasks)
        assert all(len(v) == len(tasks) + 1 for v in entry["scores"].values())
        for key in ("avg_perf", "bwt", "fm", "max_drop"):
            assert key in entry
        assert set(entry["per_seed"]) == {str(s) for s in cfg.seeds}
    # every method starts from the same (aligned) base model
    assert len({e["asr"][0] for e in results["methods"].values()}) == 1
    for i in range(1, len(tasks) + 1):
        stage = tiny_run / "runs" / "moderate" / "seed0" / f"stage{i}"
        assert (stage / "stage_result.json").exists() and (stage / "trainable.safetensors").exists()
        assert (stage / "norms.json").exists()
    assert (tiny_run / "aligned" / "model.safetensors").exists()


def test_report_and_plots(tiny_run: Path) -> None:
    report = (tiny_run / "report.md").read_text()
    for heading in ("ASR (%) per stage", "Task score per stage", "Continual metrics", "Sample audit"):
        assert heading in report
    for name in ("asr.png", "task_score.png", "grad_norms.png"):
        png = tiny_run / "plots" / name
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_without_training(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in (tiny_run / "runs").rglob("stage_result.json")}
    old = json.loads((tiny_run / "results.json").read_text())
    monkeypatch.setattr(fastsel.training.loop, "train", _fail)
    monkeypatch.setattr("fastsel.experiments.continual.Runner.evaluate", _fail)
    new = run_continual(TINY, tiny_run)
    assert {p: p.stat().st_mtime_ns for p in (tiny_run / "runs").rglob("stage_result.json")} == before
    assert new["methods"] == old["methods"]


def test_bad_config_one_error_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["tasks"].append({"name": "nonexistent_task"})
    raw["methods"].append("magic")
    raw["safety"]["judge"] = "oracle"
    raw["safety"]["prompts"] = "advbench:/no/such/file.csv"
    raw["training"]["lr"] = "fast"
    monkeypatch.setattr(fastsel.training.loop, "train", _fail)
    with pytest.raises(ValueError) as info:
        run_continual(raw, tmp_path / "out")
    message = str(info.value)
    for part in ("nonexistent_task", "magic", "oracle", "/no/such/file.csv", "training.lr"):
        assert part in message
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastsel.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-random\ntasks: [dolly]\nmethods: [full, nope]\n")
    assert main(["continual", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().out


def test_defaults_and_baselines_validate() -> None:
    cfg = validate_config({"model": "tiny-random", "methods": ["grad_clip", "kl", "ewc", "low"]})
    assert cfg.task_names == ["dolly", "gsm8k", "medmcqa", "squad_v2"]
    with pytest.raises(ValueError, match="llama_guard judge needs"):
        validate_config({"model": "tiny-random", "safety": {"judge": "llama_guard"}})


def test_lora_targets_matching_no_module_fail_before_alignment_trains(tmp_path: Path, monkeypatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from fastsel.cli import main
    from fastsel.experiments.continual import LoraTargetError

    raw = yaml.safe_load(TINY.read_text())
    raw["lora"]["targets"] = ["q_proj", "no_such_proj"]
    assert raw["alignment"]["enabled"]
    monkeypatch.setattr(fastsel.training.loop, "train", _fail)
    with pytest.raises(LoraTargetError, match=r"\['no_such_proj'\] match no module.*q_proj"):
        run_continual(raw, tmp_path / "out")
    assert not (tmp_path / "out" / "aligned").exists()
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["continual", "--config", str(config), "--out", str(tmp_path / "cli")]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: lora.targets ['no_such_proj']")


def test_out_holding_another_config_is_one_line_in_the_cli(tmp_path: Path, monkeypatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from fastsel.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**load_config(TINY).to_json(), "seeds": [7]}))
    monkeypatch.setattr(fastsel.training.loop, "train", _fail)
    assert main(["continual", "--config", str(TINY), "--out", str(out)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "different config" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_reference_methods_run_beside_moderate(tmp_path: Path) -> None:
    """gradshield and harmful_similarity in the pipeline: references from the shipped refusal data, recomputed
    every step; listed in results.json beside the other methods; bad anchor paths refused up front."""
    raw = yaml.safe_load(TINY.read_text())
    raw.update(tasks=[{"name": "dolly", "max_train": 8, "max_eval": 2}], methods=["gradshield", "harmful_similarity"],
               alignment={"enabled": False}, reference={"anchors": 4, "every": 1, "max_length": 64})
    results = run_continual(raw, tmp_path / "out", report=False)
    assert list(results["methods"]) == ["gradshield", "harmful_similarity"]
    for method in ("gradshield", "harmful_similarity"):
        log = [json.loads(line) for line in
               (tmp_path / "out" / "runs" / method / "seed0" / "stage1" / "train" / "log.jsonl").read_text().splitlines()]
        assert [r["reference_step"] for r in log] == [0, 1]
        assert all(r["score_mean"] is not None for r in log)
    with pytest.raises(ValueError, match="reference.compliance: file not found"):
        validate_config({**raw, "reference": {"compliance": "/no/such/anchors.jsonl"}})


def test_olora_trains_a_new_lora_per_task_and_keeps_the_earlier_ones_frozen(tmp_path: Path, monkeypatch) -> None:
    """O-LoRA in the pipeline: stage 2 trains a fresh LoRA with the penalty against stage 1's lora_A rows; the
    earlier adapter (merged into the weights) is the same before and after stage 2 trains."""
    import torch
    from safetensors.torch import load_file

    real_train = fastsel.training.loop.train
    seen: list[dict] = []

    def spy(model, rows, **opts):  # noqa: ANN001, ANN003, ANN202
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
        result = real_train(model, rows, **opts)
        after = {n: p.detach() for n, p in model.named_parameters()}
        seen.append({"opts": opts, "frozen_kept": all(torch.equal(v, after[n]) for n, v in frozen.items()),
                     "fresh": all(float(v.abs().max()) == 0.0 for v in lora_b.values())})
        return result

    monkeypatch.setattr(fastsel.training.loop, "train", spy)
    raw = yaml.safe_load(TINY.read_text())
    raw.update(methods=["olora"], alignment={"enabled": False},
               training={**raw["training"], "olora_coef": 0.5, "olora_l2": 0.01})
    results = run_continual(raw, tmp_path / "out", report=False)
    assert list(results["methods"]) == ["olora"]
    assert len(seen) == 2 and all(s["frozen_kept"] and s["fresh"] for s in seen)
    assert seen[0]["opts"]["olora_coef"] == 0.5 and "olora_previous" not in seen[0]["opts"]
    stage1 = load_file(str(tmp_path / "out" / "runs" / "olora" / "seed0" / "stage1" / "trainable.safetensors"))
    previous = seen[1]["opts"]["olora_previous"]
    assert previous and set(previous) == {n for n in stage1 if ".lora_A." in n}
    for name, rows in previous.items():
        torch.testing.assert_close(rows, stage1[name].float())
    # a rerun resumes: both stages finished, nothing trains, the results are the same
    monkeypatch.setattr(fastsel.training.loop, "train", _fail)
    again = run_continual(raw, tmp_path / "out", report=False)
    assert again["methods"]["olora"]["asr"] == results["methods"]["olora"]["asr"]
