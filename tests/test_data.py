"""The conditional sequence layout, collation, label candidates and the tokenised-split cache."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch

import lora_diffusion.data as data
from lora_diffusion.data import (
    PROMPT_TAIL,
    collate,
    decode_target,
    encode_example,
    encode_prompt,
    label_candidates,
    target_length_for,
    tokenize_task,
    truncate_middle,
)
from lora_diffusion.tasks import TASKS, default_data_dir, get_task, load_split
from lora_diffusion.tokenizer import train_bpe_tokenizer

DATA_DIR = default_data_dir()
PROMPT = (
    "Is the sentiment of this movie review positive or negative?\nReview: a fine film.\nSentiment:"
)


@pytest.fixture(scope="module")
def tok():
    """A 500-piece BPE on a few hundred Wikipedia lines and the SST-2 dev sentences."""
    with open(DATA_DIR / "corpus" / "enwiki_09.txt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(300), f, strict=False) if line.strip()]
    sentences = [line.split("\t")[0] for line in (DATA_DIR / "sst2" / "dev.tsv").open()]
    return train_bpe_tokenizer(lines + sentences, vocab_size=500)


def _check_layout(tok, ids: list[int], mask: list[int], target_length: int) -> None:
    """The invariants the diffusion core relies on."""
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_token_id
    assert sum(mask) == target_length
    start = len(ids) - target_length
    assert mask == [0] * start + [1] * target_length  # the target region is the suffix
    assert ids[start - 1] == tok.sep_token_id
    assert tok.sep_token_id not in ids[1 : start - 1] and tok.bos_token_id not in ids[1:]


@pytest.mark.parametrize("name", TASKS.names())
def test_target_length_fits_every_label_word_plus_one_eos(tok, name):
    length = target_length_for(name, tok)
    counts = [
        len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in get_task(name).label_words
    ]
    assert length == max(counts) + 1


@pytest.mark.parametrize("word", ["positive", "negative"])
def test_targets_are_tokenised_as_words_in_running_text(tok, word):
    """The target's tokens are the ones the word gets after the prompt ("Sentiment: positive"),
    the tokens the base saw in pretraining, not those of a text-initial word."""
    target_length = target_length_for("sst2", tok)
    region = encode_example(tok, PROMPT, word, 128, target_length)["input_ids"][-target_length:]
    in_text = tok(PROMPT + " " + word, add_special_tokens=False)["input_ids"]
    word_ids = region[: region.index(tok.eos_token_id)]
    assert in_text[-len(word_ids) :] == word_ids
    assert word_ids != tok(word, add_special_tokens=False)["input_ids"]  # the leading space counts


def test_encode_example_layout(tok):
    target_length = target_length_for("sst2", tok)
    out = encode_example(tok, PROMPT, "positive", max_length=128, target_length=target_length)
    ids, mask = out["input_ids"], out["target_mask"]
    _check_layout(tok, ids, mask, target_length)
    region = ids[-target_length:]
    word = tok(" positive", add_special_tokens=False)["input_ids"]
    assert region[: len(word)] == word
    assert region[len(word) :] == [tok.eos_token_id] * (target_length - len(word))
    assert tok.decode(ids[1 : -target_length - 1]) == PROMPT.lower()  # prompt untouched


@pytest.mark.parametrize("max_length", [12, 20, 40])
def test_truncation_keeps_length_head_tail_and_whole_target(tok, max_length):
    target_length = 6
    long_prompt = PROMPT.replace("a fine film.", "a fine film. " * 40)
    out = encode_example(tok, long_prompt, "negative", max_length, target_length)
    ids = out["input_ids"]
    assert len(ids) == max_length
    _check_layout(tok, ids, out["target_mask"], target_length)
    assert decode_target(tok, ids[-target_length:]) == "negative"
    prompt_ids = tok(long_prompt, add_special_tokens=False)["input_ids"]
    kept = ids[1 : -target_length - 1]
    tail = min(PROMPT_TAIL, len(kept) // 2)
    assert kept[: len(kept) - tail] == prompt_ids[: len(kept) - tail]
    assert kept[len(kept) - tail :] == prompt_ids[len(prompt_ids) - tail :]


def test_truncate_middle_keeps_short_inputs_and_the_tail():
    assert truncate_middle([1, 2, 3], budget=3) == [1, 2, 3]
    assert truncate_middle(list(range(100)), budget=40) == list(range(24)) + list(range(84, 100))
    assert truncate_middle(list(range(10)), budget=1) == [0]


def test_target_that_does_not_fit_or_max_length_too_small_is_an_error(tok):
    n = len(tok("technology", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"target of {n} tokens does not fit target_length {n}"):
        encode_example(tok, PROMPT, "technology", max_length=128, target_length=n)
    with pytest.raises(ValueError, match="max_length 8 leaves no room for the prompt"):
        encode_example(tok, PROMPT, "positive", max_length=8, target_length=6)


def test_encode_prompt_masks_the_target_region(tok):
    target_length = target_length_for("sst2", tok)
    train = encode_example(tok, PROMPT, "positive", 128, target_length)
    sample = encode_prompt(tok, PROMPT, 128, target_length)
    _check_layout(tok, sample["input_ids"], sample["target_mask"], target_length)
    assert sample["input_ids"][-target_length:] == [tok.mask_token_id] * target_length
    assert sample["input_ids"][:-target_length] == train["input_ids"][:-target_length]
    assert sample["target_mask"] == train["target_mask"]


def test_collate_pads_right_and_never_targets_padding(tok):
    target_length = target_length_for("trec", tok)
    batch = [
        {**encode_example(tok, p, t, 128, target_length), "label": y}
        for p, t, y in [("Who?", "human", 3), ("What is a film " * 5 + "?", "entity", 1)]
    ]
    out = collate(batch, pad_id=tok.pad_token_id)
    lengths = [len(x["input_ids"]) for x in batch]
    assert out["input_ids"].shape == (2, max(lengths)) and out["input_ids"].dtype == torch.long
    assert out["target_mask"].dtype == torch.bool and out["labels"].tolist() == [3, 1]
    assert out["attention_mask"].sum(1).tolist() == lengths
    pads = out["attention_mask"] == 0
    assert pads.any()  # the short example was padded
    assert (out["input_ids"][pads] == tok.pad_token_id).all()
    assert not (out["target_mask"] & pads).any()
    assert out["target_mask"].sum(1).tolist() == [target_length, target_length]
    assert "labels" not in collate([{k: v for k, v in batch[0].items() if k != "label"}], 0)


@pytest.mark.parametrize("name", TASKS.names())
def test_label_candidates_decode_back_to_the_label_words(tok, name):
    task = get_task(name)
    target_length = target_length_for(task, tok)
    candidates = label_candidates(task, tok, target_length)
    assert candidates.shape == (len(task.label_words), target_length)
    assert candidates.dtype == torch.long
    assert (candidates[:, -1] == tok.eos_token_id).all()  # every candidate ends in EOS fill
    assert [decode_target(tok, row) for row in candidates] == list(task.label_words)


def test_decode_target_stops_at_the_first_eos(tok):
    word = tok("sports", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    junk = tok(" junk", add_special_tokens=False)["input_ids"]
    assert decode_target(tok, [*word, eos, *junk, eos]) == "sports"
    assert decode_target(tok, [eos, *word]) == ""
    assert decode_target(tok, torch.tensor([tok.mask_token_id, *word])) == "sports"


def test_tokenize_task_builds_the_training_layout(tok, tmp_path):
    ds = tokenize_task(
        "sst2", "eval", tok, max_length=48, data_dir=DATA_DIR, cache_dir=tmp_path, limit=16
    )
    assert isinstance(ds, datasets.Dataset)
    assert set(ds.column_names) == {"input_ids", "target_mask", "label"} and len(ds) == 16
    target_length = target_length_for("sst2", tok)
    examples = load_split("sst2", "eval", DATA_DIR, limit=16)
    for row, ex in zip(ds, examples, strict=True):
        assert len(row["input_ids"]) <= 48 and row["label"] == ex.label
        _check_layout(tok, row["input_ids"], row["target_mask"], target_length)
        assert decode_target(tok, row["input_ids"][-target_length:]) == ex.target
    assert row == {
        **encode_example(tok, ex.prompt, ex.target, 48, target_length),
        "label": ex.label,
    }


def test_tokenize_task_second_call_hits_the_cache(tok, tmp_path, monkeypatch):
    args = dict(max_length=64, data_dir=DATA_DIR, cache_dir=tmp_path, limit=8)
    first = tokenize_task("trec", "eval", tok, **args)
    (entry,) = (tmp_path / "tasks").iterdir()  # one cache folder, no temporaries left behind

    def no_reading(*a, **k):
        raise AssertionError("cache miss: the data was read again")

    monkeypatch.setattr(data, "load_split", no_reading)
    again = tokenize_task("trec", "eval", tok, **args)
    assert again["input_ids"] == first["input_ids"] and again["label"] == first["label"]
    assert [p.name for p in (tmp_path / "tasks").iterdir()] == [entry.name]
    with pytest.raises(AssertionError, match="cache miss"):  # a different key is a miss
        tokenize_task("trec", "eval", tok, **{**args, "max_length": 65})


def test_cache_key_changes_with_tokenizer_template_and_limit(tok, tmp_path):
    def path(task="sst2", tokenizer=tok, limit=4):
        return data.task_cache_path(
            get_task(task), "eval", tokenizer, 64, DATA_DIR, tmp_path, limit
        )

    other_tok = train_bpe_tokenizer(["a tiny different corpus"] * 20, vocab_size=300)
    reworded = dataclasses.replace(get_task("sst2"), instruction="{text}?")
    base = path()
    assert base == path()
    assert len({base, path(tokenizer=other_tok), path(limit=5), path(task=reworded)}) == 4
