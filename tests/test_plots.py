"""Figures are written as real PNG files from histories and adaptor reports."""

import torch

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
from lora_diffusion.adaptor_io import adaptor_report
from lora_diffusion.plots import plot_effective_ranks, plot_history


def test_history_plot_is_a_png(tmp_path):
    history = [{"step": s, "loss": 1 / s, "nll": 2 / s} for s in range(1, 20)]
    path = plot_history(history, tmp_path / "a" / "curves.png", ("loss", "nll", "absent"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_effective_rank_plot_is_a_png(tmp_path):
    adaptor = TrajectoryAdaptor(AdaptorConfig(ranks=(8, 4), sigmas=(1, 1), boundaries=(0.5,)), 32)
    with torch.no_grad():
        for p in adaptor.parameters():
            p.normal_()
    path = plot_effective_ranks(adaptor_report(adaptor), tmp_path / "ranks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
