"""The reference gradients a reference strategy (gradshield, harmful_similarity) uses at each optimizer step.

Either fixed (`reference=`: gradient dicts, checked against the model once) or recomputed from reference batches
(`reference_batches=`: one entry per reference, each a batch dict or a list of batch dicts) at the first step and
then every `reference_every` optimizer steps, so the reference follows the model as it moves (0: computed once).
Recomputation runs `fastsel.reference_gradient` in eval mode (no dropout: a deterministic direction), with He et
al.'s anchor normalization for harmful_similarity. `state_dict` / `load_state_dict` carry the current reference
through a checkpoint, so a resumed run uses exactly the reference the interrupted one had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.alignment import reference_gradient
from fastsel.engine.model_io import model_device
from fastsel.engine.references import References, prepare_references
from fastsel.engine.targets import find_targets
from fastsel.selection import strategies
from fastsel.selection.rules import needs_reference
from fastsel.training.options import check_reference_options
from fastsel.utils import eval_mode

_STEP_KEY = "__reference_step__"


class ReferenceSchedule:
    """`get(model, step)`: the checked References for optimizer step `step` (None for other strategies)."""

    def __init__(self, strategy: str, reference: Any = None, reference_batches: Sequence[Any] | None = None,
                 reference_every: int = 0) -> None:
        check_reference_options(strategy, reference, reference_batches, reference_every)
        self.strategy = strategy
        self.reference = reference
        self.batches = list(reference_batches) if reference_batches is not None else None
        self.every = int(reference_every)
        self.current: References | None = None
        self.computed_at: int | None = None  # optimizer step the current reference was computed at

    @property
    def active(self) -> bool:
        return needs_reference(self.strategy)

    def get(self, model: nn.Module, step: int) -> References | None:
        if not self.active:
            return None
        targets = find_targets(model, "trainable")
        if self.batches is None:
            if self.current is None:
                self.current = prepare_references(self.reference, targets, model_device(model))
            return self.current
        due = self.computed_at is None or (self.every > 0 and step % self.every == 0 and step != self.computed_at)
        if due:
            normalize = strategies.strategy(self.strategy).normalized_anchors
            with eval_mode(model):
                grads = [reference_gradient(entry, model, normalize=normalize) for entry in self.batches]
            self.current = prepare_references(grads[0] if len(grads) == 1 else grads, targets, model_device(model))
            self.computed_at = step
        return self.current

    def state_dict(self) -> dict[str, Tensor]:
        """The current recomputed reference as flat tensors (empty for a fixed reference or none yet)."""
        if self.batches is None or self.current is None:
            return {}
        out = {f"reference/{name}": t.detach().cpu().contiguous() for name, t in self.current.tensors.items()}
        out[_STEP_KEY] = torch.tensor([self.computed_at, int(self.current.single)])
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], model: nn.Module) -> bool:
        """Restore a reference saved by `state_dict`; False (nothing restored) when `state` holds none."""
        if self.batches is None or _STEP_KEY not in state:
            return False
        step, single = (int(v) for v in state[_STEP_KEY].tolist())
        tensors = {k.removeprefix("reference/"): v for k, v in state.items() if k.startswith("reference/")}
        targets = find_targets(model, "trainable")
        self.current = prepare_references(References(tensors, bool(single)), targets, model_device(model))
        self.computed_at = step
        return True


__all__ = ["ReferenceSchedule", "check_reference_options"]
