"""Named model sizes. `tiny` is for tests, `small` for the CPU demo; the rest match the paper's
Table 1 (350M, 1.3B, 7B) and SEDD-small, for GPU clusters."""

from __future__ import annotations

from .dit import DiffusionLMConfig

GPT2_VOCAB = 50257

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, vocab_size=8192),
    "sedd-small": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, vocab_size=GPT2_VOCAB
    ),
    "paper-350m": dict(
        hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, vocab_size=GPT2_VOCAB
    ),
    "paper-1.3b": dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, vocab_size=GPT2_VOCAB
    ),
    "paper-7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, vocab_size=GPT2_VOCAB
    ),
}


def preset_config(name: str, **overrides) -> DiffusionLMConfig:
    """Config of a named preset; keyword overrides win (e.g. the tokenizer's vocab_size)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return DiffusionLMConfig(**{**PRESETS[name], **overrides})


def count_parameters(config: DiffusionLMConfig) -> int:
    """Exact parameter count of `DiffusionLM(config)`, computed from the config alone."""
    d, f, v, n = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    attn = 4 * (d * d + d)
    mlp = d * f + f + f * d + d
    norms = 2 * 2 * d
    block = attn + mlp + norms
    embed = v * d
    head = 0 if config.tie_word_embeddings else v * d
    time = 0
    if config.time_conditioning:
        te = config.time_embed_dim
        time = 2 * (te * te + te)
        block += te * 6 * d + 6 * d
    return embed + time + n * block + 2 * d + head
