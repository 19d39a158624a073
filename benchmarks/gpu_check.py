"""The GPU check's driver: the library called directly, as a Ray GPU worker calls it (no Ray,
no MLflow), every step's results written to files as soon as it ends.

    python3 benchmarks/gpu_check.py --out DIR --base BASE_DIR --data-dir DATA_DIR
        [--device auto] [--budget-s 440] [--tiny] [--work DIR]

Steps, each timed and guarded (a failing step is recorded and the next one runs):
  smoke      torch, CUDA and the chip; a matmul and a bf16 autocast matmul on the device
  step_cost  benchmarks/step_cost.py: LoRA-Diffusion's training step against full fine-tuning's
             and weight LoRA's at the small and sedd-small presets (random bases)
  pretrain   a short `pretraining.pretrain` of a small base on DATA_DIR/corpus (BASE's
             tokenizer, bf16 autocast on CUDA): tokens/s, held-out loss
  finetune   a short `finetune.finetune` of every method in `methods.METHODS` on sst2 from
             BASE: accuracy, forgetting, seconds, peak memory
DIR gets gpu_check.json (every step's results, rewritten after each step), summary.md and
step_cost.json; the runs' own folders go to --work (default: a temporary folder), so DIR stays
within what the device tool brings back. --tiny shrinks every size to a CPU smoke test (the
test suite runs it so). Exit status: 0 when every step ran, 1 when one failed or was skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the library and step_cost, from any cwd

# Sizes: (real GPU run, --tiny CPU smoke test). The GPU sizes fit the check in ~6 minutes.
SIZES = {
    "step_cost": (
        "--presets small,sedd-small --batch-size 64 --seq-len 128 --target-len 8 --reps 20 "
        "--warmup 3".split(),
        "--presets tiny --batch-size 4 --seq-len 16 --target-len 4 --reps 1 --warmup 1".split(),
    ),
    "pretrain": (
        {"preset": "small", "steps": 300, "batch": 256, "documents": None, "heldout": 64},
        {"preset": "tiny", "steps": 2, "batch": 4, "documents": 40, "heldout": 2},
    ),
    "finetune": (
        {"steps": 100, "batch": 64, "train_limit": 6400, "eval_limit": 128, "blocks": 16},
        {"steps": 2, "batch": 4, "train_limit": 8, "eval_limit": 4, "blocks": 2},
    ),
}


def smoke(a, device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    x = torch.randn(512, 512, device=device)
    with torch.autocast(torch.device(device).type, torch.bfloat16):
        y = x @ x
    info["matmul_ok"] = bool(torch.isfinite(x @ x).all()) and y.dtype == torch.bfloat16
    if not info["matmul_ok"]:
        raise RuntimeError(f"a matmul on {device} gave non-finite values or no bf16: {info}")
    return info


def step_cost(a, device: str) -> dict:
    import step_cost as bench

    out = str(a.out / "step_cost.json")
    argv = [*SIZES["step_cost"][a.tiny], "--device", device, "--json", out]
    rows = bench.main(argv)
    return {"rows": rows, "argv": argv}


def _dist(device: str):
    from lora_diffusion.training import Distributed

    return Distributed(device=device, prepare=lambda m: m.to(device))


def _precision(device: str) -> str:
    return "bf16" if device.startswith("cuda") else "fp32"


def pretrain(a, device: str) -> dict:
    from lora_diffusion.pretraining import PretrainConfig
    from lora_diffusion.pretraining import pretrain as run

    s = SIZES["pretrain"][a.tiny]
    train = _train(s, device, lr=1e-3, logs=6)
    cfg = PretrainConfig(
        corpus_dir=str(Path(a.data_dir) / "corpus"),
        output_dir=str(a.work / "pretrain"),
        preset=s["preset"],
        tokenizer=a.base,
        max_documents=s["documents"],
        heldout_blocks=s["heldout"],
        cache_dir=str(a.work / "cache"),
        train=train,
    )
    result = run(cfg, progress=False, dist=_dist(device))
    history = json.loads((a.work / "pretrain" / "history.json").read_text())
    keep = ("heldout_loss", "train_loss", "params", "steps", "seconds")
    return {
        **{k: result[k] for k in keep},
        "tokens_per_s": history[-1]["tokens_per_s"],
        "batch": s["batch"],
        "precision": train.precision,
    }


def _train(s: dict, device: str, lr: float, logs: int):
    """A `TrainConfig` of size `s` (steps, batch) at `lr` on `device`, logging `logs` times."""
    from lora_diffusion.training import TrainConfig

    return TrainConfig(
        lr=lr,
        max_steps=s["steps"],
        batch_size=s["batch"],
        warmup_steps=0,
        log_every=max(1, s["steps"] // logs),
        precision=_precision(device),
    )


def finetune(a, device: str) -> dict:
    from lora_diffusion.finetune import FinetuneConfig
    from lora_diffusion.finetune import finetune as run
    from lora_diffusion.methods import METHODS

    s, results = SIZES["finetune"][a.tiny], {}
    for method in METHODS:
        started = time.perf_counter()
        train = _train(s, device, lr=METHODS.get(method).default_lr, logs=4)
        cfg = FinetuneConfig(
            base=a.base,
            output_dir=str(a.work / f"ft-{method}"),
            method=method,
            task="sst2",
            data_dir=a.data_dir,
            max_length=64,
            train_limit=s["train_limit"],
            eval_limit=s["eval_limit"],
            forgetting_blocks=s["blocks"],
            scoring_num_t=2,
            cache_dir=str(a.work / "cache"),
            train=train,
        )
        try:
            r = run(cfg, progress=False, dist=_dist(device))
            keep = (
                "train_loss",
                "eval_accuracy",
                "eval_accuracy_scoring",
                "forgetting",
                "train_seconds",
                "train_peak_mb",
                "trainable_params",
            )
            results[method] = {k: r.get(k) for k in keep}
        except Exception as e:  # one method failing must not hide the others
            results[method] = {"error": f"{type(e).__name__}: {e}"}
        results[method]["seconds"] = time.perf_counter() - started
    failed = [m for m, r in results.items() if "error" in r]
    if failed:
        raise RuntimeError(f"methods failed: {failed}: {json.dumps(results)}")
    return results


STEPS = {"smoke": smoke, "step_cost": step_cost, "pretrain": pretrain, "finetune": finetune}
# Seconds a step needs at the GPU sizes: it is skipped when less of the budget is left.
NEEDS = {"smoke": 5, "step_cost": 60, "pretrain": 60, "finetune": 120}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--base", required=True, help="a saved base folder (weights + tokenizer)")
    p.add_argument("--data-dir", required=True, help="task data with sst2/ and corpus/")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    p.add_argument("--budget-s", type=float, default=440.0, help="wall-clock budget")
    p.add_argument("--tiny", action="store_true", help="smallest sizes: a CPU smoke test")
    p.add_argument("--work", type=Path, default=None, help="the runs' folders (default: tmp)")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    deadline = time.monotonic() + a.budget_s
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tiny": a.tiny, "steps": {}}
    for name in a.only.split(","):
        left = deadline - time.monotonic()
        if not a.tiny and left < NEEDS[name]:
            report["steps"][name] = {"status": "skipped", "why": f"{left:.0f} s of budget left"}
        else:
            t0 = time.perf_counter()
            try:
                entry = {"status": "ok", "result": STEPS[name](a, device)}
            except Exception as e:
                entry = {
                    "status": "failed",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            report["steps"][name] = entry
        print(f"[gpu_check] {name}: {report['steps'][name]['status']}", file=sys.stderr, flush=True)
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (a.out / "summary.md").write_text(summary(report))
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


def summary(report: dict) -> str:
    """The results as Markdown: one line per step, the step-cost ratios, the fine-tunes."""
    lines = [f"# GPU check {report['started']}", ""]
    for name, s in report["steps"].items():
        note = s.get("error") or s.get("why") or ""
        lines.append(f"- {name}: {s['status']} ({s.get('seconds', 0)} s) {note}".rstrip())
    steps = report["steps"]
    if steps.get("smoke", {}).get("status") == "ok":
        lines += ["", f"Device: `{json.dumps(steps['smoke']['result'])}`"]
    if steps.get("step_cost", {}).get("status") == "ok":
        lines += ["", "| preset | method | ms/step | x full FT |", "| --- | --- | --- | --- |"]
        for r in steps["step_cost"]["result"]["rows"]:
            ratio = "" if r["x_full"] is None else f"{r['x_full']:.2f}"
            lines.append(f"| {r['preset']} | {r['method']} | {1000 * r['seconds']:.1f} | {ratio} |")
    if steps.get("pretrain", {}).get("status") == "ok":
        lines += ["", f"Pretrain: `{json.dumps(steps['pretrain']['result'])}`"]
    if steps.get("finetune", {}).get("status") == "ok":
        lines += [
            "",
            "| method | eval acc | scoring acc | forgetting | train s | peak MB |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for m, r in steps["finetune"]["result"].items():
            cells = [
                r.get(k)
                for k in (
                    "eval_accuracy",
                    "eval_accuracy_scoring",
                    "forgetting",
                    "train_seconds",
                    "train_peak_mb",
                )
            ]
            lines.append(f"| {m} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
