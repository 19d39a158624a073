"""What a Serve replica loads: one base and every task adaptor registered for it under an alias.

The MLflow registry is the source of truth. Each registered model version that holds a
LoRA-Diffusion adaptor (logged by `jobs/train.py --register`, or a sweep's best) carries tags
`task`, `method` and `base_fingerprint`; `discover` lists the versions an alias points to,
`load_engine` downloads them, loads the base once and puts every adaptor whose base fingerprint
matches on it (others are skipped and reported, or refused when named explicitly), plus an
optional router, into a `lora_diffusion.serving.ServingEngine`. No Ray here either.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_diffusion.adaptor_io import (
    AdaptorFileError,
    adaptor_report,
    base_fingerprint,
    load_adaptor,
    load_router,
)
from lora_diffusion.composition import AdaptedDenoiser
from lora_diffusion.models import load_base
from lora_diffusion.serving import ServingEngine

log = logging.getLogger("lora_diffusion.serve")


class LoadError(RuntimeError):
    """The app cannot start (or reload) with these settings; the message says why."""


@dataclass
class AdaptorInfo:
    task: str
    name: str  # registered model
    version: int
    alias: str
    run_id: str | None
    metrics: dict = field(default_factory=dict)  # eval_* tags of the version
    trainable_params: int | None = None
    trainable_pct: float | None = None


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def discover(tracking_uri: str, alias: str, names: list[str] | None = None) -> dict[str, int]:
    """{registered model: version} of the adaptor models `alias` points to: all of them, or the
    named ones (each must have the alias). Bases (tag kind=base) are never included."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    if names is None:
        models = client.search_registered_models(max_results=1000)
        found = {m.name: int(m.aliases[alias]) for m in models if alias in (m.aliases or {})}
    else:
        found = {}
        for name in names:
            try:
                found[name] = int(client.get_model_version_by_alias(name, alias).version)
            except MlflowException as e:
                raise LoadError(
                    f"registered model {name!r} has no version with alias "
                    f"{alias!r} ({e.message[:200]})"
                ) from None
    versions = {}
    for name, version in sorted(found.items()):
        tags = client.get_model_version(name, str(version)).tags
        if tags.get("kind") == "base":
            continue
        if tags.get("method", "lora_diffusion") != "lora_diffusion":
            if names is not None:
                raise LoadError(
                    f"{name} v{version} is a {tags['method']!r} adaptor; the app "
                    "composes LoRA-Diffusion adaptors only"
                )
            log.warning("skipping %s v%s: method %s", name, version, tags["method"])
            continue
        versions[name] = version
    return versions


def _download(uri: str, tracking_uri: str) -> tuple[dict[str, Path], dict]:
    """(artifact name -> local path, model_config) of a logged pyfunc model."""
    import mlflow

    from jobs.adaptor_model import download_model

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return download_model(uri)


def _base_dir(spec: str, tracking_uri: str) -> str:
    if spec.startswith("models:/"):
        paths, _ = _download(spec, tracking_uri)
        if "base" not in paths:
            raise LoadError(f"{spec} holds no base model")
        return str(paths["base"])
    return spec


@dataclass
class Loaded:
    engine: ServingEngine
    versions: dict[str, int]  # registered model -> version
    adaptors: list[AdaptorInfo]
    skipped: list[str]
    base: dict
    router_tasks: list[str] | None
    base_model: tuple = ()  # (model, tokenizer, fingerprint): reused by reloads

    def describe(self) -> dict:
        return {
            "base": self.base,
            "adaptors": [asdict(a) for a in self.adaptors],
            "router": {"tasks": self.router_tasks} if self.router_tasks else None,
            "skipped": self.skipped,
        }


def load_engine(
    tracking_uri: str,
    alias: str = "production",
    names: list[str] | None = None,
    base: str | None = None,
    router: str | None = None,
    base_model=None,
    *,
    max_length: int = 128,
    num_t: int = 8,
    device: str = "cpu",
) -> Loaded:
    """Load the base (once: pass `base_model=(model, tokenizer, fingerprint)` to reuse it on a
    reload) and every adaptor `alias` points to; see the module docstring."""
    client = _client(tracking_uri)
    versions = discover(tracking_uri, alias, names)
    if not versions:
        raise LoadError(
            f"no LoRA-Diffusion adaptor has the alias {alias!r} in {tracking_uri}; "
            "register one (jobs/train.py --register --alias ...)"
        )
    fetched = {}
    for name, version in versions.items():
        paths, config = _download(f"models:/{name}/{version}", tracking_uri)
        if "adaptor" not in paths:
            raise LoadError(f"{name} v{version} holds no adaptor")
        fetched[name] = (paths, config, client.get_model_version(name, str(version)))
    if base_model is None:
        if base is None:  # the base the newest-registered adaptor carries or references
            paths, config, _ = fetched[max(fetched, key=lambda n: fetched[n][2].creation_timestamp)]
            base = str(paths["base"]) if "base" in paths else config.get("base_uri")
            if not base:
                raise LoadError("no base given and the adaptors carry none: set `base`")
        try:
            model, tok = load_base(_base_dir(base, tracking_uri))
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot load the base {base!r}: {e}") from None
        model = model.to(device)
        base_model = (model, tok, base_fingerprint(model))
    model, tok, fingerprint = base_model
    adaptors, infos, skipped, kept = {}, [], [], {}
    for name, (paths, config, mv) in fetched.items():
        tags = mv.tags
        if tags.get("base_fingerprint") not in (None, fingerprint):
            trained_on = tags["base_fingerprint"]
            msg = f"{name} v{mv.version}: trained on base {trained_on}, not {fingerprint}"
            if names is not None:
                raise LoadError(msg)
            skipped.append(msg)
            log.warning("skipping %s", msg)
            continue
        try:
            adaptor, acfg = load_adaptor(paths["adaptor"], model)
        except AdaptorFileError as e:
            raise LoadError(f"{name} v{mv.version}: {e}") from None
        task = tags.get("task") or config.get("task") or acfg.get("task") or name
        if task in adaptors:
            raise LoadError(
                f"two adaptors for task {task!r}: {kept[task]} and {name}; name the "
                "ones to serve (`adaptors:`)"
            )
        adaptors[task], kept[task] = adaptor, name
        report = adaptor_report(adaptor, model)
        infos.append(
            AdaptorInfo(
                task=task,
                name=name,
                version=int(mv.version),
                alias=alias,
                run_id=mv.run_id,
                metrics={k: _number(v) for k, v in tags.items() if k.startswith("eval_")},
                trainable_params=report["trainable_params"],
                trainable_pct=round(report["trainable_pct"], 4),
            )
        )
    if not adaptors:
        raise LoadError(f"none of the adaptors with alias {alias!r} fits the base: {skipped}")
    routing, router_tasks = None, None
    if router:
        try:
            routing, router_tasks = load_router(router, model)
        except AdaptorFileError as e:
            raise LoadError(str(e)) from None
        missing = [t for t in router_tasks if t not in adaptors]
        if missing:
            raise LoadError(
                f"the router routes to {missing}, which have no adaptor loaded "
                f"(loaded: {sorted(adaptors)})"
            )
    composed = AdaptedDenoiser(model, adaptors, routing, router_tasks).to(device)
    engine = ServingEngine(composed, tok, max_length=max_length, num_t=num_t)
    info = {
        "fingerprint": fingerprint,
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_size": model.config.hidden_size,
    }
    return Loaded(
        engine,
        {n: versions[n] for n in kept.values()},
        infos,
        skipped,
        info,
        router_tasks,
        base_model,
    )


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v
