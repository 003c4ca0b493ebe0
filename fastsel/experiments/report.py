"""Report of a `fastsel continual` run: OUT/report.md (tables shaped like the paper's Tables 6-8 and 12) and
PNG plots in OUT/plots/ (matplotlib, Agg backend).

    python -c "from fastsel.experiments.report import write_report; write_report('runs/reproduce')"
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from fastsel.utils import atomic_write_text


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _stage_label(i: int, stage: str) -> str:
    return "base" if i == 0 else f"{i}: {stage}"


def asr_table(results: dict[str, Any]) -> str:
    """Table 6 shape: ASR (%) per method (rows) after each stage (columns)."""
    stages = results["stages"]
    rows = [[m] + [_fmt(v) for v in e["asr"]] for m, e in results["methods"].items()]
    return _table(["method"] + [_stage_label(i, s) for i, s in enumerate(stages)], rows)


def score_table(results: dict[str, Any]) -> str:
    """Table 7 shape: each task's score per method after each stage."""
    stages = results["stages"]
    rows = []
    for m, e in results["methods"].items():
        for t in results["tasks"]:
            rows.append([m, t] + [_fmt(v) for v in e["scores"][t]])
    return _table(["method", "task"] + [_stage_label(i, s) for i, s in enumerate(stages)], rows)


def continual_table(results: dict[str, Any]) -> str:
    """Table 8 shape: average performance, BWT, FM and max stage drop per method, with the final ASR."""
    rows = [[m, _fmt(e["avg_perf"]), _fmt(e["bwt"]), _fmt(e["fm"]), _fmt(e["max_drop"]), _fmt(e["asr"][-1])]
            for m, e in results["methods"].items()]
    return _table(["method", "avg perf", "BWT", "FM", "max drop", "final ASR (%)"], rows)


def load_norm_files(out: Path) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """{method/seed: [(stage, norms.json content)]} for every recorded norm pass."""
    found: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for path in sorted((out / "runs").glob("*/seed*/stage*/norms.json")):
        key = f"{path.parents[2].name}/{path.parents[1].name}"
        stage = int(path.parent.name.removeprefix("stage"))
        found.setdefault(key, []).append((stage, json.loads(path.read_text())))
    for items in found.values():
        items.sort(key=lambda x: x[0])
    return found


def audit_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 12 shape: the rows split into low / moderate / high gradient-norm thirds, with mean norm, loss,
    answer tokens, the share the Moderate-G rule keeps, and the category mix."""
    ordered = sorted(rows, key=lambda r: r["norm"])
    n = len(ordered)
    cuts = [0, n // 3, (2 * n) // 3, n]
    groups = []
    for name, lo, hi in zip(("low", "moderate", "high"), cuts[:-1], cuts[1:], strict=True):
        part = ordered[lo:hi]
        if not part:
            groups.append({"group": name, "n": 0})
            continue
        mix = Counter(r["category"] for r in part)
        groups.append({"group": name, "n": len(part),
                       "norm": sum(r["norm"] for r in part) / len(part),
                       "loss": sum(r["loss"] for r in part) / len(part),
                       "answer_tokens": sum(r["answer_tokens"] for r in part) / len(part),
                       "selected": 100.0 * sum(r.get("moderate_selected", False) for r in part) / len(part),
                       "categories": ", ".join(f"{c} {100 * k / len(part):.0f}%" for c, k in mix.most_common(4))})
    return groups


def audit_table(rows: list[dict[str, Any]]) -> str:
    """The audit groups as a markdown table."""
    body = [[g["group"], str(g["n"]), _fmt(g.get("norm"), 3), _fmt(g.get("loss"), 3),
             _fmt(g.get("answer_tokens")), _fmt(g.get("selected")), g.get("categories", "")]
            for g in audit_groups(rows)]
    return _table(["norm third", "n", "mean grad norm", "mean loss", "mean answer tokens",
                   "kept by Moderate-G (%)", "category mix"], body)


# ------------------------------------------------------------------------------------------------ plots

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_norm_histograms(norms: list[tuple[int, dict[str, Any]]], stages: list[str], path: Path) -> None:
    """One histogram of gradient norms per stage; the Moderate-G band (min..max kept norm) shaded."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(norms), figsize=(3.6 * len(norms), 3), squeeze=False)
    for ax, (stage, data) in zip(axes[0], norms, strict=True):
        values = [r["norm"] for r in data["rows"]]
        kept = [r["norm"] for r in data["rows"] if r.get("moderate_selected")]
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4c72b0")
        if kept:
            ax.axvspan(min(kept), max(kept), color="#55a868", alpha=0.3, label="Moderate-G band")
            ax.legend(fontsize=7)
        name = stages[stage] if stage < len(stages) else str(stage)
        ax.set_title(f"stage {stage}: {name}", fontsize=9)
        ax.set_xlabel("per-example gradient norm", fontsize=8)
    axes[0][0].set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lines(results: dict[str, Any], values: dict[str, list[float | None]], ylabel: str, title: str,
               path: Path) -> None:
    """One line per method across the stages."""
    plt = _plt()
    stages = results["stages"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, ys in values.items():
        ax.plot(range(len(stages)), [math.nan if y is None else y for y in ys], marker="o", label=method)
    ax.set_xticks(range(len(stages)), stages, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_score(entry: dict[str, Any], tasks: list[str], i: int) -> float | None:
    values = [entry["scores"][t][i] for t in tasks if entry["scores"][t][i] is not None]
    return sum(values) / len(values) if values else None


def write_report(out: str | os.PathLike[str]) -> Path:
    """Write OUT/report.md and OUT/plots/*.png from OUT/results.json and the recorded norm passes."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    stages, tasks = results["stages"], results["tasks"]
    methods = results["methods"]
    plot_lines(results, {m: e["asr"] for m, e in methods.items()}, "ASR (%)", "Attack success rate per stage",
               plots / "asr.png")
    plot_lines(results, {m: [_mean_score(e, tasks, i) for i in range(len(stages))] for m, e in methods.items()},
               "mean task score", "Mean task score per stage", plots / "task_score.png")
    for t in tasks:
        plot_lines(results, {m: e["scores"][t] for m, e in methods.items()}, f"{t} score", f"{t} per stage",
                   plots / f"score_{t}.png")
    parts = [f"# Continual safety report: {out}", "",
             f"Stages: {' -> '.join(stages)} (base = the starting model). Means over seeds "
             f"({', '.join(next(iter(methods.values()))['per_seed']) if methods else ''}).", "",
             "## ASR (%) per stage (Table 6 shape)", "", asr_table(results), "", "![ASR](plots/asr.png)", "",
             "## Task score per stage (Table 7 shape)", "", score_table(results), "",
             "![task score](plots/task_score.png)", "",
             "## Continual metrics (Table 8 shape)", "",
             "Over the task-score matrix after each training stage (base row excluded). BWT < 0 and FM > 0 "
             "mean forgetting.", "", continual_table(results), ""]
    norm_files = load_norm_files(out)
    if norm_files:
        key, items = next(iter(norm_files.items()))
        plot_norm_histograms(items, stages, plots / "grad_norms.png")
        config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        audit_stage = config.get("report", {}).get("audit_stage", items[0][0])
        chosen = next((d for s, d in items if s == audit_stage), items[0][1])
        parts += ["## Gradient norms per stage", "",
                  f"Norm pass of each stage's training rows under the stage's starting model ({key}); shaded: the "
                  "norm range the Moderate-G rule keeps when applied to the stage's rows as one pool.", "",
                  "![gradient norms](plots/grad_norms.png)", "",
                  f"## Sample audit, stage {audit_stage} ({chosen['task']}) (Table 12 shape)", "",
                  audit_table(chosen["rows"]), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path
