#!/usr/bin/env bash
# The speed/memory benchmarks on a GPU machine, in under 8 minutes, every step under `timeout`.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default ./gpu-results)
#
# Installs nothing. It expects the venv of `bash scripts/setup.sh` with a CUDA build of torch:
# setup.sh pins torch==2.13.0, which on a plain Linux x86_64 machine is PyPI's CUDA wheel, but a
# pip configured with a local CPU wheel folder (find-links) installs the +cpu build instead. Then
#   .venv/bin/pip install --force-reinstall --no-deps torch==2.13.0 \
#       --index-url https://download.pytorch.org/whl/cu128     # cuXYZ <= nvidia-smi's CUDA Version
# (or set PYTHON to an interpreter that has the project and a CUDA torch).
#
# Steps: nvidia-smi, a torch.cuda check with a matmul on the GPU (exit 3 or 4 with a message
# when either fails: nothing is measured without CUDA), then benchmarks/run_all.py
# --device cuda:
#   small.*       preset small at the scripts' default sizes (CPU-comparable numbers)
#   sedd-small.*  preset sedd-small (d 768, 12 layers, GPT-2 vocabulary), batch 32 x 256
#   serve.*       the Serve load test on $BASE (default runs/base-small2/model) when that folder
#                 exists, small counts; Serve replicas run on CPU whatever the device
# Each run writes OUT_DIR/<name>.md (the table), .json (rows + raw numbers, kept even when a
# run is cut short) and .log (progress); OUT_DIR/summary.md gathers the tables. The whole script
# stops by BUDGET_S (default 450 s) of wall clock: each run gets what is left, up to its cap.
# Exit status: 0 when every run finished cleanly, else the first failing run's status.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-./gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-.venv/bin/python}
BASE=${BASE:-runs/base-small2/model}
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$((SECONDS + BUDGET_S))
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: >"$OUT/gpu_check.log"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log" >&2; }
die() { log "ERROR: $2"; exit "$1"; }

# guard CAP CMD...: CMD under `timeout`, for CAP seconds or what is left of the budget.
guard() {
    local cap=$1 left=$((DEADLINE - SECONDS - 15))
    shift
    ((left < cap)) && cap=$left
    if ((cap < 30)); then
        log "budget spent, not run: $*"
        return 125
    fi
    timeout --kill-after=10 "$cap" "$@"
}

# 1. the interpreter
[ -x "$PY" ] || die 2 "no $PY: run 'bash scripts/setup.sh' first (then a CUDA torch, see the
header of $0), or set PYTHON=/path/to/python"

# 2. the driver
command -v nvidia-smi >/dev/null || die 3 "nvidia-smi not found: no NVIDIA driver here"
timeout 30 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || die 3 "nvidia-smi failed (no usable GPU or
driver): $(tail -n 3 "$OUT/nvidia-smi.txt")"
log "GPU: $(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>/dev/null | head -n 1)"

# 3. torch sees it and can run on it
timeout 120 "$PY" - >"$OUT/torch.json" 2>"$OUT/torch.err" <<'EOF'
import json, sys
import torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    info["gpu"] = torch.cuda.get_device_name(0)
    x = torch.randn(1024, 1024, device="cuda")
    info["matmul_ok"] = bool(torch.isfinite(x @ x).all().item())
print(json.dumps(info))
sys.exit(0 if info.get("matmul_ok") else 1)
EOF
status=$?
if ((status != 0)); then
    info=$(cat "$OUT/torch.json" 2>/dev/null)
    die 4 "torch cannot use CUDA here (${info:-$(tail -n 3 "$OUT/torch.err")}; exit $status).
A torch with torch_cuda null is a CPU build: reinstall a CUDA build into the venv as the
header of $0 says, then rerun. Nothing was measured."
fi
log "torch: $(cat "$OUT/torch.json")"

# 4. the benchmarks
first_fail=0
bench() { # NAME CAP ARGS...: one run_all.py run
    local name=$1 cap=$2
    shift 2
    log "$name: run_all.py $* (cap ${cap} s, $((DEADLINE - SECONDS)) s left)"
    guard "$cap" "$PY" benchmarks/run_all.py --device cuda --output "$OUT/$name.json" "$@" \
        >"$OUT/$name.md" 2>"$OUT/$name.log"
    local rc=$?
    log "$name: exit $rc"
    ((rc != 0 && first_fail == 0)) && first_fail=$rc
    return 0
}

bench small 200 --preset small --skip-serve
bench sedd-small 170 --preset sedd-small --skip-serve --batch-size 32 --seq-len 256 --reps 5
if [ -f "$BASE/config.json" ]; then
    bench serve 150 --only serve --base "$BASE" --serve-requests 400 \
        --serve-ratio-requests 200 --serve-concurrency 32 --serve-max-seconds 15
else
    log "serve: skipped: no base folder $BASE (set BASE=DIR to a pretrained base)"
fi

# 5. one summary
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "GPU: $(head -n 1 "$OUT/torch.json")"
    for name in small sedd-small serve; do
        [ -s "$OUT/$name.md" ] || continue
        echo
        echo "## $name"
        echo
        cat "$OUT/$name.md"
    done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
log "done in $SECONDS s; results in $OUT (exit $first_fail)"
exit "$first_fail"
