"""Which parameters a norm covers, and which supported module computes each one's gradient.

fastsel attributes each per-example gradient to the module call that produced it, so every parameter in the norm
must belong to a module whose gradient it knows how to form: a layer type of `fastsel.engine.sites` (nn.Linear,
nn.Embedding, transformers' Conv1D, ...).
PEFT LoRA adapters are two `nn.Linear` modules (`lora_A`, `lora_B`) and need nothing more; LoRA variants such as DoRA
compute their update outside those modules and are refused. A parameter shared by several modules (tied input and
output embeddings) gets one gradient: the sum over all the modules' calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from fastsel.engine.sites import Role, role_of, supported_types

PARAM_SETS = ("trainable", "lora")


@dataclass
class Target:
    """One parameter in the norm and the (module, role) pairs that produce its gradient."""

    name: str
    param: Tensor
    owners: list[tuple[str, nn.Module, Role]] = field(default_factory=list)  # (module name, module, its role)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def _is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def _check_lora_variants(model: nn.Module) -> None:
    """Refuse PEFT LoRA variants (DoRA, ...) whose update bypasses the lora_A/lora_B modules."""
    for name, module in model.named_modules():
        variants = getattr(module, "lora_variant", None)
        if variants:
            kinds = sorted({type(v).__name__ for v in variants.values()})
            raise NotImplementedError(
                f"module {name!r} uses a LoRA variant ({', '.join(kinds)}), e.g. DoRA: its update is computed "
                "outside the lora_A/lora_B Linear modules, so fastsel cannot form exact per-example norms for it"
            )


def find_targets(model: nn.Module, params: str = "trainable") -> list[Target]:
    """The parameters a norm covers (`params`: 'trainable' = all with requires_grad, 'lora' = LoRA factors only).

    Raises ValueError when nothing is trainable, and NotImplementedError naming the first trainable parameter
    whose module fastsel does not support (suggesting params='lora' where LoRA factors exist).
    """
    if params not in PARAM_SETS:
        raise ValueError(f"unknown params={params!r}: expected one of {PARAM_SETS}")
    _check_lora_variants(model)
    chosen: dict[int, Target] = {}
    for name, p in model.named_parameters():  # deduplicated: a tied parameter appears once
        if not p.requires_grad:
            continue
        if params == "lora" and not _is_lora_name(name):
            continue
        chosen[id(p)] = Target(name, p)
    if not chosen:
        what = "LoRA parameters (lora_A/lora_B)" if params == "lora" else "trainable parameters"
        raise ValueError(f"the model has no {what}: nothing to compute a gradient norm over")
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            target = chosen.get(id(p))
            if target is None:
                continue
            role = role_of(module, pname)
            if role is None:
                has_lora = any(_is_lora_name(n) for n, q in model.named_parameters() if q.requires_grad)
                hint = " Use params='lora' to restrict the norm to the LoRA factors." if has_lora else ""
                raise NotImplementedError(
                    f"trainable parameter {mname + '.' + pname if mname else pname!r} belongs to an unsupported "
                    f"module of type {type(module).__name__}; fastsel supports {', '.join(supported_types())} "
                    f"(Linear incl. PEFT LoRA factors; Embedding without max_norm/scale_grad_by_freq/sparse: "
                    f"fastsel.engine.sites).{hint}"
                )
            target.owners.append((mname, module, role))
    return list(chosen.values())
