"""PNG figures with matplotlib: training curves and a gallery of misreads.

Figures are drawn on matplotlib's Agg canvas directly (matplotlib.figure.Figure, no pyplot):
no display is needed and the caller's pyplot backend and state are left alone."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from captcha_fast.preprocess import to_channels


def _series(rows: Sequence[dict], key: str):
    """(epochs, values) of the rows where `key` holds a finite number."""
    pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    pts = [(e, v) for e, v in pts if math.isfinite(v)]
    return [e for e, _ in pts], [v for _, v in pts]


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_curves(rows: Sequence[dict], path) -> Path:
    """Loss (train, validation) and accuracy / CER (train accuracy, validation accuracy and CER)
    against the epoch, as two panels in one PNG. rows: metrics.csv rows (dicts, numbers or strings)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in [("train_loss", "train"), ("val_loss", "validation")]:
        e, v = _series(rows, key)
        if v:
            loss_ax.plot(e, v, marker=".", label=label)
    loss_ax.set(title="CTC loss", xlabel="epoch", ylabel="loss per label symbol")
    for key, label in [("train_acc", "train accuracy"), ("val_acc", "validation accuracy"),
                       ("val_cer", "validation CER")]:
        e, v = _series(rows, key)
        if v:
            acc_ax.plot(e, v, marker=".", label=label, linestyle="--" if key == "val_cer" else "-")
    acc_ax.set(title="whole-captcha accuracy and character error rate", xlabel="epoch", ylabel="fraction",
               ylim=(-0.02, 1.02))
    for ax, where in ((loss_ax, "upper right"), (acc_ax, "center right")):  # away from where the curves end
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where)
    return _save(fig, path)


def _rgb(image: Tensor) -> Tensor:
    """(C, H, W) uint8 or float in [0, 1], C = 1/3/4 -> (H, W, 3) float for imshow."""
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    return to_channels(x[None], 3)[0].permute(1, 2, 0).clamp(0, 1)


def plot_gallery(images: Sequence[Tensor], truths: Sequence[str], reads: Sequence[str], path,
                 columns: int = 4, max_items: int = 48) -> Path:
    """A PNG grid of (C, H, W) images, each titled with its truth and read text (the misreads
    of an evaluation); the first max_items of them."""
    items: List = list(zip(images, truths, reads))[:max_items]
    rows = max(1, math.ceil(len(items) / columns))
    fig = Figure(figsize=(3.2 * columns, 1.5 * rows + 0.5), layout="constrained")
    fig.suptitle(f"{len(images)} misread images (truth -> read)" if items else "no misread images")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[len(items):]:
        ax.axis("off")
    for ax, (image, truth, read) in zip(axes, items):
        ax.imshow(_rgb(image).numpy(), interpolation="bilinear")
        ax.set(xticks=[], yticks=[])  # a frame, so white images show their extent
        ax.set_title(f"{truth} -> {read or '(nothing)'}", fontsize=10, color="darkred", family="monospace")
    return _save(fig, path)


def plot_reliability(panels: dict, path, title: str = "") -> Path:
    """Reliability diagrams, one panel per entry of `panels` (panel title -> {curve label ->
    confidence.Reliability}): accuracy against mean confidence per bin, the diagonal as the ideal,
    marker area by the bin's share of reads, ECE in the legend."""
    fig = Figure(figsize=(5.2 * len(panels), 4.8), layout="constrained")
    if title:
        fig.suptitle(title)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, curves) in zip(axes, panels.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="ideal")
        for label, rel in curves.items():
            xs = [b["confidence"] for b in rel.bins]
            ys = [b["accuracy"] for b in rel.bins]
            sizes = [max(6.0, 400.0 * b["n"] / rel.n) for b in rel.bins]
            line, = ax.plot(xs, ys, marker="", label=f"{label} (ECE {rel.ece:.3f})")
            ax.scatter(xs, ys, s=sizes, color=line.get_color(), alpha=0.6)
        ax.axvline(0.9, color="grey", linewidth=0.8)
        ax.set(title=name, xlabel="confidence (mean per bin)", ylabel="fraction read right", xlim=(-0.02, 1.02),
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
    return _save(fig, path)
