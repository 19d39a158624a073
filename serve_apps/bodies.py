"""The HTTP surface of the Serve app: request and response bodies, reading a body under a size
and time limit, and the error bodies every 4xx/5xx carries. No model here, no Ray.

Bodies are read and validated by the endpoints themselves, after the bearer token is checked:
FastAPI would read and validate them before any dependency runs, so a client without a token
could hold a slot while trickling a body in, and learn from the 422 what the API accepts.
The OpenAPI schema still describes them (`openapi_body`, `RESPONSES`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import HTTPException, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from lora_diffusion.tasks import TASKS

#: What an error body repeats of the client's input at most (field names, bad values).
ECHO_CHARS = 120
#: Errors listed in one 422 at most (a 1 MB body could otherwise list thousands).
MAX_ERRORS = 10


def _unicode(value: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer (and no UTF-8 response)
    can take: refuse them as the client's mistake."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]

_TASK_NAMES = sorted(TASKS)
_LABELLED = sorted(name for name in TASKS if TASKS.get(name).label_words)


def _strict() -> ConfigDict:
    # strict: "1" and true are not numbers, 1.0 is not a step count (coercion hides mistakes)
    return ConfigDict(extra="forbid", strict=True)


class GenerateBody(BaseModel):
    """`task` + `input` (the task's instruction applied), or a raw `prompt`; not both."""

    model_config = ConfigDict(
        **_strict(),
        json_schema_extra={
            "oneOf": [
                {"required": ["task", "input"], "not": {"required": ["prompt"]}},
                {
                    "required": ["prompt"],
                    "not": {"anyOf": [{"required": ["task"]}, {"required": ["input"]}]},
                },
            ]
        },
    )

    task: Text = Field(
        None,
        description="format the input with this task's instruction",
        json_schema_extra={"enum": _TASK_NAMES},
    )
    input: Text = Field(None, description="the input text (with `task`)")
    prompt: Text = Field(None, description="a raw prompt instead of task + input")
    weights: dict[Text, float] = Field(
        None,
        description="task weights over loaded adaptors (finite, >= 0, normalised); default: "
        "the router's choice, else the task's own adaptor",
    )
    steps: int = Field(None, ge=1, description="diffusion steps (default: one per token)")
    max_new_tokens: int = Field(
        None, ge=1, description="tokens to generate for a raw prompt only (default 16)"
    )
    seed: int = Field(0, ge=0, lt=2**63)
    num_samples: int = Field(1, ge=1, description="samples, seeds seed, seed + 1, ...")


class ClassifyBody(BaseModel):
    model_config = _strict()

    task: Text = Field(description="a task with label words", json_schema_extra={"enum": _LABELLED})
    input: Text = Field(description="the text to classify")
    weights: dict[Text, float] = Field(
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


# --- errors ---------------------------------------------------------------------------------
class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[FieldError]


class Message(BaseModel):
    detail: str


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """A client's value as an error may repeat it: capped, any lone surrogate escaped."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def field_error(loc: list, msg: str, kind: str) -> dict:
    """One entry of a 422's `detail`; messages may quote the client, so both are capped."""
    return {
        "loc": [x if isinstance(x, int) else echo(x) for x in loc],
        "msg": echo(msg, 4 * ECHO_CHARS),
        "type": kind,
    }


def unprocessable(field: str | None, message: str, kind: str = "value_error") -> HTTPException:
    """A 422 naming `field` (None: the body as a whole)."""
    loc = ["body"] if field is None else ["body", field]
    return HTTPException(422, detail=[field_error(loc, message, kind)])


def validation_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors as the 422 lists them: field path, message, type; never the input."""
    out = [
        field_error(["body", *e.get("loc", ())], e.get("msg", ""), e.get("type", "value_error"))
        for e in errors[:MAX_ERRORS]
    ]
    if len(errors) > MAX_ERRORS:
        out.append(field_error(["body"], f"{len(errors) - MAX_ERRORS} more errors", "truncated"))
    return out


# --- reading a body -------------------------------------------------------------------------
async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body, refused (413) past `max_bytes` and (408) when it takes longer than
    `timeout_s` to arrive: a client that declares 1000 bytes and sends 9 frees its slot."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise HTTPException(400, detail="Content-Length is not a number")
    if declared is not None and int(declared) > max_bytes:
        raise HTTPException(413, detail=f"the body must be at most {max_bytes} bytes")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(413, detail=f"the body must be at most {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before Python 3.11)
        raise HTTPException(
            408, detail=f"the body did not arrive within {timeout_s} s", headers=CLOSE
        ) from None
    except ClientDisconnect:
        raise HTTPException(400, detail="the client left before its body arrived") from None


CLOSE = {"Connection": "close"}


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON -> `model`, or a 422 naming each bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = str(e) if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise unprocessable(
            None, f"the body is not valid JSON ({reason})", "json_invalid"
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise HTTPException(422, detail=validation_errors(e.errors())) from None
    except RecursionError:  # a body nested thousands deep
        raise unprocessable(None, "the body is nested too deeply", "value_error") from None


def openapi_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring `model` as the JSON body the endpoint reads itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _response(model: type[BaseModel], description: str) -> dict:
    return {"model": model, "description": description}


AUTH_RESPONSES = {
    401: _response(Message, "missing or wrong bearer token"),
}
BODY_RESPONSES = {
    **AUTH_RESPONSES,
    400: _response(Message, "a malformed Content-Length, or the client left before its body"),
    408: _response(Message, "the body did not arrive in time (body_timeout_s)"),
    413: _response(Message, "the body is too large (max_body_bytes)"),
    409: _response(Message, "the loaded adaptors changed under the request: retry"),
    422: _response(ValidationErrorBody, "the body is not valid: each error names its field"),
    503: _response(Message, "the replica is at capacity (max_active_requests): retry later"),
}
