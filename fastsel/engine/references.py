"""Reference gradients for the dot pass: checked against the model's target parameters and stacked once.

A reference R is a gradient-shaped dict {parameter name: tensor} over exactly the parameters a norm pass covers
(`find_targets(model, params)`): the same names as `model.named_parameters()`, the same shapes. Several
references (e.g. harmful and safe anchors) are a list of such dicts; the pass then measures <grad L_i, R_k> for
every example i and reference k at once. `prepare_references` checks them (keys, shapes, finite values: every
error names the parameter) before anything runs, so a bad reference leaves the model untouched, and stacks them
per parameter as one fp32 [K, *shape] tensor on the model's device. Names match with or without the `module.`
prefix of a DistributedDataParallel wrapper, so a reference computed on the unwrapped model serves the DDP one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import torch
from torch import Tensor

from fastsel.engine.targets import Target

ReferenceLike = Union[Mapping[str, Tensor], Sequence[Mapping[str, Tensor]], "References"]


@dataclass(frozen=True)
class References:
    """K checked reference gradients, stacked per parameter: name -> fp32 [K, *shape] on one device.

    `single`: the caller passed one dict (dots come back as [B]) rather than a list (dots [B, K]).
    """

    tensors: dict[str, Tensor]
    single: bool

    @property
    def count(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @cached_property
    def sq_norms(self) -> Tensor:
        """||R_k||^2 over all parameters, fp32 [K] (computed once)."""
        return torch.stack([t.flatten(1).square().sum(dim=1) for t in self.tensors.values()]).sum(dim=0)

    def to(self, device: torch.device) -> References:
        if all(t.device == device for t in self.tensors.values()):
            return self
        return References({n: t.to(device) for n, t in self.tensors.items()}, self.single)

    def unstack(self) -> list[dict[str, Tensor]]:
        """The K references as plain gradient dicts (views of the stacked tensors)."""
        return [{n: t[k] for n, t in self.tensors.items()} for k in range(self.count)]


def _canonical(name: str) -> str:
    """A parameter name without DistributedDataParallel's leading `module.` prefix(es)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _by_target(ref: Mapping[str, Tensor], targets: list[Target]) -> dict[str, Tensor]:
    """`ref` keyed by the targets' own names (keys matched up to the DDP prefix; checked by `_check_keys`)."""
    canonical = {_canonical(k): v for k, v in ref.items()}
    return {t.name: canonical[_canonical(t.name)] for t in targets}


def _label(k: int, single: bool) -> str:
    return "reference" if single else f"reference[{k}]"


def _check_keys(ref: Mapping[str, Tensor], targets: list[Target], label: str) -> None:
    names = [t.name for t in targets]
    given = {_canonical(k) for k in ref}
    missing = [n for n in names if _canonical(n) not in given]
    if missing:
        raise KeyError(f"{label} has no gradient for trainable parameter {missing[0]!r}"
                       f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: a reference must cover "
                       "exactly the parameters of the pass (fastsel.reference_gradient builds one)")
    known = {_canonical(n) for n in names}
    extra = [k for k in ref if _canonical(k) not in known]
    if extra:
        raise KeyError(f"{label} has a gradient for {extra[0]!r}, which is not a trainable parameter of the pass"
                       f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")


def prepare_references(reference: ReferenceLike, targets: list[Target], device: torch.device) -> References:
    """Check `reference` (one dict, a list of dicts, or `References`) against `targets` and stack it.

    Raises TypeError / KeyError / ValueError naming the reference and the parameter: a missing or extra key, a
    shape that differs from the parameter's, a non-floating dtype, or a non-finite value.
    """
    if isinstance(reference, References):
        _check_keys(reference.tensors, targets, "reference")
        tensors = _by_target(reference.tensors, targets)
        for t in targets:
            if tuple(tensors[t.name].shape[1:]) != t.shape:
                raise ValueError(f"reference gradient of {t.name!r} has shape {tuple(tensors[t.name].shape[1:])}, "
                                 f"the parameter {t.shape}")
        if tensors.keys() != reference.tensors.keys():
            reference = References(tensors, reference.single)
        return reference.to(device)
    single = isinstance(reference, Mapping)
    if single:
        refs = [reference]
    elif isinstance(reference, Sequence) and not isinstance(reference, (str, bytes)):
        refs = list(reference)
    else:
        raise TypeError("reference must be a dict {parameter name: gradient tensor} or a list of such dicts, "
                        f"got {type(reference).__name__}")
    if not refs:
        raise ValueError("reference is an empty list: pass at least one gradient dict")
    for k, ref in enumerate(refs):
        label = _label(k, single)
        if not isinstance(ref, Mapping):
            raise TypeError(f"{label} must be a dict {{parameter name: gradient tensor}}, got {type(ref).__name__}")
        _check_keys(ref, targets, label)
        refs[k] = ref = _by_target(ref, targets)
        for t in targets:
            value = ref[t.name]
            if not isinstance(value, Tensor):
                raise TypeError(f"{label}[{t.name!r}] must be a torch.Tensor, got {type(value).__name__}")
            if not value.dtype.is_floating_point:
                raise TypeError(f"{label}[{t.name!r}] must be a floating tensor, got {value.dtype}")
            if tuple(value.shape) != t.shape:
                raise ValueError(f"{label}[{t.name!r}] has shape {tuple(value.shape)}, but the parameter has "
                                 f"shape {t.shape}")
    stacked = {t.name: torch.stack([ref[t.name].detach().to(device=device, dtype=torch.float32) for ref in refs])
               for t in targets}
    finite = torch.stack([torch.isfinite(s).flatten(1).all(dim=1) for s in stacked.values()])  # [P, K], one sync
    if not bool(finite.all()):
        p, k = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{_label(k, single)}[{targets[p].name!r}] holds non-finite values (NaN or inf)")
    return References(stacked, single)


__all__ = ["ReferenceLike", "References", "prepare_references"]
