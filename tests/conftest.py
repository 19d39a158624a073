"""Shared fixtures: tiny seeded models and tokenizers built in-repo (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LORA_DIFFUSION_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"test data not found at {DATA_DIR} (set LORA_DIFFUSION_DATA_DIR)"
    return DATA_DIR


@pytest.fixture(scope="session")
def corpus_lines(data_dir) -> list[str]:
    with open(data_dir / "corpus" / "enwiki_09.txt", encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(400), f, strict=False) if line.strip()]


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_lines):
    from lora_diffusion.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_lines, vocab_size=512)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from lora_diffusion.models import DiffusionLM, preset_config

    torch.manual_seed(0)
    tok = tiny_tokenizer
    cfg = preset_config("tiny", vocab_size=len(tok), mask_token_id=tok.mask_token_id)
    return DiffusionLM(cfg).eval()


@pytest.fixture()
def tiny_base_dir(tiny_model, tiny_tokenizer, tmp_path) -> Path:
    """The tiny model and tokenizer saved as a base folder, as `load_base` reads it."""
    path = tmp_path / "base"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory) -> str:
    """Jobs track to MLflow by default (SQLite in the cwd): point every job the tests run at a
    tmp store instead, so test runs leave no mlflow.db or mlartifacts/ in the repo."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (`ray start --head --block`, 2 CPUs, dashboard and job server on
    127.0.0.1) for the whole session. Jobs the tests run join it through $RAY_ADDRESS, as
    `ray job submit` jobs do. Yields the dashboard (job submission) address. Stopped by
    signalling its own process group, never `ray stop` (which would end every Ray cluster on
    the machine)."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from jobs.raytrain import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    ray = Path(sys.executable).with_name("ray")
    # token auth needs a token before `ray start`; only ray.init makes one by itself, so on a
    # fresh machine a session whose first Ray use is this cluster would fail to start it
    subprocess.run([str(ray), "get-auth-token", "--generate"], check=True, capture_output=True)
    port, dash = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--disable-usage-stats"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # ready when the job server answers (401 too: token auth is on)
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            assert head.poll() is None and time.time() < deadline, "ray start --head failed"
            time.sleep(0.5)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        os.killpg(head.pid, signal.SIGTERM)  # --block: ray start stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
