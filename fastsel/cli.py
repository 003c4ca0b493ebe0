"""Command line: `fastsel demo | bench | bench-kernels | bench-trainer | bench-score | continual | score | filter` (also `python -m fastsel ...`).

Each subcommand lives in its own module, which adds its arguments and runs; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("fastsel.experiments.demo", "per-example norms on the embedded SmolLM2 model: torch vs naive, and the selection"),
    "bench": ("fastsel.bench.suite", "benchmark the norm pass against naive, torch.func, Opacus; training overhead"),
    "bench-kernels": ("fastsel.bench.kernel_bench", "per-layer microbenchmark of the norm ops: Triton kernels vs torch"),
    "bench-trainer": ("fastsel.bench.trainer_step", "a selective TRL SFTTrainer step vs a plain one (TRL defaults)"),
    "bench-score": ("fastsel.bench.score_bench", "examples/s of `fastsel score` vs a plain packed pass and the loop"),
    "continual": ("fastsel.experiments.continual", "the paper's continual safety pipeline from a YAML config"),
    "score": ("fastsel.experiments.scoring.cli", "exact per-example losses, gradient norms and dots for a dataset"),
    "filter": ("fastsel.experiments.scoring.filtering", "a whole-dataset filter over a `fastsel score` run"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastsel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # import only the chosen subcommand's module
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
