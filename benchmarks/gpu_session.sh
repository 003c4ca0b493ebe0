#!/usr/bin/env bash
# fastsel's GPU work in ONE command that ends within 8 minutes on an H100/H200, for a session lent a GPU machine
# (15 minutes of machine time in all, its start included; at most 10 minutes for one command):
#
#   OUT=/path/to/results bash benchmarks/gpu_session.sh            # the GPU run, repo root on the GPU machine
#   OUT=/tmp/dry bash benchmarks/gpu_session.sh --dry-run          # the same steps on the CPU, tiny shapes (CI)
#
# Steps, in priority order, each under its own `timeout` (SIGINT first: pytest still writes its junit xml; KILL
# 15 s later), each writing to $OUT as soon as it ends, so a slow step costs only its own budget. Budgets (s):
#
#   step            budget  what                                                                writes
#   setup             50    pip install (no index, no deps; builds fastsel._C; the carried .whl/  setup.log, device.txt
#                           wheels), GPU and versions
#   selftest          30    the kernels' first-use self-test, every family, fp32/bf16/fp16       selftest.json
#   tests             60    the GPU test subset, kernels compiled for real: tests/kernels (the    tests-*.xml, tests.log
#                           `gpu`-marked bf16/fp16 ones included; norm and dot kernels), triton
#                           end-to-end == naive (padded, packed, dots), the no-host-sync test,
#                           self-test, selective_backward; 3 pytest at once
#   headline-fp32    100    SmolLM2's architecture (random weights) B=32 T=512 fp32: plain,      headline-fp32/*.json
#                           fastsel torch, fastsel triton, naive (all 32 rows); Moderate-G vs
#                           full epoch (2 steps), single vs two pass: the JSON's `ratios` object
#   headline-bf16     60    the same in bf16, without the training epochs                        headline-bf16/*.json
#   7b-layers         35    2 layers of a 7B-shaped Llama, B=32 T=512 bf16 (naive on 2 rows)     7b-layers/*.json
#   packed            95    SmolLM2 fp32, the shipped instruction examples at natural lengths    packed/*.json
#                           (T <= 512, byte tokens): padded vs packed plain step, fastsel's
#                           default, norm pass (torch, triton, padded, packed), Moderate-G step
#                           (naive: in the headline; here on 2 rows); the JSON's packed ratios. Needs `datasets`, absent from the
#                           image: carry .whl/ (benchmarks/gpu_wheels.sh fills it) in `carry`
#   kernels           30    per-layer kernel time vs torch, SmolLM2 and 7B LoRA sites, B=32       kernels/*.json
#                           T=512, fp32 and bf16, whole-model grouped launch over 4 layers
#                   ----
#                    460    + 15 s of grace at most (SIGINT ignored): <= 8 min. A global deadline (TOTAL_S,
#                           default 460) also caps every step by the time left: the run never exceeds it.
#   Budgets as measured on the first H200 session (2026-12-04, benchmarks/results/gpu-20261204/): the step's
#   seconds there plus ~20%; headline-fp32 at 5 repeats and 4 training steps did not fit 75 s (62 s at 3 and 2);
#   packed with naive timed (10 s a call) did not finish in 100 s, so it checks naive on 2 rows only.
#
# $OUT/steps.tsv gets one line per step as it ends: name, exit code (124: timed out, "skipped": no time left),
# seconds, budget. The exit code of the script is 0 when every step passed.
#
# Adding a step (dots pass, ...): one block below, in its priority place:
#   step NAME BUDGET_S command args...        (then take the seconds from another step's budget, and add a line
#                                              to the table above and to benchmarks/README.md)
# with --dry-run arguments beside the real ones (`dry && args=(...) || args=(...)`), so CI runs it too.
#
# The GPU image has torch, triton, transformers, peft, accelerate, pytest and hypothesis, no network, and no
# datasets, trl or gguf: fastsel is installed with --no-index --no-deps; tests needing those are not collected.
# --dry-run: CPU, TRITON_INTERPRET=1, tiny shapes, every step but the install (CI's venv has fastsel), ~30 s on a
# quiet 2-core CPU; budgets x BUDGET_SCALE (default 5 there).
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
[[ $# -gt DRY ]] && { echo "usage: gpu_session.sh [--dry-run]" >&2; exit 2; }
dry() { (( DRY == 1 )); }

OUT=${OUT:-benchmarks/results/gpu-session}
PY=${PYTHON:-python3}
# --dry-run keeps the steps but not the GPU's timings: its budgets are BUDGET_SCALE (default 5) times the real ones,
# so a busy CI CPU cannot stop a tiny step that the budgets were never meant for.
SCALE=${BUDGET_SCALE:-$( ((DRY == 1)) && echo 5 || echo 1 )}
TOTAL_S=${TOTAL_S:-$(( 460 * SCALE ))}
MIN_STEP_S=5
# wheels carried in .whl/ (packages the GPU image lacks) go to SITE in the setup step, visible to every step
SITE=${SITE:-/tmp/fastsel-site}
[[ -d .whl ]] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PY OUT DRY SITE
mkdir -p "$OUT"
: >"$OUT/steps.tsv"
DEADLINE=$(( $(date +%s) + TOTAL_S ))
FAILED=0
if dry; then
    export TRITON_INTERPRET=1 FASTSEL_KERNEL_SELFTEST=always CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu
else
    DEVICE=cuda
fi

# step NAME BUDGET_S COMMAND [ARGS...]: run COMMAND (a program or a function of this script) under its own timeout,
# capped by the time left; stdout+stderr to $OUT/NAME.log; one line to $OUT/steps.tsv.
step() {
    local name=$1 budget=$(( $2 * SCALE )) rc=0 start=$SECONDS left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    (( budget > left )) && budget=$left
    if (( budget < MIN_STEP_S )); then
        printf '%s\tskipped\t0\t%s\n' "$name" "$budget" | tee -a "$OUT/steps.tsv"
        FAILED=1
        return 0
    fi
    echo "== $name (budget ${budget} s)"
    if declare -F "$1" >/dev/null; then  # a function: run it in a child bash so that `timeout` can stop it
        STEP_BUDGET=$budget timeout -s INT -k 15 "$budget" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" \
            >"$OUT/$name.log" 2>&1 || rc=$?
    else
        STEP_BUDGET=$budget timeout -s INT -k 15 "$budget" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    fi
    (( rc != 0 )) && { FAILED=1; tail -5 "$OUT/$name.log"; }
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(( SECONDS - start )) "$budget" | tee -a "$OUT/steps.tsv"
}

setup() {
    if (( DRY == 1 )); then
        echo "dry run: no install (the running environment's fastsel is used)"
    else
        $PY -m pip install --no-index --no-deps --no-build-isolation -e . || exit 1
        if [[ -d .whl ]]; then
            $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl || exit 1
        fi
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    fi
    $PY -c "import fastsel, torch, triton; print('fastsel', fastsel.__file__, 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
}

selftest() {
    $PY - <<'EOF'
import json, os, torch
import fastsel
from fastsel.engine import kernel_selftest

if torch.cuda.is_available():
    report = fastsel.backends(run_selftest=True)
else:  # --dry-run: the interpreter kernels, fp32 only (the interpreter has no bf16 arithmetic)
    kernel_selftest.run_all(torch.device("cpu"), (torch.float32,))
    report = fastsel.backends()
print(json.dumps(report, indent=2))
with open(os.path.join(os.environ["OUT"], "selftest.json"), "w") as f:
    json.dump(report, f, indent=2)
raise SystemExit(1 if kernel_selftest.failed() else 0)
EOF
}

# tests GROUP=FILES...: one pytest per group at once (Triton compiles on several cores), each stopped with SIGINT
# 10 s before the step's budget so that it still writes its junit xml.
tests() {
    local pids=() rc=0 group inner=$(( STEP_BUDGET > 20 ? STEP_BUDGET - 10 : STEP_BUDGET * 3 / 4 ))
    (( inner < 1 )) && inner=1
    for group in "$@"; do
        local name=${group%%=*} files=${group#*=}
        # shellcheck disable=SC2086
        timeout -s INT -k 5 "$inner" $PY -m pytest -q -p no:cacheprovider \
            --junitxml "$OUT/tests-$name.xml" $files >"$OUT/tests-$name.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    tail -n 3 "$OUT"/tests-*.log
    exit $rc
}

# ---------------------------------------------------------------------------------------------- the steps
step setup 50 setup
[[ $(tail -1 "$OUT/steps.tsv" | cut -f2) == 0 ]] || { echo "setup failed: see $OUT/setup.log"; exit 1; }

step selftest 30 selftest

if dry; then
    groups=("selftest=tests/engine/test_kernel_selftest.py -k every_family_passes"
            "kernels=tests/kernels/test_kernels.py -k outer")
else
    groups=("kernels=tests/kernels/test_kernels.py tests/kernels/test_dot_kernels.py"
            "engine=tests/engine/test_norms.py tests/engine/test_kernel_selftest.py tests/engine/test_model_untouched.py tests/engine/test_batch.py tests/engine/test_packed.py tests/engine/test_dots.py"
            "training=tests/training/test_selective.py tests/selection/test_ops.py tests/selection/test_rules.py")
fi
step tests 60 tests "${groups[@]}"

if dry; then shape=(--tiny --suite gpu --device cpu --repeats 1 --warmup 0)
else shape=(--suite gpu --device cuda --random-weights --batch 32 --seq 512 --repeats 3 --warmup 1); fi
step headline-fp32 100 $PY -m fastsel bench "${shape[@]}" --model smollm2 --dtype float32 --no-checkpointing \
    --data random --methods plain fastsel_torch fastsel_triton naive --training-steps "$(dry && echo 1 || echo 2)" \
    --out "$OUT/headline-fp32"

step headline-bf16 60 $PY -m fastsel bench "${shape[@]}" --model smollm2 --dtype bfloat16 --no-checkpointing \
    --data random --methods plain fastsel_torch fastsel_triton naive --no-training --out "$OUT/headline-bf16"

step 7b-layers 35 $PY -m fastsel bench "${shape[@]}" --model 7b-layers --no-training \
    --methods plain fastsel_torch fastsel_triton naive --out "$OUT/7b-layers"

step packed 95 $PY -m fastsel bench "${shape[@]}" --model smollm2 --dtype float32 --no-checkpointing \
    --data instruct --methods plain plain_packed fastsel_default fastsel_torch fastsel_torch_packed \
    fastsel_triton_packed moderate_step \
    --no-training --out "$OUT/packed"

if dry; then args=(--tiny --device cpu --models smollm2 --dtypes float32 --layers 1)
else args=(--device cuda --batch 32 --seq 512 --layers 4 --repeats 5 --inner 10); fi
step kernels 30 $PY -m fastsel bench-kernels "${args[@]}" --out "$OUT/kernels"

echo "== done in $SECONDS s (budget $TOTAL_S s); steps:"
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
exit $FAILED
