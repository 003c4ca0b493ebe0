"""The kernel files' specs (`fastsel.kernels.specs()`): one declaration per kernel family, which the first-use
self-test and the ahead-of-time compile sweep both iterate."""

from __future__ import annotations

import pytest
import torch
from needs import need_kernels
from test_aot import load_aot

from fastsel.engine import kernel_selftest
from fastsel.kernels import reference
from fastsel.kernels.spec import AotSite, KernelSpec

kernels = need_kernels()

# what fastsel.engine.backends asks `usable` for: the norm forms, single pass and dots, padded and packed
ENGINE_FAMILIES = {f"{prefix}{form}" for prefix in ("", "segment_")
                   for form in ("instantiate", "gram", "grouped", "write_grads", "dots", "grouped_dots")} | {"outer"}


def test_every_family_the_engine_asks_for_is_declared_once_with_a_launcher() -> None:
    specs = kernels.specs()
    assert set(specs) == ENGINE_FAMILIES
    for family, spec in specs.items():
        assert spec.family == family and callable(spec.selftest)
        assert callable(getattr(kernels, spec.launcher)), f"{family}: no launcher {spec.launcher!r}"


def test_the_self_test_runs_the_specs_cases() -> None:
    specs = kernels.specs()
    assert dict(kernel_selftest.CHECKS) == {family: spec.selftest for family, spec in specs.items()}


def test_the_quick_aot_sweep_is_the_specs_sites_and_covers_every_kernel() -> None:
    aot = load_aot()
    sites = aot.default_sites(quick=True)
    assert sites == [site for spec in kernels.specs().values() for site in spec.aot_sites]
    launched = {aot.site_launch(site).kernel.__name__ for site in sites}
    assert launched == {"_instantiate_kernel", "_gram_sq_norm_kernel", "_outer_kernel", "_instantiate_dot_kernel",
                        "_project_dot_kernel"}


def test_a_new_family_is_declared_in_its_file_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a spec to a kernel file's SPECS is all it takes: the self-test and the sweep see it."""
    from fastsel.kernels import gram_norm

    seen: list[reference.Case] = []
    site = AotSite("new family site", 64, 32, 48, method="gram")
    new = KernelSpec("new_family", "linear_sq_norms", seen.append, (site,))
    monkeypatch.setattr(gram_norm, "SPECS", (*gram_norm.SPECS, new))
    assert kernel_selftest.run("new_family", reference.Case(torch.device("cpu"), torch.float32, torch.float32)).ok
    assert len(seen) == 1
    assert site in load_aot().default_sites(quick=True)


def test_a_family_declared_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastsel.kernels import grouped

    monkeypatch.setattr(grouped, "SPECS", (*grouped.SPECS, grouped.SPECS[0]))
    with pytest.raises(RuntimeError, match="'grouped' is declared twice"):
        kernels.specs()


def test_the_reference_is_the_plain_per_example_gradient() -> None:
    """The reference every self-test case uses, against an explicit sum of outer products."""
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 3, generator=g)
    spans = [(0, 0, 2), (0, 2, 6), (1, 1, 4)]
    grads = reference.example_grads(x, delta, spans)
    for i, (r, s, e) in enumerate(spans):
        expected = sum(torch.outer(delta[r, t], x[r, t]) for t in range(s, e))
        torch.testing.assert_close(grads[i], expected, rtol=1e-6, atol=1e-6)
    refs = torch.randn(4, 3, 5, generator=g)
    torch.testing.assert_close(reference.grad_dots(grads, refs), torch.einsum("smn,kmn->sk", grads, refs))
    with pytest.raises(reference.KernelMismatch, match="max relative error"):
        reference.compare("x", grads * 1.01, grads)
