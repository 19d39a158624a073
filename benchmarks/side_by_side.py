"""What the step benchmarks share (adaptor_step, methods_step, sampling): each measurement in a
fresh process, then its ratios to a reference measured in the same run, printed as a table.

A fresh process per measurement keeps one kind's peak memory, allocator state and warm caches
out of the next kind's numbers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def step_parser(description: str, kinds=None, **defaults) -> argparse.ArgumentParser:
    """The flags every step benchmark has, with its `defaults` (preset, batch_size, seq_len,
    reps); `kinds` are what --measure (one kind, in a fresh process: `measure_apart`) takes."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", default=defaults["preset"], help="model size preset")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="sequences")
    p.add_argument("--seq-len", type=int, default=defaults["seq_len"], help="tokens a sequence")
    p.add_argument("--reps", type=int, default=defaults["reps"], help="timed repetitions")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    p.add_argument("--measure", choices=kinds, help=argparse.SUPPRESS)
    return p


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


COLUMNS = {  # a row's key: its column's title, width and format
    "trainable": ("trainable", 10, "d"),
    "seconds": ("s/{per}", 9, ".4f"),
    "peak_mb": ("peak MB", 9, ".1f"),
    "network_calls": ("calls", 6, "d"),
    "calls_saved": ("saved", 6, "d"),
    "time_ratio": ("time x", 7, ".2f"),
    "mem_ratio": ("mem x", 7, ".2f"),
}


def print_rows(rows: dict[str, dict], heading: str, keys, per: str, as_json: bool) -> None:
    """`heading`, then a row a kind with the `keys` columns (`COLUMNS`; seconds per `per`);
    with `as_json`, the rows as one JSON line after."""
    name = max(map(len, rows)) + 1
    cols = [(k, *COLUMNS[k]) for k in keys]
    print(heading)
    print(f"{'':{name}} " + " ".join(f"{t.format(per=per):>{w}}" for _, t, w, _ in cols))
    for kind, r in rows.items():
        print(f"{kind:{name}} " + " ".join(f"{r[k]:{w}{f}}" for k, _, w, f in cols))
    if as_json:
        print(json.dumps(rows))
