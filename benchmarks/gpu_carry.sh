#!/usr/bin/env bash
# What the GPU check carries to a bare GPU machine, made here (needs pip's network access and
# the shared data): .whl/ with the wheels its python3 lacks, .gpu/ with a base and a data
# subset. Both are added to git's info/exclude, so they never enter a commit.
#
#   bash benchmarks/gpu_carry.sh     (BASE=../shared/bases/small-h200 DATA=../shared/data)
#
# The machine has python3 3.12 with torch, transformers, peft, pyarrow, pandas, xxhash, ...;
# the library imports `datasets`, which needs dill and multiprocess (absent there) and an
# fsspec within its pins. Versions: those of our CI venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-../shared/bases/small-h200}
DATA=${DATA:-../shared/data}
PY=${PYTHON:-python3}

exclude=$(git rev-parse --git-path info/exclude)
for path in /.whl/ /.gpu/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0

rm -rf .gpu && mkdir -p .gpu/data/corpus
cp -r "$BASE" .gpu/base
cp -r "$DATA/sst2" .gpu/data/sst2
# Two corpus shards: the first trains the short pretrain, the last is held out (forgetting too).
shards=("$DATA"/corpus/*.txt)
cp "${shards[0]}" "${shards[-1]}" .gpu/data/corpus/
du -sh .whl .gpu
