"""The controls' preparation before any method trains: the matched designs and the reversion analysis, written to
OUT/controls/ (a rerun reads them back: they depend only on the config, the data and the seed-0 start).

Both start from the first task's training rows under the model the first seed's first stage starts from (the
aligned model with that seed's fresh LoRA): the norms, losses and lengths Moderate-G would see at its first step.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from fastsel.experiments.controls.matching import norm_and_length_designs
from fastsel.experiments.controls.reversion import (
    correlation,
    layer_weights,
    reversion_direction,
    reversion_scores,
)
from fastsel.utils import json_safe, read_json, write_json_safe

logger = logging.getLogger(__name__)

# control method -> (design, side): the rows it trains on
CONTROL_SETS = {"matched_high": ("norm", "treated"), "matched_moderate": ("norm", "control"),
                "matched_short": ("length", "treated"), "matched_long": ("length", "control")}


def _audit(runner: Any, task: str) -> list[dict[str, Any]]:
    from fastsel.integrations.models import add_lora

    lo, seed = runner.cfg.lora, runner.cfg.seeds[0]
    model = add_lora(copy.deepcopy(runner.base), r=lo.r, alpha=lo.alpha, dropout=lo.dropout,
                     target_modules=lo.targets, seed=seed)
    return runner.audit_rows(model, task)


def _reversion(runner: Any, task: str, audit: list[dict[str, Any]]) -> dict[str, Any]:
    """Gamma over the chosen layers, every row's dot / cosine / TopK-Cosine, and their correlation with the norm."""
    from fastsel.experiments.data import pad_token_id_of

    ctl = runner.cfg.controls
    pretrained = runner.load_pretrained()
    gamma_all = reversion_direction(pretrained, runner.base)
    del pretrained
    model = copy.deepcopy(runner.base)
    names = layer_weights(model, ctl.layers, gamma_all)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    gamma = {n: gamma_all[n] for n in names}
    scores = reversion_scores(model, runner._data[task]["rows"], gamma, topk=ctl.topk,
                              batch_size=runner.cfg.training.batch_size,
                              pad_token_id=pad_token_id_of(runner.tokenizer), backend=runner.cfg.training.backend)
    lora_norm = {r["id"]: r["norm"] for r in audit}
    scores["lora_norm"] = [lora_norm[i] for i in scores["id"]]
    corr = {f"{y} ~ {x}": {m: correlation(scores[x], scores[y], method=m) for m in ("pearson", "spearman")}
            for y in ("cosine", "topk_cosine") for x in ("lora_norm", "norm")}
    return {"weights": names, "parameters": sum(int(g.numel()) for g in gamma.values()), "topk": ctl.topk,
            "gamma_norm": float(sum(g.square().sum() for g in gamma.values()) ** 0.5),
            "correlations": corr, "rows": scores}


def prepare_controls(runner: Any) -> dict[str, Any]:
    """OUT/controls/{matching,reversion}.json (computed, or read back): {"sets": {method: ids}, ...}."""
    ctl, out = runner.cfg.controls, Path(runner.out) / "controls"
    if not (ctl.matched or ctl.reversion):
        return {}
    task = runner.tasks[0]
    result: dict[str, Any] = {}
    audit: list[dict[str, Any]] | None = None
    if ctl.matched:
        path = out / "matching.json"
        if not path.exists():
            audit = _audit(runner, task)
            designs = norm_and_length_designs(audit, max_pairs=ctl.max_pairs, max_smd=ctl.max_smd)
            write_json_safe(path, json_safe({"task": task, "rows": audit,
                                             "designs": {k: d.to_json() for k, d in designs.items()}}))
            logger.info("matched designs: %s", {k: len(d.treated) for k, d in designs.items()})
        matching = read_json(path)
        audit = matching["rows"]
        result["matching"] = matching
        result["sets"] = {m: matching["designs"][design][side] for m, (design, side) in CONTROL_SETS.items()}
    if ctl.reversion:
        path = out / "reversion.json"
        if not path.exists():
            audit = audit if audit is not None else _audit(runner, task)
            write_json_safe(path, json_safe(_reversion(runner, task, audit)))
        result["reversion"] = read_json(path)
    return result


def controls_summary(controls: dict[str, Any]) -> dict[str, Any]:
    """results.json's "controls": the designs' sizes and balance, the reversion's correlations (rows stay in
    OUT/controls/)."""
    out: dict[str, Any] = {}
    if "matching" in controls:
        out["designs"] = {k: {"pairs": d["pairs"], "balance": d["balance"]}
                          for k, d in controls["matching"]["designs"].items()}
    if "reversion" in controls:
        rev = controls["reversion"]
        out["reversion"] = {k: rev[k] for k in ("weights", "parameters", "topk", "gamma_norm", "correlations")}
    return out


__all__ = ["CONTROL_SETS", "controls_summary", "prepare_controls"]
