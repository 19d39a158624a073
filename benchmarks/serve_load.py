"""Load test of the Serve app, and its batching ratios, side by side in one run (loopback only).

    python benchmarks/serve_load.py --base runs/base-small2/model [--requests 2000]
        [--concurrency 32] [--max-seconds 300] [--tasks sst2,cola,trec,agnews] [--repeats 3]
    python benchmarks/serve_load.py --base ../shared/bases/small-h200 --quick   # ~2 min

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
  largest      the costliest request the app's limits allow, and a small classify sent
               while it runs: their latencies (the small one must not wait for the big one)

single_task and mixed_task alternate --repeats times: the ratio is reported per repeat, with
its mean and spread (how stable it is at this size). Every phase stops issuing at
--max-seconds. Everything (registry, artifacts) goes to a temp folder, nothing into the
working directory. Prints one JSON line per phase and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


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
    p.add_argument("--repeats", type=int, default=3, help="single/mixed ratio phase pairs")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 tasks, 64 requests per phase, 2 repeats, concurrency 16",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.tasks, a.requests, a.ratio_requests, a.repeats = "sst2,trec", 64, 64, 2
        a.concurrency, a.max_seconds = 16, 60
    return a


def make_registry(root: Path, base_dir: str, tasks: list[str]) -> str:
    """Random adaptors (non-zero up-projections) registered with alias production; a router."""
    import torch

    from jobs.tracking import MlflowRun, register_run_adaptor
    from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
    from lora_diffusion.adaptor_io import save_adaptor, save_router
    from lora_diffusion.composition import Router
    from lora_diffusion.models import load_base

    store = f"sqlite:///{root / 'mlflow.db'}"  # artifacts beside it, in mlartifacts/
    base = load_base(base_dir)[0]
    d = base.config.hidden_size
    for i, task in enumerate(tasks):
        torch.manual_seed(i)
        adaptor = TrajectoryAdaptor(AdaptorConfig(), d)
        with torch.no_grad():
            for w in adaptor.parameters():
                w.normal_(std=0.02)
        save_adaptor(root / task, adaptor, base, task=task)
        run = MlflowRun.start(store, "serve-bench", f"bench-{task}")
        cfg = SimpleNamespace(task=task, method="lora_diffusion", base=base_dir)
        name = f"{task}-bench"
        register_run_adaptor(store, run.run_id, str(root / task), cfg, name, "production")
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
    return [
        (
            "/v1/generate",
            {
                "prompt": rng.choice(TEXTS),
                "max_new_tokens": 4,
                "steps": 4,
                "weights": {task: 1.0},
                "seed": i,
            },
        )
        for i in range(n)
    ]


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
    app = build_app(
        {
            "tracking_uri": store,
            "router": str(root / "router"),
            "poll_seconds": 0,
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": wait,
        }
    )
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
        results["load"] = asyncio.run(
            drive(url, mixed_requests(a.requests, tasks, rng), a.concurrency, a.max_seconds)
        )
        print(json.dumps({"phase": "load", **results["load"]}), flush=True)
        ratios = []
        for i in range(a.repeats):  # alternated, so a drift of the machine hits both alike
            for name, reqs in [
                ("single_task", single_requests(a.ratio_requests, tasks[0], rng)),
                ("mixed_task", mixed_generate(a.ratio_requests, tasks, rng)),
            ]:
                results[f"{name}_{i}"] = asyncio.run(drive(url, reqs, a.concurrency, a.max_seconds))
                print(json.dumps({"phase": f"{name}_{i}", **results[f"{name}_{i}"]}), flush=True)
            rps = lambda k: results[f"{k}_{i}"]["throughput_rps"]  # noqa: B023
            ratios.append(round(rps("mixed_task") / rps("single_task"), 3))
        results["largest"] = asyncio.run(largest(url, a.concurrency))
        print(json.dumps({"phase": "largest", **results["largest"]}), flush=True)
        deploy(store, root, 1, a.port, a.batch_wait)
        reqs = mixed_generate(a.ratio_requests, tasks, rng)
        results["batch_1"] = asyncio.run(drive(url, reqs, a.concurrency, a.max_seconds))
        print(json.dumps({"phase": "batch_1", **results["batch_1"]}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    mean = lambda k: statistics.mean(
        results[f"{k}_{i}"]["throughput_rps"] for i in range(a.repeats)
    )
    results["single_task"] = {"throughput_rps": round(mean("single_task"), 2)}
    results["mixed_task"] = {"throughput_rps": round(mean("mixed_task"), 2)}
    results["ratios"] = {
        "mixed_over_single_task": ratios,
        "mixed_over_single_task_mean": round(statistics.mean(ratios), 3),
        "mixed_over_single_task_spread": round(max(ratios) - min(ratios), 3),
        # the standard error of the mean: how far the mean may sit from the machine's ratio
        "mixed_over_single_task_sem": round(statistics.stdev(ratios) / len(ratios) ** 0.5, 3)
        if len(ratios) > 1
        else None,
        "batched_over_batch_1": round(
            results["mixed_task"]["throughput_rps"] / results["batch_1"]["throughput_rps"], 3
        ),
    }
    print("\n| phase | requests | req/s | p50 ms | p99 ms | errors | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    pairs = [f"{n}_{i}" for i in range(a.repeats) for n in ("single_task", "mixed_task")]
    for k in ["load", *pairs, "batch_1"]:
        r = results[k]
        print(
            f"| {k} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['errors']} | {r['mean_batch']} |"
        )
    r = results["ratios"]
    print(
        f"\nmixed-task / single-task throughput: {r['mixed_over_single_task']} (mean "
        f"{r['mixed_over_single_task_mean']} +- {r['mixed_over_single_task_sem']} (std. error), "
        f"spread {r['mixed_over_single_task_spread']}; "
        f"target >= 0.9); batched / batch size 1: {r['batched_over_batch_1']}"
    )
    big = results["largest"]
    print(
        f"largest allowed request: {big['largest_s']} s (cost {big['cost']}); a small "
        f"classify sent meanwhile: {big['small_s']} s; the old largest: HTTP "
        f"{big['old_largest_status']}"
    )
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))
    return results


async def largest(url: str, concurrency: int) -> dict:
    """The costliest request the limits allow (a prompt of max_input_tokens, max_new_tokens,
    as many steps and samples as max_request_cost leaves) and a small classify sent 0.5 s into
    it; and the old largest (8 samples x 256 steps), which the cost budget now refuses."""
    import httpx

    from serve_apps.app import Settings

    s = Settings()
    prompt = " ".join(["film"] * s.max_input_tokens)  # about one token per word
    tokens = s.max_input_tokens + s.max_new_tokens + 3
    steps = min(s.max_steps, s.max_request_cost // tokens)
    samples = max(1, min(s.max_samples, s.max_request_cost // (tokens * steps)))
    body = {
        "prompt": prompt,
        "max_new_tokens": s.max_new_tokens,
        "steps": steps,
        "num_samples": samples,
    }
    async with httpx.AsyncClient(timeout=300) as client:
        while True:  # the words may tokenise longer than guessed: trim until it is accepted
            t0 = time.perf_counter()
            big = asyncio.ensure_future(client.post(url + "/v1/generate", json=body))
            await asyncio.sleep(0.5)
            t1 = time.perf_counter()
            small = await client.post(url + "/v1/classify", json={"task": "sst2", "input": "fine"})
            small_s = time.perf_counter() - t1
            r = await big
            if r.status_code != 422:
                break
            body["prompt"] = body["prompt"][: int(len(body["prompt"]) * 0.9)]
        big_s = time.perf_counter() - t0
        old = {**body, "steps": 256, "num_samples": 8}
        old_status = (await client.post(url + "/v1/generate", json=old)).status_code
    shown = {**body, "prompt": f"{len(body['prompt'])} chars"}
    return {
        "largest_status": r.status_code,
        "largest_s": round(big_s, 2),
        "cost": samples * steps * tokens,
        "body": shown,
        "small_status": small.status_code,
        "small_s": round(small_s, 2),
        "old_largest_status": old_status,
    }


if __name__ == "__main__":
    main()
