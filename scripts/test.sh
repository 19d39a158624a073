#!/usr/bin/env bash
# The test suite, as the README runs it (expects the project installed in the active venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q --durations=15 "$@"
