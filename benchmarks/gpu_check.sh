#!/usr/bin/env bash
# The GPU check on a bare GPU machine: its system python3 (3.12, a CUDA torch, transformers,
# peft, ...) plus the wheels it lacks, carried in .whl/; no Ray, no MLflow, no network.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-results)
#
# Before, on a machine with pip and the shared data: `bash benchmarks/gpu_carry.sh` fills .whl/
# (datasets, dill, multiprocess, fsspec) and .gpu/ (the small-h200 base, sst2, two corpus
# shards); both are git-ignored and travel with `carry: [".whl", ".gpu"]` (docs/GPU.md).
# Steps (benchmarks/gpu_check.py, in about 6 minutes on an H200; each guarded and recorded):
# nvidia-smi, torch smoke on the GPU, benchmarks/step_cost.py at small and sedd-small, a short
# pretrain, a short fine-tune of every method. OUT_DIR gets gpu_check.json, summary.md,
# step_cost.json, nvidia-smi.txt and gpu_check.log (5 files: the device tool brings back 8).
# The whole run stops by BUDGET_S (default 470 s). Exit: 0 when every step ran, 2 without the
# wheels installed, 3 without a GPU driver, else the driver's status (124: out of time).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-./gpu-results}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
LOG="$OUT_DIR/gpu_check.log"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
: >"$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || { log "ERROR: installing .whl/ failed"; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "installed $(ls .whl | tr '\n' ' ')into $SITE"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

if ! timeout 30 nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1; then
    log "ERROR: nvidia-smi failed or is missing: no NVIDIA driver here ($(tail -n 2 "$OUT_DIR/nvidia-smi.txt"))"
    exit 3
fi
log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"

timeout --kill-after=10 "$BUDGET_S" "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" \
    --base "${BASE:-.gpu/base}" --data-dir "${DATA_DIR:-.gpu/data}" --device cuda \
    --budget-s $((BUDGET_S - 30)) 2>>"$LOG"
status=$?
[ -f "$OUT_DIR/summary.md" ] && cat "$OUT_DIR/summary.md"
log "done in $SECONDS s (exit $status); results in $OUT_DIR"
exit "$status"
