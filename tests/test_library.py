"""The library's public surface: imports without Ray or MLflow, config overrides."""

import subprocess
import sys

import pytest

from lora_diffusion.config import DiffusionConfig, apply_overrides, from_dict
from lora_diffusion.pretraining import PretrainConfig


def test_library_imports_with_ray_and_mlflow_unavailable():
    # A None entry in sys.modules makes `import ray` fail as if it were not installed.
    code = (
        "import sys\n"
        "sys.modules.update(ray=None, mlflow=None)\n"
        "import lora_diffusion, lora_diffusion.tasks, lora_diffusion.data\n"
        "import lora_diffusion.pretraining, lora_diffusion.generation\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')\n"
        "            and sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dotted_overrides_reach_nested_configs_with_types():
    cfg = PretrainConfig(corpus_dir="c", output_dir="o")
    cfg = apply_overrides(cfg, ["train.lr=0.01", "diffusion.steps=50", "time_conditioning=true"])
    assert cfg.train.lr == 0.01 and cfg.diffusion.steps == 50 and cfg.time_conditioning is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "train.nope"),
        ("diffusion.steps=abc", "diffusion.steps"),
        ("lr", "key=value"),
        ("diffusion.process=gaussian", "gaussian"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises((KeyError, ValueError), match=message):
        apply_overrides(PretrainConfig(corpus_dir="c", output_dir="o"), [override])


def test_config_from_yaml_dict_rejects_unknown_keys():
    assert from_dict(DiffusionConfig, {"steps": 10}).steps == 10
    with pytest.raises(KeyError, match="stepz"):
        from_dict(DiffusionConfig, {"stepz": 10})


def test_optional_config_values_parse_and_clear():
    from lora_diffusion.config import apply_overrides
    from lora_diffusion.finetune import FinetuneConfig

    cfg = FinetuneConfig(base="b", output_dir="o")
    assert apply_overrides(cfg, ["eval_steps=4"]).eval_steps == 4
    assert apply_overrides(cfg, ["eval_limit=5", "eval_limit=none"]).eval_limit is None
    assert apply_overrides(cfg, ["baselines.lora_alpha=16"]).baselines.lora_alpha == 16.0


def test_overrides_that_must_agree_change_together():
    """Phases are three values that must agree: set one by one, each step would be invalid."""
    from lora_diffusion.finetune import FinetuneConfig

    cfg = FinetuneConfig(base="b", output_dir="o")
    three = ["adaptor.ranks=16,8,4", "adaptor.sigmas=1,.5,.25", "adaptor.boundaries=.6,.3"]
    three = apply_overrides(cfg, [*three, "train.lr=0.01"])
    a = three.adaptor
    assert (a.ranks, a.sigmas, a.boundaries) == ((16, 8, 4), (1, 0.5, 0.25), (0.6, 0.3))
    assert three.train.lr == 0.01 and cfg.adaptor.ranks == (64,)  # a new object
    with pytest.raises(ValueError, match="2 ranks need 2 sigmas and 1 boundaries"):
        apply_overrides(cfg, ["adaptor.ranks=16,8"])  # still validated, once, at the end
    with pytest.raises(KeyError, match="'adaptor.k.x'"):
        apply_overrides(cfg, ["adaptor.k.x=1"])
