"""Integrations with the Hugging Face stack: the Trainer / TRL mixin (`hf`, public as `fastsel.hf`), Trainer batch
conversion (`hf_batches`), and model loading with PEFT LoRA (`models`).

Layer 4 (imports training, selection, engine).
"""
