"""Gradient dots <grad L_i, R_k> against the naive one-example-at-a-time backward; reference gradients; one pass."""

from __future__ import annotations

import pytest
import torch
from needs import need_kernels, on_kernel_device
from tiny import (
    assert_same,
    full_finetune,
    lora,
    make_batch,
    make_packed,
    reused_module_case,
    snapshot,
    tiny_model,
)

import fastsel
from fastsel.engine import dot_math, linear_math
from fastsel.engine.norms import norm_pass

pytestmark = pytest.mark.usefixtures("one_thread")


def dot_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| relative to max |expected| (the acceptance measure)."""
    assert got.shape == expected.shape and got.dtype == torch.float32
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def references(model: torch.nn.Module, seed: int = 5, params: str = "trainable") -> list[dict[str, torch.Tensor]]:
    """A real reference (gradient of another batch's mean loss) and a random one of the same shapes."""
    real = fastsel.reference_gradient(make_batch([6, 9, 4], seed=seed), model, params=params)
    g = torch.Generator().manual_seed(seed)
    return [real, {k: torch.randn(v.shape, generator=g) for k, v in real.items()}]


def check_against_naive(batch: dict, model: torch.nn.Module, refs, backend: str = "torch", tol: float = 1e-5,
                        **kw) -> None:
    got = norm_pass(batch, model, backend=backend, reference=refs, **kw)
    expected = norm_pass(batch, model, backend="naive", reference=refs, **kw)
    assert dot_err(got.dots, expected.dots) <= tol
    for name, value in got.param_dots.items():  # every parameter, not only the total
        scale = expected.param_dots[name].abs().max().clamp_min(1e-12)
        assert float((value - expected.param_dots[name]).abs().max() / scale) <= max(tol, 1e-4), name
    torch.testing.assert_close(got.norms, expected.norms, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------- torch forms

@pytest.mark.parametrize(("m", "n"), [(3, 10), (10, 3), (4, 4)])
def test_linear_dot_forms_equal_instantiated_gradients(m: int, n: int) -> None:
    x, delta, refs = torch.randn(3, 5, n), torch.randn(3, 5, m), torch.randn(2, m, n)
    expected = dot_math.grads_dots(linear_math.per_example_grads(x, delta), refs)
    torch.testing.assert_close(dot_math.linear_dots(x, delta, refs), expected, rtol=1e-5, atol=1e-5)
    for method in ("instantiate", "gram"):
        sq, dots = dot_math.sq_norms_and_dots(x, delta, refs, method)
        torch.testing.assert_close(dots, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sq, linear_math.sq_norms_instantiate(x, delta), rtol=1e-5, atol=1e-5)


def test_embedding_and_bias_token_dots() -> None:
    from fastsel.engine.accumulate import embedding_grads

    ids, delta, refs = torch.randint(0, 7, (2, 6)), torch.randn(2, 6, 4), torch.randn(3, 7, 4)
    expected = dot_math.grads_dots(embedding_grads(ids, delta, 7), refs)
    torch.testing.assert_close(dot_math.reduce_tokens(dot_math.embedding_token_dots(ids, delta, refs)), expected)
    bias_refs = torch.randn(3, 4)
    torch.testing.assert_close(dot_math.reduce_tokens(dot_math.bias_token_dots(delta, bias_refs)),
                               delta.sum(1) @ bias_refs.T)


# ------------------------------------------------------------------------------------------ against the oracle

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_lora_dots_match_naive(kind: str, side: str) -> None:
    model = lora(tiny_model(kind))
    check_against_naive(make_batch([7, 12, 5, 9], side=side), model, references(model))


def test_single_reference_gives_b_and_grad_dots_agrees() -> None:
    model = lora(tiny_model("qwen2"), r=3, targets=["q_proj", "down_proj"])
    ref = references(model)[0]
    batch = make_batch([5, 8, 6], side="left")
    measured = norm_pass(batch, model, backend="torch", reference=ref)
    assert measured.dots.shape == (3,) and measured.cosines.shape == (3,)
    torch.testing.assert_close(fastsel.grad_dots(batch, model, ref, backend="torch"), measured.dots)
    expected = fastsel.grad_dots(batch, model, ref, backend="naive")
    assert dot_err(measured.dots, expected) <= 1e-5
    ref_norm = torch.sqrt(sum(v.square().sum() for v in ref.values()))
    torch.testing.assert_close(measured.cosines, measured.dots / (measured.norms * ref_norm))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant: bool) -> None:
    model = lora(tiny_model())
    model.train()
    refs = references(model)
    batch = make_batch([7, 10, 4], side="left")
    expected = norm_pass(batch, model, backend="naive", reference=refs).dots
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    assert dot_err(norm_pass(batch, model, backend="torch", reference=refs).dots, expected) <= 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_embeddings_with_lora(tie: bool) -> None:
    model = lora(tiny_model("qwen2", tie=tie))
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    model.base_model.model.lm_head.weight.requires_grad_(True)
    assert (model.base_model.model.lm_head.weight is model.base_model.model.model.embed_tokens.weight) == tie
    check_against_naive(make_batch([7, 12, 5], side="left"), model, references(model))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("instantiate", [True, False])
def test_full_finetuning_tied_embeddings(tie: bool, instantiate: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tied embedding + lm_head: one parameter fed by two calls (summed per-example gradients, or, with no
    instantiation budget, the per-call dots added)."""
    from fastsel.engine import accumulate

    if not instantiate:
        monkeypatch.setattr(accumulate, "INSTANTIATE_BUDGET_BYTES", 0)
    model = full_finetune(tiny_model(tie=tie))
    model.model.embed_tokens.padding_idx = 5  # its row gets no gradient
    batch = make_batch([7, 12, 5, 3], side="right")
    batch["input_ids"][0, 3] = 5
    check_against_naive(batch, model, references(model))


def test_reused_module_called_twice_adds_the_calls_dots() -> None:
    model, batch = reused_module_case()
    refs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    check_against_naive(batch, model, refs)


def test_keep_grads_and_params_lora() -> None:
    model = lora(tiny_model())
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    refs = references(model, params="lora")
    batch = make_batch([5, 8], side="left")
    check_against_naive(batch, model, refs, params="lora", keep_grads=False)
    kept = norm_pass(batch, model, backend="torch", reference=refs, params="lora", keep_grads=True)
    expected = norm_pass(batch, model, backend="naive", reference=refs, params="lora")
    assert dot_err(kept.dots, expected.dots) <= 1e-5


@pytest.mark.parametrize("case", ["lora-left", "full-right"])
def test_triton_backend_dots_match_torch_and_naive(case: str) -> None:
    """Through the Triton dot kernels (CPU interpreter here): fused instantiate+dot (LoRA), Gram norms + the
    delta^T R x kernel (full fine-tuning, short T), grouped launches; == torch and == naive."""
    need_kernels()
    if case == "lora-left":
        model = lora(tiny_model(), r=4, targets=["q_proj", "v_proj", "down_proj"])
        batch = make_batch([7, 12, 5], side="left")
    else:
        model = full_finetune(tiny_model())
        batch = make_batch([7, 4, 5], side="right")
    refs = references(model)
    model, batch = on_kernel_device(model, batch)
    got = norm_pass(batch, model, backend="triton", reference=refs)
    torch_dots = norm_pass(batch, model, backend="torch", reference=refs).dots
    assert dot_err(got.dots.cpu(), torch_dots.cpu()) <= 1e-5
    assert dot_err(got.dots.cpu(), norm_pass(batch, model, backend="naive", reference=refs).dots.cpu()) <= 1e-5


# ------------------------------------------------------------------------------------------------- packed rows

PACKED_ROWS = [[7, 2, 12], [5, 2, 9, 3]]  # several sequences per row, several rows, length-2 sequences


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_dots_equal_the_naive_per_sequence_loop(backend: str) -> None:
    """A packed batch (padding-free rows, one right-padded): every sequence is one example; its dots with two
    references == the naive loop over each sequence alone (fp32, <= 1e-5 of max |dot|). torch: per-token terms
    reduced with Segments.sum (and the per-sequence gradients where the norm instantiates); triton: the dot
    kernels over the (row, start, end) segments (CPU interpreter here)."""
    if backend == "triton":
        need_kernels()
    model, batch = lora(tiny_model(), r=4), make_packed(PACKED_ROWS, pad=3, prompt=1)
    if backend == "triton":
        model, batch = on_kernel_device(model, batch)
    refs = references(model)
    got = norm_pass(batch, model, backend=backend, reference=refs)
    assert got.dots.shape == (7, 2)
    check_against_naive(batch, model, refs, backend=backend)
    assert dot_err(fastsel.grad_dots(batch, model, refs[0], backend=backend), got.dots[:, 0]) <= 1e-6


# normalize: one pass keeping the unit per-example gradients (budget), or a norm pass + a weighted pass (no budget)
@pytest.mark.parametrize(("normalize", "budget"), [(False, 1 << 30), (True, 1 << 30), (True, 0)])
def test_reference_gradient_of_packed_anchors_equals_the_padded_one(normalize: bool, budget: int) -> None:
    """Anchors packed padding-free give the reference of the same anchors padded: the mean over the sequences of
    their gradients (or unit gradients), each sequence one example."""
    model = lora(tiny_model(), r=4)
    lengths = [6, 9, 4, 7, 5]
    padded, packed = make_batch(lengths), make_packed([lengths[:3], lengths[3:]])
    kw = dict(normalize=normalize, memory_budget_bytes=budget)
    expected = fastsel.reference_gradient(padded, model, **kw)
    got = fastsel.reference_gradient([packed], model, **kw)
    for name, value in expected.items():  # fp32 rounding of different shapes: within 1e-5 of the largest entry
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()))


def test_packed_dots_with_trainable_tied_embeddings_and_gram_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tuning on packed rows: the tied embedding (two calls) and the Gram-form sites, whose dots come
    from per-token terms summed per sequence; == naive."""
    monkeypatch.setattr("fastsel.engine.accumulate.INSTANTIATE_BUDGET_BYTES", 0)  # the Gram/mixed paths
    model = full_finetune(tiny_model("qwen2", tie=True))
    check_against_naive(make_packed([[5, 4], [6]], prompt=1), model, references(model))


# ------------------------------------------------------------------------------------------------- one pass

def test_norm_pass_with_references_runs_one_forward_and_one_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora(tiny_model())
    refs = references(model)
    calls = {"forward": 0, "backward": 0, "grad": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    backward, grad = torch.autograd.backward, torch.autograd.grad

    def counting_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    measured = norm_pass(make_batch([7, 12, 5], side="left"), model, backend="torch", reference=refs)
    assert measured.dots.shape == (3, 2)
    assert calls == {"forward": 1, "backward": 1, "grad": 0}
    norm_pass(make_batch([7, 12, 5], side="left"), model, backend="naive", reference=refs)
    assert calls["forward"] == 4  # the counter sees the naive oracle's three: it can fail


# ------------------------------------------------------------------------------------------ reference_gradient

def test_reference_gradient_is_the_mean_loss_gradient_and_leaves_the_model_as_found() -> None:
    from fastsel.engine.batch import prepare_batch
    from fastsel.engine.losses import per_example_losses
    from fastsel.engine.model_io import forward_logits

    model = lora(tiny_model())
    model.train()
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.ones_like(first)
    before = snapshot(model)
    parts = [make_batch([6, 9], seed=3), make_batch([5, 4, 7], seed=4)]
    got = fastsel.reference_gradient(parts, model)
    assert_same(before, model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    losses = torch.cat([per_example_losses(forward_logits(model, prepare_batch(b)), prepare_batch(b)["labels"])
                        for b in parts])
    expected = torch.autograd.grad(losses.mean(), list(params.values()))
    assert set(got) == set(params)
    for (name, _), g in zip(params.items(), expected, strict=True):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7)


def test_reference_gradient_normalized_is_the_mean_unit_gradient() -> None:
    """He et al.'s anchor direction, against the naive per-example gradients; with dropout, the weighted pass
    replays the norm pass's masks."""
    model = lora(tiny_model(dropout=0.1), dropout=0.1)
    model.train()
    batch = make_batch([6, 9, 4], seed=3)
    torch.manual_seed(11)
    kept = norm_pass(batch, model, backend="torch", keep_grads=True)  # the same masks: same seed, one forward
    for budget in (1 << 30, 0):  # one pass keeping per-example gradients; norm pass + weighted pass
        torch.manual_seed(11)
        got = fastsel.reference_gradient(batch, model, normalize=True, memory_budget_bytes=budget)
        for name, grads in kept.per_example_grads.items():
            expected = (grads / kept.norms.view(-1, *[1] * (grads.dim() - 1))).mean(0)
            torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------- bad input

def _bad_references(ref: dict[str, torch.Tensor]) -> list[tuple[str, object, type, str]]:
    name = next(iter(ref))
    return [
        ("missing key", {k: v for k, v in ref.items() if k != name}, KeyError, f"no gradient for.*{name}"),
        ("extra key", {**ref, "model.norm.weight": torch.zeros(32)}, KeyError, "model.norm.weight"),
        ("wrong shape", {**ref, name: ref[name].T}, ValueError, f"{name}.*shape"),
        ("nan", {**ref, name: ref[name].clone().fill_(float("nan"))}, ValueError, f"{name}.*non-finite"),
        ("int tensor", {**ref, name: ref[name].long()}, TypeError, f"{name}.*floating"),
        ("not a dict", "gradients", TypeError, "reference must be a dict"),
        ("empty list", [], ValueError, "empty list"),
        ("second of two", [ref, {**ref, name: ref[name] * float("inf")}], ValueError, rf"reference\[1\].*{name}"),
    ]


def test_bad_references_raise_naming_the_parameter_and_leave_the_model_as_found() -> None:
    model = lora(tiny_model())
    model.train()
    ref = references(model)[0]
    before = snapshot(model)
    for _label, bad, exc, msg in _bad_references(ref):
        with pytest.raises(exc, match=msg):
            norm_pass(make_batch([5, 7]), model, backend="torch", reference=bad)
        assert_same(before, model)
    with pytest.raises(KeyError, match="no gradient for trainable parameter 'model.embed_tokens.weight'"):
        fastsel.grad_dots(make_batch([5, 7]), full_finetune(tiny_model()), ref)  # a LoRA model's reference


def test_reference_gradient_normalized_one_pass_equals_two_passes() -> None:
    model = lora(tiny_model())
    parts = [make_batch([6, 9, 4], seed=3), make_batch([5, 7], seed=4)]
    one = fastsel.reference_gradient(parts, model, normalize=True)
    two = fastsel.reference_gradient(parts, model, normalize=True, memory_budget_bytes=0)
    for name, value in one.items():
        torch.testing.assert_close(value, two[name], rtol=1e-4, atol=1e-8)
