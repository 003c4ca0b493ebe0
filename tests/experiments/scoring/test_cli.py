"""`fastsel score` / `fastsel filter` end to end on the embedded SmolLM2 (the `make audit` command, smaller)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import need_embedded_model, need_module

need_module("datasets")

from fastsel.cli import main  # noqa: E402


@pytest.mark.slow
def test_score_report_and_filters_on_the_embedded_model(tmp_path: Path) -> None:
    need_embedded_model()
    rows = [json.loads(line) for line in
            Path("fastsel/experiments/data/files/format_mix.jsonl").read_text().splitlines()[:10]]
    data = tmp_path / "mix.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["score", "--data", str(data), "--out", str(out), "--id-column", "id", "--references", "anchors",
            "--max-length", "160", "--token-budget", "600", "--chunk-size", "4", "--report",
            "--filter", "gradshield", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 10 and summary["chunks"] >= 2
    assert "| highest |" in (out / "report.md").read_text()
    record = json.loads((out / "filter.json").read_text())
    assert record["rule"] == "gradshield" and record["kept"] + record["dropped"] == 10
    kept = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == record["kept_ids"] and set(kept[0]) == set(rows[0])  # the input's schema
    assert main(["filter", "--scores", str(out), "--rule", "moderate", "--ratio", "0.5"]) == 0
    moderate = json.loads((out / "filter.json").read_text())
    assert moderate["kept"] == min(5, moderate["candidates"])  # floor(0.5 * 10) of the loss band's rows
    with pytest.raises(ValueError, match="unknown filter 'safest'"):
        main(args[:-3] + ["--filter", "safest", "--no-progress"])
