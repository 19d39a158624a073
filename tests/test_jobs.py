"""The real job CLIs on tiny settings, as users run them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The CLIs: helper modules (common, tracking, the pyfunc model) have no __main__ block.
JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py") if "__main__" in p.read_text())


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


@pytest.mark.parametrize("job", JOBS)
def test_help_shows_each_real_default_once_and_loads_no_heavy_library(job):
    # -X importtime lists every module the --help run imported
    proc = run_job("-X", "importtime", f"jobs/{job}", "--help")
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "default: None" not in text
    assert not re.search(r"\(default:[^()]*\)\s*\(default:", text), text
    assert not re.search(r"default:[^()]*\(default:", text), text
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    heavy = {"torch", "ray", "mlflow", "transformers", "datasets", "lora_diffusion"} & imported
    assert not heavy, f"{job} --help imported {heavy}"


def test_help_states_the_real_values_of_steps_ranks_and_k():
    text = " ".join(run_job("jobs/train.py", "--help").stdout.split())
    assert "--max-steps MAX_STEPS optimizer steps (default: 1000)" in text
    assert "rank per phase (default: 64)" in text
    assert "modules per phase (default: 2)" in text
    assert "lora_diffusion 0.001" in text  # the method's learning rate


def test_what_help_states_about_the_library_is_what_the_library_holds():
    from jobs import common
    from lora_diffusion.adaptor import AdaptorConfig
    from lora_diffusion.config import FinetuneConfig
    from lora_diffusion.methods import METHODS
    from lora_diffusion.models import PRESETS
    from lora_diffusion.multitask import MultitaskConfig
    from lora_diffusion.pretraining import PretrainConfig
    from lora_diffusion.tasks import TASKS

    assert sorted(common.TASKS) == sorted(TASKS)
    assert sorted(common.METHOD_LR) == sorted(METHODS)
    assert common.METHOD_LR == {m: METHODS.get(m).default_lr for m in common.METHOD_LR}
    assert sorted(common.PAPER_METHODS) == [m for m in METHODS if METHODS.get(m).in_paper]
    assert list(common.PRESETS) == list(PRESETS)
    assert common.FINETUNE_STEPS == FinetuneConfig(base="b", output_dir="o").train.max_steps
    assert common.PRETRAIN_STEPS == PretrainConfig(corpus_dir="c", output_dir="o").train.max_steps
    assert common.MULTITASK_STEPS == MultitaskConfig(base="b", output_dir="o").train.max_steps
    adaptor = AdaptorConfig()
    assert common.RANKS == ",".join(map(str, adaptor.ranks)) and common.K == adaptor.k


@pytest.mark.parametrize(
    "args, says",
    [
        (["jobs/pretrain.py", "--preset", "x", "--output-dir", "o"], "invalid choice 'x'"),
        (["jobs/train.py", "--base", "b"], "the following arguments are required: --output-dir"),
        (["jobs/train.py", "--base", "b", "--output-dir", "o", "--bogus"], "unrecognized"),
        (
            ["jobs/sweep.py", "--space", "s", "--base", "b", "--output-dir", "o", "--task", "x"],
            "--task: invalid choice 'x'",
        ),
    ],
)
def test_a_flag_error_is_one_line_with_a_hint_and_exit_code_2(args, says):
    proc = run_job(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith("; see --help")


def test_a_bad_set_key_is_named_without_stray_quotes(tmp_path):
    proc = run_job("jobs/train.py", "--base", "b", "--output-dir", str(tmp_path / "o"),
                   "--set", "adaptor.bogus=1", "--no-tracking", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown config key 'adaptor.bogus'"), proc.stderr


def test_a_job_called_from_python_is_checked_as_its_flags_are_and_gives_them_back(capsys):
    from jobs import train

    argv = ["--base", "b", "--output-dir", "o", "--method", "bitfit", "--max-steps", "5",
            "--set", "train.warmup_steps=1", "--register", "--tag", "a=1", "--tag", "b=2",
            "--data-dir", "d", "--no-ray"]  # fmt: skip
    built = train.Args(
        base="b",
        output_dir="o",
        method="bitfit",
        max_steps=5,
        overrides=["train.warmup_steps=1"],
        register="",
        tags=["a=1", "b=2"],
        data_dir="d",
        no_ray=True,
    )
    assert train.parse_args(argv) == built
    assert train.parse_args(built.argv()) == built  # the command that reruns it
    assert built.batch_size == 32 and built.tags is not train.Args(base="b", output_dir="o").tags
    for bad, says in [
        ({"method": "nope"}, "--method: invalid choice 'nope'"),
        ({"max_steps": "5"}, "--max-steps: expected int, got '5'"),
        ({"batch_size": True}, "--batch-size: expected int, got True"),
    ]:
        with pytest.raises(SystemExit) as e:
            train.Args(base="b", output_dir="o", **bad)
        assert e.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(TypeError, match="bogus"):
        train.Args(base="b", output_dir="o", bogus=1)


def test_each_training_job_puts_its_shared_flags_on_the_config_and_a_sweep_the_methods_rate():
    from jobs import sweep, train
    from jobs.common import finetune_config
    from lora_diffusion.methods import METHODS

    a = train.Args(base="b", output_dir="o", method="bitfit", lr=0.02, batch_size=4, seed=3)
    t = finetune_config(a).train
    assert (t.lr, t.batch_size, t.seed, t.max_steps) == (0.02, 4, 3, 1000)
    # a sweep has no --lr: its trials start from the method's rate (a space may set train.lr)
    s = sweep.Args(space="s.yaml", base="b", output_dir="o", method="bitfit", max_steps=7)
    t = finetune_config(s, train={"eval_every": 2}).train
    assert (t.lr, t.max_steps, t.eval_every) == (METHODS.get("bitfit").default_lr, 7, 2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir, ray_cluster):
    out = tmp_path_factory.mktemp("pretrain")
    proc = run_job(
        "jobs/pretrain.py", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "12",
        "--vocab-size", "400", "--max-documents", "200", "--batch-size", "8",
        "--heldout-blocks", "16", "--data-dir", str(data_dir), "--no-progress", "--json",
        "--set", "train.log_every=4", "--no-ray",  # Ray Train pretraining: test_raytrain
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


def test_pretrain_task_text_joins_the_training_documents(tmp_path, data_dir):
    """--task-text packs the tasks' unlabelled train texts after the corpus documents, as
    often as --task-text-repeat says; an unknown task fails before any work."""
    staged = tmp_path / "data"
    (staged / "sst2").mkdir(parents=True)
    (staged / "corpus").symlink_to(data_dir / "corpus")
    (staged / "sst2" / "labels.txt").write_text("negative\npositive\n")
    rows = "".join(f"a film numbered {i} that nobody will forget .\t{i % 2}\n" for i in range(300))
    (staged / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + rows)
    common = ("jobs/pretrain.py", "--preset", "tiny", "--max-steps", "1", "--vocab-size", "400",
              "--max-documents", "20", "--heldout-blocks", "4", "--data-dir", str(staged),
              "--no-ray", "--no-tracking", "--no-progress", "--json")  # fmt: skip
    tokens = {}
    for repeat in (0, 1, 2):
        extra = ("--task-text", "sst2", "--task-text-repeat", str(repeat)) if repeat else ()
        out = tmp_path / f"r{repeat}"
        proc = run_job(*common, "--output-dir", str(out), *extra)
        tokens[repeat] = last_json(proc.stdout)["train_tokens"]
    # a second copy adds ~10 tokens (+ EOS) per sentence, 300 sentences; packing cuts < a block
    assert 300 * 6 < tokens[2] - tokens[1] < 300 * 20 and tokens[1] > tokens[0]
    for flags, message in (
        (("--task-text", "nosuch"), "unknown task 'nosuch'"),
        (("--task-text", "sst2", "--task-text-repeat", "0"), "task_text_repeat must be at least 1"),
    ):
        proc = run_job(*common, "--output-dir", str(tmp_path / "bad"), *flags, check=False)
        assert proc.returncode == 2 and message in proc.stderr


@pytest.fixture(scope="module")
def trained(pretrained, tmp_path_factory, data_dir, ray_cluster):
    _, base = pretrained
    out = tmp_path_factory.mktemp("train")
    proc = run_job(
        "jobs/train.py", "--method", "lora_diffusion", "--task", "sst2",
        "--base", base["model_dir"], "--output-dir", str(out), "--max-steps", "6",
        "--train-limit", "64", "--eval-limit", "8", "--batch-size", "8", "--ranks", "8,4,2",
        "--data-dir", str(data_dir), "--no-progress", "--json",
        "--set", "adaptor.sigmas=1,0.5,0.25", "--set", "adaptor.boundaries=0.6667,0.3333",
        "--set", "forgetting_blocks=4", "--set", "scoring_num_t=2",
    )  # fmt: skip
    return out, last_json(proc.stdout), base


def test_train_job_saves_an_adaptor_and_reports_every_promised_key(trained):
    out, result, _ = trained
    promised = (
        "method",
        "task",
        "trainable_params",
        "trainable_pct",
        "storage_mb",
        "train_loss",
        "eval_accuracy",
        "eval_accuracy_scoring",
        "adaptor_dir",
        "seconds",
    )
    assert all(k in result for k in promised), set(promised) - set(result)
    assert result["method"] == "lora_diffusion" and result["steps"] == 6
    assert 0 <= result["eval_accuracy"] <= 1 and 0 <= result["eval_valid_rate"] <= 1
    assert 0 < result["trainable_pct"] < 100
    # what this run added to the worker's resident memory at its peak (base, data, training), MB
    assert result["train_peak_mb"] > 0
    # every network call of the adapted sampler either ran the frozen base or reused it
    calls = result["eval_base_calls"] + result["eval_base_calls_saved"]
    assert calls == result["eval_network_calls"] > 0
    assert (Path(result["adaptor_dir"]) / "adapter_config.json").exists()
    # Ray Train checkpoints: the training state of the last step, under OUTPUT_DIR/ray/train
    states = sorted((out / "ray" / "train").glob("checkpoint_*/state/trainable.safetensors"))
    assert states and json.loads((states[-1].parent / "state.json").read_text())["step"] == 6
    for plot in ("train_curves.png", "effective_rank.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "adaptor_report.json").read_text())
    assert report["trainable_params"] == result["trainable_params"]


def test_evaluate_job_reproduces_the_train_jobs_accuracy(trained, data_dir, tmp_path):
    _, result, base = trained
    proc = run_job(
        "jobs/evaluate.py", "--base", base["model_dir"], "--adaptor", result["adaptor_dir"],
        "--task", "sst2", "--eval-limit", "8", "--data-dir", str(data_dir), "--json",
        "--forgetting-blocks", "4", "--plot", str(tmp_path / "ranks.png"),
    )  # fmt: skip
    again = last_json(proc.stdout)
    assert again["trainable_params"] == result["trainable_params"]
    assert len(again["effective_rank_up"]) == 6  # 3 phases x k = 2
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert again["eval_accuracy"] == result["eval_accuracy"]
    assert again["eval_valid_rate"] == result["eval_valid_rate"]


def test_unknown_method_and_task_fail_before_any_work(pretrained, tmp_path):
    _, base = pretrained
    for flag, value in (("--method", "magic"), ("--task", "nope")):
        proc = run_job("jobs/train.py", "--base", base["model_dir"], "--output-dir",
                       str(tmp_path), flag, value, check=False)  # fmt: skip
        assert proc.returncode == 2 and value in proc.stderr
