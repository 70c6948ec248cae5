"""``contsparse compare``: the paper's comparison on your model, in one command.

Runs, in one directory, the dense baseline, CS tickets at several ``mask_init`` values, IMP with
rewinding (every round's ticket), and random pruning at IMP's sparsities, for each seed; each run
is an ordinary run directory, so finished runs are reused and unfinished ones resume. The results
are collected into rows (one per ticket) for the table, CSV and plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contsparse.data import load_dataset
from contsparse.errors import UserError
from contsparse.experiments.config import (
    RunConfig,
    describe_differences,
    load_saved_config,
    settings_differences,
    validate,
)
from contsparse.experiments.rundir import RunDir, require_collection_folder
from contsparse.experiments.runner import Runner

Log = Callable[[str], None]


@dataclass(frozen=True)
class ComparePlan:
    base: RunConfig  # shared settings (model, dataset, schedule of ticket training)
    seeds: tuple[int, ...] = (0,)
    mask_inits: tuple[float, ...] = (-0.03, -0.05, -0.08)
    imp_rounds: int = 20  # LeNet-300-100: 1.2 % of the weights after 20 rounds
    random_every: int = 3  # random pruning at every n-th IMP sparsity
    methods: tuple[str, ...] = ("dense", "cs", "imp", "random")


@dataclass
class Row:
    method: str
    label: str
    seed: int
    weights_remaining: float
    test_accuracy: float
    train_epochs: int  # epochs of training it took to find and train this ticket
    wall_seconds: float
    run_dir: str
    val_accuracy: float | None = None  # what tickets are chosen by: the test set only reports

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_comparison(plan: ComparePlan, out: Path, log: Log, failures: list[str] | None = None) -> list[Row]:
    """Train (or reuse) every run of ``plan`` in ``out``; the rows of the finished ones. With
    ``failures`` given, a run that fails with a user-facing error (a diverged run, a damaged
    folder) is recorded there and the others go on, so that one bad run does not cost the report
    of the rest; if every run fails, the first failure is raised. Before the first run that has
    to train, the dataset is loaded once, so that a missing one stops the comparison at once
    instead of failing every run (finished runs are reused without it). Without ``failures``, the
    first failure stops the comparison."""
    rows: list[Row] = []
    base = dataclasses.replace(plan.base, dense_baseline=False)
    check_plan(plan)
    require_collection_folder(out, "compare.json", "comparison", holds_runs=True)
    # settings a run cannot start with fail before any run starts
    for s0 in plan.mask_inits if "cs" in plan.methods else ():
        validate(dataclasses.replace(base, command="ticket", method="cs", mask_init=s0))
    if "imp" in plan.methods:
        imp_config(base, plan.imp_rounds)
    first_failure: list[UserError] = []
    data_checked: list[bool] = []

    def run(config: RunConfig, path: Path) -> dict[str, Any] | None:
        if not data_checked and not RunDir(path, writable=False).is_finished():
            load_dataset(base.dataset, base.data_dir, base.data_options())
            data_checked.append(True)
        try:
            return Runner(config, path, log).execute()
        except UserError as err:
            if failures is None:
                raise
            first_failure.append(err)
            failures.append(f"{path.name}: {err}")
            log(f"{path.name} failed: {err}; the comparison goes on without it")
            return None

    planned = {seed: _planned_runs(plan, dataclasses.replace(base, seed=seed), out) for seed in plan.seeds}
    for runs in planned.values():  # a folder made with other settings: refused before any run starts
        for _, _, config, path in runs:
            try:
                saved = load_saved_config(path / RunDir.CONFIG) if (path / RunDir.CONFIG).is_file() else None
            except UserError:  # a damaged folder: its run fails and the others go on
                continue
            started = saved is not None and RunDir(path, writable=False).has_started()  # (else simply replaced)
            differing = settings_differences(saved, config) if started else {}
            if differing:
                raise UserError(f"--out {out} holds a comparison made with other settings ({path.name}: "
                                f"{describe_differences(differing)}); "
                                "give another --out, or the settings it was made with")
    for seed, runs in planned.items():
        seeded = dataclasses.replace(base, seed=seed)
        imp_points: list[float] = []
        for method, label, config, path in runs:
            summary = run(config, path)
            if method == "imp" and summary is not None:
                rows += _imp_rows(summary, seed, path)
                imp_points = [r.weights_remaining for r in rows if r.method == "imp" and r.seed == seed][1:]
            elif method == "imp" and "random" in plan.methods and failures is not None:
                failures.append(f"random-*-seed{seed}: not run (it prunes at the sparsities of imp-seed{seed})")
            elif summary is not None:
                rows.append(_single(summary, method, label, seed, path))
        if "random" in plan.methods and imp_points:
            for kept in imp_points[plan.random_every - 1::plan.random_every]:
                path = out / f"random-kept={kept:.4f}-seed{seed}"
                config = dataclasses.replace(seeded, command="ticket", method="random", sparsity=1 - kept, rounds=1,
                                             epochs=seeded.rewind_epoch + 1)
                if (summary := run(config, path)) is not None:
                    rows.append(_single(summary, "random", f"random {100 * kept:.2f} %", seed, path))
    if first_failure and not rows:  # nothing to report: the failure is the answer
        raise first_failure[0]
    return rows


def _planned_runs(plan: ComparePlan, seeded: RunConfig, out: Path) -> list[tuple[str, str, RunConfig, Path]]:
    """(method, label, settings, folder) of the dense, CS and IMP runs of one seed, in the order
    they run (random pruning follows, at the sparsities IMP reaches)."""
    runs = []
    if "dense" in plan.methods:
        runs.append(("dense", "dense", seeded.dense_variant(), out / f"dense-seed{seeded.seed}"))
    for s0 in plan.mask_inits if "cs" in plan.methods else ():
        runs.append(("cs", f"cs s0={s0:g}", dataclasses.replace(seeded, command="ticket", method="cs", mask_init=s0),
                     out / f"cs-s0={s0:g}-seed{seeded.seed}"))
    if "imp" in plan.methods:
        runs.append(("imp", "imp", imp_config(seeded, plan.imp_rounds), out / f"imp-seed{seeded.seed}"))
    return runs


def check_plan(plan: ComparePlan) -> None:
    """Refuse what would silently give fewer or mislabelled rows: a repeated seed or ``s0`` (one run
    counted twice), random pruning without the IMP runs whose sparsities it takes, or taking every
    n-th of fewer IMP rounds than n."""
    for name, values in (("seed", plan.seeds), ("--mask-inits value", plan.mask_inits)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"the comparison lists the {name} {', '.join(f'{v:g}' for v in repeated)} twice")
    if "random" in plan.methods and "imp" not in plan.methods:
        raise UserError("--methods random prunes at the sparsities of IMP's rounds: add imp to --methods")
    if "random" in plan.methods and plan.random_every > plan.imp_rounds:
        raise UserError(f"--random-every {plan.random_every} takes every {plan.random_every}th of "
                        f"{plan.imp_rounds} IMP rounds: none; give a smaller --random-every or more --imp-rounds")


def imp_config(base: RunConfig, rounds: int) -> RunConfig:
    """IMP with rewinding as compared: each round trains for the ticket's epochs."""
    config = dataclasses.replace(base, command="ticket", method="imp", rounds=rounds, epochs=base.phase_epochs)
    if not 0 <= config.rewind_epoch < config.epochs:
        raise UserError(f"the comparison's IMP runs train each round for --ticket-epochs ({config.epochs}) epochs "
                        f"and rewind to epoch {config.rewind_epoch} (--rewind-epoch): give --rewind-epoch below "
                        "--ticket-epochs")
    validate(config)
    return config


def _single(summary: dict[str, Any], method: str, label: str, seed: int, path: Path) -> Row:
    return Row(method, label, seed, summary["weights_remaining"], summary["test_accuracy"],
               summary["train_epochs"], summary["wall_seconds"], str(path), summary.get("val_accuracy"))


def _imp_rows(summary: dict[str, Any], seed: int, path: Path) -> list[Row]:
    """One row per IMP round (each round trained a ticket), then the final ticket."""
    metrics = path / RunDir.METRICS
    try:
        seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
        rows = [Row("imp", f"imp round {p['round']}" + (" (dense)" if p["weights_remaining"] == 1 else ""), seed,
                    p["weights_remaining"], p["test_accuracy"],
                    p["train_epochs"], seconds[p["train_epochs"] - 1], str(path), p.get("val_accuracy"))
                for p in summary.get("round_tickets", [])]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:  # ValueError: a torn JSON line
        raise UserError(f"{metrics} is damaged or incomplete ({type(err).__name__}: {err}): it times IMP's "
                        f"rounds; run the comparison again with that run directory removed") from None
    rows.append(Row("imp", "imp final", seed, summary["weights_remaining"], summary["test_accuracy"],
                    summary["train_epochs"], summary["wall_seconds"], str(path), summary.get("val_accuracy")))
    return rows


def aggregate(rows: list[Row]) -> list[dict[str, Any]]:
    """Mean and spread over seeds of each (method, label)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.label), []).append(row)
    out = []
    for (method, label), members in groups.items():
        accuracy = [r.test_accuracy for r in members]
        validation = [r.val_accuracy for r in members]
        out.append({"method": method, "label": label, "seeds": len(members),
                    "weights_remaining": statistics.fmean(r.weights_remaining for r in members),
                    "val_accuracy": None if None in validation else statistics.fmean(validation),
                    "test_accuracy": statistics.fmean(accuracy),
                    "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                    "train_epochs": statistics.fmean(r.train_epochs for r in members),
                    "wall_seconds": statistics.fmean(r.wall_seconds for r in members)})
    return sorted(out, key=lambda r: (r["method"], -r["weights_remaining"]))


def near_dense(ticket: dict[str, Any], dense_val_accuracy: float, tolerance: float = 0.003) -> bool:
    """Whether ``ticket`` (a row or a group) is a sparse network (not 100 % of the weights, as IMP's
    round 0) whose finite *validation* accuracy is within ``tolerance`` of dense's."""
    val = ticket.get("val_accuracy")
    return ticket["weights_remaining"] < 1.0 and val is not None and math.isfinite(val) \
        and val >= dense_val_accuracy - tolerance


def sparsest_within(groups: list[dict[str, Any]], dense_val_accuracy: float, tolerance: float = 0.003
                    ) -> dict[str, dict[str, Any]]:
    """Per method: the ticket with the fewest weights whose *validation* accuracy is >= dense's -
    tolerance. Chosen on the validation set, so that its test accuracy stays an unbiased report
    (groups without a validation accuracy, from older comparisons, or with a NaN one are not chosen).
    A network with all its weights (IMP's round 0) is no ticket."""
    best: dict[str, dict[str, Any]] = {}
    if not math.isfinite(dense_val_accuracy):  # a diverged or unevaluated dense run sets no bar
        return best
    for group in groups:
        if group["method"] == "dense" or not near_dense(group, dense_val_accuracy, tolerance):
            continue
        current = best.get(group["method"])
        if current is None or group["weights_remaining"] < current["weights_remaining"]:
            best[group["method"]] = group
    return best
