"""The trajectory adaptor: phases, conditioning, regularisers, frozen base."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lora_diffusion.adaptor import (
    AdaptorConfig,
    TrajectoryAdaptor,
    count_adaptor_parameters,
    pool_condition,
)
from lora_diffusion.composition import AdaptedDenoiser
from lora_diffusion.models.dit import timestep_embedding
from lora_diffusion.reader import StateReader

D = 64


def randomise(adaptor, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adaptor.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return adaptor


def inputs(b=4, n=10, vocab=512):
    x = torch.randint(6, vocab, (b, n), generator=torch.Generator().manual_seed(1))
    cond = torch.zeros(b, n, dtype=torch.bool)
    cond[:, :6] = True
    return x, cond


T4 = torch.tensor([0.9, 0.5, 0.1, 0.7])


def test_adapted_model_equals_base_at_initialisation(tiny_model):
    model = AdaptedDenoiser(tiny_model, TrajectoryAdaptor(AdaptorConfig(), D))
    x, cond = inputs()
    h = model.hidden_states(x, None, T4, cond)
    assert torch.equal(h, tiny_model.hidden_states(x))


@pytest.mark.parametrize(
    "t, phase", [(1.0, 0), (0.9, 0), (2 / 3, 1), (0.5, 1), (1 / 3, 2), (0.01, 2)]
)
def test_phase_boundaries_follow_the_paper(t, phase):
    # early: t > 2T/3, middle, late: t <= T/3
    assert int(AdaptorConfig.paper().phase_of(torch.tensor([t]))[0]) == phase


def test_each_example_uses_the_modules_of_its_own_phase(tiny_model):
    adaptor = TrajectoryAdaptor(AdaptorConfig.paper(), D)
    with torch.no_grad():
        for m in adaptor.phases[0]:  # only the early phase gets a non-zero up-projection
            m.up.normal_()
    model = AdaptedDenoiser(tiny_model, adaptor)
    x, cond = inputs()
    delta = model.hidden_states(x, None, T4, cond) - tiny_model.hidden_states(x)
    changed = delta.abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [True, False, False, True]  # t = 0.9 and 0.7 are early


def test_perturbation_matches_the_formula(tiny_model):
    cfg = AdaptorConfig(ranks=(4, 3), sigmas=(1.0, 0.5), boundaries=(0.5,), k=2, reader="none")
    adaptor = randomise(TrajectoryAdaptor(cfg, D))
    x, cond = inputs(b=2)
    t = torch.tensor([0.8, 0.2])
    h = tiny_model.hidden_states(x)
    enc = pool_condition(h, cond)
    temb = timestep_embedding(t, cfg.time_embed_dim)
    expected = []
    for b, p in enumerate([0, 1]):
        z = torch.cat([h[b], temb[b].expand(x.shape[1], -1)], -1)  # (L, d + d_t)
        total = 0
        for m in adaptor.phases[p]:
            e = F.layer_norm(enc[b], (D,))  # condition_norm="layer"
            a_c = m.up * (1 + m.gate(e))  # A(c) = W_A diag(1 + W_g Enc(c))
            total = total + torch.relu(m.down(z)) @ a_c.T
        expected.append(cfg.sigmas[p] * total)
    got = adaptor(h, t, enc)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


def read(adaptor, tiny_model, ids):
    """What the adaptor's modules read of the frozen states of `ids` (its reader's x_t)."""
    return adaptor.read(tiny_model.layer_states(ids), None).detach()


def test_up_projection_is_conditioned_on_the_instruction(tiny_model):
    adaptor = randomise(TrajectoryAdaptor(AdaptorConfig(), D))
    h = read(adaptor, tiny_model, inputs()[0])
    t = torch.full((4,), 0.5)
    enc_a, enc_b = torch.randn(4, D), torch.randn(4, D)
    assert not torch.allclose(adaptor(h, t, enc_a), adaptor(h, t, enc_b))
    plain = randomise(TrajectoryAdaptor(AdaptorConfig(conditional=False), D))
    h = read(plain, tiny_model, inputs()[0])
    torch.testing.assert_close(plain(h, t, enc_a), plain(h, t, enc_b))


def _adapted(tiny_model, **cfg):
    """A random mean-pooling adaptor (no reader) of `cfg` on the tiny model, the adapted model,
    inputs and the base's hidden states of them."""
    cfg = AdaptorConfig(condition_pool="mean", reader="none", **cfg)
    adaptor = randomise(TrajectoryAdaptor(cfg, D))
    x, cond = inputs()
    return adaptor, AdaptedDenoiser(tiny_model, adaptor), x, cond, tiny_model.hidden_states(x)


def test_embedding_input_reads_the_base_input_embeddings(tiny_model):
    adaptor, model, x, cond, h = _adapted(tiny_model, input_repr="embedding")
    expected = h + adaptor(tiny_model.input_embeddings(x), T4, pool_condition(h, cond))
    got = model.hidden_states(x, None, T4, cond)
    torch.testing.assert_close(got[~cond], expected[~cond])
    # condition tokens are clean and never read: the adaptor leaves them (and its cost) out
    assert torch.equal(got[cond], h[cond])


def test_embedding_condition_reads_the_pooled_input_embeddings_of_c(tiny_model):
    adaptor, model, x, cond, h = _adapted(tiny_model, condition_repr="embedding")
    enc = pool_condition(tiny_model.input_embeddings(x), cond)
    expected = h + adaptor(h, T4, enc)
    torch.testing.assert_close(model.hidden_states(x, None, T4, cond)[~cond], expected[~cond])


@pytest.mark.parametrize("repr_", ["hidden", "embedding"])
def test_attention_pooling_starts_at_the_mean_and_learns_where_to_look(tiny_model, repr_):
    cfg = AdaptorConfig(condition_repr=repr_, reader="none")
    adaptor = TrajectoryAdaptor(cfg, D)
    model = AdaptedDenoiser(tiny_model, {"sst2": adaptor})
    x, cond = inputs()
    h = tiny_model.hidden_states(x)
    states = h if repr_ == "hidden" else tiny_model.input_embeddings(x)
    enc = model.condition_encodings(x, h, cond)["adaptor:sst2"]
    torch.testing.assert_close(enc, pool_condition(states, cond))  # q = 0: the mean
    with torch.no_grad():
        adaptor.query.normal_(generator=torch.Generator().manual_seed(3))
    enc = adaptor.encode(states, cond)
    assert not torch.allclose(enc, pool_condition(states, cond))
    # a convex combination of the condition's states only: the target positions do not count
    moved = states.clone()
    moved[~cond] += 100.0
    torch.testing.assert_close(adaptor.encode(moved, cond), enc)
    # the adapted model reads this Enc(c)
    randomise(adaptor)
    enc = adaptor.encode(states, cond)
    expected = h + adaptor(h, T4, enc)
    torch.testing.assert_close(model.hidden_states(x, None, T4, cond)[~cond], expected[~cond])


def test_attention_pooling_without_a_condition_is_zero_with_finite_gradients(tiny_model):
    adaptor = randomise(TrajectoryAdaptor(AdaptorConfig(), D))
    x, cond = inputs()
    cond[1:] = False  # examples 1..3 are plain text (e.g. the forgetting corpus)
    states = tiny_model.hidden_states(x)
    enc = adaptor.encode(states, cond)
    assert torch.equal(enc[1:], torch.zeros_like(enc[1:])) and enc[0].abs().sum() > 0
    adaptor(read(adaptor, tiny_model, x), T4, enc).pow(2).sum().backward()
    assert torch.isfinite(adaptor.query.grad).all() and adaptor.query.grad.abs().sum() > 0


def test_condition_norm_makes_the_gate_blind_to_the_scale_of_enc(tiny_model):
    enc = torch.randn(4, D)
    normed = randomise(TrajectoryAdaptor(AdaptorConfig(), D))
    h = read(normed, tiny_model, inputs()[0])
    torch.testing.assert_close(
        normed(h, T4, enc), normed(h, T4, 3.0 * enc + 5.0), atol=1e-4, rtol=1e-4
    )
    raw = randomise(TrajectoryAdaptor(AdaptorConfig(condition_norm="none"), D))
    h = read(raw, tiny_model, inputs()[0])
    assert not torch.allclose(raw(h, T4, enc), raw(h, T4, 3.0 * enc + 5.0), atol=1e-3)


@pytest.mark.parametrize(
    "cfg",
    [
        AdaptorConfig(),
        AdaptorConfig.paper(),
        AdaptorConfig(condition_pool="mean"),
        AdaptorConfig(k=4, conditional=False),
        AdaptorConfig.uniform(16),
        AdaptorConfig(ranks=(8, 8, 8, 8, 8), sigmas=(1,) * 5, boundaries=(0.8, 0.6, 0.4, 0.2)),
    ],
)
def test_parameter_formula_is_exact(cfg):
    adaptor = TrajectoryAdaptor(cfg, D)
    assert sum(p.numel() for p in adaptor.parameters()) == count_adaptor_parameters(cfg, D)
    assert len(adaptor.phases) == len(cfg.ranks) and len(adaptor.phases[0]) == cfg.k


def test_regularisers_are_finite_at_zero_and_match_definitions():
    adaptor = TrajectoryAdaptor(AdaptorConfig.paper(), D)
    reg = adaptor.regularisers()
    (reg["rank"] + reg["orth"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in adaptor.parameters() if p.grad is not None)
    assert float(reg["orth"]) == 0.0

    randomise(adaptor)
    reg = adaptor.regularisers()
    nuc = sum(
        torch.linalg.matrix_norm(m.up, "nuc") + torch.linalg.matrix_norm(m.down.weight, "nuc")
        for phase in adaptor.phases
        for m in phase
    )
    torch.testing.assert_close(reg["rank"], nuc)
    a, b = (m.up for m in adaptor.phases[0])
    expected_phase0 = 2 * (a.T @ b).pow(2).sum()
    assert float(reg["orth"]) > float(expected_phase0) > 0  # other phases add to it
    one = randomise(TrajectoryAdaptor(AdaptorConfig(k=1), D))
    assert float(one.regularisers()["orth"]) == 0.0  # no pairs


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="sigmas"):
        AdaptorConfig(ranks=(8, 8), sigmas=(1.0,), boundaries=(0.5,))
    with pytest.raises(ValueError, match="descend"):
        AdaptorConfig(ranks=(8, 8, 8), sigmas=(1, 1, 1), boundaries=(1 / 3, 2 / 3))
    with pytest.raises(ValueError, match="input_repr"):
        AdaptorConfig(input_repr="logits")
    with pytest.raises(ValueError, match="condition_pool"):
        AdaptorConfig(condition_pool="max")
    with pytest.raises(ValueError, match="condition_norm"):
        AdaptorConfig(condition_norm="batch")
    with pytest.raises(ValueError, match="gate_init"):
        AdaptorConfig(gate_init="ones")


def test_random_gate_breaks_the_zero_saddle_of_the_conditional_path(tiny_model):
    """W_A diag(1 + W_g Enc(c)): with W_A and W_g both zero, the c-dependent part of the
    up-projection (W_A diag(W_g Enc(c))) gets no gradient in any of its factors; a random W_g
    (the default) gives W_A a gradient that depends on c from the first step, while W_A = 0
    still keeps the adapted model equal to the base."""
    ids = inputs()[0]
    h = tiny_model.hidden_states(ids)
    t = torch.full((4,), 0.9)
    enc_a, enc_b = torch.randn(4, D), torch.randn(4, D)

    def up_grad(cfg, enc):
        torch.manual_seed(0)
        adaptor = TrajectoryAdaptor(cfg, D)
        x = read(adaptor, tiny_model, ids)
        assert adaptor(x, t, enc).abs().max() == 0  # adapted == base at init either way
        loss = (adaptor(x, t, enc) * h).sum()  # any loss: what matters is the path
        (grad,) = torch.autograd.grad(loss, adaptor.up)
        return grad, adaptor.phases[0][0].gate.weight

    g_a, gate = up_grad(AdaptorConfig(), enc_a)
    g_b, _ = up_grad(AdaptorConfig(), enc_b)
    assert gate.abs().min() > 0 and not torch.allclose(g_a, g_b)
    z_a, zero_gate = up_grad(AdaptorConfig(gate_init="zero"), enc_a)
    z_b, _ = up_grad(AdaptorConfig(gate_init="zero"), enc_b)
    assert torch.equal(zero_gate, torch.zeros_like(zero_gate))
    torch.testing.assert_close(z_a, z_b)  # blind to c: the saddle


def test_training_never_touches_the_base(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    adaptor = TrajectoryAdaptor(AdaptorConfig(), D)
    model = AdaptedDenoiser(tiny_model, adaptor)
    opt = torch.optim.AdamW(model.adaptor_parameters(), lr=1e-2)
    x, cond = inputs()
    for _ in range(3):
        h = model.hidden_states(x, None, T4, cond)
        loss = model.output_head(h).logsumexp(-1).mean() + adaptor.regularisers()["rank"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tiny_model.parameters())
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    assert any(m.up.abs().sum() > 0 for phase in adaptor.phases for m in phase)
    assert all(not p.requires_grad for p in tiny_model.parameters())


READER = AdaptorConfig(reader="attention", reader_layers=(0, 1, -1), reader_dim=16, reader_heads=2)


def test_layer_states_run_from_the_embeddings_to_the_final_hidden_states(tiny_model):
    x, _ = inputs()
    states = tiny_model.layer_states(x)
    assert len(states) == tiny_model.config.num_hidden_layers + 2
    torch.testing.assert_close(states[0], tiny_model.input_embeddings(x))
    torch.testing.assert_close(states[-1], tiny_model.hidden_states(x))


def test_reader_adaptor_equals_the_base_at_initialisation_and_counts_its_parameters(tiny_model):
    adaptor = TrajectoryAdaptor(READER, D)
    assert sum(p.numel() for p in adaptor.parameters()) == count_adaptor_parameters(READER, D)
    model = AdaptedDenoiser(tiny_model, adaptor)
    x, cond = inputs()
    assert torch.equal(model.hidden_states(x, None, T4, cond), tiny_model.hidden_states(x))


def test_the_reader_lets_a_target_position_see_the_condition_tokens(tiny_model):
    """Both adaptors read only input embeddings, with the gate off: without a reader a target
    position's perturbation depends on that position's embedding alone; the reader's
    attention mixes positions, so one changed condition token changes every target's."""
    x, cond = inputs()
    y = x.clone()
    y[:, 2] = (x[:, 2] + 1) % 500 + 6  # one condition token differs
    plain = AdaptorConfig(conditional=False, input_repr="embedding", reader="none")
    reader = AdaptorConfig(
        conditional=False, reader="attention", reader_layers=(0,), reader_dim=16, reader_heads=2
    )
    for cfg, sees_condition in ((plain, False), (reader, True)):
        model = AdaptedDenoiser(tiny_model, randomise(TrajectoryAdaptor(cfg, D)))
        delta = [
            model.hidden_states(z, None, T4, cond) - tiny_model.hidden_states(z) for z in (x, y)
        ]
        assert delta[0][~cond].abs().max() > 0
        same = torch.allclose(delta[0][~cond], delta[1][~cond], atol=1e-5)
        assert same != sees_condition


def train_adaptor_alone(model, tiny_model, steps=3):
    """A few AdamW steps of the adaptor on any loss; the base must get no gradient."""
    opt = torch.optim.AdamW(model.adaptor_parameters(), lr=1e-2)
    x, cond = inputs()
    for _ in range(steps):
        loss = model.output_head(model.hidden_states(x, None, T4, cond)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tiny_model.parameters())
        opt.step()


def test_reader_training_never_touches_the_base_and_trains_the_reader(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    adaptor = TrajectoryAdaptor(READER, D)
    model = AdaptedDenoiser(tiny_model, adaptor)
    proj = adaptor.reader.proj.weight.detach().clone()
    train_adaptor_alone(model, tiny_model)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    assert not torch.equal(adaptor.reader.proj.weight, proj)


@pytest.mark.parametrize(
    "kw", [{"reader_depth": 2, "reader_ladder": False}, {"reader_depth": 3, "reader_ladder": True}]
)
def test_deeper_and_ladder_readers_count_their_parameters_and_train_every_block(tiny_model, kw):
    cfg = dataclasses.replace(READER, **kw)
    adaptor = TrajectoryAdaptor(cfg, D)
    assert sum(p.numel() for p in adaptor.parameters()) == count_adaptor_parameters(cfg, D)
    model = AdaptedDenoiser(tiny_model, adaptor)
    x, cond = inputs()
    assert torch.equal(model.hidden_states(x, None, T4, cond), tiny_model.hidden_states(x))
    before = {k: v.clone() for k, v in adaptor.reader.state_dict().items()}
    train_adaptor_alone(model, tiny_model)
    last = f"blocks.{kw['reader_depth'] - 2}.qkv.weight"
    changed = {k for k, v in adaptor.reader.state_dict().items() if not torch.equal(v, before[k])}
    assert last in changed and "proj.weight" in changed
    assert ("ladder.1.weight" in changed) == cfg.reader_ladder


def test_a_ladder_reader_reads_each_of_its_layers_and_no_other():
    torch.manual_seed(0)
    reader = StateReader(32, (0, 2, -1), 16, 2, summary="none", depth=3, ladder=True)
    states = [torch.randn(2, 7, 32) for _ in range(5)]
    out = reader(states, None)
    for i, read in ((0, True), (1, False), (2, True), (3, False), (4, True)):
        other = [s + (j == i) * torch.randn_like(s) for j, s in enumerate(states)]  # layer i
        assert torch.allclose(reader(other, None), out) != read, i


def test_one_block_readers_keep_their_weight_names_and_initialisation_order():
    names = ["mix", "proj", "norm_attn", "qkv", "out", "norm_mlp", "mlp.0", "mlp.2", "norm_out"]
    torch.manual_seed(0)
    keys = StateReader(32, (0, 1), 16, 2, depth=2).state_dict()
    firsts = [k.rsplit(".", 1)[0] if k != "mix" else k for k in keys if "blocks" not in k]
    assert list(dict.fromkeys(firsts)) == names  # files keep their names
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 16)  # the first to draw from the seed, as it always was
    assert torch.equal(keys["proj.weight"], proj.weight)


def test_bad_reader_settings_are_named(tiny_model):
    with pytest.raises(ValueError, match="adaptor.reader must be"):
        AdaptorConfig(reader="lstm")
    with pytest.raises(ValueError, match="reader_dim"):
        TrajectoryAdaptor(AdaptorConfig(reader="attention", reader_dim=18, reader_heads=4), D)
    with pytest.raises(ValueError, match="reader_depth must be >= 1"):
        AdaptorConfig(reader_depth=0)
    with pytest.raises(ValueError, match="3 layers need reader_depth >= 3, got 2"):
        AdaptorConfig(reader_depth=2, reader_ladder=True)
    adaptor = TrajectoryAdaptor(AdaptorConfig(reader="attention", reader_layers=(0, 9)), D)
    x, cond = inputs()
    with pytest.raises(ValueError, match=r"reader_layers \[9\] out of range"):
        AdaptedDenoiser(tiny_model, adaptor).hidden_states(x, None, T4, cond)


def test_the_adaptor_and_its_regularisers_run_without_reading_the_data():
    """On the `meta` device (shapes, no values) anything that needs the data's values to go on,
    as a gather of each phase's rows does, fails; on a GPU it is a host sync every step."""
    adaptor = TrajectoryAdaptor(AdaptorConfig(), D).to("meta")
    x = torch.empty(6, 1, adaptor.cfg.reader_dim, device="meta")  # the reader's x_t
    enc = torch.empty(6, D, device="meta")
    t = torch.empty(6, device="meta")
    assert adaptor(x, t, enc).shape == (6, 1, D)
    reg = adaptor.regularisers()
    assert reg["rank"].device.type == reg["orth"].device.type == "meta"


def test_regularisers_can_skip_the_nuclear_norm_and_keep_orthogonality():
    adaptor = randomise(TrajectoryAdaptor(AdaptorConfig(), D))
    full, lazy = adaptor.regularisers(), adaptor.regularisers(rank=False)
    assert float(full["rank"]) > 0 and float(lazy["rank"]) == 0.0
    assert torch.equal(full["orth"], lazy["orth"])


def test_the_reader_adds_the_condition_mean_reading_to_every_position(tiny_model):
    from lora_diffusion.reader import StateReader

    torch.manual_seed(0)
    with_mean = StateReader(D, (0, -1), 16, 2, summary="mean")
    plain = StateReader(D, (0, -1), 16, 2, summary="none")
    plain.load_state_dict(with_mean.state_dict())
    x, cond = inputs()
    states = tiny_model.layer_states(x)
    z = plain.norm_out.forward  # the final norm, applied to the unnormalised reading below
    plain.norm_out = torch.nn.Identity()
    raw = plain(states, None, cond)  # (B, L, k) before the final norm
    mean = (raw * cond[..., None]).sum(1, keepdim=True) / cond.sum(1)[:, None, None]
    torch.testing.assert_close(with_mean(states, None, cond), z(raw + mean))
    with pytest.raises(ValueError, match="reader_summary"):
        StateReader(D, (0,), 16, 2, summary="max")
