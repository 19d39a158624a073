"""Write the paper's tables and figures from finished MLflow runs: RESULTS.md and figures/.

    python jobs/report.py --experiment lora-diffusion/sst2 --output-dir docs

Reads the runs of every --experiment (narrowed by --runs-filter) and writes
OUTPUT_DIR/RESULTS.md: method comparison (finished jobs/train.py runs, mean ± std over seeds),
efficiency, convergence and forgetting, and one table per sweep (jobs/sweep.py's parent run and
its nested trial runs); PNG figures go to OUTPUT_DIR/figures/. Every cell comes from a run, every
table names its runs and the command that rebuilds it; absent values print as "—". Unless
--no-log, the files are logged as artifacts of a new run named `report` in the first experiment.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from jobs.common import base_parser, emit, fail
from jobs.tracking import TRACKING_URI_HELP, check_reachable, tracking_uri

PARENT_TAG = "mlflow.parentRunId"  # set on jobs/sweep.py's trial runs
NOT_TRAINING = {"sweep", "base", "report"}  # tag `kind` of sweep parents, pretraining, reports
# A run's own peak (finetune.PeakMemory). Not `peak_mb`: older runs logged the process's
# high-water mark under it, which charges each run with the runs before it in that process.
PEAK_MEMORY_KEYS = ("train_peak_mb",)
ABSENT = "—"
SELF_FULL = ("lora_diffusion", "full")  # the rows the paper's efficiency claims compare against

# Columns: (header, value key, scale, format). Keys are run metrics or the derived ones of
# `run_values`; a cell is the mean (± sample std) over a row's runs.
METHOD_COLUMNS = (
    ("gen. acc. (%)", "eval_accuracy", 100, "{:.1f}"),
    ("scoring acc. (%)", "eval_accuracy_scoring", 100, "{:.1f}"),
    ("scoring AUC", "eval_auc_scoring", 1, "{:.3f}"),
    ("train loss", "train_loss", 1, "{:.3f}"),
    ("trainable (%)", "trainable_pct", 1, "{:.3f}"),
    ("steps", "steps", 1, "{:.0f}"),
)
EFFICIENCY_COLUMNS = (
    ("trainable params", "trainable_params", 1, "{:,.0f}"),
    ("storage fp32 (MB)", "storage_mb", 1, "{:.3f}"),
    ("storage bf16 (MB)", "storage_mb_bf16", 1, "{:.3f}"),
    ("train seconds", "train_seconds", 1, "{:.1f}"),
    ("peak memory (MB)", "peak_memory", 1, "{:.0f}"),
)
CONVERGENCE_COLUMNS = (
    ("initial loss", "initial_loss", 1, "{:.3f}"),
    ("final loss", "final_loss", 1, "{:.3f}"),
    ("reduction (%)", "loss_reduction_pct", 1, "{:.1f}"),
    ("convergence step", "convergence_step", 1, "{:.0f}"),
    ("forgetting (nats/token)", "forgetting", 1, "{:+.4f}"),
)

_BY_KEY = {c[1]: c for c in (*METHOD_COLUMNS, *EFFICIENCY_COLUMNS, *CONVERGENCE_COLUMNS)}
BASE_KEYS = (
    "eval_accuracy",
    "eval_accuracy_scoring",
    "trainable_pct",
    "train_seconds",
    "forgetting",
)
BASE_COLUMNS = tuple(_BY_KEY[k] for k in BASE_KEYS)  # Table 12: a few of the columns above


def parser():
    p = base_parser(__doc__.splitlines()[0], training=False)
    p.add_argument(
        "--experiment",
        action="append",
        required=True,
        metavar="NAME",
        help="MLflow experiment to read (repeatable); the report run goes to the first",
    )
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--output-dir", default="docs", help="RESULTS.md and figures/ go here")
    p.add_argument(
        "--runs-filter",
        default="",
        metavar="FILTER",
        help="MLflow search filter on the runs: \"tags.method = 'x'\"",
    )
    p.add_argument("--no-log", action="store_true", help="do not log a `report` run to MLflow")
    p.add_argument(
        "--made-by",
        default="",
        metavar="COMMAND",
        help="the command that made the runs, stated under the title",
    )
    return p


Args = parser().args_class  # the flags as a dataclass: run(Args(...)) from Python
parse_args = Args.parse


# ---- reading runs -----------------------------------------------------------------------------


def find_experiments(client, names: list[str]) -> dict[str, str]:
    """{experiment id: name}; exits 2 naming an unknown experiment and listing the known ones."""
    found = {}
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments(max_results=1000))
            fail(f"unknown experiment {name!r}; known: {', '.join(known) or '(none)'}")
        found[exp.experiment_id] = name
    return found


def search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every active run of the experiments matching the filter, page by page, oldest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def is_training_run(run) -> bool:
    """A finished jobs/train.py run: task and method tags, no sweep parent, no other kind."""
    tags = run.data.tags
    return (
        run.info.status == "FINISHED"
        and "task" in tags
        and "method" in tags
        and PARENT_TAG not in tags
        and tags.get("kind") not in NOT_TRAINING
    )


def loss_history(client, run) -> list[tuple[int, float]]:
    """(step, loss) points of the run's per-step `loss` metric, by step."""
    points = client.get_metric_history(run.info.run_id, "loss")
    return sorted((m.step, m.value) for m in points)


def run_values(run, history: list[tuple[int, float]]) -> dict[str, float]:
    """The run's final metrics plus what the tables derive: initial/final loss, its reduction,
    peak memory (the first of PEAK_MEMORY_KEYS the run logged)."""
    vals = {k: v for k, v in run.data.metrics.items() if math.isfinite(v)}
    peak = next((vals[k] for k in PEAK_MEMORY_KEYS if k in vals), None)
    if peak is not None:
        vals["peak_memory"] = peak
    if history:
        vals["initial_loss"] = history[0][1]
        vals["final_loss"] = vals.get("train_loss", history[-1][1])
        if vals["initial_loss"]:
            drop = vals["initial_loss"] - vals["final_loss"]
            vals["loss_reduction_pct"] = 100 * drop / vals["initial_loss"]
    return vals


def seed_of(run) -> str:
    params = run.data.params
    return params.get("train.seed", params.get("seed", "?"))


# ---- tables -----------------------------------------------------------------------------------


def cell(values: list[dict], key: str, scale: float, spec: str) -> str:
    """Mean over the runs that have `key`; ± the sample std when the values differ; (k/n) when
    only k of the n runs have it."""
    xs = [v[key] * scale for v in values if key in v]
    if not xs:
        return ABSENT
    text = spec.format(statistics.fmean(xs))
    if len(set(xs)) > 1:
        text += " ± " + spec.replace("+", "").format(statistics.stdev(xs))
    return text + (f" ({len(xs)}/{len(values)})" if len(xs) < len(values) else "")


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def run_ref(run) -> str:
    return f"`{run.info.run_name}` ({run.info.run_id})"


def provenance(groups: dict, experiments: dict, command: str) -> list[str]:
    """Which runs made which row (by experiment), and the command that rebuilds the table."""
    lines = [f"Made from {sum(len(rs) for rs in groups.values())} runs:"]
    for (task, method), runs in groups.items():
        exps = sorted({experiments[r.info.experiment_id] for r in runs})
        refs = ", ".join(run_ref(r) for r in runs)
        lines.append(f"- {task} / {method} (experiment {', '.join(exps)}): {refs}")
    return lines + ["", f"Rebuild: `{command}`"]


def grouped_table(groups, values, columns, extra: dict | None = None) -> list[str]:
    """One row per (task, method): n, every run's seed, a cell per column, then `extra`'s
    columns ({header: {(task, method): cell}})."""
    extra = extra or {}
    rows = []
    for key, runs in groups.items():
        vals = [values[r.info.run_id] for r in runs]
        seeds = ", ".join(sorted((seed_of(r) for r in runs), key=_order))  # repeats kept
        rows.append(
            [
                *key,
                str(len(runs)),
                seeds,
                *(cell(vals, *c[1:]) for c in columns),
                *(col[key] for col in extra.values()),
            ]
        )
    return markdown(["task", "method", "n", "seeds", *(c[0] for c in columns), *extra], rows)


def vs_full(groups, values) -> dict:
    """A column: each row's mean generative accuracy over the `full` row's of its task, in %."""
    acc = {}
    for key, runs in groups.items():
        xs = [values[r.info.run_id].get("eval_accuracy") for r in runs]
        xs = [x for x in xs if x is not None]
        acc[key] = statistics.fmean(xs) if xs else None
    col = {}
    for task, method in groups:
        mine, full = acc[(task, method)], acc.get((task, "full"))
        col[(task, method)] = ABSENT if mine is None or not full else f"{100 * mine / full:.1f}"
    return {"gen. acc. vs full (%)": col}


def mean_of(groups, values, key, task, method) -> float | None:
    xs = [values[r.info.run_id].get(key) for r in groups.get((task, method), [])]
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def paper_table(groups, values) -> list[str]:
    """The paper's claims on SST-2 beside what these runs measured, one row per claim, per task
    of the method comparison."""
    pct = lambda x, spec="{:.1f}%": ABSENT if x is None else spec.format(100 * x)
    rows = []
    for task in sorted({t for t, _ in groups}):
        get = lambda key, method, task=task: mean_of(groups, values, key, task, method)
        ld, full = (
            get("eval_accuracy_scoring", "lora_diffusion"),
            get("eval_accuracy_scoring", "full"),
        )
        others = {m: get("eval_accuracy_scoring", m) for t, m in groups if t == task}
        efficient = [(v, m) for m, v in others.items() if v is not None and m not in SELF_FULL]
        best = max(efficient, default=None)
        share = get("trainable_pct", "lora_diffusion")
        memory = get("peak_memory", "lora_diffusion"), get("peak_memory", "full")
        prefix = get("loss_reduction_pct", "prefix")
        below = [m for m, v in others.items() if v is not None and v < 0.5]
        rows += [
            [task, "LoRA-Diffusion comes close to full fine-tuning",
             f"scoring {pct(ld)} vs full {pct(full)}"],
            [task, "LoRA-Diffusion beats the other parameter-efficient methods",
             ABSENT if best is None else f"scoring {pct(ld)} vs best other {pct(best[0])} "
             f"({best[1]})"],
            [task, "training needs a fraction of full fine-tuning's memory",
             ABSENT if None in memory or not memory[1] else f"peak {memory[0]:.0f} MB vs full "
             f"{memory[1]:.0f} MB ({memory[0] / memory[1]:.2f} x)"],
            [task, "under 1% of the base's parameters train",
             ABSENT if share is None else f"{share:.2f}% (the share falls with the base's width)"],
            [task, "prefix tuning could not be made to train",
             ABSENT if prefix is None else f"prefix lowered its training loss by {prefix:.1f}%"],
            [task, "some baselines below chance on a balanced binary task",
             f"below 50% by scoring here: {', '.join(sorted(below)) or 'none'} (sampling noise "
             "of the eval subset: a constant answer scores the class share)"],
        ]  # fmt: skip
    return markdown(["task", "the paper's claim", "measured here"], rows) if rows else []


def sweeps(client, runs) -> list[tuple]:
    """(parent run, its child runs) for every run with nested children among `runs`."""
    children = defaultdict(list)
    for r in runs:
        if PARENT_TAG in r.data.tags:
            children[r.data.tags[PARENT_TAG]].append(r)
    by_id = {r.info.run_id: r for r in runs}
    return [(by_id.get(pid) or client.get_run(pid), kids) for pid, kids in children.items()]


def swept_keys(children) -> list[str]:
    """Params that differ among the children: jobs/sweep.py's `sweep.*` params when present."""
    keys = sorted({k for c in children for k in c.data.params})
    if any(k.startswith("sweep.") for k in keys):
        keys = [k for k in keys if k.startswith("sweep.")]
    else:  # every trial writes to its own folder
        keys = [k for k in keys if k not in ("output_dir", "resume_from")]
    return [k for k in keys if len({c.data.params.get(k) for c in children}) > 1]


def sweep_section(parent, children, experiments, command) -> list[str]:
    keys = swept_keys(children)
    header = [k.removeprefix("sweep.") for k in keys]
    header += ["score (%)", "eval gold loss", "trainable params", "status", "run"]
    rows = []
    for c in sorted(children, key=lambda c: [_order(c.data.params.get(k, "")) for k in keys]):
        m = c.data.metrics
        rows.append(
            [c.data.params.get(k, ABSENT) for k in keys]
            + [
                cell([m], "eval_accuracy_scoring", 100, "{:.1f}"),
                cell([m], "eval_gold_loss", 1, "{:.4f}"),
                cell([m], "trainable_params", 1, "{:,.0f}"),
                c.info.status.lower(),
                run_ref(c),
            ]
        )
    name = parent.data.tags.get("sweep", parent.info.run_name)
    p = parent.data.params
    return [
        f"### Sweep `{name}` (task {p.get('task', ABSENT)}, method {p.get('method', ABSENT)})",
        "",
        "Score: candidate-scoring accuracy (`eval_accuracy_scoring`, the last logged value: "
        "stopped trials show their last evaluation).",
        "",
        *markdown(header, rows),
        "",
        f"Made from sweep run {run_ref(parent)} and its {len(children)} child runs (the run "
        f"column), experiment {experiments.get(parent.info.experiment_id, ABSENT)}.",
        "",
        f"Rebuild: `{command}`",
        "",
        f"![sweep {name}](figures/{sweep_figure(name)})",
        "",
    ]


def sweep_figure(name: str) -> str:
    return "sweep-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".png"


# ---- figures ----------------------------------------------------------------------------------


def method_label(name: str) -> str:
    """A method's name in prose (its `Method.label`): "weight LoRA" for weight_lora."""
    from lora_diffusion.methods import METHODS

    return METHODS.get(name).label if name in METHODS else name


def plot_loss_curves(groups, histories, path: Path) -> Path:
    """One panel per task, one line per run, coloured by method."""
    from lora_diffusion.plots import pyplot, save_figure

    tasks = sorted({task for task, _ in groups})
    methods = sorted({method for _, method in groups})
    fig, axes = pyplot().subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in methods:
            with_loss = [r for r in groups.get((task, method), []) if histories[r.info.run_id]]
            for i, r in enumerate(with_loss):
                steps, losses = zip(*histories[r.info.run_id], strict=True)
                ax.plot(
                    steps,
                    losses,
                    color=f"C{methods.index(method) % 10}",
                    alpha=0.8,
                    label=method_label(method) if i == 0 else None,
                )
        ax.set(xlabel="step", ylabel="loss", title=f"{task}: training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_score_vs_params(groups, values, path: Path) -> Path:
    """Scoring accuracy against trainable parameters (log x), one point per run."""
    from lora_diffusion.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 4))
    for (task, method), runs in groups.items():
        pts = [
            (v["trainable_params"], 100 * v["eval_accuracy_scoring"])
            for v in (values[r.info.run_id] for r in runs)
            if "trainable_params" in v and "eval_accuracy_scoring" in v
        ]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=f"{task} / {method_label(method)}")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="scoring accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_sweep(name: str, children, path: Path) -> Path:
    """Score against each swept param (a numeric axis when the values are numbers); trials that
    did not finish (stopped early, failed) in red."""
    from lora_diffusion.plots import pyplot, save_figure

    keys = swept_keys(children) or ["run"]
    scored = [c for c in children if "eval_accuracy_scoring" in c.data.metrics]
    ys = [100 * c.data.metrics["eval_accuracy_scoring"] for c in scored]
    colors = ["C0" if c.info.status == "FINISHED" else "C3" for c in scored]
    fig, axes = pyplot().subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [c.data.params.get(key, c.info.run_name) for c in scored]
        xs = [_number(v) for v in values]
        if any(x is None for x in xs):  # categorical: one tick per distinct value
            labels = sorted(set(values), key=_order)
            xs = [labels.index(v) for v in values]
            ax.set_xticks(
                range(len(labels)), [_short(v) for v in labels], rotation=25, ha="right", fontsize=7
            )
        ax.scatter(xs, ys, c=colors)
        ax.set(xlabel=key.removeprefix("sweep."), ylabel="scoring accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {name} (red: not finished)")
    return save_figure(fig, path)


def _short(text: str) -> str:
    """A param value for a tick label: a mapping of dotted keys as `k=v` pairs, compact JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict):
        return ", ".join(f"{k.split('.')[-1]}={_short(json.dumps(v))}" for k, v in value.items())
    return json.dumps(value, separators=(",", ":"))


def _order(text: str) -> tuple:
    """Numbers by value, then other values as text."""
    x = _number(text)
    return (x is None, x or 0.0, text)


def _number(text: str) -> float | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) else None


# ---- the job ----------------------------------------------------------------------------------


def section(title: str, body: list[str], missing: str = "") -> list[str]:
    return [f"## {title}", "", *(body or [f"_Skipped: {missing}._"]), ""]


def training_sections(client, runs, experiments, command, figures: Path) -> tuple[list, list]:
    """The three tables over finished training runs, one row per (task, method); their figures."""
    groups = defaultdict(list)
    for r in filter(is_training_run, runs):
        if r.data.tags.get("study", "methods") == "methods":
            groups[(r.data.tags["task"], r.data.tags["method"])].append(r)
    groups = dict(sorted(groups.items()))
    titles = ("Method comparison", "Efficiency", "Convergence and forgetting")
    if not groups:
        none = "no finished training runs (tags task and method, not sweep trials)"
        return [ln for t in titles for ln in section(t, [], none)], []
    runs = [r for rs in groups.values() for r in rs]
    histories = {r.info.run_id: loss_history(client, r) for r in runs}
    values = {r.info.run_id: run_values(r, histories[r.info.run_id]) for r in runs}
    made = [
        plot_loss_curves(groups, histories, figures / "loss_curves.png"),
        plot_score_vs_params(groups, values, figures / "score_vs_params.png"),
    ]
    ranks = effective_ranks(client, groups)
    if ranks:
        made.append(plot_effective_ranks(ranks, figures / "effective_rank_by_phase.png"))
    prov = ["", *provenance(groups, experiments, command)]
    links = ["", *(f"![{p.stem}](figures/{p.name})" for p in made)]
    tables = (
        grouped_table(groups, values, METHOD_COLUMNS, vs_full(groups, values)),
        grouped_table(groups, values, EFFICIENCY_COLUMNS),
        grouped_table(groups, values, CONVERGENCE_COLUMNS),
    )
    lines = []
    for title, table in zip(titles, tables, strict=True):
        lines += section(title, table + prov + (links if title == titles[-1] else []))
    lines += section(
        "Against the paper",
        [
            "What the paper reports, next to what these runs measured on this project's base "
            "(a base this small is far weaker than the paper's; where the two differ, the runs "
            "above are the record):",
            "",
            *paper_table(groups, values),
        ],
    )
    lines += section(
        "Effective rank by phase",
        effective_rank_table(ranks),
        "no LoRA-Diffusion run with an adaptor_report.json artifact",
    )
    return lines, made


def effective_ranks(client, groups) -> dict:
    """{(task, phase, rank, sigma): [effective rank of W_A of each module of each run]} from
    the adaptor_report.json artifact of the lora_diffusion runs."""
    import mlflow.artifacts

    out = defaultdict(list)
    for (task, method), runs in groups.items():
        if method != "lora_diffusion":
            continue
        for r in runs:
            try:
                text = mlflow.artifacts.load_text(f"{r.info.artifact_uri}/adaptor_report.json")
                modules = json.loads(text)["modules"]
            except Exception:  # noqa: BLE001 - a run without the file simply adds nothing
                continue
            for m in modules:
                key = (task, int(m["phase"]), int(m["rank"]), float(m["sigma"]))
                out[key].append(float(m["effective_rank_up"]))
    return dict(sorted(out.items()))


def effective_rank_table(ranks: dict) -> list[str]:
    if not ranks:
        return []
    rows = [
        [
            task,
            str(phase),
            str(rank),
            f"{sigma:g}",
            str(len(xs)),
            cell([{"x": x} for x in xs], "x", 1, "{:.2f}"),
        ]
        for (task, phase, rank, sigma), xs in ranks.items()
    ]
    return [
        "Effective rank (exp of the entropy of the normalised singular values, the paper's "
        "definition) of each module's up-projection W_A, mean ± std over the modules of the "
        "phase in every LoRA-Diffusion run of the method comparison (phase 0: the earliest, "
        "noisiest steps).",
        "",
        *markdown(["task", "phase", "rank", "sigma", "modules", "effective rank"], rows),
        "",
        "![effective rank by phase](figures/effective_rank_by_phase.png)",
    ]


def plot_effective_ranks(ranks: dict, path: Path) -> Path:
    from lora_diffusion.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 4))
    tasks = sorted({k[0] for k in ranks})
    for i, task in enumerate(tasks):
        keys = [k for k in ranks if k[0] == task]
        xs = [k[1] for k in keys]
        ys = [statistics.fmean(ranks[k]) for k in keys]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{task}: mean effective rank")
        ax.plot(xs, [k[2] for k in keys], "x--", color=f"C{i}", alpha=0.5, label=f"{task}: rank")
    ax.set(
        xlabel="phase (0 = early, noisy t)",
        ylabel="rank",
        yscale="log",
        title="effective rank of W_A across diffusion phases",
    )
    ax.set_xticks(sorted({k[1] for k in ranks}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def data_size_sections(client, runs, experiments, command, figures: Path) -> tuple[list, list]:
    """Accuracy against training-set size (runs tagged study=data_size), one line per method."""
    groups = defaultdict(list)
    for r in filter(is_training_run, runs):
        if r.data.tags.get("study") == "data_size":
            n = _number(r.data.params.get("train_limit", "null"))
            groups[(r.data.tags["method"], int(n) if n else 0)].append(r)
    title = "Accuracy against training-set size (Figure 3)"
    if not groups:
        return section(title, [], "no runs tagged study=data_size"), []
    groups = dict(sorted(groups.items()))
    values = {r.info.run_id: run_values(r, []) for rs in groups.values() for r in rs}
    rows = [
        [
            method,
            f"{n:,}",
            str(len(rs)),
            cell([values[r.info.run_id] for r in rs], "eval_accuracy_scoring", 100, "{:.1f}"),
            cell([values[r.info.run_id] for r in rs], "eval_accuracy", 100, "{:.1f}"),
            ", ".join(run_ref(r) for r in rs),
        ]
        for (method, n), rs in groups.items()
    ]
    from lora_diffusion.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 4))
    for i, method in enumerate(sorted({m for m, _ in groups})):
        pts = [
            (n, 100 * statistics.fmean(v))
            for (m, n), rs in groups.items()
            if m == method
            for v in [
                [
                    values[r.info.run_id]["eval_accuracy_scoring"]
                    for r in rs
                    if "eval_accuracy_scoring" in values[r.info.run_id]
                ]
            ]
            if v
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i}", label=method)
    ax.set(xscale="log", xlabel="training examples", ylabel="scoring accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    made = [save_figure(fig, figures / "accuracy_vs_data_size.png")]
    body = [
        *markdown(
            ["method", "train examples", "n", "scoring acc. (%)", "gen. acc. (%)", "runs"], rows
        ),
        "",
        f"Rebuild: `{command}`",
        "",
        "![accuracy vs data size](figures/accuracy_vs_data_size.png)",
    ]
    return section(title, body), made


def base_size_sections(client, runs, experiments, command, figures: Path) -> tuple[list, list]:
    """The comparison across base sizes (runs tagged study=bases), ordered by the base's size
    (trainable parameters / trainable share)."""
    groups = defaultdict(list)
    for r in filter(is_training_run, runs):
        if r.data.tags.get("study") == "bases":
            groups[(r.data.params.get("base", "?"), r.data.tags["method"])].append(r)
    title = "Across base sizes (Table 12)"
    if not groups:
        return section(title, [], "no runs tagged study=bases (jobs/experiments.py --bases)"), []
    values = {r.info.run_id: run_values(r, []) for rs in groups.values() for r in rs}

    def base_params(rs) -> float:
        vs = [values[r.info.run_id] for r in rs]
        sizes = [
            100 * v["trainable_params"] / v["trainable_pct"] for v in vs if v.get("trainable_pct")
        ]
        return statistics.fmean(sizes) if sizes else math.inf

    size = {key: base_params(rs) for key, rs in groups.items()}
    order = sorted(groups, key=lambda k: (size[k], k))
    rows = [
        [
            base,
            ABSENT if math.isinf(size[(base, m)]) else f"{size[(base, m)]:,.0f}",
            m,
            str(len(groups[(base, m)])),
            *(
                cell([values[r.info.run_id] for r in groups[(base, m)]], *col[1:])
                for col in BASE_COLUMNS
            ),
            ", ".join(run_ref(r) for r in groups[(base, m)]),
        ]
        for base, m in order
    ]
    header = ["base", "base params", "method", "n", *(c[0] for c in BASE_COLUMNS), "runs"]
    return section(title, [*markdown(header, rows), "", f"Rebuild: `{command}`"]), []


def multitask_sections(client, runs, experiments, command, figures: Path) -> tuple[list, list]:
    """Zero-shot merges (kind=compose), router composition (kind=multitask) and analysis
    figures (kind=analysis) logged by jobs/experiments.py."""
    import mlflow.artifacts

    body, made = [], []
    tables = (  # kind, metric key of task t and column k, columns, title
        ("compose", "{t}.{k}", ("accuracy_alone", "accuracy_composed", "accuracy_scoring_alone",
         "accuracy_scoring_composed"), ("gen. alone (%)", "gen. merged (%)",
         "scoring alone (%)", "scoring merged (%)"),
         "Zero-shot merge of adaptors trained apart, fixed weights"),
        ("multitask", "per_task.{t}.{k}", ("accuracy_oracle", "accuracy_router",
         "accuracy_scoring_router", "routing_accuracy"), ("gen. one-hot (%)", "gen. router (%)",
         "scoring router (%)", "routing acc. (%)"),
         "Router (2-layer MLP on Enc(c)) over the task adaptors"),
    )  # fmt: skip
    for kind, key, columns, headers, title in tables:
        for r in (r for r in runs if r.data.tags.get("kind") == kind):
            m = r.data.metrics
            prefix = key.split("{t}")[0]
            tasks = sorted(
                {
                    k[len(prefix) :].split(".")[0]
                    for k in m
                    if k.startswith(prefix) and "." in k[len(prefix) :]
                }
            )
            rows = [
                [t, *(cell([m], key.format(t=t, k=k), 100, "{:.1f}") for k in columns)]
                for t in tasks
            ]
            body += [f"{title} ({run_ref(r)}):", "", *markdown(["task", *headers], rows), ""]
    for r in (r for r in runs if r.data.tags.get("kind") == "analysis"):
        m = r.data.metrics
        try:
            local = mlflow.artifacts.download_artifacts(f"{r.info.artifact_uri}/figures")
        except Exception:  # noqa: BLE001 - the numbers still print
            local = None
        for f in sorted(Path(local).glob("*.png")) if local else []:
            target = figures / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
            made.append(target)
            body += [f"![{f.stem}](figures/{f.name})", ""]
        body += [
            f"Trajectory perturbations of each task's adaptor ({run_ref(r)}): "
            f"{cell([m], 'points', 1, '{:.0f}')} points; silhouette of the tasks "
            f"{cell([m], 'silhouette', 1, '{:.3f}')} in the hidden space, "
            f"{cell([m], 'silhouette_2d', 1, '{:.3f}')} in the t-SNE plane (-1..1; 0: "
            "the tasks' perturbations overlap).",
            "",
        ]
    if body:
        body += [f"Rebuild: `{command}`"]
    return section(
        "Multi-task composition (and Figure 4)", body, "no compose, multitask or analysis runs"
    ), made


def sweep_sections(client, runs, experiments, command, figures: Path) -> tuple[list, list]:
    """A table and a figure per sweep parent run."""
    body, made = [], []
    for parent, children in sweeps(client, runs):
        name = parent.data.tags.get("sweep", parent.info.run_name)
        body += sweep_section(parent, children, experiments, command)
        made.append(plot_sweep(name, children, figures / sweep_figure(name)))
    return section("Sweeps", body, "no runs with nested child runs"), made


def build_report(
    client, experiments: dict, runs: list, command: str, out: Path, made_by: str = ""
) -> list[Path]:
    """Write RESULTS.md and figures/ under `out`; returns the files written."""
    lines = [
        "# Results",
        "",
        *([f"Runs made by `{made_by}`.", ""] if made_by else []),
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from MLflow experiments "
        f"{', '.join(f'`{e}`' for e in experiments.values())} ({len(runs)} runs read). "
        f"Rebuild: `{command}`",
        "",
        "Cells are means over a row's runs ± their sample std (no ± : every run had the same "
        f"value); (k/n): only k of the n runs logged it; {ABSENT}: not logged.",
        "",
    ]
    made = []
    sections = (
        training_sections,
        data_size_sections,
        sweep_sections,
        base_size_sections,
        multitask_sections,
    )
    for make in sections:
        body, figs = make(client, runs, experiments, command, out / "figures")
        lines, made = lines + body, made + figs
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text("\n".join(lines).rstrip() + "\n")
    return [out / "RESULTS.md", *made]


def log_report(uri: str, experiment: str, files: list[Path], command: str) -> str:
    """A new run `report` holding RESULTS.md and the figures made (under figures/)."""
    from jobs.tracking import MlflowRun

    run = MlflowRun.start(uri, experiment, "report", {"kind": "report", "command": command[:5000]})
    for f in files:
        run.log_artifact(f, None if f.suffix == ".md" else "figures")
    run.end()
    return run.run_id


def main(argv=None) -> dict:
    a = parse_args(argv)
    args = list(sys.argv[1:] if argv is None else argv)
    # the tables' rebuild command leaves out --made-by: the header names the runs' own command
    if "--made-by" in args:
        i = args.index("--made-by")
        args = args[:i] + args[i + 2 :]
    args = [x for x in args if not x.startswith("--made-by=")]
    return run(a, "python jobs/report.py " + shlex.join(args))


def run(a: Args, command: str | None = None) -> dict:
    """Write the report of `a`'s experiments; `command`, the one each table says rebuilds it,
    defaults to `a`'s flags."""
    command = command or "python jobs/report.py " + shlex.join(
        a.argv(leave_out=("made_by", "data_dir", "json"))  # the data is not read; output: same
    )
    uri = tracking_uri(a.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        fail(f"no MLflow store at {uri} (pass --tracking-uri or set $MLFLOW_TRACKING_URI)")
    check_reachable(uri)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        experiments = find_experiments(client, a.experiment)
        runs = search_all(client, list(experiments), a.runs_filter)
        runs = [r for r in runs if r.data.tags.get("kind") != "report"]
        files = build_report(client, experiments, runs, command, Path(a.output_dir), a.made_by)
        result = {
            "results": str(files[0]),
            "figures": [str(f) for f in files[1:]],
            "runs": len(runs),
        }
        if not a.no_log:
            first = next(iter(experiments.values()))
            result["mlflow_run_id"] = log_report(uri, first, files, command)
    except MlflowException as e:
        fail(e.message)
    return emit(result, a.json)


if __name__ == "__main__":
    main()
