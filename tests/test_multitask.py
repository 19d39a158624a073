"""Multi-task adaptors: joint training with the router, zero-shot composition."""

import json

import pytest
import torch

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
from lora_diffusion.adaptor_io import load_adaptor, load_router, save_adaptor
from lora_diffusion.composition import AdaptedDenoiser, Router
from lora_diffusion.data import tokenize_task
from lora_diffusion.evaluation import generative_accuracy
from lora_diffusion.models import load_base
from lora_diffusion.multitask import (
    MixedTaskSampler,
    MultitaskConfig,
    composition_interference,
    parse_task_dirs,
    train_multitask,
)
from lora_diffusion.training import TrainConfig

SMALL = AdaptorConfig(ranks=(8, 4), sigmas=(1.0, 0.5), boundaries=(0.5,))


def config(base_dir, out, data_dir, tmp_path, **kw):
    train = TrainConfig(
        lr=3e-3, max_steps=kw.pop("steps", 40), batch_size=16, warmup_steps=5, log_every=1
    )
    return MultitaskConfig(
        base=str(base_dir),
        output_dir=str(out),
        tasks=("sst2", "trec"),
        data_dir=str(data_dir),
        max_length=64,
        train_limit=64,
        eval_limit=24,
        scoring_num_t=2,
        router_hidden=32,
        cache_dir=str(tmp_path / "cache"),
        adaptor=SMALL,
        train=train,
        **kw,
    )


def test_mixed_sampler_is_seeded_and_draws_every_task():
    s = MixedTaskSampler([5, 1000], batch_size=64, seed=3)
    assert s.indices(7) == MixedTaskSampler([5, 1000], 64, seed=3).indices(7)
    assert s.indices(7) != s.indices(8)
    picks = s.indices(0)
    assert {j for j, _ in picks} == {0, 1}  # the 5-example task is not drowned
    assert all(0 <= i < [5, 1000][j] for j, i in picks)


def test_bad_multitask_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="2\\+ distinct tasks"):
        MultitaskConfig(base="b", output_dir="o", tasks=("sst2",))
    with pytest.raises(KeyError, match="unknown"):
        MultitaskConfig(base="b", output_dir="o", tasks=("sst2", "nope"))
    with pytest.raises(ValueError, match="TASK=DIR"):
        parse_task_dirs(["sst2"])
    with pytest.raises(ValueError, match="every task"):
        MultitaskConfig(
            base="b",
            output_dir="o",
            tasks=("sst2", "trec"),
            adaptor_dirs=("sst2=x",),
            train_router_only=True,
        )


def test_joint_training_learns_to_route_and_saves_everything(tiny_base_dir, data_dir, tmp_path):
    out = tmp_path / "mt"
    cfg = config(tiny_base_dir, out, data_dir, tmp_path, steps=60, routing_loss=1.0)
    result = train_multitask(cfg, progress=False)
    history = json.loads((out / "history.json").read_text())
    first, last = history[0], history[-1]
    assert last["routing_ce"] < 0.5 * first["routing_ce"]  # the router separates the prompts
    for task in ("sst2", "trec"):
        r = result["per_task"][task]
        assert r["routing_accuracy"] > 0.9 and r["n"] == 24
        assert 0 <= r["accuracy_router"] <= 1 and 0 <= r["accuracy_oracle"] <= 1
    base, _ = load_base(tiny_base_dir)
    adaptor, cfg = load_adaptor(out / "adaptors" / "trec", base)
    assert cfg["task"] == "trec" and adaptor.cfg == SMALL
    router, tasks = load_router(out / "router", base)
    assert tasks == ["sst2", "trec"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["router_params"] == sum(p.numel() for p in router.parameters())
    assert (out / "plots" / "train_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_router_only_training_leaves_the_adaptors_unchanged(
    tiny_base_dir, data_dir, tmp_path, tiny_model
):
    dirs = []
    for i, task in enumerate(("sst2", "trec")):
        a = TrajectoryAdaptor(SMALL, 64)
        with torch.no_grad():
            for p in a.parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        save_adaptor(tmp_path / task, a, tiny_model, task=task)
        dirs.append(f"{task}={tmp_path / task}")
    cfg = config(
        tiny_base_dir,
        tmp_path / "mt",
        data_dir,
        tmp_path,
        steps=6,
        adaptor_dirs=tuple(dirs),
        train_router_only=True,
    )
    result = train_multitask(cfg, progress=False)
    base, _ = load_base(tiny_base_dir)
    for task in ("sst2", "trec"):
        before, _ = load_adaptor(tmp_path / task, base)
        after, _ = load_adaptor(tmp_path / "mt" / "adaptors" / task, base)
        for (n, p), q in zip(before.state_dict().items(), after.state_dict().values(), strict=True):
            assert torch.equal(p, q), n
    assert result["trainable_params"] == result["router_params"]


def test_zero_shot_composition_reports_alone_and_composed(
    tiny_model, tiny_tokenizer, data_dir, tmp_path
):
    adaptors = {}
    for i, task in enumerate(("sst2", "trec")):
        a = TrajectoryAdaptor(SMALL, 64)
        with torch.no_grad():
            for p in a.parameters():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(10 + i))
        adaptors[task] = a
    kw = dict(data_dir=data_dir, cache_dir=tmp_path, eval_limit=16, max_length=64, scoring_num_t=2)
    out = composition_interference(tiny_model, tiny_tokenizer, adaptors, ["sst2"], **kw)
    assert out["weights"] == [0.5, 0.5]
    r = out["sst2"]
    assert r["drop"] == pytest.approx(r["accuracy_alone"] - r["accuracy_composed"])
    # "alone" inside the merge is exactly the single-task model
    rows = list(
        tokenize_task("sst2", "eval", tiny_tokenizer, 64, data_dir, tmp_path, 16).with_format(
            "python"
        )
    )
    single = AdaptedDenoiser(tiny_model, {"sst2": adaptors["sst2"]}).eval()
    assert (
        r["accuracy_alone"]
        == generative_accuracy(single, tiny_tokenizer, "sst2", rows, max_length=64)["accuracy"]
    )
    router = Router(64, 2, hidden=16)
    routed = composition_interference(
        tiny_model, tiny_tokenizer, adaptors, ["trec"], router=router, **kw
    )
    assert routed["weights"] is None and set(routed) == {"adaptors", "weights", "trec"}
    with pytest.raises(ValueError, match="one per adaptor: sst2, trec"):
        composition_interference(tiny_model, tiny_tokenizer, adaptors, weights=[1.0], **kw)
    with pytest.raises(ValueError, match="no adaptor for task 'cola'"):
        composition_interference(tiny_model, tiny_tokenizer, adaptors, ["cola"], **kw)


def test_multitask_and_compose_jobs_run_end_to_end(tiny_base_dir, data_dir, tmp_path):
    from test_jobs import last_json, run_job

    out = tmp_path / "mt"
    proc = run_job(
        "jobs/multitask.py",
        "--base",
        str(tiny_base_dir),
        "--tasks",
        "sst2,trec",
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--train-limit",
        "32",
        "--eval-limit",
        "8",
        "--data-dir",
        str(data_dir),
        "--no-progress",
        "--json",
        "--set",
        "max_length=64",
        "--set",
        "adaptor.ranks=4",
        "--set",
        "scoring_num_t=2",
    )
    result = last_json(proc.stdout)
    assert result["steps"] == 4 and set(result["per_task"]) == {"sst2", "trec"}
    adaptors = [f"{t}={out / 'adaptors' / t}" for t in ("sst2", "trec")]
    args = [
        "jobs/compose.py",
        "--base",
        str(tiny_base_dir),
        "--eval-limit",
        "8",
        "--data-dir",
        str(data_dir),
        "--json",
    ]
    for a in adaptors:
        args += ["--adaptor", a]
    composed = last_json(
        run_job(*args, "--weights", "1,3", "--output", str(tmp_path / "c.json")).stdout
    )
    assert composed["weights"] == [0.25, 0.75] and {"sst2", "trec"} <= set(composed)
    assert json.loads((tmp_path / "c.json").read_text()) == composed
    bad = run_job(*args, "--weights", "1", check=False)
    assert bad.returncode == 2 and "one per adaptor" in bad.stderr
