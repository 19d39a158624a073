"""`jobs/report.py`: RESULTS.md and figures from a real SQLite MLflow store holding runs logged
the way jobs/train.py and jobs/sweep.py log them (no training): the computed means, stds, n and
relative-to-full column, the sweep table, the figures, the `report` run, and clear errors."""

import itertools
import json
import statistics
import subprocess
import sys

import pytest

from tests.test_jobs import REPO

mlflow = pytest.importorskip("mlflow")

from jobs.report import main  # noqa: E402

EXP = "lora-diffusion/sst2"
# (method, seed) -> final metrics, as Tracker.log_run_files logs them
TRAINING = {
    ("lora_diffusion", 0): {
        "eval_accuracy": 0.80,
        "eval_accuracy_scoring": 0.86,
        "train_peak_mb": 900,
        "eval_auc_scoring": 0.91,
    },
    ("lora_diffusion", 1): {
        "eval_accuracy": 0.84,
        "eval_accuracy_scoring": 0.88,
        "train_peak_mb": 940,
        "eval_auc_scoring": 0.93,
    },
    # `peak_mb` is a process-wide high-water mark older runs logged: not a run's own peak
    ("weight_lora", 0): {"eval_accuracy": 0.78, "eval_accuracy_scoring": 0.82, "peak_mb": 1500},
    ("weight_lora", 1): {"eval_accuracy": 0.80, "eval_accuracy_scoring": 0.85},
    ("full", 0): {"eval_accuracy": 0.85, "eval_accuracy_scoring": 0.90, "train_peak_mb": 3000},
    ("full", 1): {"eval_accuracy": 0.87, "eval_accuracy_scoring": 0.89, "train_peak_mb": 3200},
}
TRAINABLE = {"lora_diffusion": 120_000, "weight_lora": 90_000, "full": 4_000_000}
SWEEP = [  # (adaptor.k, score, status)
    (4, 0.81, "FINISHED"),
    (1, 0.70, "KILLED"),
    (2, 0.77, "FINISHED"),
]


def losses(method: str, seed: int) -> list[float]:
    start = 3.0 + seed
    return [start, start * 0.7, start * 0.5 - 0.1 * len(method)]


def log_run(client, exp_id, name, tags, params, metrics, history=(), status="FINISHED") -> str:
    from mlflow.entities import Metric, Param

    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    steps = [Metric("loss", v, 0, 10 * i) for i, v in enumerate(history)]
    final = [Metric(k, float(v), 0, int(metrics.get("steps", 0))) for k, v in metrics.items()]
    params = [Param(k, str(v)) for k, v in params.items()]
    client.log_batch(run_id, metrics=steps + final, params=params)
    client.set_terminated(run_id, status)
    return run_id


def fill_store(uri: str, root) -> dict:
    """Training runs (3 methods x 2 seeds), runs the tables must skip, and a 3-trial sweep."""
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(EXP, (root / "artifacts").as_uri())
    pre = client.create_experiment("lora-diffusion/pretrain", (root / "pre").as_uri())
    for (method, seed), m in TRAINING.items():
        hist = losses(method, seed)
        metrics = {
            **m,
            "train_loss": hist[-1],
            "trainable_params": TRAINABLE[method],
            "trainable_pct": TRAINABLE[method] / 4e4,
            "storage_mb": 4e-6 * TRAINABLE[method],
            "storage_mb_bf16": 2e-6 * TRAINABLE[method],
            "steps": 20,
            "train_seconds": 30,
            "convergence_step": 10,
            "forgetting": 0.01 * (seed + 1),
        }
        log_run(
            client,
            exp,
            f"{method}-sst2-lr0.001",
            {"task": "sst2", "method": method, "base_fingerprint": "abc"},
            {"task": "sst2", "method": method, "train.seed": seed, "train.lr": 1e-3},
            metrics,
            hist,
        )
    bad = {"eval_accuracy": 0.10, "eval_accuracy_scoring": 0.10}  # would move every mean
    log_run(
        client,
        exp,
        "failed",
        {"task": "sst2", "method": "full"},
        {"train.seed": 2},
        bad,
        status="FAILED",
    )
    log_run(client, pre, "base-tiny", {"kind": "base", "preset": "tiny"}, {"seed": 0}, bad)
    parent = log_run(
        client,
        exp,
        "sweep-ranks",
        {"kind": "sweep", "sweep": "ranks"},
        {"task": "sst2", "method": "lora_diffusion", "space": "{}"},
        {},
        status="RUNNING",
    )
    for i, (k, score, status) in enumerate(SWEEP):
        tags = {
            "mlflow.parentRunId": parent,
            "sweep": "ranks",
            "task": "sst2",
            "method": "lora_diffusion",
        }
        params = {
            "adaptor.k": k,
            "sweep.adaptor.k": json.dumps(k),
            "train.seed": 0,
            "output_dir": f"/runs/trials/t{i}",
            "train.lr": 2e-3,
        }
        metrics = {
            "eval_accuracy_scoring": score,
            "eval_gold_loss": 1 - score,
            "trainable_params": 1000 * k,
            "eval_accuracy": 0.0,
        }
        log_run(client, exp, f"ranks-t{i}", tags, params, metrics, [2.0, 1.0], status=status)
    client.set_terminated(parent, "FINISHED")
    return {"client": client, "exp": exp}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    store = fill_store(uri, root)
    out = root / "docs"
    argv = ["--experiment", EXP, "--experiment", "lora-diffusion/pretrain", "--tracking-uri",
            uri, "--output-dir", str(out)]  # fmt: skip
    result = main(argv)
    return {**store, "uri": uri, "out": out, "argv": argv, "result": result,
            "md": (out / "RESULTS.md").read_text()}  # fmt: skip


def table(md: str, title: str) -> list[dict]:
    """The rows of the first markdown table after heading `title`, as {header: cell}."""
    body = md.split(title, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(body) if ln.startswith("|"))
    lines = list(itertools.takewhile(lambda ln: ln.startswith("|"), body[start:]))
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]


def by_method(rows: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in rows}


def mean_std(xs, scale=100, spec="{:.1f}") -> str:
    xs = [scale * x for x in xs]
    return f"{spec.format(statistics.fmean(xs))} ± {spec.format(statistics.stdev(xs))}"


def metric_of(method, key):
    return [m[key] for (meth, _), m in TRAINING.items() if meth == method]


def test_method_comparison_has_means_stds_n_and_relative_to_full(report):
    rows = by_method(table(report["md"], "## Method comparison"))
    assert sorted(rows) == ["full", "lora_diffusion", "weight_lora"]  # no sweep trials, no base
    for method, row in rows.items():
        assert row["task"] == "sst2" and row["n"] == "2" and row["seeds"] == "0, 1"
        assert row["gen. acc. (%)"] == mean_std(metric_of(method, "eval_accuracy"))
        assert row["scoring acc. (%)"] == mean_std(metric_of(method, "eval_accuracy_scoring"))
        assert row["steps"] == "20"  # equal in every run: no ±
        auc = "0.920 ± 0.014" if method == "lora_diffusion" else "—"  # older runs lack it
        assert row["scoring AUC"] == auc
        full = statistics.fmean(metric_of("full", "eval_accuracy"))
        rel = 100 * statistics.fmean(metric_of(method, "eval_accuracy")) / full
        assert row["gen. acc. vs full (%)"] == f"{rel:.1f}"
    assert rows["full"]["gen. acc. vs full (%)"] == "100.0"
    assert rows["lora_diffusion"]["gen. acc. (%)"] == "82.0 ± 2.8"  # the format, spelled out


def test_the_paper_s_claims_sit_beside_the_measured_values(report):
    rows = {
        r["the paper's claim"]: r["measured here"]
        for r in table(report["md"], "## Against the paper")
    }
    ld = statistics.fmean(metric_of("lora_diffusion", "eval_accuracy_scoring"))
    full = statistics.fmean(metric_of("full", "eval_accuracy_scoring"))
    close = rows["LoRA-Diffusion comes close to full fine-tuning"]
    assert close == f"scoring {100 * ld:.1f}% vs full {100 * full:.1f}%"
    best = rows["LoRA-Diffusion beats the other parameter-efficient methods"]
    assert best.endswith("(weight_lora)")  # full fine-tuning is not parameter-efficient
    assert rows["prefix tuning could not be made to train"] == "—"  # no prefix run here
    memory = rows["training needs a fraction of full fine-tuning's memory"]
    assert memory == "peak 920 MB vs full 3100 MB (0.30 x)"


def test_efficiency_shows_absent_peak_memory_as_a_dash(report):
    rows = by_method(table(report["md"], "## Efficiency"))
    assert rows["weight_lora"]["peak memory (MB)"] == "—"
    assert rows["lora_diffusion"]["peak memory (MB)"] == "920 ± 28"
    assert rows["full"]["trainable params"] == f"{TRAINABLE['full']:,}"
    assert rows["full"]["storage fp32 (MB)"] == f"{4e-6 * TRAINABLE['full']:.3f}"


def test_convergence_from_the_metric_history(report):
    rows = by_method(table(report["md"], "## Convergence and forgetting"))
    first = [losses("full", s)[0] for s in (0, 1)]
    last = [losses("full", s)[-1] for s in (0, 1)]
    drop = [100 * (a - b) / a for a, b in zip(first, last, strict=True)]
    assert rows["full"]["initial loss"] == mean_std(first, 1, "{:.3f}")
    assert rows["full"]["final loss"] == mean_std(last, 1, "{:.3f}")
    assert rows["full"]["reduction (%)"] == mean_std(drop, 1)
    assert rows["full"]["forgetting (nats/token)"] == "+0.0150 ± 0.0071"


def test_sweep_table_lists_every_child_by_swept_param(report):
    rows = table(report["md"], "### Sweep `ranks`")
    assert list(rows[0])[:2] == ["adaptor.k", "score (%)"]  # output_dir also differs: not swept
    assert [r["adaptor.k"] for r in rows] == ["1", "2", "4"]
    expected = {str(k): (f"{100 * s:.1f}", status.lower()) for k, s, status in SWEEP}
    assert {r["adaptor.k"]: (r["score (%)"], r["status"]) for r in rows} == expected
    assert rows[0]["trainable params"] == "1,000" and rows[0]["eval gold loss"] == "0.3000"


def test_every_table_names_its_runs_and_the_command(report):
    md, client = report["md"], report["client"]
    command = "python jobs/report.py " + " ".join(report["argv"])
    assert md.count(f"Rebuild: `{command}`") == 5  # the header and four tables
    for run in client.search_runs([report["exp"]], "attributes.run_name != 'report'"):
        if run.info.status == "FAILED":
            assert run.info.run_id not in md
        else:
            assert run.info.run_id in md, run.info.run_name


def test_figures_are_png_files_and_linked(report):
    figures = report["out"] / "figures"
    names = sorted(p.name for p in figures.iterdir())
    assert names == ["loss_curves.png", "score_vs_params.png", "sweep-ranks.png"]
    for name in names:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{name})" in report["md"]


def test_the_report_run_holds_the_files(report, tmp_path):
    client = report["client"]
    run = client.get_run(report["result"]["mlflow_run_id"])
    assert run.info.run_name == "report" and run.info.experiment_id == report["exp"]
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert listed == {"RESULTS.md", "figures"}
    pngs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert pngs == {f"figures/{p.name}" for p in (report["out"] / "figures").iterdir()}
    got = client.download_artifacts(run.info.run_id, "RESULTS.md", str(tmp_path))
    assert open(got).read() == report["md"]


def test_filter_and_no_log(report, tmp_path):
    before = len(report["client"].search_runs([report["exp"]], "attributes.run_name = 'report'"))
    main(["--experiment", EXP, "--tracking-uri", report["uri"], "--output-dir", str(tmp_path),
          "--runs-filter", "tags.method = 'weight_lora'", "--no-log"])  # fmt: skip
    md = (tmp_path / "RESULTS.md").read_text()
    assert list(by_method(table(md, "## Method comparison"))) == ["weight_lora"]
    assert "_Skipped: no runs with nested child runs._" in md
    assert table(md, "## Method comparison")[0]["gen. acc. vs full (%)"] == "—"
    after = len(report["client"].search_runs([report["exp"]], "attributes.run_name = 'report'"))
    assert after == before


def test_unknown_experiment_exits_2_naming_it(report):
    proc = subprocess.run(
        [sys.executable, "jobs/report.py", "--experiment", "no-such-exp", "--tracking-uri",
         report["uri"], "--output-dir", "unused"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no-such-exp" in proc.stderr and EXP in proc.stderr
    assert not (REPO / "unused").exists()


def test_a_bad_filter_or_a_missing_store_exits_2(report, tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    for argv, named in (
        (["--tracking-uri", missing], "none.db"),
        (["--tracking-uri", report["uri"], "--runs-filter", "tags.x =="], "filter string"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["--experiment", EXP, "--output-dir", str(tmp_path / "o"), *argv])
        assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "o").exists()
