"""The Triton kernels' first-use self-test, simulated on the CPU: the interpreter kernels stand in for the compiled
ones (FASTSEL_KERNEL_SELFTEST=always runs the self-test on the CPU too), and a monkeypatched kernel stands in for
one that miscompiles (a wrong answer) or fails to launch (an exception). Backend 'auto' on CUDA is simulated by
resolving 'auto' to 'triton'."""

from __future__ import annotations

import warnings

import pytest
import torch
from needs import need_kernels, on_kernel_device
from tiny import full_finetune, lora, make_batch, make_packed, tiny_model

import fastsel
from fastsel.engine import kernel_selftest as S
from fastsel.engine import norms

kernels = need_kernels()
pytestmark = pytest.mark.usefixtures("one_thread")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def first_use(monkeypatch: pytest.MonkeyPatch):
    """A fresh process as far as the self-test knows, with the self-test on for this device."""
    monkeypatch.setenv(S.ENV, "always")
    S.reset()
    yield
    S.reset()


@pytest.fixture
def auto_is_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='auto' picks the Triton kernels here, as it does on CUDA."""
    resolve = norms.resolve_backend
    monkeypatch.setattr(norms, "resolve_backend",
                        lambda backend, model: "triton" if backend == "auto" else resolve(backend, model))


def _break(monkeypatch: pytest.MonkeyPatch, family: str, how: str) -> None:
    """Make `family`'s kernels give a 1% wrong answer or raise, as a miscompiled kernel would. A 'segment_*'
    family is hit by packed calls (more segments than rows), a plain one by calls with one example per row."""
    real_single, real_grouped = kernels.linear_sq_norms, kernels.grouped_linear_sq_norms

    def form(x, segments, name: str) -> str:  # noqa: ANN001
        packed = segments is not None and segments.shape[0] != x.shape[0]
        return f"segment_{name}" if packed else name

    def single(x, delta, *, method="auto", write_grads=False, segments=None, **kw):  # noqa: ANN001, ANN003
        norms_, grads = real_single(x, delta, method=method, write_grads=write_grads, segments=segments, **kw)
        hit = form(x, segments, "write_grads" if write_grads else method) == family
        if hit and how == "raise":
            raise RuntimeError(f"simulated launch failure of {family}")
        if hit:
            return (norms_, grads * 1.01) if write_grads else (norms_ * 1.01, grads)
        return norms_, grads

    def grouped(xs, deltas, *, segments=None, **kw):  # noqa: ANN001, ANN003
        out = real_grouped(xs, deltas, segments=segments, **kw)
        hit = form(xs[0], segments, "grouped") == family
        if hit and how == "raise":
            raise RuntimeError(f"simulated launch failure of {family}")
        return out * 1.01 if hit else out

    real_dots, real_dots_alone, real_grouped_dots = (kernels.linear_sq_norms_dots, kernels.linear_dots,
                                                      kernels.grouped_linear_sq_norms_dots)

    def broken(out, hit: bool):  # noqa: ANN001, ANN202
        if hit and how == "raise":
            raise RuntimeError(f"simulated launch failure of {family}")
        if not hit:
            return out
        return tuple(o * 1.01 for o in out) if isinstance(out, tuple) else out * 1.01

    def dots(x, delta, refs, *, segments=None, **kw):  # noqa: ANN001, ANN003
        return broken(real_dots(x, delta, refs, segments=segments, **kw), form(x, segments, "dots") == family)

    def dots_alone(x, delta, refs, *, segments=None, **kw):  # noqa: ANN001, ANN003
        return broken(real_dots_alone(x, delta, refs, segments=segments, **kw), form(x, segments, "dots") == family)

    def grouped_dots(xs, deltas, refs, *, segments=None, **kw):  # noqa: ANN001, ANN003
        return broken(real_grouped_dots(xs, deltas, refs, segments=segments, **kw),
                      form(xs[0], segments, "grouped_dots") == family)

    monkeypatch.setattr(kernels, "linear_sq_norms", single)
    monkeypatch.setattr(kernels, "grouped_linear_sq_norms", grouped)
    monkeypatch.setattr(kernels, "linear_sq_norms_dots", dots)
    monkeypatch.setattr(kernels, "linear_dots", dots_alone)
    monkeypatch.setattr(kernels, "grouped_linear_sq_norms_dots", grouped_dots)


def test_every_family_passes_on_the_real_kernels(first_use) -> None:
    report = S.run_all(DEV, (torch.float32,))
    name = S.device_name(DEV)
    assert set(report) == {f"{name} float32 {family}" for family in S.CHECKS}
    assert all(v.startswith("passed") for v in report.values()), report
    assert fastsel.backends()["triton_selftest"] == report


@pytest.mark.parametrize("family", list(S.CHECKS))
@pytest.mark.parametrize("how", ["wrong", "raise"])
def test_each_check_catches_a_broken_kernel(family: str, how: str, first_use, monkeypatch) -> None:
    _break(monkeypatch, family, how)
    result = S.run(family, S.Case(DEV, torch.float32, torch.float32))
    assert not result.ok
    assert ("max relative error" in result.detail) if how == "wrong" else ("RuntimeError" in result.detail)
    if how == "wrong":  # the breakage stays in its family ('raise' hits the same calls: checked once)
        others = [f for f in S.CHECKS if f != family]
        assert all(S.run(f, S.Case(DEV, torch.float32, torch.float32)).ok for f in others)


@pytest.mark.parametrize("family,how", [("gram", "raise"), ("instantiate", "wrong"),
                                         ("segment_instantiate", "wrong")])
def test_auto_falls_back_to_torch_with_one_warning(family: str, how: str, first_use, auto_is_triton,
                                                   monkeypatch) -> None:
    """The failing family's sites get the torch math, the others keep the kernels; exact norms either way."""
    _break(monkeypatch, family, how)
    model = full_finetune(tiny_model()) if family == "gram" else lora(tiny_model(), r=4)
    packed = family.startswith("segment_")
    batch = make_packed([[5, 4], [6]]) if packed else make_batch([7, 5, 6], side="left")
    if DEV.type == "cuda":
        model, batch = model.cuda(), {k: v.cuda() for k, v in batch.items()}
    expected = fastsel.grad_norms(batch, model, backend="torch")
    with pytest.warns(S.KernelSelfTestWarning, match=rf"'{family}' kernels on .* failed .*torch backend") as caught:
        got = fastsel.grad_norms(batch, model, backend="auto")
    assert len([w for w in caught if issubclass(w.category, S.KernelSelfTestWarning)]) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.KernelSelfTestWarning)  # one warning per (device, dtype, family)
        torch.testing.assert_close(fastsel.grad_norms(batch, model, backend="auto"), expected, rtol=1e-5, atol=0)
        sel = fastsel.selective_backward(batch, model, ratio=0.5, backend="auto", single_pass=True)
    assert sel.num_selected == 1
    state = fastsel.backends()["triton_selftest"]
    key = f"{S.device_name(DEV)} float32 {family}"
    assert state[key].startswith("FAILED, torch used:") and family in state[key]
    assert any(v.startswith("passed") for v in state.values())  # the families that were needed and passed


def test_explicit_triton_raises_and_leaves_the_model_as_found(first_use, monkeypatch) -> None:
    _break(monkeypatch, "write_grads", "wrong")
    model, batch = on_kernel_device(lora(tiny_model(), r=4), make_batch([7, 5, 6]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert fastsel.grad_norms(batch, model, backend="triton").shape == (3,)  # norms need no write_grads
    for _ in range(2):  # every time, not only at the first failure
        with pytest.raises(S.KernelSelfTestError, match="'write_grads' kernels .* explicitly"):
            fastsel.selective_backward(batch, model, ratio=0.5, backend="triton", single_pass=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_autocast_around_the_first_use_does_not_fail_the_check(first_use) -> None:
    """train runs the norm pass under bf16 autocast on CUDA: the check's torch reference must stay fp32."""
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        assert S.usable("write_grads", DEV, torch.float32, torch.float32, strict=True)
        assert S.usable("gram", DEV, torch.float32, torch.float32, strict=True)


def test_the_mode_decides_where_it_runs(monkeypatch) -> None:
    S.reset()
    monkeypatch.setenv(S.ENV, "auto")
    assert S.usable("gram", torch.device("cpu"), torch.float32, torch.float32, strict=True) and not S.report()
    monkeypatch.setenv(S.ENV, "off")
    assert S.usable("gram", DEV, torch.float32, torch.float32, strict=True) and not S.report()
    monkeypatch.setenv(S.ENV, "sometimes")
    with pytest.raises(ValueError, match=S.ENV):
        S.mode()
    with pytest.raises(KeyError, match="no self-test for kernel family 'nope'"):
        S.run("nope", S.Case(DEV, torch.float32, torch.float32))
