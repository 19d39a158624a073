"""Evaluation: generative and scoring accuracy against denoisers whose answers are known,
determinism, forgetting of an adaptor, and the convergence rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
from lora_diffusion.composition import AdaptedDenoiser
from lora_diffusion.corruption import get_process
from lora_diffusion.data import (
    collate,
    encode_example,
    label_candidates,
    target_length_for,
    tokenize_task,
)
from lora_diffusion.evaluation import (
    INVALID,
    candidate_losses,
    convergence_step,
    forgetting,
    generative_accuracy,
    roc_auc,
    scoring_accuracy,
)
from lora_diffusion.schedules import get_schedule
from lora_diffusion.tasks import load_split

MAX_LENGTH = 128
#: Logit of the answer token: every other token is e^-30 as likely.
CONFIDENT = 30.0


class AnswerDenoiser(nn.Module):
    """A seam stub whose logits put all mass on `answer(condition tokens)` at the target positions
    (the non-condition attended ones). Hidden states are the logits themselves (d = V)."""

    time_conditioned = False

    def __init__(self, answer: Callable[[tuple[int, ...]], list[int]], vocab: int, mask: int):
        super().__init__()
        self.answer, self.vocab, self.mask_token_id = answer, vocab, mask

    def hidden_states(self, input_ids, attention_mask, t, condition_mask=None):
        h = torch.zeros(*input_ids.shape, self.vocab)  # (B, L, V)
        region = attention_mask.bool() & ~condition_mask
        for b in range(input_ids.shape[0]):
            answer = self.answer(tuple(input_ids[b][condition_mask[b]].tolist()))
            h[b, region[b].nonzero()[:, 0], torch.tensor(answer)] = CONFIDENT
        return h

    def output_head(self, h):
        return h


@pytest.fixture(scope="module")
def examples(data_dir):
    return load_split("sst2", "eval", data_dir=data_dir, limit=16)


@pytest.fixture()
def candidates(tiny_tokenizer):
    return label_candidates("sst2", tiny_tokenizer, target_length_for("sst2", tiny_tokenizer))


def stub(tok, answer):
    return AnswerDenoiser(answer, len(tok), tok.mask_token_id)


def oracle(tok, examples):
    """Answers each prompt with its gold target region, looked up by the condition tokens."""
    table = {}
    for e in examples:
        row = encode_example(tok, e.prompt, e.target, MAX_LENGTH, target_length_for("sst2", tok))
        ids, target = torch.tensor(row["input_ids"]), torch.tensor(row["target_mask"]).bool()
        table[tuple(ids[~target].tolist())] = ids[target].tolist()
    return stub(tok, table.__getitem__)


def positive_share(examples):
    return sum(e.label == 1 for e in examples) / len(examples)


def test_oracle_is_perfect_in_both_modes(tiny_tokenizer, examples):
    model = oracle(tiny_tokenizer, examples)
    gen = generative_accuracy(model, tiny_tokenizer, "sst2", examples, batch_size=5)
    assert gen["accuracy"] == 1.0 and gen["valid_rate"] == 1.0 and gen["n"] == 16
    assert gen["confusion"] == {w: {w: n} for w, n in gen["label_counts"].items()}
    assert gen["steps"] == target_length_for("sst2", tiny_tokenizer)  # default: T
    assert gen["network_calls"] + gen["calls_saved"] == 4 * gen["steps"]  # 4 batches
    assert len(gen["examples"]) == 5
    assert gen["examples"][0]["prediction"] == gen["examples"][0]["gold"] == examples[0].target
    assert gen["examples"][0]["prompt"].lower().endswith("sentiment:")  # a lower-casing BPE
    score = scoring_accuracy(model, tiny_tokenizer, "sst2", examples, batch_size=5)
    assert score["accuracy"] == 1.0 and score["n"] == 16
    assert score["gold_loss"] < 1e-6
    assert score["auc"] == 1.0  # the oracle's scores separate the classes completely


def test_invalid_outputs_are_wrong(tiny_tokenizer, examples):
    word = tiny_tokenizer("the", add_special_tokens=False)["input_ids"]
    t = target_length_for("sst2", tiny_tokenizer)
    model = stub(tiny_tokenizer, lambda _: (word * t)[:t])
    gen = generative_accuracy(model, tiny_tokenizer, "sst2", examples)
    assert gen["valid_rate"] == 0.0 and gen["accuracy"] == 0.0
    assert all(set(row) == {INVALID} for row in gen["confusion"].values())


def test_always_positive_scores_the_positive_share(tiny_tokenizer, examples, candidates):
    model = stub(tiny_tokenizer, lambda _: candidates[1].tolist())
    gen = generative_accuracy(model, tiny_tokenizer, "sst2", examples, batch_size=7)
    assert 0 < positive_share(examples) < 1
    assert gen["accuracy"] == pytest.approx(positive_share(examples))
    assert gen["valid_rate"] == 1.0
    score = scoring_accuracy(model, tiny_tokenizer, "sst2", examples, batch_size=7)
    assert score["accuracy"] == pytest.approx(positive_share(examples))
    assert all(set(row) == {"positive"} for row in score["confusion"].values())


def test_roc_auc_matches_sklearn_with_ties_and_needs_both_classes():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    positive = torch.rand(200, generator=g) < scores / 8
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    assert roc_auc(-scores, positive) == pytest.approx(1 - roc_auc(scores, positive))
    assert roc_auc(scores, torch.ones(200, dtype=torch.bool)) is None


def test_generation_is_seeded_and_takes_examples_or_tokenised_rows(
    tiny_model, tiny_tokenizer, examples, data_dir, tmp_path
):
    run = lambda data, seed: generative_accuracy(
        tiny_model, tiny_tokenizer, "sst2", data, seed=seed, batch_size=8
    )
    a, b = run(examples, 0), run(examples, 0)
    assert a == b
    rows = tokenize_task(
        "sst2", "eval", tiny_tokenizer, MAX_LENGTH, data_dir, tmp_path, limit=len(examples)
    )
    assert run(rows, 0) == a
    other = run(examples, 1)
    assert other["examples"] != a["examples"] or other["confusion"] != a["confusion"]


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_scoring_a_random_model_gives_labels_and_finite_loss(
    tiny_model, tiny_tokenizer, examples, process
):
    run = lambda: scoring_accuracy(
        tiny_model, tiny_tokenizer, "sst2", examples, process=process, num_t=2, batch_size=8
    )
    out = run()
    assert out["n"] == 16 and math.isfinite(out["gold_loss"]) and out["gold_loss"] > 0
    preds = [p for row in out["confusion"].values() for p in row]
    assert set(preds) <= {"negative", "positive"}
    assert sum(n for row in out["confusion"].values() for n in row.values()) == 16
    assert run() == out


def test_adapted_denoiser_reports_base_calls(tiny_model, tiny_tokenizer, examples):
    adaptor = TrajectoryAdaptor(AdaptorConfig.paper(ranks=(4, 2, 2)), 64)
    adapted = AdaptedDenoiser(tiny_model, adaptor)
    out = generative_accuracy(adapted, tiny_tokenizer, "sst2", examples[:4], steps=3)
    assert out["base_calls"] + out["base_calls_saved"] == out["network_calls"] == 3


def test_bad_inputs_are_clear_errors(tiny_tokenizer, examples):
    model = stub(tiny_tokenizer, lambda _: [0])
    with pytest.raises(ValueError, match="no examples"):
        generative_accuracy(model, tiny_tokenizer, "sst2", [])
    row = {"input_ids": [2, 9, 4, 9, 3], "target_mask": [0, 0, 0, 1, 1], "label": 0}
    with pytest.raises(ValueError, match="target region of 2 tokens"):
        scoring_accuracy(model, tiny_tokenizer, "sst2", [row])
    with pytest.raises(ValueError, match="num_t"):
        scoring_accuracy(model, tiny_tokenizer, "sst2", examples, num_t=0)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_forgetting_is_zero_for_a_zero_adaptor_and_not_after_training(tiny_model, process):
    blocks = torch.randint(6, 512, (5, 32), generator=torch.Generator().manual_seed(0))
    adaptor = TrajectoryAdaptor(AdaptorConfig.paper(ranks=(4, 2, 2)), 64)
    adapted = AdaptedDenoiser(tiny_model, adaptor)
    run = lambda: forgetting(tiny_model, adapted, blocks, process=process, batch_size=2)
    zero = run()
    assert zero["forgetting"] == 0.0
    assert zero["heldout_loss_adapted"] == zero["heldout_loss_base"] > 0
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adaptor.parameters():
            p.normal_(std=0.2)
    moved = run()
    assert moved["heldout_loss_base"] == zero["heldout_loss_base"]
    assert moved["forgetting"] != 0.0 and math.isfinite(moved["forgetting"])


def decaying(n=1000, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    jitter = noise * torch.randn(n, generator=g, dtype=torch.float64)
    return [1.0 + math.exp(-k / 100) + float(e) for k, e in enumerate(jitter)]


def test_convergence_step_of_an_exponential_decay():
    # exp(-k/100) falls below 5% of the plateau (1.0) near k = 300; the 20-step trailing mean
    # lags by ~10 steps.
    step = convergence_step(decaying(), window=20, tol=0.05)
    assert step is not None and 280 <= step <= 340
    assert convergence_step([2.0] * 100, window=20) == 19  # flat from the first full window


@pytest.mark.parametrize(
    "curve",
    [
        [10.0 - 0.009 * k for k in range(1000)],  # still falling steadily at the end
        [1.0 + 0.5 * math.sin(k / 30) for k in range(1000)],  # oscillates for ever
        [1.0] * 30,  # too short to tell
        [1.0] * 99 + [float("nan")],  # diverged
    ],
    ids=["linear", "oscillating", "short", "nan"],
)
def test_convergence_step_is_none_for_curves_that_never_settle(curve):
    assert convergence_step(curve, window=20, tol=0.05) is None


def test_candidates_share_their_noise(tiny_model, tiny_tokenizer, examples, candidates):
    """Identical candidates get identical losses: every candidate of an example sees the same
    corruption at each t, so the comparison is paired."""
    rows = [
        encode_example(tiny_tokenizer, e.prompt, e.target, MAX_LENGTH, len(candidates[0]))
        for e in examples
    ]
    batch = collate([{**r, "label": 0} for r in rows[:4]], tiny_tokenizer.pad_token_id)
    same = candidates[[1, 0, 1]]
    for process in ("absorbing", "uniform"):
        proc = get_process(process, len(tiny_tokenizer), tiny_tokenizer.mask_token_id)
        g = torch.Generator().manual_seed(0)
        losses = candidate_losses(
            tiny_model, batch, same, proc, get_schedule("loglinear"), [0.5, 0.9], g
        )
        assert losses.shape == (4, 3)
        assert torch.equal(losses[:, 0], losses[:, 2]) and not torch.equal(
            losses[:, 0], losses[:, 1]
        )
