"""The real job CLIs on tiny settings, as users run them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py") if p.name != "common.py")


def run_job(*args, check=True):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("job", JOBS)
def test_every_job_documents_its_flags(job):
    out = run_job(f"jobs/{job}", "--help").stdout
    assert "--json" in out and "--data-dir" in out and "--seed" in out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("pretrain")
    proc = run_job(
        "jobs/pretrain.py", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "12",
        "--vocab-size", "400", "--max-documents", "200", "--batch-size", "8",
        "--heldout-blocks", "16", "--data-dir", str(data_dir), "--no-progress", "--json",
        "--set", "train.log_every=4",
    )  # fmt: skip
    return out, last_json(proc.stdout)


def test_pretrain_writes_a_loadable_model_and_reports(pretrained):
    out, result = pretrained
    for key in ("model_dir", "heldout_loss", "unigram_loss", "params", "seconds"):
        assert key in result
    assert result["steps"] == 12 and result["params"] > 0
    model_dir = Path(result["model_dir"])
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_loss"] == pytest.approx(result["heldout_loss"])
    assert len(json.loads((out / "history.json").read_text())) == 4  # steps 1, 4, 8, 12


def test_sample_job_prints_seeded_continuations(pretrained):
    _, result = pretrained
    args = ["jobs/sample.py", "--model", result["model_dir"], "--prompt", "The river",
            "--num-samples", "2", "--gen-length", "8", "--steps", "16", "--json"]  # fmt: skip
    a, b = last_json(run_job(*args).stdout), last_json(run_job(*args).stdout)
    assert a == b and len(a["samples"]) == 2
    assert a["network_calls"] + a["calls_saved"] == 16
    assert all(s["text"] and "[MASK]" not in s["text"] for s in a["samples"])


def test_bad_flags_fail_with_a_clear_message(tmp_path, data_dir):
    proc = run_job(
        "jobs/pretrain.py", "--output-dir", str(tmp_path), "--corpus-dir", str(tmp_path / "none"),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "corpus directory not found" in proc.stderr
    proc = run_job(
        "jobs/pretrain.py", "--output-dir", str(tmp_path), "--data-dir", str(data_dir),
        "--set", "train.bogus=1", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "train.bogus" in proc.stderr
    proc = run_job("jobs/sample.py", "--model", str(tmp_path / "missing"), "--prompt", "x",
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "error:" in proc.stderr
