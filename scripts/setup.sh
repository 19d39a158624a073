#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with torch (CPU wheel, pinned, first) and the
# project with its dev extra. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
