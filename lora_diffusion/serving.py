"""Serving many task adaptors from one frozen base: the batch engine behind `serve_apps/`.

One `ServingEngine` holds an `AdaptedDenoiser` (the base, every task adaptor, optionally the
router) and answers a *batch* of requests with one base forward per diffusion step, whatever
mix of tasks and weightings the batch holds: each row carries its own task-weight vector (NaN:
the router's choice), its own seed (one generator per row, so a request's answer does not
depend on what it was batched with) and its own target length. Requests with different step
counts are sampled in one pass per step count. No Ray, no HTTP, no MLflow here.

    engine = ServingEngine(AdaptedDenoiser(base, {"sst2": a, "trec": b}), tokenizer)
    engine.generate([GenerateRequest(engine.task_prompt("sst2", "a fine film"), 3, None, 3)])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .composition import AdaptedDenoiser
from .corruption import get_process
from .data import collate, decode_target, encode_prompt, label_candidates, target_length_for
from .evaluation import candidate_losses
from .sampling import sample
from .schedules import get_schedule
from .tasks import get_task


@dataclass
class GenerateRequest:
    """prompt: the text before the target region (a task's instruction already applied, or a
    raw prompt); target_length: tokens to generate; weights: one per `engine.tasks`, or None
    for the router (or the lone adaptor); steps: diffusion steps; num_samples: samples drawn
    with seeds seed, seed + 1, ..."""

    prompt: str
    target_length: int
    weights: Sequence[float] | None
    steps: int
    seed: int = 0
    num_samples: int = 1


@dataclass
class ClassifyRequest:
    """Candidate scoring of `task`'s label words for `text` under `weights` (as above)."""

    task: str
    text: str
    weights: Sequence[float] | None
    seed: int = 0


class _RowWeights:
    """The denoiser seen by the sampler or the scorer: it keeps, per example, the mean of the
    task weights the model applied over its calls (the router's change with x_t), so that a
    response can say which weights were used. Rows may drop out of later calls (per-row step
    counts); `repeat` rows in a row are one example (the candidates of candidate scoring)."""

    time_conditioned = True

    def __init__(self, model: AdaptedDenoiser, n: int, repeat: int = 1) -> None:
        self.model, self.repeat = model, repeat
        self.mask_token_id = model.mask_token_id
        self.total = torch.zeros(n, len(model.task_names))
        self.calls = torch.zeros(n)
        self._rows: torch.Tensor | None = None  # which examples the next call holds

    def hidden_states(self, x, *args, **kwargs):
        weights = self.model.fixed_weights
        rows = torch.arange(x.shape[0] // self.repeat) if self._rows is None else self._rows
        if weights is not None and weights.dim() == 2 and weights.shape[0] != x.shape[0]:
            with self.model.task_weights(weights[rows.repeat_interleave(self.repeat)]):
                h = self.model.hidden_states(x, *args, **kwargs)
        else:
            h = self.model.hidden_states(x, *args, **kwargs)
        self.total[rows] += self.model.last_weights[:: self.repeat].float().cpu()
        self.calls[rows] += 1
        return h

    def select_rows(self, idx: torch.Tensor) -> None:
        self._rows = idx.cpu()

    def output_head(self, h):
        return self.model.output_head(h)

    def mean(self) -> torch.Tensor:
        return self.total / self.calls.clamp_min(1)[:, None]


class ServingEngine:
    """Batched generation and candidate scoring over a composed model.

    Args:
        model: the base with its task adaptors (and router), `AdaptedDenoiser`.
        tokenizer: the base's tokenizer.
        max_length: tokens per sequence (prompts longer than fits are truncated in the middle,
            as in training; the HTTP layer refuses them before they get here).
        num_t: noise levels averaged by candidate scoring.
        versions: free-form metadata about what was loaded (returned by `describe`).
    """

    def __init__(
        self,
        model: AdaptedDenoiser,
        tokenizer,
        *,
        max_length: int = 128,
        num_t: int = 8,
        versions: Mapping | None = None,
    ) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.max_length = max_length
        self.num_t = num_t
        self.versions = dict(versions or {})
        config = model.base.config
        process = getattr(config, "diffusion_process", None) or "absorbing"
        self.process = get_process(process, len(tokenizer), tokenizer.mask_token_id)
        self.schedule = get_schedule(getattr(config, "noise_schedule", None) or "loglinear")
        self.device = next(model.base.parameters()).device

    def fork(self) -> ServingEngine:
        """An engine on the same weights with its own per-call state (the composed model keeps
        the weights and cache of its current call on itself): two threads may run one each."""
        twin = copy.copy(self)
        twin.model = copy.copy(self.model)
        return twin

    def _collate(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(encoded, self.tok.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    @property
    def tasks(self) -> list[str]:
        return self.model.task_names

    @property
    def has_router(self) -> bool:
        return self.model.router is not None

    def task_prompt(self, task: str, text: str) -> str:
        return get_task(task).prompt(text)

    def target_length(self, task: str) -> int:
        return target_length_for(task, self.tok)

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def cost(self, request: GenerateRequest | ClassifyRequest) -> int:
        """The work of one request in token-passes: sequences x network calls x tokens per
        sequence (generation: num_samples x steps x (prompt + target); candidate scoring:
        label words x num_t x (prompt + target)). A pass costs about the same per token at
        these lengths (attention is a small share), so time is close to linear in it."""
        if isinstance(request, GenerateRequest):
            prompt, length = request.prompt, request.target_length
            rows, calls = request.num_samples, request.steps
        else:
            spec = get_task(request.task)
            prompt, length = spec.prompt(request.text), self.target_length(request.task)
            rows, calls = len(spec.label_words), self.num_t
        tokens = len(encode_prompt(self.tok, prompt, self.max_length, length)["input_ids"])
        return rows * calls * tokens

    def weight_vector(self, weights: Mapping[str, float] | None) -> list[float] | None:
        """{task: w} -> a vector over `tasks` (missing tasks 0), normalised to sum 1; None stays
        None (the router's choice). Raises ValueError naming what is wrong."""
        if weights is None:
            return None
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown adaptor(s) {unknown}; loaded: {self.tasks}")
        values = [float(weights.get(task, 0.0)) for task in self.tasks]
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("task weights must be finite and >= 0")
        total = sum(values)
        if not 0 < total < math.inf:  # 1e308 + 1e308 overflows: no weighting to normalise
            raise ValueError("task weights must sum to a positive, finite number")
        return [v / total for v in values]

    def _matrix(self, weights: Sequence[Sequence[float] | None]) -> torch.Tensor:
        """(B, n_tasks); a None row is NaN (router) or 1 for a lone adaptor without router."""
        n = len(self.tasks)
        rows = []
        for w in weights:
            if w is None and not self.has_router:
                if n != 1:
                    raise ValueError("several adaptors and no router: give task weights")
                w = [1.0]
            rows.append([math.nan] * n if w is None else list(w))
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def _named(self, w: torch.Tensor) -> dict[str, float]:
        return {task: round(float(v), 6) for task, v in zip(self.tasks, w, strict=True)}

    # --- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[GenerateRequest]) -> list[dict]:
        """One result per request: texts (num_samples of them), the task weights used (mean
        over steps when the router chose them). All rows go through one sampling pass of
        max(steps) network calls, whatever their step counts."""
        rows = [(r, i) for r in requests for i in range(r.num_samples)]
        encoded = [
            encode_prompt(self.tok, r.prompt, self.max_length, r.target_length) for r, _ in rows
        ]
        batch = self._collate(encoded)
        gens = [torch.Generator().manual_seed(r.seed + i) for r, i in rows]
        recorder = _RowWeights(self.model, len(rows))
        with self.model.task_weights(self._matrix([r.weights for r, _ in rows])):
            out = sample(
                recorder,
                self.process,
                self.schedule,
                batch["input_ids"],
                batch["attention_mask"],
                batch["target_mask"],
                [r.steps for r, _ in rows],
                gens,
            )
        mean = recorder.mean()
        texts: dict[int, list[str]] = {id(r): [] for r in requests}
        used: dict[int, list[torch.Tensor]] = {id(r): [] for r in requests}
        for k, ((r, _), ids, m) in enumerate(
            zip(rows, out.tokens, batch["target_mask"], strict=True)
        ):
            texts[id(r)].append(decode_target(self.tok, ids[m]))
            used[id(r)].append(mean[k])
        return [
            {"texts": texts[id(r)], "weights": self._named(torch.stack(used[id(r)]).mean(0))}
            for r in requests
        ]

    # --- classification ------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, requests: Sequence[ClassifyRequest]) -> list[dict]:
        """One result per request: label (lowest denoising loss among the task's label words),
        scores (minus that loss per label), probabilities (softmax of the scores), weights."""
        results: dict[int, dict] = {}
        ts = [(i + 0.5) / self.num_t for i in range(self.num_t)]
        for task in dict.fromkeys(r.task for r in requests):
            group = [r for r in requests if r.task == task]
            spec = get_task(task)
            length = self.target_length(task)
            cands = label_candidates(spec, self.tok, length).to(self.device)  # (K, T)
            encoded = [
                encode_prompt(self.tok, spec.prompt(r.text), self.max_length, length) for r in group
            ]
            batch = self._collate(encoded)
            gens = [torch.Generator().manual_seed(r.seed) for r in group]
            k = cands.shape[0]
            weights = self._matrix([r.weights for r in group]).repeat_interleave(k, 0)
            recorder = _RowWeights(self.model, len(group), repeat=k)
            with self.model.task_weights(weights):
                losses = candidate_losses(
                    recorder, batch, cands, self.process, self.schedule, ts, gens
                )  # (B, K)
            mean = recorder.mean()
            for j, r in enumerate(group):
                scores = (-losses[j]).tolist()
                probs = (-losses[j]).softmax(-1).tolist()
                results[id(r)] = {
                    "label": spec.label_words[int(losses[j].argmin())],
                    "scores": {
                        w: round(s, 6) for w, s in zip(spec.label_words, scores, strict=True)
                    },
                    "probabilities": {
                        w: round(p, 6) for w, p in zip(spec.label_words, probs, strict=True)
                    },
                    "weights": self._named(mean[j]),
                }
        return [results[id(r)] for r in requests]

    def run(self, items: Sequence[GenerateRequest | ClassifyRequest]) -> list[dict]:
        """A mixed batch, in order; each result gains timing (compute_ms, batch_size)."""
        start = time.perf_counter()
        gen = [x for x in items if isinstance(x, GenerateRequest)]
        cls = [x for x in items if isinstance(x, ClassifyRequest)]
        out = dict(zip(map(id, gen), self.generate(gen) if gen else [], strict=True))
        out.update(zip(map(id, cls), self.classify(cls) if cls else [], strict=True))
        ms = round(1000 * (time.perf_counter() - start), 2)
        return [
            {**out[id(x)], "timing": {"compute_ms": ms, "batch_size": len(items)}} for x in items
        ]
