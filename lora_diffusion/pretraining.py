"""Pretrain a base masked-diffusion LM on a text corpus: tokenizer, packing, loop, held-out loss.

Called by `jobs/pretrain.py`; Ray-free, so it runs anywhere.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import DiffusionConfig
from .corpus import (
    block_batch,
    corpus_files,
    packed_blocks,
    read_documents,
    split_files,
    unigram_loss,
)
from .corruption import get_process
from .losses import LossModule, heldout_loss
from .models import DiffusionLM, preset_config
from .schedules import get_schedule
from .tasks import task_texts
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .training import (
    Distributed,
    StepSampler,
    TrainConfig,
    checkpoint_callback,
    checkpoint_step,
    fit,
)


@dataclass
class PretrainConfig:
    corpus_dir: str = field(metadata={"help": "folder of *.txt files; the last is held out"})
    output_dir: str = field(metadata={"help": "model/ (weights + tokenizer), metrics.json"})
    preset: str = field(default="small", metadata={"help": "model size preset"})
    vocab_size: int | None = field(default=None, metadata={"help": "default: the preset's"})
    tokenizer: str | None = field(default=None, metadata={"help": "reuse a saved tokenizer"})
    init_from: str | None = field(
        default=None, metadata={"help": "continue from this saved base (weights + tokenizer)"}
    )
    block_length: int = field(default=128, metadata={"help": "tokens per packed block"})
    time_conditioning: bool = field(default=False, metadata={"help": "adaLN on t (off: MDLM)"})
    max_documents: int | None = field(default=None, metadata={"help": "cap (tests, demos)"})
    task_text: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "tasks whose train-split texts (no instruction, no label) join the training "
            "documents: task-adaptive pretraining; the held-out shard stays corpus text"
        },
    )
    task_text_repeat: int = field(default=1, metadata={"help": "copies of the task text packed"})
    data_dir: str | None = field(default=None, metadata={"help": "task data (for task_text)"})
    heldout_blocks: int = field(default=512, metadata={"help": "held-out blocks to score"})
    checkpoint_every: int = field(default=0, metadata={"help": "steps; 0: only at the end"})
    resume_from: str | None = field(default=None, metadata={"help": "a checkpoint folder"})
    cache_dir: str | None = None
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=1e-3, max_steps=1500, batch_size=16, warmup_steps=100
        )
    )


def task_documents(cfg: PretrainConfig) -> list[str]:
    """The unlabelled task texts `cfg.task_text` adds to the training documents (one per input)."""
    if cfg.task_text_repeat < 1:
        raise ValueError(f"task_text_repeat must be at least 1, got {cfg.task_text_repeat}")
    return task_texts(cfg.task_text, cfg.data_dir) if cfg.task_text else []


def build_tokenizer(cfg: PretrainConfig, train_files: list[Path], vocab_size: int):
    if cfg.tokenizer or cfg.init_from:
        return load_tokenizer(cfg.tokenizer or cfg.init_from)
    docs = [d for f in train_files for d in read_documents(f)][: cfg.max_documents]
    return train_bpe_tokenizer(docs + task_documents(cfg), vocab_size=vocab_size)


def pretrain(
    cfg: PretrainConfig,
    report=None,
    progress: bool = True,
    dist: Distributed | None = None,
    checkpoint_hook=None,
) -> dict:
    """Train a base on `cfg.corpus_dir`; returns the results written to metrics.json.

    Data-parallel (`dist`, see `finetune`): every rank trains on its rows of each global batch;
    rank 0 alone evaluates and writes files, the others return {"rank": r, "steps": n}.
    checkpoint_hook(step, save_into) as in `finetune` (default: rank 0 saves to
    OUTPUT_DIR/checkpoints/last every `cfg.checkpoint_every` steps)."""
    dist = dist or Distributed()
    if dist.sharded_base:
        raise ValueError("pretraining trains every weight: shard nothing (DDP), not FSDP")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    train_files, heldout_files = split_files(corpus_files(cfg.corpus_dir))
    vocab = cfg.vocab_size or preset_config(cfg.preset).vocab_size
    tok = build_tokenizer(cfg, train_files, vocab)
    extra = task_documents(cfg) * cfg.task_text_repeat
    train = packed_blocks(
        train_files, tok, cfg.block_length, cfg.cache_dir, cfg.max_documents, extra
    )
    heldout = packed_blocks(heldout_files, tok, cfg.block_length, cfg.cache_dir)
    heldout = heldout[: cfg.heldout_blocks]

    if cfg.init_from:  # continued pretraining: same architecture and tokenizer, new schedule
        model = DiffusionLM.from_pretrained(cfg.init_from)
        if model.config.vocab_size != len(tok):
            raise ValueError(f"{cfg.init_from}: model vocabulary != its tokenizer's")
    else:
        model = DiffusionLM(_model_config(cfg, tok))
    process = get_process(cfg.diffusion.process, len(tok), tok.mask_token_id)
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    sampler = StepSampler(len(train), cfg.train.batch_size, cfg.train.seed)
    micro = cfg.train.batch_size // cfg.train.grad_accum

    def get_batch(step: int, m: int) -> dict:
        idx = sampler.indices(step)[m * micro : (m + 1) * micro]
        return {k: v.to(dist.device) for k, v in block_batch(train[idx]).items()}

    loss_module = dist.prepare(
        LossModule(model, process, schedule, cfg.diffusion.weighting, dist.shard)
    )

    def loss_fn(batch, gen):
        loss, nll, _ = loss_module(batch, gen)
        return loss, {"nll": nll}

    heldout_batches = [
        {k: v.to(dist.device) for k, v in block_batch(b).items()} for b in heldout.split(64)
    ]

    def evaluate() -> dict:
        model.eval()
        return {"heldout_loss": heldout_loss(model, heldout_batches, process, schedule)}

    out_dir = Path(cfg.output_dir)

    checkpoint = checkpoint_callback(model, out_dir, dist, checkpoint_hook)
    lead = dist.rank == 0
    state = fit(
        model,
        loss_fn,
        get_batch,
        cfg.train,
        evaluate if lead else None,
        report if lead else None,
        checkpoint=checkpoint,
        checkpoint_every=cfg.checkpoint_every or cfg.train.max_steps,
        resume_from=cfg.resume_from,
        progress=progress and lead,
        all_reduce=dist.all_reduce,
    )
    if not lead:
        return {"rank": dist.rank, "steps": state.step}
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    final = state.history[-1]
    result = {
        "model_dir": str(model_dir),
        "preset": cfg.preset,
        "heldout_loss": final["heldout_loss"],
        "heldout_ppl_bound": math.exp(final["heldout_loss"]),
        "unigram_loss": unigram_loss(train, heldout, len(tok)),
        "train_loss": final["loss"],
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(len(train) * cfg.block_length),
        "steps": state.step,
        "resumed_from_step": checkpoint_step(cfg.resume_from),
        "seconds": time.perf_counter() - start,
        "config": asdict(cfg),
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    (out_dir / "history.json").write_text(json.dumps(state.history))
    return result


def _model_config(cfg: PretrainConfig, tok):
    return preset_config(
        cfg.preset,
        vocab_size=len(tok),
        time_conditioning=cfg.time_conditioning,
        max_position_embeddings=max(1024, cfg.block_length),
        mask_token_id=tok.mask_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        sep_token_id=tok.sep_token_id,
        # Recorded so samplers and adaptors use the process the base was trained with.
        diffusion_process=cfg.diffusion.process,
        noise_schedule=cfg.diffusion.schedule,
    )
