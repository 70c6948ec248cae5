"""Tables and plots of sweeps (and of any set of runs): every point, the Pareto front, a picture.

The front is what a user picks from: the points that no other point beats on both axes (fewer
weights *and* higher validation accuracy); their test accuracy is reported, never used to choose.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from contsparse.experiments.config import NOT_FOR_DENSE, NOT_IN_IDENTITY, RunConfig
from contsparse.experiments.sweep import PointResult, pareto_front
from contsparse.reports.compare import json_text, markdown_cell, write_csv, write_text
from contsparse.reports.plots import accuracy_axes, dense_band, note_without_weights, save_accuracy_plot
from contsparse.reports.table import percent

PALETTE = ["#c0392b", "#2c6fbb", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d"]


def sweep_title(base: RunConfig) -> str:
    what = base.command if base.command == "train" else f"{base.command} ({base.method})"
    return f"Sweep: {what} on {base.model} / {base.dataset}"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows_for_csv(results: list[PointResult], front: list[PointResult], series: str = "",
                 keys: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per point; ``keys``: the value columns (every series' of a report, so that they come
    before the results in every row, and a value a point lacks is empty, null in JSON)."""
    on_front = {id(r) for r in front}
    keys = sorted({k for r in results for k in r.values}) if keys is None else keys
    rows = []
    for r in results:
        row: dict[str, Any] = {"series": series} if series else {}
        row.update({"point": r.name, "command": r.command, "status": r.status})
        row.update({k: r.values.get(k) for k in keys})
        row.update({"weights_remaining": r.weights_remaining, "val_accuracy": r.val_accuracy,
                    "test_accuracy": r.test_accuracy, "train_epochs": r.train_epochs, "wall_seconds": r.wall_seconds,
                    "finished_after_s": r.finished_after_s, "threads": r.threads, "pareto": id(r) in on_front,
                    "run_dir": r.run_dir, "message": r.message})
        rows.append(row)
    return rows


def dense_accuracies(results: list[PointResult]) -> list[float]:
    """The dense reference's test accuracies (not a dense sweep's own points)."""
    return [r.test_accuracy for r in results if r.reference and r.status == "done"
            and r.test_accuracy is not None and math.isfinite(r.test_accuracy)]


def markdown(results: list[PointResult], front: list[PointResult], title: str) -> str:
    keys = sorted({k for r in results for k in r.values})
    on_front = {id(r) for r in front}
    header = ["point", *keys, "status", "weights remaining", "val. accuracy", "test accuracy", "epochs", "wall s",
              "Pareto"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: (not r.reference, -(r.weights_remaining or 0), r.name)):
        cells = [r.name, *(str(r.values.get(k, "")) for k in keys), r.status, percent(r.weights_remaining),
                 percent(r.val_accuracy), percent(r.test_accuracy), _number(r.train_epochs), _number(r.wall_seconds),
                 "★" if id(r) in on_front else ""]
        lines.append("| " + " | ".join(map(markdown_cell, cells)) + " |")
    dense = dense_accuracies(results)
    lines += ["", "Pareto front, chosen on validation accuracy (no other point has both fewer weights and a "
              "higher validation accuracy; test accuracy only reports):", ""]
    for r in front:
        gap = f", {100 * (r.test_accuracy - statistics.fmean(dense)):+.2f} points vs dense" if dense else ""
        empty = " (every weight pruned)" if r.weights_remaining == 0 else ""
        lines.append(f"* {r.name}: {percent(r.weights_remaining)} of the weights{empty}, test accuracy "
                     f"{percent(r.test_accuracy)}{gap}")
    if not front:
        lines.append(f"* ({_nothing_sparse(results)})")
    if dense:
        lines += ["", f"Dense reference: {percent(statistics.fmean(dense))} ({len(dense)} run(s))."]
        # ticket_epochs is the dense reference's length too, and a pruning sweep's rounds
        lengths = {"ticket_epochs", "rounds"} if any(r.command == "prune" for r in results) else {"ticket_epochs"}
        recipe = [k for k in keys if k not in (NOT_FOR_DENSE - lengths) | NOT_IN_IDENTITY | {"seed"}]
        if recipe:
            lines.append(f"It trains with the sweep's shared settings, while the points vary {', '.join(recipe)}, "
                         "which dense training uses too: the gaps to it compare different training settings.")
    problems = [r for r in results if r.status != "done"]
    if problems:
        lines += ["", "Not finished:", ""]
        lines += [f"* {r.name}: {r.status}" + (f": {r.message}" if r.message else "") for r in problems]
    return "\n".join(lines) + "\n"


def accuracy_plot(series: dict[str, list[PointResult]], path: Path, title: str) -> Path:
    """Test accuracy vs weights remaining (log axis, sparser to the right), one colour per series,
    its Pareto front (chosen on validation accuracy) as a line, the dense reference as a band."""
    fig, ax = accuracy_axes()
    dense = {label: dense_accuracies(results) for label, results in series.items()}
    with_dense = [label for label, accuracies in dense.items() if accuracies]
    runs = {label: frozenset(r.run_dir for r in results if r.reference) for label, results in series.items()}
    if len({runs[label] for label in with_dense}) == 1:  # one reference (a comparison's methods share its runs)
        dense_band(ax, dense[with_dense[0]])
        with_dense = with_dense[:1]
    plotted, empty = False, []
    for index, (label, results) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        if len(with_dense) > 1 and dense[label]:  # each its own: other data or settings, not one population
            ax.axhline(100 * statistics.fmean(dense[label]), color=color, linestyle="--", linewidth=1,
                       label=f"{label}: dense ({len(dense[label])} run{'s' if len(dense[label]) > 1 else ''})")
        done = _finished_sparse(results)
        plotted = plotted or bool(done)
        empty += [f"{_short(r, results)} ({percent(r.test_accuracy)})" for r in results
                  if r.status == "done" and r.command != "train" and r.weights_remaining == 0]
        ax.scatter([100 * r.weights_remaining for r in done], [100 * r.test_accuracy for r in done], s=18,
                   color=color, alpha=0.55)
        if len(done) <= 12:  # few points: say which is which
            for r in done:
                ax.annotate(_short(r, results), (100 * r.weights_remaining, 100 * r.test_accuracy), fontsize=7,
                            xytext=(4, 4), textcoords="offset points", color=color)
        front = [r for r in pareto_front(results) if r.weights_remaining]  # 0 has no place on a log axis
        if front:  # (a dense run's series has none: no legend entry for nothing drawn)
            ax.plot([100 * r.weights_remaining for r in front], [100 * r.test_accuracy for r in front], marker="o",
                    markersize=5, color=color, label=f"{label} (Pareto front on validation)")
    note_without_weights(ax, empty)
    if not plotted:  # only dense, failed, pending or empty points: an x axis would mean nothing
        reason = _nothing_sparse([r for results in series.values() for r in results])
        ax.text(0.5, 0.5, reason, transform=ax.transAxes, ha="center", va="center", color="#555555")
        ax.set_xticks([])
    return save_accuracy_plot(fig, ax, path, title, log_x=plotted)


def _nothing_sparse(results: list[PointResult]) -> str:
    """Why there is no sparse point to show."""
    done = [r for r in results if r.status == "done" and not r.reference]
    if (done or results) and all(r.command == "train" for r in (done or results)):  # (a dense run's reference: itself)
        return "dense runs only: no sparse point"
    if any(r.weights_remaining == 0 for r in done):
        return "no finished sparse point with weights left"
    return "no finished sparse point yet"


def _finished_sparse(results: list[PointResult]) -> list[PointResult]:
    """The points a log axis of weights remaining can show: finished, sparse, not the dense reference."""
    return [r for r in results if r.status == "done" and r.command != "train" and r.weights_remaining]


def _short(result: PointResult, series: list[PointResult]) -> str:
    """What tells the point apart in its series: the settings that vary there (not the seed),
    or its name (a comparison's own label, say "imp round 2", where only the seed varies)."""
    points = [r for r in series if not r.reference] or series  # (a comparison's series holds its dense runs too)
    keys = [key for key in dict.fromkeys(k for r in points for k in r.values)
            if key != "seed" and len({repr(r.values.get(key)) for r in points}) > 1 and key in result.values]
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in ((k, result.values[k]) for k in keys)) or result.name


def write_sweep(results: list[PointResult], out: Path, title: str) -> list[Path]:
    """``sweep.md``, ``sweep.csv``, ``sweep.json`` and ``sweep.png`` in the sweep directory."""
    front = pareto_front(results)
    rows = rows_for_csv(results, front)
    write_csv(rows, out / "sweep.csv")
    write_text(out / "sweep.md", markdown(results, front, title) + "\n![accuracy vs weights](sweep.png)\n")
    dense = dense_accuracies(results)
    write_text(out / "sweep.json", json_text({
        "title": title, "points": rows, "pareto_front": [r.name for r in front],
        "dense_accuracy": statistics.fmean(dense) if dense else None}))
    plot = accuracy_plot({"sweep": results}, out / "sweep.png", title)
    return [out / "sweep.md", out / "sweep.csv", out / "sweep.json", plot]


def write_report(series: dict[str, list[PointResult]], out: Path, title: str) -> list[Path]:
    """One table per source directory and one plot of all of them, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows, text = [], [f"# {title}", ""]
    keys = sorted({k for results in series.values() for r in results for k in r.values})
    written: set[int] = set()  # a comparison's dense runs are in each of its methods' series: one row each
    for label, results in series.items():
        front = pareto_front(results)
        rows += rows_for_csv([r for r in results if id(r) not in written], front, label, keys)
        written.update(id(r) for r in results if r.reference)
        text.append(markdown(results, front, label).replace("# ", "## ", 1))
    write_csv(rows, out / "report.csv")
    write_text(out / "report.md", "\n".join(text) + "\n![accuracy vs weights](accuracy_vs_weights.png)\n")
    plot = accuracy_plot(series, out / "accuracy_vs_weights.png", title)
    return [out / "report.md", out / "report.csv", plot]
