"""The continual config: what the README promises is refused at validation, in one message, before anything loads
or trains (backend choices, LoRA dropout range, exponent-form numbers, local paths vs hub ids)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from fastsel.experiments import config as C
from fastsel.experiments.config import load_config, validate_config


def _problems(raw: dict) -> str:
    with pytest.raises(ValueError) as info:
        validate_config({"model": "tiny-random", **raw})
    return str(info.value)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network lookups: HF_HUB_OFFLINE set, an empty hub cache in tmp_path (returned)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return tmp_path


@pytest.mark.parametrize("backend", ["cuda", "Triton", ""])
def test_unknown_backend_is_refused(backend: str) -> None:
    message = _problems({"training": {"backend": backend}})
    assert "training.backend" in message


@pytest.mark.parametrize("dropout", [1.5, 1, -0.1])
def test_lora_dropout_outside_0_1_is_refused(dropout: float) -> None:
    assert "lora.dropout" in _problems({"lora": {"dropout": dropout}})
    assert validate_config({"model": "tiny-random", "lora": {"dropout": 0.5}}).lora.dropout == 0.5


def test_numbers_in_exponent_form_from_yaml(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-3` (no dot) as a string: accepted for float fields, still refused for ints."""
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-random\ntraining: {lr: 1e-3, kl_coef: 2E-1}\nalignment: {lr: 5e-4}\n")
    assert yaml.safe_load(path.read_text())["training"]["lr"] == "1e-3"
    cfg = load_config(path)
    assert (cfg.training.lr, cfg.training.kl_coef, cfg.alignment.lr) == (1e-3, 0.2, 5e-4)
    assert isinstance(cfg.training.lr, float)
    assert "training.batch_size" in _problems({"training": {"batch_size": "1e1"}})
    assert "training.lr" in _problems({"training": {"lr": "1e-3x"}})


def test_missing_relative_path_is_refused_at_once_when_offline(offline: Path, monkeypatch) -> None:
    """`mydata/gsm8k_local` (mydata/ does not exist) looks like a hub id: with the hub offline and nothing cached
    it is an error naming the source, without any network call."""
    monkeypatch.chdir(offline)
    monkeypatch.setattr(C, "_hub_lookup", lambda *a: pytest.fail("no lookup when offline"))
    start = time.monotonic()
    message = _problems({"tasks": [{"name": "gsm8k", "source": "mydata/gsm8k_local"}]})
    assert time.monotonic() - start < 2
    assert "tasks[0].source" in message and "'mydata/gsm8k_local' is no local file or folder" in message
    assert str(offline) in message and "offline" in message
    (offline / "mydata" / "gsm8k_local").mkdir(parents=True)  # the same relative path, existing: a local path
    (offline / "mydata" / "gsm8k_local" / "x.jsonl").write_text("")
    assert validate_config({"model": "tiny-random", "tasks": [{"name": "gsm8k", "source": "mydata/gsm8k_local"}]})
    message = _problems({"tasks": [{"name": "gsm8k", "source": "mydata/other.jsonl"}]})
    assert "file or folder not found: 'mydata/other.jsonl'" in message


def test_cached_hub_ids_validate_offline(offline: Path) -> None:
    (offline / "hub" / "datasets--me--my-gsm8k").mkdir(parents=True)
    (offline / "home" / "datasets" / "openai___gsm8k").mkdir(parents=True)  # the datasets library's own cache
    cfg = validate_config({"model": "tiny-random", "tasks": [{"name": "gsm8k", "source": "me/my-gsm8k"},
                                                             {"name": "dolly", "source": "me/my-gsm8k"}]})
    assert cfg.tasks[0].source == "me/my-gsm8k"
    assert validate_config({"model": "tiny-random", "tasks": [{"name": "gsm8k", "source": "hub"}]})
    message = _problems({"tasks": [{"name": "dolly", "source": "hub"}], "model": "me/no-model"})
    assert "'hub' (databricks/databricks-dolly-15k)" in message and "model: 'me/no-model'" in message


def test_online_lookup_with_a_timeout(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online (HF_HUB_OFFLINE unset) a hub id is looked up, with HUB_TIMEOUT_S: not found and unreachable are both
    one line of the error; a found (or gated) repo passes."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def lookup(answer):
        def fake(repo_id: str, repo_type: str, timeout: float) -> None:
            calls.append((repo_id, repo_type, timeout))
            if answer is not None:
                raise answer
        return fake

    response = type("Response", (), {"headers": {}, "status_code": 404, "request": None})()
    raw = {"tasks": [{"name": "gsm8k", "source": "mydata/gsm8k_local"}]}
    monkeypatch.setattr(C, "_hub_lookup", lookup(RepositoryNotFoundError("404", response=response)))
    assert "the hub has no dataset of that name" in _problems(raw)
    assert calls[-1] == ("mydata/gsm8k_local", "dataset", C.HUB_TIMEOUT_S) and C.HUB_TIMEOUT_S <= 10
    monkeypatch.setattr(C, "_hub_lookup", lookup(ConnectionError("Name or service not known")))
    assert "the hub could not be asked within" in _problems(raw)
    for answer in (None, GatedRepoError("401", response=response)):
        monkeypatch.setattr(C, "_hub_lookup", lookup(answer))
        assert validate_config({"model": "tiny-random", **raw}).tasks[0].source == "mydata/gsm8k_local"


@pytest.mark.parametrize(("key", "value"), [("ratio", 0), ("ratio", 1.5), ("loss_band", -1.0), ("backend", "cuda")])
def test_selection_options_are_checked_by_the_one_selection_options(key: str, value: object) -> None:
    """The training section's ratio, loss_band and backend: SelectionOptions' own rule and words."""
    from fastsel.training.options import SelectionOptions

    with pytest.raises(ValueError) as expected:
        SelectionOptions(**{key: value})
    message = _problems({"training": {key: value}})
    assert f"training.{key}: {expected.value}" in message
