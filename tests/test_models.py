import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from lora_diffusion.models import (
    PRESETS,
    DiffusionLM,
    HFMaskedLMDenoiser,
    count_parameters,
    load_base,
    preset_config,
)


def test_forward_returns_hidden_states_and_logits(tiny_model):
    x = torch.randint(6, tiny_model.config.vocab_size, (3, 11))
    out = tiny_model(x, torch.ones_like(x))
    assert out.last_hidden_state.shape == (3, 11, 64)
    assert out.logits.shape == (3, 11, tiny_model.config.vocab_size)
    torch.testing.assert_close(tiny_model.output_head(out.last_hidden_state), out.logits)


def test_padding_keys_do_not_change_real_positions(tiny_model):
    x = torch.randint(6, tiny_model.config.vocab_size, (1, 8))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    attn = torch.tensor([[1] * 8 + [0] * 4])
    a = tiny_model.hidden_states(x, torch.ones_like(x))
    b = tiny_model.hidden_states(padded, attn)[:, :8]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip_through_auto_classes(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "lora_diffusion_dit"
    x = torch.randint(6, tiny_model.config.vocab_size, (2, 9))
    for auto in (AutoModel, AutoModelForMaskedLM):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, DiffusionLM)
        torch.testing.assert_close(loaded(x).logits, tiny_model(x).logits, rtol=0, atol=0)


def test_load_base_brings_model_and_tokenizer(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = load_base(tmp_path)
    assert tok.mask_token_id == model.mask_token_id == tiny_tokenizer.mask_token_id
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base(tmp_path / "model.safetensors")


def test_time_conditioning_starts_as_identity_and_requires_t(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = preset_config("tiny", time_conditioning=True)
    m = DiffusionLM(cfg).eval()
    x = torch.randint(6, cfg.vocab_size, (2, 7))
    with pytest.raises(ValueError, match="timesteps"):
        m(x)
    # adaLN modulation is zero-initialised: every t gives the same output at init.
    a = m(x, timesteps=torch.tensor([0.1, 0.1])).logits
    b = m(x, timesteps=torch.tensor([0.9, 0.9])).logits
    torch.testing.assert_close(a, b)
    assert m.time_conditioned and not DiffusionLM(preset_config("tiny")).time_conditioned


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_formula_without_allocating(name):
    cfg = preset_config(name)
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


def test_paper_presets_have_the_papers_shapes():
    expected = {
        "paper-350m": (12, 1024, 16),
        "paper-1.3b": (24, 2048, 32),
        "paper-7b": (32, 4096, 32),
    }
    for name, (layers, d, heads) in expected.items():
        c = preset_config(name)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (layers, d, heads)
    assert 6.0e9 < count_parameters(preset_config("paper-7b")) < 7.5e9


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        preset_config("tiny", hidden_size=65)


def test_hf_masked_lm_behind_the_seam():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    bert = BertForMaskedLM(cfg).eval()
    den = HFMaskedLMDenoiser(bert, mask_token_id=4)
    x = torch.randint(5, 99, (2, 10))
    attn = torch.ones_like(x)
    h = den.hidden_states(x, attn)
    assert h.shape == (2, 10, 32)
    torch.testing.assert_close(den.output_head(h), bert(input_ids=x, attention_mask=attn).logits)
    assert den.time_conditioned is False


def test_unknown_hf_architecture_asks_for_a_head():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mystery"})()

    with pytest.raises(ValueError, match="head="):
        HFMaskedLMDenoiser(Fake(), mask_token_id=0)
