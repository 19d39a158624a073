"""Pretraining corpus: text files -> tokenised documents -> packed fixed-length blocks.

Documents (articles separated by a blank line) are tokenised, each followed by [EOS], concatenated
and cut into blocks of `block_length` tokens (MDLM's wrapped packing: no padding is wasted).
Every position of a block is a diffusion target. The result is cached as Arrow, keyed by the
tokenizer, the files and the block length.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch


def read_documents(path: str | Path) -> Iterator[str]:
    """Yield the documents of one text file: runs of non-blank lines, joined by newlines."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    doc: list[str] = []
    for line in lines:
        if line.strip():
            doc.append(line.strip())
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def corpus_files(corpus_dir: str | Path) -> list[Path]:
    """The corpus's `*.txt` files, sorted; an error names the folder when there are none."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt files in corpus directory {corpus_dir}")
    return files


def split_files(files: list[Path], heldout_files: int = 1) -> tuple[list[Path], list[Path]]:
    """The last `heldout_files` files are held out (the corpus README suggests the last shard)."""
    if len(files) <= heldout_files:
        raise ValueError(f"need more than {heldout_files} corpus files to hold one out")
    return files[:-heldout_files], files[-heldout_files:]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash identifying a tokenizer's vocabulary and rules."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORA_DIFFUSION_CACHE", Path.home() / ".cache" / "lora_diffusion"))


def packed_blocks(
    files: list[Path],
    tokenizer,
    block_length: int = 128,
    cache_dir: str | Path | None = None,
    max_documents: int | None = None,
    extra_documents: Sequence[str] = (),
) -> torch.Tensor:
    """Tokenise and pack `files` into a (num_blocks, block_length) long tensor (cached).
    `extra_documents` (e.g. unlabelled task text) are packed after the files' documents."""
    stat = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    extra = hashlib.sha256("\0".join(extra_documents).encode()).hexdigest()
    key = hashlib.sha256(
        repr((tokenizer_fingerprint(tokenizer), stat, block_length, max_documents, extra)).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "corpus" / key
    if path.exists():
        return torch.from_numpy(np.asarray(datasets.load_from_disk(str(path))["ids"]))
    docs = [d for f in files for d in read_documents(f)][:max_documents] + list(extra_documents)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    ds = datasets.Dataset.from_dict({"text": docs}).map(
        tokenize,
        batched=True,
        remove_columns=["text"],
        new_fingerprint=key,  # hashing the tokenizer closure fails noisily (and is not needed)
        desc="tokenising corpus",
    )
    flat = np.fromiter((i for x in ds["ids"] for i in x), dtype=np.int64)
    n = len(flat) // block_length
    if n == 0:
        raise ValueError(f"corpus has {len(flat)} tokens, fewer than one block of {block_length}")
    blocks = flat[: n * block_length].reshape(n, block_length)
    datasets.Dataset.from_dict({"ids": blocks}).save_to_disk(str(path))
    return torch.from_numpy(blocks)


def block_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of packed blocks in the seam's format: every position attended and a target."""
    ones = torch.ones_like(blocks)
    return {"input_ids": blocks, "attention_mask": ones, "target_mask": ones.bool()}


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under the train unigram distribution with
    add-one smoothing: the loss of a denoiser that ignores context, the bar to clear."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout.flatten()].mean())
