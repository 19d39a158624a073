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
