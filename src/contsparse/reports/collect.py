"""``contsparse report DIR...``: results of runs, sweeps and comparisons, from what is on disk."""

from __future__ import annotations

import csv
from pathlib import Path

from contsparse.errors import UserError
from contsparse.experiments.rundir import REPORT_FOLDER, RunDir, collection_kind, folder_owning
from contsparse.experiments.sweep import PointResult, collect, is_sweep
from contsparse.reports.sweep import sweep_title, write_report, write_sweep


def is_comparison(directory: Path) -> bool:
    return (directory / "compare.csv").is_file()


def load_results(directory: Path) -> list[PointResult]:
    """The points of a sweep, the tickets of a comparison, or a single finished run."""
    if is_sweep(directory):
        return collect(directory)[1]
    if is_comparison(directory):
        return _comparison(directory / "compare.csv")
    run = RunDir(directory, writable=False)
    if run.file(RunDir.CONFIG).is_file() or run.is_finished():
        s = run.read_summary()  # a one-line error if it has not finished
        values = {"method": s["method"]} if s["command"] != "train" else {}
        results = [PointResult(directory.name, values, s["command"], "done", str(directory), s["weights_remaining"],
                               s["test_accuracy"], s.get("train_epochs"), s.get("wall_seconds"),
                               val_accuracy=s.get("val_accuracy"), reference=s["command"] == "train")]
        for ticket in s.get("round_tickets") or []:  # IMP: one run, the ticket of every round
            if isinstance(ticket, dict) and isinstance(ticket.get("weights_remaining"), int | float):
                results.append(PointResult(f"{directory.name} round {ticket.get('round', '?')}",
                                           {**values, "round": ticket.get("round")}, s["command"], "done",
                                           str(directory), ticket["weights_remaining"], ticket.get("test_accuracy"),
                                           ticket.get("train_epochs"), val_accuracy=ticket.get("val_accuracy")))
        if s["command"] != "train" and isinstance(s.get("dense_test_accuracy"), int | float):  # its own baseline
            results.append(PointResult("dense", {"method": "dense"}, "train", "done", str(directory / "dense"), 1.0,
                                       s["dense_test_accuracy"], s.get("dense_train_epochs"),
                                       s.get("dense_wall_seconds"), val_accuracy=s.get("dense_val_accuracy"),
                                       reference=True))
        return results
    raise UserError(f"{directory} is not a run, sweep or comparison directory")


def _comparison(path: Path) -> list[PointResult]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [PointResult(f"{r['label']} seed {r['seed']}", {"method": r["method"], "seed": int(r["seed"])},
                            "train" if r["method"] == "dense" else "ticket", "done", r["run_dir"],
                            float(r["weights_remaining"]), float(r["test_accuracy"]), int(r["train_epochs"]),
                            float(r["wall_seconds"]), val_accuracy=_optional_float(r.get("val_accuracy")),
                            reference=r["method"] == "dense")
                for r in rows]
    except KeyError as err:
        raise UserError(f"cannot read the comparison {path}: it has no column {err}") from None
    except (OSError, ValueError, TypeError) as err:  # TypeError: a short row's missing cells
        raise UserError(f"cannot read the comparison {path}: {err}") from None


def _optional_float(text: str | None) -> float | None:
    """A CSV cell that may be empty (comparisons saved before validation accuracy was kept)."""
    return float(text) if text else None


def _series(label: str, directory: Path) -> dict[str, list[PointResult]]:
    """A directory's results as plot series: a comparison's one per method, each with the dense
    runs, the reference of them all; anything else one."""
    results = load_results(directory)
    if not is_comparison(directory):
        return {label: results}
    dense = [r for r in results if r.reference]
    methods = list(dict.fromkeys(r.values["method"] for r in results if not r.reference))
    return {f"{label}: {method}": [*dense, *(r for r in results if r.values["method"] == method and not r.reference)]
            for method in methods} or {label: results}


def report_directories(directories: list[Path], out: Path | None) -> list[Path]:
    """One sweep: its files again, in place (or in ``out``). Several directories, or a comparison:
    ``report.md``, ``report.csv`` and one plot in ``out`` (default ``./report``, or the
    comparison's ``report/`` folder)."""
    try:
        if len(directories) == 1 and is_sweep(directories[0]):
            if out is not None:  # (without one, the sweep's own tables are written again)
                require_report_folder(out, SWEEP_FILES, reported=directories[0])
            plan, results = collect(directories[0])
            target = out or directories[0]
            target.mkdir(parents=True, exist_ok=True)
            return write_sweep(results, target, sweep_title(plan.base))
        target = out or (directories[0] / REPORT_FOLDER if len(directories) == 1 and is_comparison(directories[0])
                         else Path(REPORT_FOLDER))
        require_report_folder(target, REPORT_FILES)
        series: dict[str, list[PointResult]] = {}
        for directory in directories:
            label = directory.name or str(directory)
            while any(name == label or name.startswith(f"{label}: ") for name in series):
                label += "'"
            series.update(_series(label, directory))
        if len(directories) == 1 and is_comparison(directories[0]):  # beside its own files, as a run's report is
            return write_report(series, target, f"comparison {directories[0].name}")
        return write_report(series, target, f"{len(directories)} directories")
    except OSError as err:
        raise UserError(f"cannot write the report: {err.strerror or err}") from err


SWEEP_FILES = ("sweep.md", "sweep.csv", "sweep.json", "sweep.png")  # what write_sweep writes
REPORT_FILES = ("report.md", "report.csv", "accuracy_vs_weights.png")  # what write_report writes
RUN_REPORT_FILES = ("per_layer.png", "first_layer_mask.png")  # what a single run's report writes


def require_report_folder(out: Path, names: tuple[str, ...], reported: Path | None = None) -> None:
    """Refuse a report folder that is a run directory, or where the report's files (``names``)
    would overwrite a run's, sweep's or comparison's own (but those of ``reported``, the sweep
    whose tables the report writes again): its records, such as a failed point's reason, would
    be lost for good."""
    if (out / RunDir.CONFIG).is_file():  # its files are a run's own; a report would mix in
        raise UserError(f"--out {out} is a run directory: give the report a folder of its own")
    kind = collection_kind(out)
    if kind is not None and (reported is None or out.resolve() != reported.resolve()):
        raise UserError(f"--out {out} is a {kind} folder: give the report a folder of its own")
    for name in names:
        owner = folder_owning(out / name, "--out")
        if owner is None or (reported is not None and owner.resolve() == reported.resolve()):
            continue
        kind = collection_kind(owner)
        if kind is not None and owner.resolve() != out.resolve():  # a folder in it is (or may become) a run of it
            raise UserError(f"--out {out} is inside the {kind} {owner}, whose folders are its runs: give the report "
                            f"a folder outside it, or {owner / REPORT_FOLDER}")
        raise UserError(f"--out {out}: {name} would overwrite one of the files of the run, sweep or comparison "
                        f"{owner}: give the report a folder of its own")
