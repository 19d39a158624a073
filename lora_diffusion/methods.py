"""What a tuning method is: one `Method` record, registered once by the module that implements it.

    name            the key of `FinetuneConfig.method`, of saved configs' `method`, of the CLI
    build           (cfg, base) -> MethodBundle: the base wrapped for training, and its saver
    load            (path, base, cfg) -> denoiser: a saved folder rebuilt on a base
    default_lr      the peak learning rate when the caller chooses none
    run_name_knobs  (short, config path) pairs naming a run: ("r", "baselines.lora_rank") -> r8
    label           the method's name in prose, tables and plots
    in_paper        one of the methods the paper compares (jobs/experiments.py's methods stage)
    frozen_base     the base stays whole and frozen (the method only reads it): FSDP may shard it

Each method module calls `register(Method(...))` on import, and `lora_diffusion/__init__.py`
imports every method module, so `METHODS` is complete wherever it can be reached (peft registers
its tuners the same way). This module imports none of them: they import it.

Adding a method: a module with its builder, loader and `register(Method(...))`; its import in
`lora_diffusion/__init__.py`; its name and default lr in jobs/common.py's `METHOD_LR` (--help
answers without importing the library; tests/test_jobs.py checks the copy).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adaptor_io import CONFIG_NAME, AdaptorFileError, base_fingerprint
from .config import BaselineConfig, FinetuneConfig, from_dict
from .registry import Registry

METHOD_FILE = "lora_diffusion_method.json"  # beside files another library owns (peft, HF)


@dataclass
class MethodBundle:
    """What a method gives the recipe: the denoiser to train, the loss extras, a saver, and,
    for methods that change the base in place, a frozen copy of the base taken beforehand."""

    model: nn.Module
    extra_loss: Callable[[], dict[str, torch.Tensor]]  # name -> weighted scalar
    save: Callable[[Path], None]
    reference: nn.Module | None = None  # the pristine base; None: the base is left untouched
    describe: Callable[[], dict] | None = None  # a method-specific report (e.g. effective ranks)


@dataclass(frozen=True)
class Method:
    """One tuning method: how to train it, how to load it, and how runs of it are named."""

    name: str
    build: Callable[[FinetuneConfig, nn.Module], MethodBundle]
    load: Callable[[Path, nn.Module, BaselineConfig], nn.Module]
    default_lr: float
    label: str
    run_name_knobs: tuple[tuple[str, str], ...] = ()
    in_paper: bool = False
    frozen_base: bool = False

    def run_name_parts(self, cfg: FinetuneConfig) -> list[str]:
        """The knobs' parts of a run name: ("r", "adaptor.ranks") -> "r64" or "r64.32.8"."""
        parts = []
        for short, path in self.run_name_knobs:
            value = cfg
            for attr in path.split("."):
                value = getattr(value, attr)
            text = ".".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            parts.append(short + text)
        return parts


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    """Add `method` to `METHODS`; a name registers once."""
    return METHODS.register(method.name, method)


def read_method_config(path: str | Path) -> dict:
    """The method config of a saved folder: `lora_diffusion_method.json` where another library
    owns adapter_config.json (peft, full models), else adapter_config.json."""
    path = Path(path)
    for name in (METHOD_FILE, CONFIG_NAME):
        file = path / name
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AdaptorFileError(f"{file}: not valid JSON ({e})") from None
            if not isinstance(config, dict) or "method" not in config:
                raise AdaptorFileError(f"{file}: no `method` key")
            return config
    raise AdaptorFileError(f"{path}: no {METHOD_FILE} or {CONFIG_NAME} (not a saved method folder)")


def load_method(
    path: str | Path, base: nn.Module, method: str | None = None, check_base: bool = True
) -> nn.Module:
    """Rebuild a saved method on `base` (left untouched: in-place methods load onto a copy).

    Returns the denoiser, in eval mode. Raises AdaptorFileError when the folder holds another
    method than `method`, was trained on another base, or its files are missing or do not
    match."""
    path = Path(path)
    config = read_method_config(path)
    found = config["method"]
    if method is not None and found != method:
        raise AdaptorFileError(f"{path}: this is a {found!r} adaptor, not {method!r}")
    if check_base and config.get("base_fingerprint"):
        fp = base_fingerprint(base)
        if fp != config["base_fingerprint"]:
            raise AdaptorFileError(
                f"{path}: trained on base {config['base_fingerprint']}, not {fp}"
            )
    if found not in METHODS:
        raise AdaptorFileError(f"{path}: unknown method {found!r}; known: {METHODS.names()}")
    try:
        cfg = from_dict(BaselineConfig, config.get("baselines", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise AdaptorFileError(f"{path}: invalid baselines settings ({e})") from None
    return METHODS.get(found).load(path, base, cfg).eval()
