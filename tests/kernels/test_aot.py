"""tools/kernels_aot.py: the Triton kernels compile for real GPU targets (sm_80, sm_90) on this CPU-only machine.

The interpreter tests (test_kernels.py) check what the kernels compute; these check that Triton's code generator
and ptxas accept them and that each launch fits an SM's shared memory, which only a real compilation shows.
The compilation runs in a subprocess: conftest.py sets TRITON_INTERPRET=1 for this process, and interpreted
kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs import need_module

triton = need_module("triton")
ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def load_aot():
    """tools/kernels_aot.py as a module (a tool beside the package, not part of it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernels_aot", ROOT / "tools" / "kernels_aot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernels_aot", module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _run_aot(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "tools" / "kernels_aot.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel ships no ptxas")
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    out = tmp_path / "aot.json"
    proc = _run_aot("--quick", "--arch", "80", "90", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    kernels = {k["kernel"] for k in report["kernels"]}
    assert kernels == {"_instantiate_kernel", "_gram_sq_norm_kernel", "_outer_kernel", "_instantiate_dot_kernel",
                       "_project_dot_kernel"}
    assert any(k["constexprs"].get("WRITE_GRADS") for k in report["kernels"])  # the single-pass variant
    for k in report["kernels"]:
        for arch, res in k["targets"].items():
            assert res["ok"], f"{k['kernel']} {k['constexprs']} {arch}: {res.get('error')}"
            assert res["shared_fits"], f"{k['kernel']} {k['constexprs']} {arch}: {res['shared_bytes']} B shared"
            assert res["registers"] and 0 < res["registers"] <= 255
    assert report["summary"]["failed"] == [] and report["summary"]["shared_overflow"] == []


def test_refuses_interpreted_kernels() -> None:
    proc = _run_aot("--quick", interpret=True)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


def test_site_launch_is_the_launch_linear_sq_norms_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What aot.py compiles is what the launcher runs: same kernel, constexprs, warps and grid for one site."""
    import torch

    from fastsel.kernels import linear_norm
    from fastsel.kernels.launch import Launch

    aot = load_aot()
    ran: list[Launch] = []
    monkeypatch.setattr(Launch, "__call__", lambda self: ran.append(self))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run only under the interpreter
    x = torch.randn(2, 40, 24, device=dev)
    delta = torch.randn(2, 40, 8, device=dev)
    segments = torch.tensor([[0, 0, 9], [0, 9, 40], [1, 0, 30]], device=dev)  # a packed launch: 3 sequences
    for method, write, packed in (("instantiate", False, False), ("instantiate", True, False), ("gram", False, False),
                                  ("instantiate", True, True), ("gram", False, True)):
        where = dict(segments=segments, max_length=31) if packed else dict(valid_range=torch.tensor([40, 7], device=dev))
        linear_norm.linear_sq_norms(x, delta, method=method, write_grads=write, **where)
        site = aot.Site("t", 40, 8, 24, method=method, has_range=True, write_grads=write, segments=3 * packed,
                        max_length=31 if packed else None)
        planned = aot.site_launch(site)
        assert ran[-1].kernel is planned.kernel
        assert ran[-1].constexprs == planned.constexprs and ran[-1].num_warps == planned.num_warps
        assert ran[-1].grid == planned.grid


def test_dot_site_launch_is_the_launch_linear_dot_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the dot kernels: fused instantiate (norm + dots) and project."""
    import torch

    from fastsel.kernels import linear_dot
    from fastsel.kernels.launch import Launch

    aot = load_aot()
    ran: list[Launch] = []
    monkeypatch.setattr(Launch, "__call__", lambda self: ran.append(self))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, delta = torch.randn(2, 40, 24, device=dev), torch.randn(2, 40, 8, device=dev)
    refs = torch.randn(2, 8, 24, device=dev)
    for method in ("instantiate", "project"):
        linear_dot.linear_sq_norms_dots(x, delta, refs, method=method, valid_range=torch.tensor([40, 7], device=dev))
        planned = aot.site_launch(aot.Site("t", 40, 8, 24, method=method, has_range=True, dots=2))
        assert ran[-1].kernel is planned.kernel
        assert ran[-1].constexprs == planned.constexprs and ran[-1].num_warps == planned.num_warps
        assert ran[-1].grid == planned.grid
