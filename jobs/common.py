"""Flags and output shared by every job: --output-dir, --max-steps, --seed, --data-dir, --json,
--set key=value overrides; the parser that answers --help and flag errors at once."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What --help states about the library, kept here so that --help and flag errors answer before
# the library is imported (it loads torch and transformers: ~5 s on 2 cores).
# tests/test_jobs.py checks each entry against the library, so a change there fails CI until it
# is made here too.
TASKS = ("agnews", "cola", "sst2", "trec")  # lora_diffusion.tasks.TASKS
METHOD_LR = {  # lora_diffusion.methods.METHODS, each with its Method.default_lr
    "lora_diffusion": 1e-3,
    "full": 3e-4,
    "weight_lora": 1e-3,
    "adapters": 1e-3,
    "bitfit": 5e-3,
    "prefix": 5e-3,
    "loreft": 2e-3,
    "nara": 1e-3,
}
# the methods with Method.in_paper, in the order the paper's tables list them
PAPER_METHODS = ("full", "lora_diffusion", "weight_lora", "adapters", "bitfit", "prefix")
PRESETS = ("tiny", "small", "sedd-small", "paper-350m", "paper-1.3b", "paper-7b")
FINETUNE_STEPS = 1000  # FinetuneConfig().train.max_steps
PRETRAIN_STEPS = 1500  # PretrainConfig's train.max_steps
MULTITASK_STEPS = 1000  # MultitaskConfig's train.max_steps
RANKS, K = "64", 2  # AdaptorConfig's ranks and k


# What a run prints is progress, results and errors: the libraries' own progress bars and INFO
# lines stay off the screen (a user's environment wins). Forwarded to Ray workers as well.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar too
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default once: not when it is None, False or empty, nor when the help
    text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default in ("", [], ())
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class JobParser(argparse.ArgumentParser):
    """A job's flags. An error is one line and a hint, as the jobs' own errors are; parsing
    imports nothing heavy, and the library is imported only after it (for --data-dir's
    default). `parse_args` returns the job's arguments dataclass (`args_class`)."""

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message: str):
        message = message.removeprefix("argument ").replace("invalid choice: ", "invalid choice ")
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")

    def parse_args(self, args=None, namespace=None):
        return self.args_class(**vars(super().parse_args(args, namespace)))

    @functools.cached_property
    def args_class(self) -> type:
        """The job's `JobArgs` dataclass (made once, after every flag is added); its `parse`
        is this parser's `parse_args`."""
        return job_args(self)


class JobArgs:
    """A job's arguments as a dataclass, one field per flag (`job_args` makes the class).

    The command line and Python callers (jobs/experiments.py) reach a job the same way:
    `train.run(train.Args(base=..., output_dir=..., method="bitfit"))` is checked as the flags
    are (a required flag missing, an unknown name, a value outside its choices or of the wrong
    type: exit 2 naming it), with every other field at its flag's default, and `argv()` gives
    the command line that reruns it."""

    _actions: tuple[argparse.Action, ...] = ()
    parse: Callable[[list[str] | None], JobArgs]  # the command line's arguments

    def __post_init__(self) -> None:
        for action in self._actions:
            value = getattr(self, action.dest)
            if value is None or value is action.default:
                continue
            number = {int: int, float: int | float}.get(action.type)
            if number and (isinstance(value, bool) or not isinstance(value, number)):
                fail(f"{_flag(action)}: expected {action.type.__name__}, got {value!r}")
            if action.choices is not None and value not in action.choices:
                known = ", ".join(map(str, action.choices))
                fail(f"{_flag(action)}: invalid choice {value!r} (choose from {known})")
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        if getattr(self, "data_dir", "") is None:
            self.data_dir = default_data_dir()

    def argv(self, leave_out: tuple[str, ...] = ()) -> list[str]:
        """The flags that give these arguments, those at their default left out."""
        out = []
        for action in self._actions:
            value = getattr(self, action.dest)
            if action.dest in leave_out or (value == action.default and not action.required):
                continue
            flag = _flag(action)
            if isinstance(action, argparse._StoreTrueAction):
                out += [flag] if value else []
            elif isinstance(action, argparse._AppendAction):
                out += [x for v in value for x in (flag, str(v))]
            elif value == action.const and action.nargs == "?":
                out.append(flag)
            else:
                out += [flag, str(value)]
        return out


def job_args(parser: argparse.ArgumentParser) -> type:
    """The keyword-only `JobArgs` dataclass of `parser`'s flags: a field per flag (its dest),
    defaulting to the flag's default; a required flag's field is required."""
    actions = tuple(a for a in parser._actions if a.default is not argparse.SUPPRESS)
    fields = []
    for action in actions:
        if action.required:
            spec = dataclasses.field()
        elif isinstance(action.default, list):
            spec = dataclasses.field(default_factory=list(action.default).copy)
        else:
            spec = dataclasses.field(default=action.default)
        fields.append((action.dest, object, spec))
    return dataclasses.make_dataclass(
        "Args",
        fields,
        bases=(JobArgs,),
        namespace={"_actions": actions, "parse": staticmethod(parser.parse_args)},
        kw_only=True,
    )


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def default_data_dir() -> str:
    """The library's lookup ($LORA_DIFFUSION_DATA_DIR, ../shared/data)."""
    from lora_diffusion import tasks

    try:
        return str(tasks.default_data_dir())
    except tasks.DataError:
        return str(REPO.parent / "shared" / "data")


def base_parser(
    description: str, training: bool = True, max_steps: int | None = None, base: bool = False
) -> JobParser:
    """The flags every job has; `base` adds --base (a job on a base model), `training`
    --output-dir, --max-steps (whose default, `max_steps`, the job's config holds) and --set."""
    p = JobParser(description)
    if base:
        p.add_argument("--base", required=True, help="base model folder (or hub id)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder of task data and corpus (default: $LORA_DIFFUSION_DATA_DIR, else "
        "../shared/data)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON of results")
    if training:
        p.add_argument("--output-dir", required=True, help="where the run writes its files")
        steps = f" (default: {max_steps})" if max_steps else ""
        p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps{steps}")
        add_set_flag(
            p, "dotted config override, repeatable (e.g. train.lr=1e-3, diffusion.steps=50)"
        )
    return p


def add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE`, repeatable, into `overrides` (for `config.apply_overrides`)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def finetune_config(a, train: dict | None = None, **fields):
    """A `FinetuneConfig` from the flags every training job shares (base, output dir, task,
    method, data, limits, batch size, seed, steps, --lr where the job has it), `fields` and
    `train` fields on top; without --lr the rate is the method's default."""
    import dataclasses

    from lora_diffusion.config import FinetuneConfig
    from lora_diffusion.methods import METHODS

    shared = "base output_dir task method data_dir train_limit eval_limit"
    cfg = from_flags(FinetuneConfig, a, shared, **fields)
    train_cfg = dataclasses.replace(cfg.train, lr=METHODS.get(a.method).default_lr)
    return dataclasses.replace(cfg, train=train_settings(a, train_cfg, **(train or {})))


def from_flags(config_class: type, a, names: str, **fields):
    """`config_class(...)` with each field in `names` (space-separated) set from the flag of the
    same name, and `fields` as given (those the job computes from its flags)."""
    return config_class(**{name: getattr(a, name) for name in names.split()}, **fields)


def add_task_flags(p: argparse.ArgumentParser, method: str | None = None) -> None:
    """`--task`, one of the shipped tasks (default sst2), and where `method` says what it is,
    `--method` (default lora_diffusion)."""
    if method is not None:
        p.add_argument(
            "--method",
            default="lora_diffusion",
            choices=METHOD_LR,
            metavar="METHOD",
            help=f"{method}, one of: " + ", ".join(METHOD_LR),
        )
    p.add_argument(
        "--task", default="sst2", choices=TASKS, metavar="TASK", help="one of: " + ", ".join(TASKS)
    )


def train_settings(a, train, **fields):
    """`train` (a `TrainConfig`) with the flags every training job shares: --batch-size, --seed
    and, when the job has them and they are given, --lr and --max-steps; `fields` on top (a
    sweep has no --lr: its rate is the method's default or its space's)."""
    import dataclasses

    shared = {"batch_size": a.batch_size, "seed": a.seed}
    given = {k: getattr(a, k, None) for k in ("lr", "max_steps")}
    given = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(train, **(shared | given | fields))


def config_error(e: Exception) -> str:
    """The message of a config error (a KeyError's str() would wrap it in quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def emit(result: dict, as_json: bool) -> dict:
    """Print results: a readable block, and with --json a final one-line JSON object. Returns
    `result` (a job ends `return emit(result, a.json)`)."""
    for k, v in result.items():
        if not isinstance(v, dict):
            print(f"{k}: {v}")
    if as_json:
        sys.stdout.flush()
        print(json.dumps(result, default=str))
    return result


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
