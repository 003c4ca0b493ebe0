"""Smoke tests of `fastsel bench`: tiny random models through the real code path, the JSON schema, and a
deliberate disagreement between methods failing the run."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from fastsel.bench import suite as bench
from fastsel.cli import main


def _quiet(_: str) -> None:
    pass


@pytest.mark.auto_layout  # the bench measures the CPU default
def test_tiny_quick_suite_schema_and_markdown(tmp_path) -> None:
    plan = bench.build_plan("quick", "cpu", tiny=True, repeats=1, warmup=0)
    report = bench.run_plan(plan, log=_quiet)
    path = bench.write_report(report, tmp_path)
    assert path.name == f"{report['device']}-{report['date'].replace('-', '')}.json"
    data = json.loads(path.read_text())
    for key in ("device", "device_name", "versions", "cases", "training", "ratios", "timing", "targets"):
        assert key in data
    assert {"torch", "triton", "transformers"} <= set(data["versions"])
    heads = data["ratios"]["headlines"]
    assert [h["batch"] for h in heads] == [4, 6]  # every headline size gets its ratios
    for head in heads:
        for key in bench.CASE_RATIOS:
            assert key in head
            if head[key] is None:
                assert head[f"{key}_reason"], key
        assert head["default_layout"] == "packed"  # on a CPU, padded batches run packed by default
    assert heads[0]["norm_pass_over_plain"] > 0
    assert heads[0]["opacus_over_fastsel"] is None or data["versions"]["opacus"]
    case = data["cases"][0]
    assert set(case["methods"]) == set(bench.METHODS)
    assert case["methods"]["fastsel_triton"] is None and case["skipped"]["fastsel_triton"] == bench.NO_TRITON_CPU
    for name, entry in case["methods"].items():
        if entry is not None:
            assert entry["median_s"] > 0 and entry["q1_s"] <= entry["median_s"] <= entry["q3_s"], name
            if name in bench.NORM_METHODS:
                assert entry["max_rel_diff_vs_others"] <= case["tolerance"]
    # the synthetic model takes no position_ids: no packed methods; the headline (instruct data) runs both layouts
    assert case["methods"]["plain_packed"] is None and case["skipped"]["plain_packed"] == bench.NO_PACKING
    head = next(c for c in data["cases"] if c["headline"])
    assert head["data"] == "instruct" and head["packed_shape"] == [1, sum(head["lengths"])]
    assert len(set(head["lengths"])) > 1  # natural, uneven lengths
    for name in ("plain", "plain_packed", "fastsel_default", "moderate_step", "fastsel_torch", "fastsel_torch_packed",
                 "naive"):
        assert head["methods"][name] is not None, name
    assert head["methods"]["fastsel_default"]["max_rel_diff_vs_others"] <= head["tolerance"]
    for key in ("default_over_naive", "default_over_padded_pass", "packed_norm_pass_over_plain_packed",
                "moderate_step_over_plain", "plain_packed_over_plain"):
        assert heads[0][key] > 0, key
    assert data["training"]["packed"] is True
    table = bench.markdown_table(path)
    assert "norm_pass_over_plain" in table and "| case |" in table and case["label"] in table
    assert "default_over_naive" in table and "fastsel packed" in table and heads[1]["label"] in table


def test_disagreement_fails_naming_the_method(monkeypatch) -> None:
    honest = bench.METHOD_FNS["vmap"]

    def off_by_a_bit(batch: Mapping[str, Tensor], model: nn.Module) -> Tensor:
        out = honest(batch, model).clone()
        out[1] *= 1.001
        return out

    monkeypatch.setitem(bench.METHOD_FNS, "vmap", off_by_a_bit)
    plan = bench.build_plan("quick", "cpu", models=("synthetic",), tiny=True, repeats=1, warmup=0)
    with pytest.raises(bench.BenchMismatch, match="method 'vmap' disagrees"):
        bench.run_plan(plan, log=_quiet)


def test_cli_exit_code_on_disagreement(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(bench.METHOD_FNS, "naive", lambda batch, model: torch.ones(batch["input_ids"].shape[0]))
    code = main(["bench", "--quick", "--tiny", "--model", "synthetic", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path)])
    assert code == 1
    assert "method 'naive' disagrees" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_check_agreement_partial_reference() -> None:
    norms = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1.0, 2.0, 3.0]), "ref": torch.tensor([2.0])}
    rows = {"a": [0, 1, 2], "b": [0, 1, 2], "ref": [1]}
    assert max(bench.check_agreement(norms, rows, 1e-4).values()) == 0.0
    norms["ref"] = torch.tensor([2.1])
    with pytest.raises(bench.BenchMismatch, match="method 'ref'"):
        bench.check_agreement(norms, rows, 1e-4)


def test_gpu_suite_structure_runs_tiny_on_cpu() -> None:
    """The GPU suite's extra paths (bf16, gradient checkpointing, 7B-shaped layers, partial naive) on tiny CPU
    shapes, so `fastsel bench --device cuda` is not dead code here."""
    plan = bench.build_plan("gpu", "cpu", models=("smollm2", "7b-layers"), tiny=True, repeats=1, warmup=0)
    plan.training = None
    report = bench.run_plan(plan, log=_quiet)
    labels = [c["label"] for c in report["cases"]]
    assert any("+ckpt" in x for x in labels) and any("bfloat16" in x for x in labels)
    assert any(x.startswith("7b-layers") for x in labels)
    ckpt = next(c for c in report["cases"] if c["gradient_checkpointing"])
    assert ckpt["methods"]["fastsel_torch"] is not None
    assert any(c["reference"] == "naive_first_rows" for c in report["cases"])
    assert report["ratios"]["training"]["moderate_epoch_over_full_epoch"] is None
    assert report["ratios"]["training"]["moderate_epoch_over_full_epoch_reason"]


def test_slug() -> None:
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"
    assert bench.slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core"


def test_readme_tables_match_the_committed_json() -> None:
    """The README and benchmarks/README.md show exactly what the renderers make of the committed JSON."""
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for readme in (root / "README.md", root / "benchmarks" / "README.md"):
        text = readme.read_text()
        blocks = re.findall(r"<!-- generated by fastsel\.bench\.(suite|trainer_step|score_bench)\.(\w+)\((.+?)\); do not "
                            r"edit by hand -->\n(.*?)<!-- end generated -->", text, flags=re.S)
        assert blocks, f"{readme} has no generated benchmark table"
        for module, renderer, json_path, body in blocks:
            assert (root / json_path).exists(), json_path
            render = getattr(importlib.import_module(f"fastsel.bench.{module}"), renderer)
            assert body.strip() == render(root / json_path).strip(), f"{readme}: stale {renderer} table"


def test_random_weights_smollm2_never_reads_the_embedded_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """--random-weights: SmolLM2's architecture, seeded random weights, and the GGUF loader is never called."""
    import fastsel.integrations.models

    def refuse(*args, **kwargs):
        raise AssertionError("load_model must not run with random_weights")

    monkeypatch.setattr(fastsel.integrations.models, "load_model", refuse)
    cache = bench.ModelCache("cpu", tiny=False, seed=0, random_weights=True)
    base = cache._base("smollm2", "float32")
    assert (base.config.hidden_size, base.config.num_hidden_layers, base.config.vocab_size) == (576, 30, 49152)
    again = bench.ModelCache("cpu", tiny=False, seed=0, random_weights=True)._base("smollm2", "float32")
    assert torch.equal(base.model.embed_tokens.weight, again.model.embed_tokens.weight)  # seeded


def test_plan_filters_by_batch_and_length() -> None:
    """--batch/--seq keep one device call's share of the GPU grid, every model and dtype of those shapes."""
    full = bench.build_plan("gpu", "cuda")
    plan = bench.build_plan("gpu", "cuda", batches=(32,), seqs=(512,))
    assert plan.cases and all((c.batch, c.seq) == (32, 512) for c in plan.cases)
    assert plan.cases == [c for c in full.cases if (c.batch, c.seq) == (32, 512)]
    assert {c.model for c in plan.cases} == {"synthetic", "smollm2", "7b-layers"}
    assert any(c.headline for c in plan.cases) and any(c.gradient_checkpointing for c in plan.cases)


def test_plan_filters_by_dtype_checkpointing_data_and_methods() -> None:
    """The GPU session's headline: SmolLM2 B=32 T=512 random tokens in one dtype, no checkpointing, four methods;
    its packed step: the instruct case with packed methods (plain_packed then runs as their floor)."""
    plan = bench.build_plan("gpu", "cuda", models=("smollm2",), batches=(32,), seqs=(512,), dtypes=("bfloat16",),
                            checkpointing=False, methods=("naive", "fastsel_triton"), data=("random",))
    assert [c.label for c in plan.cases] == ["smollm2 B=32 T=512 r=16 bfloat16"]
    assert plan.training is None  # the training case is fp32
    assert plan.methods == ("plain", "fastsel_triton", "naive")  # in METHODS order
    packed = bench.build_plan("gpu", "cuda", models=("smollm2",), batches=(32,), seqs=(512,), dtypes=("float32",),
                              checkpointing=False, methods=("fastsel_triton", "fastsel_triton_packed"),
                              data=("instruct",))
    assert [c.label for c in packed.cases] == ["smollm2 instruct B=32 T<=512 r=16 float32"]
    assert packed.methods == ("plain", "plain_packed", "fastsel_triton", "fastsel_triton_packed")
    fp32 = bench.build_plan("gpu", "cuda", models=("smollm2",), batches=(32,), seqs=(512,), dtypes=("float32",))
    assert {c.dtype for c in fp32.cases} == {"float32"} and any(c.gradient_checkpointing for c in fp32.cases)
    assert {c.data for c in fp32.cases} == {"random", "instruct"}
    assert fp32.training is not None and fp32.methods == bench.METHODS
    with pytest.raises(ValueError, match="unknown method"):
        bench.build_plan("gpu", "cuda", methods=("fastest",))


def test_unselected_methods_are_null_with_the_reason(tmp_path) -> None:
    code = main(["bench", "--quick", "--tiny", "--model", "synthetic", "--repeats", "1", "--warmup", "0",
                 "--methods", "naive", "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    case = report["cases"][0]
    assert case["methods"]["plain"] and case["methods"]["naive"] and case["methods"]["fastsel_torch"] is None
    assert case["skipped"]["fastsel_torch"] == "not selected (--methods)"
    assert main(["bench", "--quick", "--tiny", "--training-steps", "0", "--out", str(tmp_path)]) == 2


def test_target_verdicts() -> None:
    """met / missed, and a target meant for long sequences is not judged on a run that has none."""
    assert bench._target_cells("k", 1.02, {"op": "<=", "value": 1.05}, 178) == ("<= 1.05", "met")
    assert bench._target_cells("k", 1.2, {"op": ">=", "value": 1.4}, 178) == (">= 1.4", "missed")
    tgt, verdict = bench._target_cells("k", 1.2, {"op": ">=", "value": 1.4, "min_seq": 256}, 178)
    assert tgt == ">= 1.4 at T >= 256" and verdict == "not applicable (longest example: 178 tokens)"
    assert bench._target_cells("k", 1.5, {"op": ">=", "value": 1.4, "min_seq": 256}, 300)[1] == "met"
    assert bench._target_cells("k", None, None, None) == ("", "")
    per_batch = {"op": "<=", "value": {"8": 1.0, "32": 0.95}}  # as read back from the JSON
    assert bench._target_cells("k", 0.97, per_batch, 300, 8) == ("<= 1", "met")
    assert bench._target_cells("k", 0.97, per_batch, 300, 32) == ("<= 0.95", "missed")
    assert bench._target_cells("k", 2.0, {"op": ">=", "value": 1.4, "batch": 8}, 300, 32)[1] == \
        "not applicable (B = 32)"
