from lora_diffusion.tokenizer import SPECIAL_TOKENS, load_tokenizer


def test_special_tokens_have_the_ids_the_model_config_expects(tiny_tokenizer):
    ids = [tiny_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert tiny_tokenizer.mask_token_id == 1 and tiny_tokenizer.pad_token_id == 0


def test_round_trip_is_lossless_up_to_case(tiny_tokenizer):
    text = "The Eiffel Tower, in Paris (France), is 330 m tall — isn't it?"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tiny_tokenizer.decode(ids) == text.lower()


def test_no_special_tokens_are_added_implicitly(tiny_tokenizer):
    ids = tiny_tokenizer("hello world")["input_ids"]
    assert tiny_tokenizer.bos_token_id not in ids and tiny_tokenizer.eos_token_id not in ids


def test_save_and_reload_gives_the_same_ids(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "a movie that does n't quite work"
    assert again(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert again.mask_token == "[MASK]" and again.sep_token_id == 4
