import pytest
import torch

from lora_diffusion.corpus import block_batch
from lora_diffusion.corruption import get_process
from lora_diffusion.losses import denoising_loss
from lora_diffusion.sampling import sample
from lora_diffusion.schedules import get_schedule
from lora_diffusion.training import StepSampler, TrainConfig, fit


def prompt_batch(tok, b=3, n=20, gen=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, len(tok), (b, n), generator=g)
    target = torch.zeros(b, n, dtype=torch.bool)
    target[:, n - gen :] = True
    return ids, torch.ones(b, n, dtype=torch.long), target


def run(model, tok, seed, process="absorbing", steps=16, cache=True, traj=False):
    ids, attn, target = prompt_batch(tok)
    proc = get_process(process, len(tok), tok.mask_token_id)
    g = torch.Generator().manual_seed(seed)
    out = sample(model, proc, get_schedule("loglinear"), ids, attn, target, steps, g, cache, traj)
    return out, ids, target


def test_seeded_sampling_is_deterministic(tiny_model, tiny_tokenizer):
    a, _, _ = run(tiny_model, tiny_tokenizer, seed=1)
    b, _, _ = run(tiny_model, tiny_tokenizer, seed=1)
    c, _, _ = run(tiny_model, tiny_tokenizer, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_condition_kept_and_no_mask_left(tiny_model, tiny_tokenizer):
    for process in ("absorbing", "uniform"):
        out, ids, target = run(tiny_model, tiny_tokenizer, seed=0, process=process)
        assert torch.equal(out.tokens[~target], ids[~target])
        assert not (out.tokens[target] == tiny_tokenizer.mask_token_id).any()


def test_cache_saves_calls_without_changing_samples(tiny_model, tiny_tokenizer):
    cached, _, _ = run(tiny_model, tiny_tokenizer, seed=3, steps=64)
    plain, _, _ = run(tiny_model, tiny_tokenizer, seed=3, steps=64, cache=False)
    assert torch.equal(cached.tokens, plain.tokens)
    assert plain.network_calls == 64 and plain.calls_saved == 0
    # 24 target tokens over 64 steps: many steps unmask nothing.
    assert cached.calls_saved > 0
    assert cached.network_calls + cached.calls_saved == 64


def test_trajectory_has_one_state_per_step_and_unmasks_monotonically(tiny_model, tiny_tokenizer):
    out, _, target = run(tiny_model, tiny_tokenizer, seed=0, steps=10, traj=True)
    assert len(out.trajectory) == 10
    masked = [int((x[target] == tiny_tokenizer.mask_token_id).sum()) for x in out.trajectory]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert torch.equal(out.trajectory[-1], out.tokens)


def test_sampling_reproduces_a_memorised_text(tiny_model, tiny_tokenizer):
    text = "the river bank of the city"  # 11 tokens with the tiny tokenizer
    ids = torch.tensor(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    blocks = ids.repeat(64, 1)  # (64, n): one text, over and over
    proc = get_process("absorbing", len(tiny_tokenizer), tiny_tokenizer.mask_token_id)
    sched = get_schedule("loglinear")
    cfg = TrainConfig(lr=3e-3, max_steps=400, batch_size=16, warmup_steps=10, log_every=400)
    sampler = StepSampler(len(blocks), cfg.batch_size)

    def loss_fn(batch, g):
        return denoising_loss(tiny_model, batch, proc, sched, "elbo", g).loss, {}

    fit(
        tiny_model,
        loss_fn,
        lambda s, m: block_batch(blocks[sampler.indices(s)]),
        cfg,
        progress=False,
    )
    tiny_model.eval()
    # The first two tokens are given: with rotary (relative) positions alone, a fully masked
    # sequence is shift-symmetric, so some clean context is needed to place the text.
    b = block_batch(ids.repeat(2, 1))
    b["target_mask"][:, :2] = False
    g = torch.Generator().manual_seed(0)
    out = sample(
        tiny_model, proc, sched, b["input_ids"], b["attention_mask"], b["target_mask"], 20, g
    )
    assert tiny_tokenizer.decode(out.tokens[0]) == text
    assert tiny_tokenizer.decode(out.tokens[1]) == text


def test_per_row_step_counts_match_each_row_sampled_alone(tiny_model):
    from lora_diffusion.corruption import get_process
    from lora_diffusion.schedules import get_schedule

    proc, sched = get_process("absorbing", 512, tiny_model.mask_token_id), get_schedule("loglinear")
    ids = torch.randint(6, 512, (3, 10), generator=torch.Generator().manual_seed(1))
    attn, target = torch.ones_like(ids), torch.zeros(3, 10, dtype=torch.bool)
    target[0, 7:], target[1, 5:], target[2, 8:] = True, True, True  # ragged target lengths
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    out = sample(tiny_model, proc, sched, ids, attn, target, [2, 5, 3], gens([1, 2, 3]))
    assert out.network_calls == 5  # one pass: max(steps) calls, not 2 + 5 + 3
    for i, steps in enumerate([2, 5, 3]):
        row = slice(i, i + 1)
        alone = sample(
            tiny_model,
            proc,
            sched,
            ids[row],
            attn[row],
            target[row],
            steps,
            torch.Generator().manual_seed(i + 1),
        ).tokens
        assert torch.equal(out.tokens[i], alone[0])
    assert not (out.tokens[target] == tiny_model.mask_token_id).any()  # every row finished


def test_temperature_zero_decodes_greedily(tiny_model, tiny_tokenizer):
    """One step unmasks every position at once: at temperature 0 each takes the argmax of
    p(x0 | x_1) (the mask token excluded), whatever the seed; at 1 the seed matters."""
    tok = tiny_tokenizer
    ids, attn, target = prompt_batch(tok)
    proc, sched = get_process("absorbing", len(tok), tok.mask_token_id), get_schedule("loglinear")
    outs = [
        sample(
            tiny_model,
            proc,
            sched,
            ids,
            attn,
            target,
            1,
            torch.Generator().manual_seed(s),
            temperature=0.0,
        ).tokens
        for s in (0, 1)
    ]
    x = ids.masked_fill(target, tok.mask_token_id)
    with torch.no_grad():
        h = tiny_model.hidden_states(x, attn, torch.ones(3), condition_mask=~target)
        logits = tiny_model.output_head(h[target])
    logits[:, tok.mask_token_id] = float("-inf")
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][target], logits.argmax(-1))
    hot = [
        sample(tiny_model, proc, sched, ids, attn, target, 1, torch.Generator().manual_seed(s))
        for s in (0, 1)
    ]
    assert not torch.equal(hot[0].tokens, hot[1].tokens)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample(tiny_model, proc, sched, ids, attn, target, 1, temperature=-1.0)
