"""`jobs/experiments.py`: the experiment set at a tiny scale, end to end into MLflow and the
report; a rerun skips what is done; bad stages are refused."""

import json
import shlex

import pytest

from tests.test_jobs import REPO

mlflow = pytest.importorskip("mlflow")

TINY = ["--quick", "--methods", "lora_diffusion,bitfit", "--seeds", "0,1", "--max-steps", "3",
        "--eval-limit", "4", "--data-sizes", "16,32", "--data-methods", "lora_diffusion",
        "--tasks", "sst2,trec", "--tsne-per-task", "6", "--batch-size", "4", "--threads", "1",
        "--set", "max_length=48", "--set", "forgetting_blocks=0", "--set", "scoring_num_t=1",
        "--set", "train.warmup_steps=1", "--set", "eval_steps=4"]  # fmt: skip


@pytest.fixture(scope="module")
def done(tiny_tokenizer, data_dir, tmp_path_factory, tracking_store):
    import torch

    from jobs import experiments
    from lora_diffusion.models import DiffusionLM, preset_config

    torch.manual_seed(0)
    tok = tiny_tokenizer
    base, narrow = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("narrow")
    for folder, width in ((base, 64), (narrow, 32)):  # two base sizes for the bases stage
        cfg = preset_config(
            "tiny", hidden_size=width, vocab_size=len(tok), mask_token_id=tok.mask_token_id
        )
        DiffusionLM(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    root = tmp_path_factory.mktemp("experiments")
    uri = tracking_store  # the session's store: in-process jobs must not move other tests' URI
    argv = [*TINY, "--base", str(base), "--output-dir", str(root / "runs"), "--report-dir",
            str(root / "docs"), "--tracking-uri", uri, "--data-dir", str(data_dir),
            "--bases", str(narrow), "--base-methods", "lora_diffusion",
            "--stages", "methods,data_size,tasks,bases,report", "--json"]  # fmt: skip
    result = experiments.main(argv)
    return {"argv": argv, "root": root, "uri": uri, "result": result, "bases": (base, narrow)}


def test_every_stage_lands_in_mlflow_and_in_the_report(done):
    result, root = done["result"], done["root"]
    assert result["failed"] == 0, result["jobs"]
    labels = [j["job"] for j in result["jobs"]]
    # 2 methods x 2 seeds, 2 sizes x 1 method, 2 tasks + merge + router + t-SNE, 2 bases, report
    assert len(labels) == 4 + 2 + 5 + 2 + 1 and labels[-1] == "report", labels
    runs = mlflow.MlflowClient(done["uri"]).search_runs(
        [
            mlflow.MlflowClient(done["uri"])
            .get_experiment_by_name("lora-diffusion/paper")
            .experiment_id
        ],
        max_results=200,
    )
    studies = sorted(r.data.tags.get("study", r.data.tags.get("kind")) for r in runs)
    assert studies.count("methods") == 4 and studies.count("data_size") == 2
    assert studies.count("bases") == 2
    assert {r.data.tags.get("kind") for r in runs} >= {"compose", "multitask", "analysis", "report"}

    text = (root / "docs" / "RESULTS.md").read_text()
    made_by = text.split("Runs made by `", 1)[1].split("`", 1)[0]
    assert made_by == "python jobs/experiments.py " + shlex.join(done["argv"])
    assert "## Against the paper" in text
    methods = text.split("## Method comparison")[1].split("## ")[0]
    assert "| sst2 | lora_diffusion | 2 | 0, 1 |" in methods and "| sst2 | bitfit | 2 |" in methods
    assert "| trec |" not in methods  # the tasks stage's runs stay out of the method tables
    sizes = text.split("## Accuracy against training-set size")[1].split("## ")[0]
    assert "| lora_diffusion | 16 | 1 |" in sizes and "| lora_diffusion | 32 | 1 |" in sizes
    ranks = text.split("## Effective rank by phase")[1].split("## ")[0]
    assert "| sst2 | 0 | 64 | 1 | 4 |" in ranks  # 2 modules x 2 runs in the earliest phase
    sizes12 = text.split("## Across base sizes (Table 12)")[1].split("## ")[0]
    rows = [ln for ln in sizes12.splitlines() if ln.startswith("| /")]
    assert [ln.split(" | ")[0][2:] for ln in rows] == [str(done["bases"][1]), str(done["bases"][0])]
    small, large = (int(ln.split(" | ")[1].replace(",", "")) for ln in rows)
    assert small < large  # ordered by the base's size, read back from the runs
    multi = text.split("## Multi-task composition")[1]
    assert "Zero-shot merge" in multi and "| trec |" in multi and "silhouette" in multi
    for fig in (
        "loss_curves",
        "effective_rank_by_phase",
        "accuracy_vs_data_size",
        "perturbations_tsne",
    ):
        assert (root / "docs" / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    tsne = json.loads((root / "runs" / "tasks" / "tsne.json").read_text())
    assert tsne["points"] == 2 * 6 * 3 and -1 <= tsne["silhouette"] <= 1  # 2 tasks, 6 ex., 3 t


def test_a_rerun_skips_finished_jobs_and_logs_nothing_new(done):
    from jobs import experiments

    client = mlflow.MlflowClient(done["uri"])
    exp = client.get_experiment_by_name("lora-diffusion/paper").experiment_id
    before = len(client.search_runs([exp], max_results=500))
    argv = [
        a if a != "methods,data_size,tasks,bases,report" else "methods,data_size,tasks,bases"
        for a in done["argv"]
    ]
    again = experiments.main(argv)
    assert [j["status"] for j in again["jobs"]] == ["skipped"] * 13
    assert len(client.search_runs([exp], max_results=500)) == before


def test_the_ablations_stage_lands_every_trial_in_the_relative_store_it_was_given(
    tiny_base_dir, data_dir, tmp_path
):
    """As `make experiments` calls it: store, output and report named relative to the cwd, the
    sweeps run through Ray Tune in a subprocess (Tune moves each trial into its own folder)."""
    import os

    from tests.test_jobs import last_json, run_job

    rel = os.path.relpath(tmp_path, REPO)
    uri = f"sqlite:///{rel}/mlflow.db"
    proc = run_job("jobs/experiments.py", *TINY, "--base", str(tiny_base_dir), "--output-dir",
                   f"{rel}/runs", "--report-dir", f"{rel}/docs", "--tracking-uri", uri,
                   "--data-dir", os.path.relpath(data_dir, REPO), "--spaces", "table11_k",
                   "--stages", "ablations,report", "--json")  # fmt: skip
    result = last_json(proc.stdout)
    assert result["failed"] == 0 and [j["job"] for j in result["jobs"]] == [
        "ablations: table11_k",
        "report",
    ]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lora-diffusion/paper").experiment_id
    trials = client.search_runs([exp], "tags.mlflow.parentRunId != ''")
    assert len(trials) == 4 and {t.data.params["adaptor.k"] for t in trials} == {"1", "2", "4", "8"}
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    sweeps = text.split("## Sweeps")[1].split("\n## ")[0]
    assert "### Sweep `table11_k`" in sweeps and sweeps.count("| finished |") == 4, sweeps
    table = (tmp_path / "runs" / "ablations" / "table11_k" / "table.md").read_text()
    command = table.split("Command: `", 1)[1].split("`", 1)[0]  # the sweep's, not the caller's
    assert command.startswith("python jobs/sweep.py ") and "--space " in command
    assert f"--tracking-uri {uri} " in command and "--tag study=ablations" in command
    assert result["jobs"][0]["command"] == command  # each job's record: the command that reruns it
    rebuild = "Rebuild: `python jobs/report.py --experiment lora-diffusion/paper --tracking-uri "
    rebuild += f"{uri} "
    assert rebuild in text  # as it was given: the report's commands name no machine's paths


def test_unknown_stage_is_refused(capsys):
    from jobs import experiments

    with pytest.raises(SystemExit) as e:
        experiments.parse_args(["--base", "x", "--stages", "methods,tables"])
    assert e.value.code == 2 and "tables" in capsys.readouterr().err
