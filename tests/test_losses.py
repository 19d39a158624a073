import pytest
import torch

from lora_diffusion.corruption import get_process
from lora_diffusion.losses import denoising_loss
from lora_diffusion.schedules import get_schedule


def cond_batch(tok, b=4, n=24, pad=4):
    """Condition in the first half, target in the second, `pad` padding positions at the end."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, len(tok), (b, n), generator=g)
    attn = torch.ones(b, n, dtype=torch.long)
    attn[:, n - pad :] = 0
    ids[:, n - pad :] = tok.pad_token_id
    target = torch.zeros(b, n, dtype=torch.bool)
    target[:, n // 2 :] = True  # includes padding on purpose: the loss must drop it
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target}


class CountingHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, 0

    def forward(self, h):
        self.rows += h.reshape(-1, h.shape[-1]).shape[0]
        return self.head(h)


def _loss(model, tok, batch, weighting="elbo", process="absorbing", seed=0):
    proc = get_process(process, len(tok), tok.mask_token_id)
    g = torch.Generator().manual_seed(seed)
    return denoising_loss(model, batch, proc, get_schedule("loglinear"), weighting, g)


def test_padding_never_contributes(tiny_model, tiny_tokenizer):
    b = cond_batch(tiny_tokenizer)
    out = _loss(tiny_model, tiny_tokenizer, b)
    assert out.num_target_tokens == 4 * (12 - 4)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["input_ids"][:, -4:] = 42  # change only padded positions
    out2 = _loss(tiny_model, tiny_tokenizer, b2)
    torch.testing.assert_close(out.loss, out2.loss)


def test_condition_tokens_stay_clean_and_unscored(tiny_model, tiny_tokenizer):
    seen = {}

    def spy(input_ids, attention_mask=None, t=None, condition_mask=None):
        seen["xt"], seen["cond"] = input_ids.clone(), condition_mask.clone()
        return type(tiny_model).hidden_states(tiny_model, input_ids, attention_mask, t)

    tiny_model.hidden_states = spy
    b = cond_batch(tiny_tokenizer)
    _loss(tiny_model, tiny_tokenizer, b)
    assert torch.equal(seen["xt"][:, :12], b["input_ids"][:, :12])
    assert seen["cond"][:, :12].all() and not seen["cond"][:, 12:].any()


def test_output_head_runs_only_at_loss_positions(tiny_model, tiny_tokenizer):
    tiny_model.lm_head = CountingHead(tiny_model.lm_head)
    out = _loss(tiny_model, tiny_tokenizer, cond_batch(tiny_tokenizer))
    assert tiny_model.lm_head.rows == out.num_loss_tokens < out.num_target_tokens + 1
    assert out.num_loss_tokens < 4 * 24


def test_loss_is_differentiable_and_weightings_differ(tiny_model, tiny_tokenizer):
    b = cond_batch(tiny_tokenizer)
    elbo = _loss(tiny_model, tiny_tokenizer, b, "elbo")
    simple = _loss(tiny_model, tiny_tokenizer, b, "simple")
    elbo.loss.backward()
    assert tiny_model.transformer.embed_tokens.weight.grad.abs().sum() > 0
    assert not torch.isclose(elbo.loss, simple.loss)
    # simple = mean NLL over the scored positions
    torch.testing.assert_close(simple.loss.detach(), simple.nll)


def test_uniform_scores_every_target_position(tiny_model, tiny_tokenizer):
    out = _loss(tiny_model, tiny_tokenizer, cond_batch(tiny_tokenizer), "simple", "uniform")
    assert out.num_loss_tokens == out.num_target_tokens


def test_bad_weighting_is_named(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="weighting"):
        _loss(tiny_model, tiny_tokenizer, cond_batch(tiny_tokenizer), "bogus")
    with pytest.raises(ValueError, match="simple"):
        _loss(tiny_model, tiny_tokenizer, cond_batch(tiny_tokenizer), "elbo", "uniform")


@pytest.mark.parametrize("weighting", ["elbo", "simple"])
def test_sharded_loss_averages_to_the_global_batch_loss_and_gradient(
    tiny_model, tiny_tokenizer, weighting
):
    """What data-parallel training relies on: the mean over ranks of each rank's loss on its
    rows (the noise drawn for the whole batch) is the single-process loss, gradient included."""
    tok = tiny_tokenizer
    b = cond_batch(tok, b=6)
    b["attention_mask"][1, 8:] = 0  # ragged rows: ranks get different numbers of targets
    proc = get_process("absorbing", len(tok), tok.mask_token_id)
    sched = get_schedule("loglinear")
    params = [p for p in tiny_model.parameters() if p.requires_grad]

    def loss_and_grad(shard):
        tiny_model.zero_grad()
        g = torch.Generator().manual_seed(3)
        loss = denoising_loss(tiny_model, b, proc, sched, weighting, g, shard=shard).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    full, full_grad = loss_and_grad(None)
    parts = [loss_and_grad((r, 3)) for r in range(3)]
    assert sum(p[0] for p in parts) / 3 == pytest.approx(float(full), rel=1e-5)
    for i, g in enumerate(full_grad):
        torch.testing.assert_close(sum(p[1][i] for p in parts) / 3, g, rtol=1e-4, atol=1e-6)
