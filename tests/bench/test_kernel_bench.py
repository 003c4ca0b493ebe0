"""Smoke tests of `fastsel bench-kernels`: the --tiny path through the real code (kernels on the CPU interpreter
without CUDA), the JSON schema, a wrong kernel result failing the run, and the null triton column without the
interpreter."""

from __future__ import annotations

import json

import pytest
import torch
from needs import need_kernels

from fastsel import kernels
from fastsel.bench import kernel_bench as BK
from fastsel.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def needs_kernels() -> None:
    need_kernels()


def _quiet(_: str) -> None:
    pass


def _tiny_plan(**kw) -> BK.KernelPlan:
    kw = {"models": ("smollm2",), "dtypes": ("float32", "bfloat16"), "layers": 1, "repeats": 1, "warmup": 0,
          **kw}
    return BK.build_plan(DEVICE, tiny=True, **kw)


def test_distinct_sites_of_the_real_shapes() -> None:
    sites = {(s.factor, s.m, s.n): s.projections for s in BK.distinct_sites(BK.MODELS["smollm2"], 16)}
    assert sites == {("A", 16, 576): ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
                     ("A", 16, 1536): ("down_proj",), ("B", 576, 16): ("q_proj", "o_proj", "down_proj"),
                     ("B", 192, 16): ("k_proj", "v_proj"), ("B", 1536, 16): ("gate_proj", "up_proj")}
    assert {(s.factor, s.m, s.n) for s in BK.distinct_sites(BK.MODELS["7b"], 16)} == {
        ("A", 16, 4096), ("A", 16, 11008), ("B", 4096, 16), ("B", 11008, 16)}
    plan = BK.build_plan("cpu")
    assert (plan.batch, plan.seq, plan.rank, plan.layers) == (32, 512, 16, {"smollm2": 30, "7b": 2})
    lengths = BK.make_lengths(32, 512, 0)
    assert lengths[0] == 512 and bool((lengths >= 128).all() and (lengths <= 512).all())


@pytest.mark.usefixtures("needs_kernels")
def test_tiny_run_schema_and_markdown(tmp_path) -> None:
    report = BK.run_plan(_tiny_plan(), log=_quiet)
    path = BK.write_report(report, tmp_path)
    assert path.name == f"kernels-{report['device']}-{report['date'].replace('-', '')}.json"
    data = json.loads(path.read_text())
    for key in ("device", "device_name", "versions", "config", "sites", "grouped", "interpreted", "tolerance"):
        assert key in data
    assert data["interpreted"] == (DEVICE == "cpu") and (data["interpreted_note"] is not None) == data["interpreted"]
    assert data["config"]["layers"] == {"smollm2": 1} and len(data["config"]["lengths"]) == 2
    expected = {(s.label, dt) for s in BK.distinct_sites(BK.TINY_MODELS["smollm2"], 4)
                for dt in ("float32", "bfloat16")}
    assert {(s["site"], s["dtype"]) for s in data["sites"]} == expected
    for site in data["sites"]:
        assert set(site["methods"]) == set(BK.SITE_METHODS) and not site["skipped"]
        for name, entry in site["methods"].items():
            assert entry["q1_s"] <= entry["median_s"] <= entry["q3_s"], name
            assert entry["rel_err"] <= BK.TOLERANCE[site["dtype"]], name
        assert site["ratio_torch_over_triton"] > 0 and site["method"]["triton"] == site["method"]["torch"]
    assert [(g["model"], g["dtype"], g["sites"]) for g in data["grouped"]] == [
        ("smollm2", "float32", 14), ("smollm2", "bfloat16", 14)]
    for grouped in data["grouped"]:
        assert set(grouped["methods"]) == set(BK.GROUPED_METHODS)
        assert all(e["rel_err"] <= grouped["tolerance"] for e in grouped["methods"].values())
        assert sum(g["count"] for g in grouped["groups"]) == 14
    table = BK.markdown_table(path)
    assert "| model | site |" in table and "Whole model" in table and data["sites"][0]["site"] in table


@pytest.mark.usefixtures("needs_kernels")
def test_wrong_kernel_result_fails_the_run_naming_the_site(monkeypatch, tmp_path, capsys) -> None:
    honest = kernels.linear_sq_norms

    def off_by_one_percent(*args, **kwargs):
        norms, grads = honest(*args, **kwargs)
        return norms * 1.01, grads

    monkeypatch.setattr(kernels, "linear_sq_norms", off_by_one_percent)
    code = main(["bench-kernels", "--tiny", "--device", DEVICE, "--models", "smollm2", "--dtypes", "float32",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "site smollm2 lora_A d_in=32 (q,k,v,o,gate,up) float32: method 'triton' disagrees" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("needs_kernels")
def test_wrong_grouped_result_names_the_site(monkeypatch) -> None:
    honest = kernels.grouped_linear_sq_norms

    def one_site_off(xs, deltas, **kwargs):
        out = honest(xs, deltas, **kwargs).clone()
        out[3, 1] *= 1.001  # layers.0.k_proj.lora_B, example 1
        return out

    monkeypatch.setattr(kernels, "grouped_linear_sq_norms", one_site_off)
    plan = _tiny_plan(dtypes=("float32",))
    lengths = BK.make_lengths(plan.batch, plan.seq, plan.seed)
    with pytest.raises(BK.KernelMismatch, match=r"method 'triton_grouped' disagrees.*site layers\.0\.k_proj\."
                                                r"lora_B example 1"):
        BK.run_grouped(plan.shapes["smollm2"], "float32", plan, lengths, None)


def test_cpu_without_interpreter_reports_triton_null(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["bench-kernels", "--tiny", "--device", "cpu", "--models", "7b", "--dtypes", "float32",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    reason = data["triton"]["reason"]
    assert not data["triton"]["available"] and not data["interpreted"] and reason
    for site in data["sites"]:
        assert site["methods"]["torch"]["median_s"] > 0
        assert site["methods"]["triton"] is None and site["methods"]["triton_no_range"] is None
        assert site["skipped"] == {"triton": reason, "triton_no_range": reason}
        assert site["ratio_torch_over_triton"] is None and site["method"]["triton"] is None
    (grouped,) = data["grouped"]
    assert grouped["methods"]["torch_loop"]["rel_err"] == 0.0 and grouped["methods"]["triton_grouped"] is None
    assert reason in BK.markdown_table(path)


def test_bad_options_exit_2(capsys) -> None:
    assert main(["bench-kernels", "--tiny", "--device", "cpu", "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err
