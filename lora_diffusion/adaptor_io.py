"""Saving, loading and reporting trajectory adaptors, in a peft-like folder layout.

    <dir>/adapter_config.json        method, task, AdaptorConfig, hidden size, base fingerprint
    <dir>/adapter_model.safetensors  tensors named "lora_diffusion.<module path>"

The config records the base the adaptor was trained on (`base_fingerprint`: a hash of the base's
config and weights); loading onto another base is refused with `AdaptorFileError`, as is a
missing, corrupt or wrong-shaped file. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adaptor import AdaptorConfig, TrajectoryAdaptor
from .router import Router

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "router.safetensors"
PREFIX = "lora_diffusion."
FORMAT_VERSION = 1


class AdaptorFileError(ValueError):
    """An adaptor folder that cannot be loaded; the message names the file and the reason."""


def base_fingerprint(base: nn.Module) -> str:
    """A short hash of a base's architecture and weights.

    Every parameter and buffer contributes its name, shape and dtype; small tensors hash in full,
    tensors over 1M elements through a fixed strided sample of 65,536 values (so fingerprinting
    a 7B base stays cheap, and any retraining still changes it)."""
    h = hashlib.sha256()
    cfg = getattr(base, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
        for k in ("transformers_version", "torch_dtype", "dtype", "architectures"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in sorted(base.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > 1_000_000:
            flat = flat[:: flat.numel() // 65_536]
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adaptor(
    path: str | Path,
    adaptor: TrajectoryAdaptor,
    base: nn.Module | None = None,
    task: str | None = None,
    method: str = "lora_diffusion",
    extra: dict | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "method": method,
        "format_version": FORMAT_VERSION,
        "task": task,
        "hidden_size": adaptor.d,
        "adaptor": asdict(adaptor.cfg),
        "base_fingerprint": base_fingerprint(base) if base is not None else None,
        "base_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None),
        "trainable_params": sum(p.numel() for p in adaptor.parameters()),
        **(extra or {}),
    }
    tensors = {PREFIX + k: v.detach().cpu().contiguous() for k, v in adaptor.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": method})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


def read_adaptor_config(path: str | Path, method: str = "lora_diffusion") -> dict:
    """The parsed `adapter_config.json` of an adaptor folder, checked for the right method."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise AdaptorFileError(f"{file}: not found (is {path} an adaptor folder?)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdaptorFileError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdaptorFileError(f"{file}: expected a JSON object")
    found = config.get("method", config.get("peft_type"))
    if found != method:
        raise AdaptorFileError(f"{file}: this is a {found!r} adaptor, not {method!r}")
    return config


def load_adaptor(
    path: str | Path, base: nn.Module | None = None, check_base: bool = True
) -> tuple[TrajectoryAdaptor, dict]:
    """Load an adaptor folder; with `base`, check it was trained on that base.

    Returns (adaptor, config). Raises AdaptorFileError naming the file and what is wrong."""
    path = Path(path)
    config = read_adaptor_config(path)
    file = path / CONFIG_NAME
    try:
        known = {f.name for f in fields(AdaptorConfig)}
        raw = config["adaptor"]
        unknown = set(raw) - known
        if unknown:
            raise AdaptorFileError(f"{file}: unknown adaptor settings {sorted(unknown)}")
        raw.setdefault("condition_norm", "none")  # files written before these existed
        raw.setdefault("condition_pool", "mean")
        raw.setdefault("gate_init", "zero")
        raw.setdefault("reader", "none")
        if raw["reader"] != "none":
            raw.setdefault("reader_summary", "none")  # readers written before the summary
            raw.setdefault("reader_depth", 1)  # and before deeper and ladder readers
            raw.setdefault("reader_ladder", False)
        cfg = AdaptorConfig(**raw)
        d = int(config["hidden_size"])
    except KeyError as e:
        raise AdaptorFileError(f"{file}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, AdaptorFileError):
            raise
        raise AdaptorFileError(f"{file}: invalid adaptor settings ({e})") from None
    if base is not None:
        base_d = base.config.hidden_size
        if base_d != d:
            raise AdaptorFileError(
                f"{path}: adaptor is for hidden size {d}, the base has hidden size {base_d}"
            )
        if check_base and config.get("base_fingerprint"):
            fp = base_fingerprint(base)
            if fp != config["base_fingerprint"]:
                raise AdaptorFileError(
                    f"{path}: trained on base {config['base_fingerprint']} "
                    f"({config.get('base_name_or_path')}), not on this base ({fp}); "
                    "pass check_base=False (--no-base-check) to load it anyway"
                )
    adaptor = TrajectoryAdaptor(cfg, d)
    adaptor.load_state_dict(read_tensors(path / WEIGHTS_NAME, adaptor, PREFIX))
    return adaptor, config


def read_tensors(file: Path, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of `file` (names without `prefix`), checked against `module`'s state dict."""
    if not file.is_file():
        raise AdaptorFileError(f"{file}: not found")
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdaptorFileError(f"{file}: corrupt or not a safetensors file ({e})") from None
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected)) + sorted(
        k for k in raw if not k.startswith(prefix)
    )
    if missing or unexpected:
        raise AdaptorFileError(
            f"{file}: tensors do not match the config: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise AdaptorFileError(
                f"{file}: tensor {prefix}{k} has shape {tuple(v.shape)}, "
                f"expected {tuple(expected[k].shape)}"
            )
        if not torch.isfinite(v).all():
            raise AdaptorFileError(f"{file}: tensor {prefix}{k} holds NaN or inf values")
    return {k: v.to(expected[k].dtype) for k, v in state.items()}


def save_router(path: str | Path, router: Router, tasks: list[str], base: nn.Module | None = None):
    """Write a router (and the task order its outputs follow) next to its adaptors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lin1, lin2 = router.net[0], router.net[2]
    config = {
        "method": "lora_diffusion_router",
        "tasks": list(tasks),
        "hidden_size": lin1.in_features,
        "router_hidden": lin1.out_features,
        "condition_repr": router.condition_repr,
        "base_fingerprint": base_fingerprint(base) if base is not None else None,
    }
    if lin2.out_features != len(tasks):
        raise ValueError(f"router has {lin2.out_features} outputs for {len(tasks)} tasks")
    tensors = {"router." + k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    save_file(tensors, str(path / ROUTER_WEIGHTS))
    (path / ROUTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def load_router(path: str | Path, base: nn.Module | None = None) -> tuple[Router, list[str]]:
    """Load a router folder; returns (router, task order)."""
    path = Path(path)
    file = path / ROUTER_CONFIG
    if not file.is_file():
        raise AdaptorFileError(f"{file}: not found")
    try:
        config = json.loads(file.read_text())
        tasks, d, hidden = config["tasks"], int(config["hidden_size"]), int(config["router_hidden"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdaptorFileError(f"{file}: invalid router config ({e})") from None
    if base is not None and base.config.hidden_size != d:
        raise AdaptorFileError(
            f"{path}: router is for hidden size {d}, the base has {base.config.hidden_size}"
        )
    router = Router(d, len(tasks), hidden, config.get("condition_repr", "hidden"))
    router.load_state_dict(read_tensors(path / ROUTER_WEIGHTS, router, "router."))
    return router, tasks


def effective_rank(weight: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values): 1 for rank one, r for a flat spectrum;
    0 for an all-zero matrix (an untrained up-projection)."""
    s = torch.linalg.svdvals(weight.detach().float())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def adaptor_report(adaptor: TrajectoryAdaptor, base: nn.Module | None = None) -> dict:
    """Trainable parameters, share of the base, storage (fp32, bf16) and, per module, its rank
    and the effective rank of its up- (W_A) and down- (W_B) projections."""
    n = sum(p.numel() for p in adaptor.parameters())
    report = {
        "trainable_params": n,
        "storage_mb_fp32": 4 * n / 1e6,
        "storage_mb_bf16": 2 * n / 1e6,
    }
    if base is not None:
        base_n = sum(p.numel() for p in base.parameters())
        report.update(base_params=base_n, trainable_pct=100.0 * n / base_n)
    modules = []
    for p, phase in enumerate(adaptor.phases):
        for i, m in enumerate(phase):
            modules.append(
                {
                    "phase": p,
                    "module": i,
                    "rank": m.up.shape[1],
                    "sigma": adaptor.cfg.sigmas[p],
                    "effective_rank_up": effective_rank(m.up),
                    "effective_rank_down": effective_rank(m.down.weight),
                }
            )
    report["modules"] = modules
    return report
