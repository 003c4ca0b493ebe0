"""benchmarks/gpu_session.sh --dry-run: the GPU session's every step on the CPU with tiny shapes (the CI check that
the one command the GPU machine runs still works end to end), and its global deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ["setup", "selftest", "tests", "headline-fp32", "headline-bf16", "7b-layers", "packed", "kernels"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash + coreutils timeout")


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=600)


def _steps(out: Path) -> dict[str, list[str]]:
    return {line.split("\t")[0]: line.split("\t")[1:] for line in (out / "steps.tsv").read_text().splitlines()}


def test_dry_run_runs_every_step_and_writes_the_results(tmp_path: Path) -> None:
    result = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    steps = _steps(tmp_path)
    assert list(steps) == STEPS and all(v[0] == "0" for v in steps.values()), steps
    selftest = json.loads((tmp_path / "selftest.json").read_text())["triton_selftest"]
    assert selftest and all(v.startswith("passed") for v in selftest.values())
    assert sorted(p.name for p in tmp_path.glob("tests-*.xml")) == ["tests-kernels.xml", "tests-selftest.xml"]
    assert 'failures="0"' in (tmp_path / "tests-kernels.xml").read_text()
    (headline,) = (tmp_path / "headline-fp32").glob("*.json")
    report = json.loads(headline.read_text())
    assert report["ratios"]["headlines"][0]["norm_pass_over_plain"] > 0 and report["training"]["steps"] == 1
    assert {c["dtype"] for c in report["cases"]} == {"float32"}
    assert report["cases"][0]["skipped"]["vmap"] == "not selected (--methods)"
    (bf16,) = (tmp_path / "headline-bf16").glob("*.json")
    assert {c["dtype"] for c in json.loads(bf16.read_text())["cases"]} == {"bfloat16"}
    assert list((tmp_path / "7b-layers").glob("*.json")) and list((tmp_path / "kernels").glob("*.json"))
    (packed,) = (tmp_path / "packed").glob("*.json")
    cases = json.loads(packed.read_text())["cases"]
    assert cases and all(case["data"] == "instruct" for case in cases)
    assert all(case["methods"]["plain_packed"] and case["methods"]["fastsel_torch_packed"] for case in cases)


def test_the_deadline_caps_the_steps_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    """TOTAL_S=10: setup fits, the steps after it get at most the time left, the last ones none (skipped)."""
    result = _run(tmp_path, TOTAL_S="10")
    assert result.returncode == 1
    steps = _steps(tmp_path)
    assert list(steps) == STEPS and steps["setup"][0] == "0", steps
    assert all(int(budget) <= 10 for _, _, budget in steps.values())  # x5 in a dry run, capped by TOTAL_S
    assert steps["kernels"][0] == "skipped"
