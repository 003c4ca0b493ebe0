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
    """Table 12 shape: the rows split into the lowest / middle / highest gradient-norm thirds, with mean norm, loss,
    answer tokens, the share the Moderate-G rule keeps, and the category mix."""
    ordered = sorted(rows, key=lambda r: r["norm"])
    n = len(ordered)
    cuts = [0, n // 3, (2 * n) // 3, n]
    groups = []
    for name, lo, hi in zip(("lowest third", "middle third", "highest third"), cuts[:-1], cuts[1:], strict=True):
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
                       "terse": (100.0 * sum(r.get("format") == "terse" for r in part) / len(part)
                                 if any(r.get("format") for r in part) else None),
                       "categories": ", ".join(f"{c} {100 * k / len(part):.0f}%" for c, k in mix.most_common(4))})
    return groups


def audit_table(rows: list[dict[str, Any]]) -> str:
    """The audit groups as a markdown table (with the share of terse answers when the rows have a format)."""
    groups = audit_groups(rows)
    terse = any(g.get("terse") is not None for g in groups)
    body = [[g["group"], str(g["n"]), _fmt(g.get("norm"), 3), _fmt(g.get("loss"), 3),
             _fmt(g.get("answer_tokens")), *([_fmt(g.get("terse"))] if terse else []), _fmt(g.get("selected")),
             g.get("categories", "")]
            for g in groups]
    return _table(["norm third", "n", "mean grad norm", "mean loss", "mean answer tokens",
                   *(["terse answers (%)"] if terse else []), "kept by Moderate-G (%)", "category mix"], body)


# ------------------------------------------------------------------------------------------------ safety summary

#: results.json "strategies" metrics in the Table 2 columns: (key, header, decimals).
SAFETY_COLUMNS = (("asr", "ASR (%)", 1), ("refusal_rate", "refusals (%)", 1), ("degenerate_rate", "degenerate (%)", 1),
                  ("refusal_margin", "refusal margin (nats/token)", 3), ("kl_harmful", "KL to aligned (nats)", 4),
                  ("over_refusal", "over-refusal (%)", 1), ("task", "task accuracy (%)", 1),
                  ("task_terse", "terse answers (%)", 1), ("task_loss", "held-out loss (nats/token)", 3))
METRIC_NAMES = {"asr": "ASR", "refusal_margin": "refusal margin", "kl_harmful": "KL to the aligned model"}


def _ci_cell(entry: dict[str, Any] | None, digits: int) -> str:
    if not entry:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def safety_table(results: dict[str, Any]) -> str:
    """Table 2 shape: the aligned base and every strategy after fine-tuning, mean [95% CI] per metric."""
    rows_in = [("aligned base", results.get("base") or {})] + list(results.get("strategies", {}).items())
    columns = [c for c in SAFETY_COLUMNS if any(c[0] in entry for _, entry in rows_in)]
    body = [[name] + [_ci_cell(entry.get(key), digits) for key, _, digits in columns] for name, entry in rows_in]
    return _table(["strategy"] + [header for _, header, _ in columns], body)


def ordering_text(results: dict[str, Any]) -> str:
    """Plain sentences: does high >= random >= moderate >= low (in harm) hold, and do the intervals separate."""
    lines = []
    for metric, o in (results.get("ordering") or {}).items():
        more = "higher" if metric != "refusal_margin" else "lower"
        verdict = "holds" if o["holds"] else "does not hold"
        lines.append(f"- **{METRIC_NAMES.get(metric, metric)}** ({more} = more harm): the order "
                     f"{' >= '.join(o['hypothesis'])} {verdict} by the means (observed, most harmful first: "
                     f"{', '.join(o['observed'])}); the 95% intervals of adjacent strategies "
                     f"{'all separate' if o['all_cis_separate'] else 'do not all separate'}.")
        for p in o["pairs"]:
            a, b = p["pair"]
            lo, hi = p["diff_ci95"]
            lines.append(f"  - {a} - {b}: {p['diff']:+.4g} [{lo:+.4g}, {hi:+.4g}] (paired over seeds x prompts; "
                         f"{'excludes' if p['diff_excludes_zero'] else 'includes'} 0; intervals "
                         f"{'separate' if p['cis_separate'] else 'overlap'})")
    return "\n".join(lines) if lines else "(fewer than two of high, random, moderate, low were run)"


def experiment_markdown(results: dict[str, Any]) -> str:
    """The README's experiment block: the Table 2 shape table and the ordering check, from results.json."""
    seeds = results.get("seeds", [])
    return "\n".join([
        f"Seeds {', '.join(map(str, seeds))}; {results.get('n_prompts', 0)} harmful prompts; mean [95% bootstrap "
        "CI over seeds x prompts, or seeds x held-out rows for the task]. Wall time: "
        f"{_fmt((results.get('wall_s') or 0) / 60)} min.", "", safety_table(results), "",
        "Ordering high >= random >= moderate >= low (in harm):", "", ordering_text(results)])


def readme_safety_table(results: dict[str, Any]) -> str:
    """The README's safety table: `safety_table` of the last stage, with the run's seeds, prompts and wall time."""
    seeds = results.get("seeds", [])
    return "\n".join([
        f"Seeds {', '.join(map(str, seeds))}; {results.get('n_prompts', 0)} harmful prompts; mean [95% bootstrap "
        f"CI]; {_fmt((results.get('wall_s') or 0) / 60)} min on this CPU.", "", safety_table(results)])


def reproduce_table(results: dict[str, Any]) -> str:
    """`make reproduce`'s table: ASR (%) after each stage with the average task score, BWT and FM per method."""
    rows = [[m] + [_fmt(v) for v in e["asr"]] + [_fmt(e["avg_perf"]), _fmt(e["bwt"]), _fmt(e["fm"])]
            for m, e in results["methods"].items()]
    return _table(["ASR (%) after stage", *results["stages"], "avg task score", "BWT", "FM"], rows)


def controls_markdown(results: dict[str, Any]) -> str:
    """docs/controls.md's results: the designs' balance, the paired contrasts and the reversion correlations."""
    controls = results.get("controls") or {}
    parts = [f"Seeds {', '.join(map(str, results.get('seeds', [])))}; {results.get('n_prompts', 0)} harmful "
             f"prompts. Wall time: {_fmt((results.get('wall_s') or 0) / 60)} min.", ""]
    if "designs" in controls:
        parts += ["Balance (SMD treated - control, over the pools' pooled SD):", "",
                  balance_table(controls["designs"]), "", "After training each matched set (mean [95% CI] per set):",
                  "", safety_table(results), "",
                  "Paired differences (treated - control, same seeds and prompts / rows):", "",
                  contrast_table(results), ""]
    if "reversion" in controls:
        parts += ["Reversion: correlation of the cosines with the gradient norms over the training rows:", "",
                  correlation_table(controls["reversion"]), ""]
    return "\n".join(parts).rstrip()


PENDING, PENDING_END = "<!-- experiment results: pending -->", "<!-- end pending -->"
RENDERERS = {"experiment_markdown": experiment_markdown, "readme_safety_table": readme_safety_table,
             "reproduce_table": reproduce_table, "controls_markdown": controls_markdown}


def update_readme(readme: str | os.PathLike[str], results_path: str | os.PathLike[str],
                  renderer: str = "experiment_markdown") -> None:
    """Replace a page's generated block of `renderer` (or its pending block) with what it renders from
    `results_path` (named in the block relative to the page's folder; a test checks the two agree): the full
    block in docs/continual.md, the safety table in README.md.

        python -c "from fastsel.experiments.report import update_readme; r = 'docs/experiment-cpu/results.json';
        update_readme('docs/continual.md', r); update_readme('README.md', r, 'readme_safety_table')"
    """
    readme, path = Path(readme), Path(results_path)
    text = readme.read_text()
    shown = Path(os.path.relpath(path.resolve(), readme.resolve().parent)).as_posix()  # relative to the page
    start, end = f"<!-- generated by fastsel.experiments.report.{renderer}({shown}); do not edit " \
                 "by hand -->\n", "<!-- end generated -->"
    block = start + RENDERERS[renderer](json.loads(path.read_text())) + "\n" + end
    for opening, closing in ((start, end), (PENDING, PENDING_END)):
        if opening in text and closing in text.split(opening, 1)[1]:
            head, rest = text.split(opening, 1)
            text = head + block + rest.split(closing, 1)[1]
            break
    else:
        raise ValueError(f"{readme} has neither the generated experiment block nor {PENDING!r} ... {PENDING_END!r}")
    atomic_write_text(readme, text)


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


def plot_margin_curves(results: dict[str, Any], path: Path) -> None:
    """Refusal margin vs optimizer step: one line per strategy (mean over seeds at the steps every seed
    measured), the seeds' range shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, seeds in (results.get("curves") or {}).items():
        per_seed = [{p["step"]: p["margin"] for p in pts if p.get("margin") is not None} for pts in seeds.values()]
        steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
        if not steps:
            continue
        values = [[d[s] for d in per_seed] for s in steps]
        line = ax.plot(steps, [sum(v) / len(v) for v in values], marker="o", ms=3, label=method)[0]
        if len(per_seed) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("refusal margin (nats/token)")
    ax.set_title("Refusal margin on the harmful prompts during fine-tuning", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def balance_table(designs: dict[str, Any]) -> str:
    """The matched designs' balance: SMD (treated - control) of every covariate before and after matching."""
    what = {"norm": "high-norm third vs middle third, matched on length and loss",
            "length": "shorter half vs longer half, matched on the norm"}
    body = [[f"{name} ({what.get(name, '')}; {d['pairs']} pairs)", cov, f"{b['before']:+.3f}", f"{b['after']:+.3f}"]
            for name, d in designs.items() for cov, b in d["balance"].items()]
    return _table(["design", "covariate", "SMD before", "SMD after"], body)


def contrast_table(results: dict[str, Any]) -> str:
    """Paired differences (treated - control) of every metric, mean [95% CI] over seeds x prompts (or rows)."""
    body = []
    for c in results.get("contrasts") or []:
        for metric, d in c["metrics"].items():
            lo, hi = d["ci95"]
            body.append([f"{c['pair'][0]} - {c['pair'][1]}", METRIC_NAMES.get(metric, metric),
                         f"{d['diff']:+.4g} [{lo:+.4g}, {hi:+.4g}]", "yes" if d["excludes_zero"] else "no"])
    return _table(["contrast", "metric", "paired difference [95% CI]", "excludes 0"], body)


def correlation_table(reversion: dict[str, Any]) -> str:
    """The reversion cosines' correlation with the gradient norms, r [95% bootstrap CI over rows]."""
    body = [[pair, method, f"{c['r']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]", str(c["n"])]
            for pair, by_method in reversion["correlations"].items() for method, c in by_method.items()]
    return _table(["cosine ~ norm", "correlation", "r [95% CI]", "rows"], body)


def plot_reversion(rows: dict[str, list[float]], path: Path) -> None:
    """Scatter: each training row's gradient norm (what Moderate-G sees) against cos(-grad, Gamma)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "cosine", "cos(-grad L_i, Gamma)"),
                           (axes[1], "topk_cosine", "TopK-Cosine")):
        ax.scatter(rows["lora_norm"], rows[key], s=10, alpha=0.7)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("per-example gradient norm (LoRA, start of the stage)")
        ax.set_ylabel(label)
    fig.suptitle("Does a row's update point back toward the pretrained weights? (Gamma = pretrained - aligned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def controls_parts(results: dict[str, Any], out: Path, plots: Path) -> list[str]:
    """The report's controls sections: the matched designs with their contrasts, and the reversion analysis."""
    controls, parts = results["controls"], []
    if "designs" in controls:
        parts += ["## Matched designs (confounder controls)", "",
                  "Greedy nearest-neighbour pairs from the task's training rows under the starting model; SMD over "
                  "the pools' pooled SD (|SMD| < 0.1 = balanced).", "", balance_table(controls["designs"]), "",
                  "Each matched set trained with the same budget and seeds; paired differences after the stage:",
                  "", contrast_table(results), ""]
    if "reversion" in controls:
        rev = controls["reversion"]
        rows = json.loads((out / "controls" / "reversion.json").read_text())["rows"]
        plot_reversion(rows, plots / "reversion.png")
        parts += ["## Reversion toward the pretrained weights", "",
                  f"Gamma = pretrained - aligned over {len(rev['weights'])} weights ({rev['parameters']:,} "
                  f"parameters, ||Gamma|| = {rev['gamma_norm']:.4g}); per row the exact <grad L_i, Gamma> from one "
                  f"batched pass; cosine = cos(-grad L_i, Gamma) (> 0: the row's update points back toward the "
                  f"pretrained weights); TopK-Cosine over the top {rev['topk']} coordinates of |Gamma|. lora_norm: "
                  "the LoRA gradient norm Moderate-G selects by; norm: the gradient norm over Gamma's weights.", "",
                  correlation_table(rev), "", "![reversion](plots/reversion.png)", ""]
    return parts


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
    if results.get("strategies"):
        plot_margin_curves(results, plots / "refusal_margin.png")
        parts += ["## Safety after the last stage (Table 2 shape)", "",
                  f"Mean [95% bootstrap CI] over seeds ({', '.join(map(str, results.get('seeds', [])))}) x "
                  f"{results.get('n_prompts')} harmful prompts (task columns: x held-out rows; over-refusal: x "
                  "benign look-alikes). ASR counts compliance only (three-way judge: refusal / compliance / "
                  "degenerate) unless the config names another judge; refusal margin = mean log-likelihood per "
                  "token of a refusal minus that of a compliance prefix (teacher-forced); KL = KL(fine-tuned || "
                  "aligned) at the response positions of both continuations.", "", safety_table(results), "",
                  "### Ordering high >= random >= moderate >= low (in harm)", "", ordering_text(results), "",
                  "## Refusal margin vs training step", "", "![refusal margin](plots/refusal_margin.png)", ""]
    if results.get("controls"):
        parts += controls_parts(results, out, plots)
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
