"""Evaluation of any denoiser (a base, an adapted model, a baseline) behind the seam.

- `generative_accuracy`: sample the target region with the ancestral sampler, decode it up to
  its first [EOS] and exact-match it against the label words. An output that is no label word
  is invalid, and wrong.
- `scoring_accuracy`: fill the target region with each label word in turn and predict the one
  with the lowest denoising loss, estimated on a fixed grid of t with one seeded corruption per
  (example, t) shared by all candidates, so candidates are compared on identical noise.
- `forgetting`: how much the adaptor raises the base's held-out corpus loss.
- `convergence_step`: when a training-loss curve settles.

Examples are `tasks.Example`s or rows of `data.tokenize_task` (input_ids, target_mask, label);
both use the `[BOS] prompt [SEP] target [EOS]...` layout of `data.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .corpus import block_batch
from .corruption import ForwardProcess, get_process
from .data import collate, decode_target, encode_example, label_candidates, target_length_for
from .losses import denoising_loss, heldout_loss
from .sampling import device_of, sample
from .schedules import NoiseSchedule, get_schedule
from .tasks import Example, Task, get_task

#: Label of outputs that are no label word, in confusion tables.
INVALID = "<invalid>"
#: Prompt tokens shown before each example output.
PROMPT_TAIL_TOKENS = 12
#: Example outputs kept in a generative report.
NUM_EXAMPLES = 5


# --- shared helpers ----------------------------------------------------------------------------


def _resolve(
    process: str | ForwardProcess,
    schedule: str | NoiseSchedule,
    vocab_size: int,
    mask_token_id: int,
) -> tuple[ForwardProcess, NoiseSchedule]:
    """Registry names or ready objects -> (process, schedule) objects."""
    if isinstance(process, str):
        process = get_process(process, vocab_size, mask_token_id)
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    return process, schedule


def _encoded_rows(
    data: Sequence[Example] | Any, tokenizer: Any, max_length: int, target_length: int
) -> list[dict[str, Any]]:
    """Each example as {input_ids (L,), target_mask (L,), label} with the gold target filled in.

    Accepts `Example`s (encoded here) or already-encoded rows (a tokenised Dataset).
    """
    rows = []
    for i, item in enumerate(data):
        if isinstance(item, Example):
            row = encode_example(tokenizer, item.prompt, item.target, max_length, target_length)
            row = {**row, "label": item.label}
        elif isinstance(item, Mapping):
            row = {k: item[k] for k in ("input_ids", "target_mask", "label")}
        else:
            raise TypeError(f"example {i}: expected an Example or an encoded row, got {type(item)}")
        if sum(row["target_mask"]) != target_length:
            raise ValueError(
                f"example {i}: target region of {sum(row['target_mask'])} tokens, but the task's "
                f"is {target_length} (was it tokenised with another tokenizer?)"
            )
        rows.append(row)
    if not rows:
        raise ValueError("no examples to evaluate")
    return rows


def _batches(
    rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches: input_ids, attention_mask (B, L), target_mask (B, L) bool, labels (B,)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def _confusion(golds: list[str], preds: list[str]) -> dict[str, dict[str, int]]:
    """{gold word: {predicted word or INVALID: count}}."""
    table: dict[str, Counter] = {}
    for gold, pred in zip(golds, preds, strict=True):
        table.setdefault(gold, Counter())[pred] += 1
    return {gold: dict(counts) for gold, counts in table.items()}


# --- generative accuracy -----------------------------------------------------------------------


def generative_accuracy(
    denoiser: Any,
    tokenizer: Any,
    task: str | Task,
    dataset_or_examples: Sequence[Example] | Any,
    *,
    process: str | ForwardProcess = "absorbing",
    schedule: str | NoiseSchedule = "loglinear",
    steps: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    max_length: int = 128,
    progress: bool = False,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Sample each example's target region from its prompt and exact-match the label words.
    `temperature` as in `sample` (1: Algorithm 1's ancestral sampling; 0: greedy decoding).

    The prompt is laid out as for training with the target region all [MASK] (the layout of
    `encode_prompt`); `sample` runs `steps` ancestral steps, default None = the task's target
    length T (one token unmasked per step on average: the region is only a few tokens). One
    generator seeded with `seed` drives all batches, so results are deterministic for a
    (seed, batch_size). Returns accuracy, valid_rate (share of outputs that are a label word),
    n, label_counts, confusion ({gold: {pred or "<invalid>": count}}), steps, network_calls,
    calls_saved (summed over batches; plus base_calls / base_calls_saved for an adapted model)
    and the first few examples (prompt tail, gold, prediction).
    """
    task = get_task(task)
    target_length = target_length_for(task, tokenizer)
    steps = target_length if steps is None else steps
    proc, sched = _resolve(process, schedule, len(tokenizer), tokenizer.mask_token_id)
    rows = _encoded_rows(dataset_or_examples, tokenizer, max_length, target_length)
    before = {k: getattr(denoiser, k, None) for k in ("base_calls", "base_calls_saved")}
    g = torch.Generator().manual_seed(seed)
    golds, preds, tails = [], [], []
    calls = {"network_calls": 0, "calls_saved": 0}
    batches = _batches(rows, batch_size, tokenizer.pad_token_id, device_of(denoiser))
    total = -(-len(rows) // batch_size)
    for batch in tqdm(batches, total=total, disable=not progress, desc=f"generate {task.name}"):
        target = batch["target_mask"]
        prompt_ids = batch["input_ids"].masked_fill(target, tokenizer.mask_token_id)
        out = sample(
            denoiser,
            proc,
            sched,
            prompt_ids,
            batch["attention_mask"],
            target,
            steps,
            g,
            temperature=temperature,
        )
        calls["network_calls"] += out.network_calls
        calls["calls_saved"] += out.calls_saved
        for ids, tmask, attn, label in zip(
            out.tokens, target, batch["attention_mask"].bool(), batch["labels"], strict=True
        ):
            preds.append(decode_target(tokenizer, ids[tmask]))
            golds.append(task.label_words[int(label)])
            tail = ids[attn & ~tmask][-PROMPT_TAIL_TOKENS:]
            tails.append(tokenizer.decode(tail, skip_special_tokens=True).strip())
    for key, value in before.items():
        if value is not None:
            calls[key] = getattr(denoiser, key) - value
    return {**_generative_report(task, golds, preds, tails), "steps": steps, **calls}


def _generative_report(
    task: Task, golds: list[str], preds: list[str], tails: list[str]
) -> dict[str, Any]:
    """Accuracy, valid rate, counts, confusion and example outputs of decoded predictions."""
    words = set(task.label_words)
    shown = [p if p in words else INVALID for p in preds]
    n = len(golds)
    return {
        "accuracy": sum(p == gold for p, gold in zip(preds, golds, strict=True)) / n,
        "valid_rate": sum(p in words for p in preds) / n,
        "n": n,
        "label_counts": dict(Counter(golds)),
        "confusion": _confusion(golds, shown),
        "examples": [
            {"prompt": tail, "gold": gold, "prediction": pred}
            for tail, gold, pred in list(zip(tails, golds, preds, strict=True))[:NUM_EXAMPLES]
        ],
    }


# --- candidate scoring -------------------------------------------------------------------------


@torch.no_grad()
def scoring_accuracy(
    denoiser: Any,
    tokenizer: Any,
    task: str | Task,
    dataset: Sequence[Example] | Any,
    *,
    process: str | ForwardProcess = "absorbing",
    schedule: str | NoiseSchedule = "loglinear",
    num_t: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    max_length: int = 128,
) -> dict[str, Any]:
    """Predict the label word whose filled-in target region has the lowest denoising loss.

    The loss of each candidate is the midpoint-rule estimate over t_i = (i + 0.5) / num_t of
    the per-example target loss (ELBO-weighted for absorbing, plain mean NLL for uniform; see
    `candidate_losses`). Returns accuracy, n, gold_loss (mean loss of the gold candidate) and
    confusion ({gold: {pred: count}}); for a two-label task also `auc`, the ROC AUC of the
    loss difference (how well the scores separate the classes, whatever threshold the argmin
    puts between them: 0.5 is none). Deterministic for a (seed, batch_size).
    """
    if num_t < 1:
        raise ValueError(f"num_t must be >= 1, got {num_t}")
    task = get_task(task)
    target_length = target_length_for(task, tokenizer)
    proc, sched = _resolve(process, schedule, len(tokenizer), tokenizer.mask_token_id)
    rows = _encoded_rows(dataset, tokenizer, max_length, target_length)
    device = device_of(denoiser)
    cands = label_candidates(task, tokenizer, target_length).to(device)  # (K, T)
    ts = [(i + 0.5) / num_t for i in range(num_t)]
    g = torch.Generator().manual_seed(seed)
    golds, preds, gold_losses, all_losses, all_labels = [], [], [], [], []
    for batch in _batches(rows, batch_size, tokenizer.pad_token_id, device):
        losses = candidate_losses(denoiser, batch, cands, proc, sched, ts, g)  # (B, K)
        labels = batch["labels"]
        gold_losses.append(losses.gather(1, labels[:, None])[:, 0])
        all_losses.append(losses.cpu())
        all_labels.append(labels.cpu())
        golds += [task.label_words[int(i)] for i in labels]
        preds += [task.label_words[int(i)] for i in losses.argmin(-1)]
    out = {
        "accuracy": sum(p == gold for p, gold in zip(preds, golds, strict=True)) / len(golds),
        "n": len(golds),
        "gold_loss": float(torch.cat(gold_losses).mean()),
        "confusion": _confusion(golds, preds),
    }
    if len(task.label_words) == 2:
        losses, labels = torch.cat(all_losses), torch.cat(all_labels)
        out["auc"] = roc_auc(losses[:, 0] - losses[:, 1], labels == 1)
    return out


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """ROC AUC of `scores` (higher: more likely positive) against the bool `positive`
    (scikit-learn's); None when one class is absent."""
    from sklearn.metrics import roc_auc_score

    if bool(positive.all()) or not bool(positive.any()):
        return None
    return float(roc_auc_score(positive.numpy(), scores.double().numpy()))


def candidate_losses(
    denoiser: Any,
    batch: dict[str, torch.Tensor],
    candidates: torch.Tensor,
    process: ForwardProcess,
    schedule: NoiseSchedule,
    ts: Sequence[float],
    generator: torch.Generator | Sequence[torch.Generator],
) -> torch.Tensor:
    """Denoising loss of every (example, candidate) pair, averaged over the times `ts`.

    batch: input_ids, attention_mask (B, L), target_mask (B, L) bool with T target positions per
    row; candidates: (K, T) target regions. At each t one corruption of the batch is drawn and
    shared by the K candidates of an example (same positions, same noise tokens), and all
    B * K sequences go through the denoiser in one call. Returns (B, K).
    """
    ids, attn, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"].bool()
    (b, _), (k, _) = ids.shape, candidates.shape
    rep = lambda x: x.repeat_interleave(k, 0)  # (B, L) -> (B K, L); row b K + j: candidate j
    x0, attn_k, target_k = rep(ids), rep(attn), rep(target)
    x0[target_k] = candidates.repeat(b, 1).flatten()
    total = torch.zeros(b * k, device=ids.device)
    for t in ts:
        tt = torch.full((b,), t, device=ids.device)
        if isinstance(generator, Sequence):  # one per example: independent of the batch
            xt, changed = ids.clone(), torch.zeros_like(target)
            for i, g in enumerate(generator):
                n = int(attn[i].sum())  # right-padded: the row's own length, not the batch's
                row = process.corrupt(
                    ids[i : i + 1, :n], schedule.alpha(tt[i : i + 1]), target[i : i + 1, :n], g
                )
                xt[i, :n], changed[i, :n] = row[0][0], row[1][0]
        else:
            xt, changed = process.corrupt(ids, schedule.alpha(tt), target, generator)  # (B, L)
        changed = rep(changed)
        xt = torch.where(changed, rep(xt), x0)
        total += _sequence_losses(denoiser, x0, xt, changed, attn_k, target_k, t, process, schedule)
    return (total / len(ts)).view(b, k)


def _sequence_losses(
    denoiser: Any,
    x0: torch.Tensor,
    xt: torch.Tensor,
    changed: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    t: float,
    process: ForwardProcess,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """Per-sequence target loss at one t, normalised by target length as in `denoising_loss`.

    x0, xt, changed (corrupted positions), attention_mask, target_mask: (N, L). Absorbing:
    w(t) * sum of -log p over the masked positions / T; uniform: the mean -log p over all T
    target positions. Returns (N,).
    """
    n = x0.shape[0]
    cond = attention_mask.bool() & ~target_mask
    tt = torch.full((n,), t, device=x0.device)
    h = denoiser.hidden_states(xt, attention_mask, tt, condition_mask=cond)  # (N, L, d)
    pos = changed if process.loss_on_corrupted_only else target_mask
    logits = denoiser.output_head(h[pos])  # (P, V)
    nll = F.cross_entropy(logits.float(), x0[pos], reduction="none")  # (P,)
    per_row = torch.zeros(n, device=x0.device).index_add_(0, pos.nonzero()[:, 0], nll)
    elbo = process.loss_on_corrupted_only
    weight = float(schedule.elbo_weight(torch.tensor(t))) if elbo else 1.0
    return weight * per_row / target_mask.sum(1).clamp_min(1)


# --- forgetting --------------------------------------------------------------------------------


@torch.no_grad()
def forgetting(
    base: Any,
    adapted: Any,
    blocks: torch.Tensor,
    *,
    process: str | ForwardProcess = "absorbing",
    schedule: str | NoiseSchedule = "loglinear",
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Held-out corpus loss of the base with and without the adaptor, on the same seeded noise.

    blocks: (N, block_length) packed corpus token ids. Blocks have no condition, so an adapted
    model sees Enc(c) = 0. Returns heldout_loss_base, heldout_loss_adapted and forgetting =
    adapted - base (nats per token; > 0: the adaptor made the base worse on general text).
    """
    vocab_size = getattr(getattr(base, "config", None), "vocab_size", 0)
    proc, sched = _resolve(process, schedule, vocab_size, base.mask_token_id)
    batches = [block_batch(blocks[i : i + batch_size]) for i in range(0, len(blocks), batch_size)]
    if not batches:
        raise ValueError("forgetting needs at least one corpus block")

    def on(model: Any) -> list[dict[str, torch.Tensor]]:  # each model scores on its own device
        device = device_of(model)
        return [{k: v.to(device) for k, v in b.items()} for b in batches]

    loss_base = _corpus_loss(base, on(base), proc, sched, seed)
    loss_adapted = _corpus_loss(adapted, on(adapted), proc, sched, seed)
    return {
        "heldout_loss_base": loss_base,
        "heldout_loss_adapted": loss_adapted,
        "forgetting": loss_adapted - loss_base,
    }


def _corpus_loss(
    denoiser: Any,
    batches: list[dict[str, torch.Tensor]],
    process: ForwardProcess,
    schedule: NoiseSchedule,
    seed: int,
) -> float:
    """`heldout_loss` (the ELBO) for absorbing; the seeded mean NLL for uniform, whose ELBO
    weighting `denoising_loss` does not implement."""
    if process.loss_on_corrupted_only:
        return heldout_loss(denoiser, batches, process, schedule, seed=seed)
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        out = denoising_loss(denoiser, batch, process, schedule, "simple", generator=g)
        total += float(out.loss) * out.num_loss_tokens
        count += out.num_loss_tokens
    return total / max(count, 1)


# --- convergence -------------------------------------------------------------------------------


def convergence_step(losses: Sequence[float], *, window: int = 20, tol: float = 0.05) -> int | None:
    """The step at which a training-loss curve settles, or None if it never does.

    Rule: smooth with a trailing mean of `window` steps (s_i = mean(losses[i - window + 1 :
    i + 1]) for i >= window - 1) and take the final smoothed value s_end. The answer is the
    first step i after which every s_j (j >= i) stays within `tol * |s_end|` of s_end. A curve
    that only enters that band within its last `window` steps has not shown that it stays
    there: None, as for a curve shorter than 2 * window or one with non-finite losses.
    """
    if window < 1 or tol < 0:
        raise ValueError(f"need window >= 1 and tol >= 0, got window={window}, tol={tol}")
    n = len(losses)
    if n < 2 * window:
        return None
    x = torch.tensor(list(losses), dtype=torch.float64)
    smoothed = x.unfold(0, window, 1).mean(-1)  # (n - window + 1,), index i - window + 1
    if not torch.isfinite(smoothed).all():
        return None  # a diverged run has not converged
    outside = ((smoothed - smoothed[-1]).abs() > tol * smoothed[-1].abs()).nonzero()
    first = int(outside[-1, 0]) + 1 if len(outside) else 0  # first index of the settled run
    step = first + window - 1
    return step if n - step > window else None
