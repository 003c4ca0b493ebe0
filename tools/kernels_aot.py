"""Ahead-of-time compilation of the norm kernels for NVIDIA GPUs, on a machine without one.

The CPU interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile: a kernel that
Triton's code generator or ptxas rejects, or that asks for more shared memory than an SM has (which fails only at
launch), passes every interpreter test. This module builds the launches the launchers would make for a list of
site shapes (from meta tensors: nothing is allocated or run), specialises their arguments the way Triton's JIT
does (ints equal to 1 become constants, 16-divisible ints and pointers carry the divisibility hint), compiles
each distinct launch through Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, then a cubin with the ptxas
bundled in the triton wheel) for a GPU target, and reads the cubin's resource use: registers a thread, local
memory and stack a thread (register spills), shared memory. It says nothing about speed: that needs the GPU.

    python tools/kernels_aot.py --arch 80 90 --out benchmarks/results/kernels-aot.json

The sweep covers the norm kernels and the dot kernels of the reference-gradient pass (`linear_dot.py`).

Needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import triton

from fastsel.kernels.launch import Launch
from fastsel.kernels.spec import AotSite

# Largest shared memory one block may use (opt-in), bytes, and the register file of one SM.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


Site = AotSite  # one launch site (declared in fastsel.kernels.spec, where the kernel files use it)


def site_launch(site: Site, batch: int = 2) -> Launch:
    """The Launch `linear_sq_norms` (or, for a dot site, `linear_sq_norms_dots` / `linear_dots`) would make for
    `site`, built on meta tensors (nothing allocated or run)."""
    from fastsel.kernels import choose_method, linear_norm

    x = torch.empty((batch, site.t, site.n), dtype=_DTYPES[site.x_dtype], device="meta")
    delta = torch.empty((batch, site.t, site.m), dtype=_DTYPES[site.delta_dtype], device="meta")
    count = site.segments or batch
    norms = torch.zeros(count, dtype=torch.float32, device="meta")
    ranges = torch.zeros((count, 3), dtype=torch.int32, device="meta") if site.has_range or site.segments else None
    length = site.max_length if site.segments else None
    if site.dots:
        return _dot_launch(site, x, delta, norms, ranges, count)
    method = site.method
    if method == "auto":
        method = "instantiate" if site.write_grads else choose_method(length or site.t, site.m, site.n)
    if method == "instantiate":
        grads = torch.empty((count, site.m, site.n), dtype=torch.float32, device="meta") if site.write_grads else None
        return linear_norm.instantiate_launch(x, delta, norms, ranges, grads)
    if method == "gram":
        from fastsel.kernels.gram_norm import gram_launch

        return gram_launch(x, delta, norms, ranges, linear_norm._native_dot(x, delta), max_length=length)
    return linear_norm.outer_launch(x, delta, norms, ranges)


def _dot_launch(site: Site, x: torch.Tensor, delta: torch.Tensor, norms: torch.Tensor,
                ranges: torch.Tensor | None, batch: int) -> Launch:
    """A dot site's launch: the fused instantiate (norm + dots) or the project kernel, as `linear_dot` makes it."""
    from fastsel.kernels import linear_dot

    refs = torch.empty((1, site.dots, site.m, site.n), dtype=torch.float32, device="meta")
    dots = torch.zeros((batch, site.dots), dtype=torch.float32, device="meta")
    if site.method == "instantiate":
        return linear_dot.instantiate_dot_launch(x, delta, refs, dots, norms, ranges, batch)
    if site.method == "project":
        return linear_dot.project_dot_launch(x, delta, refs, dots, ranges, batch)
    raise ValueError(f"a dot site's method is 'instantiate' or 'project', got {site.method!r}")


def dot_sites(model: str, hidden: int, outs: Iterable[int], ranks: Iterable[int], ts: Iterable[int],
              dtypes: Iterable[tuple[str, str]]) -> Iterator[Site]:
    """The dot pass's launches for a model's LoRA sites (fused instantiate, K = 1 and 2) and its full
    fine-tuning sites (project, beside the Gram norm)."""
    for t in ts:
        for xd, dd in dtypes:
            for k in (1, 2):
                for r in ranks:
                    yield Site(f"{model} dots lora_A r={r} T={t} K={k}", t, r, hidden, xd, dd, "instantiate",
                               True, dots=k)
                    for out in outs:
                        yield Site(f"{model} dots lora_B d_out={out} r={r} T={t} K={k}", t, out, r, xd, dd,
                                   "instantiate", True, dots=k)
                yield Site(f"{model} dots full q_proj T={t} K={k} (project)", t, hidden, hidden, xd, dd, "project",
                           True, dots=k)


def _specialize(arg: Any) -> tuple[str, str]:
    """(type, attribute) of one runtime argument as Triton's JIT specialises it: e.g. ('*bf16', 'D'), ('i32', '')."""
    try:  # Triton's own rule (a private function; present in triton 3.3 - 3.9)
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        return native_specialize_impl(BaseBackend, arg, False, True, True)
    except ImportError:  # the same rule, written out
        if isinstance(arg, torch.Tensor):
            return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                          torch.int32: "i32"}[arg.dtype], "D"
        if isinstance(arg, bool):
            return "i1", ""
        if arg == 1:
            return "constexpr", 1
        return ("i32" if -(2**31) <= arg < 2**31 else "i64"), ("D" if arg % 16 == 0 else "")


def compile_source(launch: Launch) -> tuple[Any, tuple]:
    """(triton ASTSource, hashable key) for a launch; two launches with one key compile to the same binary."""
    from triton.compiler import ASTSource

    fn = launch.kernel
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were built for the interpreter: unset TRITON_INTERPRET to compile them")
    names = list(fn.arg_names)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, arg) in enumerate(zip(names, launch.args, strict=False)):
        ty, attr = _specialize(arg)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in launch.constexprs.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(attrs)),
           launch.num_warps)
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), key


def _cuobjdump() -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local memory (spills) and static shared memory of a cubin's kernel, read with cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_launch(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile one launch for sm_<arch> and report its resources; a failure is reported, not raised."""
    from triton.backends.compiler import GPUTarget

    src, _ = compile_source(launch)
    start = time.perf_counter()
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    except Exception as e:  # codegen or ptxas error: the point of this module is to report it
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    usage = resource_usage(kernel.asm["cubin"])
    dynamic_shared = int(kernel.metadata.shared)
    threads = 32 * launch.num_warps
    regs = usage.get("reg")
    limit = SHARED_LIMIT.get(arch)
    return {
        "ok": True,
        "compile_s": round(time.perf_counter() - start, 2),
        "num_stages": int(kernel.metadata.num_stages),
        "registers": regs,
        # a thread's stack frame and local memory: register spills (the kernels have no local arrays)
        "spill_bytes": None if not usage else usage.get("stack", 0) + usage.get("local", 0),
        "shared_bytes": dynamic_shared + usage.get("shared", 0),
        "shared_fits": None if limit is None else dynamic_shared + usage.get("shared", 0) <= limit,
        "blocks_per_sm_by_registers": None if not regs else REGISTERS_PER_SM // (regs * threads),
    }


# ---------------------------------------------------------------------------------------------- the sweep


def lora_sites(model: str, hidden: int, outs: Iterable[int], ranks: Iterable[int], ts: Iterable[int],
               dtypes: Iterable[tuple[str, str]], write_grads: bool = True) -> Iterator[Site]:
    """LoRA factor sites of a model: A (x [.., hidden], delta [.., r]) and B (x [.., r], delta [.., out])."""
    for r in ranks:
        for t in ts:
            for xd, dd in dtypes:
                for has_range in (False, True):
                    for out in outs:
                        yield Site(f"{model} lora_B d_out={out} r={r} T={t}", t, out, r, xd, dd, "auto", has_range)
                    yield Site(f"{model} lora_A d_in={hidden} r={r} T={t}", t, r, hidden, xd, dd, "auto", has_range)
                    if write_grads and has_range:
                        yield Site(f"{model} lora_A single-pass r={r} T={t}", t, r, hidden, xd, dd, "auto", True,
                                   True)


def default_sites(quick: bool = False) -> list[Site]:
    """The sweep: LoRA sites of SmolLM2-135M and a 7B Llama, full fine-tuning (Gram) and T == 1 sites."""
    if quick:  # the launch sites each kernel family declares in its kernel file (its spec): what CI compiles
        from fastsel.kernels import specs

        return [site for spec in specs().values() for site in spec.aot_sites]
    dtypes = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("bfloat16", "float32")]
    sites = list(lora_sites("smollm2", 576, (576, 192, 1536), (1, 16, 32, 64, 128), (16, 32, 512), dtypes))
    sites += lora_sites("7b", 4096, (4096, 11008), (16, 64, 128), (512,), dtypes[:2], write_grads=False)
    for xd, dd in dtypes:
        for t in (16, 128, 512):
            sites.append(Site(f"smollm2 full q_proj T={t} (gram)", t, 576, 576, xd, dd, "gram"))
        sites.append(Site("7b full down_proj T=512 (gram)", 512, 4096, 11008, xd, dd, "gram"))
        sites.append(Site("T=1 head", 1, 576, 576, xd, dd, "outer"))
        for r in (16, 64):  # packed rows: 16 sequences of <= 512 tokens in 4096, (row, start, end) segments
            sites.append(Site(f"smollm2 packed lora_A r={r}", 4096, r, 576, xd, dd, segments=16, max_length=512))
            sites.append(Site(f"smollm2 packed lora_B r={r}", 4096, 576, r, xd, dd, segments=16, max_length=512))
            sites.append(Site(f"smollm2 packed lora_A single-pass r={r}", 4096, r, 576, xd, dd, segments=16,
                              max_length=512, write_grads=True))
        sites.append(Site("smollm2 packed full q_proj (gram)", 4096, 576, 576, xd, dd, "gram", segments=16,
                          max_length=96))
    sites += dot_sites("smollm2", 576, (576, 1536), (16, 64), (32, 512), dtypes[:2])
    sites += dot_sites("7b", 4096, (4096, 11008), (16,), (512,), dtypes[:2])
    return sites


def run_sweep(sites: list[Site], archs: Iterable[int], log=print) -> dict[str, Any]:
    """Compile every distinct launch of `sites` for each arch; the report groups sites by compiled binary."""
    archs = list(archs)
    kernels: dict[tuple, dict[str, Any]] = {}
    for site in sites:
        launch = site_launch(site)
        _, key = compile_source(launch)
        entry = kernels.setdefault(key, {
            "kernel": launch.kernel.__name__,
            "num_warps": launch.num_warps,
            "constexprs": dict(launch.constexprs),
            "signature": {k: v for k, v in key[1] if v != "constexpr"},
            "sites": [],
            "launch": launch,
        })
        entry["sites"].append(asdict(site))
    log(f"{len(sites)} sites -> {len(kernels)} distinct launches x {len(archs)} targets")
    results = []
    for i, entry in enumerate(kernels.values()):
        launch = entry.pop("launch")
        entry["targets"] = {}
        for arch in archs:
            entry["targets"][f"sm_{arch}"] = res = compile_launch(launch, arch)
            log(f"[{i + 1}/{len(kernels)}] {entry['kernel']} {entry['constexprs']} sm_{arch}: "
                + (f"{res['registers']} regs, {res['spill_bytes']} B spill, {res['shared_bytes']} B shared"
                   if res["ok"] else res["error"]))
        results.append(entry)
    return {"kernels": results}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Counts over the sweep: failures, shared-memory overflows, spilling launches, the register range."""
    rows = [(k, arch, r) for k in report["kernels"] for arch, r in k["targets"].items()]
    ok = [r for _, _, r in rows if r["ok"]]
    regs = [r["registers"] for r in ok if r["registers"] is not None]
    return {
        "compiled": len(ok),
        "failed": [f"{k['kernel']} {k['constexprs']} {arch}: {r['error']}" for k, arch, r in rows if not r["ok"]],
        "shared_overflow": [f"{k['kernel']} {k['constexprs']} {arch}" for k, arch, r in rows
                            if r["ok"] and r["shared_fits"] is False],
        "spilling": [f"{k['kernel']} {k['constexprs']} {arch}: {r['spill_bytes']} B" for k, arch, r in rows
                     if r["ok"] and r["spill_bytes"]],
        "registers_min_max": [min(regs), max(regs)] if regs else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/kernels_aot.py", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--quick", action="store_true", help="a handful of sites (one of each kernel)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: print the summary only)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = run_sweep(default_sites(args.quick), args.arch)
    report = {
        "what": "ahead-of-time compilation of fastsel's Triton kernels for NVIDIA targets (no GPU used: "
                "resources only, no timing)",
        "host": platform.node() or None,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "targets": [f"sm_{a}" for a in args.arch],
        "wall_s": round(time.perf_counter() - start, 1),
        "summary": summarize(report),
        **report,
    }
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if report["summary"]["failed"] or report["summary"]["shared_overflow"] else 0


if __name__ == "__main__":
    sys.exit(main())
