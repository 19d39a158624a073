"""Adaptor files: round trip, base fingerprint, refusal of bad files, report."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor, count_adaptor_parameters
from lora_diffusion.adaptor_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdaptorFileError,
    adaptor_report,
    base_fingerprint,
    effective_rank,
    load_adaptor,
    load_router,
    save_adaptor,
    save_router,
)
from lora_diffusion.composition import AdaptedDenoiser, Router

D = 64


def trained_like(cfg=None, seed=0):
    adaptor = TrajectoryAdaptor(
        cfg or AdaptorConfig(ranks=(8, 4), sigmas=(1.0, 0.5), boundaries=(0.5,)), D
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adaptor.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adaptor


def batch():
    x = torch.randint(6, 512, (3, 12), generator=torch.Generator().manual_seed(2))
    cond = torch.zeros(3, 12, dtype=torch.bool)
    cond[:, :5] = True
    return x, torch.tensor([0.9, 0.4, 0.1]), cond


def test_round_trip_gives_identical_outputs(tmp_path, tiny_model):
    adaptor = trained_like()
    save_adaptor(tmp_path, adaptor, tiny_model, task="sst2")
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    loaded, config = load_adaptor(tmp_path, tiny_model)
    assert config["task"] == "sst2" and config["method"] == "lora_diffusion"
    assert loaded.cfg == adaptor.cfg
    x, t, cond = batch()
    a = AdaptedDenoiser(tiny_model, adaptor).hidden_states(x, None, t, cond)
    b = AdaptedDenoiser(tiny_model, loaded).hidden_states(x, None, t, cond)
    assert torch.equal(a, b)
    assert not torch.equal(a, tiny_model.hidden_states(x))  # the adaptor does something


def test_weights_are_stored_with_a_namespaced_prefix_and_no_pickle(tmp_path, tiny_model):
    save_adaptor(tmp_path, trained_like(), tiny_model)
    names = list(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert names and all(n.startswith("lora_diffusion.") for n in names)
    assert "lora_diffusion.query" in names and any(".phases.0.0.up" in n for n in names)
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_fingerprint_tracks_weights_and_config(tiny_model):
    fp = base_fingerprint(tiny_model)
    assert fp == base_fingerprint(tiny_model) and len(fp) == 16
    with torch.no_grad():
        next(tiny_model.parameters()).view(-1)[0] += 1e-3
    assert base_fingerprint(tiny_model) != fp


def test_loading_onto_another_base_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    from lora_diffusion.models import DiffusionLM, preset_config

    save_adaptor(tmp_path, trained_like(), tiny_model)
    torch.manual_seed(1)
    cfg = preset_config("tiny", vocab_size=len(tiny_tokenizer), mask_token_id=1)
    other = DiffusionLM(cfg)
    with pytest.raises(AdaptorFileError, match="trained on base"):
        load_adaptor(tmp_path, other)
    adaptor, _ = load_adaptor(tmp_path, other, check_base=False)  # the user's explicit choice
    assert adaptor.d == D


def test_hidden_size_mismatch_is_refused(tmp_path, tiny_model):
    save_adaptor(
        tmp_path, TrajectoryAdaptor(AdaptorConfig(ranks=(4,), sigmas=(1.0,), boundaries=()), 32)
    )
    with pytest.raises(AdaptorFileError, match="hidden size 32"):
        load_adaptor(tmp_path, tiny_model)


def test_wrong_shaped_tensor_is_refused(tmp_path, tiny_model):
    save_adaptor(tmp_path, trained_like(), tiny_model)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors["lora_diffusion.phases.0.0.up"] = torch.zeros(D, 3)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(AdaptorFileError, match=r"phases\.0\.0\.up has shape \(64, 3\)"):
        load_adaptor(tmp_path, tiny_model)


def test_missing_tensor_is_refused(tmp_path, tiny_model):
    save_adaptor(tmp_path, trained_like(), tiny_model)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    del tensors["lora_diffusion.phases.1.0.down.bias"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(AdaptorFileError, match="missing"):
        load_adaptor(tmp_path, tiny_model)


def test_corrupt_weights_are_refused_with_the_path(tmp_path, tiny_model):
    save_adaptor(tmp_path, trained_like(), tiny_model)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdaptorFileError, match="corrupt") as e:
        load_adaptor(tmp_path, tiny_model)
    assert WEIGHTS_NAME in str(e.value)


def test_nan_weights_are_refused(tmp_path, tiny_model):
    adaptor = trained_like()
    with torch.no_grad():
        adaptor.phases[0][0].up[0, 0] = float("nan")
    save_adaptor(tmp_path, adaptor, tiny_model)
    with pytest.raises(AdaptorFileError, match="NaN"):
        load_adaptor(tmp_path, tiny_model)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(method="weight_lora"), "'weight_lora' adaptor, not 'lora_diffusion'"),
        (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
        (lambda c: c["adaptor"].update(ranks=[8]), "ranks need"),
        (lambda c: c["adaptor"].update(colour="red"), "unknown adaptor settings"),
    ],
)
def test_bad_config_is_refused(tmp_path, tiny_model, edit, message):
    save_adaptor(tmp_path, trained_like(), tiny_model)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    edit(config)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdaptorFileError, match=message):
        load_adaptor(tmp_path, tiny_model)


def test_missing_folder_and_broken_json_are_refused(tmp_path, tiny_model):
    with pytest.raises(AdaptorFileError, match="not found"):
        load_adaptor(tmp_path / "nothing", tiny_model)
    save_adaptor(tmp_path, trained_like(), tiny_model)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdaptorFileError, match="not valid JSON"):
        load_adaptor(tmp_path, tiny_model)


def test_router_round_trip(tmp_path, tiny_model):
    torch.manual_seed(0)
    router = Router(D, 3, condition_repr="embedding")
    save_router(tmp_path, router, ["sst2", "cola", "trec"], tiny_model)
    loaded, tasks = load_router(tmp_path, tiny_model)
    assert tasks == ["sst2", "cola", "trec"] and loaded.condition_repr == "embedding"
    enc = torch.randn(5, D)
    assert torch.equal(router(enc), loaded(enc))


def test_effective_rank_matches_definition():
    assert effective_rank(torch.zeros(8, 4)) == 0.0
    assert effective_rank(torch.outer(torch.ones(8), torch.arange(1.0, 5))) == pytest.approx(
        1.0, abs=1e-4
    )
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    s = torch.tensor([3.0, 1.0])
    p = s / s.sum()
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert effective_rank(torch.diag(s)) == pytest.approx(expected)


def test_report_counts_parameters_and_storage(tiny_model):
    cfg = AdaptorConfig(ranks=(8, 4), sigmas=(1.0, 0.5), boundaries=(0.5,))
    adaptor = trained_like(cfg)
    report = adaptor_report(adaptor, tiny_model)
    n = count_adaptor_parameters(cfg, D)
    assert report["trainable_params"] == n
    assert report["storage_mb_fp32"] == pytest.approx(4 * n / 1e6)
    assert report["storage_mb_bf16"] == pytest.approx(2 * n / 1e6)
    base_n = sum(p.numel() for p in tiny_model.parameters())
    assert report["trainable_pct"] == pytest.approx(100 * n / base_n)
    assert [m["rank"] for m in report["modules"]] == [8, 8, 4, 4]
    assert all(0 < m["effective_rank_up"] <= m["rank"] for m in report["modules"])
    fresh = adaptor_report(TrajectoryAdaptor(cfg, D))
    assert all(m["effective_rank_up"] == 0.0 for m in fresh["modules"])  # W_A starts at zero


def test_peft_like_wrap_save_and_load(tmp_path, tiny_model):
    from lora_diffusion.composition import get_adaptor_model

    model = get_adaptor_model(
        tiny_model, AdaptorConfig(ranks=(4,), sigmas=(1.0,), boundaries=()), task="sst2"
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith("adaptors.")
    ]
    with torch.no_grad():
        model.adaptors["sst2"].phases[0][0].up.normal_()
    model.save_pretrained(tmp_path / "one")
    again = AdaptedDenoiser.from_pretrained(tiny_model, tmp_path / "one")
    x, t, cond = batch()
    assert again.task_names == ["sst2"]
    assert torch.equal(model.hidden_states(x, None, t, cond), again.hidden_states(x, None, t, cond))


def test_composition_with_router_saves_and_loads_in_router_order(tmp_path, tiny_model):
    torch.manual_seed(0)
    adaptors = {"trec": trained_like(seed=1), "sst2": trained_like(seed=2)}
    model = AdaptedDenoiser(tiny_model, adaptors, Router(D, 2, hidden=16))
    model.save_pretrained(tmp_path)
    again = AdaptedDenoiser.from_pretrained(tiny_model, tmp_path)
    assert again.task_names == ["trec", "sst2"]  # not alphabetical: the router's order
    x, t, cond = batch()
    assert torch.equal(model.hidden_states(x, None, t, cond), again.hidden_states(x, None, t, cond))
    import shutil

    shutil.rmtree(tmp_path / "sst2")
    with pytest.raises(AdaptorFileError, match="router routes to \\['sst2'\\]"):
        AdaptedDenoiser.from_pretrained(tiny_model, tmp_path)


def test_files_from_before_the_condition_options_load_as_they_were_trained(tmp_path, tiny_model):
    cfg = AdaptorConfig(
        ranks=(8, 4),
        sigmas=(1.0, 0.5),
        boundaries=(0.5,),
        condition_pool="mean",
        condition_norm="none",
    )
    adaptor = trained_like(cfg)
    save_adaptor(tmp_path, adaptor, tiny_model)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("condition_pool", "condition_norm", "gate_init"):  # an older file has none
        del config["adaptor"][key]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded, _ = load_adaptor(tmp_path, tiny_model)
    assert (loaded.cfg.condition_pool, loaded.cfg.condition_norm) == ("mean", "none")
    assert loaded.cfg.gate_init == "zero"
    h, enc, t = torch.randn(2, 5, cfg.reader_dim), torch.randn(2, D), torch.tensor([0.9, 0.2])
    torch.testing.assert_close(loaded(h, t, enc), adaptor(h, t, enc))


@pytest.mark.parametrize(
    "layers, depth, ladder, written_before",
    [((0, 1, -1), 3, True, False), ((0, -1), 1, False, True)],
)
def test_deep_readers_round_trip_and_one_block_files_from_before_load_as_trained(
    tmp_path, tiny_model, layers, depth, ladder, written_before
):
    cfg = AdaptorConfig(
        ranks=(8,),
        sigmas=(1.0,),
        boundaries=(),
        reader_layers=layers,
        reader_dim=16,
        reader_heads=2,
        reader_depth=depth,
        reader_ladder=ladder,
    )
    adaptor = trained_like(cfg)
    save_adaptor(tmp_path, adaptor, tiny_model)
    if written_before:  # a one-block reader's file from before depth and ladder has neither
        config = json.loads((tmp_path / CONFIG_NAME).read_text())
        for key in ("reader_depth", "reader_ladder"):
            del config["adaptor"][key]
        (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded, _ = load_adaptor(tmp_path, tiny_model)
    assert (loaded.cfg.reader_depth, loaded.cfg.reader_ladder) == (depth, ladder)
    x, t, cond = batch()
    a = AdaptedDenoiser(tiny_model, adaptor).hidden_states(x, None, t, cond)
    assert torch.equal(a, AdaptedDenoiser(tiny_model, loaded).hidden_states(x, None, t, cond))


def test_reader_adaptor_round_trips_and_older_files_load_without_a_reader(tmp_path, tiny_model):
    cfg = AdaptorConfig(
        ranks=(8,),
        sigmas=(1.0,),
        boundaries=(),
        reader="attention",
        reader_layers=(0, -1),
        reader_dim=16,
        reader_heads=2,
    )
    adaptor = trained_like(cfg)
    save_adaptor(tmp_path / "r", adaptor, tiny_model)
    loaded, _ = load_adaptor(tmp_path / "r", tiny_model)
    x, t, cond = batch()
    a = AdaptedDenoiser(tiny_model, adaptor).hidden_states(x, None, t, cond)
    assert torch.equal(a, AdaptedDenoiser(tiny_model, loaded).hidden_states(x, None, t, cond))
    old = trained_like(AdaptorConfig(ranks=(8,), sigmas=(1.0,), boundaries=(), reader="none"))
    save_adaptor(tmp_path / "old", old, tiny_model)
    config = json.loads((tmp_path / "old" / CONFIG_NAME).read_text())
    for key in ("reader", "reader_layers", "reader_dim", "reader_heads"):  # before readers
        del config["adaptor"][key]
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps(config))
    loaded, _ = load_adaptor(tmp_path / "old", tiny_model)
    assert loaded.cfg.reader == "none" and loaded.reader is None
