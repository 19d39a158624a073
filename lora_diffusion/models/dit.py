"""A DiT-style bidirectional transformer denoiser (as in SEDD / MDLM), as a `transformers` model.

Pre-LayerNorm blocks with rotary positions and full (non-causal) attention. Time conditioning
by adaLN (DiT) exists but is off by default: masked diffusion is time-agnostic (MDLM, LLaDA),
and a time-agnostic base lets the sampler reuse a network call when no token changed.

The model exposes the denoiser seam used by losses and samplers:
`hidden_states(input_ids, attention_mask, t) -> (B, L, d)` and `output_head(h) -> (..., V)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class DiffusionLMConfig(PretrainedConfig):
    """Configuration of the DiT denoiser; `save_pretrained` writes it as config.json."""

    model_type = "lora_diffusion_dit"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        time_conditioning: bool = False,
        time_embed_dim: int = 128,
        initializer_range: float = 0.02,
        mask_token_id: int = 1,
        pad_token_id: int = 0,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        sep_token_id: int = 4,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by "
                f"num_attention_heads ({num_attention_heads})"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.time_embed_dim = time_embed_dim
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.sep_token_id = sep_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


@dataclass
class DiffusionLMOutput(ModelOutput):
    """logits: (B, L, V) or None; last_hidden_state: (B, L, d), before the output head."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, head_dim) for rotate-half rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, L, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # scale so t in [0,1] spans many periods
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DiffusionLMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, L, d); mask: (B, 1, 1, L) bool, True where a key may be attended."""
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, config: DiffusionLMConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ZeroInitLinear(nn.Linear):
    """A Linear that `_init_weights` starts at zero (adaLN modulation, as in DiT)."""


class DiTBlock(nn.Module):
    """Pre-LN block; with time conditioning, adaLN shift/scale/gate from the time embedding."""

    def __init__(self, config: DiffusionLMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)
        self.adaLN_modulation = (
            ZeroInitLinear(config.time_embed_dim, 6 * d) if config.time_conditioning else None
        )

    def forward(self, x, cos, sin, mask, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        # (B, 1, d) each; zero-initialised, so the block starts as the unconditioned one.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(temb)[:, None].chunk(
            6, dim=-1
        )
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + (1 + gate1) * self.drop(self.attn(h, cos, sin, mask))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + (1 + gate2) * self.drop(self.mlp(h))


class DiffusionLMPreTrainedModel(PreTrainedModel):
    config_class = DiffusionLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["DiTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class DiffusionTransformer(DiffusionLMPreTrainedModel):
    """The trunk: token ids -> final hidden states (after the last LayerNorm)."""

    def __init__(self, config: DiffusionLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.time_mlp = (
            nn.Sequential(
                nn.Linear(config.time_embed_dim, config.time_embed_dim),
                nn.SiLU(),
                nn.Linear(config.time_embed_dim, config.time_embed_dim),
            )
            if config.time_conditioning
            else None
        )
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        all_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """input_ids: (B, L); attention_mask: (B, L), 1 = real token; timesteps: (B,) in [0, 1].
        Returns final hidden states (B, L, d); with `all_states`, every layer's state: the input
        embeddings, each block's output, then the final hidden states (n_layers + 2 of them)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n, _ = x.shape
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_cos_sin(n, head_dim, self.config.rope_theta, x.device, x.dtype)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        temb = None
        if self.time_mlp is not None:
            if timesteps is None:
                raise ValueError("this model is time-conditioned: pass `timesteps` (B,) in [0, 1]")
            temb = self.time_mlp(timestep_embedding(timesteps, self.config.time_embed_dim))
            temb = temb.to(x.dtype)
        states = [x]
        for block in self.blocks:
            x = block(x, cos, sin, mask, temb)
            states.append(x)
        h = self.norm_f(x)
        return (*states, h) if all_states else h


class DiffusionLM(DiffusionLMPreTrainedModel):
    """DiT trunk + output head. Loads with `AutoModel` / `AutoModelForMaskedLM` once
    `lora_diffusion` is imported."""

    _tied_weights_keys = {"lm_head.weight": "transformer.embed_tokens.weight"}

    def __init__(self, config: DiffusionLMConfig) -> None:
        super().__init__(config)
        self.transformer = DiffusionTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # --- the denoiser seam -------------------------------------------------------------
    @property
    def time_conditioned(self) -> bool:
        return bool(self.config.time_conditioning)

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, L, d). `condition_mask` is part of the seam (adaptors use
        it); the base ignores it."""
        return self.transformer(input_ids, attention_mask, t)

    def layer_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Every layer's states (each (B, L, d)): input embeddings, block 1..n outputs, final
        hidden states (the last equals `hidden_states`). What an adaptor's reader reads."""
        return self.transformer(input_ids, attention_mask, t, all_states=True)

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> logits (..., V)."""
        return self.lm_head(h)

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> DiffusionLMOutput:
        h = self.transformer(input_ids, attention_mask, timesteps)
        return DiffusionLMOutput(
            logits=self.lm_head(h) if return_logits else None, last_hidden_state=h
        )
