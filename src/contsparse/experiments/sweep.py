"""``contsparse sweep``: many independent runs of one model, in parallel.

CS cannot aim at an exact sparsity; a sweep over ``mask_init`` (and ``penalty``, seeds, ...) gives
the sparsity-accuracy curve instead, and since every point is an independent run the curve costs
the wall time of one run given enough workers (IMP's rounds are sequential). Each point is an
ordinary run directory, so a finished point is skipped and an unfinished one resumes when the
sweep is run again; a failing point is reported and the others go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contsparse.errors import UserError
from contsparse.experiments.config import (
    FIELDS,
    RunConfig,
    load_saved_config,
    make_config,
    older_run_hint,
    settings_differences,
    validate,
    with_later_defaults,
)
from contsparse.experiments.executors import Executor, PointJob, PointOutcome
from contsparse.experiments.lock import RunLock
from contsparse.experiments.rundir import RunDir, require_collection_folder
from contsparse.experiments.runner import Runner, plan_phases
from contsparse.storage import write_atomic

PLAN_FILE = "sweep.yaml"
SWEEP_LOCK = ".sweep.lock"  # the driver's, beside the points' run directories
DEFAULT_GRID: dict[str, list[Any]] = {"mask_init": [-0.02, -0.03, -0.05, -0.08]}


@dataclass(frozen=True)
class SweepPoint:
    name: str  # also the point's run directory inside the sweep directory
    values: dict[str, Any]  # the swept hyper-parameters of this point
    config: RunConfig
    reference: bool = False  # the dense reference the sparse points are read against

    def total_epochs(self) -> int:
        """Epochs the point trains, its dense baseline included (for progress)."""
        epochs = sum(p.epochs for p in plan_phases(self.config))
        if self.config.command == "ticket" and self.config.dense_baseline:
            epochs += self.config.phase_epochs
        return epochs


@dataclass
class SweepPlan:
    """A base configuration, a grid (cartesian product) and/or a list of points, and seeds.

    ``dense_reference`` adds one dense training per seed (the ticket training's settings): the
    accuracy the curve is read against. ``same_budget``: a pruning sweep's reference trains as
    long as its points do in all (plans saved before that: ``--ticket-epochs``, as they did).
    """

    base: RunConfig
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    seeds: int = 1
    dense_reference: bool = True
    same_budget: bool = True

    def combinations(self) -> list[dict[str, Any]]:
        """Each point's swept values: the listed points times the grid, seeds included."""
        grid = dict(self.grid)
        seeds_given = "seed" in grid or any("seed" in p for p in self.points)
        if seeds_given and self.seeds > 1:
            raise UserError("seeds are given twice: by --seeds and in --grid/--point; use one of them")
        if not seeds_given:
            grid["seed"] = list(range(self.base.seed, self.base.seed + self.seeds))
        for point in self.points:
            both = sorted(set(point) & set(grid))
            if both:  # the grid's values would silently replace the point's
                raise UserError(f"{', '.join(both)} is given both by --point and by --grid (or --seeds); "
                                "give each setting one way")
        listed = self.points or [{}]
        combos = [{**point, **dict(zip(grid, values, strict=True))}
                  for point in listed for values in itertools.product(*grid.values())]
        for combo in combos:  # "01" and "1" are one seed (and a name must not depend on the spelling)
            if "seed" in combo:
                combo["seed"] = _seed(combo["seed"])
        return combos

    def expand(self) -> list[SweepPoint]:
        combos = self.combinations()
        out: dict[str, SweepPoint] = {}
        if self.dense_reference and self.base.command != "train":
            seeds = sorted({c.get("seed", self.base.seed) for c in combos})
            for seed in seeds:
                config = dataclasses.replace(self.base, seed=int(seed)).dense_variant(self.same_budget)
                validate(config)  # the base is checked only through the points (make_config(check=False))
                name = f"dense_seed={seed}"
                out[name] = SweepPoint(name, {"seed": int(seed)}, config, reference=True)
        listed: set[str] = set()
        for combo in combos:
            config = _configure(self.base, combo)
            values = {key: getattr(config, key) for key in combo}
            name = point_name(values)
            if name in out or _point_key(values) in listed:  # the same values in another order too
                raise UserError(f"the sweep lists the point {name} twice")
            listed.add(_point_key(values))
            if len(name.encode()) > MAX_NAME_BYTES:
                raise UserError(f"the point {name[:60]}... names a folder of {len(name.encode())} bytes (at most "
                                f"{MAX_NAME_BYTES}): sweep over shorter values, or run such settings as a sweep "
                                "of their own with them as flags")
            out[name] = SweepPoint(name, values, config)
        return list(out.values())

    def extended_by(self, later: SweepPlan) -> SweepPlan:
        """This plan with ``later``'s points added (same base settings): a sweep run again into its
        folder with new grid values keeps its earlier points in its tables and plots."""
        combos = self.combinations()
        # the same values are the same point, whatever order the flags gave them in (its folder
        # keeps the name the first sweep gave it)
        known = {_point_key(_swept_values(self.base, c)) for c in combos}
        new = [c for c in later.combinations() if _point_key(_swept_values(later.base, c)) not in known]
        dense_reference = self.dense_reference or later.dense_reference
        if not new:  # run again as it was (to resume, say): the plan keeps its form
            return SweepPlan(later.base, self.grid, self.points, self.seeds, dense_reference, self.same_budget)
        return SweepPlan(later.base, {}, combos + new, 1, dense_reference, self.same_budget)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "grid": self.grid, "points": self.points,
                "seeds": self.seeds, "dense_reference": self.dense_reference,
                "dense_reference_budget": "same" if self.same_budget else "ticket"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepPlan:
        """A saved plan, checked: a hand-edited ``sweep.yaml`` gets a one-line error, not a traceback."""
        if not isinstance(data.get("base"), dict):
            raise ValueError("base is not a mapping of settings")
        grid, points, seeds = data.get("grid") or {}, data.get("points") or [], data.get("seeds", 1)
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ValueError("grid is not a mapping of settings to lists of values")
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise ValueError("points is not a list of mappings")
        if type(seeds) is not int or seeds < 1:
            raise ValueError(f"seeds is {seeds!r}, not a positive integer")
        # a plan saved before a setting existed: its points were made with the setting's old value
        return cls(make_config(with_later_defaults(data["base"]), check=False), {str(k): v for k, v in grid.items()},
                   [{str(k): v for k, v in p.items()} for p in points], seeds,
                   bool(data.get("dense_reference", True)), data.get("dense_reference_budget") == "same")


def default_grid(base: RunConfig) -> dict[str, list[Any]]:
    """What ``contsparse sweep`` sweeps when no grid or point is given: ``s0`` for CS, whose
    sparsity it sets; nothing for other methods (their points differ by seed only)."""
    return dict(DEFAULT_GRID) if base.command != "train" and base.method == "cs" else {}


MAX_NAME_BYTES = 200  # a point's folder name; file systems stop at 255


def _seed(value: Any) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"seed {value!r} is not an integer") from None


def _point_key(values: dict[str, Any]) -> str:
    """A point's values in a canonical order: what makes two points the same run."""
    return point_name(dict(sorted(values.items())))


def _swept_values(base: RunConfig, combo: dict[str, Any]) -> dict[str, Any]:
    config = _configure(base, combo)
    return {key: getattr(config, key) for key in combo}


def _configure(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"cannot sweep over {', '.join(unknown)}: not a setting; settings are "
                        f"{', '.join(sorted(FIELDS))}")
    if {"weights_from", "weights_sha256"} & set(values):
        raise UserError("a sweep's points start from the same weights: give --weights-from to the whole sweep "
                        "(one sweep per weights file)")
    # A point is one run: the dense reference is a point of its own, not a baseline per point.
    return make_config({**base.to_dict(), "dense_baseline": False, **values})


def point_name(values: dict[str, Any]) -> str:
    """``mask_init=-0.05_seed=0``: readable, stable, one directory level."""
    def text(value: Any) -> str:
        if isinstance(value, float):
            return repr(value)  # the shortest text that reads back as this float: no two values collide
        if isinstance(value, list | tuple):
            return ",".join(text(v) for v in value)
        return str(value).replace(os.sep, "-")
    return "_".join(f"{key}={text(value)}" for key, value in values.items())


def parse_assignments(items: list[str], flag: str) -> dict[str, list[str]]:
    """``["mask_init=-0.02,-0.05", "seed=0,1"]`` -> ``{"mask_init": ["-0.02", "-0.05"], ...}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE[,VALUE...], e.g. {flag} mask_init=-0.02,-0.05")
        if key in out:
            raise UserError(f"{flag}: {key} given twice")
        out[key] = parts
    return out


def parse_point(item: str) -> dict[str, str]:
    """``"mask_init=-0.05,penalty=1e-8"`` -> one explicit point."""
    values = {}
    for part in item.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--point {item!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. --point mask_init=-0.05")
        key = key.strip().replace("-", "_")
        if key in values:
            raise UserError(f"--point {item!r}: {key} given twice")
        values[key] = value.strip()
    return values


@dataclass
class PointResult:
    name: str
    values: dict[str, Any]
    command: str
    status: str  # done | failed | interrupted | pending | damaged (a finished run whose summary cannot be read)
    run_dir: str
    weights_remaining: float | None = None
    test_accuracy: float | None = None
    train_epochs: int | None = None
    wall_seconds: float | None = None
    finished_after_s: float | None = None  # since this invocation's start; None if done before
    threads: int | None = None
    message: str = ""
    val_accuracy: float | None = None  # what the Pareto front is chosen on: the test set only reports
    reference: bool = False  # a dense run the sparse points are read against (not a point of a dense sweep)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def selection_accuracy(self) -> float | None:
        """Validation accuracy, which picks points (test accuracy for runs saved without it)."""
        return self.test_accuracy if self.val_accuracy is None else self.val_accuracy


class SweepDisplay:
    """What the driver reports to; the CLI's is a live progress display, tests use this one."""

    def start(self, points: list[SweepPoint], finished: int) -> None: ...
    def running(self, point: SweepPoint, epochs_done: int) -> None: ...
    def finished(self, point: SweepPoint, result: PointResult) -> None: ...
    def close(self) -> None: ...


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep; ``results`` as far as they got (running points asked to
    checkpoint and stop)."""

    def __init__(self, results: list[PointResult]) -> None:
        super().__init__()
        self.results = results


def run_sweep(plan: SweepPlan, out: Path, executor: Executor, display: SweepDisplay | None = None,
              poll_seconds: float = 0.5, force: bool = False) -> list[PointResult]:
    """Run every unfinished point of ``plan`` in ``out`` on ``executor``; results in plan order.

    ``force``: unfinished points resume even if their saved settings differ (as ``--force``).

    ``KeyboardInterrupt`` asks the running points to checkpoint and stop, waits for them, and
    raises :class:`SweepInterrupted` with the results so far; a later call continues.
    """
    display = display or SweepDisplay()
    out = Path(out).absolute()  # workers (a Ray node, say) may start in another directory
    check_sweep_folder(plan, out)
    plan.expand()  # a bad grid or point is refused before the folder is made
    _make_folder(out)
    # One driver per sweep folder: a second would rewrite the plan and tables, and report the
    # first one's running points as failed ("in use")
    with RunLock(out, SWEEP_LOCK, "sweep directory", "wait for that sweep to finish or stop it"):
        return _run_locked(plan, out, executor, display, poll_seconds, force)


def _run_locked(plan: SweepPlan, out: Path, executor: Executor, display: SweepDisplay, poll_seconds: float,
                force: bool) -> list[PointResult]:
    check_sweep_folder(plan, out)  # again under the lock: another sweep may have written its plan meanwhile
    if is_sweep(out):
        plan = load_plan(out).extended_by(plan)
    points = plan.expand()
    for point in points:  # a point its runner would refuse stops the sweep before it writes anything
        if (out / point.name).is_dir():
            Runner(point.config, out / point.name, lambda _: None, force=force, sweep_point=True).check_settings()
    _write_plan(plan, out)
    results = {p.name: _result_from_disk(p, out) for p in points}
    _keep_earlier_threads(results, out)
    by_name = {p.name: p for p in points}
    todo = [p for p in points if results[p.name].status != "done"]
    display.start(points, len(points) - len(todo))
    start = time.monotonic()
    running: dict[str, SweepPoint] = {}
    try:
        while todo or running:
            while todo and len(running) < executor.capacity:
                point = todo.pop(0)
                executor.start(PointJob(point.name, str(out / point.name), point.config.to_dict(),
                                        str(out / "logs" / f"{point.name}.log"), str(out), force=force))
                running[point.name] = point
            ended = executor.wait(poll_seconds)
            for outcome in ended:  # all recorded before any is shown: a Ctrl-C while showing loses none
                results[outcome.name] = _result(running.pop(outcome.name), out, outcome, time.monotonic() - start)
            for outcome in ended:
                display.finished(by_name[outcome.name], results[outcome.name])
            for point in running.values():
                display.running(point, epochs_done(out / point.name))
    except KeyboardInterrupt:
        for outcome in executor.interrupt():
            point = running.pop(outcome.name)
            results[point.name] = _result(point, out, outcome, time.monotonic() - start)
        raise SweepInterrupted([results[p.name] for p in points]) from None
    finally:
        display.close()
        try:
            executor.close()
        except KeyboardInterrupt:  # while Ray shuts down (seconds): every result is in, the tables still get written
            raise SweepInterrupted([results[p.name] for p in points]) from None
    return [results[p.name] for p in points]


def check_sweep_folder(plan: SweepPlan, out: Path) -> None:
    """Refuse an ``--out`` that is not this sweep's folder: a run directory, a folder of other
    files, or a sweep of another command or method (its plan would be overwritten)."""
    require_collection_folder(out, PLAN_FILE, "sweep")
    if is_sweep(out):
        earlier = load_plan(out).base
        if (earlier.command, earlier.method) != (plan.base.command, plan.base.method):
            raise UserError(f"--out {out} holds a sweep of {earlier.command} --method {earlier.method}; give another "
                            "--out for this one")
        changed = settings_differences(earlier.to_dict(), plan.base)
        if changed:  # one folder, one base: its points' settings would no longer say what they are
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:4])
            raise UserError(f"--out {out} holds a sweep with other shared settings ({listed}): run it again with "
                            "the same settings to add points, or give another --out" + older_run_hint(changed))


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write the sweep into {out}: {err.strerror or err}") from err


def _write_plan(plan: SweepPlan, out: Path) -> None:
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        write_atomic(out / PLAN_FILE, yaml.safe_dump(plan.to_dict(), sort_keys=False).encode())
    except OSError as err:
        raise UserError(f"cannot write the sweep into {out}: {err.strerror or err}") from err


def load_plan(directory: Path) -> SweepPlan:
    path = directory / PLAN_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} is not a sweep directory (no {PLAN_FILE})") from None
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "base" not in data:
        raise UserError(f"{path} is not a sweep plan")
    try:
        return SweepPlan.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path} is damaged: {err}") from None


def is_sweep(directory: Path) -> bool:
    return (directory / PLAN_FILE).is_file()


def collect(directory: Path) -> tuple[SweepPlan, list[PointResult]]:
    """A sweep directory's plan and the results on disk (for ``contsparse report``). What only the
    last ``sweep`` invocation knew (a point's failure and its message, threads, finishing time)
    is taken from its ``sweep.json`` where the run directories cannot say otherwise."""
    plan = load_plan(directory)
    results = [_result_from_disk(p, directory) for p in plan.expand()]
    earlier = _earlier_rows(directory / "sweep.json")
    for result in results:
        row = earlier.get(result.name, {})
        if result.status == "pending" and row.get("status") in ("failed", "interrupted"):
            result.status, result.message = row["status"], str(row.get("message") or "")
        if result.status == "done" and row.get("status") == "done":
            result.threads, result.finished_after_s = row.get("threads"), row.get("finished_after_s")
    return plan, results


def _keep_earlier_threads(results: dict[str, PointResult], directory: Path) -> None:
    """Points finished by an earlier invocation keep the torch threads they ran with (its
    ``sweep.json`` knows them; the run directories do not). Their finishing time is not kept: it
    counted from that invocation's start."""
    earlier = _earlier_rows(directory / "sweep.json")
    for name, result in results.items():
        row = earlier.get(name, {})
        if result.status == "done" and row.get("status") == "done" and isinstance(row.get("threads"), int):
            result.threads = row["threads"]


def _earlier_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The points of a sweep's ``sweep.json`` by name; none if it is missing or unreadable (it is
    only a report, written again from the run directories)."""
    try:
        rows = json.loads(path.read_text())["points"]
        return {row["point"]: row for row in rows if isinstance(row, dict) and isinstance(row.get("point"), str)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def epochs_done(run_path: Path) -> int:
    """Epochs a (possibly running) point has recorded, its dense baseline's included."""
    total = 0
    for metrics in (run_path / RunDir.METRICS, run_path / "dense" / RunDir.METRICS):
        try:
            with open(metrics, "rb") as handle:
                total += sum(1 for _ in handle)
        except OSError:
            pass
    return total


def _differs(run: RunDir, point: SweepPoint) -> bool:
    """Whether the point's saved settings differ from the plan's. A damaged config.yaml differs: the
    point counts as not finished (a report lists it as pending; running the sweep refuses it)."""
    try:
        return bool(settings_differences(load_saved_config(run.file(RunDir.CONFIG)), point.config))
    except UserError:
        return True


def _result_from_disk(point: SweepPoint, out: Path) -> PointResult:
    run = RunDir(out / point.name, writable=False)
    # A finished point counts only with this plan's settings; else the runner says what differs.
    if run.is_finished() and not _differs(run, point):
        try:
            return _from_summary(point, out, run.read_summary(), "done", None)
        except UserError as err:  # one damaged summary: that point is named, the others are reported
            return PointResult(point.name, point.values, point.config.command, "damaged", str(out / point.name),
                               message=str(err), reference=point.reference)
    return PointResult(point.name, point.values, point.config.command, "pending", str(out / point.name),
                       reference=point.reference)


def _result(point: SweepPoint, out: Path, outcome: PointOutcome, after: float) -> PointResult:
    if outcome.status == "done" and outcome.summary is not None:
        result = _from_summary(point, out, outcome.summary, "done", round(after, 2))
    else:
        result = PointResult(point.name, point.values, point.config.command, outcome.status, str(out / point.name),
                             message=outcome.message, reference=point.reference)
    result.threads = outcome.threads
    return result


def _from_summary(point: SweepPoint, out: Path, summary: dict[str, Any], status: str,
                  after: float | None) -> PointResult:
    return PointResult(point.name, point.values, point.config.command, status, str(out / point.name),
                       summary["weights_remaining"], summary["test_accuracy"], summary["train_epochs"],
                       summary["wall_seconds"], after, val_accuracy=summary.get("val_accuracy"),
                       reference=point.reference)


def pareto_front(results: list[PointResult]) -> list[PointResult]:
    """Finished sparse points not beaten by another on both axes (fewer weights and higher
    validation accuracy), sorted by weights remaining. Chosen on validation, so that the test
    accuracy reported for them is not the figure they were picked by."""
    done = [r for r in results if r.status == "done" and r.command != "train"
            and r.weights_remaining is not None and r.selection_accuracy is not None
            and math.isfinite(r.selection_accuracy)]
    front: list[PointResult] = []
    for r in sorted(done, key=lambda r: (r.weights_remaining, -r.selection_accuracy)):
        tied = front and (r.weights_remaining, r.selection_accuracy) == (
            front[-1].weights_remaining, front[-1].selection_accuracy)  # neither beats the other
        if not front or r.selection_accuracy > front[-1].selection_accuracy or tied:
            front.append(r)
    return front
