"""Checkpoints: atomic, checksummed, pruned; exact resume after SIGKILL; corrupted checkpoints are skipped.

This file is also the worker the kill test launches: `python tests/training/test_checkpoint.py OUT_DIR MODE [KILL_AT]`
trains the reference run (deterministic: CPU, one thread, deterministic algorithms, seeded model and data) and
writes the final trainable parameters to OUT_DIR/final.safetensors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import VOCAB, lora, tiny_model

from fastsel.training import checkpoint as ckpt
from fastsel.training.checkpoint import CheckpointError
from fastsel.training.loop import train

STEPS = 8
# 24 rows, 6 per micro-batch: 4 micro-batches per epoch, so 8 steps cross an epoch boundary after step 4.
# LoRA dropout > 0 and a warmup+cosine schedule make the run depend on the restored RNG and scheduler states.
OPTIONS = dict(batch_size=6, ratio=0.5, strategy="moderate", lr=2e-2, lr_scheduler="cosine", warmup_steps=2,
               weight_decay=0.01, max_grad_norm=0.5, seed=7, max_steps=STEPS, progress=False)


def make_rows(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(123)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100, -100] + ids[3:], "id": f"row{i}"})
    return rows


def make_model() -> torch.nn.Module:
    return lora(tiny_model(seed=0), r=4, dropout=0.1)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class deterministic:
    """One thread and deterministic algorithms (as in the worker), restored on exit."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        self.det = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.det)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The uninterrupted run: final trainable parameters and its log."""
    out = tmp_path_factory.mktemp("reference")
    with deterministic():
        model = make_model()
        result = train(model, make_rows(), out_dir=str(out), **OPTIONS)
    assert result.steps == STEPS
    return trainable(model), read_log(out)


def _worker(out_dir: str, mode: str, kill_at: int | None) -> None:
    """Subprocess body: a run that stalls after step `kill_at` (to be killed), or a resume to the end."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    marker = Path(out_dir) / "marker"

    def on_step(record: dict) -> None:
        if record["step"] == kill_at:
            marker.write_text(str(record["step"]))
            time.sleep(300)  # killed here by the test

    model = make_model()
    train(model, make_rows(), out_dir=out_dir, save_every=2, resume=(mode == "resume"), on_step=on_step,
          **OPTIONS)
    save_file(trainable(model), str(Path(out_dir) / "final.safetensors"))


def _launch(out_dir: Path, mode: str, kill_at: int | None = None) -> subprocess.Popen:
    args = [sys.executable, __file__, str(out_dir), mode] + ([str(kill_at)] if kill_at else [])
    tests_dir = str(Path(__file__).parents[1])  # tiny.py
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(args, cwd=Path(__file__).parents[2], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_in_a_new_process_is_exact(tmp_path, reference) -> None:
    final_ref, log_ref = reference
    proc = _launch(tmp_path, "start", kill_at=5)
    deadline = time.monotonic() + 240
    while not (tmp_path / "marker").exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("worker never reached the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]  # step 5 logged, not checkpointed

    proc = _launch(tmp_path, "resume")
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert_same_params(load_file(str(tmp_path / "final.safetensors")), final_ref)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # step 5 redone once, not duplicated
    assert [r["kept_ids"] for r in log] == [r["kept_ids"] for r in log_ref]
    assert [r["loss_kept"] for r in log] == [r["loss_kept"] for r in log_ref]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [6, 8]  # keep_last=2


class Crash(Exception):
    pass


def crashed_run(out_dir: Path, at_step: int, **extra) -> None:
    """A run stopped by an exception right after step `at_step` (its checkpoints stay on disk)."""
    def on_step(record: dict) -> None:
        if record["step"] == at_step:
            raise Crash

    with deterministic(), pytest.raises(Crash):
        train(make_model(), make_rows(), out_dir=str(out_dir), save_every=2, on_step=on_step,
              **{**OPTIONS, **extra})


def corrupt_truncate(path: Path) -> str:
    file = path / "optimizer.pt"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return r"optimizer\.pt: \d+ bytes, the manifest says \d+ \(truncated\?\)"


def corrupt_flip(path: Path) -> str:
    file = path / "trainable.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    return r"trainable\.safetensors: sha256 does not match"


def corrupt_manifest(path: Path) -> str:
    (path / "manifest.json").write_text('{"format": "fastsel-checkpoint", "ver')
    return r"manifest\.json: unreadable manifest"


def remove_manifest(path: Path) -> str:
    (path / "manifest.json").unlink()
    return r"manifest\.json: missing"


@pytest.mark.filterwarnings("ignore:checkpoint newer than the resumed step")
@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_flip, corrupt_manifest, remove_manifest])
def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, reference, corrupt) -> None:
    final_ref, log_ref = reference
    crashed_run(tmp_path, at_step=5)
    root = tmp_path / "checkpoints"
    latest = root / "step-00000004"
    match = corrupt(latest)
    with pytest.raises(CheckpointError, match=match):
        ckpt.load_checkpoint(latest)
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        assert ckpt.latest_valid_checkpoint(root) == root / "step-00000002"
    model = make_model()
    with deterministic(), pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        result = train(model, make_rows(), out_dir=str(tmp_path), save_every=2, resume=True, **OPTIONS)
    assert result.steps == STEPS
    assert_same_params(trainable(model), final_ref)
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, STEPS + 1))
    assert result.history == read_log(tmp_path)
    assert [r["loss_kept"] for r in result.history] == [r["loss_kept"] for r in log_ref]
    assert list(root.glob("step-00000004.superseded-*"))  # the bad checkpoint is set aside, not deleted


def test_explicit_bad_checkpoint_path_raises(tmp_path) -> None:
    crashed_run(tmp_path, at_step=2)
    target = tmp_path / "checkpoints" / "step-00000002"
    corrupt_truncate(target)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        train(make_model(), make_rows(), out_dir=str(tmp_path / "new"), resume=str(target), **OPTIONS)
    with pytest.raises(CheckpointError, match="no valid checkpoint"), \
            pytest.warns(UserWarning, match="skipping invalid"):
        train(make_model(), make_rows(), out_dir=str(tmp_path / "new"), resume=str(tmp_path), **OPTIONS)


def test_resume_refuses_a_different_data_order(tmp_path) -> None:
    crashed_run(tmp_path, at_step=2)
    with pytest.raises(ValueError, match="batch_size"):
        train(make_model(), make_rows(), out_dir=str(tmp_path), resume=True, **{**OPTIONS, "batch_size": 4})
    with pytest.raises(ValueError, match="dataset_size"):
        train(make_model(), make_rows(20), out_dir=str(tmp_path), resume=True, **OPTIONS)


def test_layout_manifest_and_pruning(tmp_path) -> None:
    with deterministic():
        train(make_model(), make_rows(), out_dir=str(tmp_path), save_every=1, keep_last=3,
              **{**OPTIONS, "max_steps": 5})
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4, 5]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]
    last = root / "step-00000005"
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["step"] == 5 and set(manifest["files"]) == set(ckpt.FILES)
    assert sorted(p.name for p in last.iterdir()) == sorted([*ckpt.FILES, "manifest.json"])
    import hashlib

    for name, entry in manifest["files"].items():
        data = (last / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    state = ckpt.load_checkpoint(last)
    assert state.step == 5 and state.trainer_state["epoch"] == 1 and state.trainer_state["position"] == 1
    assert state.config["batch_size"] == 6 and state.config["strategy"] == "moderate"
    assert set(state.rng) == {"torch_cpu", "torch_cuda", "python", "numpy", "data_order"}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_interrupted_save_leaves_no_checkpoint_and_is_cleaned(tmp_path, monkeypatch) -> None:
    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, rng=ckpt.capture_rng(),
                  trainer_state={"step": 1}, config={})
    ckpt.save_checkpoint(tmp_path, 1, **kwargs)
    real_save = torch.save

    def failing_save(obj, f, *args, **kw):
        if str(getattr(f, "name", "")).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, **kwargs)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no step-2, no temp dir
    # what a SIGKILL during a save leaves: a temp dir, never a final name; resume ignores and removes it
    stale = tmp_path / ".tmp-step-00000002-999-1"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    assert ckpt.latest_valid_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert ckpt.remove_stale_temps(tmp_path) == [stale] and not stale.exists()


def test_rng_round_trip() -> None:
    import random

    import numpy as np

    state = ckpt.capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand(2))
    ckpt.restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def test_trainable_state_mismatch_is_a_checkpoint_error() -> None:
    model = make_model()
    state = ckpt.trainable_state(model)
    name = next(iter(state))
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load_trainable_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.load_trainable_state(model, {**state, name: torch.zeros(1)})


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
