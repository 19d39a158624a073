"""`jobs/sweep.py`: Ray Tune sweeps on a real local Ray cluster and a SQLite MLflow store, tiny
base: a 2-trial sweep logs nested runs and registers the best; ASHA stops a bad trial early;
an interrupted sweep resumes; bad spaces fail before any trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_jobs import REPO, last_json, run_job

mlflow = pytest.importorskip("mlflow")

TINY = ["--task", "sst2", "--train-limit", "64", "--eval-limit", "8", "--batch-size", "8",
        "--set", "max_length=48", "--set", "forgetting_blocks=0", "--set", "scoring_num_t=1",
        "--set", "train.warmup_steps=1", "--set", "eval_steps=4", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_tokenizer, tmp_path_factory):
    import torch

    from lora_diffusion.models import DiffusionLM, preset_config

    torch.manual_seed(0)
    tok = tiny_tokenizer
    model = DiffusionLM(preset_config("tiny", vocab_size=len(tok), mask_token_id=tok.mask_token_id))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def space(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def sweep(base, data_dir, *extra, check=True):
    return run_job("jobs/sweep.py", *TINY, "--base", base, "--data-dir", str(data_dir), *extra,
                   check=check)  # fmt: skip


def test_bad_spaces_fail_before_any_trial_naming_the_key(base, data_dir, tmp_path, capsys):
    # the job: exit 2, the key named, no trial started
    path = space(tmp_path, "params:\n  adaptor.bogus:\n    grid: [1, 2]\n")
    proc = sweep(base, data_dir, "--space", path, "--output-dir", str(tmp_path / "o"),
                 "--no-tracking", check=False)  # fmt: skip
    assert proc.returncode == 2 and "adaptor.bogus" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "o" / "tune").exists()  # no trial ever started
    # every other kind of mistake, through the same check the job runs before any trial
    from jobs.sweep import load_space, validate_space
    from lora_diffusion.finetune import FinetuneConfig

    cfg = FinetuneConfig(base=base, output_dir=str(tmp_path))
    cases = {
        "adaptor.k:\n    choice: []": "adaptor.k",
        "adaptor.ranks:\n    grid: [[8], [512]]": "rank 512",
        "adaptor.ranks:\n    grid: [[8, 8]]": "2 ranks need 2 sigmas",
        "train.lr:\n    loguniform: [0, 1]": "train.lr",
        "adaptor.k:\n    gird: [1, 2]": "adaptor.k",
    }
    for body, named in cases.items():
        with pytest.raises(SystemExit) as exit_:
            validate_space(load_space(space(tmp_path, f"params:\n  {body}\n")), cfg, 64)
        assert exit_.value.code == 2 and named in capsys.readouterr().err, body


def test_a_grace_period_past_the_step_budget_fails_or_clamps_before_ray_starts(
    base, data_dir, tmp_path, capsys
):
    # --max-steps 8 with the default --eval-every 50 made ASHA assert inside Ray
    # (`grace_period must be <= max_t!`): the default grace period (2 x eval-every) is clamped
    from jobs.sweep import asha_grace_period

    assert asha_grace_period(None, 50, 8) == 8
    assert asha_grace_period(None, 4, 16) == 8 and asha_grace_period(3, 50, 8) == 3
    with pytest.raises(SystemExit) as exit_:
        asha_grace_period(20, 4, 8)
    assert exit_.value.code == 2 and "--grace-period 20" in capsys.readouterr().err
    # an explicit one past the budget: the job exits 2 with one line, no trial started
    path = space(tmp_path, "params:\n  train.lr:\n    grid: [0.01]\n")
    proc = sweep(base, data_dir, "--space", path, "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "8", "--grace-period", "20", "--no-tracking",
                 check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines() == [
        "error: --grace-period 20 is past the step budget (train.max_steps 8): give a smaller "
        "one, or more steps"
    ]
    assert not (tmp_path / "o" / "tune").exists()


def test_every_shipped_space_is_valid(base, data_dir, tmp_path):
    from jobs.sweep import load_space, validate_space
    from lora_diffusion.finetune import FinetuneConfig

    cfg = FinetuneConfig(base=base, output_dir=str(tmp_path))
    spaces = sorted((REPO / "tune_spaces").glob("*.yaml"))
    assert {p.stem for p in spaces} >= {"table10_ranks", "table11_k", "broad"}
    for p in spaces:
        validate_space(load_space(str(p)), cfg, hidden_size=256)  # the small base's d


def test_a_two_trial_sweep_logs_nested_runs_and_registers_the_best(
    ray_cluster, base, data_dir, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = space(
        tmp_path, "params:\n  adaptor.k:\n    grid: [1, 2]\nfixed:\n  adaptor.ranks: [4]\n"
    )
    out = tmp_path / "out"
    # the store and the data named relative to the job's cwd (the repo), as `make experiments`
    # does: Tune runs trials in their own working directories, where a relative path would
    # name another, empty store and the trials' runs would be lost to this one
    rel = os.path.relpath(tmp_path / "mlflow.db", REPO)
    result = last_json(sweep(
        base, os.path.relpath(data_dir, REPO), "--space", path, "--output-dir", str(out),
        "--max-steps", "8", "--eval-every", "4", "--tracking-uri", f"sqlite:///{rel}",
        "--register", "tiny-sst2", "--name", "ks", "--scheduler", "none",
    ).stdout)  # fmt: skip
    assert result["trials"] == 2 and result["finished"] == 2
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and {c.data.params["adaptor.k"] for c in children} == {"1", "2"}
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(
        len(client.get_metric_history(c.info.run_id, "eval_gold_loss")) >= 2 for c in children
    )
    version = client.get_model_version_by_alias("tiny-sst2", "best-ks")
    assert version.tags["sweep"] == "ks" and version.run_id in {c.info.run_id for c in children}
    table = (out / "table.md").read_text()
    assert "adaptor.k=1" in table and "adaptor.k=2" in table and "trainable (M)" in table
    assert (out / "score_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert {"table.md", "score_vs_params.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }


def test_asha_stops_a_bad_trial_early(ray_cluster, base, data_dir, tmp_path):
    # lr 1e-12 cannot move the gold label's loss; the good trial runs first (grid order, one
    # at a time), so at the first rung the bad one trails and is stopped. Trials report on
    # held-out train rows (--holdout): ASHA reads val_gold_loss, the score is val_accuracy_scoring
    path = space(
        tmp_path, "params:\n  train.lr:\n    grid: [0.01, 1.0e-12]\nfixed:\n  adaptor.ranks: [4]\n"
    )
    out = tmp_path / "out"
    result = last_json(sweep(
        base, data_dir, "--space", path, "--output-dir", str(out), "--max-steps", "16",
        "--eval-every", "4", "--grace-period", "4", "--max-concurrent", "1", "--no-tracking",
        "--holdout", "16",
    ).stdout)  # fmt: skip
    rows = {r["params"]["train.lr"]: r for r in json.loads((out / "trials.json").read_text())}
    assert rows[0.01]["finished"] and rows[0.01]["steps"] == 16
    assert not rows[1e-12]["finished"] and rows[1e-12]["steps"] < 16
    table = (out / "table.md").read_text()
    assert result["stopped_early"] == 1 and "stopped (ASHA)" in table
    assert result["metric"] == "val_accuracy_scoring" and "on 16 held-out train rows" in table
    assert rows[0.01]["gold_loss"] < rows[1e-12]["gold_loss"]  # the val_gold_loss ASHA read


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster, base, data_dir, tmp_path
):
    path = space(
        tmp_path, "params:\n  adaptor.k:\n    grid: [1, 2, 3]\nfixed:\n  adaptor.ranks: [4]\n"
    )
    out = tmp_path / "out"
    args = ["jobs/sweep.py", *TINY, "--base", base, "--data-dir", str(data_dir), "--space", path,
            "--output-dir", str(out), "--max-steps", "40", "--eval-every", "20",
            "--max-concurrent", "1", "--no-tracking", "--scheduler", "none"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while not list((out / "trials").glob("*/metrics.json")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        time.sleep(2)  # the first trial's final report reaches Tune's experiment state
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {p.parent.name: p.stat().st_mtime for p in (out / "trials").glob("*/metrics.json")}
    assert 1 <= len(first) < 3
    result = last_json(run_job(*args).stdout)
    assert result["trials"] == 3 and result["finished"] == 3
    for name, mtime in first.items():  # finished trials were kept, not trained again
        assert (out / "trials" / name / "metrics.json").stat().st_mtime == mtime
    assert len(list((out / "trials").glob("*/metrics.json"))) == 3
    assert Path(out / "table.md").is_file()


def test_the_space_metric_ranks_trials_on_the_split_they_report():
    from jobs.sweep import space_metric

    assert space_metric({}, 0) == "eval_accuracy_scoring"
    assert space_metric({"metric": "eval_gold_loss"}, 0) == "eval_gold_loss"
    assert space_metric({"metric": "eval_gold_loss"}, 100) == "val_gold_loss"
    assert space_metric({}, 100) == "val_accuracy_scoring"
    assert space_metric({"metric": "train_loss"}, 100) == "train_loss"
