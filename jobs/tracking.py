"""MLflow tracking and the model registry for the jobs (the library never imports MLflow).

Default: an embedded store, nothing to start: `sqlite:///<cwd>/mlflow.db` with artifacts in
`<cwd>/mlartifacts/<experiment>`. `--tracking-uri http://host:port` (or $MLFLOW_TRACKING_URI)
points at an `mlflow server`; `--no-tracking` turns it all off.

Everything logs through one wrapper, `MlflowRun` (a run by id, through an `MlflowClient`): a
job's run, a Ray worker's metrics into its driver's run (`MlflowRun.attach`), a sweep and its
nested trials, the experiments' analysis runs, the report. A `Tracker` is a job's run: one per
job in the task's experiment (`lora-diffusion/<task>`), the flattened config as params, every
`report(step, metrics)` of the training loop, final metrics, system tags and the run's files;
`log_model` logs a pyfunc model (`jobs/adaptor_model.py`) and optionally registers it. Only
rank 0 logs. `tracking_uri` is the one rule for which store a flag names (Serve uses it too).
A server that is unreachable at start fails the job before training (exit 2); one that drops
mid-run only costs the logging: the results are in OUTPUT_DIR already, and the job ends
normally with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import os
import sys
from pathlib import Path

from jobs.common import emit, fail

ADAPTOR_MODEL_CODE = Path(__file__).with_name("adaptor_model.py")
EXPERIMENT_PREFIX = "lora-diffusion"
TRACKING_URI_HELP = (
    "MLflow tracking URI (http://..., sqlite:///..., postgresql://...); default "
    "$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"
)


def add_tracking_flags(
    p: argparse.ArgumentParser, register_help: str, register_flag: str = "--register"
) -> None:
    g = p.add_argument_group("tracking (MLflow)")
    g.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    g.add_argument("--experiment", default=None, help="experiment name (default: per task)")
    g.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    g.add_argument(
        register_flag,
        dest="register",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help=register_help,
    )
    g.add_argument("--alias", default=None, help="with --register: set this alias on the version")
    tag = "extra run tag, repeatable (e.g. study=data_size)"
    g.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE", help=tag)


def parse_tags(items: list[str]) -> dict[str, str]:
    """--tag KEY=VALUE items as a dict; exits 2 naming a malformed one."""
    tags = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            fail(f"--tag needs KEY=VALUE, got {item!r}")
        tags[key.strip()] = value
    return tags


def tracking_uri(flag: str | None) -> str:
    """The flag, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the cwd; a
    relative SQLite or file-store path is made absolute here, in the process that was given
    it: Ray Tune runs each trial in its own working directory, where the same relative path
    would name a new, empty store (the trials' runs would land there, out of sight)."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return absolute_uri(uri)


def absolute_uri(uri: str) -> str:
    """`sqlite:///runs/x.db` -> `sqlite:////<cwd>/runs/x.db`, `./mlruns` -> `/<cwd>/mlruns`;
    absolute paths, servers and databases unchanged."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{Path(path).resolve()}"
        return uri
    if "://" not in uri and not uri.startswith(("file:", "databricks")) and not os.path.isabs(uri):
        return str(Path(uri).resolve())  # a local file store given as a plain path
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite file, in the cwd for other
    databases, the server's choice for http(s)."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    root = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path.cwd()
    return (root / "mlartifacts" / experiment).resolve().as_uri()


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}: MLflow params, dotted like --set."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def system_tags(workers: int = 1) -> dict[str, str]:
    import torch

    tags = {
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "workers": str(workers),
        "python": sys.version.split()[0],
    }
    try:  # the version only: importing Ray costs seconds
        tags["ray_version"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pass
    return tags


def check_reachable(uri: str, timeout: int = 5) -> None:
    """Fail the job (exit 2) when the tracking server does not answer one quick call."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient

    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # any transport or server error means: do not start training
        fail(
            f"MLflow tracking server {uri} is unreachable ({str(e)[:200]}); start it, "
            "pass another --tracking-uri, or --no-tracking"
        )
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    # During the run: few, short retries, so a dropped server cannot stall training for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


RUN_FILES = ("metrics.json", "history.json", "config.json", "adaptor_report.json")


def metrics_of(d: dict) -> dict[str, float]:
    """The numbers of a result or report dict as MLflow metrics (bools and strings left out)."""
    numbers = {k: v for k, v in d.items() if isinstance(v, int | float)}
    return {k: float(v) for k, v in numbers.items() if not isinstance(v, bool)}


class MlflowRun:
    """One MLflow run, addressed by id through an `MlflowClient`: the one wrapper through which
    every job, training worker, sweep trial, sweep and report logs. After the first failure it
    warns once and logs nothing more: logging must never cost the results of a run (they are
    on disk already). A run with no `uri` (tracking off, or not rank 0) logs nothing."""

    def __init__(
        self, uri: str | None = None, run_id: str | None = None, experiment: str | None = None
    ) -> None:
        self.uri, self.run_id, self.experiment = uri, run_id, experiment
        self.failed: str | None = None
        self.out_dir: str | None = None  # named in the warning: where the results still are
        self.client = None
        if uri and run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        name: str,
        tags: dict | None = None,
        parent: str | None = None,
    ) -> MlflowRun:
        """A new run in `experiment` (created, with its artifacts beside the store, if new),
        nested under run id `parent` when given. Raises what MLflow raises."""
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location(uri, experiment))
        else:
            exp_id = exp.experiment_id
        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        return cls(uri, run_id, experiment)

    @classmethod
    def attach(cls, spec: dict | None) -> MlflowRun:
        """The run a `spec()` names (a Ray worker logging into its driver's run)."""
        return cls(spec["uri"], spec["run_id"]) if spec else cls()

    @property
    def active(self) -> bool:
        return self.client is not None and self.failed is None

    def spec(self) -> dict | None:
        """What another process needs to log into this run; None when logging is off."""
        return {"uri": self.uri, "run_id": self.run_id} if self.active else None

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.failed = f"{what}: {type(e).__name__}: {str(e)[:300]}"
            where = f"; the run's files are in {self.out_dir}" if self.out_dir else ""
            print(f"warning: MLflow logging stopped ({self.failed}){where}", file=sys.stderr)
            return None

    def _call(self, what: str, method: str, *args, **kwargs):
        """`MlflowClient.<method>(run_id, ...)`, guarded; nothing when logging is off."""
        if self.active:
            self._guard(what, getattr(self.client, method), self.run_id, *args, **kwargs)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the store's per-request limit
            self._call("params", "log_batch", params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        self._call("tags", "log_batch", tags=items)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        """The numbers in `metrics` at `step` (a training loop's `report` callback)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics_of(metrics).items()]
        self._call("metrics", "log_batch", metrics=batch)

    def report(self, step: int, metrics: dict) -> None:
        """The training loop's callback: every logged step's metrics, at that step."""
        self.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", "log_artifact", str(path), artifact_path)

    def log_run_files(self, result: dict, out_dir: str | Path, dirs=("plots",)) -> None:
        """A finished job's results as metrics (at its last step) and its files as artifacts."""
        self.log_metrics(result, step=int(result.get("steps", 0)))
        out = Path(out_dir)
        for name in RUN_FILES:
            if (out / name).is_file():
                self.log_artifact(out / name)
        for sub in dirs:
            if (out / sub).is_dir():
                self._call("artifacts", "log_artifacts", str(out / sub), sub)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended: FINISHED, FAILED (the job raised) or KILLED."""
        if self.client is None:
            return
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # a failing job's own error is the one to show
            if status == "FINISHED" and not self.failed:
                self.failed = f"end: {type(e).__name__}: {str(e)[:300]}"
                print(f"warning: MLflow logging stopped ({self.failed})", file=sys.stderr)

    def outcome(self) -> dict:
        """The keys a job adds to its results: the run id, and why logging stopped if it did."""
        if self.run_id is None:
            return {}
        error = {"tracking_error": self.failed} if self.failed else {}
        return {"mlflow_run_id": self.run_id, **error}


class Tracker(MlflowRun):
    """The MLflow run of a job (train, pretrain): opened from the job's flags on rank 0, its
    config as params, every `report(step, metrics)` of the training loop, final results, files,
    system tags and the pyfunc model (`log_model`), registered on request."""

    @classmethod
    def from_args(cls, a, experiment: str, run_name: str, rank: int = 0) -> Tracker:
        """Check the flags, reach the store and start the run; exits 2 on any problem."""
        if a.no_tracking and (a.register is not None or a.alias):
            fail("--register/--alias need tracking; drop --no-tracking")
        if a.alias and a.register is None:
            fail("--alias needs --register")
        if a.no_tracking or rank != 0:
            return cls()
        uri = tracking_uri(a.tracking_uri)
        check_reachable(uri)
        tags = {**system_tags(), **parse_tags(getattr(a, "tags", []))}
        try:
            run = cls.start(uri, a.experiment or experiment, run_name, tags)
        except Exception as e:
            fail(f"cannot start an MLflow run at {uri}: {e}")
        import mlflow

        mlflow.set_tracking_uri(uri)  # the registry helpers (lineage, register) use it
        return run

    def log_config(self, cfg, **tags: str) -> None:
        self.out_dir = getattr(cfg, "output_dir", None)
        self.log_params(flatten(dataclasses.asdict(cfg)))
        self.set_tags(tags)

    def log_model(
        self,
        artifacts: dict[str, str],
        config: dict,
        name: str | None,
        tags: dict,
        alias: str | None = None,
    ) -> dict:
        """Log a pyfunc model of `artifacts` (base and/or adaptor folders); with `name`,
        register it with version `tags` (and `alias`). Returns the keys for the job's results."""
        info = self._guard("model", _log_pyfunc, self.uri, self.run_id, artifacts, config)
        if info is None:
            return {}
        out = {"mlflow_model_uri": info.model_uri}
        self.set_tags({"model_uri": info.model_uri})
        if name is not None:
            v = self._guard("registry", register, info.model_uri, name, tags, alias)
            if v is not None:
                out.update(registered_model=name, registered_version=int(v.version))
                self.set_tags({"registered_model": name})
        return out

    def close(self) -> dict:
        """End the run; returns the keys the job adds to its results."""
        self.end("FINISHED")
        return self.outcome()

    def abort(self) -> None:
        """End the run as FAILED (the job raised)."""
        self.end("FAILED")

    @contextlib.contextmanager
    def failing(self, *expected: type[Exception]):
        """Around the job's work: anything it raises (an exit too) ends the run as FAILED; an
        `expected` error exits 2 with its message (`fail`), not a traceback."""
        try:
            yield self
        except expected as e:
            self.abort()
            fail(str(e))
        except BaseException:
            self.abort()
            raise

    def finish(self, result: dict, as_json: bool) -> dict:
        """End the run, add its keys to the job's `result`, print it (`emit`) and return it."""
        result.update(self.close())
        return emit(result, as_json)


def _log_pyfunc(uri: str, run_id: str, artifacts: dict[str, str], config: dict):
    """Log a pyfunc model of `artifacts` on run `run_id` of store `uri` (MLflow logs models
    into the active run only: the run is resumed for it)."""
    import mlflow
    import torch
    import transformers

    reqs = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        "safetensors",
        "pandas",
        "lora-diffusion",
    ]
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="adaptor" if "adaptor" in artifacts else "base",
            python_model=str(ADAPTOR_MODEL_CODE),
            artifacts=artifacts,
            model_config=config,
            pip_requirements=reqs,  # listed: MLflow's inference would cost seconds per job
        )


def register(model_uri: str, name: str, tags: dict, alias: str | None = None):
    """A new version of registered model `name` from `model_uri`, tagged; `alias` moved to it."""
    import mlflow

    tags = {k: str(v) for k, v in tags.items() if v is not None}
    version = mlflow.register_model(model_uri, name, tags=tags)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def find_base_version(fingerprint: str | None, name: str | None = None):
    """(name, version) of the registered base with this fingerprint, or (name, None)."""
    if not fingerprint:
        return name, None
    from mlflow import MlflowClient

    query = f"tags.kind = 'base' and tags.base_fingerprint = '{fingerprint}'"
    if name:
        query += f" and name = '{name}'"
    found = MlflowClient().search_model_versions(query, max_results=1)
    return (found[0].name, found[0].version) if found else (name, None)


def load_registered_adaptor(model_uri: str, base: str | None = None):
    """(denoiser, tokenizer) of a logged or registered adaptor (`models:/sst2-ld@production`,
    `models:/sst2-ld/3`, `models:/<model id>`), ready for `evaluate_all`. `base` overrides the
    base folder the model carries or references; the base fingerprint is checked either way."""

    from jobs.adaptor_model import build_denoiser, download_model, resolve_base

    paths, config = download_model(model_uri)  # config: the model_config it was logged with
    if base is None:
        base = resolve_base(config["base_uri"]) if config.get("base_uri") else paths["base"]
    return build_denoiser(base, paths.get("adaptor"), config.get("task"))


def lineage_tags(cfg, adaptor_dir: str, base_name: str | None = None) -> dict:
    """An adaptor version's tags: task, method, and the base it was trained on (its fingerprint,
    and the registered base of that fingerprint when there is one)."""
    from lora_diffusion.methods import read_method_config

    fingerprint = read_method_config(adaptor_dir).get("base_fingerprint")
    found = find_base_version(fingerprint, base_name)
    tags = {"task": cfg.task, "method": cfg.method, "base_fingerprint": fingerprint}
    return {**tags, "base_name": found[0], "base_version": found[1]}


def track_adaptor(tracker: Tracker, a, cfg, result: dict) -> dict:
    """After `finetune`: log the run's results and files and the adaptor model (with its base
    copied in, or referenced with --base-artifact reference); register it with --register."""
    if not tracker.active:
        return {}

    tracker.log_run_files(result, cfg.output_dir)
    adaptor_dir = result["adaptor_dir"]
    tags = tracker._guard("lineage", lineage_tags, cfg, adaptor_dir, a.base_model_name)
    if tags is None:  # the store failed: logging has stopped, nothing more to log
        return {}
    base_name, base_version = tags["base_name"], tags["base_version"]
    tracker.set_tags(tags)
    tags.update({k: v for k, v in result.items() if k.startswith("eval_") and _scalar(v)})
    artifacts = {"adaptor": adaptor_dir}
    base_uri = None
    if a.base_artifact == "copy" and Path(cfg.base).is_dir():
        artifacts["base"] = str(Path(cfg.base).resolve())
    elif base_version is not None:
        base_uri = f"models:/{base_name}/{base_version}"
    else:  # a local folder on a shared disk, or a hub id
        base_uri = str(Path(cfg.base).resolve()) if Path(cfg.base).exists() else cfg.base
    name = None if a.register is None else a.register or f"{cfg.task}-{cfg.method}"
    config = {"task": cfg.task, "base_uri": base_uri}
    return tracker.log_model(artifacts, config, name, tags, a.alias)


def register_run_adaptor(
    uri: str,
    run_id: str,
    adaptor_dir: str,
    cfg,
    name: str,
    alias: str | None = None,
    extra_tags: dict | None = None,
):
    """Log `adaptor_dir` (with a copy of the base folder) as a pyfunc model on an existing run
    (a sweep's best trial) and register it as a new version of `name`, tagged like
    `track_adaptor`'s versions, with `alias`."""
    import mlflow

    mlflow.set_tracking_uri(uri)  # find_base_version and register read it
    tags = {**lineage_tags(cfg, adaptor_dir), **(extra_tags or {})}
    artifacts = {"adaptor": str(adaptor_dir)}
    if Path(cfg.base).is_dir():
        artifacts["base"] = str(Path(cfg.base).resolve())
    info = _log_pyfunc(uri, run_id, artifacts, {"task": cfg.task, "base_uri": None})
    MlflowRun(uri, run_id).set_tags({"model_uri": info.model_uri})
    return register(info.model_uri, name, tags, alias)


def track_base(tracker: Tracker, a, cfg, result: dict) -> dict:
    """After `pretrain`: log results and files, and the base as a pyfunc model; register it
    with --register-base (tags kind=base and its fingerprint, for adaptors' lineage)."""
    if not tracker.active:
        return {}
    from lora_diffusion.adaptor_io import base_fingerprint
    from lora_diffusion.models import load_base

    tracker.log_run_files(result, cfg.output_dir)
    model_dir = str(Path(result["model_dir"]).resolve())
    tags = {
        "kind": "base",
        "base_fingerprint": base_fingerprint(load_base(model_dir)[0]),
        "preset": cfg.preset,
        "heldout_loss": result.get("heldout_loss"),
    }
    tracker.set_tags(tags)
    name = None if a.register is None else a.register or f"base-{cfg.preset}"
    return tracker.log_model({"base": model_dir}, {"task": None}, name, tags, a.alias)


def _scalar(v) -> bool:
    return isinstance(v, int | float | str) and not isinstance(v, bool)


def run_name(cfg) -> str:
    """Method, task and the settings that tell runs apart (lora_diffusion-sst2-r64-k2-lr0.002):
    each method's `run_name_knobs`. No timestamp: the run id already tells reruns apart."""
    from lora_diffusion.methods import METHODS

    knobs = METHODS.get(cfg.method).run_name_parts(cfg) if cfg.method in METHODS else []
    return "-".join([cfg.method, cfg.task, *knobs, f"lr{cfg.train.lr:g}"])
