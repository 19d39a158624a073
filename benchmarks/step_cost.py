"""LoRA-Diffusion's training step against full fine-tuning's and weight LoRA's, per preset.

    python benchmarks/step_cost.py [--presets small,sedd-small] [--device auto|cpu|cuda]
        [--batch-size 16] [--seq-len 64] [--target-len 8] [--reps 5] [--json FILE]

One step here is the recipe's own: `training._train_step` (AdamW, grad clipping, bf16 autocast
with --precision bf16) over `finetune.recipe_loss_fn` of a `LossModule` holding the method's
model and its extra loss terms (LoRA-Diffusion's nuclear-norm and orthogonality regularisers),
on a random base of each preset and a batch laid out like a task's: a condition, then
`--target-len` target tokens, then padding to `--seq-len`. Prints the median seconds per step
(the methods take turns step by step) and each method's ratio to full fine-tuning, all presets
in one table; --json also writes the rows.
`--device auto` takes CUDA when there is one: the same command gives the GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

METHODS = ("lora_diffusion", "full", "weight_lora")


def task_batch(vocab: int, batch: int, seq: int, target: int, device: str) -> dict:
    """input_ids, attention_mask, target_mask (B, L): rows of 3/4 of L real tokens, the last
    `target` of them the target region, then padding."""
    g = torch.Generator().manual_seed(0)
    length = max(target + 1, 3 * seq // 4)
    ids = torch.randint(6, vocab, (batch, seq), generator=g)
    attn = torch.zeros(batch, seq, dtype=torch.long)
    attn[:, :length] = 1
    ids[attn == 0] = 0
    tmask = torch.zeros(batch, seq, dtype=torch.bool)
    tmask[:, length - target : length] = True
    return {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "target_mask": tmask.to(device),
    }


def make_step(method: str, preset: str, a: argparse.Namespace, device: str):
    """(one recipe training step of `method` on a random `preset` base as a call of the step
    index, trainable parameter count)."""
    from lora_diffusion.corruption import get_process
    from lora_diffusion.finetune import FinetuneConfig, recipe_loss_fn
    from lora_diffusion.losses import LossModule
    from lora_diffusion.methods import METHODS
    from lora_diffusion.models import DiffusionLM, preset_config
    from lora_diffusion.schedules import get_schedule
    from lora_diffusion.training import TrainConfig, _train_step, build_optimizer

    torch.manual_seed(0)
    base = DiffusionLM(preset_config(preset, max_position_embeddings=max(1024, a.seq_len)))
    cfg = FinetuneConfig(base="-", output_dir="-", method=method, max_length=a.seq_len)
    bundle = METHODS.get(method).build(cfg, base)
    v, mask_id = base.config.vocab_size, base.config.mask_token_id
    process, schedule = get_process("absorbing", v, mask_id), get_schedule("loglinear")
    module = LossModule(bundle.model, process, schedule, "elbo", None, bundle.extra_loss)
    module.to(device)
    batch = task_batch(v, a.batch_size, a.seq_len, a.target_len, device)
    train = TrainConfig(max_steps=10**6, batch_size=a.batch_size, precision=a.precision)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    opt, _ = build_optimizer(params, train)
    loss_fn = recipe_loss_fn(module)

    def step(k: int) -> None:
        _train_step(bundle.model, loss_fn, lambda s, m: batch, train, opt, params, k)

    return step, sum(p.numel() for p in params)


def measure(preset: str, methods: list[str], a: argparse.Namespace, device: str) -> list[dict]:
    """Median seconds per step of each method. The methods take turns step by step, so a
    machine whose load changes during the run slows them alike and the ratios hold."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    steps = {m: make_step(m, preset, a, device) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for k in range(a.warmup + a.reps):
        for m, (step, _) in steps.items():
            sync()
            t0 = time.perf_counter()
            step(k)
            sync()
            if k >= a.warmup:
                times[m].append(time.perf_counter() - t0)
    return [
        {
            "preset": preset,
            "method": m,
            "seconds": statistics.median(times[m]),
            "trainable": steps[m][1],
        }
        for m in methods
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="small,sedd-small", help="comma list")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list; full is the unit")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--target-len", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    methods = a.methods.split(",")
    rows = []
    for preset in a.presets.split(","):
        rows += measure(preset, methods, a, device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    unit = {r["preset"]: r["seconds"] for r in rows if r["method"] == "full"}
    for r in rows:
        r["x_full"] = r["seconds"] / unit[r["preset"]] if r["preset"] in unit else None
    print(
        f"device={device} batch={a.batch_size} seq={a.seq_len} target={a.target_len} "
        f"precision={a.precision} reps={a.reps}"
    )
    print(f"{'preset':12} {'method':15} {'trainable':>11} {'ms/step':>9} {'x full FT':>9}")
    for r in rows:
        ratio = "" if r["x_full"] is None else f"{r['x_full']:9.2f}"
        print(
            f"{r['preset']:12} {r['method']:15} {r['trainable']:11d} "
            f"{1000 * r['seconds']:9.1f} {ratio}"
        )
    if a.json:
        meta = {"device": device, **{k: v for k, v in vars(a).items() if k != "json"}}
        with open(a.json, "w") as f:
            json.dump({"settings": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
