#!/usr/bin/env bash
# Fill .whl/ with the wheels of what gpu_session.sh needs and the GPU image lacks (datasets, for the packed step's
# instruction data), at the versions of this machine's environment; the device tool's `carry` takes `.whl`.
# Run here, in the repo root, before the GPU call: bash benchmarks/gpu_wheels.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
pins=$($PY - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("datasets", "dill", "multiprocess")))
PY
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
