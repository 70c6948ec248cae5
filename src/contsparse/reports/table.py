"""Run summaries as terminal tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


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
    table.add_row(_pct(summary["weights_remaining"]), _pct(summary["test_accuracy"]),
                  _pct(summary.get("dense_test_accuracy")), epochs, f"{seconds:.0f} s")
    return table


def per_layer_table(summary: dict[str, Any]) -> Table:
    table = Table(title="weights remaining per layer", header_style="bold")
    table.add_column("layer")
    table.add_column("remaining", justify="right")
    for name, value in (summary.get("per_layer") or {}).items():
        table.add_row(name, _pct(value))
    return table


def round_tickets_table(summary: dict[str, Any]) -> Table:
    """The ticket of each round, for methods that train one per round (IMP): the sparsity curve."""
    table = Table(title="ticket of each round", header_style="bold")
    for column in ("round", "weights remaining", "val. acc.", "test acc.", "epochs"):
        table.add_column(column, justify="right")
    for ticket in summary.get("round_tickets") or []:
        table.add_row(str(ticket.get("round", "?")), _pct(ticket.get("weights_remaining")),
                      _pct(ticket.get("val_accuracy")), _pct(ticket.get("test_accuracy")),
                      str(ticket.get("train_epochs", "-")))
    return table


def print_summary(summary: dict[str, Any], per_layer: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    if per_layer:
        if summary.get("round_tickets"):
            console.print(round_tickets_table(summary))
        console.print(per_layer_table(summary))
    console.print(f"run directory: {summary.get('run_dir', '?')}")
    emptied = [name for name, kept in (summary.get("per_layer") or {}).items() if kept == 0]
    if emptied:  # a ticket at chance accuracy otherwise looks like a finished success
        console.print(f"[bold red]warning:[/] every weight of {', '.join(emptied)} is pruned: no signal passes "
                      "through (a higher --mask-init keeps more; a lower --penalty or fewer rounds prune less)",
                      highlight=False)
