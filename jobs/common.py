"""Flags and output shared by every job: --output-dir, --max-steps, --seed, --data-dir, --json,
--set key=value overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_diffusion import tasks

REPO = Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """The library's lookup ($LORA_DIFFUSION_DATA_DIR, ../shared/data); shown in --help."""
    try:
        return str(tasks.default_data_dir())
    except tasks.DataError:
        return str(REPO.parent / "shared" / "data")


def base_parser(description: str, training: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="folder of task data and corpus (env LORA_DIFFUSION_DATA_DIR)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON of results")
    if training:
        p.add_argument("--output-dir", required=True, help="where the run writes its files")
        p.add_argument(
            "--max-steps", type=int, default=None, help="optimizer steps (default: the job's)"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="dotted config override, repeatable (e.g. train.lr=1e-3, diffusion.steps=50)",
        )
    return p


def emit(result: dict, as_json: bool) -> None:
    """Print results: a readable block, and with --json a final one-line JSON object."""
    for k, v in result.items():
        if not isinstance(v, dict):
            print(f"{k}: {v}")
    if as_json:
        sys.stdout.flush()
        print(json.dumps(result, default=str))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
