"""grad_norms against the naive one-example-at-a-time backward on tiny random Llama/Qwen2 models."""

from __future__ import annotations

import pytest
import torch
from needs import need_kernels, on_kernel_device
from tiny import full_finetune, lora, make_batch, make_packed, reused_module_case, tiny_model

import fastsel
from fastsel.engine.norms import norm_pass


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-12)).max())


def naive(batch, model, **kw):
    return fastsel.grad_norms(batch, model, backend="naive", **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_lora_matches_naive_fp32(kind: str, side: str) -> None:
    model = lora(tiny_model(kind))
    batch = make_batch([7, 12, 5, 9], side=side)
    got = fastsel.grad_norms(batch, model, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert rel_err(got, naive(batch, model)) <= 1e-5


@pytest.mark.parametrize("params", ["lora", "full"])
def test_left_padding_with_a_supervised_first_token_equals_unpadded(params: str) -> None:
    """The first real token carries a label (prompt=0): under left padding it follows a pad, so it is no target,
    as in the unpadded example. Norms and losses: left == right == each example alone == naive."""
    model = lora(tiny_model(), r=4) if params == "lora" else full_finetune(tiny_model())
    lengths = [7, 12, 5, 9]
    left, right = (make_batch(lengths, side=side, prompt=0) for side in ("left", "right"))
    alone = [norm_pass({k: v[i:i + 1, :n] for k, v in right.items()}, model, backend="torch")
             for i, n in enumerate(lengths)]
    ref_norms = torch.cat([r.norms for r in alone])
    ref_losses = torch.cat([r.losses for r in alone])
    for batch in (left, right):
        got = norm_pass(batch, model, backend="torch")
        assert rel_err(got.norms, ref_norms) <= 1e-5 and rel_err(got.losses, ref_losses) <= 1e-5
    assert rel_err(naive(left, model), ref_norms) <= 1e-5
    if params == "lora":  # the training step too: the same gradient whatever the padding side
        grads = []
        for batch in (left, right):
            fastsel.selective_backward(batch, model, strategy="full")
            grads.append([p.grad for p in model.parameters() if p.requires_grad])
            model.zero_grad(set_to_none=True)
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_batch_of_one_and_rslora_and_subset_targets() -> None:
    model = lora(tiny_model(), r=3, rslora=True, targets=["q_proj", "down_proj"])
    batch = make_batch([9])
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), naive(batch, model)) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_model(kind: str) -> None:
    model = lora(tiny_model(kind, dtype=torch.bfloat16))
    batch = make_batch([6, 11, 8], side="left")
    got = fastsel.grad_norms(batch, model, backend="torch")
    assert got.dtype == torch.float32
    assert rel_err(got, naive(batch, model)) <= 2e-2


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant: bool) -> None:
    model = lora(tiny_model())
    model.train()
    expected = naive(make_batch([7, 10, 4]), model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    assert model.base_model.model.model.gradient_checkpointing
    got = fastsel.grad_norms(make_batch([7, 10, 4]), model, backend="torch")
    assert rel_err(got, expected) <= 1e-5


def test_dropout_train_mode_exact_for_the_drawn_mask() -> None:
    """Oracle: the same padded batch and seed (same dropout masks), backward of one example's loss at a time."""
    model = lora(tiny_model(dropout=0.1), dropout=0.2)
    model.train()
    batch = make_batch([8, 6, 10], side="right")
    torch.manual_seed(123)
    got = fastsel.grad_norms(batch, model, backend="torch")
    from fastsel.engine.batch import prepare_batch
    from fastsel.engine.losses import per_example_losses
    from fastsel.engine.model_io import forward_logits

    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for i in range(3):
        torch.manual_seed(123)
        prepared = prepare_batch(batch)
        loss = per_example_losses(forward_logits(model, prepared), prepared["labels"])[i]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        expected.append(sum(g.square().sum() for g in grads if g is not None).sqrt())
    assert rel_err(got, torch.stack(expected)) <= 1e-5
    # and a different mask gives different norms: the test can fail
    torch.manual_seed(7)
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), torch.stack(expected)) > 1e-4


def test_trainable_embeddings_with_lora() -> None:
    model = lora(tiny_model())
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    model.base_model.model.lm_head.weight.requires_grad_(True)
    batch = make_batch([7, 12, 5], side="left")
    got, layers = fastsel.grad_norms(batch, model, backend="torch", per_layer=True)
    assert rel_err(got, naive(batch, model)) <= 1e-5
    assert any("embed_tokens" in n for n in layers)


@pytest.mark.parametrize("tie", [False, True])
def test_full_finetuning_linear_and_tied_embeddings(tie: bool) -> None:
    model = full_finetune(tiny_model(tie=tie))
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = make_batch([7, 12, 5, 3], side="right")
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), naive(batch, model)) <= 1e-5


def test_tied_embeddings_gram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the no-instantiation path: tied embedding + lm_head combined by the mixed Gram form."""
    from fastsel.engine import accumulate

    monkeypatch.setattr(accumulate, "INSTANTIATE_BUDGET_BYTES", 0)
    model = full_finetune(tiny_model(tie=True))
    model.config.pad_token_id = None
    batch = make_batch([7, 12, 5, 3], side="left")
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), naive(batch, model)) <= 1e-5


def test_embedding_padding_idx_rows_get_no_gradient() -> None:
    model = full_finetune(tiny_model())
    model.model.embed_tokens.padding_idx = 5
    batch = make_batch([9, 11])
    batch["input_ids"][0, 3] = 5
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), naive(batch, model)) <= 1e-5


def test_per_layer_squares_sum_to_total() -> None:
    model = lora(tiny_model("qwen2"))
    total, layers = fastsel.grad_norms(make_batch([5, 9]), model, backend="torch", per_layer=True)
    assert len(layers) == sum(1 for p in model.parameters() if p.requires_grad)
    summed = torch.stack([v.square() for v in layers.values()]).sum(0)
    assert torch.allclose(summed, total.square(), rtol=1e-5)
    _, naive_layers = naive(make_batch([5, 9]), model, per_layer=True)
    for name, value in layers.items():
        assert torch.allclose(value, naive_layers[name], rtol=1e-4, atol=1e-8), name


def test_params_lora_restricts_the_norm() -> None:
    model = lora(tiny_model())
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="norm.*LlamaRMSNorm.*params='lora'"):
        fastsel.grad_norms(make_batch([5, 6]), model, backend="torch")
    got = fastsel.grad_norms(make_batch([5, 6]), model, backend="torch", params="lora")
    assert rel_err(got, naive(make_batch([5, 6]), model, params="lora")) <= 1e-5


def test_reused_module_called_twice_counts_the_sum() -> None:
    """A Linear applied twice per forward: the norm is of the summed gradient, not the sum of norms."""
    model, batch = reused_module_case()
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), naive(batch, model)) <= 1e-5


def test_norm_pass_keep_grads_equal_naive_per_example_grads() -> None:
    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 8], side="left")
    result = norm_pass(batch, model, backend="torch", keep_grads=True)
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    from fastsel.engine.batch import prepare_batch
    from fastsel.engine.losses import per_example_losses
    from fastsel.engine.model_io import forward_logits

    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        single = {k: v[i][keep][None] for k, v in batch.items()}
        prepared = prepare_batch(single)
        loss = per_example_losses(forward_logits(model, prepared), prepared["labels"])[0]
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, _), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(result.per_example_grads[name][i], g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["lora-left", "full-right"])
def test_triton_backend_matches_naive(case: str) -> None:
    """End to end through the Triton kernels (the CPU interpreter here, compiled kernels on a GPU), grouped
    launches, instantiate (LoRA) and Gram (full fine-tuning, short T) forms."""
    need_kernels()
    if case == "lora-left":
        model = lora(tiny_model(), r=4, targets=["q_proj", "v_proj", "down_proj"])
        batch = make_batch([7, 12, 5], side="left", prompt=0)  # a supervised first token after the pads
    else:
        model = full_finetune(tiny_model())
        batch = make_batch([7, 4, 5], side="right")
    model, batch = on_kernel_device(model, batch)
    got = fastsel.grad_norms(batch, model, backend="triton")
    assert got.device == batch["input_ids"].device
    assert rel_err(got, naive(batch, model)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_backward_or_norm_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward with its capture hooks and the grouped kernel launches after it never wait on the GPU
    (torch.cuda sync debug mode 'error' raises on any device-to-host copy or synchronize)."""
    from fastsel.engine import norms

    need_kernels()

    def strict(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    model = lora(tiny_model(), r=4).cuda()
    padded = {k: v.cuda() for k, v in make_batch([7, 12, 5], side="left").items()}
    packed = {k: v.cuda() for k, v in make_packed([[7, 12], [5, 9]]).items()}  # (row, start, end) segments
    for batch in (padded, packed):
        expected = fastsel.grad_norms(batch, model, backend="triton")  # first call compiles the kernels
        with monkeypatch.context() as patch:
            patch.setattr(norms, "backward_keeping_grads", strict(norms.backward_keeping_grads))
            patch.setattr(norms, "resolve_deferred", strict(norms.resolve_deferred))
            got = fastsel.grad_norms(batch, model, backend="triton")
        torch.testing.assert_close(got, expected)
