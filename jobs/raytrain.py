"""Ray Train plumbing shared by the training jobs: flags, connecting to a cluster, the
TorchTrainer run, and the per-worker pieces (rank, DDP/FSDP, checkpoints through
`ray.train.report`). The library stays Ray-free: a worker hands it a `Distributed` and a
checkpoint hook.

How a run is laid out:
- checkpoints: STORAGE/NAME/checkpoint_* (STORAGE defaults to OUTPUT_DIR/ray, NAME to "train").
  Rerunning the same command resumes from the newest one; --restart starts over.
- the run's files (adaptor/, metrics.json, plots/, ...) are written by rank 0 into the final
  checkpoint and copied to OUTPUT_DIR by the driver, so the job works the same when the
  workers are on other machines (set --storage-path to shared or cloud storage there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jobs.common import QUIET_ENV, REPO, fail

# Ray settings this project needs on any machine (see ../shared/PLATFORM_NOTES.md); a user's
# own environment wins.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # else every report() costs ~2 s
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # Train V2 sends a worker's print() to its logger and, where stdout is wrapped, to stdout
    # as well: every progress line showed twice, and text that libraries capture from print
    # (dill's disassembly when datasets hashes a function) leaked to the screen
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
STATE_DIR = "state"  # inside a checkpoint: the training state (weights, optimizer, step)
OUTPUT_DIR = "output"  # inside the final checkpoint: the run's files for OUTPUT_DIR
STRATEGIES = ("ddp", "fsdp")


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Train")
    g.add_argument("--num-workers", type=int, default=1, help="training workers (data-parallel)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs per worker (default: the cluster's CPUs / workers, at least 1)",
    )
    g.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="ddp",
        help="ddp: every worker holds the base; fsdp: the frozen base is sharded across "
        "workers (FSDP2), the trainable parameters stay data-parallel",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, set by `ray job submit`; "
        "else a local Ray runtime is started)",
    )
    g.add_argument("--storage-path", default=None, help="checkpoints (default OUTPUT_DIR/ray)")
    g.add_argument("--run-name", default="train", help="Ray Train run name under the storage")
    g.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="restarts from the last checkpoint after a worker dies (-1: unlimited)",
    )
    g.add_argument("--restart", action="store_true", help="ignore earlier checkpoints of the run")
    g.add_argument(
        "--no-ray", action="store_true", help="run the loop in this process, without Ray (debug)"
    )


def check_flags(a) -> None:
    if a.num_workers < 1:
        fail(f"--num-workers must be >= 1, got {a.num_workers}")
    if a.cpus_per_worker is not None and a.cpus_per_worker <= 0:
        fail(f"--cpus-per-worker must be > 0, got {a.cpus_per_worker}")
    if a.no_ray and (a.num_workers > 1 or a.use_gpu or a.address):
        fail("--no-ray runs one process here: drop --num-workers/--use-gpu/--address")


def connect(a) -> dict:
    """Join or start Ray and check it can host the workers; exits 2 before any work if not.
    Returns the resources each worker gets."""
    for k, v in {**RAY_ENV, **QUIET_ENV}.items():
        os.environ.setdefault(k, v)
    import ray

    address = a.address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in (*RAY_ENV, *QUIET_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )  # workers import `jobs` and `lora_diffusion` from this checkout
    for k in (
        "LORA_DIFFUSION_DATA_DIR",
        "LORA_DIFFUSION_CACHE",
        "LORA_DIFFUSION_PID_DIR",
        "HF_HUB_OFFLINE",
        "HF_HOME",
    ):
        if os.environ.get(k):
            env[k] = os.environ[k]
    try:
        if not ray.is_initialized():
            ray.init(
                # "local": a new runtime, never a cluster some earlier `ray start` left behind
                address=address or "local",
                runtime_env={"env_vars": env},
                include_dashboard=False if address is None else None,
                log_to_driver=True,
                logging_level="WARNING",
            )
    except Exception as e:  # a wrong address, a cluster that does not answer
        fail(f"cannot connect to Ray at {address or 'a new local runtime'}: {e}")
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    per = a.cpus_per_worker or max(1.0, float(int(cpus // a.num_workers)))
    if per * a.num_workers > cpus:
        fail(
            f"the Ray cluster has {cpus:g} CPUs; {a.num_workers} workers x {per:g} CPUs "
            "do not fit (lower --num-workers or --cpus-per-worker, or add nodes)"
        )
    if a.use_gpu and gpus < a.num_workers:
        fail(
            f"the Ray cluster has {gpus:g} GPUs; --use-gpu with {a.num_workers} workers "
            "needs one each"
        )
    return {"CPU": per, **({"GPU": 1.0} if a.use_gpu else {})}


def storage(a) -> tuple[str, str]:
    """(absolute storage path, run name); --restart removes the run's earlier checkpoints."""
    path = a.storage_path or os.path.join(a.output_dir, "ray")
    if "://" not in path:
        path = os.path.abspath(path)  # Ray Train needs an absolute path or a URI
        if a.restart:
            shutil.rmtree(os.path.join(path, a.run_name), ignore_errors=True)
    return path, a.run_name


def absolute_paths(cfg, keys: tuple[str, ...]):
    """`cfg` with its local paths among `keys` made absolute: Ray workers do not share the
    driver's working directory."""
    import dataclasses

    paths = {
        k: os.path.abspath(getattr(cfg, k))
        for k in keys
        if getattr(cfg, k) and os.path.exists(getattr(cfg, k))
    }
    return dataclasses.replace(cfg, **paths)


def run(loop: Callable[[dict], None], config: dict, a, resources: dict) -> tuple[dict, Path]:
    """Run `loop` on the workers; copy the run's files to OUTPUT_DIR. Returns (the results:
    rank 0's final report merged with the metrics.json it wrote, lists included; OUTPUT_DIR).
    A run that fails after its restarts exits 1."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path, name = storage(a)
    config = {
        **config,
        "strategy": a.strategy,
        "use_gpu": a.use_gpu,
        "threads": a.threads or max(1, int(resources["CPU"])),
    }
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=a.num_workers, use_gpu=a.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            failure_config=FailureConfig(max_failures=a.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker group, checkpoints) go to its log files only
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        print(f"checkpoints, if any, are in {os.path.join(path, name)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        ray.shutdown()  # disconnect (a local runtime stops) before its monitors outlive the run
    out = Path(a.output_dir)
    with result.checkpoint.as_directory() as d:
        src = Path(d) / OUTPUT_DIR
        for item in src.iterdir():
            dst = out / item.name
            if dst.is_dir():
                shutil.rmtree(dst)
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst)
    metrics = out / "metrics.json"
    written = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return {**result.metrics, **written}, out


# ---- inside a worker ------------------------------------------------------------------------


def worker_context(config: dict):
    """This worker's `Distributed` (rank, DDP/FSDP wrapping, metric averaging, device)."""
    import ray.train
    import torch
    import torch.distributed as tdist
    from ray.train.torch import get_device

    from lora_diffusion.training import Distributed

    # Ray Train sets a worker's root logger to INFO, and logs each report there
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if config["use_gpu"] else torch.device("cpu")

    def all_reduce(metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        tdist.all_reduce(t)
        return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}

    def prepare(module):
        module = module.to(device)
        if world == 1:
            return module
        if config["strategy"] == "fsdp":
            return shard_frozen(module)
        from ray.train.torch import prepare_model

        # find_unused_parameters: a step-adaptive adaptor uses only the phases its batch's
        # t fall in.
        return prepare_model(
            module,
            move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": True},
        )

    return Distributed(
        rank=rank,
        world_size=world,
        prepare=prepare,
        all_reduce=all_reduce if world > 1 else None,
        device=str(device),
        sharded_base=world > 1 and config["strategy"] == "fsdp",
    )


SHARD_STATS: dict[str, int] = {}  # this worker's frozen parameters: in all, and held locally


def shard_frozen(module):
    """FSDP for a large frozen base: each frozen transformer block (a fully frozen element of
    an nn.ModuleList) is sharded across the workers with FSDP2 (`fully_shard`: gathered for its
    forward, freed after), while the trainable parameters stay whole on every worker and their
    gradients are averaged after each backward (plain data parallelism). Embeddings and the
    output head stay replicated."""
    import torch.distributed as tdist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    world = tdist.get_world_size()
    for blocks in [m for m in module.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            params = list(block.parameters())
            if params and not any(p.requires_grad for p in params):
                fully_shard(block, reshard_after_forward=True)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    SHARD_STATS.update(
        frozen_params=sum(p.numel() for p in frozen),  # DTensor.numel(): the global size
        frozen_params_local=sum(getattr(p, "_local_tensor", p).numel() for p in frozen),
    )

    def average(p):
        tdist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(average)
    return module


def checkpoint_hook(rank: int, keep: Path):
    """The library's checkpoint hook: rank 0 writes the training state (and keeps a copy in
    `keep` for the final checkpoint), every rank reports."""
    import ray.train
    from ray.train import Checkpoint

    def hook(step: int, save_into) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_into(Path(d) / STATE_DIR)
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(Path(d) / STATE_DIR, keep)
            ckpt = Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report({"step": step}, checkpoint=ckpt)

    return hook


def resume_dir(stage: str) -> str | None:
    """The training state of the checkpoint Ray restored (after a worker failure or a rerun of
    the same run), copied to a local folder; None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix=f"ld-{stage}-resume-"))
    with ckpt.as_directory() as d:
        if not (Path(d) / STATE_DIR).is_dir():
            raise FileNotFoundError(f"checkpoint {ckpt.path} holds no training state")
        shutil.copytree(Path(d) / STATE_DIR, local / STATE_DIR)
    return str(local / STATE_DIR)


def worker_loop(config: dict, stage: str, loop: Callable, printer: Callable, files=None) -> None:
    """A Ray Train worker's whole body (train, pretrain): this worker's context and pid file,
    the job's config on a local work folder (resumed from the checkpoint Ray restored, if any),
    `loop` (the library's `finetune` or `pretrain`) with tracking on rank 0 (`printer` wraps its
    report) and checkpoints through Ray, then every rank's last report. `files(work)` writes
    what the loop reads before it starts and returns the config fields that point to it."""
    from jobs.tracking import MlflowRun

    dist = worker_context(config)
    pid_file(config, dist.rank)
    work = Path(tempfile.mkdtemp(prefix=f"ld-{stage}-"))
    cfg = dataclasses.replace(
        config["cfg"],
        output_dir=str(work / "output"),
        resume_from=resume_dir(stage) or config["cfg"].resume_from,
        threads=None,
        **(files(work) if files else {}),
    )
    logger = MlflowRun.attach(config["tracking"] if dist.rank == 0 else None)
    result = loop(
        cfg,
        report=printer(logger.report),
        progress=config.get("progress", False),
        dist=dist,
        checkpoint_hook=checkpoint_hook(dist.rank, work / "state"),
    )
    result.update(SHARD_STATS)
    report_final(dist.rank, result, work / "output", work / "state")


def report_final(rank: int, result: dict, out_dir: Path, state_dir: Path | None) -> None:
    """Every rank's last report: rank 0 attaches the run's files (and the final state)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            shutil.copytree(out_dir, Path(d) / OUTPUT_DIR)
            if state_dir is not None and state_dir.is_dir():
                shutil.copytree(state_dir, Path(d) / STATE_DIR)
            ckpt = Checkpoint.from_directory(d)
        scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool)}
        ray.train.report(scalars, checkpoint=ckpt)


def pid_file(config: dict, rank: int) -> None:
    """With $LORA_DIFFUSION_PID_DIR set, each worker records its PID (rank-<r>-<time>.pid):
    operators and the fault-tolerance test use it to find a worker process."""
    folder = os.environ.get("LORA_DIFFUSION_PID_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank-{rank}-{time.time_ns()}.pid").write_text(str(os.getpid()))
