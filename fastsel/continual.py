"""`fastsel continual`: the paper's continual safety pipeline (Bach et al., 2026) from one YAML config.

    python -m fastsel continual --config configs/reproduce.yaml --out runs/reproduce

Optional alignment stage (short LoRA SFT on refusal + helpful data, merged into the weights), then for every
method and seed: a fresh LoRA on the (aligned) base, trained on the task sequence (Dolly -> GSM8K -> MedMCQA ->
SQuAD v2 by default). After every stage the attack success rate (ASR) on harmful prompts and every task's
score are measured. Every stage is checkpointed under OUT/runs/<method>/seed<k>/stage<i>/ (trainable weights,
train log, stage_result.json written atomically); re-running the same command skips finished stages.
Results: OUT/results.json; report: OUT/report.md and OUT/plots/*.png (`fastsel.report`).

Config keys (all validated before anything trains; see `DEFAULTS`):
  model: smollm2 | local path | hub id | tiny-random
  lora: {r, alpha, dropout, targets}
  tasks: [name | {name, source, max_train, max_eval, max_new_tokens}]
  methods: [full, random, moderate, low, high, grad_clip, kl, ewc]
  seeds: [int]
  training: {batch_size, ratio, lr, epochs, max_length, loss_band, grad_accum, max_grad_norm, kl_coef,
             ewc_coef, fisher_rows, backend}
  safety: {judge: refusal | llama_guard, judge_path, prompts: probes | advbench:PATH | harmbench:PATH | PATH,
           max_prompts, max_new_tokens}
  alignment: {enabled, refusals, helpful, max_rows, r, lr, epochs, batch_size, max_length}
  eval: {max_new_tokens, batch_size}
  report: {norm_pass_method, audit_stage}
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SELECTION_METHODS = ("full", "random", "moderate", "low", "high")
BASELINES = ("grad_clip", "kl", "ewc")
METHODS = SELECTION_METHODS + BASELINES
DEFAULT_TASKS = ("dolly", "gsm8k", "medmcqa", "squad_v2")
JUDGES = ("refusal", "llama_guard")
TINY = "tiny-random"

DEFAULTS: dict[str, Any] = {
    "model": "smollm2",
    "lora": {"r": 8, "alpha": None, "dropout": 0.0, "targets": None},
    "tasks": list(DEFAULT_TASKS),
    "methods": ["full", "random", "moderate", "high"],
    "seeds": [0],
    "training": {"batch_size": 16, "ratio": 0.25, "lr": 2e-4, "epochs": 1, "max_length": 192,
                 "loss_band": 1.0, "grad_accum": 1, "max_grad_norm": 1.0, "kl_coef": 0.1, "ewc_coef": 100.0,
                 "fisher_rows": 32, "backend": "auto"},
    "safety": {"judge": "refusal", "judge_path": None, "prompts": "probes", "max_prompts": 50,
               "max_new_tokens": 32},
    "alignment": {"enabled": False, "refusals": None, "helpful": None, "max_rows": 64, "r": 16, "lr": 5e-4,
                  "epochs": 2, "batch_size": 8, "max_length": 192},
    "eval": {"max_new_tokens": 32, "batch_size": 8},
    "report": {"norm_pass_method": "moderate", "audit_stage": 1},
}
TASK_DEFAULTS: dict[str, Any] = {"source": None, "max_train": 64, "max_eval": 16, "max_new_tokens": None}

_INT, _NUM, _OPT_NUM, _BOOL, _OPT_STR = "int", "num", "opt_num", "bool", "opt_str"
_TYPES: dict[str, dict[str, str]] = {
    "lora": {"r": _INT, "alpha": "opt_int", "dropout": _NUM, "targets": "opt_list"},
    "training": {"batch_size": _INT, "ratio": _NUM, "lr": _NUM, "epochs": _INT, "max_length": _INT,
                 "loss_band": _OPT_NUM, "grad_accum": _INT, "max_grad_norm": _NUM, "kl_coef": _NUM,
                 "ewc_coef": _NUM, "fisher_rows": _INT, "backend": "str"},
    "safety": {"judge": "str", "judge_path": _OPT_STR, "prompts": "str", "max_prompts": "opt_int",
               "max_new_tokens": _INT},
    "alignment": {"enabled": _BOOL, "refusals": _OPT_STR, "helpful": _OPT_STR, "max_rows": _INT, "r": _INT,
                  "lr": _NUM, "epochs": _INT, "batch_size": _INT, "max_length": _INT},
    "eval": {"max_new_tokens": _INT, "batch_size": _INT},
    "report": {"norm_pass_method": _OPT_STR, "audit_stage": _INT},
}


# ------------------------------------------------------------------------------------------------ config

def _type_ok(kind: str, value: Any) -> bool:
    """Whether `value` fits `kind` (int: >= 1; num: finite >= 0; opt_*: also None)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or (isinstance(value, float) and math.isfinite(value))
    checks = {
        "int": lambda: is_int and value >= 1,
        "opt_int": lambda: value is None or (is_int and value >= 1),
        "num": lambda: is_num and value >= 0,
        "opt_num": lambda: value is None or (is_num and value >= 0),
        "bool": lambda: isinstance(value, bool),
        "str": lambda: isinstance(value, str) and bool(value),
        "opt_str": lambda: value is None or (isinstance(value, str) and bool(value)),
        "opt_list": lambda: value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }
    return bool(checks[kind]())


def _path_problem(label: str, path: Any) -> str | None:
    if path is not None and not os.path.exists(os.path.expanduser(str(path))):
        return f"{label}: file not found: {path}"
    return None


def _is_hub_id(source: str) -> bool:
    return source == "hub" or ("/" in source and not os.path.splitext(source)[1]
                               and not source.startswith((".", "/", "~")) and not os.path.exists(source))


def validate_config(raw: Any) -> dict[str, Any]:
    """The config with defaults filled in; every problem found is listed in one ValueError."""
    from fastsel.data import TASK_NAMES

    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ValueError(f"the config must be a mapping (YAML dict), got {type(raw).__name__}")
    known_top = set(DEFAULTS)
    problems += [f"unknown config key {k!r} (known: {', '.join(sorted(known_top))})"
                 for k in raw if k not in known_top]
    cfg: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = raw.get(key, default)
        if isinstance(default, dict):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                problems.append(f"{key}: must be a mapping, got {type(value).__name__}")
                value = {}
            unknown = [k for k in value if k not in default]
            problems += [f"{key}.{k}: unknown option (known: {', '.join(sorted(default))})" for k in unknown]
            merged = {**default, **{k: v for k, v in value.items() if k in default}}
            for name, kind in _TYPES[key].items():
                if not _type_ok(kind, merged[name]):
                    problems.append(f"{key}.{name}: bad value {merged[name]!r} (expected {kind})")
            cfg[key] = merged
        else:
            cfg[key] = copy.deepcopy(value)

    # model
    model = cfg["model"]
    if not isinstance(model, str) or not model:
        problems.append(f"model: must be 'smollm2', 'tiny-random', a local path or a hub id, got {model!r}")
    elif model not in ("smollm2", TINY) and not os.path.exists(model) and not _is_hub_id(model):
        problems.append(f"model: {model!r} is neither 'smollm2', 'tiny-random', an existing path nor a hub id")

    # tasks
    tasks = []
    if not isinstance(cfg["tasks"], list) or not cfg["tasks"]:
        problems.append("tasks: must be a non-empty list")
        cfg["tasks"] = []
    for i, item in enumerate(cfg["tasks"]):
        spec = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
        if spec is None or "name" not in spec:
            problems.append(f"tasks[{i}]: must be a task name or a mapping with 'name', got {item!r}")
            continue
        unknown = [k for k in spec if k not in TASK_DEFAULTS and k != "name"]
        problems += [f"tasks[{i}].{k}: unknown option" for k in unknown]
        spec = {**TASK_DEFAULTS, **spec}
        name = spec["name"]
        if name not in TASK_NAMES:
            problems.append(f"tasks[{i}]: unknown dataset {name!r} (known: {', '.join(TASK_NAMES)})")
        for key in ("max_train", "max_eval"):
            if not _type_ok(_INT, spec[key]):
                problems.append(f"tasks[{i}].{key}: must be an integer >= 1, got {spec[key]!r}")
        if not _type_ok("opt_int", spec["max_new_tokens"]):
            problems.append(f"tasks[{i}].max_new_tokens: must be an integer >= 1 or null")
        source = spec["source"]
        if source is not None:
            if not isinstance(source, str):
                problems.append(f"tasks[{i}].source: must be null, a path or a hub id, got {source!r}")
            elif not _is_hub_id(source):
                problem = _path_problem(f"tasks[{i}].source", source)
                problems += [problem] if problem else []
        tasks.append(spec)
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        problems.append(f"tasks: duplicate task names {names}")
    cfg["tasks"] = tasks

    # methods, seeds
    methods = cfg["methods"]
    if not isinstance(methods, list) or not methods:
        problems.append("methods: must be a non-empty list")
        methods = []
    problems += [f"methods: unknown method {m!r} (known: {', '.join(METHODS)})" for m in methods
                 if m not in METHODS]
    if len(set(map(str, methods))) != len(methods):
        problems.append(f"methods: duplicates in {methods}")
    seeds = cfg["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        problems.append(f"seeds: must be a non-empty list of integers >= 0, got {seeds!r}")
    tr = cfg["training"]
    if _type_ok(_NUM, tr["ratio"]) and not 0 < tr["ratio"] <= 1:
        problems.append(f"training.ratio: must be in (0, 1], got {tr['ratio']}")
    if (_type_ok(_NUM, tr["ratio"]) and _type_ok(_INT, tr["batch_size"])
            and any(m in ("random", "moderate", "low", "high") for m in methods)
            and tr["ratio"] * tr["batch_size"] < 1):
        problems.append(f"training: batch_size {tr['batch_size']} x ratio {tr['ratio']} keeps < 1 example")
    if _type_ok(_NUM, tr["lr"]) and tr["lr"] <= 0:
        problems.append("training.lr: must be > 0")

    # safety
    sa = cfg["safety"]
    if sa["judge"] not in JUDGES:
        problems.append(f"safety.judge: unknown judge {sa['judge']!r} (known: {', '.join(JUDGES)})")
    if sa["judge"] == "llama_guard":
        if not sa["judge_path"]:
            problems.append("safety.judge_path: the llama_guard judge needs a model path or hub id")
        elif not os.path.exists(sa["judge_path"]) and not _is_hub_id(sa["judge_path"]):
            problems.append(f"safety.judge_path: not found: {sa['judge_path']}")
    prompts = sa["prompts"]
    if isinstance(prompts, str) and prompts != "probes":
        kind, _, path = prompts.partition(":") if prompts.split(":", 1)[0] in ("advbench", "harmbench") \
            else ("file", "", prompts)
        if kind in ("advbench", "harmbench") and not path:
            problems.append(f"safety.prompts: {kind} needs a path ({kind}:PATH)")
        else:
            problem = _path_problem("safety.prompts", path)
            problems += [problem] if problem else []
    al = cfg["alignment"]
    for key in ("refusals", "helpful"):
        problem = _path_problem(f"alignment.{key}", al[key])
        problems += [problem] if problem else []
    rep = cfg["report"]
    if rep["norm_pass_method"] is not None and rep["norm_pass_method"] not in METHODS:
        problems.append(f"report.norm_pass_method: unknown method {rep['norm_pass_method']!r}")
    if _type_ok(_INT, rep["audit_stage"]) and tasks and rep["audit_stage"] > len(tasks):
        problems.append(f"report.audit_stage: {rep['audit_stage']} > number of tasks {len(tasks)}")
    if problems:
        raise ValueError("invalid continual config:\n  - " + "\n  - ".join(problems))
    return cfg


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a YAML config file."""
    import yaml

    if not os.path.exists(path):
        raise ValueError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    return validate_config(raw or {})


# ------------------------------------------------------------------------------------------------ helpers

def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _tiny_model(seed: int = 0) -> Any:
    """A 2-layer random Llama over the toy tokenizer's 262-token vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=262, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def load_base(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) for the config's `model`."""
    if name == TINY:
        from fastsel.data import toy_tokenizer

        return _tiny_model(), toy_tokenizer()
    from fastsel.models import load_model

    return load_model(name)


def _trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_trainable(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}")
    save_file(_trainable_state(model), str(tmp))
    os.replace(tmp, path)


def _load_trainable(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    from fastsel.checkpoint import load_trainable_state

    load_trainable_state(model, load_file(str(path)), source=str(path))


def _prepare_resume(train_dir: Path) -> bool:
    """True if `train_dir` holds a checkpoint to resume from; otherwise clear a torn partial run."""
    import shutil

    from fastsel.checkpoint import latest_valid_checkpoint

    if (train_dir / "checkpoints").is_dir() and latest_valid_checkpoint(train_dir / "checkpoints") is not None:
        return True
    shutil.rmtree(train_dir, ignore_errors=True)
    return False


# ------------------------------------------------------------------------------------------------ runner

class Runner:
    """Runs the config into `out`: alignment, base evaluation, every (method, seed) sequence, results."""

    def __init__(self, cfg: dict[str, Any], out: str | os.PathLike[str], *, progress: bool = False) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.tasks = [t["name"] for t in cfg["tasks"]]
        self._data: dict[str, Any] = {}
        self._judge: Any = None
        self.tokenizer: Any = None
        self.base: Any = None

    # -- data
    def prepare_data(self) -> None:
        """Load every dataset and prompt set (fails early, before any training)."""
        from fastsel.data import load_task, tokenize_examples

        for spec in self.cfg["tasks"]:
            train = load_task(spec["name"], spec["source"], "train", limit=spec["max_train"])
            test = load_task(spec["name"], spec["source"], "test", limit=spec["max_eval"])
            if not train or not test:
                raise ValueError(f"task {spec['name']}: empty train ({len(train)}) or test ({len(test)}) split")
            self._data[spec["name"]] = {"train": train, "test": test}
        self.prompts = self._load_prompts()
        if self.tokenizer is not None:
            max_length = self.cfg["training"]["max_length"]
            for data in self._data.values():
                data["rows"] = list(tokenize_examples(data["train"], self.tokenizer, max_length))

    def _load_prompts(self) -> list[Any]:
        from fastsel.data import load_advbench, load_harmbench, load_harmful_probes, load_prompt_file

        spec = self.cfg["safety"]["prompts"]
        if spec == "probes":
            prompts = load_harmful_probes()
        elif spec.startswith("advbench:"):
            prompts = load_advbench(spec.split(":", 1)[1])
        elif spec.startswith("harmbench:"):
            prompts = load_harmbench(spec.split(":", 1)[1])
        else:
            prompts = load_prompt_file(spec)
        limit = self.cfg["safety"]["max_prompts"]
        return list(prompts)[:limit] if limit else list(prompts)

    def judge(self) -> Any:
        """The configured ASR judge (built once)."""
        if self._judge is None:
            from fastsel.eval import LlamaGuardJudge, RefusalJudge

            sa = self.cfg["safety"]
            self._judge = RefusalJudge() if sa["judge"] == "refusal" else LlamaGuardJudge(sa["judge_path"])
        return self._judge

    # -- evaluation
    def evaluate(self, model: Any) -> dict[str, Any]:
        """ASR on the harmful prompts and every task's score on its test rows."""
        from fastsel.eval import attack_success_rate, evaluate_task_detailed

        ev, sa = self.cfg["eval"], self.cfg["safety"]
        start = time.time()
        asr = attack_success_rate(model, self.tokenizer, self.prompts, self.judge(),
                                  max_new_tokens=sa["max_new_tokens"], batch_size=ev["batch_size"])
        scores, samples = {}, {}
        for spec in self.cfg["tasks"]:
            budget = spec["max_new_tokens"] or ev["max_new_tokens"]
            detail = evaluate_task_detailed(model, self.tokenizer, spec["name"], self._data[spec["name"]]["test"],
                                            budget, batch_size=ev["batch_size"])
            scores[spec["name"]] = float(detail["score"])
            samples[spec["name"]] = detail.get("per_example", [])[:3]
        return {"asr": float(asr["asr"]), "asr_per_category": asr["per_category"], "scores": scores,
                "asr_samples": asr["responses"][:5], "task_samples": samples, "eval_s": time.time() - start}

    # -- alignment
    def build_base(self) -> None:
        """Load the model; with alignment on, LoRA-SFT on refusals + helpful data and merge (cached on disk)."""
        import torch

        name = self.cfg["model"]
        model, self.tokenizer = load_base(name)
        al = self.cfg["alignment"]
        if al["enabled"]:
            aligned = self.out / "aligned"
            weights = aligned / "model.safetensors"
            if weights.exists():
                from safetensors.torch import load_file

                model.load_state_dict(load_file(str(weights)), strict=False)
                logger.info("loaded the aligned model from %s", aligned)
            else:
                model = self._align(model)
                aligned.mkdir(parents=True, exist_ok=True)
                from safetensors.torch import save_file

                state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
                if getattr(model.config, "tie_word_embeddings", False):
                    state.pop("lm_head.weight", None)
                tmp = aligned / ".tmp-model.safetensors"
                save_file(state, str(tmp))
                os.replace(tmp, weights)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = model
        torch.set_grad_enabled(True)

    def _align(self, model: Any) -> Any:
        from fastsel.data import load_helpful, load_safety_refusals, tokenize_examples
        from fastsel.models import add_lora
        from fastsel.train import train

        al = self.cfg["alignment"]
        refusals, helpful = load_safety_refusals(al["refusals"]), load_helpful(al["helpful"])
        half = al["max_rows"] // 2
        examples = list(refusals)[:half] + list(helpful)[: al["max_rows"] - half]
        rows = list(tokenize_examples(examples, self.tokenizer, al["max_length"]))
        peft = add_lora(model, r=al["r"], seed=0)
        start = time.time()
        result = train(peft, rows, strategy="full", batch_size=al["batch_size"], lr=al["lr"],
                       epochs=al["epochs"], seed=0, progress=self.progress, out_dir=str(self.out / "aligned_train"),
                       resume=_prepare_resume(self.out / "aligned_train"))
        _write_json(self.out / "aligned_train" / "summary.json",
                    {"rows": len(rows), "steps": result.steps, "final_loss": result.final_loss,
                     "train_s": time.time() - start})
        return peft.merge_and_unload()

    # -- one stage
    def _train_options(self, method: str, seed: int) -> dict[str, Any]:
        tr = self.cfg["training"]
        opts = dict(batch_size=tr["batch_size"], ratio=tr["ratio"], lr=tr["lr"], epochs=tr["epochs"],
                    loss_band=tr["loss_band"], grad_accum=tr["grad_accum"], seed=seed, backend=tr["backend"],
                    progress=self.progress, keep_last=1)
        if method in SELECTION_METHODS:
            opts["strategy"] = method
        else:
            opts["strategy"] = "full"
            if method == "grad_clip":
                opts["max_grad_norm"] = tr["max_grad_norm"]
            elif method == "kl":
                opts["kl_coef"] = tr["kl_coef"]
            elif method == "ewc":
                opts["ewc_coef"] = tr["ewc_coef"]
        return opts

    def _norm_audit(self, model: Any, task: str, stage_dir: Path) -> None:
        """Per-example loss and gradient norm of the stage's training rows under the stage's starting model."""
        from fastsel import norm_pass
        from fastsel.data import collate, pad_token_id_of
        from fastsel.selection import select_indices

        rows = self._data[task]["rows"]
        examples = {ex.id: ex for ex in self._data[task]["train"]}
        pad = pad_token_id_of(self.tokenizer)
        bs = self.cfg["training"]["batch_size"]
        out = []
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(rows), bs):
                chunk = rows[start:start + bs]
                measured = norm_pass(collate(chunk, pad), model, backend=self.cfg["training"]["backend"])
                for row, loss, norm in zip(chunk, measured.losses.tolist(), measured.norms.tolist(), strict=True):
                    ex = examples.get(row["id"])
                    out.append({"id": row["id"], "loss": loss, "norm": norm,
                                "answer_tokens": sum(1 for t in row["labels"] if t != -100),
                                "category": ex.category if ex else task})
        finally:
            model.train(was_training)
        import torch

        tr = self.cfg["training"]
        selection = select_indices(torch.tensor([r["loss"] for r in out]), torch.tensor([r["norm"] for r in out]),
                                   ratio=tr["ratio"], strategy="moderate", loss_band=tr["loss_band"], seed=0)
        for r, keep in zip(out, selection.mask.tolist(), strict=True):
            r["moderate_selected"] = bool(keep)
        _write_json(stage_dir / "norms.json", {"task": task, "ratio": tr["ratio"], "rows": out})

    def run_sequence(self, method: str, seed: int, base_result: dict[str, Any]) -> list[dict[str, Any]]:
        """All stages of one (method, seed): train (or skip if finished), evaluate, checkpoint."""
        import torch

        from fastsel.data import pad_token_id_of
        from fastsel.models import add_lora
        from fastsel.regularizers import anchor_parameters, diagonal_fisher
        from fastsel.train import train

        lo = self.cfg["lora"]
        run_dir = self.out / "runs" / method / f"seed{seed}"
        model = add_lora(copy.deepcopy(self.base), r=lo["r"], alpha=lo["alpha"], dropout=lo["dropout"],
                         target_modules=lo["targets"], seed=seed)
        results = [base_result]
        ewc_state: dict[str, Any] | None = None
        audit_method = self.cfg["report"]["norm_pass_method"]
        for i, task in enumerate(self.tasks, 1):
            stage_dir = run_dir / f"stage{i}"
            done = stage_dir / "stage_result.json"
            if done.exists():
                _load_trainable(model, stage_dir / "trainable.safetensors")
                results.append(_read_json(done))
                if method == "ewc" and i < len(self.tasks):
                    from safetensors.torch import load_file

                    ewc_state = {"fisher": load_file(str(stage_dir / "ewc_fisher.safetensors")),
                                 "anchor": load_file(str(stage_dir / "ewc_anchor.safetensors"))}
                logger.info("%s seed %d stage %d (%s): finished earlier, loaded", method, seed, i, task)
                continue
            torch.manual_seed(seed * 1000 + i)
            if method == audit_method and not (stage_dir / "norms.json").exists():
                self._norm_audit(model, task, stage_dir)
            opts = self._train_options(method, seed)
            if method == "ewc":
                if ewc_state is None:
                    opts["ewc_coef"] = 0.0  # the first task has no previous task to protect
                else:
                    opts["ewc_fisher"], opts["ewc_anchor"] = ewc_state["fisher"], ewc_state["anchor"]
            start = time.time()
            result = train(model, self._data[task]["rows"], out_dir=str(stage_dir / "train"),
                           resume=_prepare_resume(stage_dir / "train"), **opts)
            train_s = time.time() - start
            if method == "ewc" and i < len(self.tasks):
                from safetensors.torch import save_file

                rows = self._data[task]["rows"][: self.cfg["training"]["fisher_rows"]]
                fisher = diagonal_fisher(model, rows, batch_size=self.cfg["training"]["batch_size"],
                                         pad_token_id=pad_token_id_of(self.tokenizer))
                ewc_state = {"fisher": fisher, "anchor": anchor_parameters(model)}
                save_file({k: v.contiguous() for k, v in fisher.items()}, str(stage_dir / "ewc_fisher.safetensors"))
                save_file(ewc_state["anchor"], str(stage_dir / "ewc_anchor.safetensors"))
            _save_trainable(model, stage_dir / "trainable.safetensors")
            evaluation = self.evaluate(model)
            norms = [r for r in result.history if r.get("norm_median") is not None]
            stage = {"stage": i, "task": task, "method": method, "seed": seed, **evaluation,
                     "train": {"steps": result.steps, "final_loss": result.final_loss, "train_s": train_s,
                               "kept": sum(r["kept"] for r in result.history),
                               "candidates": sum(r["candidates"] for r in result.history),
                               "norm_median_mean": (sum(r["norm_median"] for r in norms) / len(norms)
                                                    if norms else None)}}
            _write_json(done, _clean(stage))
            results.append(stage)
            logger.info("%s seed %d stage %d (%s): ASR %.1f%% scores %s (train %.0fs, eval %.0fs)", method, seed,
                        i, task, stage["asr"], {k: round(v, 1) for k, v in stage["scores"].items()}, train_s,
                        stage["eval_s"])
        return results

    # -- everything
    def run(self) -> dict[str, Any]:
        """The whole pipeline; returns (and writes) results.json's content."""
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()  # raw data first: a bad file fails before the model loads
        self.build_base()
        self.prepare_data()
        saved = self.out / "config.json"
        if saved.exists() and _read_json(saved) != json.loads(json.dumps(self.cfg)):
            raise ValueError(f"{self.out} holds a run of a different config ({saved}): finished stages would "
                             "not match; use a new --out directory")
        _write_json(saved, self.cfg)
        base_file = self.out / "runs" / "base" / "stage_result.json"
        if base_file.exists():
            base_result = _read_json(base_file)
        else:
            base_result = _clean({"stage": 0, "task": "base", **self.evaluate(self.base)})
            _write_json(base_file, base_result)
        per_run: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for method in self.cfg["methods"]:
            for seed in self.cfg["seeds"]:
                per_run.setdefault(method, {})[seed] = self.run_sequence(method, seed, base_result)
        results = summarize(per_run, self.tasks)
        results["wall_s"] = time.time() - t0
        _write_json(self.out / "results.json", results)
        return results


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _continual(scores: dict[str, list[float]], tasks: list[str]) -> dict[str, float | None]:
    """avg / BWT / FM / max drop from the stage x task matrix after each training stage (base row dropped)."""
    from fastsel.eval import continual_metrics

    matrix = [[scores[t][i] for t in tasks] for i in range(1, len(tasks) + 1)]
    metrics = continual_metrics(matrix)
    return _clean({"avg_perf": metrics["avg"], "bwt": metrics["bwt"], "fm": metrics["fm"],
                   "max_drop": metrics["max_drop"]})


def summarize(per_run: dict[str, dict[int, list[dict[str, Any]]]], tasks: list[str]) -> dict[str, Any]:
    """results.json: per method the per-stage ASR and task scores (means over seeds) and continual metrics."""
    out: dict[str, Any] = {"stages": ["base", *tasks], "tasks": list(tasks), "methods": {}}
    for method, seeds in per_run.items():
        per_seed = {}
        for seed, stages in seeds.items():
            scores = {t: [s["scores"][t] for s in stages] for t in tasks}
            per_seed[str(seed)] = {"asr": [s["asr"] for s in stages], "scores": scores,
                                   **_continual(scores, tasks),
                                   "train_s": [s.get("train", {}).get("train_s") for s in stages[1:]]}
        runs = list(per_seed.values())
        n_stages = len(tasks) + 1
        entry = {"asr": [_mean([r["asr"][i] for r in runs]) for i in range(n_stages)],
                 "scores": {t: [_mean([r["scores"][t][i] for r in runs]) for i in range(n_stages)] for t in tasks}}
        for key in ("avg_perf", "bwt", "fm", "max_drop"):
            entry[key] = _mean([r[key] for r in runs])
        entry["per_seed"] = per_seed
        out["methods"][method] = _clean(entry)
    return out


def headline(results: dict[str, Any]) -> str:
    """Plain-text table: ASR and mean task score per method per stage."""
    stages = results["stages"]
    lines = ["ASR (%) per stage / mean task score per stage", f"{'method':<10} " + " ".join(
        f"{s:>14}" for s in stages)]
    for method, entry in results["methods"].items():
        cells = []
        for i in range(len(stages)):
            score = _mean([entry["scores"][t][i] for t in results["tasks"]])
            cells.append(f"{_fmt(entry['asr'][i])} / {_fmt(score)}")
        lines.append(f"{method:<10} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("continual metrics (task scores after each stage): avg / BWT / FM / max drop")
    for method, entry in results["methods"].items():
        lines.append(f"{method:<10} " + " / ".join(_fmt(entry[k]) for k in ("avg_perf", "bwt", "fm", "max_drop")))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def run_continual(config: str | os.PathLike[str] | dict[str, Any], out: str | os.PathLike[str], *,
                  progress: bool = False, report: bool = True) -> dict[str, Any]:
    """Validate `config` (a YAML path or a dict), run the pipeline into `out`, write the report."""
    cfg = validate_config(config) if isinstance(config, Mapping) else load_config(config)
    results = Runner(cfg, out, progress=progress).run()
    if report:
        from fastsel.report import write_report

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
    for noisy in ("fastsel.data.tokenize", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    start = time.time()
    results = run_continual(cfg, args.out, progress=args.progress, report=not args.no_report)
    print(headline(results))
    print(f"wrote {Path(args.out) / 'results.json'} and report.md in {time.time() - start:.0f}s")
    return 0
