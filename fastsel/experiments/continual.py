"""`fastsel continual`: the paper's continual safety pipeline (Bach et al., 2026) from one YAML config.

    python -m fastsel continual --config configs/reproduce.yaml --out runs/reproduce

Optional alignment stage (short LoRA SFT on refusal + helpful data, merged into the weights), then for every
method and seed: a fresh LoRA on the (aligned) base, trained on the task sequence (Dolly -> GSM8K -> MedMCQA ->
SQuAD v2 by default). After every stage the attack success rate (ASR) on harmful prompts and every task's
score are measured. Every stage is checkpointed under OUT/runs/<method>/seed<k>/stage<i>/ (trainable weights,
train log, stage_result.json written atomically); re-running the same command skips finished stages.
Results: OUT/results.json; report: OUT/report.md and OUT/plots/*.png (`fastsel.experiments.report`).

Methods: the selection strategies (full, random, moderate, low, high), the safety-aware strategies gradshield
and harmful_similarity (reference gradients from the shipped refusal data, section `reference`, recomputed as
the model moves), and the training-time baselines grad_clip, kl, ewc and olora (O-LoRA: a new LoRA per task,
the earlier ones merged and frozen, orthogonality of the new lora_A to theirs as a penalty).

The config (`fastsel.experiments.config.ContinualConfig`, loaded from YAML) is validated before anything trains;
the LoRA target modules are checked against the model as soon as it loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsel.experiments.config import (
    REFERENCE_METHODS,
    SELECTION_METHODS,
    TINY,
    ContinualConfig,
    load_config,
    validate_config,
)
from fastsel.experiments.controls.prepare import CONTROL_SETS, controls_summary, prepare_controls
from fastsel.experiments.summary import headline, summarize
from fastsel.selection import strategies
from fastsel.training.checkpoint import load_trainable_file, save_tensors, trainable_state
from fastsel.utils import atomic_write_file, eval_mode, json_safe, read_json, write_json_safe

logger = logging.getLogger(__name__)



class ConfigMismatch(ValueError):
    """The output folder holds a run of another config."""


class LoraTargetError(ValueError):
    """lora.targets names modules the model does not have."""


# ------------------------------------------------------------------------------------------------ helpers

def load_base(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) for the config's `model`."""
    if name == TINY:
        from fastsel.experiments.data import toy_tokenizer
        from fastsel.integrations.models import tiny_random_model

        return tiny_random_model(), toy_tokenizer()
    from fastsel.integrations.models import load_model

    return load_model(name)


def check_lora_targets(model: Any, targets: list[str] | None) -> None:
    """Every name in `lora.targets` must match a module the way PEFT matches target_modules (the full name or
    its last dotted parts); raise LoraTargetError listing the ones that match nothing."""
    if not targets:
        return
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())})
        raise LoraTargetError(f"lora.targets {unmatched} match no module of the model (its leaf module names: "
                              f"{', '.join(leaves[:20])}{', ...' if len(leaves) > 20 else ''})")


def _prepare_resume(train_dir: Path) -> bool:
    """True if `train_dir` holds a checkpoint to resume from; otherwise clear a torn partial run."""
    import shutil

    from fastsel.training.checkpoint import latest_valid_checkpoint

    if (train_dir / "checkpoints").is_dir() and latest_valid_checkpoint(train_dir / "checkpoints") is not None:
        return True
    shutil.rmtree(train_dir, ignore_errors=True)
    return False


# ------------------------------------------------------------------------------------------------ runner

class MarginCurve:
    """The mean refusal margin every `safety.margin_every` optimizer steps of a stage (a `train` on_step hook),
    appended to `path` as it is measured; a stage that restarts from scratch starts a new file, a resumed one
    keeps the points up to the step it resumes from."""

    def __init__(self, runner: Runner, model: Any, path: Path, resumed: bool) -> None:
        self.runner, self.model, self.path = runner, model, path
        self.every = runner.cfg.safety.margin_every if runner.cfg.safety.teacher_forced else 0
        self.seconds = 0.0
        kept = self._read() if resumed else []
        if kept:
            from fastsel.training.checkpoint import latest_valid_checkpoint

            last = latest_valid_checkpoint(path.parent / "train" / "checkpoints")
            step = int(last.name.removeprefix("step-")) if last is not None else 0
            kept = [p for p in kept if p["step"] <= step]
        atomic_write_file(path, lambda name: Path(name).write_text("".join(json.dumps(p) + "\n" for p in kept)))

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def on_step(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if step % self.every or step == record.get("total_steps"):
            return  # the last step's point is the stage's final evaluation (`points`), not measured twice
        start = time.time()
        margin = self.runner.margin(self.model)["margin"]
        self.seconds += time.time() - start
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "margin": margin}) + "\n")

    def points(self, final_step: int, final_margin: float | None) -> list[dict[str, Any]]:
        """The measured points plus the stage's final evaluation (the step-0 point is the previous stage's)."""
        points = [p for p in self._read() if p["step"] < final_step]
        if final_margin is not None:
            points.append({"step": final_step, "margin": final_margin})
        return points



class Runner:
    """Runs the config into `out`: alignment, base evaluation, every (method, seed) sequence, results."""

    def __init__(self, cfg: ContinualConfig, out: str | os.PathLike[str], *, progress: bool = False) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.tasks = cfg.task_names
        self._data: dict[str, Any] = {}
        self._judge: Any = None
        self._reference: Any = None  # the aligned model's log-probs for the KL (teacher_forced.reference_logprobs)
        self._anchors: dict[str, Any] | None = None
        self.controls: dict[str, Any] = {}  # the matched sets and the reversion analysis (section `controls`)
        self.tokenizer: Any = None
        self.base: Any = None

    # -- data
    def prepare_data(self) -> None:
        """Load every dataset and prompt set (fails early, before any training)."""
        from fastsel.experiments.data import load_task, tokenize_examples

        for spec in self.cfg.tasks:
            train = load_task(spec.name, spec.source, "train", limit=spec.max_train)
            test = load_task(spec.name, spec.source, "test", limit=spec.max_eval)
            if not train or not test:
                raise ValueError(f"task {spec['name']}: empty train ({len(train)}) or test ({len(test)}) split")
            self._data[spec.name] = {"train": train, "test": test}
        self.prompts = self._load_prompts()
        self.lookalikes = self._load_lookalikes()
        if self.tokenizer is not None:
            max_length = self.cfg.training.max_length
            for data in self._data.values():
                data["rows"] = list(tokenize_examples(data["train"], self.tokenizer, max_length))
                data["test_rows"] = list(tokenize_examples(data["test"], self.tokenizer, max_length))

    def _load_prompts(self) -> list[Any]:
        from fastsel.experiments.data import (
            load_advbench,
            load_harmbench,
            load_harmful_probes,
            load_prompt_file,
        )

        spec = self.cfg.safety.prompts
        if spec == "probes":
            prompts = load_harmful_probes()
        elif spec.startswith("advbench:"):
            prompts = load_advbench(spec.split(":", 1)[1])
        elif spec.startswith("harmbench:"):
            prompts = load_harmbench(spec.split(":", 1)[1])
        else:
            prompts = load_prompt_file(spec)
        limit = self.cfg.safety.max_prompts
        return list(prompts)[:limit] if limit else list(prompts)

    def _load_lookalikes(self) -> list[Any]:
        from fastsel.experiments.data import load_benign_lookalikes

        n = self.cfg.safety.max_lookalikes
        return list(load_benign_lookalikes())[:n] if n else []

    def judge(self) -> Any:
        """The configured ASR judge (built once)."""
        if self._judge is None:
            from fastsel.experiments.eval import LlamaGuardJudge, RefusalJudge, ThreeWayJudge

            sa = self.cfg.safety
            if sa.judge == "three_way":
                self._judge = ThreeWayJudge()
            else:
                self._judge = RefusalJudge() if sa.judge == "refusal" else LlamaGuardJudge(sa.judge_path)
        return self._judge

    # -- evaluation
    def margin(self, model: Any, *, kl: bool = False) -> dict[str, Any]:
        """The teacher-forced refusal margin (and KL to the aligned model) on the harmful prompts. The aligned
        model's log-probs at the scored positions are computed once and reused by every run."""
        from fastsel.experiments.eval.teacher_forced import (
            DEFAULT_REFUSAL,
            margin_continuations,
            reference_logprobs,
            refusal_margin,
        )

        refusal, batch_size = self.cfg.safety.refusal or DEFAULT_REFUSAL, self.cfg.eval.batch_size
        if kl and self._reference is None:
            self._reference = reference_logprobs(self.base, self.tokenizer, self.prompts,
                                                 margin_continuations(self.prompts, refusal), batch_size=batch_size)
        return refusal_margin(model, self.tokenizer, self.prompts, refusal=refusal, batch_size=batch_size, kl=kl,
                              reference=self._reference if kl else None)

    def evaluate(self, model: Any, *, reference: bool = True) -> dict[str, Any]:
        """Safety on the harmful prompts (ASR by the configured judge, refusal / compliance / degenerate
        rates, the teacher-forced refusal margin, KL to the aligned model), over-refusal on the benign
        look-alikes, and every task's score on its test rows, with the per-prompt and per-row values the
        bootstrap CIs need. reference=False: `model` is the aligned model itself (no KL to measure)."""
        from collections import Counter

        from fastsel.experiments.data import pad_token_id_of
        from fastsel.experiments.eval import (
            ThreeWayJudge,
            evaluate_task_detailed,
            generate_responses,
            heldout_losses,
        )
        from fastsel.experiments.eval.safety import judge_responses

        ev, sa = self.cfg.eval, self.cfg.safety
        start = time.time()
        texts = [p.prompt for p in self.prompts]
        responses = generate_responses(model, self.tokenizer, texts, max_new_tokens=sa.max_new_tokens,
                                       batch_size=ev.batch_size)
        judge = self.judge()
        asr = judge_responses(self.prompts, responses, judge)
        three_way = ThreeWayJudge()
        labels = asr["responses"] if judge.name == "three_way" else judge_responses(self.prompts, responses,
                                                                                     three_way)["responses"]
        n = len(labels)
        counts = Counter(r["reason"].split(":", 1)[0] for r in labels)
        safety: dict[str, Any] = {
            "judge": judge.name, "asr": float(asr["asr"]),
            **{f"{label}_rate": 100.0 * counts.get(label, 0) / n for label in ("refusal", "compliance",
                                                                               "degenerate")},
            "degenerate_reasons": dict(Counter(r["reason"].split(": ", 1)[1] for r in labels
                                               if r["reason"].startswith("degenerate"))),
            "refusal_margin": None, "kl_harmful": None, "over_refusal": None}
        per_prompt: dict[str, Any] = {"ids": [r["id"] for r in asr["responses"]],
                                      "unsafe": [int(r["unsafe"]) for r in asr["responses"]],
                                      "label": [r["reason"].split(":", 1)[0] for r in labels],
                                      "margin": None, "kl": None}
        if sa.teacher_forced:
            tf = self.margin(model, kl=sa.kl and reference)
            safety["refusal_margin"], per_prompt["margin"] = tf["margin"], tf["per_prompt"]
            if sa.kl:  # the aligned model's KL to itself is 0 by definition
                per_prompt["kl"] = tf["kl_per_prompt"] if reference else [0.0] * n
                safety["kl_harmful"] = sum(per_prompt["kl"]) / n
        lookalikes = None
        if self.lookalikes:
            benign = generate_responses(model, self.tokenizer, [p.prompt for p in self.lookalikes],
                                        max_new_tokens=sa.max_new_tokens, batch_size=ev.batch_size)
            judged = judge_responses(self.lookalikes, benign, three_way)["responses"]
            lookalikes = {"ids": [r["id"] for r in judged], "label": [r["reason"].split(":", 1)[0] for r in judged],
                          "samples": judged[:5]}
            safety["over_refusal"] = 100.0 * lookalikes["label"].count("refusal") / len(judged)
        scores, samples, per_row = {}, {}, {}
        for spec in self.cfg.tasks:
            budget = spec.max_new_tokens or ev.max_new_tokens
            detail = evaluate_task_detailed(model, self.tokenizer, spec.name, self._data[spec.name]["test"],
                                            budget, batch_size=ev.batch_size)
            scores[spec.name] = float(detail["score"])
            rows = detail.get("per_example", [])
            samples[spec.name] = rows[:3]
            per_row[spec.name] = {"ids": [r["id"] for r in rows],
                                  "score": [100.0 * float(r[detail["metric"]]) for r in rows]}
            if rows and "terse" in rows[0]:
                per_row[spec.name]["terse"] = [100.0 * float(r["terse"]) for r in rows]
            per_row[spec.name]["loss"] = heldout_losses(model, self._data[spec.name]["test_rows"],
                                                        pad_token_id=pad_token_id_of(self.tokenizer),
                                                        batch_size=ev.batch_size)
        responses_out = [{"id": r["id"], "category": r["category"], "prompt": r["prompt"], "response": r["response"],
                          "label": lab["reason"].split(":", 1)[0], "reason": lab["reason"], "unsafe": r["unsafe"]}
                         for r, lab in zip(asr["responses"], labels, strict=True)]
        return {"asr": float(asr["asr"]), "asr_per_category": asr["per_category"], "scores": scores,
                "task_loss": {t: sum(v["loss"]) / len(v["loss"]) for t, v in per_row.items() if v["loss"]},
                "safety": safety, "per_prompt": per_prompt, "lookalikes": lookalikes, "task_per_row": per_row,
                "asr_samples": responses_out[:5], "safety_responses": responses_out, "task_samples": samples,
                "eval_s": time.time() - start}

    # -- alignment
    def build_base(self) -> None:
        """Load the model; with alignment on, LoRA-SFT on refusals + helpful data and merge (cached on disk)."""
        import torch

        name = self.cfg.model
        model, self.tokenizer = load_base(name)
        check_lora_targets(model, self.cfg.lora.targets)  # before anything trains
        al = self.cfg.alignment
        if al.enabled:
            aligned = self.out / "aligned"
            weights = aligned / "model.safetensors"
            if weights.exists():
                from safetensors.torch import load_file

                model.load_state_dict(load_file(str(weights)), strict=False)
                logger.info("loaded the aligned model from %s", aligned)
            else:
                model = self._align(model)
                state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
                if getattr(model.config, "tie_word_embeddings", False):
                    state.pop("lm_head.weight", None)
                save_tensors(state, weights)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = model
        torch.set_grad_enabled(True)

    def load_pretrained(self) -> Any:
        """The config's model as loaded, before the alignment stage (frozen, eval mode)."""
        model, _ = load_base(self.cfg.model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _align(self, model: Any) -> Any:
        from fastsel.experiments.data import load_helpful, load_safety_refusals, tokenize_examples
        from fastsel.integrations.models import add_lora
        from fastsel.training.loop import train

        al = self.cfg.alignment
        refusals, helpful = load_safety_refusals(al.refusals), load_helpful(al.helpful)
        half = al.max_rows // 2
        examples = list(refusals)[:half] + list(helpful)[: al.max_rows - half]
        rows = list(tokenize_examples(examples, self.tokenizer, al.max_length))
        peft = add_lora(model, r=al.r, seed=0)
        start = time.time()
        result = train(peft, rows, strategy=strategies.EVERY_EXAMPLE, batch_size=al.batch_size, lr=al.lr,
                       epochs=al.epochs, seed=0, progress=self.progress, out_dir=str(self.out / "aligned_train"),
                       resume=_prepare_resume(self.out / "aligned_train"))
        write_json_safe(self.out / "aligned_train" / "summary.json",
                    {"rows": len(rows), "steps": result.steps, "final_loss": result.final_loss,
                     "train_s": time.time() - start})
        return peft.merge_and_unload()

    def anchors(self) -> dict[str, Any]:
        """The reference batches: refusal and harmful-compliance anchors with the model's chat template."""
        if self._anchors is None:
            from fastsel.experiments.data import compliance_anchor_batch, refusal_anchor_batch

            ref = self.cfg.reference
            self._anchors = {
                "refusal": refusal_anchor_batch(self.tokenizer, ref.anchors, max_length=ref.max_length,
                                                path=ref.refusals),
                "compliance": compliance_anchor_batch(self.tokenizer, ref.anchors, max_length=ref.max_length,
                                                      path=ref.compliance, refusals=ref.refusals),
            }
        return self._anchors

    # -- one stage
    def _train_options(self, method: str, seed: int) -> dict[str, Any]:
        tr = self.cfg.training
        opts = dict(batch_size=tr.batch_size, ratio=tr.ratio, lr=tr.lr, epochs=tr.epochs,
                    loss_band=tr.loss_band, grad_accum=tr.grad_accum, seed=seed, backend=tr.backend,
                    progress=self.progress, keep_last=1)
        if method in SELECTION_METHODS:
            opts["strategy"] = method
        elif method in REFERENCE_METHODS:
            ref, anchors = self.cfg.reference, self.anchors()
            opts.update(strategy=method, reference_every=ref.every, gradshield_budget=ref.budget,
                        reference_batches=[anchors["compliance"], anchors["refusal"]]
                        if strategies.strategy(method).normalized_anchors else [anchors["refusal"]])
        else:
            opts["strategy"] = strategies.EVERY_EXAMPLE
            if method == "grad_clip":
                opts["max_grad_norm"] = tr.max_grad_norm
            elif method == "kl":
                opts["kl_coef"] = tr.kl_coef
            elif method == "ewc":
                opts["ewc_coef"] = tr.ewc_coef
            elif method == "olora":
                opts.update(olora_coef=tr.olora_coef, olora_l2=tr.olora_l2)
        return opts

    def _next_olora_task(self, model: Any, previous: dict[str, Any], seed: int, stage: int) -> Any:
        """O-LoRA between tasks: the finished task's lora_A rows join `previous` (per site, stacked), its adapter
        is merged into the weights (frozen from then on: the forward is unchanged) and a fresh LoRA, seeded per
        stage, is trained for the next task."""
        import torch

        from fastsel.integrations.models import add_lora
        from fastsel.training.regularizers import lora_a_weights

        for name, rows in lora_a_weights(model).items():
            previous[name] = rows if name not in previous else torch.cat([previous[name], rows])
        lo = self.cfg.lora
        return add_lora(model.merge_and_unload(), r=lo.r, alpha=lo.alpha, dropout=lo.dropout,
                        target_modules=lo.targets, seed=seed * 1000 + stage)

    def audit_rows(self, model: Any, task: str) -> list[dict[str, Any]]:
        """Per-example loss, gradient norm and answer length of `task`'s training rows under `model`."""
        from fastsel.engine.norms import norm_pass
        from fastsel.experiments.data import collate, pad_token_id_of

        rows = self._data[task]["rows"]
        examples = {ex.id: ex for ex in self._data[task]["train"]}
        pad = pad_token_id_of(self.tokenizer)
        bs = self.cfg.training.batch_size
        out = []
        with eval_mode(model):
            for start in range(0, len(rows), bs):
                chunk = rows[start:start + bs]
                measured = norm_pass(collate(chunk, pad), model, backend=self.cfg.training.backend)
                for row, loss, norm in zip(chunk, measured.losses.tolist(), measured.norms.tolist(), strict=True):
                    ex = examples.get(row["id"])
                    out.append({"id": row["id"], "loss": loss, "norm": norm,
                                "answer_tokens": sum(1 for t in row["labels"] if t != -100),
                                "category": ex.category if ex else task,
                                "format": ex.meta.get("format") if ex else None})
        return out

    def _norm_audit(self, model: Any, task: str, stage_dir: Path) -> None:
        """Per-example loss and gradient norm of the stage's training rows under the stage's starting model."""
        import torch

        from fastsel.selection.rules import select_indices

        out = self.audit_rows(model, task)
        tr = self.cfg.training
        selection = select_indices(torch.tensor([r["loss"] for r in out]), torch.tensor([r["norm"] for r in out]),
                                   ratio=tr.ratio, strategy=strategies.DEFAULT, loss_band=tr.loss_band, seed=0)
        for r, keep in zip(out, selection.mask.tolist(), strict=True):
            r["moderate_selected"] = bool(keep)
        write_json_safe(stage_dir / "norms.json", {"task": task, "ratio": tr.ratio, "rows": out})

    def run_sequence(self, method: str, seed: int, base_result: dict[str, Any]) -> list[dict[str, Any]]:
        """All stages of one (method, seed): train (or skip if finished), evaluate, checkpoint."""
        import torch

        from fastsel.experiments.data import pad_token_id_of
        from fastsel.integrations.models import add_lora
        from fastsel.training.loop import train
        from fastsel.training.regularizers import anchor_parameters, diagonal_fisher

        lo = self.cfg.lora
        run_dir = self.out / "runs" / method / f"seed{seed}"
        model = add_lora(copy.deepcopy(self.base), r=lo.r, alpha=lo.alpha, dropout=lo.dropout,
                         target_modules=lo.targets, seed=seed)
        results = [base_result]
        ewc_state: dict[str, Any] | None = None
        olora_previous: dict[str, Any] = {}  # O-LoRA: the earlier tasks' lora_A rows per site
        audit_method = self.cfg.report.norm_pass_method
        for i, task in enumerate(self.tasks, 1):
            stage_dir = run_dir / f"stage{i}"
            done = stage_dir / "stage_result.json"
            if method == "olora" and i > 1:
                model = self._next_olora_task(model, olora_previous, seed, i)
            if done.exists():
                load_trainable_file(model, stage_dir / "trainable.safetensors")
                results.append(read_json(done))
                if method == "ewc" and i < len(self.tasks):
                    from safetensors.torch import load_file

                    ewc_state = {"fisher": load_file(str(stage_dir / "ewc_fisher.safetensors")),
                                 "anchor": load_file(str(stage_dir / "ewc_anchor.safetensors"))}
                logger.info("%s seed %d stage %d (%s): finished earlier, loaded", method, seed, i, task)
                continue
            torch.manual_seed(seed * 1000 + i)
            if method == audit_method and seed == self.cfg.seeds[0] and not (stage_dir / "norms.json").exists():
                self._norm_audit(model, task, stage_dir)
            opts = self._train_options(method, seed)
            if method == "ewc":
                if ewc_state is None:
                    opts["ewc_coef"] = 0.0  # the first task has no previous task to protect
                else:
                    opts["ewc_fisher"], opts["ewc_anchor"] = ewc_state["fisher"], ewc_state["anchor"]
            if method == "olora" and olora_previous:
                opts["olora_previous"] = olora_previous
            start = time.time()
            resume = _prepare_resume(stage_dir / "train")
            curve = MarginCurve(self, model, stage_dir / "margin_curve.jsonl", resume)
            rows = self._data[task]["rows"]
            if method in CONTROL_SETS:  # a control trains on every row of its matched set
                kept = set(self.controls["sets"][method])
                rows = [r for r in rows if r["id"] in kept]
            result = train(model, rows, out_dir=str(stage_dir / "train"), resume=resume,
                           on_step=curve.on_step if curve.every else None, **opts)
            train_s = time.time() - start - curve.seconds
            if method == "ewc" and i < len(self.tasks):
                rows = self._data[task]["rows"][: self.cfg.training.fisher_rows]
                fisher = diagonal_fisher(model, rows, batch_size=self.cfg.training.batch_size,
                                         pad_token_id=pad_token_id_of(self.tokenizer))
                ewc_state = {"fisher": fisher, "anchor": anchor_parameters(model)}
                save_tensors({k: v.contiguous() for k, v in fisher.items()}, stage_dir / "ewc_fisher.safetensors")
                save_tensors(ewc_state["anchor"], stage_dir / "ewc_anchor.safetensors")
            save_tensors(trainable_state(model), stage_dir / "trainable.safetensors")
            evaluation = self.evaluate(model)
            norms = [r for r in result.history if r.get("norm_median") is not None]
            stage = {"stage": i, "task": task, "method": method, "seed": seed, **evaluation,
                     "margin_curve": curve.points(result.steps, evaluation["safety"]["refusal_margin"]),
                     "train": {"steps": result.steps, "final_loss": result.final_loss, "train_s": train_s,
                               "margin_curve_s": curve.seconds,
                               "kept": sum(r["kept"] for r in result.history),
                               "examples": sum(r["batch_size"] for r in result.history),
                               "norm_median_mean": (sum(r["norm_median"] for r in norms) / len(norms)
                                                    if norms else None)}}
            write_json_safe(done, json_safe(stage))
            results.append(stage)
            logger.info("%s seed %d stage %d (%s): ASR %.1f%% scores %s (train %.0fs, eval %.0fs)", method, seed,
                        i, task, stage["asr"], {k: round(v, 1) for k, v in stage["scores"].items()}, train_s,
                        stage["eval_s"])
        return results

    # -- everything
    def run(self) -> dict[str, Any]:
        """The whole pipeline; returns (and writes) results.json's content."""
        t0 = time.time()
        saved = self.out / "config.json"
        config = json.loads(json.dumps(self.cfg.to_json()))
        if saved.exists() and read_json(saved) != config:
            raise ConfigMismatch(f"{self.out} holds a run of a different config ({saved}): its finished stages "
                                 "would not match this config; use a new --out directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()  # raw data first: a bad file fails before the model loads
        self.build_base()
        self.prepare_data()
        if any(m in REFERENCE_METHODS for m in self.cfg.methods):
            self.anchors()  # the anchor data is read and tokenized before anything trains
        write_json_safe(saved, config)
        self.controls = prepare_controls(self)
        base_file = self.out / "runs" / "base" / "stage_result.json"
        if base_file.exists():
            base_result = read_json(base_file)
        else:
            base_result = json_safe({"stage": 0, "task": "base", **self.evaluate(self.base, reference=False)})
            write_json_safe(base_file, base_result)
        per_run: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for method in self.cfg.methods:
            for seed in self.cfg.seeds:
                per_run.setdefault(method, {})[seed] = self.run_sequence(method, seed, base_result)
        from fastsel.experiments.summary import safety_summary

        results = summarize(per_run, self.tasks)
        results.update(safety_summary(per_run, base_result))
        if self.controls:
            results["controls"] = controls_summary(self.controls)
        results["wall_s"] = time.time() - t0
        write_json_safe(self.out / "results.json", results)
        return results


def run_continual(config: str | os.PathLike[str] | Mapping[str, Any] | ContinualConfig, out: str | os.PathLike[str],
                  *, progress: bool = False, report: bool = True) -> dict[str, Any]:
    """Validate `config` (a YAML path, a dict or a ContinualConfig), run the pipeline into `out`, write the report."""
    if isinstance(config, ContinualConfig):
        cfg = config
    else:
        cfg = validate_config(config) if isinstance(config, Mapping) else load_config(config)
    results = Runner(cfg, out, progress=progress).run()
    if report:
        from fastsel.experiments.report import write_report

        write_report(out)
    return results


# ------------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fastsel continual`."""
    parser.add_argument("--config", required=True, help="YAML config (see configs/reproduce.yaml)")
    parser.add_argument("--out", required=True, help="output directory (re-running resumes finished stages)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and the plots")


def run(args: argparse.Namespace) -> int:
    """Entry point of `fastsel continual`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("fastsel.experiments.data.tokenize", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    start = time.time()
    try:
        results = run_continual(cfg, args.out, progress=args.progress, report=not args.no_report)
    except (ConfigMismatch, LoraTargetError) as e:
        print(f"error: {e}")
        return 2
    print(headline(results))
    print(f"wrote {Path(args.out) / 'results.json'} and report.md in {time.time() - start:.0f}s")
    return 0
