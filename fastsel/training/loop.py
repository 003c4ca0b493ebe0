"""The minimal fine-tuning loop with per-batch sample selection (Moderate-G and baselines), top to bottom.

    result = fastsel.training.loop(peft_model, rows, strategy="moderate", ratio=0.2, batch_size=32, out_dir="run")

Each optimizer step takes `grad_accum` micro-batches of `batch_size` candidate rows (a seeded permutation per
epoch), packed back to back into one padding-free row (`packing`, on by default where the model keeps packed
sequences apart: the packing probe of fastsel.engine.model_io decides) or right-padded. For each micro-batch `fastsel.selective_backward` measures every candidate's
loss and exact gradient norm, keeps `ratio` of them (Algorithm 1) and adds `1/n_micro` times the gradient of
the kept examples' mean loss to `.grad`; strategy `full` goes through the same call, so every strategy
optimizes the same loss definition (mean per-example loss). With a regularizer (`kl_coef`, `ewc_coef`, or O-LoRA's
`olora_coef` / `olora_l2` > 0) the selection
runs on its own (no `.grad` written: `fastsel.select`, or a no-grad forward for `random`/`full`, which need no
norms), then the kept rows get one forward+backward of mean loss + kl_coef * KL(p_ref || p_model) + ewc_coef *
EWC penalty + the O-LoRA terms: the selection sees the task-loss gradients only, as in the paper. Then optional clipping
(`max_grad_norm`, the paper's gradient clipping baseline), AdamW, the lr scheduler, zero_grad, one line of
`out_dir/log.jsonl`, and a checkpoint every `save_every` steps and at the end (layout: fastsel.training.checkpoint;
`resume=True` continues exactly).

Reference strategies (`gradshield`, `harmful_similarity`): `reference=` fixed gradient dicts, or
`reference_batches=` (one batch, or list of batches, per reference) recomputed with the current weights at the
first step and every `reference_every` optimizer steps (`fastsel.training.reference_schedule`); the current
reference is saved with every checkpoint, so a resumed run continues with the same one.

Single process only (refused under torch.distributed or on an FSDP2 model): multi-GPU users call
`selective_backward` in their own DDP / FSDP2 loop (examples/ddp_train.py, examples/fsdp_train.py) or use the
Trainer integration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.batch import collate, pack, prepare_batch, take_examples
from fastsel.engine.losses import check_finite, per_example_losses
from fastsel.engine.model_io import (
    check_packing,
    forward_logits,
    forward_losses,
    model_device,
    prepare_for,
    supports_packing,
    vocab_size,
)
from fastsel.engine.packed_attention import packed_attention
from fastsel.engine.sharded import is_sharded
from fastsel.selection.rules import Selection, select, select_indices
from fastsel.selection.strategies import strategy
from fastsel.training import checkpoint as ckpt
from fastsel.training import distributed
from fastsel.training.options import SelectionOptions, check_number, is_int
from fastsel.training.reference_schedule import ReferenceSchedule
from fastsel.training.regularizers import (
    check_ewc_state,
    check_olora_state,
    ewc_penalty,
    kl_to_reference_loss,
    olora_penalty,
)
from fastsel.training.rows import DataOrder, check_dataset
from fastsel.training.selective import selective_backward
from fastsel.training.step_log import StepTally
from fastsel.utils import atomic_replace_dir, atomic_write_text

logger = logging.getLogger(__name__)

_UNSUPPORTED_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # need a metric each step


@dataclass
class TrainConfig(SelectionOptions):
    """Options of `train` (all can also be passed as keyword overrides): the selection options it shares with
    `fastsel.hf.SelectionConfig` (`SelectionOptions`: ratio, strategy, loss_band, single_pass, backend,
    memory_budget_bytes, the reference options) and the loop's own."""

    batch_size: int = 32  # candidate rows per micro-batch; selection keeps max(1, floor(ratio * batch_size))
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # data order and `random` selection
    drop_last: bool = False  # drop an epoch's last, smaller micro-batch
    bf16: bool = False  # bf16 autocast on CUDA; ignored (with a warning) on CPU
    gradient_checkpointing: bool = False  # transformers' non-reentrant activation checkpointing
    max_grad_norm: float | None = None  # clip the update's global norm (clip_grad_norm_); None = no clipping
    kl_coef: float = 0.0  # weight of KL(p_ref || p_model) to the adapter-disabled reference (PEFT models)
    ewc_coef: float = 0.0  # weight of the EWC penalty 1/2 sum F (theta - theta*)^2
    ewc_fisher: dict[str, Tensor] | None = None  # previous task's diagonal Fisher (diagonal_fisher)
    ewc_anchor: dict[str, Tensor] | None = None  # parameter values at the end of the previous task
    olora_coef: float = 0.0  # O-LoRA lambda_1: weight of sum |A_new A_old^T| against the earlier tasks' lora_A
    olora_l2: float = 0.0  # O-LoRA lambda_2: weight of the L2 norms of the (new) LoRA parameters
    olora_previous: dict[str, Tensor] | None = None  # earlier tasks' lora_A rows per site (lora_a_weights, stacked)
    lr_scheduler: str = "constant"  # get_scheduler name; constant + warmup_steps = constant_with_warmup
    warmup_steps: int = 0
    out_dir: str | None = None  # log.jsonl, checkpoints/, adapter/ (None: nothing written)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end); needs out_dir
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 1  # progress-bar / logging refresh interval in steps (log.jsonl gets every step)
    pad_token_id: int | None = None  # None: model.config.pad_token_id, else eos_token_id, else 0
    progress: bool = True  # tqdm bar with loss, kept fraction, median gradient norm
    max_steps: int | None = None  # if set, train exactly this many steps (cycling epochs; `epochs` ignored)
    packing: bool | str = "auto"  # pack each micro-batch padding-free: True | False | "auto" (where the model can)
    max_packed_tokens: int | None = None  # packed rows of at most this many tokens (None: one row per micro-batch)

    def __post_init__(self) -> None:
        """Checked at construction (as `SelectionConfig` is): a bad option fails where it is written."""
        super().__post_init__()
        check_options(self)

    def to_json(self) -> dict[str, Any]:
        """JSON-able view (the EWC tensors are replaced by a marker)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = f"<{len(value)} tensors>"
            elif f.name in ("reference", "reference_batches") and value is not None:
                value = f"<{len(value)} {f.name.replace('_', ' ')}>"
            out[f.name] = value
        return out


@dataclass
class TrainResult:
    """What `train` did: steps done (in all, resumed ones included), final loss, where things were written."""

    steps: int
    final_loss: float | None  # mean loss of the kept examples at the last non-skipped step
    log_path: Path | None
    adapter_path: Path | None
    checkpoint_path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step (= log.jsonl lines)
    packed: bool = False  # whether the micro-batches were packed (padding-free rows)


# ----------------------------------------------------------------------------------------------- input checks

def check_options(cfg: TrainConfig) -> None:
    """Reject bad options of the loop's own, with a message naming the option (the selection options are checked
    by `SelectionOptions`)."""
    for name in ("batch_size", "epochs", "grad_accum", "log_every", "keep_last"):
        check_number(name, getattr(cfg, name), low=1, inclusive=True, integer=True)
    for name in ("save_every", "warmup_steps", "seed"):
        check_number(name, getattr(cfg, name), low=0, inclusive=True, integer=True)
    check_number("max_steps", cfg.max_steps, low=1, inclusive=True, integer=True, optional=True)
    check_number("max_packed_tokens", cfg.max_packed_tokens, low=1, inclusive=True, integer=True, optional=True)
    if not (cfg.packing is True or cfg.packing is False or cfg.packing == "auto"):
        raise ValueError(f"packing must be True, False or 'auto', got {cfg.packing!r}")
    check_number("lr", cfg.lr, low=0, inclusive=False)
    check_number("max_grad_norm", cfg.max_grad_norm, low=0, inclusive=False, optional=True)
    for name in ("weight_decay", "kl_coef", "ewc_coef", "olora_coef", "olora_l2"):
        check_number(name, getattr(cfg, name), low=0, inclusive=True)
    if strategy(cfg.strategy).uses_ratio and cfg.ratio * cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size} with ratio={cfg.ratio} keeps less than one example "
                         f"per candidate batch: use batch_size >= {math.ceil(1 / cfg.ratio)} (= 1/ratio) or "
                         "strategy 'full'")
    from transformers import SchedulerType

    try:
        SchedulerType(cfg.lr_scheduler)
    except ValueError:
        names = [s.value for s in SchedulerType if s.value not in _UNSUPPORTED_SCHEDULERS]
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}: expected one of {names}") from None
    if cfg.lr_scheduler in _UNSUPPORTED_SCHEDULERS:
        raise ValueError(f"lr_scheduler {cfg.lr_scheduler!r} needs a metric per step: not supported by train")
    for name in ("bf16", "gradient_checkpointing", "drop_last", "progress"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    if cfg.pad_token_id is not None and not (is_int(cfg.pad_token_id) and cfg.pad_token_id >= 0):
        raise ValueError(f"pad_token_id must be a non-negative int or None, got {cfg.pad_token_id!r}")
    if cfg.save_every and cfg.out_dir is None:
        raise ValueError("save_every > 0 needs out_dir (where the checkpoints go)")


def check_config(cfg: TrainConfig, model: nn.Module) -> None:
    """Reject bad options and models before anything runs, with a message naming the problem."""
    SelectionOptions.__post_init__(cfg)  # again: a field may have been changed since construction
    check_options(cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (requires_grad): nothing to train")
    if distributed.world_size() > 1 or is_sharded(model):
        raise NotImplementedError(
            "train is single-process (its data order, checkpoints and adapter files are one process's): under "
            "torchrun, call selective_backward in your DDP / FSDP2 loop (examples/ddp_train.py, "
            "examples/fsdp_train.py) or use fastsel.hf.SelectiveTrainer")
    if cfg.kl_coef > 0 and not callable(getattr(model, "disable_adapter", None)):
        raise ValueError("kl_coef > 0 needs a PEFT model: the reference is the model under disable_adapter()")
    if cfg.ewc_coef > 0:
        check_ewc_state(model, cfg.ewc_fisher, cfg.ewc_anchor)
    if cfg.olora_coef > 0 and cfg.olora_previous:
        check_olora_state(model, cfg.olora_previous)
    enablers = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    if cfg.gradient_checkpointing and not any(callable(getattr(model, name, None)) for name in enablers):
        raise ValueError("gradient_checkpointing=True needs a transformers model (activation checkpointing)")


def resolve_config(config: TrainConfig | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """`config` (or the defaults) with keyword overrides applied; unknown names raise TypeError."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown train option(s) {unknown}; TrainConfig fields are {sorted(known)}")
    values = {f.name: getattr(config, f.name) for f in fields(TrainConfig)} if config else {}
    values.update(overrides)
    if isinstance(values.get("out_dir"), os.PathLike):
        values["out_dir"] = os.fspath(values["out_dir"])
    return TrainConfig(**values)


def _pad_token_id(cfg: TrainConfig, model: nn.Module) -> int:
    if cfg.pad_token_id is not None:
        return int(cfg.pad_token_id)
    model_config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(model_config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if is_int(value) and value >= 0:
            return int(value)
    return 0


# -------------------------------------------------------------------------------------------- one micro-batch

def _select_only(batch: dict[str, Tensor], model: nn.Module, cfg: TrainConfig, seed: int,
                 reference: Any = None) -> Selection:
    """Algorithm 1 without touching `.grad`: norms (and dots) only for the strategies that need them."""
    options = dict(ratio=cfg.ratio, strategy=cfg.strategy, loss_band=cfg.loss_band, seed=seed)
    if strategy(cfg.strategy).needs_norms or reference is not None:
        return select(batch, model, backend=cfg.backend, reference=reference,
                      gradshield_budget=cfg.gradshield_budget, **options)
    with torch.no_grad():
        prepared = prepare_for(model, batch)
        losses = forward_losses(model, prepared)[0]
    check_finite(losses, "loss")  # as the norm strategies do: no NaN reaches .grad
    return select_indices(losses, torch.zeros_like(losses), **options)


def _regularized_backward(batch: dict[str, Tensor], model: nn.Module, cfg: TrainConfig, rows: Tensor,
                          scale: float) -> None:
    """Forward+backward of the kept examples: scale * (mean loss + kl_coef * KL + ewc_coef * EWC penalty + the
    O-LoRA terms)."""
    sub = take_examples(prepare_batch(batch), rows)
    if "attention_mask" in sub:  # padded rows, right padding: trim columns no kept row uses
        width = int(sub["attention_mask"].sum(dim=1).max())
        sub = {k: v[:, :width] for k, v in sub.items()}
    prepared = prepare_for(model, sub)
    logits = forward_logits(model, prepared)
    loss = per_example_losses(logits, prepared["labels"], prepared["segments"]).mean()
    if cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * kl_to_reference_loss(model, prepared, logits=logits)
    if cfg.ewc_coef > 0:
        loss = loss + cfg.ewc_coef * ewc_penalty(model, cfg.ewc_fisher, cfg.ewc_anchor)
    if _olora_active(cfg):
        loss = loss + olora_penalty(model, cfg.olora_previous, orth_coef=cfg.olora_coef, l2_coef=cfg.olora_l2)
    (loss * scale).backward()


def _olora_active(cfg: TrainConfig) -> bool:
    """O-LoRA adds a term: an orthogonality weight with earlier tasks' subspaces, or an L2 weight."""
    return (cfg.olora_coef > 0 and bool(cfg.olora_previous)) or cfg.olora_l2 > 0


def regularized(cfg: TrainConfig) -> bool:
    """Whether the step's loss has a regularizer term (KL, EWC, O-LoRA): then the kept rows get a backward of
    their own (`_regularized_backward`) after the selection."""
    return cfg.kl_coef > 0 or cfg.ewc_coef > 0 or _olora_active(cfg)


def use_packing(cfg: TrainConfig, model: nn.Module, dataset: Sequence[Mapping[str, Any]]) -> bool:
    """Whether `train` packs its micro-batches: `packing` True (the probe must pass: else its error), False, or
    'auto' (when the model takes position_ids and the packing probe, on the first rows' tokens, finds the packed
    sequences' logits equal to their separate forwards)."""
    if cfg.packing is False:
        return False
    tokens: list[int] = []
    for i in range(min(len(dataset), 8)):
        tokens += [int(t) for t in dataset[i]["input_ids"]][:8]
    probe = torch.tensor(tokens[:8], dtype=torch.long, device=model_device(model))
    if cfg.packing == "auto":
        return len(tokens) >= 4 and supports_packing(model, probe)
    check_packing(model, probe)
    return True


def _micro_seed(seed: int, micro_index: int) -> int:
    """Seed of the `random` selection of one micro-batch: a function of the run seed and its position only."""
    return (seed * 1_000_003 + micro_index) % (2**62)


# ------------------------------------------------------------------------------------------------ log helpers

def _read_log(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records of steps <= up_to_step from an existing log (a torn last line is dropped); rewrites the log."""
    records: list[dict[str, Any]] = []
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: unreadable log line dropped", stacklevel=3)
                continue
            if record.get("step", math.inf) <= up_to_step:
                records.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _resume_path(resume: bool | str | os.PathLike, ckpt_root: Path | None) -> Path | None:
    """The checkpoint to resume from: the latest valid one (resume=True, or a run or checkpoints directory),
    or the one named (a `step-*` directory: its errors are raised, not skipped)."""
    if resume is False or resume is None:
        return None
    if resume is True:
        path = ckpt.latest_valid_checkpoint(ckpt_root)
        if path is None:
            warnings.warn(f"resume=True but no valid checkpoint in {ckpt_root}: starting from scratch",
                          stacklevel=3)
        return path
    given = Path(resume)
    if (given / ckpt.MANIFEST).exists() or given.name.startswith("step-"):
        return given
    root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    path = ckpt.latest_valid_checkpoint(root)
    if path is None:
        raise ckpt.CheckpointError(f"no valid checkpoint under {given}")
    return path


_RESUME_MUST_MATCH = ("batch_size", "seed", "grad_accum", "drop_last")


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, dataset_size: int,
                         trainer_state: Mapping[str, Any], where: Path) -> None:
    current = cfg.to_json()
    clash = {k: (saved.get(k), current[k]) for k in _RESUME_MUST_MATCH if saved.get(k) != current[k]}
    if trainer_state.get("dataset_size") != dataset_size:
        clash["dataset_size"] = (trainer_state.get("dataset_size"), dataset_size)
    if clash:
        raise ValueError(f"cannot resume from {where}: the data order depends on {sorted(clash)}, which "
                         f"changed (checkpoint, now): {clash}")
    changed = sorted(k for k in current if k in saved and saved[k] != current[k] and k not in ("progress",))
    if changed:
        warnings.warn(f"resuming from {where} with changed option(s) {changed}", stacklevel=3)


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None))


def _save_adapter(model: nn.Module, target: Path) -> None:
    """model.save_pretrained into a temporary folder, then swap it in as `target` (atomic_replace_dir)."""
    atomic_replace_dir(target, lambda tmp: model.save_pretrained(str(tmp)))


def _checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' activation (gradient) checkpointing is already enabled on `model`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            value = getattr(model, name, None)
            if isinstance(value, bool):
                return value
    return False


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Enable (non-reentrant) or disable activation checkpointing; the API was renamed in transformers 5."""
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# ------------------------------------------------------------------------------------------------------ train

def train(model: nn.Module, dataset: Sequence[Mapping[str, Any]], *, config: TrainConfig | None = None,
          resume: bool | str | os.PathLike = False, on_step: Callable[[dict[str, Any]], None] | None = None,
          **overrides: Any) -> TrainResult:
    """Fine-tune the trainable parameters of `model` on `dataset` with per-batch sample selection.

    `dataset`: rows {"input_ids": [int], "labels": [int] (-100 = unsupervised), "id": optional}. Options: a
    TrainConfig and/or keyword overrides of its fields. `resume`: True (latest valid checkpoint in
    out_dir/checkpoints), a checkpoint directory, or a run directory. `on_step(record)` is called after each
    step is logged and checkpointed (record["step"] of record["total_steps"]). Everything is validated before
    the first step.
    """
    # -- options, data and model checks (nothing runs before they pass)
    cfg = resolve_config(config, overrides)
    check_config(cfg, model)
    row_ids = check_dataset(dataset, vocab_size(model))
    pad_id = _pad_token_id(cfg, model)
    packed = use_packing(cfg, model, dataset)
    logger.info("micro-batches %s", "packed (padding-free rows)" if packed else "padded")
    out_dir, ckpt_root, log_path = _run_folder(cfg, resume)
    cfg, use_bf16 = _on_device(cfg, model)

    # -- plan: data order, steps, optimizer, scheduler, the reference gradients of a reference strategy
    order = DataOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.drop_last)
    total_micro = None if cfg.max_steps else cfg.epochs * order.per_epoch
    total_steps = cfg.max_steps or math.ceil(total_micro / cfg.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer_and_scheduler(cfg, params, total_steps)
    references = ReferenceSchedule(cfg.strategy, cfg.reference, cfg.reference_batches, cfg.reference_every)

    # -- resume: parameters, optimizer, scheduler, RNG, data position, log
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temps(ckpt_root)
    resume_from = _resume_path(resume, ckpt_root)
    step = 0 if resume_from is None else _restore(resume_from, cfg, dataset, model, optimizer, scheduler, order,
                                                  references, ckpt_root)
    history = _read_log(log_path, step) if log_path else []  # the records of the steps done so far
    run = _Run(model, dataset, cfg, row_ids, pad_id, packed, use_bf16, order, total_micro, total_steps, params,
               optimizer, scheduler, references, ckpt_root)

    # -- the loop
    from tqdm.auto import tqdm

    was_training, had_checkpointing = model.training, _checkpointing_on(model)
    if cfg.gradient_checkpointing and not had_checkpointing:
        _set_checkpointing(model, True)
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, desc="fastsel train",
               dynamic_ncols=True)
    last_saved = (step, resume_from) if resume_from is not None else None  # newest checkpoint of this state
    log_file = open(log_path, "a") if log_path else None  # closed in the finally below
    try:
        while step < total_steps:
            record = run.step(step)
            step = record["step"]
            history.append(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if ckpt_root is not None and cfg.save_every and step % cfg.save_every == 0:
                last_saved = (step, run.save(step, log_file))
            _show(bar, record, cfg.log_every)
            if on_step is not None:
                on_step(record)

        checkpoint_path, adapter_path = _final_files(run, step, last_saved, log_file, out_dir)
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if cfg.gradient_checkpointing and not had_checkpointing:
            _set_checkpointing(model, False)
        model.train(was_training)

    final = next((r["loss_kept"] for r in reversed(history) if not r["skipped"]), None)
    return TrainResult(steps=step, final_loss=final, log_path=log_path, adapter_path=adapter_path,
                       checkpoint_path=checkpoint_path, history=history, packed=packed)


def _final_files(run: _Run, step: int, last_saved: tuple[int, Path] | None, log_file: Any,
                 out_dir: Path | None) -> tuple[Path | None, Path | None]:
    """The end of a run: its final checkpoint (unless the last one is of this step) and the LoRA adapter."""
    if run.ckpt_root is None:
        return None, None
    checkpoint_path = last_saved[1] if last_saved and last_saved[0] == step else run.save(step, log_file)
    adapter_path = None
    if _is_peft(run.model):
        adapter_path = out_dir / "adapter"
        _save_adapter(run.model, adapter_path)
    return checkpoint_path, adapter_path


@dataclass
class _Run:
    """What `train`'s steps use: the model and data, the plan (order, step counts), optimizer and scheduler."""

    model: nn.Module
    dataset: Sequence[Mapping[str, Any]]
    cfg: TrainConfig
    row_ids: list[Any]
    pad_id: int
    packed: bool
    use_bf16: bool
    order: DataOrder
    total_micro: int | None
    total_steps: int
    params: list[Tensor]
    optimizer: Any
    scheduler: Any
    references: ReferenceSchedule
    ckpt_root: Path | None

    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` + 1: its micro-batches' selections and gradients, the update; its log record."""
        cfg, model = self.cfg, self.model
        device = model_device(model)
        micro_start = step * cfg.grad_accum
        n_micro = cfg.grad_accum if self.total_micro is None else min(cfg.grad_accum, self.total_micro - micro_start)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            reference = self.references.get(model, step)
        tally = StepTally(measures_norms=strategy(cfg.strategy).needs_norms or reference is not None)
        for m in range(n_micro):
            epoch, rows = self.order.next()
            features = [self.dataset[i] for i in rows]
            batch = pack(features, self.pad_id, max_tokens=cfg.max_packed_tokens) if self.packed else \
                collate(features, self.pad_id)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.use_bf16), \
                    packed_attention(model, self.packed):
                selection = _micro_batch_step(batch, model, cfg, _micro_seed(cfg.seed, micro_start + m), reference,
                                              n_micro, last=m == n_micro - 1)
            tally.add(selection, [self.row_ids[r] for r in rows])
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = _optimizer_step(self.optimizer, self.scheduler, self.params, cfg, skip=not tally.kept,
                                    step=step)
        record = {"step": step + 1, "total_steps": self.total_steps, "epoch": epoch, **tally.fields(), "lr": lr,
                  "grad_norm": grad_norm}
        if reference is not None:
            record["reference_step"] = self.references.computed_at
        return record

    def save(self, at_step: int, log_file: Any) -> Path:
        """A checkpoint of the run at `at_step` (the log flushed to disk first)."""
        if log_file:
            log_file.flush()
            os.fsync(log_file.fileno())
        trainer_state = {**self.order.state_dict(), "step": at_step, "dataset_size": len(self.dataset),
                         "total_steps": self.total_steps, "time": time.time()}
        rng = {**ckpt.capture_rng(), "data_order": self.order.generator_state()}
        return ckpt.save_checkpoint(self.ckpt_root, at_step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, rng=rng, trainer_state=trainer_state,
                                    config=self.cfg.to_json(), keep_last=self.cfg.keep_last,
                                    extra=self.references.state_dict())


def _run_folder(cfg: TrainConfig, resume: bool | str | os.PathLike) -> tuple[Path | None, Path | None,
                                                                             Path | None]:
    """(out_dir, its checkpoints folder, its log.jsonl), after refusing to mix a new run into an old one."""
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir else None
    log_path = out_dir / "log.jsonl" if out_dir else None
    if resume is True and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoints are), or pass resume=<checkpoint>")
    has_log = log_path is not None and log_path.exists() and log_path.stat().st_size > 0
    if out_dir and not resume and (ckpt.list_checkpoints(ckpt_root) or has_log):
        raise ValueError(f"{out_dir} already holds a run (log.jsonl or checkpoints): pass resume=True to "
                         "continue it, or use a new out_dir")
    return out_dir, ckpt_root, log_path


def _on_device(cfg: TrainConfig, model: nn.Module) -> tuple[TrainConfig, bool]:
    """The config with the EWC state on the parameters' device (moved once, not every micro-batch), and whether
    bf16 autocast is used (CUDA only)."""
    device = model_device(model)
    if cfg.ewc_coef > 0:
        cfg = replace(cfg, **{name: {k: v.to(device=device, dtype=torch.float32)
                                     for k, v in getattr(cfg, name).items()}
                              for name in ("ewc_fisher", "ewc_anchor")})
    if cfg.olora_previous:
        cfg = replace(cfg, olora_previous={k: v.to(device=device, dtype=torch.float32)
                                           for k, v in cfg.olora_previous.items()})
    use_bf16 = cfg.bf16 and device.type == "cuda"
    if cfg.bf16 and not use_bf16:
        warnings.warn("bf16=True: bf16 autocast is used on CUDA only; training in the model's dtype on "
                      f"{device.type}", stacklevel=3)
    return cfg, use_bf16


def _optimizer_and_scheduler(cfg: TrainConfig, params: list[Tensor], total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters and the transformers scheduler `cfg.lr_scheduler`."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler_name = cfg.lr_scheduler
    if scheduler_name == "constant" and cfg.warmup_steps:
        scheduler_name = "constant_with_warmup"
    scheduler = get_scheduler(scheduler_name, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


def _restore(resume_from: Path, cfg: TrainConfig, dataset: Sequence[Any], model: nn.Module, optimizer: Any,
             scheduler: Any, order: DataOrder, references: ReferenceSchedule, ckpt_root: Path | None) -> int:
    """Load a checkpoint into the run (parameters, optimizer, scheduler, RNG, data position, references); returns
    its step. Checkpoints of later steps in the run's folder are set aside."""
    state = ckpt.load_checkpoint(resume_from)
    _check_resume_config(state.config, cfg, len(dataset), state.trainer_state, resume_from)
    ckpt.load_trainable_state(model, state.trainable, source=str(resume_from / "trainable.safetensors"))
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    ckpt.restore_rng(state.rng)
    position = state.trainer_state
    order.load_state(position["epoch"], position["position"], state.rng["data_order"])
    step = state.step
    references.load_state_dict(state.extra, model)
    if ckpt_root is not None and resume_from.parent.resolve() == ckpt_root.resolve():
        for moved in ckpt.set_aside_after(ckpt_root, step):
            warnings.warn(f"checkpoint newer than the resumed step {step} set aside as {moved}", stacklevel=3)
    logger.info("resumed from %s at step %d", resume_from, step)
    return step


def _micro_batch_step(batch: dict[str, Tensor], model: nn.Module, cfg: TrainConfig, seed: int, reference: Any,
                      n_micro: int, last: bool) -> Selection:
    """Select on one micro-batch and add its kept examples' gradient (scaled 1/n_micro) to `.grad`."""
    if regularized(cfg):
        selection = _select_only(batch, model, cfg, seed, reference)
        if selection.num_selected:
            _regularized_backward(batch, model, cfg, selection.indices, 1.0 / n_micro)
        return selection
    return selective_backward(batch, model, **cfg.step_kwargs(), seed=seed, scale=1.0 / n_micro,
                              sync=last,  # DDP: reduce once per step
                              reference=reference)


def _optimizer_step(optimizer: Any, scheduler: Any, params: list[Tensor], cfg: TrainConfig, *, skip: bool,
                    step: int) -> float | None:
    """Clip (if asked) and step, unless the selection kept nothing; the scheduler steps either way. Returns the
    clipped update's global norm (None without clipping)."""
    grad_norm = None
    if skip:
        logger.warning("step %d: the selection kept no example (loss band too narrow?): no update", step + 1)
    else:
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _show(bar: Any, record: dict[str, Any], log_every: int) -> None:
    """Progress bar and log line, every `log_every` steps and at the last."""
    bar.update(1)
    step, total = record["step"], record["total_steps"]
    if step % log_every == 0 or step == total:
        shown = {"loss": record["loss_kept"], "kept": record["kept_fraction"], "med": record["norm_median"]}
        bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None})
        logger.info("step %d/%d loss %s kept %.3f", step, total, record["loss_kept"], record["kept_fraction"])
