"""LoRA-Diffusion: parameter-efficient fine-tuning of masked-diffusion language models.

The library imports neither Ray nor MLflow; the platform (jobs/, serve_apps/) builds on it.
Importing it registers the DiT denoiser with `transformers`' Auto classes, and every tuning
method in `methods.METHODS` (each method module registers its own on import).
"""

from . import adaptor_method, baselines  # noqa: F401  (the tuning methods: they register)
from .adaptor import AdaptorConfig, TrajectoryAdaptor
from .composition import AdaptedDenoiser, get_adaptor_model
from .config import DiffusionConfig, apply_overrides
from .corruption import AbsorbingProcess, UniformProcess, get_process, sample_t
from .losses import denoising_loss, heldout_loss
from .models import (
    DiffusionLM,
    DiffusionLMConfig,
    HFMaskedLMDenoiser,
    load_hf_masked_lm,
    preset_config,
)
from .router import Router
from .sampling import SampleOutput, sample
from .schedules import get_schedule
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .training import TrainConfig, fit

__version__ = "0.1.0"

__all__ = [
    "AbsorbingProcess",
    "AdaptedDenoiser",
    "AdaptorConfig",
    "Router",
    "TrajectoryAdaptor",
    "get_adaptor_model",
    "DiffusionConfig",
    "DiffusionLM",
    "DiffusionLMConfig",
    "HFMaskedLMDenoiser",
    "SampleOutput",
    "TrainConfig",
    "UniformProcess",
    "apply_overrides",
    "denoising_loss",
    "fit",
    "get_process",
    "get_schedule",
    "heldout_loss",
    "load_hf_masked_lm",
    "load_tokenizer",
    "preset_config",
    "sample",
    "sample_t",
    "train_bpe_tokenizer",
]
