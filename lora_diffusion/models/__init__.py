"""Denoiser networks: the project's DiT and wrappers for Hugging Face models."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .dit import DiffusionLM, DiffusionLMConfig, DiffusionLMOutput, DiffusionTransformer
from .hf_masked_lm import HFMaskedLMDenoiser, load_hf_masked_lm
from .loading import load_base
from .presets import PRESETS, count_parameters, preset_config

AutoConfig.register(DiffusionLMConfig.model_type, DiffusionLMConfig, exist_ok=True)
AutoModel.register(DiffusionLMConfig, DiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(DiffusionLMConfig, DiffusionLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "DiffusionLM",
    "DiffusionLMConfig",
    "DiffusionLMOutput",
    "DiffusionTransformer",
    "HFMaskedLMDenoiser",
    "count_parameters",
    "load_base",
    "load_hf_masked_lm",
    "preset_config",
]
