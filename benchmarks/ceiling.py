"""How far can a reader of the frozen base go? Probes and adaptors on cached frozen states.

    python benchmarks/ceiling.py --base ../shared/bases/small-h200 --task sst2

An adaptor on a frozen base can only use what it reads from the base's states. This study
caches every layer's states of the frozen base once (the task's prompts with the target
region fully masked, as at the first sampling step), then trains, on the first
--train-limit train rows, and scores on the last --holdout train rows (never trained on) and
on the eval split:

1. linear probes (standardised logistic regression) on each layer's states, mean-pooled over
   the condition, and on all layers pooled together;
2. a small MLP probe (one hidden layer of 256) on all layers pooled together;
3. attention probes: `reader.StateReader` (one attention layer of width --dim over a learned
   mix of the given layers) mean-pooled over the condition, then a linear classifier;
4. the adaptor itself on the decision (target fully masked, t = 1), through the base's output
   head, on the label words' log-likelihood, for each --adaptor setting: what the method's
   form can reach on this base when the denoising mixture is left aside.

Each row trains with AdamW, batch 64, --steps steps, seed --seed; the table prints held-out
train accuracy (for choosing) and eval accuracy (for reporting), and the trainable
parameter count. Settings: `--adaptor NAME:key=value,key=value` (AdaptorConfig fields, and
`lr=`, `seed=` for the row; the adaptor runs as one phase at t = 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
from lora_diffusion.composition import AdaptedDenoiser
from lora_diffusion.config import apply_overrides
from lora_diffusion.data import (
    collate,
    label_candidates,
    target_length_for,
    tokenize_task,
)
from lora_diffusion.models import load_base
from lora_diffusion.reader import StateReader

DEFAULT_ADAPTORS = (
    "final state (no reader):reader=none",
    "embedding state (no reader):reader=none,input_repr=embedding",
    "one block 0,3,-1 k64:reader_depth=1,reader_ladder=0,reader_dim=64",
    "one block all k64:reader_depth=1,reader_ladder=0,reader_dim=64,reader_layers=0;1;2;3;4;5;6;7",
    "two blocks 0,3,-1 k64:reader_depth=2,reader_ladder=0,reader_dim=64",
    "ladder 0,3,-1 k48 (the default):reader=attention",
)


class Cached:
    """One task split's frozen states, in batches: ids (B, L) with the target masked, the
    attention and condition masks, labels, and every layer's states (bf16 to save memory)."""

    def __init__(self, base, tok, rows: list[dict], batch: int = 64) -> None:
        self.batches = []
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                b = collate(rows[i : i + batch], tok.pad_token_id)
                ids = b["input_ids"].masked_fill(b["target_mask"], tok.mask_token_id)
                states = base.layer_states(ids, b["attention_mask"])
                cond = b["attention_mask"].bool() & ~b["target_mask"]
                self.batches.append(
                    dict(
                        ids=ids,
                        x0=b["input_ids"],
                        attn=b["attention_mask"],
                        cond=cond,
                        target=b["target_mask"],
                        labels=b["labels"],
                        states=tuple(s.bfloat16() for s in states),
                    )
                )
        self.labels = torch.cat([b["labels"] for b in self.batches])

    def pooled(self, layer: int) -> torch.Tensor:
        """(N, d): layer states mean-pooled over the condition."""
        out = []
        for b in self.batches:
            m = b["cond"].float()[..., None]
            out.append((b["states"][layer].float() * m).sum(1) / m.sum(1))
        return torch.cat(out)


class StateBase(torch.nn.Module):
    """The frozen base seen through the denoiser seam, answering from cached states: the
    adaptor runs exactly as in training (AdaptedDenoiser), without recomputing the base."""

    time_conditioned = False

    def __init__(self, base) -> None:
        super().__init__()
        self.base, self.config, self.mask_token_id = base, base.config, base.mask_token_id
        self.states: tuple[torch.Tensor, ...] = ()

    def layer_states(self, input_ids, attention_mask=None, t=None):
        return tuple(s.float() for s in self.states)

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        return self.states[-1].float()

    def output_head(self, h):
        return self.base.output_head(h)

    def input_embeddings(self, input_ids):
        return self.base.input_embeddings(input_ids)


def batches(data: Cached, steps: int, seed: int):
    """`steps` random training batches (the cached batches, reshuffled by row)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield data.batches[int(torch.randint(len(data.batches), (1,), generator=g))]


def linear_probe(xtr, ytr, tests, steps=500) -> list[float]:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    n = int(ytr.max()) + 1
    w = torch.zeros(xtr.shape[1], n, requires_grad=True)
    bias = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy((xtr - mu) / sd @ w + bias, ytr) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [
            float((((x - mu) / sd @ w + bias).argmax(-1) == y).float().mean()) for x, y in tests
        ]


def mlp_probe(xtr, ytr, tests, steps=2000, seed=0) -> list[float]:
    torch.manual_seed(seed)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    net = torch.nn.Sequential(
        torch.nn.Linear(xtr.shape[1], 256),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(256, int(ytr.max()) + 1),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(xtr), (64,), generator=g)
        loss = F.cross_entropy(net((xtr[i] - mu) / sd), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return [float((net((x - mu) / sd).argmax(-1) == y).float().mean()) for x, y in tests]


@torch.no_grad()
def accuracies(score, tests: list[Cached]) -> list[float]:
    """Share of rows whose highest score (score(batch): (B, K)) is the label, per test set."""
    return [
        float(torch.cat([score(b).argmax(-1) == b["labels"] for b in t.batches]).float().mean())
        for t in tests
    ]


def attention_probe(train: Cached, tests, layers, dim, steps, seed, lr=1e-3):
    torch.manual_seed(seed)
    d = train.batches[0]["states"][0].shape[-1]
    reader = StateReader(d, layers, dim, heads=4)
    head = torch.nn.Linear(dim, int(train.labels.max()) + 1)
    params = [*reader.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def logits(b):
        z = reader([s.float() for s in b["states"]], b["attn"])
        m = b["cond"].float()[..., None]
        return head((z * m).sum(1) / m.sum(1))

    for b in batches(train, steps, seed):
        loss = F.cross_entropy(logits(b), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return accuracies(logits, tests), sum(p.numel() for p in params)


def adaptor_on_decision(base, cands, train: Cached, tests, cfg, steps, seed, lr):
    """The adaptor (one phase) trained on the label words at t = 1 through AdaptedDenoiser over
    cached states: accuracy of the candidate of higher log-likelihood on each test set."""
    torch.manual_seed(seed)
    adaptor = TrajectoryAdaptor(cfg, base.config.hidden_size)
    seam = StateBase(base)
    model = AdaptedDenoiser(seam, {"task": adaptor})
    opt = torch.optim.AdamW(adaptor.parameters(), lr=lr, weight_decay=0.0)

    def loglik(b):  # (B, K): log-likelihood of each candidate's target region
        seam.states = b["states"]
        t = torch.ones(len(b["ids"]))
        h = model.hidden_states(b["ids"], b["attn"], t, condition_mask=b["cond"])
        n_t = cands.shape[1]
        logp = model.output_head(h[b["target"]].view(len(h), n_t, -1)).log_softmax(-1)
        return torch.stack([logp[:, range(n_t), c].sum(-1) for c in cands], -1)

    for b in batches(train, steps, seed):
        nll = -loglik(b).gather(1, b["labels"][:, None]).mean() / cands.shape[1]
        reg = adaptor.regularisers()
        loss = nll + cfg.lambda_rank * reg["rank"] + cfg.lambda_orth * reg["orth"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return accuracies(loglik, tests), sum(p.numel() for p in adaptor.parameters())


def parse_adaptor(spec: str, lr: float, seed: int) -> tuple[str, AdaptorConfig, float, int]:
    """`NAME:key=value,...` -> (name, AdaptorConfig of one phase, learning rate, seed); `lr=`
    and `seed=` set the row's own, the other keys are AdaptorConfig fields parsed as `--set
    adaptor.KEY=VALUE` parses them, with list values separated by `;`."""
    name, _, body = spec.partition(":")
    overrides = []
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key == "lr":
            lr = float(value)
        elif key == "seed":
            seed = int(value)
        else:
            overrides.append(f"{key}={value.replace(';', ',')}")
    one_phase = AdaptorConfig(ranks=(64,), sigmas=(1.0,), boundaries=())
    return name, apply_overrides(one_phase, overrides), lr, seed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--task", default="sst2", help="task (default: sst2)")
    p.add_argument("--train-limit", type=int, default=16000, help="train rows (default: 16000)")
    p.add_argument("--holdout", type=int, default=2000, help="last train rows scored (2000)")
    p.add_argument("--eval-limit", type=int, default=None, help="eval rows (default: all)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per row (1500)")
    p.add_argument("--lr", type=float, default=2e-3, help="adaptors' learning rate (2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--dim", type=int, default=64, help="attention probes' width (64)")
    p.add_argument("--adaptor", action="append", help="NAME:key=value,... (repeatable)")
    p.add_argument(
        "--attention-layers",
        action="append",
        help="layers of one attention probe, e.g. 0,3,-1 or all (repeatable; default: -1, 0, "
        "0,3,-1 and all)",
    )
    p.add_argument("--skip-pooled", action="store_true", help="no linear or MLP probes")
    p.add_argument("--skip-probes", action="store_true", help="adaptor rows only")
    p.add_argument("--data-dir", default=None, help="task data folder")
    p.add_argument("--output", default=None, help="write the table as JSON here")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    base, tok = load_base(a.base)
    base.requires_grad_(False)
    start = time.perf_counter()
    full = tokenize_task(a.task, "train", tok, 128, a.data_dir).with_format("python")
    n = len(full) - a.holdout
    train = Cached(base, tok, list(full.select(range(min(a.train_limit, n)))))
    val = Cached(base, tok, list(full.select(range(n, len(full)))))
    dev_rows = tokenize_task(a.task, "eval", tok, 128, a.data_dir, limit=a.eval_limit)
    dev = Cached(base, tok, list(dev_rows.with_format("python")))
    sizes = f"{len(train.labels)} train / {len(val.labels)} held-out / {len(dev.labels)} eval"
    print(f"{a.task}: {sizes} rows; states cached in {time.perf_counter() - start:.0f} s")
    rows: dict[str, dict] = {}

    def show(name, accs, params, t0):
        rows[name] = dict(
            heldout=accs[0], eval=accs[1], params=params, seconds=round(time.perf_counter() - t0, 1)
        )
        print(
            f"{name:44s} {accs[0]:8.3f} {accs[1]:8.3f} {params:>9,d} "
            f"{rows[name]['seconds']:>6.0f}s",
            flush=True,
        )

    print(f"{'reading':44s} {'held-out':>8s} {'eval':>8s} {'params':>9s} {'time':>7s}")
    tests = [val, dev]
    n_states = len(train.batches[0]["states"])
    if not (a.skip_probes or a.skip_pooled):
        pooled = {i: (train.pooled(i), val.pooled(i), dev.pooled(i)) for i in range(n_states)}
        for i, (xtr, xv, xd) in pooled.items():
            t0 = time.perf_counter()
            name = {0: "embeddings", n_states - 1: "final"}.get(i, f"block {i}")
            accs = linear_probe(xtr, train.labels, [(xv, val.labels), (xd, dev.labels)])
            show(f"linear, pooled {name}", accs, xtr.shape[1] * 2 + 2, t0)
        cat = [torch.cat([pooled[i][j] for i in range(n_states)], -1) for j in range(3)]
        t0 = time.perf_counter()
        accs = linear_probe(cat[0], train.labels, [(cat[1], val.labels), (cat[2], dev.labels)])
        show("linear, pooled all layers", accs, cat[0].shape[1] * 2 + 2, t0)
        t0 = time.perf_counter()
        accs = mlp_probe(cat[0], train.labels, [(cat[1], val.labels), (cat[2], dev.labels)])
        show("MLP (256), pooled all layers", accs, cat[0].shape[1] * 256 + 256 * 3 + 2, t0)
    specs = [] if a.skip_probes else a.attention_layers or ["-1", "0", "0,3,-1", "all"]
    for spec in specs:
        layers = tuple(range(n_states)) if spec == "all" else tuple(map(int, spec.split(",")))
        t0 = time.perf_counter()
        accs, params = attention_probe(train, tests, layers, a.dim, a.steps, a.seed)
        show(f"attention k{a.dim}, layers {spec}", accs, params, t0)
    cands = label_candidates(a.task, tok, target_length_for(a.task, tok))
    for spec in a.adaptor or DEFAULT_ADAPTORS:
        name, cfg, lr, seed = parse_adaptor(spec, a.lr, a.seed)
        t0 = time.perf_counter()
        accs, params = adaptor_on_decision(base, cands, train, tests, cfg, a.steps, seed, lr)
        show(f"adaptor: {name}", accs, params, t0)
    if a.output:
        Path(a.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
