"""A frozen base plus task adaptors behind the denoiser seam, composed per example.

    h' = h + sum_j w_j * delta_j(x_t, t, c),   delta_j = sum_i sigma(t) g_ij   (paper Eq. 6)

w comes from explicit per-example weights, or from the router (a 2-layer MLP over Enc(c) with a
softmax over tasks), or is 1 for a single adaptor. The base runs without autograd; when it is
time-agnostic, its output is cached across sampling steps in which x_t did not change, and only
the (cheap, t-dependent) adaptors are recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adaptor import AdaptorConfig, TrajectoryAdaptor, pool_condition
from .adaptor_io import (
    CONFIG_NAME,
    ROUTER_CONFIG,
    AdaptorFileError,
    load_adaptor,
    load_router,
    save_adaptor,
    save_router,
)
from .router import Router

ADAPTOR_KEY = "adaptor:"  # condition_encodings' key prefix of an adaptor's own Enc(c)
READER_KEY = "reader:"  # perturbation's key prefix of an adaptor's own reading of x_t


class AdaptedDenoiser(nn.Module):
    """Frozen `base` + named task adaptors (+ optional router); itself a denoiser.

    Args:
        base: any denoiser (hidden_states / output_head / input_embeddings).
        adaptors: task name -> TrajectoryAdaptor, or one adaptor (named "task").
        router: maps Enc(c) to weights over `adaptors`, in their order, or over `router_tasks`
            (a subset of them, in the router's output order; the other adaptors get weight 0).
    """

    time_conditioned = True  # the adaptors depend on t, even on a time-agnostic base

    def __init__(
        self,
        base: nn.Module,
        adaptors: Mapping[str, TrajectoryAdaptor] | TrajectoryAdaptor,
        router: Router | None = None,
        router_tasks: list[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(adaptors, TrajectoryAdaptor):
            adaptors = {"task": adaptors}
        if not adaptors:
            raise ValueError("AdaptedDenoiser needs at least one adaptor")
        names = list(adaptors)
        router_tasks = names if router_tasks is None else list(router_tasks)
        unknown = [task for task in router_tasks if task not in names]
        if unknown:
            raise ValueError(f"the router routes to {unknown}, which have no adaptor here")
        if router is not None and router.net[-1].out_features != len(router_tasks):
            raise ValueError(
                f"the router has {router.net[-1].out_features} outputs for "
                f"{len(router_tasks)} tasks {router_tasks}"
            )
        self._router_columns = [names.index(task) for task in router_tasks]
        self.base = base.eval().requires_grad_(False)
        self.adaptors = nn.ModuleDict(adaptors)
        self.router = router
        self.mask_token_id = base.mask_token_id
        self._weights: torch.Tensor | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cache_base = True  # reuse the base's output while x_t is unchanged (no grad)
        self.base_calls = 0
        self.base_calls_saved = 0
        self.router_logits: torch.Tensor | None = None  # (B, n_tasks) of the last router call
        self.last_weights: torch.Tensor | None = None  # (B, n_tasks) used by the last call

    @property
    def task_names(self) -> list[str]:
        return list(self.adaptors.keys())

    @property
    def config(self):
        return self.base.config

    def train(self, mode: bool = True) -> AdaptedDenoiser:
        super().train(mode)
        self.base.eval()  # frozen: no dropout, whatever the adaptor's mode
        return self

    @property
    def fixed_weights(self) -> torch.Tensor | None:
        """The weights set by the enclosing `task_weights` block (None: router/default)."""
        return self._weights

    @contextmanager
    def task_weights(self, weights: torch.Tensor | None) -> Iterator[None]:
        """Use fixed per-example weights (B, n_tasks) inside the block (None: router/default)."""
        if weights is not None and weights.shape[-1] != len(self.adaptors):
            raise ValueError(
                f"task weights have {weights.shape[-1]} columns for {len(self.adaptors)} "
                f"adaptors ({', '.join(self.task_names)})"
            )
        previous, self._weights = self._weights, weights
        try:
            yield
        finally:
            self._weights = previous

    def base_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, t):
        """The frozen base's final hidden states (B, L, d), never recorded by autograd."""
        return self.base_states(input_ids, attention_mask, t)[-1]

    def base_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, t
    ) -> tuple[torch.Tensor, ...]:
        """The frozen base's states, never recorded by autograd: every layer's (embeddings
        first, final last) when an adaptor reads several layers, else the final states alone.
        Reused while x_t and the mask are unchanged (time-agnostic base, outside training)."""
        attn = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        reusable = (
            self.cache_base
            and not torch.is_grad_enabled()
            and not getattr(self.base, "time_conditioned", True)
        )
        if reusable and self._cache is not None:
            x0, a0, h0 = self._cache
            if x0.shape == input_ids.shape and torch.equal(x0, input_ids) and torch.equal(a0, attn):
                self.base_calls_saved += 1
                return h0
        with torch.no_grad():
            if self.reads_layers:
                states = tuple(self.base.layer_states(input_ids, attn, t))
            else:
                states = (self.base.hidden_states(input_ids, attn, t),)
        self.base_calls += 1
        self._cache = (input_ids.clone(), attn.clone(), states) if reusable else None
        return states

    @property
    def reads_layers(self) -> bool:
        """Whether an adaptor reads the base's layer states (an attention reader)."""
        return any(a.reader is not None for a in self.adaptors.values())

    def condition_encodings(
        self, input_ids: torch.Tensor, h: torch.Tensor, condition_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Enc(c) (B, d) in each representation an adaptor or the router reads: the mean over
        condition positions of the base's final hidden states h (B, L, d) ("hidden") and/or of
        its input embeddings ("embedding"); and, keyed "adaptor:<task>", the attention-pooled
        Enc(c) of each adaptor that learns its own pooling."""
        needed = {a.cfg.condition_repr for a in self.adaptors.values()}
        if self.router is not None:
            needed.add(self.router.condition_repr)
        states = {"hidden": h}
        if "embedding" in needed:
            with torch.no_grad():
                states["embedding"] = self.base.input_embeddings(input_ids)
        encs = {repr_: pool_condition(x, condition_mask) for repr_, x in states.items()}
        for name, a in self.adaptors.items():
            if a.query is not None:  # attention pooling: one Enc(c) per adaptor
                encs[ADAPTOR_KEY + name] = a.encode(states[a.cfg.condition_repr], condition_mask)
        return encs

    def task_weight_matrix(self, encs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_tasks): fixed weights if set (one row (n,) or (1, n) is shared by the batch;
        a row of NaN asks for the router's weights for that example), else the router's, else
        1 for a lone adaptor. The matrix used is kept in `last_weights`."""
        enc = encs["hidden"]
        b = enc.shape[0]
        if self._weights is not None:
            w = self._weights.to(device=enc.device, dtype=enc.dtype)
            w = w[None] if w.dim() == 1 else w
            w = w.expand(b, -1) if w.shape[0] == 1 else w
            routed = w.isnan().any(-1)
            if routed.any():
                if self.router is None:
                    raise ValueError("task weights of NaN ask for the router, and there is none")
                w = torch.where(routed[:, None], self._routed(encs), w)
        elif self.router is not None:
            w = self._routed(encs)
        elif len(self.adaptors) == 1:
            w = enc.new_ones(b, 1)
        else:
            raise ValueError("several adaptors and no router: give task_weights")
        self.last_weights = w.detach()
        return w

    def _routed(self, encs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The router's softmax weights, placed in the columns of the tasks it routes to."""
        self.router_logits = self.router.logits(encs[self.router.condition_repr])
        probs = self.router_logits.softmax(-1)  # the logits are kept for a routing loss
        if self._router_columns == list(range(len(self.adaptors))):
            return probs
        w = probs.new_zeros(probs.shape[0], len(self.adaptors))
        return w.index_copy(1, torch.tensor(self._router_columns, device=w.device), probs)

    def perturbation(self, x_repr: dict, t, encs: dict, w) -> torch.Tensor:
        """sum_j w_j delta_j over N positions: x_repr maps input_repr -> (N, d); t (N,);
        encs maps condition_repr -> (N, d); w (N, n_tasks). Returns (N, d). Each adaptor runs
        only at the positions that give it weight, so a batch mixing one-task requests of
        several tasks costs what one task's batch does."""
        delta = torch.zeros_like(x_repr["hidden"])
        for j, (name, adaptor) in enumerate(self.adaptors.items()):
            active = w[:, j] != 0
            if not active.any():
                continue
            x = x_repr.get(READER_KEY + name, x_repr.get(adaptor.cfg.input_repr))
            x = x[:, None]  # (N, 1, d_in): a position is an example
            enc = encs.get(ADAPTOR_KEY + name)
            enc = encs[adaptor.cfg.condition_repr] if enc is None else enc
            if active.all():
                delta = delta + w[:, j, None] * adaptor(x, t, enc)[:, 0]
            else:
                idx = active.nonzero()[:, 0]
                part = w[idx, j, None] * adaptor(x[idx], t[idx], enc[idx])[:, 0]
                delta = delta.index_add(0, idx, part)
        return delta

    # --- the denoiser seam -------------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        """h' = h + perturbation: (B, L, d). t (B,) is required: the adaptors are step-aware.

        Only positions outside the condition are perturbed: condition tokens are clean and
        their outputs are never read, so the adaptor's cost scales with the target length.
        """
        if t is None:
            raise ValueError("the adapted denoiser needs t (B,) in [0, 1]")
        states = self.base_states(input_ids, attention_mask, t)
        h = states[-1]
        encs = self.condition_encodings(input_ids, h, condition_mask)  # each (B, d)
        w = self.task_weight_matrix(encs)  # (B, n_tasks)
        sel = (
            torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            if condition_mask is None
            else ~condition_mask.bool()
        )
        rows = sel.nonzero(as_tuple=True)[0]  # example index of each selected position
        x_repr = {"hidden": h[sel]}
        if any(a.cfg.input_repr == "embedding" for a in self.adaptors.values()):
            with torch.no_grad():
                x_repr["embedding"] = self.base.input_embeddings(input_ids)[sel]
        for name, adaptor in self.adaptors.items():
            if adaptor.reader is not None:  # reads the whole sequence, mixes positions
                z = adaptor.read(states, attention_mask, condition_mask)  # (B, L, k)
                x_repr[READER_KEY + name] = z[sel]
        delta = self.perturbation(x_repr, t[rows], {k: v[rows] for k, v in encs.items()}, w[rows])
        return h.index_put((sel.nonzero(as_tuple=True)), h[sel] + delta)

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.base.output_head(h)

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.input_embeddings(input_ids)

    # --- files -------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """One adaptor: `path/` (adapter_config.json + adapter_model.safetensors); several:
        `path/<task>/` each, plus `path/router/` when there is a router."""
        path = Path(path)
        if len(self.adaptors) == 1 and self.router is None:
            task, adaptor = next(iter(self.adaptors.items()))
            save_adaptor(path, adaptor, self.base, task=task)
            return
        for task, adaptor in self.adaptors.items():
            save_adaptor(path / task, adaptor, self.base, task=task)
        if self.router is not None:
            save_router(path / "router", self.router, self.task_names, self.base)

    @classmethod
    def from_pretrained(cls, base: nn.Module, path, check_base: bool = True) -> AdaptedDenoiser:
        """Load what `save_pretrained` wrote (or a {task: folder} mapping) onto `base`;
        refuses adaptors trained on another base (`adaptor_io.AdaptorFileError`)."""
        if not isinstance(path, Mapping) and (Path(path) / CONFIG_NAME).is_file():
            adaptor, config = load_adaptor(path, base, check_base)
            return cls(base, {config.get("task") or "task": adaptor})
        folders = (
            dict(path)
            if isinstance(path, Mapping)
            else {p.name: p for p in sorted(Path(path).iterdir()) if (p / CONFIG_NAME).is_file()}
        )
        router = None
        if not isinstance(path, Mapping) and (Path(path) / "router" / ROUTER_CONFIG).is_file():
            router, order = load_router(Path(path) / "router", base)
            missing = [task for task in order if task not in folders]
            if missing:
                raise AdaptorFileError(f"{path}: the router routes to {missing}, not found here")
            folders = {task: folders[task] for task in order}  # the router's output order
        if not folders:
            raise AdaptorFileError(f"{path}: no adaptor folder ({CONFIG_NAME}) found")
        adaptors = {task: load_adaptor(f, base, check_base)[0] for task, f in folders.items()}
        return cls(base, adaptors, router)

    def adaptor_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: adaptors and router, never the base."""
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]


def get_adaptor_model(base: nn.Module, cfg=None, task: str = "task") -> AdaptedDenoiser:
    """Wrap `base` (frozen) with one fresh adaptor, peft's `get_peft_model` in spirit: the
    returned model trains only the adaptor and is itself a denoiser."""
    adaptor = TrajectoryAdaptor(cfg or AdaptorConfig(), base.config.hidden_size)
    return AdaptedDenoiser(base, {task: adaptor})
