"""Where the CPU time of fastsel's norm pass goes, beside a plain forward+backward of the same examples.

    python benchmarks/profile_cpu.py --batch 32            # SmolLM2-135M-Instruct + LoRA r=16, real-length mix
    python benchmarks/profile_cpu.py --batch 8 --rows 30

Both passes run on the bench's real-length instruction workload (`fastsel.bench.suite.instruct_features`: every
other example a GSM8K-length solution) packed into one padding-free row with per-sequence attention, as
`select` runs a padded batch on a CPU. Each is profiled once after a warm-up call (torch.profiler, CPU
activities); the table lists the operators whose self time differs most between the two, with their call counts.
The findings are in benchmarks/README.md ("CPU profile").
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fastsel
from fastsel.bench.baselines import plain_step
from fastsel.bench.suite import instruct_features, layouts
from fastsel.integrations.models import add_lora, load_model


def op_times(fn) -> dict[str, tuple[float, int]]:  # noqa: ANN001
    """{operator: (self CPU ms, calls)} of one profiled call (after one warm-up call)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=20, help="operators shown")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    model = add_lora(model, r=16).train()
    packed = layouts(instruct_features(args.batch, tokenizer, 512))["packed"]
    print(f"B={args.batch}: {packed['input_ids'].shape[1]} tokens in one packed row, {args.threads} threads")
    plain = op_times(lambda: plain_step(packed, model))
    norms = op_times(lambda: fastsel.norm_pass(packed, model, backend="torch"))
    total_plain = sum(t for t, _ in plain.values())
    total_norms = sum(t for t, _ in norms.values())
    print(f"plain forward+backward {total_plain / 1e3:.2f} s, norm pass {total_norms / 1e3:.2f} s "
          f"({total_norms / total_plain:.3f}x)\n")
    print(f"{'operator':<62} {'plain ms':>9} {'calls':>6} {'norms ms':>9} {'calls':>6} {'diff ms':>8}")
    keys = sorted(set(plain) | set(norms), key=lambda k: -abs(norms.get(k, (0, 0))[0] - plain.get(k, (0, 0))[0]))
    for key in keys[:args.rows]:
        (a, na), (b, nb) = plain.get(key, (0.0, 0)), norms.get(key, (0.0, 0))
        print(f"{key[:62]:<62} {a:9.1f} {na:6d} {b:9.1f} {nb:6d} {b - a:8.1f}")


if __name__ == "__main__":
    main()
