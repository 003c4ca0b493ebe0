"""The config of `fastsel continual`: dataclasses loaded from YAML, every problem reported at once, before training.

    cfg = load_config("configs/reproduce.yaml")      # ContinualConfig; ValueError listing every problem
    cfg.training.lr, cfg.tasks[0].name, cfg.to_json()

Each section is a dataclass whose fields carry their defaults and limits (`field(metadata=...)`: ge/gt/le/lt,
choices). `from_mapping` checks types and limits field by field and names each bad key (`training.lr: ...`);
`validate` then checks what depends on several keys or on the machine (files that must exist, hub ids, methods,
the judge). A source 'owner/name' (one slash, no extension) that is not an existing local path is a hub id: it
must be in the local hub cache or, unless HF_HUB_OFFLINE is set, be found on the hub within HUB_TIMEOUT_S seconds;
so a mistyped relative path (`mydata/gsm8k_local`) is one line of the validation error, not a ConnectionError at
load time. Numbers in exponent form (`1e-3`, which YAML 1.1 reads as a string) are accepted for float fields.
What can only be checked against the model (LoRA target modules) is checked by the runner right after the model
loads, before anything trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastsel.selection import strategies

SELECTION_METHODS = strategies.names(references=False)  # the selection strategies (full: no selection)
REFERENCE_METHODS = strategies.names(references=True)  # selection by gradient dots with safety anchors
BASELINES = ("grad_clip", "kl", "ewc", "olora")  # training-time baselines (olora: O-LoRA, Wang et al. 2023)
# the confounder controls: every row of a fixed matched set (section `controls`), the first task only
CONTROL_METHODS = ("matched_high", "matched_moderate", "matched_short", "matched_long")
METHODS = SELECTION_METHODS + REFERENCE_METHODS + BASELINES + CONTROL_METHODS
DEFAULT_TASKS = ("dolly", "gsm8k", "medmcqa", "squad_v2")
JUDGES = ("three_way", "refusal", "llama_guard")
TINY = "tiny-random"
EMBEDDED = "smollm2"


def _limits(**kwargs: Any) -> dict[str, Any]:
    return dict(kwargs)


POSITIVE = _limits(ge=1)
SELECTION = _limits(checked_by="SelectionOptions")  # the limits of fastsel.training.options, applied in `validate`


@dataclass
class LoraSpec:
    """The LoRA adapter trained in every stage."""

    r: int = field(default=8, metadata=POSITIVE)
    alpha: int | None = field(default=None, metadata=POSITIVE)
    dropout: float = field(default=0.0, metadata=_limits(ge=0, lt=1))
    targets: list[str] | None = None  # module names (PEFT target_modules); None: all attention + MLP projections


@dataclass
class TaskSpec:
    """One task of the sequence: its data (None: shipped mini file; a local file; 'hub' or an 'owner/name' id)."""

    name: str
    source: str | None = None
    max_train: int = field(default=64, metadata=POSITIVE)
    max_eval: int = field(default=16, metadata=POSITIVE)
    max_new_tokens: int | None = field(default=None, metadata=POSITIVE)


@dataclass
class TrainingSpec:
    """Options of every stage's `fastsel.train` call (and of the baselines' regularizers)."""

    batch_size: int = field(default=16, metadata=POSITIVE)
    ratio: float = field(default=0.25, metadata=SELECTION)
    lr: float = field(default=2e-4, metadata=_limits(gt=0))
    epochs: int = field(default=1, metadata=POSITIVE)
    max_length: int = field(default=192, metadata=_limits(ge=2))
    loss_band: float | None = field(default=1.0, metadata=SELECTION)
    grad_accum: int = field(default=1, metadata=POSITIVE)
    max_grad_norm: float = field(default=1.0, metadata=_limits(gt=0))
    kl_coef: float = field(default=0.1, metadata=_limits(ge=0))
    ewc_coef: float = field(default=100.0, metadata=_limits(ge=0))
    fisher_rows: int = field(default=32, metadata=POSITIVE)
    olora_coef: float = field(default=0.5, metadata=_limits(ge=0))  # O-LoRA lambda_1 (orthogonality)
    olora_l2: float = field(default=0.0, metadata=_limits(ge=0))  # O-LoRA lambda_2 (L2 of the new LoRA)
    backend: str = field(default="auto", metadata=SELECTION)


@dataclass
class SafetySpec:
    """How safety is measured after every stage: prompts, judge, generation budget, teacher-forced metrics.

    judge: the ASR judge (three_way: refusal / compliance / degenerate, only compliance counts; refusal: the
    phrase judge, anything without a refusal phrase counts; llama_guard: Llama Guard at judge_path). The
    three-way labels are recorded for every judge. teacher_forced: the refusal margin per prompt (no
    generation); kl: KL to the aligned model at the same positions (needs teacher_forced). max_lookalikes:
    benign look-alikes for the over-refusal rate (0: off). margin_every: also measure the mean refusal margin
    every N optimizer steps during training (0: only after each stage).
    """

    judge: str = field(default="three_way", metadata=_limits(choices=JUDGES))
    judge_path: str | None = None
    prompts: str = "probes"  # probes | advbench:PATH | harmbench:PATH | PATH
    max_prompts: int | None = field(default=50, metadata=POSITIVE)
    max_new_tokens: int = field(default=32, metadata=POSITIVE)
    teacher_forced: bool = True
    kl: bool = True
    refusal: str | None = None  # the refusal continuation of the margin (None: teacher_forced.DEFAULT_REFUSAL)
    max_lookalikes: int = field(default=0, metadata=_limits(ge=0))
    margin_every: int = field(default=0, metadata=_limits(ge=0))


@dataclass
class AlignmentSpec:
    """The optional alignment stage (LoRA SFT on refusals + helpful answers, merged) before the sequence."""

    enabled: bool = False
    refusals: str | None = None
    helpful: str | None = None
    max_rows: int = field(default=64, metadata=_limits(ge=2))
    r: int = field(default=16, metadata=POSITIVE)
    lr: float = field(default=5e-4, metadata=_limits(gt=0))
    epochs: int = field(default=2, metadata=POSITIVE)
    batch_size: int = field(default=8, metadata=POSITIVE)
    max_length: int = field(default=192, metadata=_limits(ge=2))


@dataclass
class ReferenceSpec:
    """Reference gradients of the methods gradshield and harmful_similarity, from the shipped safety data
    (`fastsel.experiments.data.anchors`): refusal anchors (GradShield's safety loss; He et al.'s safe anchors)
    and harmful-compliance anchors (He et al.'s harmful anchors), recomputed every `every` optimizer steps."""

    anchors: int = field(default=16, metadata=POSITIVE)  # examples per anchor set
    every: int = field(default=1, metadata=_limits(ge=0))  # 0: once per stage
    max_length: int = field(default=128, metadata=_limits(ge=2))
    refusals: str | None = None  # refusal pairs (Alpaca schema); None: the shipped safety_refusals.jsonl
    compliance: str | None = None  # prompt/response or AdvBench goal/target rows; None: shipped openings
    budget: float = 0.0  # gradshield: kept set's summed first-order safety change <= budget


@dataclass
class EvalSpec:
    """Task evaluation: generation budget and batch size."""

    max_new_tokens: int = field(default=32, metadata=POSITIVE)
    batch_size: int = field(default=8, metadata=POSITIVE)


@dataclass
class ReportSpec:
    """The report's norm audit: which method's runs measure per-example norms, which stage is tabulated."""

    norm_pass_method: str | None = field(default=strategies.DEFAULT, metadata=_limits(choices=METHODS))
    audit_stage: int = field(default=1, metadata=POSITIVE)


@dataclass
class ControlsSpec:
    """The skeptic's controls on the first task (`make experiment-controls`, docs/controls.md).

    matched: build the matched designs from the task's training rows under the starting model (seed 0): the
    high-norm third against the middle third matched on response length and loss (methods matched_high /
    matched_moderate), and the shorter half against the longer half matched on the norm (matched_short /
    matched_long); at most max_pairs pairs, |SMD| < max_smd on the matched covariates. reversion: the per-row dot
    and cosine of the gradient with Gamma = pretrained - aligned weights over the full weights of decoder layers
    `layers` (negative: from the end), TopK-Cosine over the top `topk` coordinates; needs alignment.enabled."""

    matched: bool = False
    max_pairs: int = field(default=24, metadata=_limits(ge=2))
    max_smd: float = field(default=0.1, metadata=_limits(gt=0))
    reversion: bool = False
    layers: list[int] = field(default_factory=lambda: [-1])
    topk: int = field(default=1000, metadata=POSITIVE)


@dataclass
class ContinualConfig:
    """The whole config of `fastsel continual` (see configs/reproduce.yaml)."""

    model: str = EMBEDDED  # smollm2 | tiny-random | a local path | a hub id
    lora: LoraSpec = field(default_factory=LoraSpec)
    tasks: list[TaskSpec] = field(default_factory=lambda: [TaskSpec(name) for name in DEFAULT_TASKS])
    methods: list[str] = field(default_factory=lambda: ["full", "random", "moderate", "high"])
    seeds: list[int] = field(default_factory=lambda: [0], metadata=_limits(ge=0))
    training: TrainingSpec = field(default_factory=TrainingSpec)
    safety: SafetySpec = field(default_factory=SafetySpec)
    alignment: AlignmentSpec = field(default_factory=AlignmentSpec)
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    controls: ControlsSpec = field(default_factory=ControlsSpec)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_json(self) -> dict[str, Any]:
        """A plain dict (what config.json holds)."""
        return dataclasses.asdict(self)


def _check_controls(cfg: ContinualConfig, problems: _Problems) -> None:
    """The control methods need the matched designs (one task); the reversion needs an aligned model."""
    controls = [m for m in cfg.methods if m in CONTROL_METHODS]
    if controls and cfg.controls.matched is not True:
        problems.add("methods", f"{controls} train on the matched sets: set controls.matched: true")
    if (controls or cfg.controls.matched is True) and len(cfg.tasks) != 1:
        problems.add("controls", "the matched designs are built on one task: give exactly one task")
    if cfg.controls.reversion is True and cfg.alignment.enabled is not True:
        problems.add("controls.reversion", "Gamma = pretrained - aligned needs alignment.enabled: true")


# ------------------------------------------------------------------------------------------------ structure

class _Problems(list):
    def add(self, where: str, message: str) -> None:
        self.append(f"{where}: {message}" if where else message)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(value: Any, hint: Any, where: str, problems: _Problems) -> Any:
    """`value` as type `hint` (None, bool, int, float, str, list[...], a dataclass, or a union of those)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where, problems)
        for option in inner:  # first match wins (TaskSpec | str)
            trial = _Problems()
            out = _coerce(value, option, where, trial)
            if not trial:
                return out
        problems.add(where, f"expected {' or '.join(_type_name(o) for o in inner)}, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.add(where, f"expected a list, got {type(value).__name__} {value!r}")
            return []
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where, problems)
    if hint is bool:
        if not isinstance(value, bool):
            problems.add(where, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if not _is_int(value):
            problems.add(where, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                problems.add(where, f"expected a number, got {value!r}")
                return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.add(where, f"expected a finite number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            problems.add(where, f"expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"internal error: unsupported config type {hint!r} at {where}")


def _check_limits(value: Any, limits: Mapping[str, Any], where: str, problems: _Problems) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, bool):
            continue
        if "choices" in limits and v not in limits["choices"]:
            problems.add(where, f"unknown value {v!r} (known: {', '.join(map(str, limits['choices']))})")
        if not isinstance(v, (int, float)):
            continue
        for key, ok, text in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if key in limits and not ok(v, limits[key]):
                problems.add(where, f"must be {text} {limits[key]}, got {v!r}")


def from_mapping(cls: type, raw: Any, where: str = "", problems: _Problems | None = None) -> Any:
    """An instance of dataclass `cls` from a mapping (missing keys: defaults); problems collected, not raised.

    A `TaskSpec` may also be given as its name alone.
    """
    problems = _Problems() if problems is None else problems
    if cls is TaskSpec and isinstance(raw, str):
        raw = {"name": raw}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add(where, f"expected a mapping, got {type(raw).__name__} {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            problems.add(f"{where}.{key}" if where else str(key),
                         f"unknown option (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        path = f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.add(path, "missing required option")
            continue
        value = _coerce(raw[name], hints[name], path, problems)
        _check_limits(value, f.metadata, path, problems)
        values[name] = value
    try:
        return cls(**values)
    except TypeError:  # a missing required field, already reported
        return None


# ------------------------------------------------------------------------------------------------ semantics

# Hub ids are checked at validation: found in the local hub cache, or looked up online within this many seconds
# (never when the hub is offline), so a mistyped relative path fails here, in one line, not at load time.
HUB_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline(repo_type: str) -> bool:
    """HF_HUB_OFFLINE, or the library's own switch (HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE), is set."""
    names = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE" if repo_type == "dataset" else "TRANSFORMERS_OFFLINE"]
    return any(os.environ.get(name, "").strip().upper() in _TRUE for name in names)


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """The repo was downloaded before (huggingface_hub's cache; for datasets also the datasets cache)."""
    from huggingface_hub import constants

    folders = [os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}")]
    if repo_type == "dataset":
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
        folders.append(os.path.join(cache, repo_id.replace("/", "___")))
    return any(os.path.isdir(folder) for folder in folders)


def _hub_lookup(repo_id: str, repo_type: str, timeout: float) -> None:
    """Raise when the hub has no such repo (RepositoryNotFoundError) or cannot be asked (a network error)."""
    from huggingface_hub import HfApi

    api = HfApi()
    (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, timeout=timeout)


def hub_problem(repo_id: str, repo_type: str) -> str | None:
    """None when `repo_id` ('owner/name', a 'dataset' or 'model') can be loaded from the hub, else why not."""
    if _in_hub_cache(repo_id, repo_type):
        return None
    if hub_offline(repo_type):
        return "it is not in the local hub cache and the hub is offline (HF_HUB_OFFLINE)"
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        _hub_lookup(repo_id, repo_type, HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; access is the loader's business (a token)
    except RepositoryNotFoundError:
        return f"the hub has no {repo_type} of that name"
    except Exception as e:  # noqa: BLE001  (no network, a timeout, a proxy error: the load would fail too)
        return (f"the hub could not be asked within {HUB_TIMEOUT_S:.0f} s ({type(e).__name__}: {str(e)[:120]}); "
                "set HF_HUB_OFFLINE=1 to use the local hub cache only")
    return None


def _missing_path(source: str) -> bool:
    return not os.path.exists(os.path.expanduser(source))


def _check_source(label: str, source: str, repo_type: str, problems: _Problems, hub_id: str | None = None) -> None:
    """A local path must exist; a hub id ('owner/name' that is no local path, or 'hub' meaning `hub_id`) must be
    loadable from the hub (cached, or found online)."""
    from fastsel.experiments.data.tasks import is_hub_id

    cwd = os.getcwd()
    if source == "hub" and hub_id is not None:
        problem = hub_problem(hub_id, repo_type)
        if problem:
            problems.add(label, f"'hub' ({hub_id}): {problem}")
    elif is_hub_id(source):
        problem = hub_problem(source, repo_type)
        if problem:
            problems.add(label, f"{source!r} is no local file or folder (relative paths are resolved from {cwd}), "
                                f"so it was taken for a hub id, but {problem}")
    elif _missing_path(source):
        problems.add(label, f"file or folder not found: {source!r} (relative paths are resolved from {cwd}; "
                            f"a hub {repo_type} is written 'owner/name')")


def _check_selection(tr: TrainingSpec, problems: _Problems) -> None:
    """The training section's selection options, checked by the one `SelectionOptions` (same rules and wording
    as `train`, `selective_backward` and the Trainer integration)."""
    from fastsel.training.options import SelectionOptions

    try:
        SelectionOptions(ratio=tr.ratio, loss_band=tr.loss_band, backend=tr.backend)
    except (ValueError, TypeError) as e:
        name = next((n for n in ("loss_band", "ratio", "backend") if n in str(e)), "")
        problems.add(f"training.{name}" if name else "training", str(e))


def validate(cfg: ContinualConfig, problems: _Problems) -> None:
    """Checks across keys and against the machine (files, names); appends to `problems`."""
    from fastsel.experiments.data import TASK_NAMES
    from fastsel.experiments.data.tasks import TASKS

    if isinstance(cfg.model, str) and cfg.model not in (EMBEDDED, TINY):
        _check_source("model", cfg.model, "model", problems)
    if not cfg.tasks:
        problems.add("tasks", "must be a non-empty list")
    names = []
    for i, spec in enumerate(cfg.tasks):
        if spec is None:
            continue
        names.append(spec.name)
        if spec.name not in TASK_NAMES:
            problems.add(f"tasks[{i}]", f"unknown dataset {spec.name!r} (known: {', '.join(TASK_NAMES)})")
        if isinstance(spec.source, str) and (spec.source != "hub" or spec.name in TASKS):
            _check_source(f"tasks[{i}].source", spec.source, "dataset", problems,
                          hub_id=TASKS[spec.name].hub_id if spec.name in TASKS else None)
    if len(set(names)) != len(names):
        problems.add("tasks", f"duplicate task names {names}")
    if not cfg.methods:
        problems.add("methods", "must be a non-empty list")
    for method in cfg.methods:
        if isinstance(method, str) and method not in METHODS:
            problems.add("methods", f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if len(set(map(str, cfg.methods))) != len(cfg.methods):
        problems.add("methods", f"duplicates in {cfg.methods}")
    if not cfg.seeds:
        problems.add("seeds", "must be a non-empty list of integers >= 0")
    _check_controls(cfg, problems)
    tr = cfg.training
    _check_selection(tr, problems)
    uses_ratio = any(m in strategies.STRATEGIES and strategies.strategy(m).uses_ratio for m in cfg.methods)
    if uses_ratio and _numbers(tr.ratio, tr.batch_size) \
            and tr.ratio * tr.batch_size < 1:
        problems.add("training", f"batch_size {tr.batch_size} x ratio {tr.ratio} keeps < 1 example per batch")
    sa = cfg.safety
    if sa.judge == "llama_guard":
        if not sa.judge_path:
            problems.add("safety.judge_path", "the llama_guard judge needs a model path or hub id")
        else:
            _check_source("safety.judge_path", sa.judge_path, "model", problems)
    if sa.kl is True and sa.teacher_forced is False:
        problems.add("safety.kl", "the KL is measured in the teacher-forced pass: needs safety.teacher_forced: true")
    if isinstance(sa.margin_every, int) and sa.margin_every > 0 and sa.teacher_forced is False:
        problems.add("safety.margin_every", "the margin curve needs safety.teacher_forced: true")
    if isinstance(sa.prompts, str) and sa.prompts != "probes":
        kind, _, path = sa.prompts.partition(":")
        if kind not in ("advbench", "harmbench"):
            kind, path = "file", sa.prompts
        if not path:
            problems.add("safety.prompts", f"{kind} needs a path ({kind}:PATH)")
        elif _missing_path(path):
            problems.add("safety.prompts", f"file not found: {path}")
    for section, key in (("alignment", "refusals"), ("alignment", "helpful"), ("reference", "refusals"),
                         ("reference", "compliance")):
        path = getattr(getattr(cfg, section), key)
        if isinstance(path, str) and _missing_path(path):
            problems.add(f"{section}.{key}", f"file not found: {path}")
    if _numbers(cfg.report.audit_stage) and cfg.tasks and cfg.report.audit_stage > len(cfg.tasks):
        problems.add("report.audit_stage", f"{cfg.report.audit_stage} > number of tasks {len(cfg.tasks)}")


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def validate_config(raw: Any) -> ContinualConfig:
    """The config with defaults filled in; every problem found is listed in one ValueError."""
    if isinstance(raw, ContinualConfig):
        raw = raw.to_json()
    problems = _Problems()
    if not isinstance(raw, Mapping):
        raise ValueError(f"the config must be a mapping (YAML dict), got {type(raw).__name__}")
    cfg = from_mapping(ContinualConfig, raw, "", problems)
    validate(cfg, problems)  # also after type problems: one message lists everything
    if problems:
        raise ValueError("invalid continual config:\n  - " + "\n  - ".join(problems))
    return cfg


def load_config(path: str | os.PathLike[str]) -> ContinualConfig:
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
