"""`fastsel bench-kernels`: per-layer microbenchmark of the norm ops, Triton kernels vs the torch backend.

One job: for every distinct LoRA site shape of a model (lora_A: x [B, T, d_in], delta [B, T, r]; lora_B: x [B, T, r],
delta [B, T, d_out]) time `fastsel.engine.linear_math.sq_norms` (the torch backend) against
`fastsel.kernels.linear_sq_norms` with the batch's valid token ranges (and without them, to show what skipping
padding buys); then, per model, every site of `--layers` layers at once: `grouped_linear_sq_norms` vs a Python loop
of per-site kernel calls vs a loop of torch calls. Inputs are random (seeded), right-padded with lengths drawn in
[T/4, T] (the first example is T long), delta zero at padded positions as in a real backward.

Before any time is taken every method's norms are CHECKED against an fp32 torch reference computed from the same
inputs (upcast when bf16): max relative difference <= 1e-5 (fp32) / 1e-2 (bf16), else the run fails (exit code 1)
naming the site. Timing and peak memory reuse `fastsel.bench.suite` (interleaved rounds, median [q1-q3], CUDA
synchronized; CUDA max_memory_allocated or the CPU profiler's allocator events).

Results go to `<out>/kernels-<device slug>-<yyyymmdd>.json`; `markdown_table(path)` renders one as Markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsel.bench.checks import BenchMismatch, max_rel_diff
from fastsel.bench.output import device_name, fmt_ratio, fmt_time, run_and_report, slug, versions
from fastsel.bench.timing import measure_peak, time_fns
from fastsel.engine import linear_math
from fastsel.utils import format_bytes

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}  # max relative difference to the fp32 torch reference
SITE_METHODS = ("torch", "triton", "triton_no_range")
GROUPED_METHODS = ("torch_loop", "triton_loop", "triton_grouped")
INTERPRETED_NOTE = ("Triton ran in the CPU interpreter (TRITON_INTERPRET=1): its times measure Python, not the "
                    "kernels, and every ratio involving triton is meaningless; only the agreement check counts")


class KernelMismatch(BenchMismatch):
    """A kernel's norms differ from the fp32 torch reference beyond tolerance: the run fails, naming the site."""


# ----------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """The Linear shapes of a Llama-style decoder that LoRA adapts (q, k, v, o, gate, up, down)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    default_layers: int  # layers held at once in the grouped comparison unless --layers says otherwise

    @property
    def kv_out(self) -> int:
        """Output width of k_proj / v_proj: head_dim * kv_heads."""
        return self.hidden // self.heads * self.kv_heads

    def proj_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each adapted projection."""
        h, i, kv = self.hidden, self.intermediate, self.kv_out
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


MODELS = {
    "smollm2": ModelShape("smollm2", 576, 1536, 9, 3, 30, default_layers=30),  # SmolLM2-135M
    "7b": ModelShape("7b", 4096, 11008, 32, 32, 32, default_layers=2),  # Llama-2-7B
}
TINY_MODELS = {  # same structure, shapes the CPU interpreter runs in seconds
    "smollm2": ModelShape("smollm2", 32, 48, 4, 2, 2, default_layers=1),
    "7b": ModelShape("7b", 64, 172, 4, 4, 2, default_layers=1),
}


@dataclass(frozen=True)
class Site:
    """A LoRA factor's weight gradient shape m x n: x [B, T, n], delta [B, T, m]; the projections sharing it."""

    factor: str  # "A" (m = r, n = d_in) or "B" (m = d_out, n = r)
    m: int
    n: int
    projections: tuple[str, ...]

    @property
    def label(self) -> str:
        side = f"d_in={self.n}" if self.factor == "A" else f"d_out={self.m}"
        short = ",".join(p.removesuffix("_proj") for p in self.projections)
        return f"lora_{self.factor} {side} ({short})"


def distinct_sites(shape: ModelShape, rank: int) -> list[Site]:
    """The distinct (factor, m, n) site shapes of a model with LoRA r=rank on every projection, in model order."""
    found: dict[tuple[str, int, int], list[str]] = {}
    dims = shape.proj_dims()
    for proj, (d_in, _) in dims.items():
        found.setdefault(("A", rank, d_in), []).append(proj)
    for proj, (_, d_out) in dims.items():
        found.setdefault(("B", d_out, rank), []).append(proj)
    return [Site(f, m, n, tuple(projs)) for (f, m, n), projs in found.items()]


@dataclass
class KernelPlan:
    """What to run: models, batch shape, rank, dtypes, layers for the grouped comparison, timing."""

    device: str
    models: tuple[str, ...]
    batch: int
    seq: int
    rank: int
    dtypes: tuple[str, ...]
    layers: dict[str, int]  # model -> layers in the grouped comparison (0: skipped)
    warmup: int = 2
    repeats: int = 10
    inner: int = 1  # back-to-back calls per timed sample (CUDA: amortises the synchronize after each sample)
    tiny: bool = False
    seed: int = 0
    shapes: dict[str, ModelShape] = field(default_factory=dict)


def build_plan(device: str, *, models: Sequence[str] = ("smollm2", "7b"), batch: int | None = None,
               seq: int | None = None, rank: int | None = None, dtypes: Sequence[str] = ("float32", "bfloat16"),
               layers: int | None = None, warmup: int | None = None, repeats: int | None = None,
               inner: int | None = None, tiny: bool = False, seed: int = 0) -> KernelPlan:
    """Defaults: B=32, T=512, r=16, all SmolLM2 layers and 2 of the 7B's, warmup 2, 10 repeats, and each timed
    sample the mean of `inner` back-to-back calls (20 on CUDA, 1 on CPU).

    `tiny`: B=2, T=16, r=4, hidden 32/64, 1 layer in the whole-model comparison, warmup 0, 2 repeats.
    """
    table = TINY_MODELS if tiny else MODELS
    for name in models:
        if name not in table:
            raise ValueError(f"unknown model {name!r}: expected one of {', '.join(table)}")
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"unknown dtype {dt!r}: expected one of {', '.join(DTYPES)}")
    shapes = {name: table[name] for name in models}
    n_layers = {name: min(s.layers, s.default_layers if layers is None else max(0, layers))
                for name, s in shapes.items()}
    plan = KernelPlan(device, tuple(models), batch or (2 if tiny else 32), seq or (16 if tiny else 512),
                      rank or (4 if tiny else 16), tuple(dtypes), n_layers, tiny=tiny, seed=seed, shapes=shapes)
    if tiny:  # the checked call before timing already compiled/warmed every method
        plan.warmup, plan.repeats = 0, 2
    if warmup is not None:
        plan.warmup = warmup
    if repeats is not None:
        plan.repeats = repeats
    plan.inner = inner if inner is not None else (20 if device.startswith("cuda") and not tiny else 1)
    if min(plan.repeats, plan.inner, plan.batch, plan.seq, plan.rank) < 1 or plan.warmup < 0:
        raise ValueError("batch, seq, rank, repeats and inner must be >= 1 and warmup >= 0")
    return plan


# ----------------------------------------------------------------------------------------------------- inputs


def _generator(device: str, seed: int, *key: object) -> torch.Generator:
    """A generator seeded from the run seed and a stable key (inputs do not depend on which models run)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(repr(key).encode())) % (2**63))
    return g


def make_lengths(batch: int, seq: int, seed: int) -> Tensor:
    """Valid lengths [B] (CPU int64): the first example is T long (dynamic padding), the others in [T/4, T]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    return lengths


def _pad_mask(lengths: Tensor, seq: int, device: str) -> Tensor:
    """[B, T, 1] float mask: 1 at valid positions, 0 at right padding."""
    pos = torch.arange(seq, device=device)
    return (pos[None, :] < lengths.to(device)[:, None]).float()[:, :, None]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, device: str) -> Tensor:
    return torch.randn(shape, generator=g, device=device).to(dtype)


def site_inputs(b: int, t: int, m: int, n: int, dtype: torch.dtype, mask: Tensor, g: torch.Generator,
                device: str) -> tuple[Tensor, Tensor]:
    """x [B, T, n] random everywhere (padded positions have activations too), delta [B, T, m] zero at padding."""
    x = _randn((b, t, n), dtype, g, device)
    delta = (torch.randn((b, t, m), generator=g, device=device) * mask).to(dtype)
    return x, delta


def model_inputs(shape: ModelShape, rank: int, layers: int, dtype: torch.dtype, mask: Tensor, g: torch.Generator,
                 device: str) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """Every LoRA site of `layers` layers: (names, xs, deltas), layer-major, q..down, A then B.

    As in a real capture, q/k/v's lora_A see the same input tensor, and so do gate/up's; every delta is its own.
    """
    b, t = mask.shape[:2]
    dims = shape.proj_dims()
    names: list[str] = []
    xs: list[Tensor] = []
    deltas: list[Tensor] = []
    for layer in range(layers):
        shared: dict[str, Tensor] = {}
        for proj in PROJECTIONS:
            d_in, d_out = dims[proj]
            key = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}.get(
                proj, proj)
            if key not in shared:
                shared[key] = _randn((b, t, d_in), dtype, g, device)
            x_b = _randn((b, t, rank), dtype, g, device)  # lora_A's output, lora_B's input
            d_a = (torch.randn((b, t, rank), generator=g, device=device) * mask).to(dtype)
            d_b = (torch.randn((b, t, d_out), generator=g, device=device) * mask).to(dtype)
            names += [f"layers.{layer}.{proj}.lora_A", f"layers.{layer}.{proj}.lora_B"]
            xs += [shared[key], x_b]
            deltas += [d_a, d_b]
    return names, xs, deltas


def _unique_bytes(tensors: Sequence[Tensor]) -> int:
    seen: dict[int, int] = {}
    for x in tensors:
        seen[x.data_ptr()] = x.numel() * x.element_size()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------- methods


def triton_status(device: str) -> tuple[str | None, bool]:
    """(why the kernels cannot run here or None, whether they run in the CPU interpreter)."""
    from fastsel import kernels

    if not kernels.installed():
        return "triton not installed (pip install 'triton>=3.2')", False
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("no GPU: the Triton kernels run on a CPU only in the interpreter (set TRITON_INTERPRET=1; "
                "its times are meaningless)"), False
    if not kernels.available():
        return "triton not available on this device", False
    interpreted = kernels.interpreted()
    if device == "cpu" and not interpreted:
        return ("the kernels were compiled for a GPU before TRITON_INTERPRET=1 was set (set it before the "
                "first kernel call)"), False
    return None, interpreted


def _torch_site(x: Tensor, delta: Tensor, valid_range: Tensor) -> Tensor:
    return linear_math.sq_norms(x, delta)


def _triton_site(x: Tensor, delta: Tensor, valid_range: Tensor) -> Tensor:
    from fastsel import kernels

    return kernels.linear_sq_norms(x, delta, valid_range=valid_range)[0]


def _triton_site_no_range(x: Tensor, delta: Tensor, valid_range: Tensor) -> Tensor:
    from fastsel import kernels

    return kernels.linear_sq_norms(x, delta)[0]


def _torch_loop(xs: Sequence[Tensor], deltas: Sequence[Tensor], valid_range: Tensor) -> Tensor:
    return torch.stack([linear_math.sq_norms(x, d) for x, d in zip(xs, deltas, strict=True)])


def _triton_loop(xs: Sequence[Tensor], deltas: Sequence[Tensor], valid_range: Tensor) -> Tensor:
    return torch.stack([_triton_site(x, d, valid_range) for x, d in zip(xs, deltas, strict=True)])


def _triton_grouped(xs: Sequence[Tensor], deltas: Sequence[Tensor], valid_range: Tensor) -> Tensor:
    from fastsel import kernels

    return kernels.grouped_linear_sq_norms(xs, deltas, valid_range=valid_range)


SITE_FNS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "torch": _torch_site, "triton": _triton_site, "triton_no_range": _triton_site_no_range}
GROUPED_FNS: dict[str, Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], Tensor]] = {
    "torch_loop": _torch_loop, "triton_loop": _triton_loop, "triton_grouped": _triton_grouped}


def _fp32_reference(xs: Sequence[Tensor], deltas: Sequence[Tensor]) -> Tensor:
    """[G, B] norms by the torch backend on fp32 copies of the inputs, one site at a time."""
    return torch.stack([linear_math.sq_norms(x.float(), d.float()) for x, d in zip(xs, deltas, strict=True)])


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _repeated(fn: Callable[[], Tensor], inner: int) -> Callable[[], None]:
    """`fn` called `inner` times back to back: one timed sample, divided by `inner` afterwards."""
    def run() -> None:
        for _ in range(inner):
            fn()

    return run


def measure_methods(fns: Mapping[str, Callable[[], Tensor]], reference: Callable[[], Tensor], *, tol: float,
                    what: str, row_names: Sequence[str] | None, plan: KernelPlan,
                    skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Run each method once (peak memory, norms), check all against the reference, then time them interleaved.

    `row_names` names the rows of a [G, B] result (grouped) for the error message. A method that runs out of
    memory is left out, its reason added to `skipped`. Raises KernelMismatch.
    """
    results: dict[str, dict[str, Any]] = {}
    outs: dict[str, Tensor] = {}
    for name, fn in fns.items():
        try:
            out, peak, how = measure_peak(fn, plan.device)
        except torch.cuda.OutOfMemoryError as e:
            skipped[name] = f"out of memory: {str(e).splitlines()[0][:160]}"
            _free(plan.device)
            continue
        results[name] = {"peak_mem_bytes": peak, "peak_mem_how": how}
        outs[name] = out.detach().float().cpu()
        del out
    ref = reference().detach().float().cpu()
    for name, out in outs.items():
        rel, i = max_rel_diff(out.flatten(), ref.flatten())
        results[name]["rel_err"] = rel
        if not rel <= tol:  # also catches NaN
            where = f"example {i}" if row_names is None else \
                f"site {row_names[i // ref.shape[-1]]} example {i % ref.shape[-1]}"
            raise KernelMismatch(f"{what}: method {name!r} disagrees with the fp32 torch reference: max relative "
                                 f"difference {rel:.3e} at {where}; tolerance {tol:g}")
    timed = {name: _repeated(fns[name], plan.inner) for name in results}
    if timed:
        for name, stats in time_fns(timed, warmup=plan.warmup, repeats=plan.repeats, device=plan.device).items():
            results[name].update({k: v / plan.inner if k.endswith("_s") else v for k, v in stats.items()})
    return dict(results)


def _ratio(methods: Mapping[str, Mapping[str, Any] | None], num: str, den: str) -> float | None:
    a, b = methods.get(num), methods.get(den)
    if not a or not b or not b.get("median_s"):
        return None
    return a["median_s"] / b["median_s"]


def run_site(shape: ModelShape, site: Site, dtype: str, plan: KernelPlan, lengths: Tensor,
             triton_reason: str | None) -> dict[str, Any]:
    """One distinct site shape in one dtype: torch vs triton (with and without the valid ranges)."""
    from fastsel import kernels

    b, t = plan.batch, plan.seq
    mask = _pad_mask(lengths, t, plan.device)
    g = _generator(plan.device, plan.seed, shape.name, site.factor, site.m, site.n, dtype)
    x, delta = site_inputs(b, t, site.m, site.n, DTYPES[dtype], mask, g, plan.device)
    vr = lengths.to(device=plan.device, dtype=torch.int32)
    skipped = {name: triton_reason for name in SITE_METHODS[1:]} if triton_reason else {}
    fns = {name: (lambda fn=SITE_FNS[name]: fn(x, delta, vr)) for name in SITE_METHODS if name not in skipped}
    what = f"site {shape.name} {site.label} {dtype}"
    methods = measure_methods(fns, lambda: linear_math.sq_norms(x.float(), delta.float()), tol=TOLERANCE[dtype],
                              what=what, row_names=None, plan=plan, skipped=skipped)
    methods = {name: methods.get(name) for name in SITE_METHODS}
    entry = {
        "model": shape.name, "site": site.label, "factor": site.factor, "projections": list(site.projections),
        "count_in_model": shape.layers * len(site.projections), "dtype": dtype,
        "x_shape": [b, t, site.n], "delta_shape": [b, t, site.m], "weight_shape": [site.m, site.n],
        "input_bytes": _unique_bytes([x, delta]),
        "method": {"torch": linear_math.choose_method(t, site.m, site.n),
                   "triton": None if triton_reason else kernels.choose_method(t, site.m, site.n)},
        "tolerance": TOLERANCE[dtype], "methods": methods, "skipped": skipped,
        "ratio_torch_over_triton": _ratio(methods, "torch", "triton"),
        "ratio_no_range_over_range": _ratio(methods, "triton_no_range", "triton"),
    }
    return entry


def run_grouped(shape: ModelShape, dtype: str, plan: KernelPlan, lengths: Tensor,
                triton_reason: str | None) -> dict[str, Any]:
    """Every site of `plan.layers[model]` layers: one grouped launch per shape vs a kernel loop vs a torch loop."""
    from fastsel import kernels

    layers = plan.layers[shape.name]
    entry: dict[str, Any] = {"model": shape.name, "dtype": dtype, "layers": layers, "model_layers": shape.layers,
                             "tolerance": TOLERANCE[dtype]}
    skipped = {name: triton_reason for name in GROUPED_METHODS[1:]} if triton_reason else {}
    mask = _pad_mask(lengths, plan.seq, plan.device)
    g = _generator(plan.device, plan.seed, shape.name, "grouped", dtype)
    try:
        names, xs, deltas = model_inputs(shape, plan.rank, layers, DTYPES[dtype], mask, g, plan.device)
    except torch.cuda.OutOfMemoryError as e:
        _free(plan.device)
        reason = f"out of memory building the inputs of {layers} layers: {str(e).splitlines()[0][:160]}"
        return {**entry, "sites": None, "methods": dict.fromkeys(GROUPED_METHODS), "skipped":
                dict.fromkeys(GROUPED_METHODS, reason), "ratio_torch_loop_over_triton_grouped": None,
                "ratio_triton_loop_over_triton_grouped": None}
    groups: dict[tuple, int] = {}
    for x, d in zip(xs, deltas, strict=True):
        key = (tuple(x.shape), tuple(d.shape))
        groups[key] = groups.get(key, 0) + 1
    vr = lengths.to(device=plan.device, dtype=torch.int32)
    fns = {name: (lambda fn=GROUPED_FNS[name]: fn(xs, deltas, vr)) for name in GROUPED_METHODS
           if name not in skipped}
    methods = measure_methods(fns, lambda: _fp32_reference(xs, deltas), tol=TOLERANCE[dtype],
                              what=f"grouped {shape.name} {dtype} ({layers} layers)", row_names=names, plan=plan,
                              skipped=skipped)
    methods = {name: methods.get(name) for name in GROUPED_METHODS}
    entry.update({
        "sites": len(names), "input_bytes": _unique_bytes(xs + deltas),
        "groups": [{"x_shape": list(xs_), "delta_shape": list(ds_), "count": n,
                    "method": kernels.choose_method(xs_[1], ds_[2], xs_[2])} for (xs_, ds_), n in groups.items()],
        "methods": methods, "skipped": skipped,
        "ratio_torch_loop_over_triton_grouped": _ratio(methods, "torch_loop", "triton_grouped"),
        "ratio_triton_loop_over_triton_grouped": _ratio(methods, "triton_loop", "triton_grouped"),
    })
    return entry


def run_plan(plan: KernelPlan, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every model, dtype and site of `plan`; return the report (raises KernelMismatch on a disagreement)."""
    t0 = time.perf_counter()
    triton_reason, interpreted = triton_status(plan.device)
    lengths = make_lengths(plan.batch, plan.seq, plan.seed)
    cuda = plan.device.startswith("cuda")
    report: dict[str, Any] = {
        "schema": 1,
        "benchmark": "kernels",
        "device": slug(device_name(plan.device)),
        "device_name": device_name(plan.device),
        "device_type": plan.device,
        "date": _dt.date.today().isoformat(),
        "tiny": plan.tiny,
        "threads": torch.get_num_threads(),
        "interpreted": interpreted,
        "interpreted_note": INTERPRETED_NOTE if interpreted else None,
        "triton": {"available": triton_reason is None, "reason": triton_reason},
        "versions": versions(),
        "timing": {"warmup": plan.warmup, "repeats": plan.repeats, "inner": plan.inner,
                   "stat": "median; spread q1-q3 and min-max; methods interleaved round by round",
                   "what": "wall time of one call, Python launch overhead included: each sample is `inner` "
                           "back-to-back calls, synchronized once on CUDA, divided by `inner`"},
        "peak_mem_note": ("CUDA: torch.cuda.max_memory_allocated above the memory live before the call (inputs "
                          "excluded)" if cuda else "CPU: peak of live CPU tensor bytes during the call, from "
                          "torch.profiler allocator events (not RSS; inputs excluded)"),
        "tolerance": dict(TOLERANCE),
        "reference": "fastsel.engine.linear_math.sq_norms on fp32 copies of the inputs",
        "config": {"models": list(plan.models), "batch": plan.batch, "seq": plan.seq, "rank": plan.rank,
                   "dtypes": list(plan.dtypes), "layers": dict(plan.layers), "seed": plan.seed,
                   "lengths": lengths.tolist(),
                   "valid_token_fraction": float(lengths.sum()) / (plan.batch * plan.seq),
                   "shapes": {name: {**asdict(s), "kv_out": s.kv_out} for name, s in plan.shapes.items()}},
        "sites": [],
        "grouped": [],
    }
    if triton_reason:
        log(f"triton: null ({triton_reason})")
    elif interpreted:
        log(f"note: {INTERPRETED_NOTE}")
    for name in plan.models:
        shape = plan.shapes[name]
        for dtype in plan.dtypes:
            for site in distinct_sites(shape, plan.rank):
                entry = run_site(shape, site, dtype, plan, lengths, triton_reason)
                _free(plan.device)  # the site's inputs died with run_site's frame
                report["sites"].append(entry)
                log(f"{name:<8} {dtype:<9} {site.label:<40} " + "  ".join(
                    f"{k} {_ms(v)}" for k, v in entry["methods"].items()))
            if plan.layers[name] > 0:
                entry = run_grouped(shape, dtype, plan, lengths, triton_reason)
                _free(plan.device)
                report["grouped"].append(entry)
                log(f"{name:<8} {dtype:<9} {'grouped, ' + str(entry['layers']) + ' layers':<40} " + "  ".join(
                    f"{k} {_ms(v)}" for k, v in entry["methods"].items()))
    report["wall_s"] = time.perf_counter() - t0
    return report


def _ms(entry: Mapping[str, Any] | None) -> str:
    return "null" if not entry or entry.get("median_s") is None else f"{entry['median_s'] * 1e3:.3f} ms"


# ----------------------------------------------------------------------------------------------------- report


def report_path(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """`<out_dir>/kernels-<device>-<yyyymmdd>.json`."""
    return Path(out_dir) / f"kernels-{report['device']}-{report['date'].replace('-', '')}.json"


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write the report JSON and return its path."""
    path = report_path(report, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _fmt_err(entry: Mapping[str, Any] | None) -> str:
    return "null" if not entry or entry.get("rel_err") is None else f"{entry['rel_err']:.1e}"


def _fmt_mem(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("peak_mem_bytes") is None:
        return "null"
    return format_bytes(entry["peak_mem_bytes"])


def markdown_table(path: str | os.PathLike[str]) -> str:
    """Render a kernels results JSON as Markdown: per-site table, grouped table, nulls and their reasons."""
    report = json.loads(Path(path).read_text())
    v, cfg = report["versions"], report["config"]
    lines = [f"**{report['device_name']}** ({report['device_type']}, {report['threads']} threads), {report['date']}; "
             f"torch {v['torch']}, triton {v['triton']}. B={cfg['batch']} T={cfg['seq']} r={cfg['rank']}, valid "
             f"tokens {cfg['valid_token_fraction']:.0%} (lengths in [T/4, T]). Times: median [q1–q3] of "
             f"{report['timing']['repeats']} after {report['timing']['warmup']} warmup; rel err vs the fp32 torch "
             "reference.", ""]
    if report.get("interpreted"):
        lines += [f"**Interpreted run:** {report['interpreted_note']}.", ""]
    lines += ["| model | site | dtype | method | torch | triton | triton no range | torch/triton | "
              "no range/range | rel err triton | peak mem torch / triton |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["sites"]:
        m = s["methods"]
        method = s["method"]["torch"] + ("" if s["method"]["triton"] in (None, s["method"]["torch"])
                                         else f" / {s['method']['triton']}")
        lines.append(f"| {s['model']} | {s['site']} {s['weight_shape'][0]}×{s['weight_shape'][1]} | {s['dtype']} | "
                     f"{method} | {fmt_time(m.get('torch'))} | {fmt_time(m.get('triton'))} | "
                     f"{fmt_time(m.get('triton_no_range'))} | {fmt_ratio(s['ratio_torch_over_triton'])} | "
                     f"{fmt_ratio(s['ratio_no_range_over_range'])} | {_fmt_err(m.get('triton'))} | "
                     f"{_fmt_mem(m.get('torch'))} / {_fmt_mem(m.get('triton'))} |")
    if report["grouped"]:
        lines += ["", "Whole model (all LoRA sites of the given layers at once):", "",
                  "| model | dtype | layers | sites | torch loop | triton loop | triton grouped | "
                  "torch loop/grouped | triton loop/grouped | rel err grouped |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for gr in report["grouped"]:
            m = gr["methods"]
            lines.append(f"| {gr['model']} | {gr['dtype']} | {gr['layers']}/{gr['model_layers']} | {gr['sites']} | "
                         f"{fmt_time(m.get('torch_loop'))} | {fmt_time(m.get('triton_loop'))} | "
                         f"{fmt_time(m.get('triton_grouped'))} | "
                         f"{fmt_ratio(gr['ratio_torch_loop_over_triton_grouped'])} | "
                         f"{fmt_ratio(gr['ratio_triton_loop_over_triton_grouped'])} | "
                         f"{_fmt_err(m.get('triton_grouped'))} |")
    reasons = sorted({f"{k}: {r}" for e in report["sites"] + report["grouped"] for k, r in e["skipped"].items()})
    if reasons:
        lines += ["", "null = not run: " + "; ".join(reasons) + "."]
    return "\n".join(lines) + "\n"


def print_table(report: Mapping[str, Any]) -> None:
    """A plain-text summary on stdout."""
    print(f"\n{report['device_name']} ({report['device_type']}), torch {report['versions']['torch']}, "
          f"triton {report['versions']['triton']}")
    if report.get("interpreted"):
        print(f"NOTE: {report['interpreted_note']}")
    if report["triton"]["reason"]:
        print(f"triton: null ({report['triton']['reason']})")
    print(f"{'model':<8} {'dtype':<9} {'site':<40} {'torch ms':>10} {'triton ms':>10} {'no-range':>10} "
          f"{'torch/tri':>9} {'rel err':>8}")
    for s in report["sites"]:
        print(f"{s['model']:<8} {s['dtype']:<9} {s['site']:<40} "
              f"{_ms_cells(s['methods'], SITE_METHODS, 10, s['ratio_torch_over_triton'])} "
              f"{_fmt_err(s['methods'].get('triton')):>8}")
    if report["grouped"]:
        print(f"\n{'model':<8} {'dtype':<9} {'layers':>6} {'sites':>6} {'torch loop':>11} {'triton loop':>11} "
              f"{'grouped':>11} {'torch/grp':>9}")
        for gr in report["grouped"]:
            print(f"{gr['model']:<8} {gr['dtype']:<9} {gr['layers']:>6} {gr['sites'] or 0:>6} "
                  f"{_ms_cells(gr['methods'], GROUPED_METHODS, 11, gr['ratio_torch_loop_over_triton_grouped'])}")


def _ms_cells(methods: Mapping[str, Any], names: Sequence[str], width: int, ratio: float | None) -> str:
    """Median milliseconds of `names` (null where not run) and the ratio column."""
    cells = [f"{methods[k]['median_s'] * 1e3:>{width}.3f}" if methods.get(k) else f"{'null':>{width}}"
             for k in names]
    return " ".join(cells) + f" {(f'{ratio:.2f}x' if ratio else 'null'):>9}"


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="B (default 32; --tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="T, the padded length (default 512; --tiny: 16)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16; --tiny: 4)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--layers", type=int, default=None,
                        help="layers held at once in the whole-model (grouped) comparison, capped at the model's "
                             "(default: all 30 for smollm2, 2 for 7b; 0 skips it)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; --tiny: 0)")
    parser.add_argument("--inner", type=int, default=None,
                        help="back-to-back calls per timed sample (default 20 on CUDA, 1 on CPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: B=2, T=16, r=4, hidden 32-64, 1 layer; same code path (CPU interpreter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for kernels-<device>-<yyyymmdd>.json")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        plan = build_plan(device, models=args.models, batch=args.batch, seq=args.seq, rank=args.rank,
                          dtypes=args.dtypes, layers=args.layers, warmup=args.warmup, repeats=args.repeats,
                          inner=args.inner, tiny=args.tiny, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_and_report(lambda: run_plan(plan), print_table, write_report, args.out)
