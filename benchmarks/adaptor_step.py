"""Adaptor training step vs the frozen base's plain no-grad forward, side by side in one run.

    python benchmarks/adaptor_step.py [--preset small] [--batch-size 32] [--seq-len 128]
        [--target-len 64]

Prints, for the same base, batch and sequence length: time per call and peak extra memory of
  base_forward    the base's no-grad forward to hidden states + output head at loss positions
  adaptor_step    LoRA-Diffusion's training step (base no-grad, adaptor fwd/bwd, AdamW step)
  one_block_step  the same with the one-block reader (width 64 over a mix of the layers) that
                  was the default before the ladder reader (three blocks of width 48)
  full_ft_step    a full fine-tuning step of the same base (what the frozen base avoids)
and their ratios to base_forward. The floor of adaptor_step / base_forward is 1.0.

The last --target-len tokens of each sequence are the target (masked and scored), the rest the
condition: the default, half the sequence, is a generation task's shape; SST-2 as conditional
generation has a 2-token target (label word, EOS), where the output head's cost, common to
every kind, shrinks and the ratios show what each method itself keeps.

Each measurement runs in a fresh subprocess, so peak memory (CPU: the growth of the process's
max RSS from before the first call; GPU: torch.cuda.max_memory_allocated above the model and
batch) is not polluted by the others. Pass --device cuda on a GPU machine.
"""

from __future__ import annotations

import json
import resource
import time

import torch
from side_by_side import add_ratios, measure_apart, print_rows, step_parser

KINDS = ("base_forward", "adaptor_step", "one_block_step", "full_ft_step")
ONE_BLOCK = {"reader_depth": 1, "reader_ladder": False, "reader_dim": 64}


def build(
    preset: str, batch: int, seq: int, target_len: int, device: str, reader: dict | None = None
):
    from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
    from lora_diffusion.composition import AdaptedDenoiser
    from lora_diffusion.corruption import get_process
    from lora_diffusion.models import DiffusionLM, preset_config
    from lora_diffusion.schedules import get_schedule

    torch.manual_seed(0)
    base = DiffusionLM(preset_config(preset)).to(device)
    v = base.config.vocab_size
    ids = torch.randint(6, v, (batch, seq), device=device)
    target = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    target[:, seq - target_len :] = True  # the condition first, then the target
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": target}
    cfg = AdaptorConfig(**(reader or {}))
    adapted = AdaptedDenoiser(base, TrajectoryAdaptor(cfg, base.config.hidden_size))
    adapted.to(device)
    proc = get_process("absorbing", v, base.config.mask_token_id)
    return base, adapted, batch_, proc, get_schedule("loglinear")


def make_call(kind: str, base, adapted, batch, proc, sched):
    from lora_diffusion.losses import denoising_loss

    g = torch.Generator().manual_seed(0)
    if kind == "base_forward":
        base.eval()

        def call():
            with torch.no_grad():
                out = denoising_loss(base, batch, proc, sched, "elbo", g)
            return out.loss

        return call
    if kind in ("adaptor_step", "one_block_step"):
        model, params = adapted, adapted.adaptor_parameters()
    else:
        model = base.train().requires_grad_(True)
        params = list(base.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = denoising_loss(model, batch, proc, sched, "elbo", g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.loss

    return step


def measure(
    kind: str, preset: str, batch: int, seq: int, device: str, reps: int, target_len: int
) -> dict:
    reader = ONE_BLOCK if kind == "one_block_step" else None
    base, adapted, b, proc, sched = build(preset, batch, seq, target_len, device, reader)
    call = make_call(kind, base, adapted, b, proc, sched)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # Memory is measured from before the first call: activations, gradients and optimizer
    # state all count, the model and the batch (common to every kind) do not.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()  # warm-up: allocator, optimizer state
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    sync()
    seconds = (time.perf_counter() - t0) / reps
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"kind": kind, "seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    doc = __doc__.splitlines()[0]
    p = step_parser(doc, KINDS, preset="small", batch_size=32, seq_len=128, reps=5)
    p.add_argument(
        "--target-len", type=int, default=None, help="target tokens a sequence (default: half)"
    )
    a = p.parse_args()
    if a.target_len is None:
        a.target_len = a.seq_len // 2
    if not 1 <= a.target_len < a.seq_len:
        p.error(f"--target-len must be in [1, --seq-len): {a.target_len}")
    args = (a.preset, a.batch_size, a.seq_len, a.device, a.reps, a.target_len)
    if a.measure:
        print(json.dumps(measure(a.measure, *args)))
        return
    flags = ("preset", "batch_size", "seq_len", "reps", "device", "target_len")
    rows = measure_apart(__file__, KINDS, a, flags)
    add_ratios(rows, "base_forward")
    heading = (
        f"preset={a.preset} batch={a.batch_size} seq={a.seq_len} target={a.target_len} "
        f"device={a.device}"
    )
    keys = ("seconds", "peak_mb", "time_ratio", "mem_ratio")
    print_rows(rows, heading, keys, "call", a.json)


if __name__ == "__main__":
    main()
