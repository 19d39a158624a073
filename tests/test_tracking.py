"""MLflow tracking and the registry through the real job CLIs, on a real store (SQLite in a tmp
folder, and one real `mlflow server`), with tiny models."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

mlflow = pytest.importorskip("mlflow")
pd = pytest.importorskip("pandas")

from jobs.tracking import MlflowRun, load_registered_adaptor  # noqa: E402
from tests.test_jobs import last_json, run_job  # noqa: E402

TINY_TRAIN = ["--method", "lora_diffusion", "--task", "sst2", "--max-steps", "6",
              "--train-limit", "32", "--eval-limit", "8", "--batch-size", "8",
              "--set", "max_length=64", "--set", "adaptor.ranks=4",
              "--set", "forgetting_blocks=0", "--set", "scoring_num_t=2",
              "--set", "train.log_every=2", "--no-progress", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store in a tmp folder; this process points at it too."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="module")
def base(store, tmp_path_factory, data_dir, ray_cluster):
    """A tiny pretrained base, registered as `tiny-base` (so adaptors record it as lineage)."""
    out = tmp_path_factory.mktemp("pretrain")
    proc = run_job(
        "jobs/pretrain.py", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "4",
        "--vocab-size", "400", "--max-documents", "100", "--batch-size", "8",
        "--heldout-blocks", "8", "--data-dir", str(data_dir), "--no-progress", "--json",
        "--tracking-uri", store, "--register-base", "tiny-base", "--no-ray",
    )  # fmt: skip
    return last_json(proc.stdout)


@pytest.fixture(scope="module")
def tracked(store, base, tmp_path_factory, data_dir, ray_cluster):
    out = tmp_path_factory.mktemp("train")
    proc = run_job(
        "jobs/train.py", *TINY_TRAIN, "--base", base["model_dir"], "--output-dir", str(out),
        "--data-dir", str(data_dir), "--tracking-uri", store,
        "--register", "sst2-ld", "--alias", "production",
    )  # fmt: skip
    return out, last_json(proc.stdout)


def test_pretrain_registers_the_base_with_its_fingerprint(base):
    assert base["registered_model"] == "tiny-base" and base["mlflow_run_id"]
    v = mlflow.MlflowClient().get_model_version("tiny-base", str(base["registered_version"]))
    assert v.tags["kind"] == "base" and len(v.tags["base_fingerprint"]) == 16


def test_train_run_logs_config_curves_files_and_a_registered_version(tracked):
    out, result = tracked
    client = mlflow.MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "lora-diffusion/sst2"
    assert run.info.run_name == "lora_diffusion-sst2-r4-k2-lr0.001"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["adaptor.k"] == "2"
    assert run.data.tags["workers"] == "1" and run.data.tags["torch_version"]
    history = json.loads((out / "history.json").read_text())
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [h["step"] for h in history] == [1, 2, 4, 6]
    assert run.data.metrics["eval_accuracy"] == result["eval_accuracy"]
    assert {"reg_rank", "reg_orth", "lr", "nll"} <= set(run.data.metrics)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.json", "config.json", "adaptor_report.json"} <= files
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/train_curves.png", "plots/effective_rank.png"}
    v = client.get_model_version_by_alias("sst2-ld", "production")
    assert int(v.version) == result["registered_version"]
    assert v.tags["task"] == "sst2" and v.tags["method"] == "lora_diffusion"
    config = json.loads((Path(result["adaptor_dir"]) / "adapter_config.json").read_text())
    assert v.tags["base_fingerprint"] == config["base_fingerprint"]
    assert (v.tags["base_name"], v.tags["base_version"]) == ("tiny-base", "1")
    assert float(v.tags["eval_accuracy"]) == result["eval_accuracy"]


def test_registered_adaptor_loads_and_reproduces_the_jobs_accuracy(tracked, data_dir):
    import dataclasses

    from lora_diffusion.corruption import get_process
    from lora_diffusion.finetune import FinetuneConfig, evaluate_all
    from lora_diffusion.schedules import get_schedule

    _, result = tracked
    model, tok = load_registered_adaptor("models:/sst2-ld@production")
    assert type(model).__name__ == "AdaptedDenoiser"
    cfg = FinetuneConfig(
        base="",
        output_dir="",
        task="sst2",
        data_dir=str(data_dir),
        eval_limit=8,
        max_length=64,
        scoring_num_t=2,
        forgetting_blocks=0,
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=0))
    process = get_process("absorbing", len(tok), tok.mask_token_id)
    again = evaluate_all(cfg, model, model.base, tok, process, get_schedule("loglinear"))
    assert again["eval_accuracy"] == result["eval_accuracy"]
    assert again["eval_accuracy_scoring"] == result["eval_accuracy_scoring"]


def test_pyfunc_model_predicts_label_words(tracked):
    model = mlflow.pyfunc.load_model("models:/sst2-ld@production")
    texts = ["a gripping, funny film", "dull and far too long", "fine"]
    words = model.predict(pd.DataFrame({"text": texts, "task": ["sst2"] * 3}))
    assert len(words) == 3 and all(isinstance(w, str) for w in words)
    with pytest.raises(ValueError, match="sst2"):
        model.predict(pd.DataFrame({"text": ["x"], "task": ["cola"]}))


def test_register_job_promotes_a_run_moves_an_alias_and_lists(tracked, store, capsys):
    from jobs import register

    _, result = tracked
    args = ["--tracking-uri", store, "--json"]
    new = last_json(run_job("jobs/register.py", *args, "--run-id", result["mlflow_run_id"],
                            "--alias", "production").stdout)  # fmt: skip
    assert new["name"] == "sst2-ld" and new["version"] == result["registered_version"] + 1
    register.main([*args, "--name", "sst2-ld", "--version", str(new["version"] - 1),
                   "--alias", "prod2"])  # fmt: skip
    register.main([*args, "--list", "sst2-ld"])
    out = capsys.readouterr().out
    assert f"sst2-ld v{new['version']} aliases=production" in out
    listed = last_json(out)
    aliases = {v["version"]: v["aliases"] for v in listed["versions"]}
    assert aliases == {new["version"] - 1: ["prod2"], new["version"]: ["production"]}
    assert listed["versions"][-1]["tags"]["base_name"] == "tiny-base"


def test_a_logging_failure_mid_run_warns_once_and_keeps_the_results(tmp_path, monkeypatch, capsys):
    run = MlflowRun.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", "r")
    run.out_dir = "/runs/x"
    run.report(1, {"loss": 2.0})
    calls = []

    def down(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("server went away")

    monkeypatch.setattr(run.client, "log_batch", down)
    run.report(2, {"loss": 1.0})
    run.report(3, {"loss": 0.5})
    run.log_params({"a": 1})
    err = capsys.readouterr().err
    assert err.count("warning: MLflow logging stopped") == 1 and "/runs/x" in err
    assert len(calls) == 1
    assert "server went away" in run.outcome()["tracking_error"]
    monkeypatch.undo()
    run.end()  # the run still ends, and what was logged before the failure is kept
    done = mlflow.MlflowClient(run.uri).get_run(run.run_id)
    assert done.info.status == "FINISHED" and done.data.metrics == {"loss": 2.0}


def test_a_run_with_tracking_off_takes_every_call_and_logs_nothing(tmp_path):
    run = MlflowRun()  # --no-tracking, or a worker other than rank 0
    run.log_params({"a": 1})
    run.set_tags({"b": "c"})
    run.report(1, {"loss": 1.0})
    run.log_artifact(tmp_path)
    run.log_run_files({"steps": 1, "loss": 1.0}, tmp_path)
    run.end()
    assert not run.active and run.spec() is None and run.outcome() == {}
    assert MlflowRun.attach(None).spec() is None


def test_numbers_of_a_result_become_metrics_and_nothing_else():
    from jobs.tracking import metrics_of

    got = metrics_of({"acc": 1, "loss": 0.5, "ok": True, "name": "x", "nested": {"a": 1}})
    assert got == {"acc": 1.0, "loss": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_before_training(base, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    proc = run_job("jobs/train.py", "--base", base["model_dir"], "--output-dir",
                   str(tmp_path / "out"), "--tracking-uri", uri, check=False)  # fmt: skip
    assert proc.returncode == 2 and "error:" in proc.stderr and uri in proc.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 20


def test_train_run_logs_to_a_real_mlflow_server(base, tmp_path, data_dir, ray_cluster):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        result = last_json(run_job(
            "jobs/train.py", *TINY_TRAIN, "--base", base["model_dir"], "--data-dir",
            str(data_dir), "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri,
        ).stdout)  # fmt: skip
        client = mlflow.MlflowClient(uri)
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
        assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "registered_version" not in result  # no --register: logged, not registered
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker, by our PID
        server.wait(timeout=30)


def test_relative_store_paths_are_made_absolute_where_they_are_given(tmp_path, monkeypatch):
    from jobs.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert tracking_uri("mlruns") == str(tmp_path.resolve() / "mlruns")
    assert tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    for unchanged in (
        "sqlite:////abs/x.db",
        "http://127.0.0.1:5000",
        "databricks",
        "postgresql://u@h/db",
        "file:///abs/mlruns",
    ):
        assert tracking_uri(unchanged) == unchanged
