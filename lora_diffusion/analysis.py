"""What task adaptors do to the denoising trajectory: their perturbations, side by side.

`trajectory_perturbations` collects, for examples of several tasks, the perturbation each
task's own adaptor adds at the answer positions (mean over them, one vector per example and
step), with the answer fully masked as at the start of sampling. `embed_2d` maps them to the
plane with t-SNE (scikit-learn) and `separation` measures how far the tasks' perturbations
separate (silhouette of the task labels, -1..1, in the original space and in the t-SNE plane),
so the figure comes with a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .composition import AdaptedDenoiser
from .data import collate, tokenize_task

#: One t per phase of the default schedule (early, middle, late).
DEFAULT_TIMES = (0.9, 0.5, 0.1)


@torch.no_grad()
def trajectory_perturbations(
    model: AdaptedDenoiser,
    tokenizer,
    tasks: Sequence[str],
    *,
    per_task: int = 64,
    times: Sequence[float] = DEFAULT_TIMES,
    data_dir: str | Path | None = None,
    max_length: int = 128,
    batch_size: int = 32,
) -> dict[str, torch.Tensor | list]:
    """Perturbations of each task's adaptor on `per_task` eval examples of that task.

    Returns {"vectors": (N, d) float32, "task": [N task names], "t": (N,) times}: one row per
    example and t, the mean over the example's answer positions of h'(x_t) - h(x_t), with the
    answer fully masked and one-hot weights on the example's own task."""
    names = model.task_names
    missing = [task for task in tasks if task not in names]
    if missing:
        raise ValueError(f"no adaptor for {missing} among {names}")
    model.eval()
    vectors, labels, ts = [], [], []
    for task in tasks:
        rows = list(
            tokenize_task(
                task, "eval", tokenizer, max_length, data_dir, limit=per_task
            ).with_format("python")
        )
        weights = F.one_hot(torch.tensor(names.index(task)), len(names)).float()
        for i in range(0, len(rows), batch_size):
            b = collate(rows[i : i + batch_size], tokenizer.pad_token_id)
            target = b["target_mask"].bool()
            ids = b["input_ids"].masked_fill(target, tokenizer.mask_token_id)
            cond = b["attention_mask"].bool() & ~target
            # through the model's cache: the adaptor calls below reuse this base output
            h = model.base_hidden(ids, b["attention_mask"], torch.full((len(ids),), times[0]))
            n_target = target.sum(1, keepdim=True).clamp_min(1)
            for t in times:
                tt = torch.full((len(ids),), float(t))
                with model.task_weights(weights):
                    adapted = model.hidden_states(ids, b["attention_mask"], tt, cond)
                delta = ((adapted - h) * target[..., None]).sum(1) / n_target
                vectors.append(delta.float())
                labels += [task] * len(ids)
                ts.append(tt)
    return {"vectors": torch.cat(vectors), "task": labels, "t": torch.cat(ts)}


def embed_2d(vectors: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(N, d) -> (N, 2) by t-SNE (perplexity min(30, (N - 1) / 3), PCA initialisation)."""
    from sklearn.manifold import TSNE

    n = len(vectors)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
    return torch.from_numpy(tsne.fit_transform(vectors.double().numpy())).float()


def separation(points: torch.Tensor, labels: Sequence[str]) -> float:
    """Silhouette score of `labels` over `points` (-1..1; 0: the tasks overlap); nan with
    fewer than two labels."""
    from sklearn.metrics import silhouette_score

    if len(set(labels)) < 2:
        return float("nan")
    return float(silhouette_score(points.double().numpy(), list(labels)))


def plot_perturbations(
    points: torch.Tensor, labels: Sequence[str], t: torch.Tensor, path: str | Path, title: str = ""
) -> Path:
    """Scatter of the 2-D points, one colour per task, one marker per t."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    markers = "o^sDvP*X"
    times = sorted({round(float(x), 3) for x in t}, reverse=True)
    for ci, task in enumerate(sorted(set(labels))):
        for mi, tv in enumerate(times):
            sel = [
                i
                for i, (lab, x) in enumerate(zip(labels, t.tolist(), strict=True))
                if lab == task and round(x, 3) == tv
            ]
            if sel:
                ax.scatter(
                    points[sel, 0],
                    points[sel, 1],
                    s=12,
                    color=f"C{ci}",
                    marker=markers[mi % len(markers)],
                    alpha=0.7,
                    label=f"{task}, t={tv:g}",
                )
    ax.set_title(title or "trajectory perturbations (t-SNE)")
    ax.legend(fontsize=7, markerscale=1.2, ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def perturbation_map(
    model: AdaptedDenoiser, tokenizer, tasks: Sequence[str], out: str | Path, **kw
) -> dict:
    """Collect, embed, measure and plot: writes `out` (PNG); returns the figure path, the
    number of points and the silhouette of the tasks in the original space and the plane."""
    seed = kw.pop("seed", 0)
    got = trajectory_perturbations(model, tokenizer, tasks, **kw)
    points = embed_2d(got["vectors"], seed)
    path = plot_perturbations(points, got["task"], got["t"], out)
    return {
        "figure": str(path),
        "points": len(got["task"]),
        "silhouette": separation(got["vectors"], got["task"]),
        "silhouette_2d": separation(points, got["task"]),
        "per_task": {task: got["task"].count(task) for task in tasks},
    }
