"""The selection strategies: one entry per rule, saying what the rule needs; every other layer asks here.

A new strategy is an entry below plus its rule in `fastsel.selection.rules` and a plain-Python reference test
in tests/selection/. The training step, the loop, the Trainer integration and the experiment configs read
`needs_norms`, `uses_loss_band`, `uses_ratio`, `references` from the entry instead of naming strategies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    """A selection rule and what it measures."""

    name: str
    needs_norms: bool  # the per-example gradient norms (the norm pass)
    uses_loss_band: bool  # its candidates are the loss band |L_i - mean L| <= loss_band * std L
    uses_ratio: bool  # it keeps k = max(1, floor(ratio * B)) examples
    draws: bool = False  # it draws at random (seeded)
    references: tuple[int, int] | None = None  # (fewest, most) reference gradients it scores against
    normalized_anchors: bool = False  # its references are means of unit-normalized anchor gradients

    @property
    def needs_measurement(self) -> bool:
        """Whether the rule needs the norm pass (norms, or dots with references)."""
        return self.needs_norms or self.references is not None


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("moderate", needs_norms=True, uses_loss_band=True, uses_ratio=True),  # Bach et al.'s Moderate-G
    Strategy("low", needs_norms=True, uses_loss_band=True, uses_ratio=True),
    Strategy("high", needs_norms=True, uses_loss_band=True, uses_ratio=True),
    Strategy("random", needs_norms=False, uses_loss_band=True, uses_ratio=True, draws=True),
    Strategy("full", needs_norms=False, uses_loss_band=False, uses_ratio=False),  # no selection: every example
    Strategy("gradshield", needs_norms=False, uses_loss_band=False, uses_ratio=False, references=(1, 1)),
    Strategy("harmful_similarity", needs_norms=False, uses_loss_band=False, uses_ratio=True, references=(1, 2),
             normalized_anchors=True),
)}
DEFAULT = "moderate"  # the paper's rule: the default of every entry point
EVERY_EXAMPLE = "full"  # the rule that keeps every example (plain training through the same step)
# Bach et al.'s hypothesis, most harmful first: what the experiment's ordering check tests
HARM_ORDER = ("high", "random", "moderate", "low")


def strategy(name: str) -> Strategy:
    """The registry entry of `name`; ValueError naming the choices for an unknown one."""
    found = STRATEGIES.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown strategy {name!r}: expected one of {tuple(STRATEGIES)}")
    return found


def names(*, references: bool | None = None) -> tuple[str, ...]:
    """Strategy names in registry order; `references` True / False keeps only those that do / do not score
    against reference gradients."""
    return tuple(n for n, s in STRATEGIES.items()
                 if references is None or (s.references is not None) == references)
