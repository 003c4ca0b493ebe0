"""Benchmark output: the device's name and slug, package versions, JSON reports, number formats, the CLI's end."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fastsel.bench.checks import BenchMismatch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    """'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13-64-core'; 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    text = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*$", " ", name.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text or "unknown"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformers", "peft", "trl", "opacus"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            out[pkg] = None
    import fastsel

    out["fastsel"] = fastsel.__version__
    return out


def read_report(report: Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
    """A report as given, or read from its JSON file (the table renderers take either)."""
    return report if isinstance(report, Mapping) else json.loads(Path(report).read_text())


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write `<out_dir>/<device>-<yyyymmdd>.json` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['device']}-{report['date'].replace('-', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def fmt_time(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("median_s") is None:
        return "null"
    unit, k = ("s", 1.0) if entry["median_s"] >= 1 else ("ms", 1e3)
    return f"{entry['median_s'] * k:.3g} {unit} [{entry['q1_s'] * k:.3g}–{entry['q3_s'] * k:.3g}]"


def fmt_ratio(x: float | None) -> str:
    return "null" if x is None else f"{x:.2f}×"


def run_and_report(run_fn: Callable[[], dict[str, Any]], print_fn: Callable[[dict[str, Any]], None],
                   write_fn: Callable[[dict[str, Any], str], Path], out: str) -> int:
    """The CLI's last step: run, print the table, write the JSON; exit code 1 (no file) when methods disagree."""
    try:
        report = run_fn()
    except BenchMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_fn(report)
    path = write_fn(report, out)
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")
    return 0
