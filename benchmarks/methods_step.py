"""Training step of every tuning method vs LoRA-Diffusion's, side by side in one run.

    python benchmarks/methods_step.py [--preset tiny] [--batch-size 16] [--seq-len 128]

Prints, for the same base, batch and sequence length: time per training step (denoising loss
forward/backward + AdamW step) and peak extra memory of each method in `methods.METHODS`, and
their ratios to lora_diffusion. Each method runs in a fresh subprocess, measured as in
`adaptor_step.py` (CPU: growth of max RSS from before the first step; GPU: max allocated).
"""

from __future__ import annotations

import json
import resource
import time

import torch
from side_by_side import add_ratios, measure_apart, print_rows, step_parser


def measure(method: str, preset: str, batch: int, seq: int, device: str, reps: int) -> dict:
    from lora_diffusion.corruption import get_process
    from lora_diffusion.finetune import FinetuneConfig
    from lora_diffusion.losses import denoising_loss
    from lora_diffusion.methods import METHODS
    from lora_diffusion.models import DiffusionLM, preset_config
    from lora_diffusion.schedules import get_schedule

    torch.manual_seed(0)
    base = DiffusionLM(preset_config(preset)).to(device)
    cfg = FinetuneConfig(base="-", output_dir="-", method=method, max_length=seq)
    model = METHODS.get(method).build(cfg, base).model.to(device)
    v = base.config.vocab_size
    ids = torch.randint(6, v, (batch, seq), device=device)
    target = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    target[:, seq // 2 :] = True  # condition in the first half, target in the second
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": target}
    proc, sched = get_process("absorbing", v, base.config.mask_token_id), get_schedule("loglinear")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        model.train()
        out = denoising_loss(model, b, proc, sched, "elbo", g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up: allocator, optimizer state
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    trainable = sum(p.numel() for p in params)
    return {"method": method, "seconds": seconds, "peak_mb": peak_mb, "trainable": trainable}


def main() -> None:
    from lora_diffusion.methods import METHODS

    doc = __doc__.splitlines()[0]
    p = step_parser(doc, METHODS.names(), preset="tiny", batch_size=16, seq_len=128, reps=5)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list")
    a = p.parse_args()
    args = (a.preset, a.batch_size, a.seq_len, a.device, a.reps)
    if a.measure:
        print(json.dumps(measure(a.measure, *args)))
        return
    methods = ["lora_diffusion"] + [m for m in a.methods.split(",") if m != "lora_diffusion"]
    flags = ("preset", "batch_size", "seq_len", "reps", "device")
    rows = measure_apart(__file__, methods, a, flags)
    add_ratios(rows, "lora_diffusion")
    heading = f"preset={a.preset} batch={a.batch_size} seq={a.seq_len} device={a.device}"
    keys = ("trainable", "seconds", "peak_mb", "time_ratio", "mem_ratio")
    print_rows(rows, heading, keys, "step", a.json)


if __name__ == "__main__":
    main()
