"""Atomic, checksummed training checkpoints for `fastsel.training.loop`, and finding the latest valid one.

Layout of one checkpoint (`<out_dir>/checkpoints/step-XXXXXXXX/`, 8-digit optimizer step count):

    trainable.safetensors  every trainable parameter, by its `named_parameters()` name
    optimizer.pt           optimizer.state_dict()                      (torch.save, loaded with weights_only)
    scheduler.pt           lr scheduler state_dict()
    rng.pt                 torch CPU/CUDA generators, python `random`, numpy, and the data-order generator
    trainer_state.json     step, epoch, position in the epoch, dataset size, planned steps
    config.json            the TrainConfig (tensor-valued fields replaced by a marker)
    extra.safetensors      optional: other tensors the run must resume with (e.g. the current reference gradients
                           of a reference strategy); present only when the run has some
    manifest.json          format, version, step and {file: {sha256, bytes}} for every file above

Atomicity: the files are written into a temporary directory in the same parent (`.tmp-step-...`), each is
fsynced, the manifest is written last, then the directory is renamed to its final name and the parent fsynced.
A crash leaves at worst a `.tmp-*` directory (removed by `remove_stale_temps`), never a half-written `step-*`.
Loading checks the manifest's sizes and sha256 before unpickling anything, so a truncated or corrupted file
raises `CheckpointError` naming it, and `latest_valid_checkpoint` skips such a checkpoint with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fastsel.utils import atomic_write_file, fsync_path, write_synced

FORMAT = "fastsel-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json",
         "config.json")
OPTIONAL_FILES = ("extra.safetensors",)  # verified when the manifest lists them
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """A verified checkpoint's contents (tensors on the CPU)."""

    path: Path
    step: int
    trainable: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    trainer_state: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Tensor] = field(default_factory=dict)  # extra.safetensors (empty when absent)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of the parameters that require grad, by name (a tied parameter appears once)."""
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `state` into the model's trainable parameters; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise CheckpointError(f"{source}: trainable parameters do not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{'...' if len(extra) > 5 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{source}: parameter {name!r} has shape {tuple(value.shape)} in the "
                                      f"checkpoint but {tuple(p.shape)} in the model")
            p.copy_(value.to(device=p.device, dtype=p.dtype))


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """A safetensors file, written atomically (contiguous copies where needed)."""
    from safetensors.torch import save_file

    atomic_write_file(path, lambda name: save_file({k: v.contiguous() for k, v in tensors.items()}, name))


def load_trainable_file(model: nn.Module, path: str | os.PathLike) -> None:
    """`load_trainable_state` from a safetensors file (as `save_tensors(trainable_state(model), path)` wrote)."""
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(path)), source=str(path))


def capture_rng(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """All random states that influence training: torch CPU/CUDA, python `random`, numpy, data order."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if data_generator is not None:
        state["data_order"] = data_generator.get_state()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng` for the global generators (the data-order state is restored by its owner)."""
    torch.set_rng_state(state["torch_cpu"])
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} device(s), this process sees "
                          f"{torch.cuda.device_count()}: CUDA RNG states not restored", stacklevel=2)
        else:
            torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npd = state["numpy"]
    np.random.set_state({"bit_generator": npd["bit_generator"],
                         "state": {"key": np.asarray(npd["key"], dtype=np.uint32), "pos": npd["pos"]},
                         "has_gauss": npd["has_gauss"], "gauss": npd["gauss"]})


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step-XXXXXXXX` directory under `root`, oldest first (validity not checked)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-*` / `.trash-*` directories left by a crash during a save; returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp-", ".trash-")) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def set_aside_after(root: str | os.PathLike, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` (an abandoned future after resuming from `step`) to
    `step-XXXXXXXX.superseded-<time>`: neither loaded nor pruned by mistake. Returns the new paths."""
    moved = []
    for later_step, path in list_checkpoints(root):
        if later_step > step:
            target = path.with_name(f"{path.name}.superseded-{time.time_ns()}")
            os.replace(path, target)
            moved.append(target)
    if moved:
        fsync_path(Path(root))
    return moved


def save_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rng: Mapping[str, Any], trainer_state: Mapping[str, Any],
                    config: Mapping[str, Any], keep_last: int | None = 2,
                    extra: Mapping[str, Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically under `root`; then keep only the newest `keep_last` checkpoints.

    `extra`: further tensors to resume with (written as extra.safetensors when non-empty).

    Returns the final checkpoint directory. An existing checkpoint of the same step (from an abandoned run) is
    replaced.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        weights = trainable_state(model)
        save_file(weights, str(tmp / "trainable.safetensors"), metadata={"format": FORMAT, "step": str(step)})
        fsync_path(tmp / "trainable.safetensors")
        write_synced(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
        write_synced(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
        write_synced(tmp / "rng.pt", lambda f: torch.save(dict(rng), f))
        write_synced(tmp / "trainer_state.json", lambda f: json.dump(dict(trainer_state), f, indent=1), mode="w")
        write_synced(tmp / "config.json", lambda f: json.dump(dict(config), f, indent=1, sort_keys=True), mode="w")
        names = list(FILES)
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
            fsync_path(tmp / "extra.safetensors")
            names.append("extra.safetensors")
        files = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in names}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        write_synced(tmp / MANIFEST, lambda f: json.dump(manifest, f, indent=1), mode="w")
        fsync_path(tmp)
        if final.exists():  # a same-step checkpoint of an abandoned run: move it aside, then swap
            trash = root / f".trash-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest and every listed file's size and sha256; return the manifest, or raise
    CheckpointError naming the first bad file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (the checkpoint was not fully written)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or set(FILES) - set(files):
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest or it lists no {sorted(FILES)}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_path}: format version {manifest.get('version')}, "
                              f"expected {VERSION}")
    for name in [*FILES, *(n for n in OPTIONAL_FILES if n in files)]:
        file = path / name
        expected = files[name]
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {expected.get('bytes')} "
                                  "(truncated?)")
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{file}: sha256 does not match the manifest (corrupted)")
    return manifest


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify then load a checkpoint; any problem raises CheckpointError naming the file."""
    path = Path(path)
    manifest = verify_checkpoint(path)

    def read(name: str, loader: Callable[[Path], Any]) -> Any:
        try:
            return loader(path / name)
        except Exception as exc:  # checksums matched, but the content still cannot be read
            raise CheckpointError(f"{path / name}: cannot be loaded ({type(exc).__name__}: {exc})") from exc

    def torch_load(p: Path) -> Any:
        return torch.load(p, map_location=map_location, weights_only=True)

    return Checkpoint(
        path=path,
        step=int(manifest["step"]),
        trainable=read("trainable.safetensors", lambda p: load_file(str(p))),
        optimizer=read("optimizer.pt", torch_load),
        scheduler=read("scheduler.pt", torch_load),
        rng=read("rng.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
        trainer_state=read("trainer_state.json", lambda p: json.loads(p.read_text())),
        config=read("config.json", lambda p: json.loads(p.read_text())),
        extra=read("extra.safetensors", lambda p: load_file(str(p))) if "extra.safetensors" in manifest["files"]
        else {},
    )


def latest_valid_checkpoint(root: str | os.PathLike) -> Path | None:
    """Newest checkpoint under `root` that passes `verify_checkpoint`; invalid ones are skipped, warned."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping invalid checkpoint: {exc}", stacklevel=2)
            continue
        return path
    return None
