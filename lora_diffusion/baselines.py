"""Baseline tuning methods, each registered in `methods.METHODS` and trained by the same recipe.

    full         every base parameter; saved with `save_pretrained`
    weight_lora  LoRA on the attention projections, built and saved by `peft`
    adapters     Houlsby bottleneck adapters after attention and after the MLP of every block
    bitfit       bias terms only
    prefix       learned key/value prefixes in every attention layer
    loreft       a low-rank representation intervention on the final hidden states
    nara         LoRA on the attention projections, gated per rank by the diffusion time t

Methods that add modules keep the base frozen and pristine: their modules act only inside the
wrapper's `hidden_states`, so the base object still computes the base. Methods that change the
base in place (`full`, `bitfit`, `weight_lora`) hand the recipe a frozen copy taken beforehand as
`MethodBundle.reference`, which forgetting and the size report compare against.

Every saved folder holds a JSON config with a `method` key and safetensors weights;
`methods.load_method` reads any of them back onto a base.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from .adaptor_io import CONFIG_NAME, WEIGHTS_NAME, base_fingerprint, read_tensors
from .config import BaselineConfig, FinetuneConfig
from .methods import METHOD_FILE, Method, MethodBundle, register
from .models.dit import apply_rotary, rotary_cos_sin, timestep_embedding

PREFIX = "baselines."  # tensor-name prefix in adapter_model.safetensors


# --- wrappers: a frozen base + the method's own modules, behind the denoiser seam ----------------


class WrappedDenoiser(nn.Module):
    """A denoiser around another one, `inner`: its config, time conditioning, output head and
    input embeddings are the inner model's; subclasses define `inner` and `hidden_states`."""

    inner: nn.Module

    @property
    def config(self):
        return self.inner.config

    @property
    def mask_token_id(self) -> int:
        return self.inner.mask_token_id

    @property
    def time_conditioned(self) -> bool:
        return bool(getattr(self.inner, "time_conditioned", True))

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.output_head(h)

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.input_embeddings(input_ids)


class BaselineDenoiser(WrappedDenoiser):
    """Frozen `base` plus trainable `delta`; subclasses define `hidden_states`."""

    def __init__(self, base: nn.Module, delta: nn.Module) -> None:
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.delta = delta

    @property
    def inner(self) -> nn.Module:
        return self.base

    def train(self, mode: bool = True) -> BaselineDenoiser:
        super().train(mode)
        self.base.eval()  # frozen: no dropout in the base, whatever the method's mode
        return self


class HookedDenoiser(BaselineDenoiser):
    """Methods that act through forward hooks on base submodules. The hooks fire only while this
    wrapper's `hidden_states` runs, so calling the base directly still gives the base."""

    def __init__(self, base: nn.Module, delta: nn.Module) -> None:
        super().__init__(base, delta)
        self._active = False
        self._t: torch.Tensor | None = None

    def hook(self, module: nn.Module, fn) -> None:
        """fn(inputs, output) -> new output, applied to `module` inside `hidden_states`."""

        def hook(_, args, out):
            return fn(args[0], out) if self._active else None

        module.register_forward_hook(hook)

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        self._active, self._t = True, t
        try:
            return self.base.hidden_states(input_ids, attention_mask, t)
        finally:
            self._active, self._t = False, None


def _blocks(base: nn.Module) -> nn.ModuleList:
    if not hasattr(getattr(base, "transformer", None), "blocks"):
        raise ValueError(f"this method needs our DiT base, got {type(base).__name__}")
    return base.transformer.blocks


def _linears(base: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Module path -> Linear for every Linear whose last name is in `targets`; every target must
    match at least one."""
    found = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    names = {n.rsplit(".", 1)[-1] for n in found}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"target modules {missing} are not Linear layers of the base; it has {sorted(names)}"
        )
    return {n: m for n, m in found.items() if n.rsplit(".", 1)[-1] in targets}


# --- adapters ------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """Houlsby adapter: h -> h + up(gelu(down(h))), d -> m -> d, `up` zero-initialised."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


class AdapterDenoiser(HookedDenoiser):
    """A bottleneck adapter on the output of every block's attention and MLP (before the
    residual add); the identity at initialisation."""

    def __init__(self, base: nn.Module, cfg: BaselineConfig) -> None:
        d, blocks = base.config.hidden_size, _blocks(base)
        delta = nn.ModuleDict(
            {
                f"{i}_{part}": Bottleneck(d, cfg.bottleneck)
                for i in range(len(blocks))
                for part in ("attn", "mlp")
            }
        )
        super().__init__(base, delta)
        for i, block in enumerate(blocks):
            for part in ("attn", "mlp"):
                adapter = delta[f"{i}_{part}"]
                self.hook(getattr(block, part), lambda x, out, a=adapter: a(out))


# --- nara ----------------------------------------------------------------------------------------


class NaraDelta(nn.Module):
    """Per-layer LoRA factors and one shared gate network over the diffusion time:

        delta W x = B diag(g(t)) A x,   g(t) = 1 + MLP(Emb(t)) in R^r,

    B and the MLP's last layer start at zero, so the method starts as the base (and, until the
    gate learns, as plain LoRA)."""

    def __init__(self, linears: dict[str, nn.Linear], rank: int, time_dim: int) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.gate = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, rank)
        )
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, lin in linears.items():
            key = name.replace(".", "__")
            self.A[key] = nn.Parameter(torch.randn(rank, lin.in_features) / lin.in_features**0.5)
            self.B[key] = nn.Parameter(torch.zeros(lin.out_features, rank))

    def g(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, r)."""
        return 1 + self.gate(timestep_embedding(t, self.time_dim))

    def forward(self, key: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d_in); g: (B, r) -> (B, L, d_out)."""
        return ((x @ self.A[key].T) * g[:, None]) @ self.B[key].T


class NaraDenoiser(HookedDenoiser):
    """NaRA-style noise-level-conditioned LoRA; depends on t even on a time-agnostic base."""

    time_conditioned = True

    def __init__(self, base: nn.Module, cfg: BaselineConfig) -> None:
        linears = _linears(base, cfg.target_modules)
        super().__init__(base, NaraDelta(linears, cfg.nara_rank, cfg.nara_time_dim))
        self._g: torch.Tensor | None = None
        for name, lin in linears.items():
            key = name.replace(".", "__")
            self.hook(lin, lambda x, out, k=key: out + self.delta(k, x, self._g).to(out.dtype))

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        if t is None:
            raise ValueError("nara needs t (B,) in [0, 1]: its LoRA is gated by the noise level")
        self._g = self.delta.g(t.to(input_ids.device))  # shared by every layer of this call
        try:
            return super().hidden_states(input_ids, attention_mask, t, condition_mask)
        finally:
            self._g = None


# --- prefix --------------------------------------------------------------------------------------


class PrefixDelta(nn.Module):
    """Key/value prefixes (layers, 2, heads, P, head_dim): direct parameters, or with `hidden` > 0
    the output of a reparameterisation MLP over a (P, d) table (Li & Liang, 2021)."""

    def __init__(self, layers: int, heads: int, head_dim: int, length: int, hidden: int) -> None:
        super().__init__()
        self.shape = (length, layers, 2, heads, head_dim)
        d = heads * head_dim
        if hidden:
            self.table = nn.Parameter(torch.randn(length, d) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * d)
            )
        else:
            self.table = nn.Parameter(torch.randn(length, layers * 2 * d) * 0.02)
            self.mlp = None

    def forward(self) -> torch.Tensor:
        """-> (layers, 2, heads, P, head_dim)."""
        flat = self.table if self.mlp is None else self.mlp(self.table)
        return flat.view(self.shape).permute(1, 2, 3, 0, 4)


def prefix_attention(attn, x, cos, sin, mask, pk, pv) -> torch.Tensor:
    """The DiT attention with learned keys/values prepended to every example's sequence.

    x: (B, L, d); pk, pv: (nh, P, hd); mask: (B, 1, 1, L) bool or None. Prefix keys are always
    attendable and carry no rotary position: they are learned directly in the rotated key space,
    so they have no position to rotate by."""
    b, n, d = x.shape
    q, k, v = (
        proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k = torch.cat([pk.expand(b, -1, -1, -1).to(k.dtype), k], dim=2)  # (B, nh, P + L, hd)
    v = torch.cat([pv.expand(b, -1, -1, -1).to(v.dtype), v], dim=2)
    if mask is not None:
        mask = torch.cat([mask.new_ones(b, 1, 1, pk.shape[1]), mask], dim=-1)  # (B, 1, 1, P + L)
    y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.o_proj(y.transpose(1, 2).reshape(b, n, d))


class PrefixDenoiser(BaselineDenoiser):
    """Prefix tuning. The trunk loop below is the base's (time-agnostic) DiT loop with the
    attention swapped for `prefix_attention`; tests check it reproduces the base exactly."""

    def __init__(self, base: nn.Module, cfg: BaselineConfig) -> None:
        blocks, c = _blocks(base), base.config
        if c.time_conditioning:
            raise ValueError("prefix tuning supports time-agnostic DiT bases only (no adaLN)")
        heads = c.num_attention_heads
        delta = PrefixDelta(
            len(blocks), heads, c.hidden_size // heads, cfg.prefix_length, cfg.prefix_hidden
        )
        super().__init__(base, delta)

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        return trunk(self.base, input_ids, attention_mask, self.delta())


def trunk(base, input_ids, attention_mask=None, prefixes: torch.Tensor | None = None):
    """The base's hidden states (B, L, d), with key/value `prefixes` (layers, 2, nh, P, hd)."""
    tr, c = base.transformer, base.config
    x = tr.embed_tokens(input_ids)
    cos, sin = rotary_cos_sin(
        x.shape[1], c.hidden_size // c.num_attention_heads, c.rope_theta, x.device, x.dtype
    )
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    for i, block in enumerate(tr.blocks):
        h = block.norm1(x)
        if prefixes is None:
            x = x + block.attn(h, cos, sin, mask)
        else:
            x = x + prefix_attention(block.attn, h, cos, sin, mask, *prefixes[i])
        x = x + block.mlp(block.norm2(x))
    return tr.norm_f(x)


# --- loreft --------------------------------------------------------------------------------------


class LoReFT(nn.Module):
    """phi(h) = h + R^T (W h + b - R h), R (r, d) with orthonormal rows.

    W starts equal to R and b at zero, so phi starts as the identity (pyreft draws W at random
    instead; starting at the base makes the method comparable with the zero-init ones)."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        # weight: R (r, d). Cayley, not the default Householder map for a wide R: under AdamW,
        # weight decay on the reflectors drives a Householder R to zero.
        self.rotate = orthogonal(nn.Linear(d, rank, bias=False), orthogonal_map="cayley")
        self.learned = nn.Linear(d, rank)
        with torch.no_grad():
            self.learned.weight.copy_(self.rotate.weight)
            self.learned.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        r = self.rotate.weight  # (r, d)
        return h + (self.learned(h) - h @ r.T) @ r


class ReftDenoiser(BaselineDenoiser):
    """LoReFT on the base's final hidden states at every position (no step schedule)."""

    def __init__(self, base: nn.Module, cfg: BaselineConfig) -> None:
        super().__init__(base, LoReFT(base.config.hidden_size, cfg.loreft_rank))

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        with torch.no_grad():  # the base only feeds the intervention: no activations kept
            h = self.base.hidden_states(input_ids, attention_mask, t)
        return self.delta(h)


# --- peft weight LoRA ----------------------------------------------------------------------------


class PeftDenoiser(WrappedDenoiser):
    """A `peft` LoRA model behind the denoiser seam. peft injects its layers into the base in
    place, so `self.peft.base_model.model` *is* the (adapted) base."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model

    @property
    def inner(self) -> nn.Module:
        return self.peft.base_model.model

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        return self.inner.hidden_states(input_ids, attention_mask, t, condition_mask)


def _peft_lora(base: nn.Module, cfg: BaselineConfig) -> PeftDenoiser:
    from peft import LoraConfig, get_peft_model

    _linears(base, cfg.target_modules)  # a clear error before peft's own
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
    )
    return PeftDenoiser(get_peft_model(base, lora))


# --- builders ------------------------------------------------------------------------------------


def _no_extra_loss() -> dict[str, torch.Tensor]:
    return {}


def _frozen_copy(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base).eval().requires_grad_(False)


def _write_config(path: Path, name: str, method: str, fingerprint: str, cfg, **extra) -> None:
    config = {
        "method": method,
        "task": cfg.task,
        "baselines": asdict(cfg.baselines),
        "base_fingerprint": fingerprint,
        **extra,
    }
    (path / name).write_text(json.dumps(config, indent=2))


def _delta_bundle(model: BaselineDenoiser, cfg: FinetuneConfig, method: str) -> MethodBundle:
    """Bundle of a wrapper method: saves `model.delta` as adapter_model.safetensors."""
    fingerprint = base_fingerprint(model.base)

    def save(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            PREFIX + k: v.detach().cpu().contiguous() for k, v in model.delta.state_dict().items()
        }
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": method})
        _write_config(path, CONFIG_NAME, method, fingerprint, cfg)

    return MethodBundle(model, _no_extra_loss, save)


def build_adapters(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    return _delta_bundle(AdapterDenoiser(base, cfg.baselines), cfg, "adapters")


def build_nara(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    return _delta_bundle(NaraDenoiser(base, cfg.baselines), cfg, "nara")


def build_loreft(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    return _delta_bundle(ReftDenoiser(base, cfg.baselines), cfg, "loreft")


def build_prefix(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    if cfg.baselines.prefix_length > cfg.max_length:
        raise ValueError(
            f"baselines.prefix_length ({cfg.baselines.prefix_length}) is longer than the "
            f"max sequence length max_length ({cfg.max_length})"
        )
    return _delta_bundle(PrefixDenoiser(base, cfg.baselines), cfg, "prefix")


def bias_names(base: nn.Module) -> list[str]:
    """BitFit's parameters: every bias of the base. On our DiT that is, per block, the biases of
    q_proj, k_proj, v_proj, o_proj, fc1, fc2, norm1 and norm2, plus norm_f's (and, on a
    time-conditioned base, those of the time MLP and adaLN). lm_head has no bias."""
    return [n for n, _ in base.named_parameters() if n.endswith(".bias")]


def build_bitfit(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    reference, fingerprint = _frozen_copy(base), base_fingerprint(base)
    names = set(bias_names(base))
    for n, p in base.named_parameters():
        p.requires_grad_(n in names)

    def save(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        params = dict(base.named_parameters())
        tensors = {PREFIX + n: params[n].detach().cpu().contiguous() for n in sorted(names)}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": "bitfit"})
        _write_config(path, CONFIG_NAME, "bitfit", fingerprint, cfg)

    return MethodBundle(base, _no_extra_loss, save, reference)


def build_full(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    if not hasattr(base, "save_pretrained"):
        raise ValueError(
            f"full fine-tuning saves with save_pretrained; {type(base).__name__} has none"
        )
    reference, fingerprint = _frozen_copy(base), base_fingerprint(base)
    base.requires_grad_(True)

    def save(path: Path) -> None:
        base.save_pretrained(path)  # config.json + model.safetensors
        _write_config(path, METHOD_FILE, "full", fingerprint, cfg)

    return MethodBundle(base, _no_extra_loss, save, reference)


def build_weight_lora(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    reference, fingerprint = _frozen_copy(base), base_fingerprint(base)
    model = _peft_lora(base, cfg.baselines)

    def save(path: Path) -> None:
        model.peft.save_pretrained(path)  # peft's adapter_config.json + adapter_model.safetensors
        _write_config(path, METHOD_FILE, "weight_lora", fingerprint, cfg)

    return MethodBundle(model, _no_extra_loss, save, reference)


# --- loading -------------------------------------------------------------------------------------


def _load_delta(cls):
    def load(path: Path, base: nn.Module, cfg: BaselineConfig) -> nn.Module:
        model = cls(base, cfg)
        model.delta.load_state_dict(read_tensors(path / WEIGHTS_NAME, model.delta, PREFIX))
        return model

    return load


def _load_bitfit(path: Path, base: nn.Module, cfg: BaselineConfig) -> nn.Module:
    model = _frozen_copy(base)
    model.load_state_dict(read_tensors(path / WEIGHTS_NAME, _Biases(model), PREFIX), strict=False)
    return model


class _Biases(nn.Module):
    """A view whose state dict is exactly BitFit's tensors, to check a file against."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.names = bias_names(base)
        self._params = dict(base.named_parameters())

    def state_dict(self, *args, **kwargs):
        return {n: self._params[n] for n in self.names}


def _load_full(path: Path, base: nn.Module, cfg: BaselineConfig) -> nn.Module:
    return type(base).from_pretrained(path).requires_grad_(False)


def _load_weight_lora(path: Path, base: nn.Module, cfg: BaselineConfig) -> nn.Module:
    from peft import PeftModel

    return PeftDenoiser(PeftModel.from_pretrained(_frozen_copy(base), path))


# --- the records: peak learning rates are the defaults of jobs/train.py --lr ---------------------

# full fine-tuning's rate: the best of 1e-4 / 3e-4 / 1e-3 on held-out SST-2 rows (docs/READER.md)
register(
    Method("full", build_full, _load_full, default_lr=3e-4, label="full fine-tuning", in_paper=True)
)
register(
    Method(
        "weight_lora",
        build_weight_lora,
        _load_weight_lora,
        default_lr=1e-3,
        label="weight LoRA",
        run_name_knobs=(("r", "baselines.lora_rank"),),
        in_paper=True,
    )
)
register(
    Method(
        "adapters",
        build_adapters,
        _load_delta(AdapterDenoiser),
        default_lr=1e-3,
        label="adapters",
        run_name_knobs=(("b", "baselines.bottleneck"),),
        in_paper=True,
    )
)
register(
    Method("bitfit", build_bitfit, _load_bitfit, default_lr=5e-3, label="BitFit", in_paper=True)
)
register(
    Method(
        "prefix",
        build_prefix,
        _load_delta(PrefixDenoiser),
        default_lr=5e-3,
        label="prefix tuning",
        run_name_knobs=(("p", "baselines.prefix_length"),),
        in_paper=True,
    )
)
register(Method("loreft", build_loreft, _load_delta(ReftDenoiser), default_lr=2e-3, label="LoReFT"))
register(Method("nara", build_nara, _load_delta(NaraDenoiser), default_lr=1e-3, label="NaRA"))
