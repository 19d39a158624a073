"""Sweep LoRA-Diffusion settings with Ray Tune: every trial a real training run, tracked in MLflow.

    python jobs/sweep.py --space tune_spaces/table10_ranks.yaml --task sst2 \\
        --base runs/base-small/model --output-dir runs/sweep-table10

Each trial runs the library's `finetune` (the recipe of jobs/train.py) with the space's values
as `--set` overrides, reports candidate-scoring accuracy and the gold label's loss every
`--eval-every` steps (ASHA stops weak trials on the loss), and is an MLflow run nested under
the sweep's run. At the end: a table (config, score, trainable parameters, relative training
time) printed and written to OUTPUT_DIR/table.md, a plot of score against trainable
parameters, and the best trial's adaptor registered with alias `best-<sweep name>`.
Rerunning the same command resumes an interrupted sweep (finished trials are kept).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from jobs import raytrain
from jobs.common import (
    FINETUNE_STEPS,
    add_task_flags,
    base_parser,
    config_error,
    emit,
    fail,
    finetune_config,
)
from jobs.tracking import (
    MlflowRun,
    add_tracking_flags,
    check_reachable,
    flatten,
    parse_tags,
    tracking_uri,
)

if TYPE_CHECKING:  # imported where used, after the flags are parsed
    from lora_diffusion.finetune import FinetuneConfig

KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "value")


# ---- search spaces ----------------------------------------------------------------------------


def load_space(path: str) -> dict:
    """Read a space file (YAML): {description, metric, mode, params: {key: {kind: values}}}.

    A param's key is a dotted config key (`adaptor.k`, `train.lr`, as for --set), or a name of
    your own whose values are mappings of several keys set together (a rank schedule with its
    sigmas). Kinds: grid [v, ...] (every value, in order), choice [v, ...] (sampled),
    uniform/loguniform [low, high], randint [low, high), value v (fixed).
    """
    p = Path(path)
    if p.is_dir() or not p.suffix:
        p = p.with_suffix(".yaml") if not p.is_dir() else p / "space.yaml"
    if not p.is_file():
        fail(f"search space {path} not found")
    try:
        space = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        fail(f"search space {p} is not valid YAML: {e}")
    if not isinstance(space, dict) or not isinstance(space.get("params"), dict):
        fail(f"search space {p}: needs a `params:` mapping")
    unknown = set(space) - {"description", "metric", "mode", "params", "fixed"}
    if unknown:
        fail(f"search space {p}: unknown top-level keys {sorted(unknown)}")
    space["name"] = p.stem
    return space


def _as_override(key: str, value) -> str:
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    return f"{key}={value}"


def _assignments(key: str, value) -> list[str]:
    """The --set strings one sampled value of param `key` stands for."""
    if isinstance(value, dict):
        return [_as_override(k, v) for k, v in value.items()]
    return [_as_override(key, value)]


def validate_space(space: dict, cfg: FinetuneConfig, hidden_size: int) -> None:
    """Fail (exit 2) before any trial on an unknown key, an empty or malformed choice, a bad
    range, or a rank above the base's hidden size, naming the offending key.

    Each value of a param is applied together with the fixed keys and the first value of every
    other param, since some keys must agree (a rank schedule's ranks, sigmas, boundaries)."""
    from lora_diffusion.config import apply_overrides

    fixed = space.get("fixed") or {}
    candidates = {}
    for key, spec in {**space["params"], **fixed}.items():
        if key in fixed:
            spec = {"value": spec}
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            fail(f"search space: param {key!r} needs exactly one of {', '.join(KINDS)}")
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                fail(f"search space: param {key!r}: {kind} needs a non-empty list")
            candidates[key] = values
        elif kind == "value":
            candidates[key] = [values]
        else:
            if not (
                isinstance(values, list)
                and len(values) == 2
                and all(isinstance(v, int | float) for v in values)
                and values[0] < values[1]
            ):
                fail(f"search space: param {key!r}: {kind} needs [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                fail(f"search space: param {key!r}: loguniform needs low > 0")
            candidates[key] = values if kind != "randint" else [values[0], values[1] - 1]
    for key, values in candidates.items():
        others = [s for k, vs in candidates.items() if k != key for s in _assignments(k, vs[0])]
        for v in values:
            if isinstance(v, dict) and "." in key:
                fail(f"search space: param {key!r}: a dotted key takes plain values")
            try:
                trial_cfg = apply_overrides(cfg, [*others, *_assignments(key, v)])
            except (KeyError, ValueError) as e:
                fail(f"search space: param {key!r}: {config_error(e)}")
            too_big = [r for r in trial_cfg.adaptor.ranks if r > hidden_size]
            if too_big:
                fail(
                    f"search space: param {key!r}: rank {too_big[0]} is above the base's "
                    f"hidden size {hidden_size}"
                )


def tune_space(space: dict) -> dict:
    """The Ray Tune param_space of a validated space."""
    from ray import tune

    out = {}
    for key, spec in space["params"].items():
        kind, values = next(iter(spec.items()))
        out[key] = {
            "grid": lambda v: tune.grid_search(v),
            "choice": lambda v: tune.choice(v),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
            "value": lambda v: v,
        }[kind](values)
    return out


def space_metric(space: dict, holdout: int) -> str:
    """The space's `metric` (default eval_accuracy_scoring), scored where the trials report:
    with held-out train rows its `eval_` becomes `val_`."""
    metric = space.get("metric") or "eval_accuracy_scoring"
    if holdout and metric.startswith("eval_"):
        return "val_" + metric.removeprefix("eval_")
    return metric


# ---- the trial --------------------------------------------------------------------------------


def trial_config(base_cfg: FinetuneConfig, params: dict, fixed: dict, out_dir: str):
    from lora_diffusion.config import apply_overrides

    sets = [s for k, v in fixed.items() for s in _assignments(k, v)]
    sets += [s for k, v in params.items() for s in _assignments(k, v)]
    return dataclasses.replace(apply_overrides(base_cfg, sets), output_dir=out_dir)


def trial(params: dict, base_cfg: FinetuneConfig, sweep: dict) -> None:
    """One Tune trial: a training run with `params` applied, reported to Tune at every
    evaluation and logged as an MLflow run nested under the sweep's run."""
    import torch
    from ray import tune

    from lora_diffusion.finetune import finetune
    from lora_diffusion.training import Distributed

    torch.set_num_threads(max(1, int(sweep["cpus_per_trial"])))
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    out_dir = os.path.join(sweep["output_dir"], "trials", trial_id)
    cfg = trial_config(base_cfg, params, sweep["fixed"], out_dir)
    logger = trial_run(sweep.get("tracking"), f"{sweep['name']}-{trial_id}", params, cfg)
    logger.out_dir = out_dir

    last_eval: dict = {}
    scored = f"{cfg.scored_split}_"  # the split periodic evaluation scores

    def report(step, m):
        logger.report(step, m)
        if f"{scored}gold_loss" in m:
            last_eval.update({k: v for k, v in m.items() if k.startswith(scored)})
            tune.report({**_scalars(m), "step": step, "mlflow_run_id": logger.run_id})

    status = "KILLED"
    try:
        gpu = sweep.get("gpus_per_trial", 0) > 0
        dist = Distributed(device="cuda") if gpu else None
        result = finetune(cfg, report=report, progress=False, dist=dist)
        logger.log_run_files(result, out_dir, dirs=("plots", "adaptor"))
        status = "FINISHED"
        final = {**last_eval, **_scalars(result)}  # the final eval on the same examples wins
        tune.report(
            {
                **final,
                "step": result["steps"],
                "trial_finished": True,
                "mlflow_run_id": logger.run_id,
                "trial_dir": out_dir,
            }
        )
    finally:
        logger.end(status)  # KILLED: stopped early (ASHA) or failed


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, int | float | str) and v is not None}


def trial_run(spec: dict | None, name: str, params: dict, cfg) -> MlflowRun:
    """A trial's MLflow run, nested under the sweep's run: its config and sampled params."""
    if not spec:
        return MlflowRun()
    tags = {"sweep": spec["sweep"], "task": cfg.task, "method": cfg.method}
    try:
        run = MlflowRun.start(spec["uri"], spec["experiment"], name, tags, spec["parent_run_id"])
    except Exception as e:
        print(f"warning: MLflow logging of this trial stopped: {str(e)[:300]}", file=sys.stderr)
        return MlflowRun()
    sampled = {f"sweep.{k}": json.dumps(v) for k, v in params.items()}
    run.log_params({**flatten(dataclasses.asdict(cfg)), **sampled})
    return run


# ---- the job ----------------------------------------------------------------------------------


def parser():
    p = base_parser(__doc__.splitlines()[0], max_steps=FINETUNE_STEPS, base=True)
    p.add_argument("--space", required=True, help="a space file, e.g. tune_spaces/broad.yaml")
    add_task_flags(p, method="the tuned method")
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="samples of the space (each grid point is repeated this often)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--train-limit", type=int, default=None, help="use only N train examples")
    p.add_argument("--eval-limit", type=int, default=200, help="eval examples per trial")
    p.add_argument("--eval-every", type=int, default=50, help="steps between trial reports")
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="hold out the last N train rows, never trained on: trials report and ASHA stops on "
        "their val_* scores, and --metric defaults to val_accuracy_scoring (0: the eval split's)",
    )
    p.add_argument(
        "--metric",
        default=None,
        help="what ranks trials (default: the space's metric, else "
        "eval_accuracy_scoring; with --holdout its val_ version)",
    )
    p.add_argument("--mode", choices=("max", "min"), default=None, help="default: the space's")
    p.add_argument(
        "--scheduler",
        choices=("asha", "none"),
        default="asha",
        help="asha: stop trials whose gold-label loss (eval_ or val_gold_loss) trails at a rung",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: steps before a trial can be stopped (default 2 x eval-every)",
    )
    p.add_argument(
        "--search",
        choices=("random", "optuna"),
        default="random",
        help="random/grid (Tune's variant generator) or Optuna (if installed)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs (and threads) per trial")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0,
        help="GPUs per trial (> 0: the trial trains on cuda)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: the cluster's CPUs / cpus-per-trial)",
    )
    p.add_argument("--address", default=None, help="Ray cluster (default $RAY_ADDRESS or local)")
    p.add_argument("--name", default=None, help="sweep name (default: the space's file name)")
    p.add_argument("--restart", action="store_true", help="do not resume an earlier sweep")
    add_tracking_flags(
        p,
        "register the best adaptor as a version of NAME (default "
        "<task>-<method>); its alias is best-<sweep>",
    )
    return p


Args = parser().args_class  # the flags as a dataclass: run(Args(...)) from Python
parse_args = Args.parse


def main(argv=None) -> dict:
    a = parse_args(argv)
    return run(a, "python jobs/sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv))


def run(a: Args, command: str | None = None) -> dict:
    """Run the sweep `a` describes; `command` (what the table names) defaults to its flags."""
    from lora_diffusion.config import apply_overrides

    a = dataclasses.replace(a)  # the sweep notes what it derives on its own copy
    a.command = command or "python jobs/sweep.py " + shlex.join(a.argv())

    space = load_space(a.space)
    a.metric = a.metric or space_metric(space, a.holdout)
    name = a.name or space["name"]
    mode = a.mode or space.get("mode", "max")
    base_cfg = finetune_config(a, holdout=a.holdout, train={"eval_every": a.eval_every})
    try:
        base_cfg = apply_overrides(base_cfg, a.overrides)
    except (KeyError, ValueError) as e:
        fail(config_error(e))
    # Tune runs each trial in its own working directory
    base_cfg = raytrain.absolute_paths(base_cfg, ("base", "data_dir", "corpus_dir", "cache_dir"))
    if not Path(base_cfg.base, "config.json").is_file():
        fail(f"base {a.base!r} not found (a saved model folder)")
    hidden = json.loads(Path(base_cfg.base, "config.json").read_text())["hidden_size"]
    validate_space(space, base_cfg, hidden)
    parse_tags(a.tags)
    if a.search == "optuna" and any("grid" in s for s in space["params"].values()):
        fail("--search optuna samples; this space has grid params: use --search random")
    if a.no_tracking and (a.register is not None or a.alias):
        fail("--register/--alias need tracking; drop --no-tracking")
    uri = None if a.no_tracking else tracking_uri(a.tracking_uri)
    if uri:
        check_reachable(uri)

    if a.scheduler == "asha":
        a.grace_period = asha_grace_period(a.grace_period, a.eval_every, base_cfg.train.max_steps)
    os.makedirs(a.output_dir, exist_ok=True)
    a.num_workers, a.cpus_per_worker, a.use_gpu = 1, a.cpus_per_trial, a.gpus_per_trial > 0
    raytrain.connect(a)  # exits 2 when a trial does not fit the cluster
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = a.max_concurrent or max(1, int(cpus // a.cpus_per_trial))
    if a.gpus_per_trial > 0:
        gpus = ray.cluster_resources().get("GPU", 0)
        concurrent = min(concurrent, max(1, int(gpus // a.gpus_per_trial)))
    parent = _parent_run(uri, a, name, space) if uri else None
    start = time.perf_counter()
    try:
        results = _run_tuner(a, space, name, mode, base_cfg, concurrent, parent)
    except BaseException:
        if parent:
            parent.end("FAILED")
        raise
    rows = _table_rows(results, space, a.metric, _gold_loss(base_cfg))
    out = Path(a.output_dir)
    table = _markdown(rows, a.metric, name, a, time.perf_counter() - start)
    (out / "table.md").write_text(table)
    (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    _plot(rows, a.metric, out / "score_vs_params.png", name)
    print(table)
    summary = {
        "sweep": name,
        "trials": len(rows),
        "metric": a.metric,
        "finished": sum(r["finished"] for r in rows),
        "stopped_early": sum(not r["finished"] and r["error"] is None for r in rows),
        "table": str(out / "table.md"),
        "seconds": time.perf_counter() - start,
    }
    best = _best(rows, a.metric, mode)
    if best:
        summary.update(
            best_trial=best["trial_id"], best_score=best["score"], best_params=best["params"]
        )
    if parent:
        summary.update(_finish_parent(parent, out, best, a, name, base_cfg))
    emit(summary, a.json)
    return summary


def asha_grace_period(grace: int | None, eval_every: int, max_steps: int) -> int:
    """ASHA's grace period, checked here against the step budget, before Ray starts (ASHA
    asserts `grace_period <= max_t` inside Ray, as a traceback). The default, 2 x eval-every,
    is clamped to the budget (a budget that short leaves ASHA nothing to stop); a grace period
    given explicitly past the budget is the user's mistake and is refused."""
    if grace is not None and grace < 1:
        fail(f"--grace-period must be >= 1 (got {grace})")
    if grace is not None and grace > max_steps:
        fail(
            f"--grace-period {grace} is past the step budget (train.max_steps {max_steps}): "
            "give a smaller one, or more steps"
        )
    if grace is None:
        grace = min(2 * eval_every, max_steps)
    return grace


def _run_tuner(a, space, name, mode, base_cfg, concurrent, parent):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    path = os.path.abspath(os.path.join(a.output_dir, "tune"))
    tracking = None
    if parent and parent.active:
        tracking = {"uri": parent.uri, "experiment": parent.experiment}
        tracking.update(parent_run_id=parent.run_id, sweep=name)
    sweep = {
        "name": name,
        "output_dir": os.path.abspath(a.output_dir),
        "cpus_per_trial": a.cpus_per_trial,
        "gpus_per_trial": a.gpus_per_trial,
        "fixed": space.get("fixed") or {},
        "tracking": tracking,
    }
    trainable = tune.with_resources(
        tune.with_parameters(trial, base_cfg=base_cfg, sweep=sweep),
        {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial},
    )
    run_dir = os.path.join(path, name)
    if not a.restart and tune.Tuner.can_restore(run_dir):
        print(f"resuming sweep {name} from {run_dir}", flush=True)
        tuner = tune.Tuner.restore(run_dir, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    if a.restart:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    scheduler = None
    if a.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=_gold_loss(base_cfg),
            mode="min",
            # max_t past the last step: the last evaluation is no stop, the final report follows
            max_t=base_cfg.train.max_steps + 1,
            grace_period=a.grace_period,
            reduction_factor=2,
        )
    search_alg = None
    if a.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            fail("--search optuna needs `pip install optuna`")
        search_alg = OptunaSearch(metric=a.metric, mode=mode)
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            num_samples=a.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(name=name, storage_path=path, verbose=1),
    )
    return tuner.fit()


def _gold_loss(cfg) -> str:
    """The smooth score periodic evaluation reports: on the held-out train rows, or the eval
    split's."""
    return f"{cfg.scored_split}_gold_loss"


def _table_rows(results, space, metric, gold_loss) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append(
            {
                "trial_id": m.get("trial_id") or os.path.basename(r.path),
                "params": {k: m.get("config", {}).get(k, r.config.get(k)) for k in space["params"]},
                "score": m.get(metric),
                "gold_loss": m.get(gold_loss),
                "trainable_params": m.get("trainable_params"),
                "trainable_pct": m.get("trainable_pct"),
                "train_seconds": m.get("train_seconds"),
                "steps": m.get("step"),
                "finished": bool(m.get("trial_finished")),
                "error": None if r.error is None else str(r.error)[:300],
                "mlflow_run_id": m.get("mlflow_run_id"),
                "adaptor_dir": os.path.join(m["trial_dir"], "adaptor")
                if m.get("trial_dir")
                else None,
            }
        )
    return rows


def _best(rows, metric, mode):
    done = [r for r in rows if r["finished"] and isinstance(r["score"], int | float)]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r["score"])


def _fmt(v, spec="{:.4f}"):
    return "—" if v is None else spec.format(v) if isinstance(v, int | float) else str(v)


def _markdown(rows, metric, name, a, seconds) -> str:
    done = [r["train_seconds"] for r in rows if r["finished"] and r["train_seconds"]]
    fastest = min(done) if done else None
    split = "val" if a.holdout else "eval"
    scored = f"{a.holdout} held-out train rows" if a.holdout else f"{a.eval_limit} eval examples"
    lines = [
        f"# Sweep `{name}`: task {a.task}, method {a.method}",
        "",
        f"Command: `{a.command}`  ",
        f"Wall time: {seconds:.0f} s. Score: `{metric}` on {scored} (candidate scoring); "
        "stopped trials show the score at their last evaluation.",
        "",
        f"| config | score | {split} gold loss | trainable (M) | trainable (%) | rel. train time "
        "| steps | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=lambda r: json.dumps(r["params"], default=str)):
        cfg = ", ".join(f"{k}={_short(v)}" for k, v in r["params"].items())
        rel = (r["train_seconds"] / fastest) if (fastest and r["finished"]) else None
        status = "done" if r["finished"] else ("error" if r["error"] else "stopped (ASHA)")
        tp = None if r["trainable_params"] is None else r["trainable_params"] / 1e6
        lines.append(
            f"| {cfg} | {_fmt(r['score'])} | {_fmt(r['gold_loss'])} | {_fmt(tp, '{:.3f}')} "
            f"| {_fmt(r['trainable_pct'], '{:.2f}')} | {_fmt(rel, '{:.2f}')} | "
            f"{_fmt(r['steps'], '{}')} | {status} |"
        )
    return "\n".join(lines) + "\n"


def _short(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k.split('.')[-1]}={x}" for k, x in v.items()) + "}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _plot(rows, metric, path: Path, name: str) -> None:
    from lora_diffusion.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["trainable_params"] is None or r["score"] is None:
            continue
        x = r["trainable_params"] / 1e6
        ax.scatter(x, r["score"], c="C0" if r["finished"] else "C3")
        label = ", ".join(_short(v) for v in r["params"].values())
        ax.annotate(label, (x, r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("trainable parameters (M)")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {name}: score vs trainable parameters\n(red: stopped early)", fontsize=10)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _parent_run(uri: str, a, name: str, space: dict) -> MlflowRun:
    """The sweep's own run: the space and the search as params; trials nest under it."""
    experiment = a.experiment or f"lora-diffusion/{a.task}"
    tags = {**parse_tags(a.tags), "sweep": name, "kind": "sweep"}
    try:
        run = MlflowRun.start(uri, experiment, f"sweep-{name}", tags)
    except Exception as e:
        fail(f"cannot start an MLflow run at {uri}: {e}")
    searched = json.dumps(space["params"])[:6000]
    run.log_params(
        {"space": searched, "task": a.task, "method": a.method, "num_samples": a.num_samples}
    )
    return run


def _finish_parent(parent: MlflowRun, out: Path, best, a, name, base_cfg) -> dict:
    """Log the table and plot on the sweep's run; register the best trial's adaptor."""
    from jobs.tracking import register_run_adaptor

    parent.out_dir = str(out)
    for f in ("table.md", "trials.json", "score_vs_params.png"):
        parent.log_artifact(out / f)
    result = {}
    if best:
        parent.log_metrics({f"best_{a.metric}": best["score"]})
        parent.set_tags({"best_trial_run_id": best["mlflow_run_id"]})
    if best and best["adaptor_dir"] and best["mlflow_run_id"]:
        model_name = a.register or f"{a.task}-{a.method}"
        alias, trial_run_id = f"best-{name}", best["mlflow_run_id"]
        v = parent._guard(
            "registry",
            register_run_adaptor,
            parent.uri,
            trial_run_id,
            best["adaptor_dir"],
            base_cfg,
            model_name,
            alias=alias,
            extra_tags={"sweep": name},
        )
        if v is not None:
            result.update(registered_model=model_name, registered_version=int(v.version))
            result["registered_alias"] = alias
    parent.end("FINISHED")
    return {**result, **parent.outcome()}


if __name__ == "__main__":
    main()
