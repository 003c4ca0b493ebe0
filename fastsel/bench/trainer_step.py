"""`fastsel bench-trainer`: a selective TRL SFTTrainer step against a plain one, as a user runs them.

The embedded SmolLM2-135M-Instruct with LoRA r=8 on all projections, the bench's real-length instruction mix
(`suite.instruct_rows`: every other example a GSM8K-length solution) as a prompt-completion dataset, TRL's
defaults (`loss_type="nll"`: the LM head and loss in chunks, only where a label is supervised), batches of 8. For
each layout (padded; `padding_free=True`) the plain `trl.SFTTrainer` and `make_selective(trl.SFTTrainer)`
(Moderate-G, ratio 0.2) train from the same weights on the same batches, in the order plain, selective, selective,
plain (a drifting machine load hits both alike); each run's first step is a warm-up. The table gives the median
step time and selective / plain (target <= 1.15, never asserted).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastsel.bench.output import device_name, fmt_ratio, read_report, slug, versions, write_report

TARGET = 1.15  # selective step / plain step, TRL defaults, CPU
LAYOUTS = {"padded": False, "padding_free": True}


def sft_dataset(count: int) -> Any:
    """The real-length instruction mix as a TRL prompt-completion conversational dataset."""
    import datasets

    from fastsel.bench.suite import instruct_rows

    return datasets.Dataset.from_list([
        {"id": row.id, "prompt": [{"role": "user", "content": row.prompt}],
         "completion": [{"role": "assistant", "content": row.response}]} for row in instruct_rows(count)])


class StepClock:
    """A TrainerCallback timing every optimizer step (its forward, backward and optimizer update)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def _trainer(selective: bool, model: nn.Module, tokenizer: Any, dataset: Any, out: str, padding_free: bool,
             batch: int, steps: int, clock: StepClock) -> Any:
    import trl
    from transformers import TrainerCallback

    from fastsel.integrations.hf import SelectionConfig, make_selective

    callback = type("Clock", (TrainerCallback,), {"on_step_begin": clock.on_step_begin,
                                                   "on_step_end": clock.on_step_end})()
    config = trl.SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                           padding_free=padding_free, max_length=None if padding_free else 1024, report_to="none",
                           save_strategy="no", logging_steps=steps, disable_tqdm=True, seed=0, use_cpu=True)
    kwargs: dict[str, Any] = {"fastsel_config": SelectionConfig(ratio=0.2, log_file=None)} if selective else {}
    cls = make_selective(trl.SFTTrainer) if selective else trl.SFTTrainer
    return cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback],
               **kwargs)


def run_layout(base: nn.Module, tokenizer: Any, dataset: Any, out: str, padding_free: bool, batch: int,
               rounds: int, log: Any) -> dict[str, Any]:
    """Each trainer trains `rounds` steps from the same LoRA initialisation, twice, in the order plain, selective,
    selective, plain (so a drift in machine load hits both alike); every run's first step is a warm-up."""
    from fastsel.integrations.models import add_lora

    times: dict[str, list[float]] = {"plain": [], "selective": []}
    for i, name in enumerate(("plain", "selective", "selective", "plain")):
        clock = StepClock()
        trainer = _trainer(name == "selective", add_lora(copy.deepcopy(base), r=8, seed=0), tokenizer, dataset,
                           f"{out}/{name}{i}", padding_free, batch, rounds, clock)
        trainer.train()
        times[name] += clock.times[1:]
        log(f"  {name}: steps {', '.join(f'{t:.2f}' for t in clock.times)} s")
    entry: dict[str, Any] = {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}
    entry["selective_over_plain"] = entry["selective"]["median_s"] / entry["plain"]["median_s"]
    return entry


def markdown_table(report: Mapping[str, Any] | str | os.PathLike[str]) -> str:
    """The table of a report (or of its JSON file)."""
    report = read_report(report)
    lines = [f"**{report['device_name']}** ({report['threads']} threads), {report['date']}; trl {report['versions'].get('trl')}, "
             f"transformers {report['versions']['transformers']}. {report['model']}, {report['examples']} examples, "
             f"batch {report['batch']}, median of 2 x {report['rounds'] - 1} steps (two runs each, after a warm-up "
             "step).", "",
             "| layout | plain SFTTrainer step | selective step (Moderate-G) | selective / plain | target |",
             "|---|---|---|---|---|"]
    for layout, entry in report["layouts"].items():
        ratio = entry["selective_over_plain"]
        verdict = "met" if ratio <= TARGET else "missed"
        lines.append(f"| {layout} | {entry['plain']['median_s']:.2f} s | {entry['selective']['median_s']:.2f} s | "
                     f"{fmt_ratio(ratio)} | <= {TARGET:g} ({verdict}) |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="benchmarks/results", help="folder for <device>-trainer-<yyyymmdd>.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="optimizer steps per run (the first: warm-up)")
    parser.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=list(LAYOUTS))


def run(args: argparse.Namespace) -> int:
    import tempfile

    from fastsel.integrations.models import load_model

    if args.rounds < 2:
        raise SystemExit("error: --rounds must be >= 2 (the first is a warm-up)")
    base, tokenizer = load_model()
    examples = args.batch * args.rounds
    dataset = sft_dataset(examples)
    report: dict[str, Any] = {
        "schema": 1, "what": "selective vs plain TRL SFTTrainer step, TRL defaults",
        "device": slug(device_name("cpu")), "device_name": device_name("cpu"), "date": _dt.date.today().isoformat(),
        "threads": torch.get_num_threads(), "versions": versions(),
        "model": "embedded SmolLM2-135M-Instruct + LoRA r=8 (all projections)", "examples": examples,
        "batch": args.batch, "rounds": args.rounds, "target": TARGET, "layouts": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for layout in args.layouts:
            print(layout)
            report["layouts"][layout] = run_layout(base, tokenizer, dataset, f"{out}/{layout}", LAYOUTS[layout],
                                                   args.batch, args.rounds, print)
    report["wall_s"] = time.perf_counter() - start
    print("\n" + markdown_table(report))
    path = write_report({**report, "device": f"{report['device']}-trainer"}, args.out)
    print(f"wrote {path} ({report['wall_s']:.0f} s)")
    return 0
