"""Layer types fastsel forms per-example gradients for: one file per type, registered by module type.

A *site* knows one module type: which of its parameters it supports, and how one call's input and output gradient
factor each parameter's per-example gradient. The engine asks the registry (`role_of`) and never checks a module
type itself. A parameter's gradient over one call is one of:

- an outer-product sum G_i = sum_t a_t b_t^T (a [B, T, m] dense, or [B, T] token ids standing for one-hot rows
  of an m-row weight; b [B, T, n]): Linear and Conv1D weights (a = output-grad, b = input, or the transpose),
  Embedding weights (a = ids, b = output-grad);
- a per-token vector summed over the example's tokens (`b` None: G_i = sum_t a_t): biases.

To support another layer type add one file here defining a `Site` subclass decorated with `@register(ModuleType)`
(the engine imports every module of this package at its first lookup), and a naive-equality test in
tests/engine/test_sites.py. Nothing else in the engine changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn


class Factors(NamedTuple):
    """One call's contribution to a parameter's per-example gradient (see the module docstring)."""

    a: Tensor  # [B, T, m] dense, or token ids [B, T]
    b: Tensor | None  # [B, T, n], or None for a per-token vector summed over tokens


class Site:
    """A module type's parameters and their gradient factors. Subclasses override `roles` and `factors`."""

    def roles(self, module: nn.Module) -> dict[str, str] | None:
        """{parameter name: role} of the parameters this site supports on `module`; None if `module`'s forward
        is not the one this site knows (a subclass overriding it, unsupported options)."""
        raise NotImplementedError

    def factors(self, module: nn.Module, role: str, inp: Tensor, grad_out: Tensor) -> Factors:
        """The gradient factors of parameter role `role` for one call with input `inp` and output-grad."""
        raise NotImplementedError


_SITES: dict[type, Site] = {}
_LOADED = False


def register(module_type: type) -> Callable[[type[Site]], type[Site]]:
    """Class decorator: the decorated Site handles modules of exactly `module_type`."""

    def wrap(cls: type[Site]) -> type[Site]:
        _SITES[module_type] = cls()
        return cls

    return wrap


def _load() -> None:
    """Import every site module of this package (once, at the first lookup: registration is explicit, not a
    side effect of importing fastsel)."""
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


@dataclass(frozen=True)
class Role:
    """One parameter of one module: its site and role name; `factors` of a call of that module."""

    site: Site
    module: nn.Module
    name: str  # the parameter's attribute name on the module ('weight', 'bias')
    role: str

    def factors(self, inp: Tensor, grad_out: Tensor) -> Factors:
        return self.site.factors(self.module, self.role, inp, grad_out)


def role_of(module: nn.Module, param_name: str) -> Role | None:
    """The Role of `module`'s own parameter `param_name`, or None when no site supports it."""
    _load()
    site = _SITES.get(type(module))
    roles = site.roles(module) if site is not None else None
    if roles is None or param_name not in roles:
        return None
    return Role(site, module, param_name, roles[param_name])


def supported_types() -> list[str]:
    """Names of the registered module types (for error messages)."""
    _load()
    return sorted(t.__name__ for t in _SITES)
