"""How much of a task a frozen base exposes: linear probes on candidate condition encodings.

    python benchmarks/probe_condition.py --base runs/base-small/model --task sst2

An output-space adaptor can only use what the frozen base's representations carry. For each
candidate Enc(c) (the mean over the condition tokens of the input embeddings, of each block's
output, and of the final hidden states; and the final hidden state at the first target
position), fits a logistic-regression probe on --train-limit training examples and prints its
train and eval accuracy. Chance-level probes on the final states say the adaptor should read
another encoding (`adaptor.condition_repr=embedding`) or that the base needs more pretraining.
A second table trains the probe as the adaptor's gate is trained (no standardisation), on the
raw pooled encoding and on its layer norm (`adaptor.condition_norm`). A third trains the
adaptor itself on the decision alone: its earliest-phase modules (defaults, mean pooling)
on the frozen states of fully masked targets (t = 1, cached once), through the base's output
head, on the label words' log-likelihood only, with the default nuclear-norm weight and
without: the ceiling of the adaptor's form on this base, free of the denoising mixture.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor, pool_condition
from lora_diffusion.data import (
    collate,
    label_candidates,
    target_length_for,
    tokenize_task,
)
from lora_diffusion.models import load_base


@torch.no_grad()
def features(base, tok, task, split, limit, data_dir, max_length=128) -> tuple[dict, torch.Tensor]:
    """{encoding name: (N, d)} and labels (N,) for `split`, targets masked as when sampling."""
    blocks: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda m, a, out, i=i: blocks.__setitem__(i, out))
        for i, blk in enumerate(base.transformer.blocks)
    ]
    rows = list(
        tokenize_task(task, split, tok, max_length, data_dir, limit=limit).with_format("python")
    )
    feats: dict[str, list] = {}
    labels = []
    for i in range(0, len(rows), 64):
        b = collate(rows[i : i + 64], tok.pad_token_id)
        ids = b["input_ids"].masked_fill(b["target_mask"], tok.mask_token_id)
        cond = b["attention_mask"].bool() & ~b["target_mask"]
        h = base.hidden_states(ids, b["attention_mask"])  # (B, L, d)
        first = b["target_mask"].float().argmax(1)  # first target position (B,)
        named = {"embedding (pooled)": pool_condition(base.input_embeddings(ids), cond)}
        named.update({f"block {j} (pooled)": pool_condition(x, cond) for j, x in blocks.items()})
        named["final hidden (pooled)"] = pool_condition(h, cond)
        named["final hidden at target"] = h[torch.arange(len(ids)), first]
        named["target states"] = h[b["target_mask"]].view(len(ids), -1, h.shape[-1])
        for k, v in named.items():
            feats.setdefault(k, []).append(v)
        labels.append(b["labels"])
    for hook in hooks:
        hook.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def probe(xtr, ytr, xte, yte, steps: int = 500) -> tuple[float, float]:
    """Standardised logistic regression (Adam, light L2): (train accuracy, eval accuracy)."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    n = int(max(ytr.max(), yte.max())) + 1
    w = torch.zeros(a.shape[1], n, requires_grad=True)
    bias = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(a @ w + bias, ytr) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: float(((x @ w + bias).argmax(-1) == y).float().mean())
        return acc(a, ytr), acc(b, yte)


def probe_like_adaptor(xtr, ytr, xte, yte, norm: bool, steps: int = 1500) -> float:
    """Logistic regression trained as the adaptor's gate is (AdamW, lr 2e-3, batch 32, no
    standardisation), on the raw encoding or its parameter-free layer norm: eval accuracy."""
    if norm:
        xtr, xte = F.layer_norm(xtr, xtr.shape[-1:]), F.layer_norm(xte, xte.shape[-1:])
    g = torch.Generator().manual_seed(0)
    n = int(max(ytr.max(), yte.max())) + 1
    w = torch.zeros(xtr.shape[1], n, requires_grad=True)
    bias = torch.zeros(n, requires_grad=True)
    opt = torch.optim.AdamW([w, bias], lr=2e-3)
    for _ in range(steps):
        i = torch.randint(len(xtr), (32,), generator=g)
        loss = F.cross_entropy(xtr[i] @ w + bias, ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((xte @ w + bias).argmax(-1) == yte).float().mean())


def adaptor_on_decision(base, cands, tr, te, condition, lambda_rank, steps=1000, seed=0):
    """The adaptor's phase-0 modules trained on the label words alone, targets fully masked
    (t = 1), from cached frozen states: eval accuracy (the candidate of higher log-likelihood)
    and, for two labels, the ROC AUC of their log-likelihood difference (how well the adaptor
    separates the classes whatever its bias; 0.5: not at all). tr/te: (target states (N, T, d),
    Enc(c) inputs (N, d), labels (N,)). AdamW 2e-3, batch 32, loss per target token, as in
    training; `lambda_rank` weighs the nuclear norms as the training loss does."""
    torch.manual_seed(seed)
    cfg = AdaptorConfig(condition_pool="mean", condition_repr=condition, lambda_rank=lambda_rank)
    adaptor = TrajectoryAdaptor(cfg, tr[0].shape[-1])
    opt = torch.optim.AdamW(adaptor.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t_len = cands.shape[1]

    def loglik(h, enc):  # (N, K): log-likelihood of each candidate's tokens
        logp = base.output_head(h + adaptor(h, torch.ones(len(h)), enc)).log_softmax(-1)
        return torch.stack([logp[:, range(t_len), c].sum(-1) for c in cands], -1)

    for _ in range(steps):
        i = torch.randint(len(tr[2]), (32,), generator=g)
        nll = -loglik(tr[0][i], tr[1][i]).gather(1, tr[2][i, None]).mean() / t_len
        loss = nll + lambda_rank * adaptor.regularisers()["rank"] if lambda_rank else nll
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ll = loglik(te[0], te[1])
    acc = float((ll.argmax(-1) == te[2]).float().mean())
    if len(cands) != 2:
        return acc, float("nan")
    from sklearn.metrics import roc_auc_score

    return acc, float(roc_auc_score(te[2].numpy(), (ll[:, 1] - ll[:, 0]).numpy()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    base, tok = load_base(a.base)
    base.requires_grad_(False)
    ftr, ytr = features(base, tok, a.task, "train", a.train_limit, a.data_dir)
    fte, yte = features(base, tok, a.task, "eval", a.eval_limit, a.data_dir)
    majority = float((yte == yte.mode().values).float().mean())
    print(f"task {a.task}: {len(ytr)} train / {len(yte)} eval examples; majority {majority:.3f}")
    print(f"{'encoding':28s} {'train acc':>9s} {'eval acc':>9s}")
    out = {}
    targets = ftr.pop("target states"), fte.pop("target states")
    for name in ftr:
        out[name] = probe(ftr[name], ytr, fte[name], yte)
        print(f"{name:28s} {out[name][0]:9.3f} {out[name][1]:9.3f}")
    print("\ntrained like the adaptor's gate (AdamW 2e-3, batch 32, 1,500 steps): eval accuracy")
    print(f"{'encoding':28s} {'raw':>9s} {'layer norm':>10s}")
    for name in ("embedding (pooled)", "final hidden (pooled)"):
        raw, normed = (probe_like_adaptor(ftr[name], ytr, fte[name], yte, n) for n in (0, 1))
        out[f"{name} like adaptor"] = (raw, normed)
        print(f"{name:28s} {raw:9.3f} {normed:10.3f}")
    cands = label_candidates(a.task, tok, target_length_for(a.task, tok))
    print("\nthe adaptor on the decision alone (t = 1, 1,000 steps): eval accuracy / ROC AUC")
    print(f"{'Enc(c) from':28s} {'lambda_rank 0.01':>17s} {'lambda_rank 0':>17s}")
    encodings = {"embedding": "embedding (pooled)", "hidden": "final hidden (pooled)"}
    for condition, name in encodings.items():
        tr, te = (targets[0], ftr[name], ytr), (targets[1], fte[name], yte)
        row = [adaptor_on_decision(base, cands, tr, te, condition, lam) for lam in (0.01, 0.0)]
        out[f"adaptor on the decision, {condition}"] = row
        cells = " ".join(f"{acc:10.3f} / {auc:.3f}" for acc, auc in row)
        print(f"{name:28s} {cells}")
    return out


if __name__ == "__main__":
    main()
