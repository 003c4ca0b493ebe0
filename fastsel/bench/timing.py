"""One timing and memory harness for every benchmark: interleaved wall times and peak memory of a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stats(times: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"median_s": statistics.median(times), "q1_s": q1, "q3_s": q3, "min_s": min(times),
            "max_s": max(times), "repeats": len(times)}


def time_fns(fns: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int,
             device: str) -> dict[str, dict[str, float]]:
    """Wall times after `warmup` rounds: median, quartiles, min, max over `repeats` rounds (seconds).

    The functions are interleaved (one call of each per round), so drifting machine load hits all of them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: stats(values) for name, values in times.items()}


def time_fn(fn: Callable[[], Any], *, warmup: int, repeats: int, device: str) -> dict[str, float]:
    """`time_fns` for one function."""
    return time_fns({"fn": fn}, warmup=warmup, repeats=repeats, device=device)["fn"]


def measure_peak(fn: Callable[[], Any], device: str) -> tuple[Any, int | None, str]:
    """Run `fn` once and return (its result, peak bytes above the memory live at the start, how measured).

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of the CPU allocator's allocation and free events
    recorded by torch.profiler (profile_memory=True): peak live tensor bytes during the call, not RSS.
    """
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = fn()
        sync(device)
        return out, int(torch.cuda.max_memory_allocated() - start), "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except Exception:  # noqa: BLE001 - profiler internals differ across versions
        return out, None, "unavailable (torch.profiler memory events not readable)"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, int(peak), "torch.profiler CPU allocator events (peak live tensor bytes)"
