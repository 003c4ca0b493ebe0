"""Sample selection inside a Hugging Face `transformers.Trainer` (or TRL `SFTTrainer`) script, in three lines.

    from fastsel.integrations.hf import SelectionConfig, SelectiveTrainer
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                               fastsel_config=SelectionConfig(ratio=0.2, strategy="moderate"))

For another Trainer subclass: `SFTTrainer = make_selective(trl.SFTTrainer)`, then use it as before with the extra
`fastsel_config=` argument.

What changes: `training_step` calls `fastsel.selective_backward` instead of `compute_loss` + `backward`. Each
micro-batch's examples are measured (loss, exact gradient norm), Algorithm 1 keeps `ratio` of them, and `.grad`
receives (1 / accumulation steps) x the gradient of the *mean per-example loss over the kept examples*; the optimizer
step, clipping, scheduler, logging and checkpointing stay the Trainer's. Under DDP (torchrun / accelerate launch) the
selection is global over all ranks' micro-batches and fastsel averages the gradients over ranks itself, once per
optimizer step: only the micro-batch that ends the accumulation window (accelerate's `sync_gradients`) passes
`sync=True` to `selective_backward`; the earlier ones add their local share to `.grad` unreduced, as DDP does.

Loss scaling: Trainer divides a micro-batch loss by the number of accumulated micro-batches, unless it was given
`num_items_in_batch` (a token count over the whole accumulation window), in which case the loss is a token sum over
that count. fastsel's loss is the mean of per-example losses over the kept examples of one micro-batch, so the scale
is always 1 / `current_gradient_accumulation_steps` (x the fp16 GradScaler scale when one is active);
`num_items_in_batch` is ignored on purpose: it counts the tokens of every candidate, the dropped examples included,
and would mis-weight the kept ones. The returned (logged) loss is the kept examples' mean loss, scaled the same way.

Example ids: with `id_column="id"` (default) a dataset column of that name survives `remove_unused_columns`, is
taken out of the batch before the model sees it, and every micro-step appends to `trainer.fastsel_log` a dict with
the batch's ids, the kept and dropped ids and the selection's numbers; process 0 also appends it as one JSON line to
`args.output_dir / log_file`.

Batches: the causal-LM convention of fastsel.engine.batch (`input_ids`, `labels`, `attention_mask`, the latter made all-ones
when missing). Padding-free / packed batches (`DataCollatorWithFlattening`, TRL `padding_free=True` or BFD packing:
`position_ids` restarting per sequence, or `seq_idx` / `cu_seq_lens_q`) run natively: the model receives the
packed rows as they are (no attention mask, the position_ids, use_cache=False: transformers' block-diagonal
attention, checked once per model by fastsel's packing probe), and every sequence is one example with its own
loss and gradient norm (ids are kept when the collator received one feature per sequence, as
DataCollatorWithFlattening and TRL's padding-free collator do; BFD packing drops the id column). Sequences without
a supervised token (TRL's `pad_to_multiple_of` padding) are taken out of the rows. fastsel runs the model's plain
forward and takes its logits, so TRL's fused / chunked LM-head losses (`loss_type="nll"` with `fused_lm_head`, the
deprecated `"chunked_nll"`) are bypassed and work; losses fastsel cannot reproduce (TRL `loss_type="dft"`, label
smoothing, a `compute_loss_func`) are refused at construction, as are DeepSpeed, FSDP1, Megatron-LM, XLA and
`nn.DataParallel` (each with the reason). FSDP2 (accelerate `fsdp_version: 2`) is supported: fastsel's step writes
the sharded `.grad` itself, one reduce-scatter per optimizer step (fastsel.training.fsdp); accelerate runs FSDP only
on accelerators (not on CPU processes), so that path is tested through `fully_shard` directly
(tests/training/test_fsdp.py).

TRL metrics: with a TRL SFTTrainer, the metrics its own `compute_loss` logs (`num_tokens`, `mean_token_accuracy`,
`entropy`) are logged in selection mode too, computed over the *kept* examples of each micro-batch (their tokens,
their supervised positions): what the model was trained on. `num_tokens` counts the kept sequences' tokens
(padding excluded), summed over ranks and steps.

Costs and limits: under DDP every micro-step still gathers the examples' losses and gradient norms (global
selection needs them; B floats) and all-gathers the ids as Python objects; the gradients are all-reduced once per
optimizer step. A user `compute_loss` override is bypassed (warned). The fp16 GradScaler path mirrors
`accelerator.backward` but has only been exercised on CPU without fp16; with an IterableDataset and accelerate's
`dispatch_batches`, a string id column may not survive batch dispatching.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
import transformers
from torch import Tensor, nn

from fastsel.integrations.hf_batches import PackedBatchError, to_fastsel_batch
from fastsel.selection import strategies
from fastsel.selection.rules import Selection
from fastsel.training import distributed
from fastsel.training.options import SelectionOptions, is_int
from fastsel.training.reference_schedule import ReferenceSchedule
from fastsel.training.selective import selective_backward
from fastsel.training.step_log import StepTally
from fastsel.utils import atomic_write_text

logger = transformers.utils.logging.get_logger(__name__)

__all__ = ["SelectionConfig", "SelectionTrainerMixin", "SelectiveTrainer", "make_selective", "to_fastsel_batch",
           "IdKeepingCollator", "PackedBatchError"]

# Why each refused accelerate distributed type cannot run fastsel's step (FSDP: version 1 only; FSDP2 is supported).
_UNSUPPORTED_DISTRIBUTED = {
    "DEEPSPEED": "DeepSpeed ZeRO partitions and reduces gradients inside its engine's backward (bucketed "
                 "reduce-scatter into flat partitioned buffers, ZeRO-3 gathering parameters in its own hooks): "
                 "fastsel's step forms the selected examples' gradient itself and cannot hand it to that engine. "
                 "Use FSDP2 (fsdp_version: 2) for sharded training, or DDP",
    "FSDP": "FSDP1 flattens parameters into FlatParameters and reduces gradients inside its own backward hooks: "
            "fastsel supports FSDP2 (`fully_shard`): set fsdp_config={'fsdp_version': 2} (accelerate: "
            "fsdp_version: 2)",
    "MEGATRON_LM": "Megatron-LM splits layers across ranks (tensor/pipeline parallelism): fastsel needs every "
                   "example's whole forward on one rank; use FSDP2 or DDP",
    "XLA": "XLA devices are not supported by fastsel's hooks and collectives; use CUDA or CPU with DDP or FSDP2",
}

T = TypeVar("T", bound=type)


@dataclass
class SelectionConfig(SelectionOptions):
    """Options of the selection done in `SelectiveTrainer.training_step`: the selection options shared with
    `fastsel.TrainConfig` (`SelectionOptions`, see `fastsel.selective_backward`) and the Trainer's own.

    `seed` (strategy 'random'): None draws from torch's generator (seeded by the Trainer's `args.seed`); an int gives
    micro-step t the seed `seed + t`, so a resumed run draws the same subsets. `id_column`: dataset column holding
    example ids (None: positions only). `log_file`: JSONL file under `args.output_dir` (None: no file).
    `log_measurements`: also record every example's loss, gradient norm and loss-band membership.
    Reference strategies (`gradshield`, `harmful_similarity`): `reference=` fixed gradient dict(s), or
    `reference_batches=` (one batch or list of batches per reference) recomputed from the current weights at the
    first optimizer step and every `reference_every` steps (eval mode; a resumed Trainer recomputes it at its first
    step); `gradshield_budget` as in `fastsel.selection.rules`.
    """

    seed: int | None = None
    id_column: str | None = "id"
    log_file: str | None = "fastsel_selection.jsonl"
    log_measurements: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        for name in ("id_column", "log_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Example ids through the collator


class IdKeepingCollator:
    """Wraps a data collator: takes `column` out of every feature, collates the rest, and puts the ids back as a
    list under `column` (only when some feature had one). Other attributes are forwarded to the wrapped collator."""

    def __init__(self, collator: Callable[[list[Any]], Any], column: str):
        self.collator = collator
        self.column = column

    def __call__(self, features: list[Any]) -> Any:
        ids = [_plain(f.get(self.column)) if isinstance(f, Mapping) else None for f in features]
        stripped = [{k: v for k, v in f.items() if k != self.column} if isinstance(f, Mapping) else f
                    for f in features]
        batch = self.collator(stripped)
        if any(i is not None for i in ids) and isinstance(batch, dict):
            batch[self.column] = ids
        return batch

    def __getattr__(self, name: str) -> Any:
        if name in ("collator", "column"):
            raise AttributeError(name)
        return getattr(self.collator, name)


def _plain(value: Any) -> Any:
    """A JSON-friendly id: tensors / numpy scalars become Python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def _pop_ids(inputs: Mapping[str, Any], column: str | None) -> tuple[list[Any] | None, dict[str, Any]]:
    """(ids or None, the inputs without the id column) - the input mapping is not modified."""
    if column is None or column not in inputs:
        return None, dict(inputs)
    rest = {k: v for k, v in inputs.items() if k != column}
    ids = inputs[column]
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return [_plain(i) for i in ids], rest


# ---------------------------------------------------------------------------------------------------------------
# The Trainer mixin


def _gather_ids(ids: list[Any] | None) -> list[Any] | None:
    """All ranks' ids in rank order (None when any rank has none); the local list without torch.distributed."""
    if not distributed.is_distributed():
        return ids
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, ids)
    if any(p is None for p in parts):
        return None
    return [i for p in parts for i in p]


def _trl_metrics(trainer: Any) -> bool:
    """Whether the trainer logs TRL SFTTrainer's token metrics (a `_metrics` store and a token counter)."""
    return isinstance(getattr(trainer, "_metrics", None), Mapping) and hasattr(trainer, "_total_train_tokens")


class SelectionTrainerMixin:
    """Put before a `transformers.Trainer` (sub)class: `training_step` trains on the selected examples only.

    Constructor: the Trainer's arguments plus `fastsel_config=SelectionConfig(...)`. Afterwards
    `trainer.fastsel_log` holds one dict per micro-step (see `_record`).
    """

    fastsel_config: SelectionConfig
    fastsel_log: list[dict[str, Any]]

    def __init__(self, *args: Any, fastsel_config: SelectionConfig | None = None, **kwargs: Any) -> None:
        if fastsel_config is None:
            fastsel_config = SelectionConfig()
        if not isinstance(fastsel_config, SelectionConfig):
            raise TypeError(f"fastsel_config must be a fastsel.integrations.hf.SelectionConfig, got {type(fastsel_config).__name__}")
        self.fastsel_config = fastsel_config
        self.fastsel_log = []
        self._fastsel_window: tuple[int, int] = (-1, 0)  # (global step, micro-steps seen in it)
        self._fastsel_log_cut = False  # the log was cut back to this run's starting step
        self._fastsel_losses_all: list[float] = []  # every candidate's loss since the last logged step
        self._fastsel_references = ReferenceSchedule(fastsel_config.strategy, fastsel_config.reference,
                                                     fastsel_config.reference_batches, fastsel_config.reference_every)
        given = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)  # as the user passed it
        super().__init__(*args, **kwargs)
        self._fastsel_check_setup()
        self._fastsel_check_id_column(given)
        if fastsel_config.id_column is not None and self.data_collator is not None \
                and not isinstance(self.data_collator, IdKeepingCollator):
            self.data_collator = IdKeepingCollator(self.data_collator, fastsel_config.id_column)

    # -- checks ----------------------------------------------------------------------------------------------------

    def _fastsel_check_setup(self) -> None:
        """Refuse setups whose loss or gradient path fastsel would silently replace or cannot drive."""
        args = self.args
        dist_type = getattr(getattr(self.accelerator, "distributed_type", None), "value", "NO")
        state = getattr(self.accelerator, "state", None)
        fsdp_version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 1)
        if dist_type in _UNSUPPORTED_DISTRIBUTED and not (dist_type == "FSDP" and fsdp_version == 2):
            raise NotImplementedError(f"fastsel selection does not support {dist_type}: "
                                      f"{_UNSUPPORTED_DISTRIBUTED[dist_type]}")
        if getattr(args, "n_gpu", 1) > 1:
            raise NotImplementedError("fastsel does not support nn.DataParallel (n_gpu > 1): launch one process per "
                                      "GPU with torchrun / accelerate launch (DDP) instead")
        if str(getattr(args.optim, "value", args.optim)) in ("lomo", "adalomo"):
            raise NotImplementedError("LOMO/AdaLOMO fuse the optimizer step into backward: not supported by fastsel")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("compute_loss_func is set, but fastsel trains on the mean per-example causal-LM loss of "
                             "the selected examples; remove compute_loss_func")
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError("label_smoothing_factor > 0 is not supported: fastsel's per-example loss is plain "
                             "token cross-entropy")
        loss_type = getattr(args, "loss_type", None)
        if loss_type not in (None, "nll", "chunked_nll"):
            raise ValueError(f"loss_type={loss_type!r} is not supported: fastsel's per-example loss is the mean token "
                             "negative log-likelihood (loss_type='nll')")
        owner = next((c for c in type(self).__mro__ if "compute_loss" in vars(c)), None)
        if owner is not None and not owner.__module__.startswith(("transformers.", "trl.")):
            warnings.warn(f"{owner.__name__}.compute_loss is overridden but is not used for training: fastsel's "
                          "training_step computes per-example causal-LM losses itself", stacklevel=3)

    def _fastsel_check_id_column(self, given: Any) -> None:
        """A configured id column must exist in the training data (else every logged id would be None); one the
        Trainer itself took out (TRL's BFD packing merges examples) is said once."""
        column = self.fastsel_config.id_column
        if column is None:
            logger.warning("fastsel: id_column=None: the selection log records batch positions, not example ids")
            return
        present = getattr(given, "column_names", None)
        if isinstance(present, list) and column not in present:
            raise ValueError(f"SelectionConfig(id_column={column!r}): the training dataset has no column {column!r} "
                             f"(its columns: {', '.join(present)}); name the id column, or pass id_column=None "
                             "to log batch positions instead of ids")
        prepared = getattr(self.train_dataset, "column_names", None)
        if isinstance(prepared, list) and column not in prepared:
            logger.warning(f"fastsel: the trainer's dataset preparation removed the id column {column!r} (e.g. "
                           "TRL's BFD packing, which merges examples): ids are not tracked")

    def _fastsel_check_step(self) -> None:
        config = getattr(self.accelerator, "parallelism_config", None)
        if config is not None and (getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False)
                                   or getattr(config, "tp_enabled", False)):
            raise NotImplementedError("context/sequence/tensor parallelism shards examples or parameters: fastsel "
                                      "needs whole sequences and parameters on each rank")

    # -- columns ---------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """The model's forward columns plus the id column, so `remove_unused_columns` keeps the ids."""
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        column = self.fastsel_config.id_column
        if column is not None and self._signature_columns is not None and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """Evaluation as the Trainer does it, without the id column."""
        _, inputs = _pop_ids(inputs, self.fastsel_config.id_column)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)  # type: ignore

    # -- the step --------------------------------------------------------------------------------------------------

    def _fastsel_micro_index(self) -> int:
        """Index of this micro-step inside the current optimizer step (0 .. accumulation steps - 1)."""
        step, seen = self._fastsel_window
        if step != self.state.global_step:
            step, seen = self.state.global_step, 0
        self._fastsel_window = (step, seen + 1)
        return seen

    def training_step(self, model: nn.Module, inputs: dict[str, Tensor | Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Select examples of the micro-batch and add the gradient of their mean loss (scaled for accumulation).

        `num_items_in_batch` (token count over all candidates of the accumulation window) is accepted and ignored:
        see the module docstring. Returns the kept examples' mean loss / accumulation steps, detached.
        """
        del num_items_in_batch
        cfg = self.fastsel_config
        self._fastsel_check_step()
        micro = self._fastsel_micro_index()
        ids, inputs = _pop_ids(inputs, cfg.id_column)
        offload = getattr(self, "maybe_activation_offload_context", None)  # TRL SFTTrainer's own training_step
        with offload if offload is not None else contextlib.nullcontext():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            batch, ids, info = to_fastsel_batch(inputs, ids)
            trl_metrics = _trl_metrics(self)
            steps = int(getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps)
            scale = 1.0 / steps
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and scaler.is_enabled():  # fp16: what accelerator.backward's scaler.scale does
                scale *= float(scaler.scale(torch.ones((), device=self.args.device)))  # (also inits its scale)
            sync = bool(getattr(self.accelerator, "sync_gradients", True))  # False: not the window's last
            seed = None
            if cfg.seed is not None:
                seed = cfg.seed + self.state.global_step * self.args.gradient_accumulation_steps + micro
            with self.compute_loss_context_manager():
                local = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
                reference = self._fastsel_references.get(local, int(self.state.global_step))
                try:
                    selection = selective_backward(batch, model, **cfg.step_kwargs(), seed=seed, scale=scale,
                                                   sync=sync, token_stats=trl_metrics, reference=reference)
                except TypeError as e:
                    if "must return logits" not in str(e):
                        raise
                    raise TypeError(f"{e}. fastsel calls the model's forward (input_ids, attention_mask, "
                                    "position_ids; no labels) and needs its logits: a forward patched to return "
                                    "only a fused/chunked loss (e.g. a fused LM-head or linear-cross-entropy "
                                    "kernel) must be turned off for selection") from e
            del inputs, batch
            empty_every = self.args.torch_empty_cache_steps
            if empty_every is not None and self.state.global_step % empty_every == 0 and torch.cuda.is_available():
                torch.cuda.empty_cache()
        kept_loss = float(selection.losses[selection.indices].mean()) if selection.num_selected else 0.0
        self._fastsel_losses_all += selection.losses.tolist()
        if trl_metrics:
            self._log_trl_metrics(selection)
        self._record(selection, _gather_ids(ids), info, micro)
        return torch.tensor(kept_loss / steps, device=self.args.device)

    def _log_trl_metrics(self, selection: Selection) -> None:
        """TRL SFTTrainer's token metrics over this micro-batch's kept examples, as its compute_loss logs them."""
        stats, kept = selection.token_stats, selection.local_indices
        local = torch.stack([stats[k][kept].sum() for k in ("entropy", "correct", "tokens", "length")])
        entropy, correct, valid, tokens = self.accelerator.gather_for_metrics(
            local.to(self.args.device)[None]).sum(dim=0).tolist()
        metrics = self._metrics["train"]
        metrics["entropy"].append(entropy / valid if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        self._total_train_tokens += int(tokens) // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logging, plus `loss_all`: the mean loss over every example of the micro-batches
        since the last log (the logged `loss` is the kept examples' mean: not comparable with plain training)."""
        if "loss" in logs and self._fastsel_losses_all:
            losses = self._fastsel_losses_all
            logs["loss_all"] = round(sum(losses) / len(losses), 4)
            self._fastsel_losses_all = []
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _fastsel_log_path(self) -> str | None:
        if self.fastsel_config.log_file is None:
            return None
        return os.path.join(self.args.output_dir, self.fastsel_config.log_file)

    def _fastsel_cut_log(self) -> None:
        """Once per run: keep the selection records of the steps before this run's first (a resumed run continues
        the file as `train`'s log does; a fresh run in the same folder starts it anew)."""
        self._fastsel_log_cut = True
        start = int(self.state.global_step)
        self.fastsel_log = [e for e in self.fastsel_log if e["step"] <= start]
        path = self._fastsel_log_path()
        if path is None or not self.is_world_process_zero() or not os.path.exists(path):
            return
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", math.inf) <= start:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:  # a line torn by a crash
                    continue
        atomic_write_text(path, "".join(kept))

    def _record(self, selection: Selection, ids: list[Any] | None, info: dict[str, Any], micro: int) -> None:
        """Append this micro-step's selection to `fastsel_log` (and the JSONL file on process 0). `step` is the
        optimizer step the micro-batch belongs to, numbered from 1 as the Trainer's `log_history` numbers it."""
        if not self._fastsel_log_cut:
            self._fastsel_cut_log()
        if ids is not None and len(ids) != selection.mask.numel():
            ids = None  # a rank without ids or a collator that changed the example count
        tally = StepTally(measures_norms=strategies.strategy(selection.strategy).needs_norms
                          or selection.scores is not None)
        tally.add(selection, ids)
        entry: dict[str, Any] = {
            "step": int(self.state.global_step) + 1, "micro_step": micro, **tally.fields(), "k": selection.k,
            "kept_positions": selection.indices.tolist(), "ids": ids, "single_pass": selection.single_pass,
            "packed": info["packed"], "note": "; ".join(n for n in (selection.note, info["note"]) if n),
        }
        if selection.scores is not None:
            entry["reference_step"] = self._fastsel_references.computed_at
        if self.fastsel_config.log_measurements:
            if selection.scores is not None:
                entry["scores"] = selection.scores.tolist()
            entry["losses"] = selection.losses.tolist()
            entry["grad_norms"] = selection.grad_norms.tolist()
            entry["in_loss_band"] = selection.candidates.tolist()
        self.fastsel_log.append(entry)
        path = self._fastsel_log_path()
        if path is not None and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")

    def fastsel_config_dict(self) -> dict[str, Any]:
        """The selection options as a plain dict (for run metadata; reference tensors as a marker)."""
        out = asdict(self.fastsel_config)
        for key in ("reference", "reference_batches"):
            if out[key] is not None:
                out[key] = f"<{len(out[key])} {key.replace('_', ' ')}>"
        return out


@functools.cache
def make_selective(trainer_cls: T) -> T:
    """`trainer_cls` with fastsel selection: `class Selective<Name>(SelectionTrainerMixin, trainer_cls)`.

    Works for `transformers.Trainer` subclasses whose loss is the causal-LM NLL, e.g. `trl.SFTTrainer`.
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise TypeError(f"make_selective needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, SelectionTrainerMixin):
        return trainer_cls
    name = f"Selective{trainer_cls.__name__}"
    return type(name, (SelectionTrainerMixin, trainer_cls),  # type: ignore[return-value]
                {"__module__": __name__, "__qualname__": name,
                 "__doc__": f"{trainer_cls.__name__} training on fastsel-selected examples (fastsel.integrations.hf)."})


class SelectiveTrainer(SelectionTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` training on fastsel-selected examples; extra argument `fastsel_config`."""
