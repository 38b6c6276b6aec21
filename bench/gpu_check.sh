#!/usr/bin/env bash
# The GPU check (issue 18): in at most 8 minutes on one GPU, the tests that need CUDA
# (`pytest -m gpu`, tests/test_gpu.py), a short PPO run and a reward training in bfloat16
# (bench/gpu_check.py), then s/update, s/step and peak GPU memory beside the CPU run's
# figures of the same configuration (bench/gpu_check_cpu.json, docs/benchmarks.md).
#
#   bash bench/gpu_check.sh                    # default models if installed, else the tiny ones
#   GPU_CHECK_TINY=1 bash bench/gpu_check.sh   # the tiny random models only
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Results land in $GPU_CHECK_OUT (default bench/output/gpu_check/): device.json,
# pytest.log, ppo.json, reward.json, summary.txt. Without CUDA it still runs (the tests
# skip, the runs use the CPU) and says so: that checks the script, not a GPU.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-bench/output/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$SECONDS
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rm -f "$OUT"/{device,ppo,reward}.json "$OUT"/summary.txt

say() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
# seconds left of the budget, less what the steps after this one need (at least 30)
left() {
    local s=$((BUDGET - (SECONDS - START) - $1))
    echo $((s < 30 ? 30 : s))
}
failed=()
# step NAME LOG SECONDS COMMAND...: run it under a timeout, its output also into LOG; a
# failure (or a timeout, exit 124) is recorded and the check goes on to the next step.
step() {
    local name=$1 log=$2 seconds=$3 rc
    shift 3
    echo "(timeout ${seconds} s)"
    set +e
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && name="$name: timed out after ${seconds} s" || name="$name: exit $rc"
        failed+=("$name (see $log)")
    fi
}

say "1/5 python and the machine"
if ! [ -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
    echo "no python at $PYTHON: run 'make install' (or set PYTHON=...)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, transformers, trl, accelerate, datasets' 2>/dev/null; then
    echo "$PYTHON lacks torch/transformers/trl/accelerate/datasets: run 'make install'" \
         "(with a CUDA build of torch: TORCH_SPEC / PIP_EXTRA_INDEX_URL, see docs/deployment.md)" >&2
    exit 2
fi
timeout 60 "$PYTHON" bench/gpu_check.py device --json "$OUT/device.json"
CUDA=$("$PYTHON" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["device"] == "cuda"))' "$OUT/device.json")
if [ "$CUDA" != 1 ]; then
    echo "NO CUDA GPU HERE: the gpu tests will skip and the runs below use the CPU;" \
         "these figures check the script, they are not GPU figures."
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true

# the default models where installed (bench/gpu_check.py falls back to the tiny ones,
# saying why); GPU_CHECK_TINY=1: the tiny ones only
TINY=()
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then TINY=(--tiny); fi
echo "models: ${TINY[*]:-default where installed}"

say "2/5 the tests that need CUDA (pytest -m gpu)"
# -p no:cacheprovider: nothing written into the tree; -rs: each skip with its reason
step "gpu tests" "$OUT/pytest.log" "$(left 330)" \
    "$PYTHON" -m pytest tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider

say "3/5 a short PPO run, bf16 (1 warm-up + 3 timed updates)"
step "PPO run" "$OUT/ppo.log" "$(left 170)" \
    "$PYTHON" bench/gpu_check.py ppo ${TINY[@]+"${TINY[@]}"} --json "$OUT/ppo.json"

say "4/5 a reward training, bf16 (20 fine-tuning steps)"
step "reward training" "$OUT/reward.log" "$(left 10)" \
    "$PYTHON" bench/gpu_check.py reward ${TINY[@]+"${TINY[@]}"} --json "$OUT/reward.json"

say "5/5 summary"
"$PYTHON" bench/gpu_check.py summary "$OUT" | tee "$OUT/summary.txt"
echo
echo "total $((SECONDS - START)) s of a ${BUDGET} s budget; results in $OUT/"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu check: all steps passed"
