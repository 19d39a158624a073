"""Config dataclasses and the one-way flow into them: YAML file, then dotted CLI overrides
(`diffusion.steps=50`, `adaptor.ranks=8,32,64`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .adaptor import AdaptorConfig
from .corruption import PROCESSES
from .schedules import SCHEDULES
from .training import TrainConfig


@dataclass
class DiffusionConfig:
    process: str = field(default="absorbing", metadata={"help": "absorbing | uniform"})
    schedule: str = field(default="loglinear", metadata={"help": "loglinear | linear | cosine"})
    eps: float = field(default=1e-3, metadata={"help": "alpha(1); keeps weights finite"})
    weighting: str = field(default="elbo", metadata={"help": "elbo | simple loss weighting"})
    steps: int = field(default=100, metadata={"help": "T, discrete sampling steps"})

    def __post_init__(self) -> None:
        PROCESSES.get(self.process)
        SCHEDULES.get(self.schedule)
        if self.weighting not in ("elbo", "simple"):
            raise ValueError(f"diffusion.weighting must be elbo or simple, got {self.weighting!r}")
        if self.process == "uniform" and self.weighting == "elbo":
            raise ValueError("diffusion.weighting=elbo is the absorbing ELBO; use simple")
        if self.steps < 1:
            raise ValueError(f"diffusion.steps must be >= 1, got {self.steps}")


# Fine-tuning (every method, one task or several) weights its denoising loss `simple`: a plain
# mean over the masked target tokens. The ELBO's weight w(t) ~ 1/t makes a few rows of a batch
# count hundreds of times more than the rest (a short target is masked at small t rarely, and
# then weighs 1/t), and the gradient clip then shrinks those steps. On small-h200's SST-2
# held-out rows `simple` raised LoRA-Diffusion from 74.0 to 77.2 % (3 seeds) and full
# fine-tuning from 83.9 to 84.7 % (seed 0; docs/READER.md section 5). Pretraining keeps the ELBO.
def finetuning_diffusion() -> DiffusionConfig:
    """The fine-tuning recipes' default DiffusionConfig: the `simple` loss weighting."""
    return DiffusionConfig(weighting="simple")


@dataclass
class BaselineConfig:
    """Knobs of the baseline tuning methods (`lora_diffusion.baselines`)."""

    lora_rank: int = field(default=64, metadata={"help": "weight_lora: LoRA rank r"})
    lora_alpha: float | None = field(default=None, metadata={"help": "weight_lora: None = rank"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
        metadata={"help": "weight_lora / nara: Linear layers to adapt, by name"},
    )
    bottleneck: int = field(default=256, metadata={"help": "adapters: bottleneck width"})
    prefix_length: int = field(default=32, metadata={"help": "prefix: key/value prefix length"})
    prefix_hidden: int = field(
        default=0, metadata={"help": "prefix: reparameterisation MLP width; 0 = direct params"}
    )
    loreft_rank: int = field(default=8, metadata={"help": "loreft: intervention rank"})
    nara_rank: int = field(default=8, metadata={"help": "nara: LoRA rank"})
    nara_time_dim: int = field(
        default=64, metadata={"help": "nara: Emb(t) size and gate MLP width"}
    )

    def __post_init__(self) -> None:
        for name in ("lora_rank", "bottleneck", "prefix_length", "loreft_rank", "nara_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"baselines.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_hidden < 0:
            raise ValueError(f"baselines.prefix_hidden must be >= 0, got {self.prefix_hidden}")
        if not self.target_modules:
            raise ValueError("baselines.target_modules is empty")


@dataclass
class FinetuneConfig:
    """The fine-tuning recipe's config (`finetune.finetune`); every method's builder reads it.
    It lives here, below the methods, so that a method module never imports the recipe."""

    base: str = field(metadata={"help": "base model folder or hub id"})
    output_dir: str = field(metadata={"help": "adaptor/, metrics.json, checkpoints/"})
    task: str = field(default="sst2", metadata={"help": "task registry name"})
    method: str = field(default="lora_diffusion", metadata={"help": "tuning method"})
    data_dir: str | None = field(default=None, metadata={"help": "task data folder"})
    max_length: int = field(default=128, metadata={"help": "tokens per example"})
    train_limit: int | None = field(default=None, metadata={"help": "use N train examples"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate N examples"})
    holdout: int = field(
        default=0,
        metadata={
            "help": "hold out the last N train rows (never trained on) as a validation set: "
            "periodic evaluation and val_* results score it; 0: periodic evaluation scores the "
            "eval split"
        },
    )
    eval_steps: int | None = field(default=None, metadata={"help": "sampling steps; None: T"})
    eval_temperature: float = field(
        default=1.0, metadata={"help": "generative eval: 1 samples (Algorithm 1), 0 is greedy"}
    )
    scoring_num_t: int = field(default=8, metadata={"help": "t values for candidate scoring"})
    forgetting_blocks: int = field(default=64, metadata={"help": "corpus blocks; 0 skips"})
    corpus_dir: str | None = field(default=None, metadata={"help": "default <data-dir>/corpus"})
    rank_every: int = field(
        default=1,
        metadata={
            "help": "lora_diffusion: the nuclear-norm term is computed (exactly) every N steps "
            "with weight N, none between (lazy regularisation: fewer SVDs, which cost more than "
            "the adaptor on a GPU); its logged reg_rank is N x the term there, 0 between. "
            "Under AdamW N=8 regularised less than every step (higher effective ranks after "
            "300 sst2 steps, docs/GPU.md): 1, every step, is the default"
        },
    )
    checkpoint_every: int = field(default=0, metadata={"help": "steps; 0: only at the end"})
    resume_from: str | None = field(default=None, metadata={"help": "a checkpoint folder"})
    threads: int | None = None
    cache_dir: str | None = None
    adaptor: AdaptorConfig = field(default_factory=AdaptorConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    diffusion: DiffusionConfig = field(default_factory=finetuning_diffusion)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=2e-3, max_steps=1000, batch_size=32, warmup_steps=50)
    )

    def __post_init__(self) -> None:
        if self.eval_temperature < 0:  # caught here, not after training
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0 train rows, got {self.holdout}")
        if self.rank_every < 1:
            raise ValueError(f"rank_every must be >= 1 steps, got {self.rank_every}")

    @property
    def scored_split(self) -> str:
        """The prefix of what periodic evaluation reports: `val` (held-out train rows) or
        `eval`."""
        return "val" if self.holdout else "eval"


def _coerce(value: str, typ):
    """Parse a CLI string into the field's type (bool, int, float, str, tuples of those)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # Optional fields: `none` clears them
        if value.lower() in ("none", "null") and type(None) in typing.get_args(typ):
            return None
        inner = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(value, inner[0])
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(typ) or (str,)
        items = [_coerce(v, inner) for v in value.split(",") if v != ""]
        return tuple(items) if origin is tuple else items
    if typ is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return typ(value)


def apply_overrides(obj, overrides: list[str]):
    """Apply `a.b=value` strings to a (nested) dataclass; returns a new, validated object.

    The overrides of one config object are applied together and validated once, so values
    that must agree change in one go (`adaptor.ranks=64,32,8 adaptor.sigmas=1,0.5,0.25
    adaptor.boundaries=0.6667,0.3333`: the paper's three phases instead of the default one). A later
    override of the same key wins."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KeyError(f"config key {key!r}: {part!r} has no sub-keys")
        node[leaf] = (value, key)
    return _apply(obj, tree) if tree else obj


def _leaf_key(sub) -> str:
    """The full dotted key of an override (the first one, for a subtree): for error messages."""
    return sub[1] if isinstance(sub, tuple) else _leaf_key(next(iter(sub.values())))


def _apply(obj, tree: dict):
    fields = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for name, sub in tree.items():
        full = _leaf_key(sub)
        if name not in fields:
            raise KeyError(f"unknown config key {full!r} ({name!r} not in {sorted(fields)})")
        current = getattr(obj, name)
        if isinstance(sub, dict):
            if not dataclasses.is_dataclass(current):
                raise KeyError(f"config key {full!r}: {name!r} has no sub-keys")
            changes[name] = _apply(current, sub)
            continue
        try:
            changes[name] = _coerce(sub[0], hints[name])
        except ValueError as e:
            raise ValueError(f"config key {full!r}: {e}") from None
    return dataclasses.replace(obj, **changes)


def from_dict(cls, data: dict):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        typ = hints[k]
        if dataclasses.is_dataclass(typ) and isinstance(v, dict):
            v = from_dict(typ, v)
        elif typing.get_origin(typ) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def load_yaml(cls, path: str | Path):
    with open(path) as f:
        return from_dict(cls, yaml.safe_load(f) or {})
