"""Conditional examples -> token sequences the diffusion core trains and samples on.

Layout of one sequence (the losses and samplers rely on it):

    [BOS] prompt_ids [SEP] target_ids [EOS] ... [EOS]
                           |<---- target_length ---->|

The target region has a fixed length per task, `target_length` = the longest label word's token
count + 1: the label word's tokens, then [EOS] fill (always at least one). As in LLaDA the model
also learns to predict the fill, so a sample's answer ends where it first writes [EOS].
`target_mask` is 1 exactly on the target region. A prompt too long for `max_length` loses its
middle: its head (the instruction and the text's start) and its last `PROMPT_TAIL` tokens (the
text's end and the answer cue, e.g. "\\nSentiment:") are kept. The target is never truncated.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from lora_diffusion.corpus import default_cache_dir, tokenizer_fingerprint
from lora_diffusion.tasks import Task, data_file, get_task, load_split

#: Prompt tokens kept from the end when a prompt is truncated.
PROMPT_TAIL = 16


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """The special token ids the layout needs; a clear error if the tokenizer lacks one."""
    ids = {
        "bos": tokenizer.bos_token_id,
        "sep": tokenizer.sep_token_id,
        "eos": tokenizer.eos_token_id,
        "mask": tokenizer.mask_token_id,
    }
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token; the layout needs them")
    return ids


def _target_region(target_ids: list[int], target_length: int, eos: int) -> list[int]:
    """Target tokens then [EOS] fill, `target_length` long."""
    if len(target_ids) >= target_length:
        raise ValueError(
            f"target of {len(target_ids)} tokens does not fit target_length {target_length} "
            "(which must leave room for at least one [EOS])"
        )
    return target_ids + [eos] * (target_length - len(target_ids))


def truncate_middle(ids: list[int], budget: int, tail: int = PROMPT_TAIL) -> list[int]:
    """`ids` if they fit `budget`, else their head and last `min(tail, budget // 2)` tokens."""
    if len(ids) <= budget:
        return ids
    keep_tail = min(tail, budget // 2)
    return ids[: budget - keep_tail] + (ids[-keep_tail:] if keep_tail else [])


def _layout(
    prompt_ids: list[int],
    region: list[int],
    max_length: int,
    special: dict[str, int],
) -> dict[str, list[int]]:
    """[BOS] prompt [SEP] region, the prompt truncated so the whole fits `max_length`."""
    budget = max_length - 2 - len(region)
    if budget < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for the prompt: [BOS] + prompt + [SEP] + "
            f"a target region of {len(region)} needs at least {len(region) + 3}"
        )
    prompt_ids = truncate_middle(prompt_ids, budget)
    input_ids = [special["bos"], *prompt_ids, special["sep"], *region]
    target_mask = [0] * (len(input_ids) - len(region)) + [1] * len(region)
    return {"input_ids": input_ids, "target_mask": target_mask}


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


#: Targets are tokenised as they read after the prompt ("Sentiment: positive"): a word inside
#: running text, with its leading space. A byte-level BPE then gives the whole-word token the
#: base saw in pretraining ("Ġpositive"), not the fragments of a text-initial word ("p", "os",
#: "itive"), whose embeddings mean nothing. Part of the cache key of tokenised splits.
TARGET_PREFIX = " "


def _target_ids(tokenizer: Any, targets: list[str]) -> list[list[int]]:
    return _token_ids(tokenizer, [TARGET_PREFIX + t for t in targets])


def target_length_for(task: str | Task, tokenizer: Any) -> int:
    """Target region length for `task`: the longest label word's token count + 1 (an [EOS])."""
    return max(len(ids) for ids in _target_ids(tokenizer, list(get_task(task).label_words))) + 1


def encode_example(
    tokenizer: Any, prompt: str, target: str, max_length: int, target_length: int
) -> dict[str, list[int]]:
    """One training sequence: `input_ids` (L,) and `target_mask` (L,), L <= max_length."""
    special = _special_ids(tokenizer)
    (prompt_ids,), (target_ids,) = _token_ids(tokenizer, [prompt]), _target_ids(tokenizer, [target])
    region = _target_region(target_ids, target_length, special["eos"])
    return _layout(prompt_ids, region, max_length, special)


def encode_prompt(
    tokenizer: Any, prompt: str, max_length: int, target_length: int
) -> dict[str, list[int]]:
    """A sampling sequence: the training layout with the target region all [MASK]."""
    special = _special_ids(tokenizer)
    region = [special["mask"]] * target_length
    return _layout(_token_ids(tokenizer, [prompt])[0], region, max_length, special)


def label_candidates(task: str | Task, tokenizer: Any, target_length: int) -> torch.Tensor:
    """(num_labels, target_length) long: each label word's target region, for scoring."""
    eos = _special_ids(tokenizer)["eos"]
    ids = _target_ids(tokenizer, list(get_task(task).label_words))
    return torch.tensor([_target_region(x, target_length, eos) for x in ids], dtype=torch.long)


def decode_target(tokenizer: Any, ids: Sequence[int] | torch.Tensor) -> str:
    """The text of a target region (T,) up to its first [EOS], whitespace stripped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples to the longest.

    Returns input_ids (B, L) long, attention_mask (B, L) long (1 real, 0 pad), target_mask
    (B, L) bool (never on padding), and labels (B,) long when the examples carry a `label`.
    """
    length = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    target_mask = torch.zeros((len(batch), length), dtype=torch.bool)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.as_tensor(x["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        target_mask[i, :n] = torch.as_tensor(x["target_mask"], dtype=torch.bool)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}
    if "label" in batch[0]:
        out["labels"] = torch.tensor([int(x["label"]) for x in batch], dtype=torch.long)
    return out


# --- tokenised, cached task splits -----------------------------------------------------------


def _source_key(task: Task, split: str, data_dir: str | Path | None, hub: bool) -> tuple:
    """What identifies the raw data: the Hub id and split, or the file's path, size and mtime."""
    if hub:
        return ("hub", task.hub_id, task.hub_config, split)
    path = data_file(task, split, data_dir)
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def task_cache_path(
    task: Task,
    split: str,
    tokenizer: Any,
    max_length: int,
    data_dir: str | Path | None,
    cache_dir: str | Path | None,
    limit: int | None,
    hub: bool = False,
) -> Path:
    """Cache folder of a tokenised split: `<cache_dir>/tasks/<hash>`, the hash covering the
    tokenizer, the task's template, label words and detokenisation, the split, `max_length`,
    `limit` and the data's identity."""
    key = (
        tokenizer_fingerprint(tokenizer),
        task.name,
        task.instruction,
        task.label_words,
        task.detokenize,
        TARGET_PREFIX,
        split,
        max_length,
        limit,
        _source_key(task, split, data_dir, hub),
    )
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "tasks" / f"{task.name}-{split}-{digest}"


def _encode_batch(tokenizer: Any, max_length: int, target_length: int):
    special = _special_ids(tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "target_mask": []}
        prompts = _token_ids(tokenizer, batch["prompt"])
        targets = _target_ids(tokenizer, batch["target"])
        for prompt_ids, target_ids in zip(prompts, targets, strict=True):
            region = _target_region(target_ids, target_length, special["eos"])
            for name, value in _layout(prompt_ids, region, max_length, special).items():
                out[name].append(value)
        return out

    return encode


def tokenize_task(
    task: str | Task,
    split: str,
    tokenizer: Any,
    max_length: int = 128,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    hub: bool = False,
) -> datasets.Dataset:
    """`split` of `task` as a Dataset with columns input_ids, target_mask, label, cached as Arrow
    (a second call with the same inputs loads the cache without reading the data)."""
    task = get_task(task)
    path = task_cache_path(task, split, tokenizer, max_length, data_dir, cache_dir, limit, hub)
    if path.exists():
        return datasets.load_from_disk(str(path))
    examples = load_split(task, split, data_dir=data_dir, hub=hub, limit=limit)
    raw = datasets.Dataset.from_dict(
        {
            "prompt": [e.prompt for e in examples],
            "target": [e.target for e in examples],
            "label": [e.label for e in examples],
        }
    )
    encoded = raw.map(
        _encode_batch(tokenizer, max_length, target_length_for(task, tokenizer)),
        batched=True,
        remove_columns=["prompt", "target"],
        new_fingerprint=path.name,  # the tokenizer closure is not reliably hashable
        desc=f"tokenising {task.name}/{split}",
    )
    # Write beside the final folder and rename, so concurrent workers never see half a cache.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    encoded.save_to_disk(str(tmp))
    try:
        tmp.rename(path)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))
