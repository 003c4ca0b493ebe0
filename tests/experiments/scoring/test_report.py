"""The audit report: thirds by norm, the Table-12 columns against a hand computation, the plots and the top rows."""
from __future__ import annotations

from pathlib import Path

from needs import need_module

datasets = need_module("datasets")
need_module("matplotlib")

from fastsel.experiments.data.examples import Example  # noqa: E402
from fastsel.experiments.scoring.report import TERSE_TOKENS, audit_rows, norm_thirds, write_report  # noqa: E402


def table():
    norms = [0.5, 3.0, 1.0, 2.0, 0.1, 5.0]
    return datasets.Dataset.from_dict({
        "index": list(range(6)), "id": [f"e{i}" for i in range(6)], "grad_norm": norms,
        "loss": [1.0, 4.0, 2.0, 3.0, 0.5, 6.0], "response_tokens": [40, 3, 30, 5, 50, TERSE_TOKENS],
        "prompt_tokens": [10] * 6})


def test_thirds_and_audit_against_a_hand_computation() -> None:
    assert norm_thirds([0.5, 3.0, 1.0, 2.0, 0.1, 5.0]) == [[4, 0], [2, 3], [1, 5]]
    low, mid, high = audit_rows(table())
    assert (low["response_tokens"], low["loss"], low["grad_norm"], low["terse_percent"]) == (45.0, 0.75, 0.3, 0.0)
    assert (mid["response_tokens"], mid["terse_percent"]) == (17.5, 50.0)
    assert (high["response_tokens"], high["loss"], high["terse_percent"]) == ((3 + TERSE_TOKENS) / 2, 5.0, 100.0)


def test_report_files(tmp_path: Path) -> None:
    examples = [Example(f"e{i}", "t", f"prompt {i} | pipe", f"answer {i}", "t") for i in range(6)]
    path = write_report(table(), examples, tmp_path)
    text = path.read_text()
    assert "| highest | 2 | " in text and "prompt 5 \\| pipe" in text
    assert text.index("| 1 | e5 |") < text.index("| 2 | e1 |")  # highest norm first
    for png in ("norms_hist.png", "loss_vs_norm.png", "length_vs_norm.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
