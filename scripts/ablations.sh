#!/usr/bin/env bash
# The paper's Tables 10 (rank schedules) and 11 (modules per phase k) as Ray Tune sweeps on the
# small base and SST-2; the tables land in runs/sweep-<space>/table.md (see docs/ABLATIONS.md).
#   bash scripts/ablations.sh [BASE_DIR]      (default runs/base-small2/model; ~100 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
BASE=${1:-runs/base-small2/model}
for space in table10_ranks table11_k; do
  start=$(date +%s)
  python jobs/sweep.py --space "tune_spaces/$space.yaml" --task sst2 --base "$BASE" \
    --output-dir "runs/sweep-$space" --max-steps 400 --eval-limit 300 --eval-every 100 \
    --scheduler none --experiment ablations
  echo "$space: $(( $(date +%s) - start )) s"
done
