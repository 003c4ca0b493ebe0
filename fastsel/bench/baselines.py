"""The methods `fastsel bench` compares on one batch: the plain step (the floor), fastsel's norm pass (as given,
and `fastsel_default`: the layout and backend `select` picks), a Moderate-G `selective_backward` step, the naive
per-example loop, torch.func vmap(grad) and Opacus ghost clipping, and fastsel's norm pass with two reference
gradients (norms + dots in the same pass: the `*_dots` methods). Each returns [B] norms (plain and the step:
nothing).

The `*_packed` methods get the same examples packed padding-free (one example per sequence, same order):
`PACKED_METHODS`. The peers (naive, vmap, Opacus) take the padded batch: their per-sample dimension is the batch
dimension, so they have no packed form."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.model_io import forward_kwargs, logits_of, model_device, prepare_for
from fastsel.selection import strategies
from fastsel.utils import module_mode

NO_TRITON_CPU = "no GPU: Triton interpreter only"


class Unavailable(Exception):
    """A method cannot run here (missing package, unsupported model): reported as null with this reason."""


def zero_grads(model: nn.Module) -> None:
    """Drop every parameter's .grad (a benchmark call leaves none behind)."""
    for p in model.parameters():
        p.grad = None


def plain_step(batch: Mapping[str, Tensor], model: nn.Module) -> None:
    """The floor: one batched forward and backward of the summed per-example losses (grads then dropped); a
    packed batch runs as the model's padding-free forward."""
    from fastsel.engine.model_io import forward_losses
    from fastsel.engine.packed_attention import packed_attention

    prepared = prepare_for(model, batch)
    with packed_attention(model, prepared["segments"].packed):  # the attention fastsel's packed passes use
        forward_losses(model, prepared)[0].sum().backward()
    zero_grads(model)


def naive_norms(batch: Mapping[str, Tensor], model: nn.Module) -> Tensor:
    """One forward+backward per unpadded example (fastsel's oracle backend)."""
    from fastsel.engine.norms import norm_pass

    return norm_pass(batch, model, backend="naive").norms


def fastsel_norms(backend: str, dots: bool = False, layout: str = "given"
                  ) -> Callable[[Mapping[str, Tensor], nn.Module], Tensor]:
    """fastsel's one batched pass with the given backend and layout (`model_io.in_layout`: 'given' runs the batch
    as it is, padded or packed; 'auto' is what `select` / `selective_backward` pick); with `dots`: norms and
    dots with `bench_references` in the same pass (the norms are returned)."""

    def run(batch: Mapping[str, Tensor], model: nn.Module) -> Tensor:
        from fastsel.engine.kernel_selftest import KernelSelfTestError
        from fastsel.engine.norms import norm_pass

        if backend == "triton":
            _require_triton(model)
        try:
            return norm_pass(batch, model, backend=backend, reference=bench_references(model) if dots else None,
                             layout=layout).norms
        except KernelSelfTestError as e:  # a kernel family failed its first-use self-test: null, with the reason
            raise Unavailable(str(e)) from e

    return run


def moderate_step(batch: Mapping[str, Tensor], model: nn.Module) -> None:
    """One Moderate-G training step as a user runs it: `selective_backward` with its defaults (ratio 0.2, the
    layout and pass it picks), the kept examples' gradient written to .grad (then dropped)."""
    from fastsel.training.selective import selective_backward

    selective_backward(batch, model, strategy=strategies.DEFAULT, ratio=0.2)
    zero_grads(model)


def _require_triton(model: nn.Module) -> None:
    """The compiled Triton kernels need a CUDA model (the interpreter is not benchmarked)."""
    from fastsel import kernels

    if not (torch.cuda.is_available() and model_device(model).type == "cuda" and kernels.available()):
        raise Unavailable(NO_TRITON_CPU if model_device(model).type == "cpu" else "triton not available")


DOT_REFERENCES = 2  # e.g. harmful and safe anchors (harmful_similarity)


def bench_references(model: nn.Module, seed: int = 0) -> Any:
    """`DOT_REFERENCES` fixed random reference gradients over the trainable parameters, checked and stacked once
    and cached on the model (the bench's own): what a training loop holds between reference refreshes, so the
    timed pass is the dot pass alone (any values time the same)."""
    cached = getattr(model, "_fastsel_bench_references", None)
    if cached is None:
        from fastsel.engine.references import prepare_references
        from fastsel.engine.targets import find_targets

        g = torch.Generator().manual_seed(seed)
        refs = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}
                for _ in range(DOT_REFERENCES)]
        cached = prepare_references(refs, find_targets(model), model_device(model))
        model._fastsel_bench_references = cached
    return cached


def vmap_norms(batch: Mapping[str, Tensor], model: nn.Module) -> Tensor:
    """torch.func: vmap(grad(per-example loss)) over the trainable (LoRA) parameters via functional_call.

    Each vmapped call sees one padded row [1, T] with its mask and its loss mask (labels -100), so every example has
    the same length inside vmap. Attention runs eager while vmapped (SDPA's mask code branches on values). If the
    model's mask handling still cannot be vmapped, the mask is dropped: exact for a right-padded batch, since causal
    attention keeps pads (all after the real tokens) out of the supervised loss.
    """
    if getattr(model, "is_gradient_checkpointing", False):
        raise Unavailable("torch.func transforms do not compose with activation checkpointing")
    prepared = prepare_for(model, batch)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    # SDPA's mask preparation branches on tensor values, which vmap refuses: eager attention while vmapped
    configs = {id(c): c for c in (getattr(mod, "config", None) for mod in model.modules())
               if getattr(c, "_attn_implementation", None) not in (None, "eager")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        return _vmap_norms(model, prepared, params)
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _vmap_norms(model: nn.Module, prepared: Mapping[str, Tensor], params: dict[str, Tensor]) -> Tensor:
    from torch.func import functional_call, grad, vmap

    from fastsel.engine.losses import per_example_losses

    def run(use_mask: bool) -> Tensor:
        def loss(p: dict[str, Tensor], ids: Tensor, mask: Tensor, labels: Tensor, pos: Tensor) -> Tensor:
            row = {"input_ids": ids[None], "attention_mask": mask[None], "position_ids": pos[None]}
            out = functional_call(model, p, args=(), kwargs=forward_kwargs(model, row, mask=use_mask),
                                  strict=False)
            return per_example_losses(logits_of(out), labels[None])[0]

        grads = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(
            params, prepared["input_ids"], prepared["attention_mask"], prepared["labels"], prepared["position_ids"])
        return torch.stack([g.float().flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()

    try:
        return run(True)
    except Exception as first:  # noqa: BLE001 - data-dependent mask code under vmap
        mask = prepared["attention_mask"]
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        if not right_padded:
            raise Unavailable(f"vmap failed on the model with its attention mask: {_short(first)}") from first
        try:
            return run(False)
        except Exception as second:  # noqa: BLE001
            raise Unavailable(f"vmap failed on the model: {_short(second)}") from second


def opacus_norms(batch: Mapping[str, Tensor], model: nn.Module) -> Tensor:
    """Opacus 1.6 ghost clipping (GradSampleModuleFastGradientClipping): per-sample norms, loss reduction 'sum'."""
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"opacus not installed ({type(e).__name__}); pip install opacus==1.6.0 "
                          f"torch=={torch.__version__.split('+')[0]}") from e
    from fastsel.engine.losses import per_example_losses

    prepared = prepare_for(model, batch)
    kwargs = forward_kwargs(model, prepared)
    with module_mode(model, True):  # Opacus records activations only in train mode (the models have dropout 0)
        try:
            gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                       max_grad_norm=1e30, use_ghost_clipping=True)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"opacus refused the model: {_short(e)}") from e
        try:
            losses = per_example_losses(logits_of(gsm(**kwargs)), prepared["labels"])
            losses.sum().backward()
            norms = gsm.get_norm_sample().float().detach()
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"opacus failed: {_short(e)}") from e
        finally:
            zero_grads(model)
            try:
                gsm._close()
            except Exception:  # noqa: BLE001
                pass
    return norms


METHOD_FNS: dict[str, Callable[..., Any]] = {
    "plain": plain_step,
    "plain_packed": plain_step,
    "fastsel_default": fastsel_norms("auto", layout="auto"),
    "moderate_step": moderate_step,
    "fastsel_torch": fastsel_norms("torch"),
    "fastsel_torch_packed": fastsel_norms("torch"),
    "fastsel_triton": fastsel_norms("triton"),
    "fastsel_triton_packed": fastsel_norms("triton"),
    "naive": naive_norms,
    "vmap": vmap_norms,
    "opacus": opacus_norms,
    "fastsel_torch_dots": fastsel_norms("torch", dots=True),
    "fastsel_triton_dots": fastsel_norms("triton", dots=True),
}
# the packed input: the dot methods too, so that `norm_dots_over_norm_pass` compares passes of one layout
PACKED_METHODS = ("plain_packed", "fastsel_torch_packed", "fastsel_triton_packed", "fastsel_torch_dots",
                  "fastsel_triton_dots")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"
