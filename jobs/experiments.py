"""Run the paper's experiments on one base, tracked in MLflow, then rebuild the report.

    python jobs/experiments.py --base runs/base-tapt/model --quick   # the quick set
    python jobs/experiments.py --base runs/base-tapt/model --bases runs/base-tiny/model  # all

(`make experiments` pretrains both bases first when they are missing.)

Stages (--stages, run in this order; default: all of them):
  methods    every method x every seed on --task: Tables 5/6/7/8/9, loss curves, Figure 1
             (score vs trainable parameters) and Figure 2 (effective rank by phase)
  data_size  LoRA-Diffusion and weight LoRA on growing training subsets: Figure 3
  ablations  the rank-schedule and modules-per-phase sweeps (jobs/sweep.py): Tables 10, 11
  tasks      one LoRA-Diffusion adaptor per --tasks; the zero-shot merge of them with fixed
             uniform weights (jobs/compose.py); a router trained over them (jobs/multitask.py
             --router-only); the t-SNE of their trajectory perturbations: Figure 4
  bases      --base-methods on --base and on every --bases folder (other base sizes): Table
             12; nothing without --bases
  report     jobs/report.py over --experiment: REPORT_DIR/RESULTS.md and figures/

Every job runs in this process, one after another, without Ray (one machine; on a cluster
submit the jobs themselves), and every run lands in MLflow experiment --experiment with a tag
`study=<stage>`. A rerun skips the jobs whose output folder holds finished results, so an
interrupted set continues where it stopped. A failed job is reported and the others go on;
the exit status is 1 if any failed. Scales: --quick (a few methods, 1 seed, short runs) or the
full set; any knob below overrides the scale's value.
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
import time
from pathlib import Path

from jobs.common import PAPER_METHODS, add_set_flag, base_parser, emit, fail
from jobs.tracking import TRACKING_URI_HELP, check_reachable, tracking_uri

STAGES = ("methods", "data_size", "ablations", "tasks", "bases", "report")
SCALES = {
    "full": {
        "methods": ",".join(PAPER_METHODS),
        "seeds": "0,1,2",
        "max_steps": 400,
        "eval_limit": 300,
        "data_sizes": "250,1000,4000,16000",
        "data_methods": "lora_diffusion,weight_lora",
        "tasks": "sst2,trec,agnews",
        "spaces": "table10_ranks,table11_k",
        "tsne_per_task": 64,
        "base_methods": "lora_diffusion,weight_lora",
    },
    "quick": {
        "methods": "lora_diffusion,weight_lora,bitfit",
        "seeds": "0",
        "max_steps": 100,
        "eval_limit": 100,
        "data_sizes": "250,2000",
        "data_methods": "lora_diffusion,weight_lora",
        "tasks": "sst2,trec",
        "spaces": "",
        "tsne_per_task": 32,
        "base_methods": "lora_diffusion",
    },
}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], training=False, base=True)
    p.add_argument("--output-dir", default="runs/experiments", help="every job's folder")
    p.add_argument("--report-dir", default="docs", help="RESULTS.md and figures/ go here")
    p.add_argument("--experiment", default="lora-diffusion/paper", help="MLflow experiment")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--quick", action="store_true", help="the quick scale (~20 min)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of stages to run")
    p.add_argument("--task", default="sst2", help="the task of methods/data_size/ablations")
    p.add_argument("--methods", default=None, help="methods stage: comma list")
    p.add_argument("--seeds", default=None, help="methods stage: comma list of seeds")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps of every run")
    p.add_argument("--eval-limit", type=int, default=None, help="eval examples of every run")
    p.add_argument("--data-sizes", default=None, help="data_size stage: training-set sizes")
    p.add_argument("--data-methods", default=None, help="data_size stage: methods")
    p.add_argument("--tasks", default=None, help="tasks stage: comma list (>= 2)")
    p.add_argument("--spaces", default=None, help="ablations stage: tune_spaces/ names")
    p.add_argument("--tsne-per-task", type=int, default=None, help="t-SNE: examples per task")
    p.add_argument(
        "--bases", default="", help="bases stage: further base folders (other sizes), comma list"
    )
    p.add_argument("--base-methods", default=None, help="bases stage: methods")
    p.add_argument("--train-limit", type=int, default=None, help="methods/tasks: train subset")
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_set_flag(p, "config override passed to every training job, repeatable")
    for action in p._actions:  # the scale's values are these flags' defaults
        if action.dest in SCALES["full"]:
            full, quick = SCALES["full"][action.dest], SCALES["quick"][action.dest]
            action.help += f" (default: {full}; with --quick: {quick})"
    a = p.parse_args(argv)
    scale = SCALES["quick" if a.quick else "full"]
    for key, value in scale.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.stages = [s for s in a.stages.split(",") if s]
    unknown = [s for s in a.stages if s not in STAGES]
    if unknown:
        fail(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    return a


def split(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


class Runner:
    """Runs jobs in this process, prints progress, keeps what each returned or why it failed."""

    def __init__(self, a, command: str = "") -> None:
        self.a = a
        self.command = command  # what makes (or, finished, skips) every run: for the report
        self.uri = tracking_uri(a.tracking_uri)  # absolute, for this process's own client
        # what the jobs are given: the user's spelling, so the report's rebuild commands read
        # as they typed it (each job makes a relative store absolute itself)
        self.uri_flag = a.tracking_uri or self.uri
        self.out = Path(a.output_dir)
        self.results: list[dict] = []
        self.started = time.time()

    def tracked(self, study: str) -> dict:
        """The arguments of every job that logs runs: the store, experiment and study tag."""
        a = self.a
        return {
            "tracking_uri": self.uri_flag,
            "experiment": a.experiment,
            "tags": [f"study={study}"],
            "data_dir": a.data_dir,
        }

    def training(self) -> dict:
        """The arguments every training job shares: this process, no bar, the scale's budget."""
        a = self.a
        given = {"batch_size": a.batch_size, "threads": a.threads}
        return {
            "no_ray": True,
            "no_progress": True,
            "max_steps": a.max_steps,
            "eval_limit": a.eval_limit,
            "base_artifact": "reference",
            "json": True,
            "overrides": list(a.overrides),
            **{k: v for k, v in given.items() if v is not None},
        }

    def call(self, label: str, job, args, done: Path | None) -> dict | None:
        """`job.run(args)` (a job module and its `Args`), recorded with the command that reruns
        it alone."""
        script = f"python jobs/{job.__name__.rsplit('.', 1)[-1]}.py "
        return self.job(label, lambda: job.run(args), done, script + shlex.join(args.argv()))

    def job(self, label: str, work, done: Path | None, command: str = "") -> dict | None:
        """Run `work()` unless `done` exists (a finished earlier run: its JSON is kept)."""
        n = len(self.results) + 1
        elapsed = time.time() - self.started
        if done is not None and done.is_file():
            print(f"[{n}] {label}: done before, skipped ({done})", flush=True)
            result = json.loads(done.read_text())
            self.results.append({"job": label, "status": "skipped", "result": result})
            return result
        print(f"[{n}] {label} (at {elapsed / 60:.1f} min)", flush=True)
        start = time.time()
        import mlflow

        record = {"job": label, **({"command": command} if command else {})}
        previous_uri = mlflow.get_tracking_uri()  # jobs set it process-wide; put it back after
        try:
            result = work()
        except SystemExit as e:  # a job's clear error: reported, the others go on
            self.results.append({**record, "status": "failed", "exit": e.code})
            print(f"[{n}] {label}: FAILED (exit {e.code})", flush=True)
            return None
        except Exception as e:  # noqa: BLE001 - one broken job must not cost the others
            self.results.append({**record, "status": "failed", "error": repr(e)[:500]})
            print(f"[{n}] {label}: FAILED ({e!r})", flush=True)
            return None
        finally:
            mlflow.set_tracking_uri(previous_uri)
        seconds = time.time() - start
        self.results.append({**record, "status": "ok", "seconds": round(seconds, 1)})
        print(f"[{n}] {label}: {seconds:.0f} s", flush=True)
        return result

    def ran(self) -> bool:
        """Whether the last job ran now and finished (not skipped, not failed)."""
        return bool(self.results) and self.results[-1]["status"] == "ok"

    def train(self, label: str, study: str, out: Path, base: str = "", **fields) -> dict | None:
        """A jobs/train.py run of `fields` on `base` (default --base), in `out`."""
        from jobs import train

        args = train.Args(
            base=base or self.a.base,
            output_dir=str(out),
            **self.tracked(study),
            **self.training(),
            **fields,
        )
        return self.call(label, train, args, out / "metrics.json")


def stage_methods(r: Runner) -> None:
    a = r.a
    for method, seed in itertools.product(split(a.methods), split(a.seeds)):
        out = r.out / "methods" / f"{method}-s{seed}"
        run = {"method": method, "task": a.task, "seed": int(seed), "train_limit": a.train_limit}
        r.train(f"methods: {method} seed {seed}", "methods", out, **run)


def stage_data_size(r: Runner) -> None:
    a = r.a
    for n, method in itertools.product(split(a.data_sizes), split(a.data_methods)):
        out = r.out / "data_size" / f"{method}-n{n}"
        run = {"method": method, "task": a.task, "train_limit": int(n)}
        r.train(f"data size: {method} n={n}", "data_size", out, **run)


def stage_ablations(r: Runner) -> None:
    from jobs import sweep

    a = r.a
    root = Path(__file__).resolve().parent.parent / "tune_spaces"
    for space in split(a.spaces):
        out = r.out / "ablations" / space
        args = sweep.Args(
            space=str(root / f"{space}.yaml"),
            task=a.task,
            base=a.base,
            output_dir=str(out),
            max_steps=a.max_steps,
            eval_limit=a.eval_limit,
            scheduler="none",
            # no early stopping, so one evaluation at the end (sweep.py's default of every 50
            # steps would evaluate each trial 8 times at the full scale)
            eval_every=a.max_steps,
            json=True,
            overrides=list(a.overrides),
            **r.tracked("ablations"),
        )
        r.call(f"ablations: {space}", sweep, args, out / "trials.json")


def stage_bases(r: Runner) -> None:
    a = r.a
    if not split(a.bases):
        print("bases: no --bases given, nothing to compare across base sizes", flush=True)
        return
    for i, base in enumerate([a.base, *split(a.bases)]):
        for method in split(a.base_methods):
            name = Path(base).parent.name if Path(base).name == "model" else Path(base).name
            out = r.out / "bases" / f"{i}-{name}-{method}"
            r.train(f"bases: {method} on {base}", "bases", out, base, method=method, task=a.task)


def stage_tasks(r: Runner) -> None:
    from jobs import compose, multitask

    a = r.a
    tasks = split(a.tasks)
    if len(tasks) < 2:
        fail(f"the tasks stage needs at least two --tasks, got {tasks}")
    dirs = {}
    for task in tasks:
        out = r.out / "tasks" / task
        label = f"tasks: lora_diffusion on {task}"
        if r.train(label, "tasks", out, task=task, train_limit=a.train_limit) is not None:
            dirs[task] = out / "adaptor"
    if len(dirs) < 2:
        print("tasks: fewer than two task adaptors trained; no composition", flush=True)
        return
    adaptors = [f"{task}={d}" for task, d in dirs.items()]
    data = {"data_dir": a.data_dir, "eval_limit": a.eval_limit, "json": True}
    out = r.out / "tasks" / "compose.json"
    args = compose.Args(base=a.base, adaptor=adaptors, output=str(out), **data)
    result = r.call("tasks: zero-shot merge (uniform weights)", compose, args, out)
    if r.ran():
        log_result(r, "zero-shot merge", "compose", result, out)
    mt_out = r.out / "tasks" / "router"
    args = multitask.Args(
        base=a.base,
        tasks=",".join(dirs),
        adaptor=adaptors,
        router_only=True,
        output_dir=str(mt_out),
        max_steps=a.max_steps,
        no_progress=True,
        **data,
    )
    label = "tasks: router over the task adaptors"
    result = r.call(label, multitask, args, mt_out / "metrics.json")
    if r.ran():
        log_result(r, "router composition", "multitask", result, mt_out / "metrics.json")
    fig = r.out / "tasks" / "perturbations_tsne.png"
    done = r.out / "tasks" / "tsne.json"
    result = r.job("tasks: t-SNE of trajectory perturbations", lambda: tsne(r, dirs, fig), done)
    if r.ran():
        done.write_text(json.dumps(result, indent=2))
        log_result(r, "trajectory perturbations", "analysis", result, done, [fig])


def tsne(r: Runner, dirs: dict, fig: Path) -> dict:
    from lora_diffusion.analysis import perturbation_map
    from lora_diffusion.composition import AdaptedDenoiser
    from lora_diffusion.models import load_base

    base, tok = load_base(r.a.base)
    model = AdaptedDenoiser.from_pretrained(base, dict(dirs))
    return perturbation_map(
        model, tok, list(dirs), fig, per_task=r.a.tsne_per_task, data_dir=r.a.data_dir
    )


def log_result(r: Runner, name: str, kind: str, result: dict, file: Path, figures=()) -> None:
    """An MLflow run (tag kind) holding a non-training job's numbers, its JSON and figures."""
    from jobs.tracking import MlflowRun

    tags = {"kind": kind, "study": "tasks", "base": r.a.base}
    run = MlflowRun.start(r.uri, r.a.experiment, name, tags)
    run.log_metrics(flat_numbers(result))
    run.log_artifact(file)
    for f in figures:
        run.log_artifact(f, "figures")
    run.end()


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a.b": x} (MLflow metric names)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_numbers(v, key + "."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and v == v:
            out[key] = float(v)
    return out


def stage_report(r: Runner) -> None:
    from jobs import report

    args = report.Args(
        experiment=[r.a.experiment],
        tracking_uri=r.uri_flag,
        output_dir=r.a.report_dir,
        made_by=r.command,
        json=True,
    )
    r.call("report", report, args, None)


def main(argv=None) -> dict:
    args = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(args)
    for base in [a.base, *split(a.bases)]:
        if not Path(base, "config.json").is_file():
            fail(f"base {base!r} not found (a saved model folder with config.json)")
    uri = tracking_uri(a.tracking_uri)
    check_reachable(uri)
    # the report names the command that made the runs: the last one that ran a stage of jobs
    command, made_by = (
        "python jobs/experiments.py " + shlex.join(args),
        Path(a.output_dir, "command.txt"),
    )
    if set(a.stages) - {"report"}:
        made_by.parent.mkdir(parents=True, exist_ok=True)
        made_by.write_text(command + "\n")
    r = Runner(a, made_by.read_text().strip() if made_by.is_file() else command)
    print(
        f"experiments: stages {', '.join(a.stages)} on {a.base}; MLflow {uri} "
        f"experiment {a.experiment}",
        flush=True,
    )
    stages = {
        "methods": stage_methods,
        "data_size": stage_data_size,
        "ablations": stage_ablations,
        "tasks": stage_tasks,
        "bases": stage_bases,
        "report": stage_report,
    }
    for stage in a.stages:
        stages[stage](r)
    failed = [x for x in r.results if x["status"] == "failed"]
    result = {
        "jobs": r.results,
        "failed": len(failed),
        "minutes": round((time.time() - r.started) / 60, 1),
    }
    r.out.mkdir(parents=True, exist_ok=True)
    (r.out / "experiments.json").write_text(json.dumps(result, indent=2, default=str))
    emit(result, a.json)
    if failed:
        print(
            f"{len(failed)} job(s) failed: " + ", ".join(x["job"] for x in failed), file=sys.stderr
        )
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
