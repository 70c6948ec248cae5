"""Run summaries as terminal tables."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals; within 0.1 points of 0 % or 100 %, with two
    significant digits of the distance (18 weights of 235,200 are 0.0077 %, not an empty layer)."""
    if value is None:
        return "-"
    gap = 100 * min(abs(value), abs(1 - value))
    digits = min(1 - math.floor(math.log10(gap)), 12) if 0 < gap < 0.1 else 2
    return f"{100 * value:.{digits}f} %"


def summary_table(summary: dict[str, Any]) -> Table:
    """The headline numbers of one run."""
    is_ticket = summary.get("command") == "ticket"
    title = f"{summary['method']} {summary.get('command', '')} · {summary['model']} / {summary['dataset']}"
    table = Table(title=title, show_header=True, header_style="bold")
    for column in ("weights remaining", "ticket test acc." if is_ticket else "test acc.",
                   "dense test acc.", "epochs", "wall time"):
        table.add_column(column, justify="right")
    epochs = str(summary["train_epochs"])
    seconds = summary["wall_seconds"]
    if summary.get("dense_train_epochs"):
        epochs += f" + {summary['dense_train_epochs']} dense"
        seconds += summary.get("dense_wall_seconds", 0.0)
    table.add_row(percent(summary["weights_remaining"]), percent(summary["test_accuracy"]),
                  percent(summary.get("dense_test_accuracy")), epochs, f"{seconds:.0f} s")
    return table


def per_layer_table(summary: dict[str, Any]) -> Table:
    table = Table(title="weights remaining per layer", header_style="bold")
    table.add_column("layer")
    table.add_column("remaining", justify="right")
    for name, value in (summary.get("per_layer") or {}).items():
        table.add_row(name, percent(value))
    return table


def round_tickets_table(summary: dict[str, Any]) -> Table:
    """The ticket of each round, for methods that train one per round (IMP): the sparsity curve."""
    table = Table(title="ticket of each round", header_style="bold")
    for column in ("round", "weights remaining", "val. acc.", "test acc.", "epochs so far"):
        table.add_column(column, justify="right")
    final = {"round": "final", **{key: summary.get(key) for key in ("weights_remaining", "val_accuracy",
                                                                     "test_accuracy", "train_epochs")}}
    for ticket in [*(summary.get("round_tickets") or []), final]:
        table.add_row(str(ticket.get("round", "?")), percent(ticket.get("weights_remaining")),
                      percent(ticket.get("val_accuracy")), percent(ticket.get("test_accuracy")),
                      str(ticket.get("train_epochs") if ticket.get("train_epochs") is not None else "-"))
    return table


def print_summary(summary: dict[str, Any], per_layer: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    if per_layer:
        if summary.get("round_tickets"):
            console.print(round_tickets_table(summary))
        console.print(per_layer_table(summary))
    overall = summary.get("weights_remaining_all_layers")
    if isinstance(overall, int | float) and abs(overall - summary["weights_remaining"]) > 1e-9:
        console.print(f"of every Conv and Linear weight, unmasked layers counted as kept: {percent(overall)} "
                      "(the figure for papers that prune every layer)", highlight=False)
    if summary.get("weights_from"):  # a network pruned after training, not from a random initialisation
        console.print(f"started from the weights in {summary['weights_from']} (sha256 "
                      f"{str(summary.get('weights_from_sha256'))[:12]}...)", highlight=False, soft_wrap=True)
    console.print(f"run directory: {summary.get('run_dir', '?')}")
    emptied = [name for name, kept in (summary.get("per_layer") or {}).items() if kept == 0]
    if emptied:  # a ticket at chance accuracy otherwise looks like a finished success
        console.print(f"[bold red]warning:[/] every weight of {', '.join(emptied)} is pruned: no signal passes "
                      "through (a higher --mask-init keeps more; a lower --penalty or fewer rounds prune less)",
                      highlight=False)
