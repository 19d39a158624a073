#!/usr/bin/env bash
# The lint that CI (.ci/run) and `make lint` both run: ruff's checks and its formatter, line
# length 100 (pyproject.toml), on every Python folder.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(lora_diffusion jobs tests serve_apps benchmarks)
ruff check "${paths[@]}"
ruff format --check "${paths[@]}"
