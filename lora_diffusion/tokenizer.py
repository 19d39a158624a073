"""BPE tokenizer for the project's own bases, trained with `tokenizers` on the corpus.

Normalisation is deliberate: the pretraining corpus is cased Wikipedia prose while the task
data (SST-2, CoLA, TREC) is lower-cased, so the tokenizer lower-cases everything (NFKC +
Lowercase). Then the label words and task inputs share their pieces with the corpus, and the
vocabulary is not spent on case variants. Task text is additionally PTB-detokenised by the task
loader (`does n't` -> `doesn't`) so it reads like the prose the base learned from. Byte-level
pre-tokenisation means no input is ever unknown.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: Special tokens, in id order: the DiT config's defaults (pad 0, mask 1, bos 2, eos 3, sep 4)
#: rely on this order.
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "sep_token": "[SEP]",
    "unk_token": "[UNK]",
}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a lower-casing byte-level BPE tokenizer on `texts`."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_tokenizer(
    path_or_id: str | Path, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved beside a model (ours or a hub model's) and check that it has the
    special tokens a masked-diffusion model needs."""
    tok = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    if tok.mask_token_id is None:
        raise ValueError(f"tokenizer at {path_or_id} has no mask token; diffusion needs one")
    if tok.pad_token_id is None:
        # Many hub tokenizers (LLaDA, GPT-2 based) lack a pad token; padding is never attended
        # to nor scored, so EOS can stand in.
        tok.pad_token = tok.eos_token
    return tok
