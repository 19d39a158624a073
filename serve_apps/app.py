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

A request is authenticated first (bearer token, compared as bytes), then its body is read
under a size and time limit, validated (4xx naming the field) and costed (token-passes, see
`ServingEngine.cost`; over `max_request_cost` is a 422), then batched by `@serve.batch` in one
of two lanes that run side by side: cheap requests batch together, costly ones run one per
batch, so a small request never waits behind a giant one. One batch is one pass of the
engine, one base forward per diffusion step for every request in it, whatever their tasks and
weights. A reload swaps the whole engine between batches, so a request never sees two
versions. Limits and why: docs/SERVING.md.
"""

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from serve_apps.bodies import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    ClassifyBody,
    ClassifyResponse,
    GenerateBody,
    GenerateResponse,
    Message,
    echo,
    openapi_body,
    parse_body,
    read_body,
    unprocessable,
    validation_errors,
)
from serve_apps.settings import Settings, resolve_settings

log = logging.getLogger("ray.serve")


class VersionConflict(RuntimeError):
    """A request validated against adaptors that a reload replaced before its batch ran."""


fastapi_app = FastAPI(
    title="LoRA-Diffusion",
    description="Task adaptors on one frozen masked-diffusion base, composed per request.",
    version="0.1.0",
)


def body_endpoint(path: str, body: type, response: type):
    """POST `path`, which reads a JSON `body` itself (`LoraDiffusionServer._answer`) and
    answers `response`; OpenAPI documents both and every error status."""
    return fastapi_app.post(
        path, response_model=response, responses=BODY_RESPONSES, openapi_extra=openapi_body(body)
    )


@fastapi_app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each error's field path, message and type (no echo of the input)."""
    return JSONResponse(status_code=422, content={"detail": validation_errors(exc.errors())})


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(fastapi_app)
class LoraDiffusionServer:
    def __init__(self, settings: dict) -> None:
        import torch

        from serve_apps.loading import load_engine

        self.s = Settings(**settings)
        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        token = os.environ.get(self.s.token_env) or None
        self.token = token.encode("utf-8") if token else None
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = auto if self.s.device == "auto" else self.s.device
        self._load_engine = load_engine
        self._use(self._load())
        self.loaded_at = time.time()
        self.reloads = 0
        self.active = 0  # /v1 requests between authentication and their answer
        self.light.set_max_batch_size(self.s.max_batch_size)
        self.light.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)
        self._poller = None
        log.info("serving %s on %s", self.loaded.versions, self.device)

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
            device=self.device,
        )

    def _use(self, loaded) -> None:
        """Serve `loaded` from the next batch on: the light lane on its engine, the heavy lane
        on a fork of it (the two lanes run at once, in two threads)."""
        self.loaded, self.heavy_engine = loaded, loaded.engine.fork()

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
            self._use(loaded)  # the next batch uses it; a running batch keeps the old one
            self.loaded_at = time.time()
            self.reloads += 1
            log.info("reloaded: %s", loaded.versions)
        return {"changed": changed, "versions": self.loaded.versions}

    # --- auth, capacity, body ------------------------------------------------------------
    def _check_token(self, request: Request) -> None:
        """Before anything reads the body. The header is compared as bytes: it may hold any
        byte, and `secrets.compare_digest` refuses non-ASCII `str`."""
        self._ensure_poller()
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1: encoding back gives the bytes that were sent
        sent = given.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not secrets.compare_digest(sent, self.token):
            raise HTTPException(
                401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of `max_active_requests` slots, or a 503 at once. Below the deployment's
        max_ongoing_requests, so /healthz (which takes none) answers while they are all held."""
        if self.active >= self.s.max_active_requests:
            raise HTTPException(
                503, detail="the replica is at capacity; retry", headers={"Retry-After": "1"}
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def _answer(self, request: Request, model, handle) -> dict:
        """A body endpoint's way in: the token, then a slot, then the `model` body, `handle`d."""
        self._check_token(request)
        with self._slot():
            return await handle(await self._body(request, model))

    async def _body(self, request: Request, model):
        raw = await read_body(request, self.s.max_body_bytes, self.s.body_timeout_s)
        return parse_body(raw, model)

    # --- batching ------------------------------------------------------------------------
    # Two lanes, each running one batch at a time, both at once: requests up to `light_cost`
    # batch together (a batch's work <= max_batch_size x light_cost); costlier ones run one per
    # batch (<= max_request_cost), so a small request never waits for a giant one.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def light(self, items: list) -> list:
        loaded = self.loaded  # one engine, hence one set of versions, for the whole batch
        return await self._run(loaded, loaded.engine, items)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0)
    async def heavy(self, items: list) -> list:
        loaded, engine = self.loaded, self.heavy_engine  # set together by `_use`
        return await self._run(loaded, engine, items)

    async def _run(self, loaded, engine, items: list) -> list:
        """items: (request, task weights by name or None for the router). The names are
        resolved here, against the engine that runs the batch: a reload between a request's
        validation and its batch cannot misplace its weights."""
        results: list = [None] * len(items)
        ready = []
        for i, (req, named) in enumerate(items):
            try:
                req.weights = self._resolve(engine, named)
                ready.append(i)
            except ValueError as e:
                results[i] = VersionConflict(f"the loaded adaptors changed: {e}; retry")
        reqs = [items[i][0] for i in ready]
        try:
            done = await asyncio.to_thread(engine.run, reqs) if reqs else []
        except Exception:  # isolate a failing request instead of failing the batch
            log.exception("batch of %d failed; retrying one by one", len(reqs))
            done = []
            for req in reqs:
                try:
                    done.append((await asyncio.to_thread(engine.run, [req]))[0])
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
        engine, s = self.loaded.engine, self.s
        cost = engine.cost(req)
        if cost > s.max_request_cost:
            raise unprocessable(
                None,
                f"this request needs {cost} token-passes (samples x steps x tokens, or label "
                f"words x scoring_num_t x tokens), more than max_request_cost "
                f"{s.max_request_cost}: ask for fewer samples, steps or tokens",
                "request_too_costly",
            )
        lane = self.light if cost <= s.light_cost else self.heavy
        out = await lane((req, named))
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
            raise unprocessable(field, f"unknown task {echo(task)!r}; known: {sorted(TASKS)}")
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
            "active_requests": self.active,
        }

    @fastapi_app.get("/v1/adaptors", responses=AUTH_RESPONSES)
    async def adaptors(self, request: Request) -> dict:
        self._check_token(request)
        return {"alias": self.s.alias, **self.loaded.describe()}

    @fastapi_app.post(
        "/v1/admin/reload",
        responses={**AUTH_RESPONSES, 503: {"model": Message, "description": "reload failed"}},
    )
    async def reload(self, request: Request) -> dict:
        self._check_token(request)
        try:
            return await self.reload_if_changed()
        except Exception as e:
            raise HTTPException(
                503, detail=f"reload failed, still serving {self.loaded.versions}: {e}"
            ) from None

    @body_endpoint("/v1/generate", GenerateBody, GenerateResponse)
    async def generate(self, request: Request) -> dict:
        return await self._answer(request, GenerateBody, self._generate)

    async def _generate(self, body: GenerateBody) -> dict:
        from lora_diffusion.serving import GenerateRequest

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

    @body_endpoint("/v1/classify", ClassifyBody, ClassifyResponse)
    async def classify(self, request: Request) -> dict:
        return await self._answer(request, ClassifyBody, self._classify)

    async def _classify(self, body: ClassifyBody) -> dict:
        from lora_diffusion.serving import ClassifyRequest
        from lora_diffusion.tasks import get_task

        start = time.perf_counter()
        task = self._task("task", body.task)
        if not get_task(task).label_words:
            raise unprocessable("task", f"{task} has no label words to score")
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
