"""Load any supported base (ours, or a Hugging Face masked / diffusion LM) with its tokenizer."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from ..tokenizer import load_tokenizer
from .dit import DiffusionLM, DiffusionLMConfig
from .hf_masked_lm import load_hf_masked_lm


def load_base(name_or_path: str | Path, trust_remote_code: bool = False):
    """(denoiser, tokenizer) from a local folder or hub id, in eval mode.

    Our DiT loads directly; anything else goes through `AutoModelForMaskedLM` and is wrapped
    as an absorbing-state denoiser. Hub code runs only with `trust_remote_code=True`.
    """
    path = str(name_or_path)
    if Path(path).exists() and not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model config from {path}: {e}") from None
    if isinstance(config, DiffusionLMConfig):
        model = DiffusionLM.from_pretrained(path)
        tokenizer = load_tokenizer(path)
    else:
        model, tokenizer = load_hf_masked_lm(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
