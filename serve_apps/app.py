"""The LoRA-Diffusion Serve app: one frozen base, every registered task adaptor, composed.

    serve run serve_apps/lora_diffusion.yaml           # the config file (settings under args:)
    serve run serve_apps.app:app                        # quick local use, embedded defaults
    serve run serve_apps.app:build_app alias=staging    # the builder, settings as key=value

HTTP (FastAPI; schema at /openapi.json, docs at /docs):
    POST /v1/generate   instruction + input (task) or a raw prompt -> generated text
    POST /v1/classify   a task's label by candidate scoring, with per-label scores
    GET  /v1/adaptors   what is loaded (name, task, version, alias, parameters, metrics)
    GET  /healthz       liveness and the loaded versions
    POST /v1/admin/reload  re-read the registry now (also polled every `poll_seconds`)

Requests are validated before they reach the model (4xx naming the field), then batched by
`@serve.batch`: one batch is one pass of the engine, one base forward per diffusion step for
every request in it, whatever their tasks and weights. A reload swaps the whole engine between
batches, so a request never sees two versions.
"""

import asyncio
import logging
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

log = logging.getLogger("ray.serve")


class Settings(BaseModel):
    """The app's settings: `args:` of the Serve config file, or key=value after the import path
    on `serve run`. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(
        None,
        description="MLflow store/registry; default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<cwd>/mlflow.db (the jobs' embedded default)",
    )
    alias: str = Field("production", description="serve the versions this alias points to")
    adaptors: list[str] | None = Field(
        None,
        description="registered model names to serve (default: every adaptor model "
        "with the alias whose base fingerprint matches the base)",
    )
    base: str | None = Field(
        None,
        description="base folder or models:/ URI (default: the base the newest adaptor "
        "carries or references)",
    )
    router: str | None = Field(None, description="a router folder (jobs/multitask.py output)")
    poll_seconds: float = Field(
        30.0, ge=0, description="registry poll interval; 0: only POST /v1/admin/reload"
    )
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    token_env: str = Field(
        "LORA_DIFFUSION_SERVE_TOKEN",
        description="environment variable holding the bearer "
        "token; when it is set (non-empty) in the replica, every /v1 call needs it",
    )
    max_input_tokens: int = Field(96, ge=1, description="longest input or prompt, in tokens")
    max_new_tokens: int = Field(64, ge=1, description="longest raw-prompt generation")
    max_steps: int = Field(256, ge=1, description="most diffusion steps per request")
    max_samples: int = Field(8, ge=1, description="most samples per generate request")
    scoring_num_t: int = Field(8, ge=1, description="noise levels of candidate scoring")
    threads: int | None = Field(None, ge=1, description="torch threads per replica")
    device: str = Field(
        "auto",
        pattern="^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto: cuda when the replica has a GPU (num_gpus: 1)",
    )


def resolve_settings(args: dict[str, Any]) -> Settings:
    """Settings with relative paths made absolute here, where the user runs `serve run` (a
    replica's working directory is not theirs)."""
    s = Settings(**args)
    uri = s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri[len('sqlite:///') :]).resolve()}"
    s.tracking_uri = uri
    for key in ("base", "router"):
        value = getattr(s, key)
        if value and "://" not in value and Path(value).exists():
            setattr(s, key, str(Path(value).resolve()))
    return s


# --- request and response bodies --------------------------------------------------------------
class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="format the input with this task's instruction")
    input: str | None = Field(None, description="the input text (with `task`)")
    prompt: str | None = Field(None, description="a raw prompt instead of task + input")
    weights: dict[str, float] | None = Field(
        None,
        description="task weights over loaded adaptors (normalised); default: the "
        "router's choice, else the task's own adaptor",
    )
    steps: int | None = Field(None, description="diffusion steps (default: one per token)")
    max_new_tokens: int | None = Field(
        None,
        description="tokens to generate for a raw prompt "
        "(default 16; a task's answer length otherwise)",
    )
    seed: int = Field(0, ge=0, lt=2**63)
    num_samples: int = Field(1, description="samples, seeds seed, seed + 1, ...")


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="a task with label words (sst2, cola, trec, agnews)")
    input: str = Field(description="the text to classify")
    weights: dict[str, float] | None = Field(
        None, description="task weights (default: the task's adaptor, else the router)"
    )
    seed: int = Field(0, ge=0, lt=2**63)


class GenerateResponse(BaseModel):
    texts: list[str]
    weights: dict[str, float]
    weights_source: str
    steps: int
    versions: dict[str, int]
    timing: dict[str, float | int]


class ClassifyResponse(BaseModel):
    label: str
    scores: dict[str, float]
    probabilities: dict[str, float]
    weights: dict[str, float]
    weights_source: str
    versions: dict[str, int]
    timing: dict[str, float | int]


class VersionConflict(RuntimeError):
    """A request validated against adaptors that a reload replaced before its batch ran."""


def unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message}])


fastapi_app = FastAPI(
    title="LoRA-Diffusion",
    description="Task adaptors on one frozen masked-diffusion base, composed per request.",
    version="0.1.0",
)


@fastapi_app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each error's field path and message (no echo of the input)."""
    errors = []
    for e in exc.errors():
        msg = e.get("msg", "")
        if e.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        errors.append({"loc": list(e.get("loc", ())), "msg": msg})
    return JSONResponse(status_code=422, content={"detail": errors})


bearer = HTTPBearer(auto_error=False)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(fastapi_app)
class LoraDiffusionServer:
    def __init__(self, settings: dict) -> None:
        import torch

        from serve_apps.loading import load_engine

        self.s = Settings(**settings)
        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        self.token = os.environ.get(self.s.token_env) or None
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = auto if self.s.device == "auto" else self.s.device
        self._load_engine = load_engine
        self.loaded = self._load()
        self.loaded_at = time.time()
        self.reloads = 0
        self.batch.set_max_batch_size(self.s.max_batch_size)
        self.batch.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)
        self._poller = None
        log.info("serving %s", self.loaded.versions)

    def _load(self, base_model=None):
        s = self.s
        return self._load_engine(
            s.tracking_uri,
            s.alias,
            s.adaptors,
            s.base,
            s.router,
            base_model,
            max_length=s.max_input_tokens + s.max_new_tokens + 2,
            num_t=s.scoring_num_t,
        )

    # --- registry polling ----------------------------------------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None and self.s.poll_seconds > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.s.poll_seconds)
            try:
                await self.reload_if_changed()
            except Exception as e:  # a registry hiccup keeps the loaded versions serving
                log.warning("registry poll failed: %s", e)

    async def reload_if_changed(self) -> dict:
        from serve_apps.loading import discover

        s = self.s
        current = await asyncio.to_thread(discover, s.tracking_uri, s.alias, s.adaptors)
        changed = current != self.loaded.versions
        if changed:
            loaded = await asyncio.to_thread(self._load, self.loaded.base_model)
            self.loaded = loaded  # the next batch uses it; a running batch keeps the old one
            self.loaded_at = time.time()
            self.reloads += 1
            log.info("reloaded: %s", loaded.versions)
        return {"changed": changed, "versions": self.loaded.versions}

    # --- auth ----------------------------------------------------------------------------
    def _check_token(self, creds: HTTPAuthorizationCredentials | None) -> None:
        self._ensure_poller()
        if self.token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials, self.token):
            raise HTTPException(
                401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    # --- batching ------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def batch(self, items: list) -> list:
        """items: (request, task weights by name or None for the router). The names are
        resolved here, against the engine that runs the batch: a reload between a request's
        validation and its batch cannot misplace its weights."""
        loaded = self.loaded  # one engine, hence one set of versions, for the whole batch
        results: list = [None] * len(items)
        ready = []
        for i, (req, named) in enumerate(items):
            try:
                req.weights = self._resolve(loaded.engine, named)
                ready.append(i)
            except ValueError as e:
                results[i] = VersionConflict(f"the loaded adaptors changed: {e}; retry")
        reqs = [items[i][0] for i in ready]
        try:
            done = await asyncio.to_thread(loaded.engine.run, reqs) if reqs else []
        except Exception:  # isolate a failing request instead of failing the batch
            log.exception("batch of %d failed; retrying one by one", len(reqs))
            done = []
            for req in reqs:
                try:
                    done.append((await asyncio.to_thread(loaded.engine.run, [req]))[0])
                except Exception as err:
                    done.append(err)
        for i, r in zip(ready, done, strict=True):
            results[i] = r if isinstance(r, Exception) else {**r, "versions": loaded.versions}
        return results

    @staticmethod
    def _resolve(engine, named: dict | None) -> list[float] | None:
        if named is not None:
            return engine.weight_vector(named)
        if engine.has_router:
            return None
        if len(engine.tasks) == 1:
            return [1.0]
        raise ValueError("the router is gone and several adaptors are loaded")

    async def _submit(self, req, named: dict | None) -> dict:
        out = await self.batch((req, named))
        if isinstance(out, VersionConflict):
            raise HTTPException(409, detail=str(out))
        if isinstance(out, Exception):
            raise HTTPException(500, detail=f"the model failed on this request: {out}")
        return out

    # --- validation helpers --------------------------------------------------------------
    def _text(self, field: str, value: str | None) -> str:
        if value is None or not value.strip():
            raise unprocessable(field, "must be a non-empty string")
        limit = self.s.max_input_tokens
        if len(value) > 64 * limit or self.loaded.engine.count_tokens(value) > limit:
            raise unprocessable(field, f"is longer than {limit} tokens (max_input_tokens)")
        return value.strip()

    def _task(self, field: str, task: str) -> str:
        from lora_diffusion.tasks import TASKS

        if task not in TASKS:
            raise unprocessable(field, f"unknown task {task!r}; known: {sorted(TASKS)}")
        return task

    def _weights(self, weights, task: str | None, prefer_task: bool):
        """(task weights by name, normalised, or None for the router; source) of a request,
        checked against the loaded adaptors."""
        engine = self.loaded.engine
        if weights is not None:
            try:
                vector = engine.weight_vector(weights)
            except ValueError as e:
                raise unprocessable("weights", str(e)) from None
            return dict(zip(engine.tasks, vector, strict=True)), "explicit"
        own = task in engine.tasks
        if prefer_task and own:
            return {task: 1.0}, "task"
        if engine.has_router:
            return None, "router"
        if own:
            return {task: 1.0}, "task"
        if len(engine.tasks) == 1:
            return {engine.tasks[0]: 1.0}, "adaptor"
        raise unprocessable(
            "weights",
            f"several adaptors {engine.tasks} and no router: give "
            "weights, or a task that has an adaptor",
        )

    # --- endpoints -----------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        self._ensure_poller()
        return {
            "status": "ok",
            "versions": self.loaded.versions,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
        }

    @fastapi_app.get("/v1/adaptors")
    async def adaptors(self, creds=Depends(bearer)) -> dict:  # noqa: B008
        self._check_token(creds)
        return {"alias": self.s.alias, **self.loaded.describe()}

    @fastapi_app.post("/v1/admin/reload")
    async def reload(self, creds=Depends(bearer)) -> dict:  # noqa: B008
        self._check_token(creds)
        try:
            return await self.reload_if_changed()
        except Exception as e:
            raise HTTPException(
                503, detail=f"reload failed, still serving {self.loaded.versions}: {e}"
            ) from None

    @fastapi_app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateBody, creds=Depends(bearer)) -> dict:  # noqa: B008
        from lora_diffusion.serving import GenerateRequest

        self._check_token(creds)
        start = time.perf_counter()
        engine, s = self.loaded.engine, self.s
        if body.prompt is not None:
            if body.task is not None or body.input is not None:
                raise unprocessable("prompt", "give either prompt, or task and input")
            prompt = self._text("prompt", body.prompt)
            length = 16 if body.max_new_tokens is None else body.max_new_tokens
            if not 1 <= length <= s.max_new_tokens:
                raise unprocessable("max_new_tokens", f"must be in [1, {s.max_new_tokens}]")
            task = None
        else:
            if body.task is None or body.input is None:
                raise unprocessable(
                    "task" if body.task is None else "input", "is required (or give a raw prompt)"
                )
            task = self._task("task", body.task)
            prompt = engine.task_prompt(task, self._text("input", body.input))
            if body.max_new_tokens is not None:
                raise unprocessable("max_new_tokens", "applies to raw prompts only")
            length = engine.target_length(task)
        steps = length if body.steps is None else body.steps
        if not 1 <= steps <= s.max_steps:
            raise unprocessable("steps", f"must be in [1, {s.max_steps}]")
        if not 1 <= body.num_samples <= s.max_samples:
            raise unprocessable("num_samples", f"must be in [1, {s.max_samples}]")
        named, source = self._weights(body.weights, task, prefer_task=False)
        req = GenerateRequest(prompt, length, None, steps, body.seed, body.num_samples)
        out = await self._submit(req, named)
        out["timing"]["total_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return {**out, "weights_source": source, "steps": steps}

    @fastapi_app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(self, body: ClassifyBody, creds=Depends(bearer)) -> dict:  # noqa: B008
        from lora_diffusion.serving import ClassifyRequest

        self._check_token(creds)
        start = time.perf_counter()
        task = self._task("task", body.task)
        text = self._text("input", body.input)
        named, source = self._weights(body.weights, task, prefer_task=True)
        out = await self._submit(ClassifyRequest(task, text, None, body.seed), named)
        out["timing"]["total_ms"] = round(1000 * (time.perf_counter() - start), 2)
        if any(not math.isfinite(v) for v in out["scores"].values()):
            raise HTTPException(500, detail="non-finite scores")
        return {**out, "weights_source": source}


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder (`import_path: serve_apps.app:build_app` with `args:`)."""
    return LoraDiffusionServer.bind(resolve_settings(args).model_dump())


#: `serve run serve_apps.app:app`: the embedded defaults (local MLflow store, alias production).
app = build_app({})
