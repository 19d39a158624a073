"""The MLflow pyfunc model of a task adaptor (or a bare base): text in, label words out.

Logged as *models from code*: MLflow copies this file into the model and runs it at load time,
so nothing is pickled. It imports only the library (`pip install -e .` makes it importable),
never `jobs.*`. The model's artifacts:

    base      the base folder (config.json, model.safetensors, tokenizer files); absent when the
              model references its base instead (model_config["base_uri"])
    adaptor   the adaptor folder as `finetune` saved it; absent for a bare base

model_config: {"task": the adaptor's task, "base_uri": None | a local base folder | the
`models:/` URI of the registered base}. `build_denoiser` and `download_model` are shared with
`jobs.tracking.load_registered_adaptor` and Serve's loader.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from lora_diffusion.corruption import get_process
from lora_diffusion.data import collate, decode_target, encode_prompt, target_length_for
from lora_diffusion.models import load_base
from lora_diffusion.sampling import sample
from lora_diffusion.schedules import get_schedule
from lora_diffusion.tasks import get_task

#: Tokens per sequence at prediction, as `FinetuneConfig.max_length` defaults to.
MAX_LENGTH = 128


def download_model(model_uri: str) -> tuple[dict[str, Path], dict]:
    """(artifact name -> local path, model_config) of a logged model (`models:/sst2-ld@prod`,
    `models:/<id>`), from the current store: the one download the jobs, this model and Serve
    share."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavor = mlflow.models.Model.load(local).flavors["python_function"]
    paths = {k: local / v["path"] for k, v in flavor.get("artifacts", {}).items()}
    return paths, flavor.get("config") or {}


def resolve_base(base_uri: str) -> str:
    """A local base folder for `base_uri`: a folder as is, a `models:/` base downloaded."""
    if not base_uri.startswith("models:/"):
        return base_uri
    return str(download_model(base_uri)[0]["base"])


def build_denoiser(base_dir: str, adaptor_dir: str | None, task: str | None):
    """(denoiser, tokenizer): the base, with the adaptor folder's method on top when given."""
    from lora_diffusion.adaptor_io import load_adaptor
    from lora_diffusion.composition import AdaptedDenoiser
    from lora_diffusion.methods import load_method, read_method_config

    base, tok = load_base(base_dir)
    if adaptor_dir is None:
        return base, tok
    if read_method_config(adaptor_dir)["method"] == "lora_diffusion":
        adaptor, config = load_adaptor(adaptor_dir, base)
        return AdaptedDenoiser(base, {task or config["task"]: adaptor}).eval(), tok
    return load_method(adaptor_dir, base).eval(), tok


@torch.no_grad()
def predict_labels(denoiser, tok, task: str, texts: list[str], seed: int = 0) -> list[str]:
    """The decoded target region of each text's prompt, sampled as `generative_accuracy` does
    (T = the task's target length steps). A label word, or any other string when invalid."""
    spec = get_task(task)
    length = target_length_for(spec, tok)
    rows = [encode_prompt(tok, spec.prompt(t), MAX_LENGTH, length) for t in texts]
    batch = collate(rows, tok.pad_token_id)  # input_ids, attention_mask (B, L); target_mask
    # The process and schedule the base was trained with (recorded in its config).
    config = getattr(getattr(denoiser, "base", denoiser), "config", None)
    process = getattr(config, "diffusion_process", None) or "absorbing"
    proc = get_process(process, len(tok), tok.mask_token_id)
    sched = get_schedule(getattr(config, "noise_schedule", None) or "loglinear")
    g = torch.Generator().manual_seed(seed)
    target = batch["target_mask"]
    out = sample(
        denoiser, proc, sched, batch["input_ids"], batch["attention_mask"], target, length, g
    )
    return [decode_target(tok, ids[m]) for ids, m in zip(out.tokens, target, strict=True)]


class AdaptorModel(PythonModel):
    """pyfunc: predict(DataFrame with `text` and optional `task`) -> list of label words."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.task = config.get("task")
        base_uri = config.get("base_uri")
        base_dir = resolve_base(base_uri) if base_uri else context.artifacts["base"]
        adaptor_dir = context.artifacts.get("adaptor")
        self.denoiser, self.tok = build_denoiser(base_dir, adaptor_dir, self.task)

    # No type hints on purpose: MLflow 3 would turn them into a type-hint signature.
    def predict(self, context, model_input, params=None):
        frame = pd.DataFrame(model_input)
        tasks = frame["task"] if "task" in frame else pd.Series([self.task] * len(frame))
        if tasks.isna().any():
            raise ValueError("this model has no task of its own: pass a `task` column")
        if self.task is not None and set(tasks) - {self.task}:
            raise ValueError(f"this adaptor is for task {self.task!r}, got {sorted(set(tasks))}")
        texts = frame["text"].astype(str).tolist()
        out = [""] * len(texts)
        for task in dict.fromkeys(tasks):  # one sampler call per task, order kept
            idx = [i for i, t in enumerate(tasks) if t == task]
            words = predict_labels(self.denoiser, self.tok, task, [texts[i] for i in idx])
            for i, w in zip(idx, words, strict=True):
                out[i] = w
        return out


set_model(AdaptorModel())
