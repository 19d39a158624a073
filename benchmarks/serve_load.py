"""Load test of the Serve app, and its batching ratios, side by side in one run (loopback only).

    python benchmarks/serve_load.py --base runs/base-small2/model [--requests 2000]
        [--concurrency 32] [--max-seconds 300] [--tasks sst2,cola,trec,agnews]

Builds a throwaway registry in a temp folder (one random LoRA-Diffusion adaptor per task on
`--base`, alias production, plus a router), starts the app on a local Ray (`serve.run`, the
same `serve_apps.app:build_app` as `serve run`) on 127.0.0.1, and measures:

  load         --requests mixed requests (generate with one-hot / mixed / router weights and
               classify, over every task) at --concurrency: throughput, p50/p99, errors
  single_task  --ratio-requests generate requests (raw prompts, 4 tokens, 4 steps), all for
               one task's adaptor
  mixed_task   the same traffic, each request with its own weighting (one task's adaptor over
               every task, two-task mixes, the router)       -> ratio mixed / single
  batch_1      the mixed traffic with max_batch_size 1        -> ratio batched / batch_1

Every phase stops issuing at --max-seconds. Prints one JSON line per phase and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--tasks", default="sst2,cola,trec,agnews")
    p.add_argument("--requests", type=int, default=2000, help="requests of the load phase")
    p.add_argument("--ratio-requests", type=int, default=400, help="requests per ratio phase")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=300, help="cap per phase")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def make_registry(root: Path, base_dir: str, tasks: list[str]) -> str:
    """Random adaptors (non-zero up-projections) registered with alias production; a router."""
    import mlflow
    import torch

    from jobs.tracking import register_run_adaptor
    from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
    from lora_diffusion.adaptor_io import save_adaptor, save_router
    from lora_diffusion.composition import Router
    from lora_diffusion.models import load_base

    store = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    base = load_base(base_dir)[0]
    d = base.config.hidden_size
    for i, task in enumerate(tasks):
        torch.manual_seed(i)
        adaptor = TrajectoryAdaptor(AdaptorConfig(), d)
        with torch.no_grad():
            for w in adaptor.parameters():
                w.normal_(std=0.02)
        save_adaptor(root / task, adaptor, base, task=task)
        with mlflow.start_run(run_name=f"bench-{task}") as run:
            pass
        cfg = SimpleNamespace(task=task, method="lora_diffusion", base=base_dir)
        register_run_adaptor(run.info.run_id, str(root / task), cfg, f"{task}-bench", "production")
    save_router(root / "router", Router(d, len(tasks)), tasks, base)
    return store


TEXTS = [
    "a gripping , funny and moving film",
    "the plot is thin and the acting is worse",
    "who wrote the first dictionary ?",
    "the team won the final match on sunday",
    "stocks fell as the bank raised rates",
    "the cat sat on the mat , quietly",
]


def mixed_requests(n: int, tasks: list[str], rng: random.Random) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        task, text = rng.choice(tasks), rng.choice(TEXTS)
        if i % 3 == 2:
            out.append(("/v1/classify", {"task": task, "input": text, "seed": i}))
            continue
        kind = i % 4
        if kind == 0:
            weights = {task: 1.0}
        elif kind == 1:
            other = rng.choice(tasks)
            weights = {task: 0.5, other: 0.5} if other != task else {task: 1.0}
        else:
            weights = None  # the router's choice
        body = {"task": task, "input": text, "seed": i}
        if weights:
            body["weights"] = weights
        out.append(("/v1/generate", body))
    return out


def single_requests(n: int, task: str, rng: random.Random) -> list[tuple[str, dict]]:
    """Raw prompts, 4 new tokens in 4 steps, all for `task`'s adaptor."""
    return [("/v1/generate", {"prompt": rng.choice(TEXTS), "max_new_tokens": 4, "steps": 4,
                              "weights": {task: 1.0}, "seed": i}) for i in range(n)]  # fmt: skip


def mixed_generate(n: int, tasks: list[str], rng: random.Random) -> list[tuple[str, dict]]:
    """The same traffic as `single_requests` (prompts, lengths, steps), but each request with
    its own weighting: one task's adaptor (cycling over the tasks), two tasks mixed, or the
    router's choice."""
    out = []
    for i in range(n):
        body = {"prompt": rng.choice(TEXTS), "max_new_tokens": 4, "steps": 4, "seed": i}
        task, kind = tasks[i % len(tasks)], i % 3
        if kind == 0:
            body["weights"] = {task: 1.0}
        elif kind == 1:
            body["weights"] = {task: 0.5, tasks[(i + 1) % len(tasks)]: 0.5}
        out.append(("/v1/generate", body))  # kind 2: the router's weights
    return out


async def drive(url: str, requests, concurrency: int, max_seconds: float) -> dict:
    import httpx

    latencies, errors, statuses, sizes = [], 0, {}, []
    queue = list(reversed(requests))
    start = time.perf_counter()

    async def worker(client):
        nonlocal errors
        while queue and time.perf_counter() - start < max_seconds:
            path, body = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await client.post(url + path, json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    errors += 1
                else:
                    sizes.append(r.json()["timing"]["batch_size"])
            except httpx.HTTPError:
                errors += 1
                statuses["transport"] = statuses.get("transport", 0) + 1
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    q = lambda f: round(1000 * lat[min(len(lat) - 1, int(f * len(lat)))], 1) if lat else None
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_ms": q(0.50),
        "p99_ms": q(0.99),
        "errors": errors,
        "statuses": {str(k): v for k, v in statuses.items()},
        "mean_batch": round(statistics.mean(sizes), 2) if sizes else None,
    }


def deploy(store: str, root: Path, max_batch_size: int, port: int, wait: float):
    from ray import serve

    from serve_apps.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"tracking_uri": store, "router": str(root / "router"), "poll_seconds": 0,
                     "max_batch_size": max_batch_size, "batch_wait_timeout_s": wait})  # fmt: skip
    serve.run(app, name="lora-diffusion", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv=None) -> dict:
    a = parse_args(argv)
    tasks = a.tasks.split(",")
    rng = random.Random(a.seed)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    store = make_registry(root, str(Path(a.base).resolve()), tasks)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        url = deploy(store, root, a.max_batch_size, a.port, a.batch_wait)
        asyncio.run(drive(url, mixed_requests(64, tasks, rng), a.concurrency, 60))  # warm-up
        phases = [
            ("load", mixed_requests(a.requests, tasks, rng)),
            ("single_task", single_requests(a.ratio_requests, tasks[0], rng)),
            ("mixed_task", mixed_generate(a.ratio_requests, tasks, rng)),
        ]
        for name, reqs in phases:
            results[name] = asyncio.run(drive(url, reqs, a.concurrency, a.max_seconds))
            print(json.dumps({"phase": name, **results[name]}), flush=True)
        deploy(store, root, 1, a.port, a.batch_wait)
        reqs = mixed_generate(a.ratio_requests, tasks, rng)
        results["batch_1"] = asyncio.run(drive(url, reqs, a.concurrency, a.max_seconds))
        print(json.dumps({"phase": "batch_1", **results["batch_1"]}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rps = {k: v["throughput_rps"] for k, v in results.items()}
    results["ratios"] = {
        "mixed_over_single_task": round(rps["mixed_task"] / rps["single_task"], 3),
        "batched_over_batch_1": round(rps["mixed_task"] / rps["batch_1"], 3),
    }
    print("\n| phase | requests | req/s | p50 ms | p99 ms | errors | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k in ("load", "single_task", "mixed_task", "batch_1"):
        r = results[k]
        print(f"| {k} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['errors']} | {r['mean_batch']} |")  # fmt: skip
    print(f"\nmixed-task / single-task throughput: {results['ratios']['mixed_over_single_task']}"
          f" (target >= 0.9); batched / batch size 1: "
          f"{results['ratios']['batched_over_batch_1']}")  # fmt: skip
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
