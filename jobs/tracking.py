"""MLflow tracking and the model registry for the jobs (the library never imports MLflow).

Default: an embedded store, nothing to start: `sqlite:///<cwd>/mlflow.db` with artifacts in
`<cwd>/mlartifacts/<experiment>`. `--tracking-uri http://host:port` (or $MLFLOW_TRACKING_URI)
points at an `mlflow server`; `--no-tracking` turns it all off.

A `Tracker` opens one run per job in the task's experiment (`lora-diffusion/<task>`), logs the
flattened config as params, every `report(step, metrics)` of the training loop, final metrics,
system tags and the run's files; `log_model` logs a pyfunc model (`jobs/adaptor_model.py`) and
optionally registers it. Only rank 0 logs. A server that is unreachable at start fails the job
before training (exit 2); one that drops mid-run only costs the logging: the results are in
OUTPUT_DIR already, and the job ends normally with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys
from pathlib import Path

from jobs.common import fail

ADAPTOR_MODEL_CODE = Path(__file__).with_name("adaptor_model.py")
EXPERIMENT_PREFIX = "lora-diffusion"


def add_tracking_flags(
    p: argparse.ArgumentParser, register_help: str, register_flag: str = "--register"
) -> None:
    g = p.add_argument_group("tracking (MLflow)")
    g.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (http://..., sqlite:///..., postgresql://...); default "
        "$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db",
    )  # fmt: skip
    g.add_argument("--experiment", default=None, help="experiment name (default: per task)")
    g.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    g.add_argument(register_flag, dest="register", nargs="?", const="", default=None,
                   metavar="NAME", help=register_help)  # fmt: skip
    g.add_argument("--alias", default=None, help="with --register: set this alias on the version")
    g.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run tag, repeatable (e.g. study=data_size)")  # fmt: skip


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

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                            "MLFLOW_HTTP_REQUEST_TIMEOUT")}  # fmt: skip
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # any transport or server error means: do not start training
        fail(f"MLflow tracking server {uri} is unreachable ({str(e)[:200]}); start it, "
             "pass another --tracking-uri, or --no-tracking")  # fmt: skip
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    # During the run: few, short retries, so a dropped server cannot stall training for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class Tracker:
    """One MLflow run of a job. Every method is a no-op when disabled, on ranks other than 0,
    and after the first logging failure (which is reported once, as a warning)."""

    def __init__(self, enabled: bool = True, rank: int = 0) -> None:
        self.active = enabled and rank == 0
        self.run_id: str | None = None
        self.failed: str | None = None
        self.out_dir: str | None = None

    @classmethod
    def from_args(cls, a, experiment: str, run_name: str, rank: int = 0) -> Tracker:
        """Check the flags, reach the store and start the run; exits 2 on any problem."""
        if a.no_tracking and (a.register is not None or a.alias):
            fail("--register/--alias need tracking; drop --no-tracking")
        if a.alias and a.register is None:
            fail("--alias needs --register")
        tags = parse_tags(getattr(a, "tags", []))
        t = cls(enabled=not a.no_tracking, rank=rank)
        if t.active:
            t.start(tracking_uri(a.tracking_uri), a.experiment or experiment, run_name)
            if tags:
                import mlflow

                t._guard("tags", mlflow.set_tags, tags)
        return t

    def start(self, uri: str, experiment: str, run_name: str) -> None:
        check_reachable(uri)
        import mlflow

        try:
            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location(uri, experiment))
            mlflow.set_experiment(experiment)
            self.run_id = mlflow.start_run(run_name=run_name).info.run_id
            mlflow.set_tags(system_tags())
        except Exception as e:
            fail(f"cannot start an MLflow run at {uri}: {e}")
        self.uri = uri

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.active or self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # logging must never cost the results of a finished run
            self.failed = f"{what}: {type(e).__name__}: {str(e)[:300]}"
            where = f"; the run's files are in {self.out_dir}" if self.out_dir else ""
            print(f"warning: MLflow logging stopped ({self.failed}){where}", file=sys.stderr)
            return None

    def log_config(self, cfg, **tags: str) -> None:
        import mlflow

        self.out_dir = getattr(cfg, "output_dir", None)
        self._guard("params", mlflow.log_params, flatten(dataclasses.asdict(cfg)))
        self._guard("tags", mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """The training loop's callback: every logged step's metrics, at that step."""
        import mlflow

        m = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self._guard("metrics", mlflow.log_metrics, m, step=step)

    def finish(self, result: dict, out_dir: str | Path) -> None:
        """Final scalar results as metrics, and the run's files as artifacts."""
        import mlflow

        final = {k: float(v) for k, v in result.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        self._guard("final metrics", mlflow.log_metrics, final, step=int(result.get("steps", 0)))
        out = Path(out_dir)
        for name in ("metrics.json", "history.json", "config.json", "adaptor_report.json"):
            if (out / name).is_file():
                self._guard("artifacts", mlflow.log_artifact, str(out / name))
        if (out / "plots").is_dir():
            self._guard("artifacts", mlflow.log_artifacts, str(out / "plots"), "plots")

    def log_model(self, artifacts: dict[str, str], config: dict, name: str | None,
                  tags: dict, alias: str | None = None) -> dict:  # fmt: skip
        """Log a pyfunc model of `artifacts` (base and/or adaptor folders); with `name`,
        register it with version `tags` (and `alias`). Returns the keys for the job's results."""
        info = self._guard("model", _log_pyfunc, artifacts, config)
        if info is None:
            return {}
        out = {"mlflow_model_uri": info.model_uri}
        self._guard("tags", _set_run_tag, "model_uri", info.model_uri)
        if name is not None:
            v = self._guard("registry", register, info.model_uri, name, tags, alias)
            if v is not None:
                out.update(registered_model=name, registered_version=int(v.version))
                self._guard("tags", _set_run_tag, "registered_model", name)
        return out

    def worker_spec(self) -> dict | None:
        """What a Ray worker needs to log into this run (see `RunLogger`); None when off."""
        if not self.active or self.failed:
            return None
        return {"uri": self.uri, "run_id": self.run_id}

    def close(self) -> dict:
        """End the run; returns the keys the job adds to its results."""
        import mlflow

        if not self.active:
            return {}
        self._guard("end", mlflow.end_run, "FINISHED")
        if self.failed:
            return {"mlflow_run_id": self.run_id, "tracking_error": self.failed}
        return {"mlflow_run_id": self.run_id}

    def abort(self) -> None:
        """End the run as FAILED (the job raised)."""
        import mlflow

        if self.active and not self.failed:
            try:
                mlflow.end_run("FAILED")
            except Exception:  # already failing; the job's own error is the one to show
                pass


class RunLogger:
    """Per-step metrics from a training worker (rank 0) into the driver's run, by run id.
    Like Tracker, it warns once and stops at the first failure: training goes on."""

    def __init__(self, spec: dict | None) -> None:
        self.spec, self.failed = spec, False
        if spec:
            from mlflow import MlflowClient

            self.client = MlflowClient(spec["uri"])

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if not self.spec or self.failed:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
        try:
            self.client.log_batch(self.spec["run_id"], metrics=batch)
        except Exception as e:  # the server dropped: keep training, results stay on disk
            self.failed = True
            print(f"warning: MLflow metric logging stopped: {str(e)[:300]}", file=sys.stderr)


def _set_run_tag(key: str, value: str) -> None:
    import mlflow

    mlflow.set_tag(key, value)


def _log_pyfunc(artifacts: dict[str, str], config: dict):
    import mlflow
    import torch
    import transformers

    reqs = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", "safetensors", "pandas",
            "lora-diffusion"]  # fmt: skip
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
    import mlflow

    from jobs.adaptor_model import build_denoiser, resolve_base

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    model = mlflow.models.Model.load(local)
    flavor = model.flavors["python_function"]
    paths = {k: str(local / v["path"]) for k, v in flavor.get("artifacts", {}).items()}
    config = flavor.get("config") or {}  # the model_config it was logged with
    if base is None:
        base = resolve_base(config["base_uri"]) if config.get("base_uri") else paths["base"]
    return build_denoiser(base, paths.get("adaptor"), config.get("task"))


def track_adaptor(tracker: Tracker, a, cfg, result: dict) -> dict:
    """After `finetune`: log the run's results and files and the adaptor model (with its base
    copied in, or referenced with --base-artifact reference); register it with --register."""
    if not tracker.active:
        return {}
    from lora_diffusion.methods import read_method_config

    tracker.finish(result, cfg.output_dir)
    adaptor_dir = result["adaptor_dir"]
    fingerprint = read_method_config(adaptor_dir).get("base_fingerprint")
    lineage = tracker._guard("lineage", find_base_version, fingerprint, a.base_model_name)
    base_name, base_version = lineage or (a.base_model_name, None)
    tags = {"task": cfg.task, "method": cfg.method, "base_fingerprint": fingerprint,
            "base_name": base_name, "base_version": base_version}  # fmt: skip
    tracker._guard("tags", _set_tags, tags)
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


def register_run_adaptor(run_id: str, adaptor_dir: str, cfg, name: str,
                         alias: str | None = None, extra_tags: dict | None = None):  # fmt: skip
    """Log `adaptor_dir` (with a copy of the base folder) as a pyfunc model on an existing run
    (a sweep's best trial) and register it as a new version of `name`, tagged like
    `track_adaptor`'s versions, with `alias`."""
    import mlflow

    from lora_diffusion.methods import read_method_config

    fingerprint = read_method_config(adaptor_dir).get("base_fingerprint")
    base_name, base_version = find_base_version(fingerprint)
    tags = {"task": cfg.task, "method": cfg.method, "base_fingerprint": fingerprint,
            "base_name": base_name, "base_version": base_version, **(extra_tags or {})}  # fmt: skip
    artifacts = {"adaptor": str(adaptor_dir)}
    if Path(cfg.base).is_dir():
        artifacts["base"] = str(Path(cfg.base).resolve())
    with mlflow.start_run(run_id=run_id):
        info = _log_pyfunc(artifacts, {"task": cfg.task, "base_uri": None})
        mlflow.set_tag("model_uri", info.model_uri)
    return register(info.model_uri, name, tags, alias)


def track_base(tracker: Tracker, a, cfg, result: dict) -> dict:
    """After `pretrain`: log results and files, and the base as a pyfunc model; register it
    with --register-base (tags kind=base and its fingerprint, for adaptors' lineage)."""
    if not tracker.active:
        return {}
    from lora_diffusion.adaptor_io import base_fingerprint
    from lora_diffusion.models import load_base

    tracker.finish(result, cfg.output_dir)
    model_dir = str(Path(result["model_dir"]).resolve())
    tags = {"kind": "base", "base_fingerprint": base_fingerprint(load_base(model_dir)[0]),
            "preset": cfg.preset, "heldout_loss": result.get("heldout_loss")}  # fmt: skip
    tracker._guard("tags", _set_tags, tags)
    name = None if a.register is None else a.register or f"base-{cfg.preset}"
    return tracker.log_model({"base": model_dir}, {"task": None}, name, tags, a.alias)


def _scalar(v) -> bool:
    return isinstance(v, int | float | str) and not isinstance(v, bool)


def _set_tags(tags: dict) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})


def run_name(cfg) -> str:
    """Method, task and the settings that tell runs apart (lora_diffusion-sst2-r64-k2-lr0.002):
    each method's `run_name_knobs`. No timestamp: the run id already tells reruns apart."""
    from lora_diffusion.methods import METHODS

    knobs = METHODS.get(cfg.method).run_name_parts(cfg) if cfg.method in METHODS else []
    return "-".join([cfg.method, cfg.task, *knobs, f"lr{cfg.train.lr:g}"])
