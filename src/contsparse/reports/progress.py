"""The sweep's one progress display: the whole sweep, and a bar per running point."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from contsparse.experiments.sweep import PointResult, SweepDisplay, SweepPoint
from contsparse.reports.table import percent


class SweepProgress(SweepDisplay):
    """Points done / running / failed on one line, epochs per running point below it; a log line
    for every point that ends (so a non-interactive log keeps the story too)."""

    def __init__(self, console: Console | None = None, where: str = "") -> None:
        """``where``: the rest of the opening line "sweep of N points..." (folder, workers)."""
        self.console = console or Console(stderr=True, log_path=False)
        self._where = where
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console)
        self._points: dict[str, int] = {}
        self._counts = {"done": 0, "failed": 0, "interrupted": 0}
        self._total = 0
        self._overall = None

    def start(self, points: list[SweepPoint], finished: int) -> None:
        # Said here, once the sweep holds its folder: the count is the whole plan's (an earlier
        # invocation's points included), and a sweep refused as locked says nothing of the kind
        self.console.file.write(f"sweep of {len(points)} points{self._where}\n")
        self._total = len(points)
        self._counts["done"] = finished
        self._totals = {p.name: p.total_epochs() for p in points}
        self._overall = self.progress.add_task(self._summary(), total=self._total, completed=finished)
        if finished:
            self._log(f"{finished} of {len(points)} points already finished: skipped")
        self.progress.start()

    def _summary(self) -> str:
        return (f"sweep: {self._counts['done']} done, {len(self._points)} running, {self._counts['failed']} failed"
                + (f", {self._counts['interrupted']} stopped" if self._counts["interrupted"] else ""))

    def running(self, point: SweepPoint, epochs_done: int) -> None:
        task = self._points.get(point.name)
        if task is None:
            task = self.progress.add_task(f"  {escape(point.name)}", total=self._totals[point.name])
            self._points[point.name] = task
        self.progress.update(task, completed=epochs_done)
        self.progress.update(self._overall, description=self._summary())

    def finished(self, point: SweepPoint, result: PointResult) -> None:
        task = self._points.pop(point.name, None)
        if task is not None:
            self.progress.remove_task(task)
        self._counts[result.status] = self._counts.get(result.status, 0) + 1
        if result.status == "done":
            self._log(f"[green]done[/] {escape(point.name)}: {percent(result.weights_remaining)} of the weights, "
                      f"test accuracy {percent(result.test_accuracy)}")
        else:
            self._log(f"[red]{result.status}[/] {escape(point.name)}: {escape(result.message)}")
        self.progress.update(self._overall, completed=self._counts["done"], description=self._summary())

    def _log(self, markup: str) -> None:
        """A record of the sweep; written to a file or pipe, one line however long (a log is
        grepped, not read at 80 columns)."""
        if self.console.is_terminal:
            self.console.log(markup, markup=True)
        else:
            self.console.file.write(f"[{time.strftime('%H:%M:%S')}] {Text.from_markup(markup).plain}\n")
            self.console.file.flush()

    def close(self) -> None:
        self.progress.stop()
