"""Tables and plots of a comparison: accuracy vs weights remaining, and vs training epochs."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from contsparse.experiments.compare import near_dense
from contsparse.reports.plots import (
    accuracy_axes,
    dense_band,
    note_without_weights,
    percent_log_axis,
    plt,
    save_accuracy_plot,
    save_figure,
)
from contsparse.reports.table import percent
from contsparse.storage import strict_json, write_atomic

COLORS = {"cs": "#c0392b", "imp": "#2c6fbb", "random": "#7f8c8d", "magnitude": "#27ae60", "gmp": "#8e44ad"}


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Rows as CSV; the columns are every key of any row, in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
    return path


def write_text(path: Path, text: str) -> None:
    """A result file, written atomically: ``report`` reads some of them back."""
    write_atomic(path, text.encode())


def json_text(payload: Any) -> str:
    """A results file's JSON: NaN (a diverged run's accuracy) as null."""
    return strict_json(payload, indent=2) + "\n"


def markdown_cell(value: Any) -> str:
    """Table cell text: a ``|`` in a value (a regex of layers, say) would split the cell."""
    return str(value).replace("|", "\\|")


def markdown_table(groups: list[dict[str, Any]], best: dict[str, dict[str, Any]], dense: float | None,
                   dense_val: float | None = None) -> str:
    lines = ["| method | ticket | weights remaining | validation accuracy | test accuracy | seeds | training epochs "
             "| wall seconds |", "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        spread = f" ± {100 * g['test_accuracy_std']:.2f} points" if g["seeds"] > 1 else ""
        lines.append(f"| {markdown_cell(g['method'])} | {markdown_cell(g['label'])} | "
                     f"{percent(g['weights_remaining'])} | {percent(g.get('val_accuracy'))} | "
                     f"{percent(g['test_accuracy'])}{spread} | {g['seeds']} | {g['train_epochs']:.0f} | "
                     f"{g['wall_seconds']:.0f} |")
    if dense is not None and dense_val is not None and any(g["method"] != "dense" for g in groups):
        lines += ["", f"Sparsest ticket whose validation accuracy is within 0.3 points of dense's "
                      f"({100 * dense_val:.2f} %; chosen on validation, test accuracy reported; dense test "
                      f"{100 * dense:.2f} %):", ""]
        for method, g in sorted(best.items()):
            lines.append(f"* {method}: {percent(g['weights_remaining'])} of the weights, test "
                         f"{100 * g['test_accuracy']:.2f} % ({g['label']}, {g['train_epochs']:.0f} epochs)")
    return "\n".join(lines) + "\n"


def accuracy_vs_weights(groups: list[dict[str, Any]], dense: list[float], path: Path, title: str) -> Path:
    """Test accuracy against weights remaining (log axis), one line per method, dense as a band."""
    fig, ax = accuracy_axes()
    dense_band(ax, dense)
    empty = [g for g in groups if g["method"] != "dense" and g["weights_remaining"] <= 0]
    note_without_weights(ax, [f"{g['label']} ({100 * g['test_accuracy']:.1f} %)" for g in empty])
    for method in sorted({g["method"] for g in groups} - {"dense"}):
        points = sorted((g for g in groups if g["method"] == method and g["weights_remaining"] > 0),
                        key=lambda g: g["weights_remaining"])
        x = [100 * g["weights_remaining"] for g in points]
        y = [100 * g["test_accuracy"] for g in points]
        err = [100 * g["test_accuracy_std"] for g in points]
        ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=2, label=method, color=COLORS.get(method))
    return save_accuracy_plot(fig, ax, path, title)


def _chosen_by(row: dict[str, Any]) -> float:
    """What picks the best ticket: validation accuracy (test accuracy for rows saved without it)."""
    return row["test_accuracy"] if row.get("val_accuracy") is None else row["val_accuracy"]


def accuracy_vs_epochs(rows: list[dict[str, Any]], path: Path, title: str, dense_val: float | None = None,
                       dense: list[float] | None = None, tolerance: float = 0.003) -> Path:
    """What a search has found against the training epochs it spent, per method and seed (CS
    runs counted one after another, as on a single worker): the sparsest ticket so far whose
    validation accuracy is within ``tolerance`` of dense's (the table's criterion), its weights
    remaining above and its test accuracy below. Best accuracy alone would reward the densest
    ticket (IMP's dense round 0 first of all); without a dense run, the most accurate sparse
    ticket by validation is shown instead."""
    from matplotlib.lines import Line2D

    bar = dense_val if dense_val is not None and math.isfinite(dense_val) else None
    fig, (weights_ax, accuracy_ax) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    accuracy_ax.ticklabel_format(axis="y", useOffset=False)
    dense_band(accuracy_ax, dense or [])
    progress = search_progress(rows, bar, tolerance)
    for (method, _), points in progress.items():
        xs = [epochs for epochs, _ in points]
        style = {"where": "post", "marker": "o", "markersize": 3, "color": COLORS.get(method)}
        weights_ax.step(xs, [100 * best["weights_remaining"] for _, best in points], **style)
        accuracy_ax.step(xs, [100 * best["test_accuracy"] for _, best in points], **style)
    plotted = bool(progress)
    criterion = (f"sparsest ticket so far with validation accuracy >= dense - {100 * tolerance:.1f} points"
                 if bar is not None else "most accurate sparse ticket so far (by validation; no dense run)")
    weights_ax.set_title(f"{title}\n{criterion}", fontsize=10)
    if plotted:
        percent_log_axis(weights_ax, "y")
    else:
        weights_ax.text(0.5, 0.5, "no ticket meets the criterion", ha="center", va="center",
                        transform=weights_ax.transAxes)
    weights_ax.set_ylabel("weights remaining (%)")
    accuracy_ax.set_ylabel("its test accuracy (%)")
    accuracy_ax.set_xlabel("cumulative training epochs")
    handles = [Line2D([], [], color=COLORS.get(m), marker="o", markersize=3, label=m)
               for m in sorted({method for method, _ in progress})]  # methods with a line
    if handles:
        weights_ax.legend(handles=handles, fontsize=8)
    if dense:
        accuracy_ax.legend(fontsize=8)
    for ax in (weights_ax, accuracy_ax):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def search_progress(rows: list[dict[str, Any]], bar: float | None, tolerance: float = 0.003
                    ) -> dict[tuple[str, int], list[tuple[float, dict[str, Any]]]]:
    """Per (method, seed): (cumulative training epochs, best ticket so far) after each of its runs
    or IMP rounds, from the first run that found a ticket (see :func:`accuracy_vs_epochs`)."""
    progress: dict[tuple[str, int], list[tuple[float, dict[str, Any]]]] = {}
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and r["seed"] == seed]
            if method == "imp":  # one run: its rounds share the epochs
                steps = sorted(mine, key=lambda r: r["train_epochs"])
                spent = [r["train_epochs"] for r in steps]
            else:  # independent runs: epochs add up
                steps, spent, total = mine, [], 0
                for r in mine:
                    total += r["train_epochs"]
                    spent.append(total)
            best: dict[str, Any] | None = None
            points = []
            for epochs, row in zip(spent, steps, strict=True):
                if _better_ticket(row, best, bar, tolerance):
                    best = row
                if best is not None:
                    points.append((epochs, best))
            if points:
                progress[(method, seed)] = points
    return progress


def _better_ticket(row: dict[str, Any], best: dict[str, Any] | None, bar: float | None, tolerance: float) -> bool:
    """Whether ``row`` replaces ``best`` as the search's result so far: a sparse ticket (not a
    dense round) that meets the bar with fewer weights, or without a bar, a more accurate one."""
    if bar is not None:  # the table's criterion
        fewer = best is None or row["weights_remaining"] < best["weights_remaining"]
        return near_dense(row, bar, tolerance) and fewer
    score = _chosen_by(row)
    if not 0 < row["weights_remaining"] < 1.0 or not math.isfinite(score):
        return False
    return best is None or score > _chosen_by(best)


def write_comparison(rows: list[dict[str, Any]], out: Path, title: str) -> dict[str, Any]:
    """compare.csv / .md / .json and the two plots in ``out``; returns the aggregated results."""
    from contsparse.experiments.compare import Row, aggregate, sparsest_within

    groups = aggregate([Row(**r) for r in rows])
    dense = [r["test_accuracy"] for r in rows if r["method"] == "dense"]
    dense_mean = sum(dense) / len(dense) if dense else None
    dense_val = [g["val_accuracy"] for g in groups if g["method"] == "dense" and g["val_accuracy"] is not None]
    best = sparsest_within(groups, dense_val[0]) if dense_val else {}
    write_csv(rows, out / "compare.csv")
    write_text(out / "compare.md", f"# Comparison: {title}\n\n"
               + markdown_table(groups, best, dense_mean, dense_val[0] if dense_val else None))
    write_text(out / "compare.json", json_text({"groups": groups, "dense_accuracy": dense_mean,
                                                "dense_val_accuracy": dense_val[0] if dense_val else None,
                                                "sparsest_within_0.3": best}))
    accuracy_vs_weights(groups, dense, out / "accuracy_vs_weights.png", title)
    accuracy_vs_epochs(rows, out / "accuracy_vs_epochs.png", title, dense_val[0] if dense_val else None, dense)
    return {"groups": groups, "dense_accuracy": dense_mean, "dense_val_accuracy": dense_val[0] if dense_val else None,
            "best": best}
