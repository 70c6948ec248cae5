"""Pictures of a run: weights remaining per layer, and the first layer's mask of an MLP as an image."""

from __future__ import annotations

import io
import math
import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines
import matplotlib.pyplot as plt
import torch

from contsparse.reports.table import percent
from contsparse.storage import write_atomic


def save_figure(fig: plt.Figure, path: Path) -> None:
    """``fig.savefig`` written atomically: a crash or a full disk never leaves half a picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    write_atomic(Path(path), buffer.getvalue())


def percent_log_axis(ax: plt.Axes, axis: str = "x") -> None:
    """A log axis of percentages labelled 2, 5, 10 instead of 2 x 10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def accuracy_axes() -> tuple[plt.Figure, plt.Axes]:
    return plt.subplots(figsize=(7, 4.5))


def dense_band(ax: plt.Axes, accuracies: list[float]) -> None:
    """The dense model's test accuracy as a band (mean +- std over runs) behind the sparse curves."""
    if not accuracies:
        return
    mean = statistics.fmean(accuracies)
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    ax.axhspan(100 * (mean - spread) - 0.02, min(100 * (mean + spread) + 0.02, 100.0), color="#f1c40f", alpha=0.35,
               label=f"dense ({len(accuracies)} run{'s' if len(accuracies) > 1 else ''})")
    ax.axhline(100 * mean, color="#b7950b", linewidth=1)


def note_without_weights(ax: plt.Axes, labels: list[str]) -> None:
    """Runs that kept 0 % of the weights have no place on a log axis: named under the curves
    instead, so that a curve does not seem to end at full accuracy where they failed."""
    if labels:
        ax.text(0.01, 0.02, textwrap.fill("not drawn, 0 % of the weights kept: " + "; ".join(labels), 90),
                transform=ax.transAxes, fontsize=7, color="#b03030", va="bottom")


def save_accuracy_plot(fig: plt.Figure, ax: plt.Axes, path: Path, title: str, log_x: bool = True) -> Path:
    """Accuracy vs weights remaining: sparser to the right, percent labels, saved and closed."""
    ax.ticklabel_format(axis="y", useOffset=False)  # equal accuracies: 100, not +1e2 and ticks around 0
    if log_x:
        percent_log_axis(ax)
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # (nothing labelled: every point pruned to 0 %, say)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def per_layer_chart(per_layer: dict[str, float], path: Path, title: str = "") -> Path:
    """Horizontal bars of the fraction of weights kept in each masked layer (log scale)."""
    names = list(per_layer)
    values = [100 * per_layer[n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    bars = ax.barh(range(len(names)), values, color="#3b75af")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    left = min([v for v in values if v > 0] + [1.0]) / 2
    ax.set_xlim(left, 100)  # the axis ends at 100 %: labels of long bars go inside them
    percent_log_axis(ax)  # after the limits: with every layer at 0 % there is no data to scale by
    ax.set_xlabel("weights remaining (%)")
    inside = [v > 0 and math.log(v / left) > 0.6 * math.log(100 / left) for v in values]
    outside = [percent(v / 100) if v > 0 and not i else "" for v, i in zip(values, inside, strict=True)]
    ax.bar_label(bars, labels=outside, padding=3, fontsize=8)
    for row, (value, label_inside) in enumerate(zip(values, inside, strict=True)):
        if label_inside:
            ax.text(value / 1.08, row, percent(value / 100), ha="right", va="center", fontsize=8, color="white")
        if value <= 0:  # no bar on a log axis: say so where the bar would start
            ax.text(left * 1.1, row, "0 % (every weight pruned)", va="center", fontsize=8, color="#b03030")
    ax.set_title(title or "weights remaining per layer")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def input_mask_image(mask: torch.Tensor, path: Path, title: str = "") -> Path | None:
    """For a first Linear layer on square images (e.g. 784 = 28 x 28 inputs): how many of each
    input pixel's outgoing weights are kept, as a heat map. None if the inputs are not square."""
    inputs = mask.shape[1]
    side = math.isqrt(inputs)
    if mask.dim() != 2 or side * side != inputs:
        return None
    kept = mask.float().sum(0).reshape(side, side)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    # counts from 0 to the busiest pixel's: a sparse ticket's pixels keep a few of hundreds of weights
    image = ax.imshow(kept.numpy(), cmap="viridis", vmin=0, vmax=max(1.0, float(kept.max())))
    fig.colorbar(image, ax=ax, label=f"weights kept (of {mask.shape[0]})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(textwrap.fill(title or "kept weights per input pixel", 40), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
