"""`score_dataset`: every example's exact loss, gradient norm and (with references) gradient dots and cosines, for
a whole dataset, in packed passes of one batched forward+backward each.

Plan: the examples are tokenized with the model's chat template (loss on the response), ordered by length
(longest first: a pass that does not fit in memory fails at once), packed into passes of at most
`token_budget` tokens (one padding-free row per pass, per-sequence attention), and the passes grouped into chunks
of at least `chunk_size` examples. The plan depends only on the input and the settings, so a chunk always holds the
same examples and gives the same numbers: a rerun skips the chunks already on disk (resume), and ranks of a
`torchrun` launch take every world_size-th chunk and give the one-process result. The rows are sorted back to input
order at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.batch import pack
from fastsel.engine.model_io import model_device
from fastsel.engine.norms import norm_pass
from fastsel.experiments.data.tokenize import tokenize_with_status
from fastsel.experiments.scoring.inputs import LoadedInput, ScoreInput, fingerprint, load_input
from fastsel.experiments.scoring.store import ChunkStore
from fastsel.selection.dataset_filters import reference_rule_scores
from fastsel.utils import eval_mode, write_json_safe

ANCHOR_REFERENCES = ("safety", "harm_unit", "safe_unit")  # what `anchor_references` computes, by name


@dataclass(frozen=True)
class ScoreSettings:
    """How the examples are tokenized and packed; part of the run's fingerprint."""

    max_length: int = 512  # tokens per example (longer ones truncated as tokenize_example does)
    token_budget: int = 4096  # tokens per pass (one packed row); an example longer than it gets a pass alone
    chunk_size: int = 256  # examples per chunk file (resume granularity)
    backend: str = "auto"
    drop_empty: bool = False  # drop (and count) examples whose response renders to no token, instead of failing

    def __post_init__(self) -> None:
        for name in ("max_length", "token_budget", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


@dataclass
class Plan:
    """The tokenized examples (input positions `index`), and the passes and chunks as lists of positions."""

    features: list[dict[str, Any]]
    index: list[int]  # input position of features[j]
    passes: list[list[int]]  # feature positions per pass
    chunks: list[list[int]]  # pass numbers per chunk
    stats: dict[str, int]


def score_dataset(model: nn.Module, tokenizer: Any, data: Any, *, out_dir: str | os.PathLike[str] | None = None,
                  references: Mapping[str, Mapping[str, Tensor]] | None = None,
                  settings: ScoreSettings | None = None, progress: bool = True, **columns: Any) -> Any:
    """Score `data` (a ScoreInput, or its `source` with the column keywords of ScoreInput) and return a
    `datasets.Dataset` in input order: index, id, prompt_tokens, response_tokens, loss, grad_norm, and per
    reference `dot_<name>` / `cosine_<name>`; with the references of `anchor_references` also gradshield_score and
    harmful_similarity_score. With `out_dir`, chunks go to disk as they finish and a rerun resumes (`store`)."""
    settings = settings or ScoreSettings()
    spec = data if isinstance(data, ScoreInput) else ScoreInput(data, **columns)
    loaded = load_input(spec)
    plan = make_plan(loaded, tokenizer, settings)
    names = list(references or {})
    meta = {"source": spec.describe(), "input": _input_meta(spec), "settings": asdict(settings), "references": names,
            "examples": len(loaded.examples), "chunks": len(plan.chunks)}
    key = fingerprint(loaded, plan.features, {**meta, "model": model_checksum(model),
                                              "reference_checksums": [_checksum(references[n]) for n in names]})
    rank, world = _rank_and_world()
    if world > 1 and out_dir is None:
        raise ValueError("a distributed scoring run needs out_dir: the ranks meet in its chunk files")
    store = ChunkStore(out_dir, key, meta) if out_dir is not None else None
    if store is not None:
        store.open(write_manifest=rank == 0)
        _barrier(world)
        store.open(write_manifest=False)
    started = time.time()
    rows = _score_chunks(model, plan, references, store, settings, rank, world, progress)
    if store is None:
        return _in_memory(rows)
    _barrier(world)
    if rank == 0:
        table = store.merge(len(plan.chunks))
        write_json_safe(store.root / "summary.json", summary(table, plan, meta, key, time.time() - started))
    _barrier(world)
    return table if rank == 0 else store.read_merged()


def make_plan(loaded: LoadedInput, tokenizer: Any, settings: ScoreSettings) -> Plan:
    """Tokenize (named error, or a counted drop, for an example without response tokens) and pack."""
    features, index, stats = [], [], {"dropped_empty": 0, "prompt_truncated": 0, "response_truncated": 0}
    for i, (example, system) in enumerate(zip(loaded.examples, loaded.systems, strict=True)):
        try:
            feats, status = tokenize_with_status(example, tokenizer, settings.max_length, system_prompt=system)
        except ValueError as e:
            if not settings.drop_empty:
                raise ValueError(f"example {example.id!r} (row {i}): {e}; pass drop_empty=True (--drop-empty) to "
                                 "drop and count such rows") from None
            stats["dropped_empty"] += 1
            continue
        if status != "ok":
            stats[status] += 1
        features.append({**feats, "id": example.id})
        index.append(i)
    if not features:
        raise ValueError("no example is left to score (every response was empty)")
    order = sorted(range(len(features)), key=lambda j: (-len(features[j]["input_ids"]), j))
    passes: list[list[int]] = [[]]
    used = 0
    for j in order:
        n = len(features[j]["input_ids"])
        if passes[-1] and used + n > settings.token_budget:
            passes.append([])
            used = 0
        passes[-1].append(j)
        used += n
    chunks: list[list[int]] = [[]]
    for p in range(len(passes)):
        if chunks[-1] and sum(len(passes[q]) for q in chunks[-1]) >= settings.chunk_size:
            chunks.append([])
        chunks[-1].append(p)
    return Plan(features, index, passes, chunks, stats)


def _score_chunks(model: nn.Module, plan: Plan, references: Mapping[str, Any] | None, store: ChunkStore | None,
                  settings: ScoreSettings, rank: int, world: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    mine = [k for k in range(len(plan.chunks)) if k % world == rank]
    todo = [k for k in mine if store is None or not store.done(k)]
    size = {k: sum(len(plan.passes[p]) for p in plan.chunks[k]) for k in mine}
    bar = tqdm(total=sum(size.values()), initial=sum(size.values()) - sum(size[k] for k in todo), unit="ex",
               desc=f"scoring{f' (rank {rank})' if world > 1 else ''}", disable=not progress, dynamic_ncols=True)
    rows: list[dict[str, Any]] = []
    with eval_mode(model), bar:
        for k in todo:
            chunk_rows = []
            for p in plan.chunks[k]:
                chunk_rows += score_pass(model, plan, plan.passes[p], references, settings)
                bar.update(len(plan.passes[p]))
            if store is not None:
                store.write(k, chunk_rows)
            rows += chunk_rows
    return rows


def score_pass(model: nn.Module, plan: Plan, members: Sequence[int], references: Mapping[str, Any] | None,
               settings: ScoreSettings) -> list[dict[str, Any]]:
    """One packed forward+backward over the pass's examples: their rows of the output."""
    feats = [plan.features[j] for j in members]
    batch = pack(feats, 0)
    device = model_device(model)
    tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}
    names = list(references or {})
    result = norm_pass(tensors, model, backend=settings.backend, layout="given",
                       reference=[references[n] for n in names] if names else None)
    norms, losses = result.norms.double().cpu(), result.losses.double().cpu()
    columns: dict[str, list[float]] = {}
    if names:
        dots, cosines = result.dots.double().cpu().reshape(len(feats), -1), \
            result.cosines.double().cpu().reshape(len(feats), -1)
        for r, name in enumerate(names):
            columns[f"dot_{name}"], columns[f"cosine_{name}"] = dots[:, r].tolist(), cosines[:, r].tolist()
        columns.update(reference_rule_scores(names, dots, norms))
    rows = []
    for j, (f, member) in enumerate(zip(feats, members, strict=True)):
        supervised = sum(1 for t in f["labels"] if t != -100)
        rows.append({"index": plan.index[member], "id": f["id"], "prompt_tokens": len(f["labels"]) - supervised,
                     "response_tokens": supervised, "loss": float(losses[j]), "grad_norm": float(norms[j]),
                     **{c: v[j] for c, v in columns.items()}})
    return rows


def anchor_references(model: nn.Module, tokenizer: Any, *, anchors: int = 16,
                      max_length: int = 128) -> dict[str, dict[str, Tensor]]:
    """The references of the shipped anchors, as `fastsel continual` uses them: `safety` (the mean gradient of the
    refusal anchors: GradShield's grad S), `harm_unit` and `safe_unit` (He et al.'s mean unit gradients of the
    harmful-compliance and refusal anchors), computed in eval mode."""
    from fastsel.engine.alignment import reference_gradient
    from fastsel.experiments.data import compliance_anchor_batch, refusal_anchor_batch

    device = model_device(model)
    refusal = {k: v.to(device) for k, v in refusal_anchor_batch(tokenizer, anchors, max_length=max_length).items()}
    compliance = {k: v.to(device) for k, v in
                  compliance_anchor_batch(tokenizer, anchors, max_length=max_length).items()}
    with eval_mode(model):
        grads = (reference_gradient(refusal, model), reference_gradient(compliance, model, normalize=True),
                 reference_gradient(refusal, model, normalize=True))
    return dict(zip(ANCHOR_REFERENCES, grads, strict=True))


def model_checksum(model: nn.Module) -> list[Any]:
    """Names, shapes and float64 sums of the parameters: a changed model is a changed run."""
    with torch.no_grad():
        return [(n, list(p.shape), float(p.double().sum())) for n, p in model.named_parameters()]


def _checksum(reference: Mapping[str, Tensor]) -> list[Any]:
    return [(n, float(t.double().sum()), float(t.double().abs().sum())) for n, t in sorted(reference.items())]


def summary(table: Any, plan: Plan, meta: Mapping[str, Any], key: str, seconds: float) -> dict[str, Any]:
    norms = torch.tensor(table["grad_norm"], dtype=torch.float64)
    q = torch.quantile(norms, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return {**meta, "fingerprint": key, "scored": len(table), **plan.stats, "passes": len(plan.passes),
            "tokens": sum(len(f["input_ids"]) for f in plan.features), "seconds_this_run": seconds,
            "grad_norm_quantiles": dict(zip(("min", "q1", "median", "q3", "max"), q, strict=True))}


def _input_meta(spec: ScoreInput) -> dict[str, Any]:
    """The input as `fastsel filter` reloads it (a datasets.Dataset source is described, not reloadable)."""
    return {"source": spec.describe(), "prompt_column": spec.prompt_column, "response_column": spec.response_column,
            "messages_column": spec.messages_column, "id_column": spec.id_column, "split": spec.split}


def _in_memory(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(sorted(rows, key=lambda r: r["index"]))


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


__all__ = ["ANCHOR_REFERENCES", "Plan", "ScoreSettings", "anchor_references", "make_plan", "score_dataset",
           "score_pass"]
