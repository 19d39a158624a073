"""What the step benchmarks share (adaptor_step, methods_step, sampling): each measurement in a
fresh process, then its ratios to a reference measured in the same run.

A fresh process per measurement keeps one kind's peak memory, allocator state and warm caches
out of the next kind's numbers."""

from __future__ import annotations

import json
import subprocess
import sys


def measure_apart(script: str, kinds, a, flags: tuple[str, ...]) -> dict[str, dict]:
    """{kind: the JSON that `python SCRIPT --measure KIND` prints}, each kind in its own process,
    given `a`'s values of `flags` (argparse dests: batch_size is --batch-size)."""
    rows = {}
    for kind in kinds:
        cmd = [sys.executable, script, "--measure", kind]
        for flag in flags:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[kind] = json.loads(out.strip().splitlines()[-1])
    return rows


def add_ratios(rows: dict[str, dict], reference: str) -> None:
    """Each row's time_ratio and mem_ratio (peak memory; nan without one) to row `reference`."""
    ref = rows[reference]
    for r in rows.values():
        r["time_ratio"] = r["seconds"] / ref["seconds"]
        r["mem_ratio"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan")
