"""Tiny random-init causal LMs and batches for fast, exact tests; a snapshot of everything fastsel must leave as found."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97


def tiny_model(kind: str = "llama", *, tie: bool = False, dropout: float = 0.0, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer random model (Llama or Qwen2) built from config: fast and exact."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, attention_dropout=dropout, pad_token_id=0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    return model.to(dtype)


def lora(model: torch.nn.Module, *, r: int = 4, dropout: float = 0.0, targets: list[str] | None = None,
         rslora: bool = False, **extra) -> torch.nn.Module:
    """Wrap `model` with PEFT LoRA; B is randomised so the B factors' gradients are not trivially structured."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_rslora=rslora,
                     target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def full_finetune(model: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning: every parameter trainable except the norm layers' (no per-example rule for RMSNorm)."""
    for name, p in model.named_parameters():
        p.requires_grad_("norm" not in name)
    return model


def make_batch(lengths: list[int], total: int | None = None, *, side: str = "right", seed: int = 1,
               prompt: int = 2) -> dict[str, torch.Tensor]:
    """Padded batch of random tokens; the first `prompt` tokens of each example are unsupervised."""
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    b = len(lengths)
    ids = torch.zeros(b, total, dtype=torch.long)
    mask = torch.zeros(b, total, dtype=torch.long)
    labels = torch.full((b, total), -100, dtype=torch.long)
    for i, n in enumerate(lengths):
        tok = torch.randint(1, VOCAB, (n,), generator=g)
        sl = slice(0, n) if side == "right" else slice(total - n, total)
        ids[i, sl] = tok
        mask[i, sl] = 1
        lab = tok.clone()
        lab[:prompt] = -100
        labels[i, sl] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_packed(rows: list[list[int]], *, seed: int = 1, prompt: int = 2, pad: int = 0) -> dict[str, torch.Tensor]:
    """Packed (padding-free) batch: row r holds sequences of lengths rows[r] back to back, position_ids restarting
    at 0; the first `prompt` tokens of each sequence are unsupervised. Rows shorter than the longest (plus `pad`
    tokens) are right-padded, with an attention_mask marking the padding (present only then)."""
    g = torch.Generator().manual_seed(seed)
    width = max(sum(r) for r in rows) + pad
    shape = (len(rows), width)
    ids, pos, mask = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long), torch.zeros(shape)
    labels = torch.full(shape, -100, dtype=torch.long)
    for r, lengths in enumerate(rows):
        t = 0
        for n in lengths:
            tok = torch.randint(1, VOCAB, (n,), generator=g)
            lab = tok.clone()
            lab[:prompt] = -100
            ids[r, t:t + n], labels[r, t:t + n], pos[r, t:t + n], mask[r, t:t + n] = tok, lab, torch.arange(n), 1
            t += n
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not bool(mask.all()):
        batch["attention_mask"] = mask.long()
    return batch


def snapshot(model: torch.nn.Module) -> dict:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return {
        "hooks": hooks,
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same(before: dict, model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert after["hooks"] == before["hooks"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for name, g in before["grads"].items():
        if g is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(after["grads"][name], g), name
    for name, w in before["weights"].items():
        assert torch.equal(after["weights"][name], w), name


class LinearTwice(torch.nn.Module):
    """A toy LM (vocabulary 20) whose Linear `lin` runs twice per forward: a module reused within one pass."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)

    def forward(self, input_ids, attention_mask=None, **_):
        h = torch.tanh(self.lin(torch.tanh(self.lin(self.emb(input_ids)))))
        return (self.head(h),)


def reused_module_case() -> tuple[LinearTwice, dict[str, torch.Tensor]]:
    """LinearTwice (seeded) and a 3-example batch of its vocabulary."""
    torch.manual_seed(0)
    model = LinearTwice()
    batch = make_batch([6, 4, 5])
    batch["input_ids"] %= 20
    batch["labels"] = torch.where(batch["labels"] >= 0, batch["labels"] % 20, batch["labels"])
    return model, batch
