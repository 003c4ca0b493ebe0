"""`fastsel bench-score`: examples/s of `fastsel score` against its limit and against the LESS-style loop.

The embedded SmolLM2-135M-Instruct + LoRA r=16 on the bench's real-length instruction mix (`suite.instruct_rows`:
every other example a GSM8K-length solution), T <= 512. Three ways over the same examples, interleaved round by
round, medians:
- `score`: `score_dataset` in memory (its packing plan: passes of <= token_budget tokens, one packed row each);
- `plain_packed`: a plain forward+backward of the summed loss over the same passes (no per-example anything): the
  limit, target score / plain_packed <= 1 / 0.9 in time (>= 0.9x its throughput);
- `one_per_backward`: one forward+backward per example and the norm of its parameter gradients (LESS, DataInf and
  He et al.'s `rank.py` work this way).
Peak memory is the process's max RSS growth across the run (Linux ru_maxrss): the scorer holds one pass at a time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import resource
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from fastsel.bench.output import device_name, read_report, slug, versions, write_report

TARGET = 0.9  # score throughput / plain packed throughput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/results", help="folder for <device>-score-<yyyymmdd>.json")


def run(args: argparse.Namespace) -> int:
    from fastsel.bench.baselines import naive_norms, plain_step
    from fastsel.bench.suite import instruct_rows
    from fastsel.engine.batch import pack
    from fastsel.experiments.scoring import ScoreSettings, score_dataset
    from fastsel.experiments.scoring.inputs import ScoreInput, load_input
    from fastsel.experiments.scoring.run import make_plan
    from fastsel.integrations.models import add_lora, load_model

    model, tokenizer = load_model()
    model = add_lora(model, r=16).eval()
    rows = [{"id": r.id, "prompt": r.prompt, "response": r.response} for r in instruct_rows(args.examples)]
    settings = ScoreSettings(max_length=512, token_budget=args.token_budget, chunk_size=len(rows))
    spec = ScoreInput(rows, id_column="id")
    plan = make_plan(load_input(spec), tokenizer, settings)
    passes = [pack([plan.features[j] for j in p], 0) for p in plan.passes]
    singles = [pack([f], 0) for f in plan.features]
    fns = {"score": lambda: score_dataset(model, tokenizer, spec, settings=settings, progress=False),
           "plain_packed": lambda: [plain_step(b, model) for b in passes],
           "one_per_backward": lambda: [naive_norms(b, model) for b in singles]}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(args.rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    report = _report(args, rows, plan, times, rss0)
    print(markdown_table(report))
    print(f"wrote {write_report(report, args.out)}")
    return 0


def _report(args: argparse.Namespace, rows: list[Any], plan: Any, times: dict[str, list[float]],
            rss0: int) -> dict[str, Any]:
    n = len(plan.features)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"schema": 1, "what": "fastsel score throughput", "device": f"{slug(device_name('cpu'))}-score",
            "device_name": device_name("cpu"), "date": _dt.date.today().isoformat(),
            "threads": torch.get_num_threads(), "versions": versions(),
            "model": "embedded SmolLM2-135M-Instruct + LoRA r=16 (all projections)", "examples": n,
            "tokens": sum(len(f["input_ids"]) for f in plan.features), "passes": len(plan.passes),
            "token_budget": args.token_budget, "rounds": args.rounds, "target": TARGET,
            "methods": {name: {"median_s": m, "examples_per_s": n / m, "times_s": times[name]}
                        for name, m in medians.items()},
            "score_over_plain_packed_throughput": medians["plain_packed"] / medians["score"],
            "score_over_one_per_backward_throughput": medians["one_per_backward"] / medians["score"],
            "max_rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0}


def markdown_table(report: Mapping[str, Any] | str | os.PathLike[str]) -> str:
    """The table of a report (or of its JSON file)."""
    report = read_report(report)
    m = report["methods"]
    ratio = report["score_over_plain_packed_throughput"]
    lines = [f"**{report['device_name']}** ({report['threads']} threads, {report['date']}), {report['model']}, "
             f"{report['examples']} instruction examples at natural lengths ({report['tokens']} tokens, "
             f"{report['passes']} passes of <= {report['token_budget']} tokens); median of {report['rounds']} "
             "interleaved rounds after a warm-up:", "",
             "| method | time | examples/s |", "|---|---|---|"]
    for name in ("score", "plain_packed", "one_per_backward"):
        lines.append(f"| {name} | {m[name]['median_s']:.2f} s | {m[name]['examples_per_s']:.2f} |")
    verdict = "met" if ratio >= report["target"] else "missed"
    lines += ["", f"score / plain packed throughput: **{ratio:.2f}x** (target >= {report['target']}: {verdict}); "
              f"score / one-per-backward: {report['score_over_one_per_backward_throughput']:.2f}x."]
    return "\n".join(lines) + "\n"


__all__ = ["add_arguments", "markdown_table", "run"]
