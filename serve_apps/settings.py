"""The Serve app's settings: `args:` of the Serve config file, or key=value after the import
path on `serve run`. The limits are explained, with the measurements behind them, in
docs/SERVING.md."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    max_request_cost: int = Field(
        24576,
        ge=1,
        description="most token-passes one request may cost (ServingEngine.cost: samples x "
        "steps x tokens); 24576: 7.5 to 10 s on one core of a 2-core CPU (docs/SERVING.md)",
    )
    light_cost: int = Field(
        4096,
        ge=1,
        description="requests costing at most this batch together; costlier ones run one at a "
        "time in a lane of their own, beside the light one",
    )
    max_active_requests: int = Field(
        48,
        ge=1,
        description="/v1/generate and /v1/classify requests in progress at once; more get a "
        "503. Keep it below max_ongoing_requests so /healthz always finds a slot",
    )
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body")
    body_timeout_s: float = Field(
        5.0, gt=0, description="a request body must arrive within this (else 408)"
    )
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
    from jobs.tracking import tracking_uri  # the jobs' rule: the same store for the same flag

    s = Settings(**args)
    s.tracking_uri = tracking_uri(s.tracking_uri)
    for key in ("base", "router"):
        value = getattr(s, key)
        if value and "://" not in value and Path(value).exists():
            setattr(s, key, str(Path(value).resolve()))
    return s
