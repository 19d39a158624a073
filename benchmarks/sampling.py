"""Sampling time: composed task adaptors vs the bare base, and the cache on vs off, in one run.

    python benchmarks/sampling.py [--preset small] [--batch-size 8] [--seq-len 64] [--steps 128]
        [--tasks 3] [--reps 3] [--device cpu] [--json]

For the same random time-agnostic base (`preset_config(preset)`), batch (condition in the first
half of each row, target in the second), seed and number of steps, measures one
`sampling.sample` call of
  base_cache        the bare base, cache=True: the network call is skipped while x_t is unchanged
  base_nocache      the bare base, cache=False: one network call per step
  composed_cache    an `AdaptedDenoiser` with --tasks random adaptors and per-example weights
                    (rows one-hot, uniform over all tasks, or 0.5/0.5 over two), the base's
                    output reused while x_t is unchanged (cache_base, the default)
  composed_nocache  the same with cache_base=False: base and adaptors at every step
Reports seconds per call (the median of --reps, after a warm-up call), network calls (base
trunk forwards) and calls saved, and peak extra memory. Each kind runs in a fresh subprocess,
measured as in `adaptor_step.py` (CPU: growth of max RSS from before the first call; GPU:
torch.cuda.max_memory_allocated above model and batch).
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch
from side_by_side import add_ratios, measure_apart, print_rows, step_parser

KINDS = ("base_cache", "base_nocache", "composed_cache", "composed_nocache")


def task_weights(batch: int, n_tasks: int) -> torch.Tensor:
    """(B, n_tasks) rows cycling through one-hot, uniform over all tasks, 0.5/0.5 over two."""
    w = torch.zeros(batch, n_tasks)
    for i in range(batch):
        j = i % n_tasks
        if i % 3 == 0:
            w[i, j] = 1.0
        elif i % 3 == 1:
            w[i] = 1.0 / n_tasks
        else:
            w[i, j] = w[i, (j + 1) % n_tasks] = 0.5
    return w


def measure(
    kind: str, preset: str, batch: int, seq: int, steps: int, n_tasks: int, device: str, reps: int
) -> dict:
    from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
    from lora_diffusion.composition import AdaptedDenoiser
    from lora_diffusion.corruption import get_process
    from lora_diffusion.models import DiffusionLM, preset_config
    from lora_diffusion.sampling import sample
    from lora_diffusion.schedules import get_schedule

    torch.manual_seed(0)
    base = DiffusionLM(preset_config(preset)).to(device).eval()
    v = base.config.vocab_size
    ids = torch.randint(6, v, (batch, seq), device=device)
    target = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    target[:, seq // 2 :] = True  # condition in the first half, target in the second
    attn = torch.ones_like(ids)
    proc, sched = get_process("absorbing", v, base.config.mask_token_id), get_schedule("loglinear")
    composed = kind.startswith("composed")
    if composed:
        adaptors = {}
        for j in range(n_tasks):
            torch.manual_seed(1 + j)
            adaptor = TrajectoryAdaptor(AdaptorConfig(), base.config.hidden_size)
            with torch.no_grad():  # non-zero up-projections, so every adaptor does perturb
                for w in adaptor.parameters():
                    w.normal_(std=0.02)
            adaptors[f"task{j}"] = adaptor
        model = AdaptedDenoiser(base, adaptors).to(device).eval()
        model.cache_base = kind == "composed_cache"
        weights = task_weights(batch, n_tasks).to(device)
    else:
        model, weights = base, None
    cache = kind != "base_nocache"

    def call():
        g = torch.Generator().manual_seed(0)  # same trajectory on every call
        if composed:
            model.base_calls = model.base_calls_saved = 0
            with model.task_weights(weights):
                out = sample(model, proc, sched, ids, attn, target, steps, g, cache=cache)
            return model.base_calls, model.base_calls_saved
        out = sample(model, proc, sched, ids, attn, target, steps, g, cache=cache)
        return out.network_calls, out.calls_saved

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):  # the median call: robust to a busy machine
        t0 = time.perf_counter()
        calls, saved = call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {
        "kind": kind,
        "seconds": seconds,
        "peak_mb": peak_mb,
        "network_calls": calls,
        "calls_saved": saved,
        "steps": steps,
        "tasks": n_tasks if composed else 0,
        "time_agnostic": not base.time_conditioned,
    }


def main() -> None:
    doc = __doc__.splitlines()[0]
    p = step_parser(doc, KINDS, preset="small", batch_size=8, seq_len=64, reps=3)
    p.add_argument("--steps", type=int, default=128, help="denoising steps")
    p.add_argument("--tasks", type=int, default=3, help="adaptors composed (>= 2)")
    a = p.parse_args()
    if a.tasks < 2:
        p.error("--tasks must be >= 2 (a composition)")
    args = (a.preset, a.batch_size, a.seq_len, a.steps, a.tasks, a.device, a.reps)
    if a.measure:
        print(json.dumps(measure(a.measure, *args)))
        return
    flags = ("preset", "batch_size", "seq_len", "steps", "tasks", "reps", "device")
    rows = measure_apart(__file__, KINDS, a, flags)
    add_ratios(rows, "base_cache")
    heading = (
        f"preset={a.preset} batch={a.batch_size} seq={a.seq_len} steps={a.steps} "
        f"tasks={a.tasks} device={a.device}"
    )
    keys = ("seconds", "peak_mb", "network_calls", "calls_saved", "time_ratio")
    print_rows(rows, heading, keys, "call", a.json)


if __name__ == "__main__":
    main()
