"""`fastsel score`: score a dataset (and optionally filter it and write the audit report) from the command line;
`torchrun --nproc_per_node N -m fastsel score ...` shards the chunks over the ranks (gloo on CPUs, NCCL on GPUs)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from fastsel.experiments.scoring.filtering import add_filter_options, apply_filter
from fastsel.experiments.scoring.inputs import ScoreInput, load_input
from fastsel.experiments.scoring.report import write_report
from fastsel.experiments.scoring.run import ScoreSettings, anchor_references, score_dataset
from fastsel.integrations.models import EMBEDDED, add_lora, load_model
from fastsel.selection.dataset_filters import check_rule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="a shipped task (dolly, gsm8k, ...), a local .json/.jsonl/.csv/.parquet, or a hub id")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--prompt-column")
    parser.add_argument("--response-column")
    parser.add_argument("--messages-column")
    parser.add_argument("--id-column")
    parser.add_argument("--model", default=EMBEDDED, help="'smollm2' (embedded, offline), a local path or a hub id")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the adapter whose gradient is scored")
    parser.add_argument("--seed", type=int, default=0, help="the LoRA initialization seed")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bf16 on a GPU (the norm math stays fp32), fp32 on a CPU")
    parser.add_argument("--references", choices=("none", "anchors"), default="none",
                        help="anchors: dots and cosines with the shipped refusal / compliance anchors' gradients, "
                             "and the GradShield and harmful_similarity scores")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=4096, help="tokens per packed pass")
    parser.add_argument("--chunk-size", type=int, default=256, help="examples per chunk file")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--drop-empty", action="store_true", help="drop (and count) rows with no response token")
    parser.add_argument("--report", action="store_true", help="also write report.md and its plots")
    parser.add_argument("--filter", dest="rule", default=None, help="also filter: gradshield, moderate, "
                        "harmful_similarity (the options below)")
    parser.add_argument("--no-progress", action="store_true")
    add_filter_options(parser)


def _device_and_group() -> torch.device:
    """Join the torchrun group when launched by one (WORLD_SIZE > 1); this rank's device."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def run(args: argparse.Namespace) -> int:
    spec = ScoreInput(args.data, args.prompt_column, args.response_column, args.messages_column, args.id_column,
                      args.split)
    if args.rule is not None:
        check_rule(args.rule)
    loaded = load_input(spec)  # every input error before the model loads
    device = _device_and_group()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    model = add_lora(model, r=args.lora_r, seed=args.seed)
    references: Any = anchor_references(model, tokenizer) if args.references == "anchors" else None
    settings = ScoreSettings(args.max_length, args.token_budget, args.chunk_size, args.backend, args.drop_empty)
    table = score_dataset(model, tokenizer, spec, out_dir=args.out, references=references, settings=settings,
                          progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"scored {len(table)} examples -> {os.path.join(args.out, 'scores.parquet')}")
    if args.report:
        print(f"report: {write_report(table, loaded.examples, args.out, title=f'fastsel score: {args.data}')}")
    if args.rule:
        record = apply_filter(table, loaded, args.rule, args.out, ratio=args.ratio, budget=args.budget,
                              loss_band=None if args.loss_band < 0 else args.loss_band)
        print(f"{args.rule}: kept {record['kept']} of {record['total']} -> {record['written']}")
    return 0


__all__ = ["add_arguments", "run"]
