#!/usr/bin/env bash
# The GPU work of issues 3 and 6, for a session lent the device tool, in stages that each fit one 10-minute call.
#
#   bash benchmarks/gpu_session.sh STAGE      (repo root on the GPU machine; results go to $OUT)
#
# Stages, in order (each reinstalls: every call may land on a fresh machine):
#   tests    the kernel, norm, step and selection tests with the kernels compiled for real (no interpreter),
#            the `gpu`-marked bf16/fp16 tests included                        -> $OUT/tests.xml, $OUT/tests.log
#   kernels  per-layer kernel time vs the torch backend, SmolLM2 and 7B shapes, B=32 T=512 -> $OUT/kernels/*.json
#   headline norm pass vs a plain forward+backward at B=32 T=512: SmolLM2-135M (its architecture, random
#            weights: the 94 MB GGUF cannot travel) and 2 layers of a 7B Llama; training overhead
#                                                                              -> $OUT/headline/*.json
#   grid     the rest of the GPU grid for the synthetic LoRA layer             -> $OUT/grid/*.json
#
# The GPU image has torch, triton, transformers, peft, accelerate, pytest and hypothesis but no network: fastsel is
# installed without dependencies; tests needing trl, datasets or the embedded model are not collected here.
set -euo pipefail
stage=${1:?usage: gpu_session.sh tests|kernels|headline|grid}
OUT=${OUT:-benchmarks/results/gpu-session}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# Editable install against the image's torch (no index, no deps), which also builds the C++ extension fastsel._C.
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import fastsel, torch, triton; print('backends', fastsel.backends(), 'torch', torch.__version__,
'triton', triton.__version__)" | tee -a "$OUT/device.txt"

case "$stage" in
tests)
    $PY -m pytest -q -p no:cacheprovider -m "gpu or not gpu" --junitxml "$OUT/tests.xml" \
        tests/test_kernels.py tests/test_kernels_aot.py tests/test_norms.py tests/test_step.py \
        tests/test_select_ops.py tests/test_selection.py tests/test_model_untouched.py 2>&1 | tee "$OUT/tests.log"
    ;;
kernels)
    $PY -m fastsel bench-kernels --device cuda --batch 32 --seq 512 --out "$OUT/kernels"
    ;;
headline)
    $PY -m fastsel bench --device cuda --model smollm2 --random-weights --batch 32 --seq 512 --repeats 5 \
        --out "$OUT/headline"
    $PY -m fastsel bench --device cuda --model 7b-layers --batch 32 --seq 512 --repeats 5 --no-training \
        --out "$OUT/headline/7b"
    ;;
grid)
    $PY -m fastsel bench --device cuda --model synthetic --repeats 5 --no-training --out "$OUT/grid"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
