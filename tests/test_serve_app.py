"""The Serve app for real: `serve run` of the shipped config (settings changed for the test) on
the session's local Ray cluster, adaptors registered in a SQLite MLflow store, queried over
HTTP with httpx."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

httpx = pytest.importorskip("httpx")
mlflow = pytest.importorskip("mlflow")

from tests.test_composition import random_adaptor  # noqa: E402

TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def register_adaptor(store: str, base_dir: Path, base, task: str, seed: int, out: Path) -> int:
    """A random (non-zero) adaptor for `task`, saved and registered as `<task>-ld` with alias
    production, as `jobs/train.py --register --alias production` would. Returns the version."""
    from jobs.tracking import register_run_adaptor
    from lora_diffusion.adaptor_io import save_adaptor

    save_adaptor(out, random_adaptor(seed), base, task=task)
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("serve-app-test")  # this store's, whatever ran in-process before
    with mlflow.start_run(run_name=f"{task}-{seed}") as run:
        mlflow.log_metric("eval_accuracy", 0.5)
    cfg = SimpleNamespace(task=task, method="lora_diffusion", base=str(base_dir))
    version = register_run_adaptor(
        run.info.run_id, str(out), cfg, f"{task}-ld", "production", {"eval_accuracy": 0.5}
    )
    return int(version.version)


def local_engine(base_dir: Path, adaptors: dict[str, Path]):
    """The same adaptors composed in this process: what the app must answer."""
    from lora_diffusion.adaptor_io import load_adaptor
    from lora_diffusion.composition import AdaptedDenoiser
    from lora_diffusion.models import load_base
    from lora_diffusion.serving import ServingEngine

    base, tok = load_base(base_dir)
    loaded = {task: load_adaptor(d, base)[0] for task, d in adaptors.items()}
    return ServingEngine(AdaptedDenoiser(base, loaded), tok, max_length=96 + 64 + 2)


#: One task's adaptor, explicitly: the app must answer what that adaptor alone answers.
ONE_HOT = {"task": "sst2", "input": "a moving and gripping film", "weights": {"sst2": 1.0},
           "seed": 7, "num_samples": 3, "steps": 4}  # fmt: skip


def one_hot_answer(base_dir: Path, adaptor_dir: Path) -> list[str]:
    """The texts an in-process engine with only `adaptor_dir` gives for ONE_HOT."""
    from lora_diffusion.serving import GenerateRequest

    engine = local_engine(base_dir, {"sst2": adaptor_dir})
    prompt = engine.task_prompt(ONE_HOT["task"], ONE_HOT["input"])
    req = GenerateRequest(prompt, engine.target_length("sst2"), None, ONE_HOT["steps"],
                          ONE_HOT["seed"], ONE_HOT["num_samples"])  # fmt: skip
    return engine.generate([req])[0]["texts"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_tokenizer, ray_cluster):
    from lora_diffusion.adaptor_io import save_router
    from lora_diffusion.composition import Router
    from lora_diffusion.models import DiffusionLM, load_base, preset_config

    root = tmp_path_factory.mktemp("serve")
    store = f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(0)
    cfg = preset_config(
        "tiny", vocab_size=len(tiny_tokenizer), mask_token_id=tiny_tokenizer.mask_token_id
    )
    base_dir = root / "base"
    DiffusionLM(cfg).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    base = load_base(base_dir)[0]
    dirs = {"sst2": root / "sst2", "trec": root / "trec"}
    versions = {
        t: register_adaptor(store, base_dir, base, t, s, dirs[t])
        for t, s in [("sst2", 1), ("trec", 2)]
    }
    torch.manual_seed(3)
    router = Router(base.config.hidden_size, 2)
    save_router(root / "router", router, ["sst2", "trec"], base)
    return SimpleNamespace(
        root=root,
        store=store,
        base_dir=base_dir,
        base=base,
        dirs=dirs,
        versions=versions,
        router=root / "router",
    )


@pytest.fixture(scope="module")
def server(registry, ray_cluster):
    """`serve run` of the shipped config with test settings; yields the base URL."""
    config = yaml.safe_load((REPO / "serve_apps" / "lora_diffusion.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(
        tracking_uri=registry.store,
        router=str(registry.router),
        poll_seconds=1,
        max_batch_size=32,
        batch_wait_timeout_s=0.05,
        max_input_tokens=48,
    )
    app["runtime_env"] = {"env_vars": {"LORA_DIFFUSION_SERVE_TOKEN": TOKEN}}
    path = registry.root / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(registry.root / "serve.log", "w")  # noqa: SIM115
    serve = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen(
        [str(serve), "run", str(path)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(
                    "serve run failed:\n" + (registry.root / "serve.log").read_text()[-4000:]
                )
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(
            [str(serve), "shutdown", "-y", "--address", ray_cluster],
            capture_output=True,
            timeout=120,
        )
        log.close()


def post(url: str, path: str, body, **kw):
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=60, **kw)


def test_health_adaptors_and_openapi(server, registry):
    health = httpx.get(f"{server}/healthz", timeout=10).json()  # open: no token needed
    assert health["status"] == "ok"
    assert health["versions"] == {"sst2-ld": 1, "trec-ld": 1}
    listed = httpx.get(f"{server}/v1/adaptors", headers=AUTH, timeout=10).json()
    by_task = {a["task"]: a for a in listed["adaptors"]}
    assert set(by_task) == {"sst2", "trec"} and listed["alias"] == "production"
    assert by_task["sst2"]["name"] == "sst2-ld" and by_task["sst2"]["version"] == 1
    assert by_task["sst2"]["trainable_params"] > 0 and by_task["sst2"]["metrics"] == {
        "eval_accuracy": 0.5
    }
    assert listed["router"] == {"tasks": ["sst2", "trec"]}
    from lora_diffusion.adaptor_io import base_fingerprint

    assert listed["base"]["fingerprint"] == base_fingerprint(registry.base)
    schema = httpx.get(f"{server}/openapi.json", timeout=10).json()
    assert {"/v1/generate", "/v1/classify", "/v1/adaptors", "/healthz"} <= set(schema["paths"])
    assert httpx.get(f"{server}/docs", timeout=10).status_code == 200


def test_token_is_required_on_the_api(server):
    body = {"task": "sst2", "input": "a fine film"}
    assert httpx.post(f"{server}/v1/classify", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        httpx.post(f"{server}/v1/classify", json=body, headers=wrong, timeout=30).status_code == 401
    )
    assert httpx.get(f"{server}/v1/adaptors", timeout=30).status_code == 401


def test_one_hot_weights_reproduce_the_single_task_answer(server, registry):
    got = post(server, "/v1/generate", ONE_HOT)
    assert got.status_code == 200, got.text
    got = got.json()
    assert got["weights"] == {"sst2": 1.0, "trec": 0.0} and got["weights_source"] == "explicit"
    assert got["texts"] == one_hot_answer(registry.base_dir, registry.dirs["sst2"])
    assert got["versions"] == {"sst2-ld": 1, "trec-ld": 1}


def test_router_and_raw_prompt_and_classify(server, registry):
    routed = post(server, "/v1/generate", {"prompt": "the river runs", "max_new_tokens": 5}).json()
    assert routed["weights_source"] == "router" and len(routed["texts"]) == 1
    assert math.isclose(sum(routed["weights"].values()), 1.0, abs_tol=1e-4)
    assert all(w > 0 for w in routed["weights"].values())
    out = post(server, "/v1/classify", {"task": "sst2", "input": "a lovely film", "seed": 2})
    assert out.status_code == 200, out.text
    out = out.json()
    assert out["label"] in ("negative", "positive") and out["weights_source"] == "task"
    assert math.isclose(sum(out["probabilities"].values()), 1.0, abs_tol=1e-4)
    assert out["label"] == max(out["scores"], key=out["scores"].get)
    from lora_diffusion.serving import ClassifyRequest

    engine = local_engine(registry.base_dir, {"sst2": registry.dirs["sst2"]})
    local = engine.classify([ClassifyRequest("sst2", "a lovely film", None, 2)])[0]
    assert local["label"] == out["label"]
    for label, score in local["scores"].items():
        assert math.isclose(score, out["scores"][label], rel_tol=1e-4, abs_tol=1e-4)


BAD = [  # (path, body or raw text, field named in the error)
    ("/v1/generate", "{not json", "not valid JSON"),
    ("/v1/generate", {"input": "text"}, "task"),
    ("/v1/generate", {"task": "sst2"}, "input"),
    ("/v1/generate", {"task": "sst2", "input": "   "}, "input"),
    ("/v1/generate", {"task": "sst2", "input": 5}, "input"),
    ("/v1/generate", {"task": "nope", "input": "x"}, "task"),
    ("/v1/generate", {"task": "sst2", "input": "word " * 200}, "input"),
    ("/v1/generate", {"prompt": "x", "task": "sst2", "input": "y"}, "prompt"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ("/v1/generate", {"task": "sst2", "input": "x", "weights": {"cola": 1}}, "weights"),
    ("/v1/generate", {"task": "sst2", "input": "x", "weights": {"sst2": -1}}, "weights"),
    ("/v1/generate", {"task": "sst2", "input": "x", "weights": {"sst2": 0}}, "weights"),
    ("/v1/generate", {"task": "sst2", "input": "x", "weights": {"sst2": "a"}}, "weights"),
    ("/v1/generate", {"task": "sst2", "input": "x", "steps": 0}, "steps"),
    ("/v1/generate", {"task": "sst2", "input": "x", "steps": 100000}, "steps"),
    ("/v1/generate", {"task": "sst2", "input": "x", "num_samples": 99}, "num_samples"),
    ("/v1/generate", {"task": "sst2", "input": "x", "seed": -1}, "seed"),
    ("/v1/generate", {"task": "sst2", "input": "x", "colour": "red"}, "colour"),
    ("/v1/generate", [1, 2], "body"),
    ("/v1/classify", {"task": "sst2"}, "input"),
    ("/v1/classify", {"task": "wikitext", "input": "x"}, "task"),
    ("/v1/classify", {"task": "sst2", "input": "x", "weights": {"sst2": float("inf")}}, "weights"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD, ids=[f"{p}-{f}" for p, _, f in BAD])
def test_bad_requests_get_a_4xx_naming_the_field(server, path, body, field):
    if isinstance(body, str):
        r = httpx.post(
            f"{server}{path}",
            content=body,
            timeout=30,
            headers={**AUTH, "Content-Type": "application/json"},
        )
    else:
        r = httpx.post(
            f"{server}{path}",
            content=json.dumps(body),
            timeout=30,
            headers={**AUTH, "Content-Type": "application/json"},
        )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert field in json.dumps(r.json()["detail"]), r.text


def test_a_burst_of_concurrent_mixed_requests_is_batched(server):
    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            calls = []
            for i in range(48):
                if i % 3 == 0:
                    calls.append(
                        client.post(
                            f"{server}/v1/classify", json={"task": "trec", "input": f"who is {i} ?"}
                        )
                    )
                else:
                    w = {"sst2": 1.0} if i % 3 == 1 else {"sst2": 0.3, "trec": 0.7}
                    calls.append(
                        client.post(
                            f"{server}/v1/generate",
                            json={
                                "task": "sst2",
                                "input": f"film number {i}",
                                "weights": w,
                                "seed": i,
                            },
                        )
                    )
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 48
    sizes = [r.json()["timing"]["batch_size"] for r in responses]
    assert max(sizes) > 1  # requests of different tasks and weights shared a batch
    assert httpx.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"


def test_a_moved_alias_is_picked_up_without_restart(server, registry):
    assert post(server, "/v1/admin/reload", None).json()["changed"] is False
    v2 = register_adaptor(
        registry.store, registry.base_dir, registry.base, "sst2", 11, registry.root / "sst2-v2"
    )
    assert v2 == 2  # registering with alias production moved the alias
    deadline = time.time() + 60
    while httpx.get(f"{server}/healthz", timeout=10).json()["versions"]["sst2-ld"] != 2:
        assert time.time() < deadline, "the app did not pick up the new version (poll)"
        time.sleep(0.5)
    got = post(server, "/v1/generate", ONE_HOT).json()
    assert got["versions"]["sst2-ld"] == 2

    assert got["texts"] == one_hot_answer(registry.base_dir, registry.root / "sst2-v2")
    client = mlflow.MlflowClient(registry.store)
    client.set_registered_model_alias("sst2-ld", "production", "1")  # roll back, by admin call
    reloaded = post(server, "/v1/admin/reload", None).json()
    assert reloaded == {"changed": True, "versions": {"sst2-ld": 1, "trec-ld": 1}}


def test_settings_refuse_unknown_keys_and_resolve_paths(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from serve_apps.app import resolve_settings

    with pytest.raises(ValidationError, match="max_batch"):
        resolve_settings({"max_batch": 4})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    s = resolve_settings({"alias": "staging"})
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and s.alias == "staging"
    assert resolve_settings({"tracking_uri": "sqlite:///x.db"}).tracking_uri == (
        f"sqlite:///{tmp_path / 'x.db'}"
    )
