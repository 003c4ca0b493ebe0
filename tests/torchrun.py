"""Launch a 2-process gloo job on this machine for the DDP / FSDP2 tests (one launcher for both), and the workers'
common main."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_processes(worker: Path, args: list[str], *, timeout_s: float, what: str) -> None:
    """torchrun `worker` with `args` on 2 CPU processes (one thread each); fail the test with the output's tail if it
    fails or does not finish within `timeout_s` (the whole process group is killed: no hang outlives the test)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session started here
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process {what} run did not finish within {timeout_s} s (hang?):\n"
                    f"{output.decode(errors='replace')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"the 2-process {what} run failed (exit {proc.returncode}):\n"
                    f"{output.decode(errors='replace')[-4000:]}")


def worker_main(argv: list[str], cases: Mapping[str, Callable[[str], None]], default: list[str]) -> int:
    """A torchrun worker's body: the gloo process group, one thread, then every case named in argv[1:] (or
    `default`) with the output folder argv[0]; the group is torn down even when a case fails. Padded batches stay
    padded, as in the single-process reference the tests compare with (tests/conftest.py)."""
    from fastsel.engine import model_io

    model_io.AUTO_PACK_DEVICES = ()
    out_dir, names = argv[0], argv[1:] or default
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        for name in names:
            cases[name](out_dir)
    finally:
        dist.destroy_process_group()
    return 0
