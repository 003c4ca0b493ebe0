"""The safety summary of a run (results.json's "strategies" part): every metric of every strategy after the last
stage, as the mean over seeds x prompts (or x held-out rows) with a 95% bootstrap interval
(`fastsel.experiments.eval.bootstrap`), the base model's values, the refusal margin per training step, and
the check of the paper's ordering high >= random >= moderate >= low (in harm) with paired differences.

    {"seeds": [...], "n_prompts": N, "base": {metric: {"mean", "ci95", "per_seed"}},
     "strategies": {name: {"asr": {"mean", "ci95": [lo, hi], "per_seed": [...]}, "refusal_margin": {...},
                           "degenerate_rate": {...}, "kl_harmful": {...}, "task": {...}, ...}},
     "ordering": {metric: {...}}, "curves": {name: {seed: [{"step", "margin"}]}}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastsel.experiments.eval.bootstrap import bootstrap_ci, paired_difference_ci
from fastsel.selection import strategies
from fastsel.utils import json_safe, mean_or_none

#: The paper's claim, most harmful first (strategies missing from a run are skipped).
HYPOTHESIS = strategies.HARM_ORDER
#: metric -> +1 if a larger value means more harm (or drift), -1 if a smaller one does.
HARM_DIRECTION = {"asr": 1, "refusal_margin": -1, "kl_harmful": 1}
#: The metrics summarized (each a seeds x items matrix: `_matrix_rows`).
METRICS = ("asr", "refusal_rate", "degenerate_rate", "refusal_margin", "kl_harmful", "over_refusal", "task",
           "task_terse", "task_loss")


def _matrix_rows(stage: Mapping[str, Any]) -> dict[str, list[float] | None]:
    """One seed's row of every metric's matrix, from a stage result."""
    pp = stage.get("per_prompt") or {}
    labels = pp.get("label")
    look = stage.get("lookalikes") or {}
    per_row = stage.get("task_per_row") or {}
    task = [v for t in sorted(per_row) for v in per_row[t]["score"]] or None
    terse = [v for t in sorted(per_row) for v in per_row[t].get("terse", [])] or None
    loss = [v for t in sorted(per_row) for v in per_row[t].get("loss", [])] or None
    return {
        "asr": [100.0 * u for u in pp["unsafe"]] if pp.get("unsafe") is not None else None,
        "refusal_rate": [100.0 * (x == "refusal") for x in labels] if labels else None,
        "degenerate_rate": [100.0 * (x == "degenerate") for x in labels] if labels else None,
        "refusal_margin": pp.get("margin"),
        "kl_harmful": pp.get("kl"),
        "over_refusal": [100.0 * (x == "refusal") for x in look["label"]] if look.get("label") else None,
        "task": task,
        "task_terse": terse,
        "task_loss": loss,
    }


def metric_matrices(stages: Sequence[Mapping[str, Any]]) -> dict[str, list[list[float]]]:
    """metric -> seeds x items matrix from one stage result per seed (metrics some seed lacks are left out)."""
    rows = [_matrix_rows(s) for s in stages]
    return {m: [r[m] for r in rows] for m in METRICS if rows and all(r[m] is not None for r in rows)}


def _cis(matrices: Mapping[str, list[list[float]]]) -> dict[str, dict[str, Any]]:
    return {m: bootstrap_ci(x) for m, x in matrices.items()}


def ordering(matrices: Mapping[str, Mapping[str, list[list[float]]]]) -> dict[str, Any]:
    """For each harm metric: does the hypothesis order hold by the means, do adjacent strategies' marginal 95%
    intervals separate, and the paired difference (more harmful expected - less) with its interval."""
    names = [n for n in HYPOTHESIS if n in matrices]
    out: dict[str, Any] = {}
    for metric, sign in HARM_DIRECTION.items():
        present = [n for n in names if metric in matrices[n]]
        if len(present) < 2:
            continue
        cis = {n: bootstrap_ci(matrices[n][metric]) for n in present}
        pairs = []
        for a, b in zip(present, present[1:], strict=False):
            diff = paired_difference_ci(matrices[a][metric], matrices[b][metric])
            lo_a, hi_a = cis[a]["ci95"]
            lo_b, hi_b = cis[b]["ci95"]
            pairs.append({"pair": [a, b], "holds": sign * (cis[a]["mean"] - cis[b]["mean"]) >= 0,
                          "cis_separate": hi_b < lo_a if sign > 0 else hi_a < lo_b,
                          "diff": diff["diff"], "diff_ci95": diff["ci95"],
                          "diff_excludes_zero": diff["ci95"][0] > 0 or diff["ci95"][1] < 0})
        by_harm = sorted(present, key=lambda n: -sign * cis[n]["mean"])
        out[metric] = {"hypothesis": present, "observed": by_harm, "holds": all(p["holds"] for p in pairs),
                       "all_cis_separate": all(p["cis_separate"] for p in pairs), "pairs": pairs}
    return out


#: The controls' contrasts (`make experiment-controls`): treated - control of each matched design.
CONTRASTS = (("matched_high", "matched_moderate"), ("matched_short", "matched_long"))


def contrasts(matrices: Mapping[str, Mapping[str, list[list[float]]]],
              pairs: Sequence[tuple[str, str]] = CONTRASTS) -> list[dict[str, Any]]:
    """For each pair (a, b) present in the run: every metric's paired difference a - b (same seeds, same prompts or
    rows) with its 95% bootstrap interval and whether it excludes zero."""
    out = []
    for a, b in pairs:
        if a not in matrices or b not in matrices:
            continue
        diffs = {}
        for metric in METRICS:
            if metric in matrices[a] and metric in matrices[b]:
                d = paired_difference_ci(matrices[a][metric], matrices[b][metric])
                diffs[metric] = {"diff": d["diff"], "ci95": d["ci95"],
                                 "excludes_zero": d["ci95"][0] > 0 or d["ci95"][1] < 0}
        out.append({"pair": [a, b], "metrics": diffs})
    return out


def _curve(stages: Sequence[Mapping[str, Any]], start: float | None) -> list[dict[str, Any]]:
    """The margin per optimizer step across a run's stages (steps counted from the first stage's start)."""
    points = [{"step": 0, "stage": 0, "margin": start}] if start is not None else []
    offset = 0
    for stage in stages[1:]:
        for p in stage.get("margin_curve") or []:
            points.append({"step": offset + p["step"], "stage": stage["stage"], "margin": p["margin"]})
        offset += (stage.get("train") or {}).get("steps") or 0
    return points


def safety_summary(per_run: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]],
                   base: Mapping[str, Any]) -> dict[str, Any]:
    """The summary (module docstring) from every run's stage results (index 0 = the base evaluation)."""
    seeds = sorted({int(s) for runs in per_run.values() for s in runs})
    matrices = {m: metric_matrices([runs[s][-1] for s in sorted(runs)]) for m, runs in per_run.items()}
    base_matrices = metric_matrices([base])
    pp = base.get("per_prompt") or {}
    start = (base.get("safety") or {}).get("refusal_margin")
    curves = {m: {str(s): _curve(runs[s], start) for s in sorted(runs)} for m, runs in per_run.items()}
    return {"seeds": seeds, "n_prompts": len(pp.get("ids") or []), "base": _cis(base_matrices),
            "strategies": {m: _cis(x) for m, x in matrices.items()}, "ordering": ordering(matrices),
            "contrasts": contrasts(matrices), "curves": curves}


# ------------------------------------------------------------------------------- results.json of a run

def _continual(scores: dict[str, list[float]], tasks: list[str]) -> dict[str, float | None]:
    """avg / BWT / FM / max drop from the stage x task matrix after each training stage (base row dropped)."""
    from fastsel.experiments.eval import continual_metrics

    matrix = [[scores[t][i] for t in tasks] for i in range(1, len(tasks) + 1)]
    metrics = continual_metrics(matrix)
    return json_safe({"avg_perf": metrics["avg"], "bwt": metrics["bwt"], "fm": metrics["fm"],
                   "max_drop": metrics["max_drop"]})


def summarize(per_run: dict[str, dict[int, list[dict[str, Any]]]], tasks: list[str]) -> dict[str, Any]:
    """results.json: per method the per-stage ASR and task scores (means over seeds) and continual metrics."""
    out: dict[str, Any] = {"stages": ["base", *tasks], "tasks": list(tasks), "methods": {}}
    for method, seeds in per_run.items():
        per_seed = {}
        for seed, stages in seeds.items():
            scores = {t: [s["scores"][t] for s in stages] for t in tasks}
            per_seed[str(seed)] = {"asr": [s["asr"] for s in stages], "scores": scores,
                                   **_continual(scores, tasks),
                                   "train_s": [s.get("train", {}).get("train_s") for s in stages[1:]]}
        runs = list(per_seed.values())
        n_stages = len(tasks) + 1
        entry = {"asr": [mean_or_none([r["asr"][i] for r in runs]) for i in range(n_stages)],
                 "scores": {t: [mean_or_none([r["scores"][t][i] for r in runs]) for i in range(n_stages)] for t in tasks}}
        for key in ("avg_perf", "bwt", "fm", "max_drop"):
            entry[key] = mean_or_none([r[key] for r in runs])
        entry["per_seed"] = per_seed
        out["methods"][method] = json_safe(entry)
    return out


def headline(results: dict[str, Any]) -> str:
    """Plain-text table: ASR and mean task score per method per stage."""
    stages = results["stages"]
    lines = ["ASR (%) per stage / mean task score per stage", f"{'method':<10} " + " ".join(
        f"{s:>14}" for s in stages)]
    for method, entry in results["methods"].items():
        cells = []
        for i in range(len(stages)):
            score = mean_or_none([entry["scores"][t][i] for t in results["tasks"]])
            cells.append(f"{_fmt(entry['asr'][i])} / {_fmt(score)}")
        lines.append(f"{method:<10} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("continual metrics (task scores after each stage): avg / BWT / FM / max drop")
    for method, entry in results["methods"].items():
        lines.append(f"{method:<10} " + " / ".join(_fmt(entry[k]) for k in ("avg_perf", "bwt", "fm", "max_drop")))
    if results.get("strategies"):
        from fastsel.experiments.report import ordering_text, safety_table

        lines += ["safety after the last stage: mean [95% bootstrap CI over seeds x prompts]", safety_table(results),
                  ordering_text(results)]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
