"""Ray Train: `jobs/train.py` on a real local Ray cluster (2 CPUs) with tiny models: data-parallel
workers train exactly like one, the frozen base can be sharded (FSDP2 on gloo), a killed worker
is replaced and training resumes from the last checkpoint, reruns resume, clusters too small
fail before any work, and `ray job submit` runs the same command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_jobs import REPO, last_json, run_job

TINY = ["--method", "lora_diffusion", "--task", "sst2", "--train-limit", "64",
        "--eval-limit", "4", "--eval-steps", "4", "--batch-size", "8",
        "--set", "max_length=48", "--set", "adaptor.ranks=4", "--set", "forgetting_blocks=0",
        "--set", "scoring_num_t=1", "--set", "train.log_every=2", "--no-progress",
        "--no-tracking", "--threads", "1", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_model, tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):  # module-scoped here: one base for every run of this file
    import torch

    from lora_diffusion.models import DiffusionLM, preset_config

    torch.manual_seed(0)
    tok = tiny_tokenizer
    return DiffusionLM(preset_config("tiny", vocab_size=len(tok), mask_token_id=tok.mask_token_id))


def train(base, out, data_dir, *extra, check=True):
    proc = run_job("jobs/train.py", *TINY, "--base", base, "--output-dir", str(out),
                   "--data-dir", str(data_dir), *extra, check=check)  # fmt: skip
    return proc if not check else last_json(proc.stdout)


def losses(out) -> list[float]:
    return [h["loss"] for h in json.loads((Path(out) / "history.json").read_text())]


# Twelve steps at a rate (no warm-up) at which the tiny adaptor's loss visibly falls (6.18 ->
# 5.2): at the default rate and its 50-step warm-up the loss barely moves in 12 steps, and the
# runs compared below must be shown to learn, not only to agree.
TWELVE_STEPS = ("--max-steps", "12", "--lr", "1e-2", "--set", "train.warmup_steps=0")


@pytest.fixture(scope="module")
def one_worker(ray_cluster, base, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    return out, train(base, out, data_dir, *TWELVE_STEPS)


def test_two_ddp_workers_train_exactly_like_one(one_worker, base, data_dir, tmp_path):
    out1, r1 = one_worker
    r2 = train(base, tmp_path, data_dir, *TWELVE_STEPS, "--num-workers", "2")
    assert r1["steps"] == r2["steps"] == 12
    l1, l2 = losses(out1), losses(tmp_path)
    assert len(l1) == len(l2) == 7  # steps 1, 2, 4, ..., 12
    assert l1[-1] < l1[0] - 0.5
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)
    assert (tmp_path / "adaptor" / "adapter_model.safetensors").exists()


def test_fsdp_shards_the_frozen_base_and_trains_like_one_worker(
    one_worker, base, data_dir, tmp_path
):
    out1, r1 = one_worker
    r = train(base, tmp_path, data_dir, *TWELVE_STEPS, "--num-workers", "2",
              "--strategy", "fsdp")  # fmt: skip
    # every transformer block of the frozen base is split across the two workers
    assert r["frozen_params_local"] < r["frozen_params"]
    assert losses(tmp_path) == pytest.approx(losses(out1), rel=1e-4, abs=1e-5)
    assert r["eval_n"] == 4 and (tmp_path / "adaptor" / "adapter_config.json").exists()


def test_fsdp_is_refused_for_methods_that_train_the_base(ray_cluster, base, data_dir, tmp_path):
    proc = train(base, tmp_path, data_dir, "--method", "full", "--num-workers", "2",
                 "--strategy", "fsdp", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--strategy fsdp" in proc.stderr


def test_a_killed_worker_is_replaced_and_training_resumes_from_its_checkpoint(
    ray_cluster, base, data_dir, tmp_path
):
    pids = tmp_path / "pids"
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/train.py", *TINY, "--base", base, "--output-dir", str(out),
           "--data-dir", str(data_dir), "--max-steps", "200", "--checkpoint-every", "10",
           "--num-workers", "2", "--max-failures", "1"]  # fmt: skip
    env = {**os.environ, "LORA_DIFFUSION_PID_DIR": str(pids)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.time() + 300
        # two checkpoints on disk: the first is surely registered with Ray Train by then
        while len(list((out / "ray" / "train").glob("checkpoint_*/state/state.json"))) < 2:
            assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        victim = int(sorted(pids.glob("rank-1-*.pid"))[0].read_text())
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = last_json(stdout)
    assert result["steps"] == 200
    # resumed from a checkpoint of the first attempt, not from step 0
    assert 10 <= result["resumed_from_step"] < 200 and result["resumed_from_step"] % 10 == 0
    assert len(list(pids.glob("rank-1-*.pid"))) == 2  # a second rank-1 worker was started

    from lora_diffusion.adaptor_io import load_adaptor
    from lora_diffusion.models import load_base

    adaptor, _ = load_adaptor(out / "adaptor", load_base(base)[0])
    assert sum(p.numel() for p in adaptor.parameters()) == result["trainable_params"]


def test_a_rerun_resumes_and_restart_starts_over(ray_cluster, base, data_dir, tmp_path):
    first = train(base, tmp_path, data_dir, "--max-steps", "6", "--checkpoint-every", "3")
    assert first["resumed_from_step"] == 0
    again = train(base, tmp_path, data_dir, "--max-steps", "10")
    assert again["resumed_from_step"] == 6 and again["steps"] == 10
    fresh = train(base, tmp_path, data_dir, "--max-steps", "4", "--restart")
    assert fresh["resumed_from_step"] == 0 and fresh["steps"] == 4


def test_a_cluster_too_small_fails_before_any_work(ray_cluster, base, data_dir, tmp_path):
    out = tmp_path / "out"
    for flags, word in ((["--num-workers", "3"], "CPUs"), (["--use-gpu"], "GPUs")):
        proc = train(base, out, data_dir, *flags, check=False)
        assert proc.returncode == 2 and word in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_ray_job_submit_runs_the_same_command(ray_cluster, base, data_dir, tmp_path):
    ray = Path(sys.executable).with_name("ray")
    out = tmp_path / "out"
    for _ in range(4):  # a loaded machine: the job agent may not have registered yet
        proc = subprocess.run(
            [str(ray), "job", "submit", "--address", ray_cluster, "--working-dir", ".", "--",
             "python", "jobs/train.py", *TINY, "--base", base, "--output-dir", str(out),
             "--data-dir", str(data_dir), "--max-steps", "4"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr:
            break  # Ray's own message ends "please try again later"
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"method"')][-1])
    assert result["steps"] == 4
    assert (out / "adaptor" / "adapter_model.safetensors").exists()


def test_pretraining_on_two_workers_matches_one_process(ray_cluster, data_dir, tmp_path):
    args = ["jobs/pretrain.py", "--preset", "tiny", "--max-steps", "8", "--vocab-size", "400",
            "--max-documents", "100", "--batch-size", "8", "--heldout-blocks", "8",
            "--data-dir", str(data_dir), "--no-progress", "--no-tracking", "--threads", "1",
            "--json", "--set", "train.log_every=2"]  # fmt: skip
    local = last_json(run_job(*args, "--output-dir", str(tmp_path / "a"), "--no-ray").stdout)
    two = last_json(
        run_job(*args, "--output-dir", str(tmp_path / "b"), "--num-workers", "2").stdout
    )
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-4, abs=1e-5)
    assert two["heldout_loss"] == pytest.approx(local["heldout_loss"], rel=1e-4)
    assert (tmp_path / "b" / "model" / "model.safetensors").exists()
    assert (tmp_path / "b" / "model" / "tokenizer.json").read_text() == (
        tmp_path / "a" / "model" / "tokenizer.json"
    ).read_text()


def test_a_ray_run_prints_its_progress_once_and_no_library_internals(
    ray_cluster, base, data_dir, tmp_path
):
    # a cold cache: datasets hashes what it tokenises, the step where dill's disassembly leaked
    proc = train(base, tmp_path / "out", data_dir, "--max-steps", "50",
                 "--set", f"cache_dir={tmp_path / 'cache'}", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    screen = proc.stdout + proc.stderr
    assert screen.count("step 50: loss") == 1, screen[-3000:]
    for internal in ("LOAD_GLOBAL", "Reporting training result", "Checkpoint successfully"):
        assert internal not in screen, internal
