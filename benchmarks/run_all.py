"""Every speed and memory benchmark in one run, as one Markdown table of ratios.

    python benchmarks/run_all.py [--preset small] [--device cpu|cuda] [--quick]
        [--base runs/base-small2/model] [--skip-serve] [--output results.json]

Runs, one after another and each as its own subprocess (which again measures every variant in
a fresh subprocess, so no peak-memory figure is polluted by another):
  adaptor_step.py   adaptor training step and full fine-tuning step / no-grad base forward
  sampling.py       composed sampling (several task adaptors, per-example weights) / the bare
                    base; cache=True / cache=False on the time-agnostic base (calls saved)
  methods_step.py   every tuning method's training step / LoRA-Diffusion's, time and memory
  serve_load.py     Serve mixed-task / single-task and batched / batch-1 throughput (needs
                    --base; skipped with a note without it or with --skip-serve; CPU replicas)
and prints one table (benchmark | measured | ratio | meaning) on stdout; progress and each
benchmark's own table go to stderr. --output also writes the rows, the sizes, the environment
and every benchmark's raw numbers as JSON, rewritten after each benchmark, so a run cut short
(by --timeout, or by SIGTERM from `timeout`) keeps what it measured. Exit status: 0 when every
benchmark ran, 1 when one failed or timed out, 124 when the run itself was terminated.

The models are random `preset_config(--preset)` bases (Serve uses --base). At --quick or
--preset tiny sizes, per-call overhead dominates and the ratios are a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHES = ("adaptor", "sampling", "methods", "serve")

# Sizes per mode: (batch, seq, reps) for the training steps, sampling adds steps and tasks,
# Serve counts requests. The full sizes are the scripts' own defaults.
SIZES = {
    "full": {
        "adaptor": {"batch": 32, "seq": 128, "reps": 5},
        "methods": {"batch": 16, "seq": 128, "reps": 5},
        "sampling": {"batch": 8, "seq": 64, "reps": 3, "steps": 128, "tasks": 3},
        "serve": {"requests": 400, "ratio_requests": 200, "concurrency": 32, "max_seconds": 120},
    },
    "quick": {
        "adaptor": {"batch": 4, "seq": 32, "reps": 2},
        "methods": {"batch": 4, "seq": 32, "reps": 2},
        "sampling": {"batch": 4, "seq": 32, "reps": 3, "steps": 64, "tasks": 3},
        "serve": {"requests": 48, "ratio_requests": 32, "concurrency": 8, "max_seconds": 30},
    },
}


class Terminated(Exception):
    """SIGTERM (e.g. from `timeout`): stop, kill the running benchmark, keep what was measured."""


def log(msg: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="size of the random bases (tiny, small, ...)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run")
    p.add_argument("--base", default=None, help="base model folder for the Serve benchmark")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.add_argument("--methods", default=None, help="comma list for methods_step (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="override every batch size")
    p.add_argument("--seq-len", type=int, default=None, help="override every sequence length")
    p.add_argument("--reps", type=int, default=None, help="override every repetition count")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--tasks", type=int, default=None, help="adaptors composed in sampling (>= 2)")
    p.add_argument("--serve-requests", type=int, default=None)
    p.add_argument("--serve-ratio-requests", type=int, default=None)
    p.add_argument("--serve-concurrency", type=int, default=None)
    p.add_argument("--serve-max-seconds", type=float, default=None)
    p.add_argument("--serve-port", type=int, default=8011)
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the benchmarks")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per benchmark (default 1800, 600 with --quick)",
    )
    a = p.parse_args(argv)
    a.only = [b.strip() for b in a.only.split(",") if b.strip()]
    unknown = [b for b in a.only if b not in BENCHES]
    if unknown:
        p.error(f"--only: unknown {unknown}; known: {', '.join(BENCHES)}")
    if a.timeout is None:
        a.timeout = 600.0 if a.quick else 1800.0
    return a


def resolve_sizes(a: argparse.Namespace) -> dict:
    sizes = json.loads(json.dumps(SIZES["quick" if a.quick else "full"]))
    for bench in ("adaptor", "methods", "sampling"):
        for key, value in (("batch", a.batch_size), ("seq", a.seq_len), ("reps", a.reps)):
            if value is not None:
                sizes[bench][key] = value
    for key, value in (("steps", a.steps), ("tasks", a.tasks)):
        if value is not None:
            sizes["sampling"][key] = value
    serve = (
        ("requests", a.serve_requests),
        ("ratio_requests", a.serve_ratio_requests),
        ("concurrency", a.serve_concurrency),
        ("max_seconds", a.serve_max_seconds),
    )
    for key, value in serve:
        if value is not None:
            sizes["serve"][key] = value
    return sizes


def child_env(a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(a.threads)
    return env


def run_child(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run cmd in its own process group; on timeout or SIGTERM kill the whole group (the
    benchmark's own measurement subprocesses too). Returns (rc or None on timeout, out, err)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return None, out, err
    finally:
        if proc.poll() is None:  # Terminated (or anything else) while it ran
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the benchmark's output")


def environment(a: argparse.Namespace, env: dict) -> dict:
    """Versions and device, probed in a subprocess (the runner itself never touches CUDA)."""
    code = (
        "import json, torch; c = torch.cuda.is_available(); print(json.dumps({"
        "'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'cuda_available': c, "
        "'gpu': torch.cuda.get_device_name(0) if c else None, "
        "'torch_threads': torch.get_num_threads()}))"
    )
    rc, out, err = run_child([sys.executable, "-c", code], env, 120)
    info = last_json(out) if rc == 0 else {"probe_error": (err or "").strip()[-500:]}
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "git": git or None,
        **info,
    }


# --- formatting -------------------------------------------------------------------------
def fs(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmb(mb: float) -> str:
    return f"{mb:.1f} MB"


def ratio(num: float, den: float) -> float:
    return num / den if den and den > 0 and num >= 0 else float("nan")


def fx(r: float | None) -> str:
    return "n/a" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def row(bench: str, name: str, measured: str, r: float | None, meaning: str) -> dict:
    """One table row; a ratio that cannot be computed (a zero or negative denominator, e.g. no
    measurable memory growth on CPU) is kept as None and shown as n/a, no ratio at all as —."""
    finite = r is not None and math.isfinite(r)
    return {
        "source": bench,
        "benchmark": name,
        "measured": measured,
        "ratio": round(r, 4) if finite else None,
        "ratio_na": r is not None and not finite,
        "meaning": meaning,
    }


# --- benchmarks ---------------------------------------------------------------------------
def cmd_adaptor(a, s) -> list[str]:
    return [sys.executable, str(HERE / "adaptor_step.py"), "--preset", a.preset,
            "--batch-size", str(s["batch"]), "--seq-len", str(s["seq"]), "--reps", str(s["reps"]),
            "--device", a.device, "--json"]  # fmt: skip


def rows_adaptor(raw: dict) -> list[dict]:
    b, ad, ft = raw["base_forward"], raw["adaptor_step"], raw["full_ft_step"]

    def pair(name: str, num: dict, den: dict, meaning: str) -> list[dict]:
        return [
            row(
                "adaptor_step",
                f"{name}, time",
                f"{fs(num['seconds'])} vs {fs(den['seconds'])}",
                ratio(num["seconds"], den["seconds"]),
                meaning[0],
            ),
            row(
                "adaptor_step",
                f"{name}, memory",
                f"{fmb(num['peak_mb'])} vs {fmb(den['peak_mb'])}",
                ratio(num["peak_mb"], den["peak_mb"]),
                meaning[1],
            ),
        ]

    return [
        *pair("adaptor step / base forward", ad, b,
              ("LoRA-Diffusion training step (base no-grad, adaptor fwd/bwd, AdamW) per no-grad "
               "base forward; floor 1.0", "peak extra memory of the step / of the forward")),
        *pair("full FT step / base forward", ft, b,
              ("full fine-tuning step of the same base",
               "gradients + AdamW state of every weight")),
        *pair("full FT step / adaptor step", ft, ad,
              ("> 1: the frozen base makes a step cheaper", "> 1: the frozen base saves memory")),
    ]  # fmt: skip


def cmd_methods(a, s) -> list[str]:
    cmd = [sys.executable, str(HERE / "methods_step.py"), "--preset", a.preset,
           "--batch-size", str(s["batch"]), "--seq-len", str(s["seq"]), "--reps", str(s["reps"]),
           "--device", a.device, "--json"]  # fmt: skip
    return cmd + (["--methods", a.methods] if a.methods else [])


def rows_methods(raw: dict) -> list[dict]:
    ref, out, B = raw["lora_diffusion"], [], "methods_step"
    for m, r in raw.items():
        if m == "lora_diffusion":
            continue
        out.append(
            row(
                B,
                f"{m} / LoRA-Diffusion step, time",
                f"{fs(r['seconds'])} vs {fs(ref['seconds'])}",
                ratio(r["seconds"], ref["seconds"]),
                f"training step; trainable {r['trainable']:,} vs {ref['trainable']:,}; "
                "> 1: slower than LoRA-Diffusion",
            )
        )
        out.append(
            row(
                B,
                f"{m} / LoRA-Diffusion step, memory",
                f"{fmb(r['peak_mb'])} vs {fmb(ref['peak_mb'])}",
                ratio(r["peak_mb"], ref["peak_mb"]),
                "peak extra memory; > 1: needs more than LoRA-Diffusion",
            )
        )
    return out


def cmd_sampling(a, s) -> list[str]:
    return [sys.executable, str(HERE / "sampling.py"), "--preset", a.preset,
            "--batch-size", str(s["batch"]), "--seq-len", str(s["seq"]), "--reps", str(s["reps"]),
            "--steps", str(s["steps"]), "--tasks", str(s["tasks"]), "--device", a.device,
            "--json"]  # fmt: skip


def rows_sampling(raw: dict) -> list[dict]:
    bc, bn = raw["base_cache"], raw["base_nocache"]
    cc, cn = raw["composed_cache"], raw["composed_nocache"]
    n, steps, B = cc["tasks"], bc["steps"], "sampling"
    agnostic = "" if bc["time_agnostic"] else " (base is time-conditioned: no cache applies)"
    return [
        row(
            B,
            f"composed ({n} adaptors) / base sampling, time",
            f"{fs(cc['seconds'])} vs {fs(bc['seconds'])} per call",
            ratio(cc["seconds"], bc["seconds"]),
            f"sample() at equal batch and {steps} steps, per-example task weights; both with "
            "the default cache",
        ),
        row(
            B,
            f"composed ({n} adaptors) / base sampling, time, no cache",
            f"{fs(cn['seconds'])} vs {fs(bn['seconds'])} per call",
            ratio(cn["seconds"], bn["seconds"]),
            "base + adaptors vs base at every step: the adaptors' own cost",
        ),
        row(
            B,
            f"composed ({n} adaptors) / base sampling, memory",
            f"{fmb(cc['peak_mb'])} vs {fmb(bc['peak_mb'])}",
            ratio(cc["peak_mb"], bc["peak_mb"]),
            "peak extra memory of a sample call (cache on)",
        ),
        row(
            B,
            "cached / uncached base sampling, time",
            f"{fs(bc['seconds'])} vs {fs(bn['seconds'])}; {bc['network_calls']} vs "
            f"{bn['network_calls']} network calls",
            ratio(bc["seconds"], bn["seconds"]),
            f"sample(cache=True) vs cache=False on the time-agnostic base{agnostic}; < 1: faster",
        ),
        row(
            B,
            "cached / uncached base sampling, network calls",
            f"{bc['network_calls']} vs {bn['network_calls']} ({bc['calls_saved']} of {steps} "
            "saved)",
            ratio(bc["network_calls"], bn["network_calls"]),
            "steps where no token changed reuse the last output",
        ),
        row(
            B,
            "cached / uncached composed sampling, time",
            f"{fs(cc['seconds'])} vs {fs(cn['seconds'])}; base forwards {cc['network_calls']} vs "
            f"{cn['network_calls']} ({cc['calls_saved']} saved)",
            ratio(cc["seconds"], cn["seconds"]),
            "AdaptedDenoiser.cache_base: base output reused, adaptors still run every step",
        ),
    ]


STEP_COMMANDS = {"adaptor": cmd_adaptor, "methods": cmd_methods, "sampling": cmd_sampling}


def cmd_serve(a, s, out_json: str) -> list[str]:
    return [sys.executable, str(HERE / "serve_load.py"), "--base", str(Path(a.base).resolve()),
            "--requests", str(s["requests"]), "--ratio-requests", str(s["ratio_requests"]),
            "--concurrency", str(s["concurrency"]), "--max-seconds", str(s["max_seconds"]),
            "--port", str(a.serve_port), "--output", out_json]  # fmt: skip


def rows_serve(raw: dict) -> list[dict]:
    ld, si, mi, b1 = raw["load"], raw["single_task"], raw["mixed_task"], raw["batch_1"]
    B = "serve_load"
    errors = sum(raw[k]["errors"] for k in ("load", "single_task", "mixed_task", "batch_1"))
    return [
        row(
            B,
            "Serve mixed-task / single-task throughput",
            f"{mi['throughput_rps']} vs {si['throughput_rps']} req/s",
            ratio(mi["throughput_rps"], si["throughput_rps"]),
            "generate requests, every task and weighting mixed vs one task one-hot (target >= 0.9)",
        ),
        row(
            B,
            "Serve batched / batch-1 throughput",
            f"{mi['throughput_rps']} vs {b1['throughput_rps']} req/s (mean batch "
            f"{mi['mean_batch']} vs {b1['mean_batch']})",
            ratio(mi["throughput_rps"], b1["throughput_rps"]),
            "the same mixed traffic, max_batch_size as set vs 1",
        ),
        row(
            B,
            "Serve mixed load",
            f"{ld['requests']} req, {ld['throughput_rps']} req/s, p50 {ld['p50_ms']} ms, p99 "
            f"{ld['p99_ms']} ms",
            None,
            f"generate (one-hot / mixed / routed) + classify; errors in all phases: {errors}",
        ),
    ]


# --- the run ------------------------------------------------------------------------------
def render(rows: list[dict]) -> str:
    lines = ["| benchmark | measured | ratio | meaning |", "| --- | --- | --- | --- |"]
    for r in rows:
        shown = "n/a" if r.get("ratio_na") else "—" if r["ratio"] is None else fx(r["ratio"])
        cells = [r["benchmark"], r["measured"], shown, r["meaning"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    sizes = resolve_sizes(a)
    env = child_env(a)

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    result = {
        "config": {
            "preset": a.preset,
            "device": a.device,
            "quick": a.quick,
            "base": a.base,
            "threads": a.threads,
            "sizes": sizes,
        },
        "environment": {},
        "rows": [],
        "raw": {},
        "skipped": {},
        "failed": {},
        "complete": False,
    }
    rows: list[dict] = result["rows"]

    def save() -> None:
        if a.output:
            Path(a.output).parent.mkdir(parents=True, exist_ok=True)
            Path(a.output).write_text(json.dumps(result, indent=2))

    plan = [b for b in BENCHES if b in a.only]
    if "serve" in plan and (a.skip_serve or not a.base):
        why = "--skip-serve" if a.skip_serve else "no --base given (Serve needs a base folder)"
        log(f"serve: skipped: {why}")
        result["skipped"]["serve"] = why
        plan.remove("serve")
    t_start, rc = time.perf_counter(), 0
    try:
        log(f"preset={a.preset} device={a.device} quick={a.quick} plan={','.join(plan)}")
        result["environment"] = environment(a, env)
        e = result["environment"]
        log(
            f"torch {e.get('torch')} (cuda {e.get('torch_cuda')}), cuda available: "
            f"{e.get('cuda_available')}, gpu: {e.get('gpu')}"
        )
        if a.device == "cuda" and not e.get("cuda_available"):
            msg = "ERROR: --device cuda but torch.cuda.is_available() is False; nothing measured"
            log(msg)
            print(msg)
            result["failed"]["cuda"] = "torch.cuda.is_available() is False"
            save()
            return 2
        for bench in plan:
            s = sizes[bench]
            tmp = None
            if bench == "serve":
                if not (Path(a.base) / "config.json").is_file():
                    rc = 1
                    result["failed"]["serve"] = f"--base {a.base}: no model folder (config.json)"
                    rows.append(
                        row("serve_load", "serve", "FAILED", None, result["failed"]["serve"])
                    )
                    log(f"serve: FAILED: {result['failed']['serve']}")
                    continue
                tmp = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
                cmd = cmd_serve(a, s, tmp)
            else:
                cmd = STEP_COMMANDS[bench](a, s)
            shown = " ".join(Path(c).name if c.endswith(".py") else c for c in cmd[1:])
            log(f"{bench}: running {shown}")
            t0 = time.perf_counter()
            code, out, err = run_child(cmd, env, a.timeout)
            took = time.perf_counter() - t0
            for line in out.strip().splitlines():
                if not line.startswith("{"):
                    print(f"    {line}", file=sys.stderr)
            try:
                if code is None:
                    raise RuntimeError(f"timed out after {a.timeout:.0f} s")
                if code != 0:
                    tail = " / ".join(err.strip().splitlines()[-3:])
                    raise RuntimeError(f"exit {code}: {tail}")
                raw = json.loads(Path(tmp).read_text()) if tmp else last_json(out)
                result["raw"][bench] = raw
                new = {
                    "adaptor": rows_adaptor,
                    "methods": rows_methods,
                    "sampling": rows_sampling,
                    "serve": rows_serve,
                }[bench](raw)
                rows.extend(new)
                log(f"{bench}: done in {took:.0f} s")
            except (RuntimeError, ValueError, KeyError) as exc:
                rc = 1
                msg = str(exc)[-400:]
                result["failed"][bench] = msg
                rows.append(row(bench, f"{bench}", "FAILED", None, msg))
                log(f"{bench}: FAILED after {took:.0f} s: {msg}")
            finally:
                if tmp:
                    Path(tmp).unlink(missing_ok=True)
            save()
        result["complete"] = True
    except (Terminated, KeyboardInterrupt):
        rc = 124
        log("terminated: writing what was measured so far")
        left = [b for b in plan if b not in result["raw"] and b not in result["failed"]]
        result["failed"]["run_all"] = f"terminated before the end; not measured: {left}"
        unmeasured = f"not measured: {', '.join(left) or 'none'}"
        rows.append(row("run_all", "run_all", "TERMINATED", None, unmeasured))
    if "serve" in result["skipped"]:
        rows.append(
            row(
                "serve_load",
                "Serve mixed/single, batched/batch-1",
                "skipped",
                None,
                result["skipped"]["serve"],
            )
        )
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    s = sizes
    print(
        f"preset={a.preset} device={a.device} quick={a.quick} | training steps: batch "
        f"{s['adaptor']['batch']}x{s['adaptor']['seq']} (adaptor_step), "
        f"{s['methods']['batch']}x{s['methods']['seq']} (methods_step) | sampling: batch "
        f"{s['sampling']['batch']}x{s['sampling']['seq']}, {s['sampling']['steps']} steps, "
        f"{s['sampling']['tasks']} adaptors | {result['seconds']} s\n"
    )
    print(render(rows))
    if a.quick or a.preset == "tiny":
        print("\n(quick / tiny sizes: per-call overhead dominates; a smoke test, not a result)")
    if a.output:
        log(f"wrote {a.output}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
