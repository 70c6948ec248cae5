"""Parallel ticket search on LeNet-300-100/MNIST: a CS sweep on 2 workers vs 1, and CS's curve vs IMP's.

1. The same 4-point CS sweep (``mask_init`` values, default settings) with 1 worker (all cores as
   torch threads) and with 2 workers (one thread each), one after the other in this run.
2. A dense run and an IMP run (rewinding, one ticket per round, the same epochs per ticket as CS)
   for the reference accuracy and IMP's curve.
3. The wall time each method needs to reach the sparsest level both reach at dense accuracy
   minus 0.3 points: for CS the moment the 2-worker sweep finished a point at that level, for IMP
   the end of the round whose ticket first reaches it. Tickets count by their validation accuracy
   (against the dense run's); their test accuracy is reported, never used to choose.

    python benchmarks/parallel_search.py   # writes benchmarks/results/parallel_search.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_results

from contsparse.experiments import make_config
from contsparse.experiments.compare import ComparePlan, run_comparison
from contsparse.experiments.executors import LocalPool, available_cores
from contsparse.experiments.sweep import SweepPlan, run_sweep
from contsparse.reports.progress import SweepProgress
from contsparse.reports.sweep import write_sweep

TOLERANCE = 0.003


def timed_sweep(plan: SweepPlan, out: Path, workers: int):
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results = run_sweep(plan, out, LocalPool(workers), SweepProgress())
    seconds = time.perf_counter() - start
    failed = [r.name for r in results if r.status != "done"]
    if failed:
        raise SystemExit(f"sweep points failed: {failed}")
    return results, seconds


def first_reaching(points: list[tuple[float, float, float]], level: float, floor: float) -> float | None:
    """Earliest time among (time, weights, accuracy) points at <= level weights and >= floor accuracy."""
    times = [t for t, kept, accuracy in points if kept <= level + 1e-12 and accuracy >= floor]
    return min(times) if times else None


def sparsest(tickets: list, floor: float) -> tuple[float | None, float | None]:
    """Weights remaining and test accuracy of the sparsest ticket at >= ``floor`` validation accuracy."""
    chosen = min((t for t in tickets if t.val_accuracy >= floor), key=lambda t: t.weights_remaining, default=None)
    return (None, None) if chosen is None else (chosen.weights_remaining, chosen.test_accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/parallel-search"))
    parser.add_argument("--mask-inits", type=float, nargs="+", default=[-0.02, -0.03, -0.05, -0.08])
    parser.add_argument("--imp-rounds", type=int, default=18)
    parser.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON results")
    args = parser.parse_args()
    if args.render:
        payload = json.loads((RESULTS / "parallel_search.json").read_text())
        (RESULTS / "parallel_search.md").write_text(render(payload))
        return
    base = make_config({})  # the defaults of `contsparse ticket`
    plan = SweepPlan(base, {"mask_init": [str(v) for v in args.mask_inits]}, dense_reference=False)
    cores = available_cores()

    one, one_s = timed_sweep(plan, args.out / "workers1", 1)
    two, two_s = timed_sweep(plan, args.out / "workers2", 2)
    title = f"CS sweep on lenet300 / mnist ({len(two)} points, 2 workers)"
    write_sweep(two, args.out / "workers2", title)
    shutil.copy(args.out / "workers2" / "sweep.png", RESULTS / "parallel_search_sweep.png")

    tick = time.perf_counter()
    reference = run_comparison(ComparePlan(dataclasses.replace(base, dense_baseline=False), (0,), (), args.imp_rounds,
                                           methods=("dense", "imp")), args.out / "imp", print)
    imp_wall = time.perf_counter() - tick
    dense = next(r for r in reference if r.method == "dense")
    floor = dense.val_accuracy - TOLERANCE  # chosen on validation: the test set only reports
    imp_points = [(r.wall_seconds, r.weights_remaining, r.val_accuracy) for r in reference if r.method == "imp"]
    cs_points = [(r.finished_after_s, r.weights_remaining, r.val_accuracy) for r in two]
    cs_best, cs_best_test = sparsest(two, floor)
    imp_best, imp_best_test = sparsest([r for r in reference if r.method == "imp"], floor)
    level = max(v for v in (cs_best, imp_best) if v is not None) if cs_best or imp_best else None
    cs_time = first_reaching(cs_points, level, floor) if level else None
    imp_time = first_reaching(imp_points, level, floor) if level else None

    command = " ".join(["python benchmarks/parallel_search.py", *sys.argv[1:]])
    payload = {
        "machine": machine(), "command": command, "cores": cores, "mask_inits": args.mask_inits,
        "imp_rounds": args.imp_rounds, "ticket_epochs": base.phase_epochs, "rewind_epoch": base.rewind_epoch,
        "one_worker_s": one_s, "two_workers_s": two_s, "ratio": two_s / one_s,
        "points_one": [r.as_dict() for r in one], "points_two": [r.as_dict() for r in two],
        "dense_accuracy": dense.test_accuracy, "dense_val_accuracy": dense.val_accuracy,
        "imp": [r.as_dict() for r in reference], "imp_wall_s": imp_wall,
        "cs_best": cs_best, "imp_best": imp_best, "cs_best_test": cs_best_test, "imp_best_test": imp_best_test,
        "level": level, "cs_time_s": cs_time, "imp_time_s": imp_time}
    write_results("parallel_search", payload, render(payload))


def render(r: dict) -> str:
    """The Markdown report of a results payload (``--render`` re-reads it from the JSON)."""
    one, two, cores = r["points_one"], r["points_two"], r["cores"]
    floor = r["dense_val_accuracy"] - TOLERANCE
    lines = ["# Parallel ticket search: LeNet-300-100 / MNIST", "",
             f"Command: `{r['command']}`; {cores} cores; everything measured one after the other in one run.", "",
             f"## {len(two)}-point CS sweep (`mask_init` = {', '.join(f'{v:g}' for v in r['mask_inits'])}, "
             "default ticket settings)", "",
             "| workers | torch threads each | wall time | points / hour |", "|---|---|---|---|",
             f"| 1 | {cores} | {r['one_worker_s']:.0f} s | {3600 * len(one) / r['one_worker_s']:.1f} |",
             f"| 2 | {max(1, cores // 2)} | {r['two_workers_s']:.0f} s | {3600 * len(two) / r['two_workers_s']:.1f} |",
             "", f"**2 workers / 1 worker wall time: {r['ratio']:.3f}x** (target <= 0.65x).", "",
             "The points' results differ slightly between the two sweeps: the number of torch threads changes "
             "the order of floating-point sums (each sweep is deterministic for its thread count).", "",
             "| point | weights remaining (1 worker) | test accuracy (1 worker) | weights remaining (2 workers) "
             "| val. accuracy (2 workers) | test accuracy (2 workers) | finished after (2 workers) |",
             "|---|---|---|---|---|---|---|"]
    for a, b in zip(one, two, strict=True):
        lines.append(f"| {a['name']} | {100 * a['weights_remaining']:.2f} % | {100 * a['test_accuracy']:.2f} % "
                     f"| {100 * b['weights_remaining']:.2f} % | {100 * b['val_accuracy']:.2f} % "
                     f"| {100 * b['test_accuracy']:.2f} % | {b['finished_after_s']:.0f} s |")
    imp_rows = [x for x in r["imp"] if x["method"] == "imp"]
    lines += ["", "## CS's curve vs IMP's curve", "",
              f"Dense accuracy {100 * r['dense_val_accuracy']:.2f} % on validation, {100 * r['dense_accuracy']:.2f} % "
              f"on test; a ticket counts at >= {100 * floor:.2f} % validation accuracy (dense - 0.3 points: "
              f"chosen on validation, reported on test). IMP: {r['imp_rounds']} rounds of {r['ticket_epochs']} "
              f"epochs with rewinding to epoch {r['rewind_epoch']}, one run on all {cores} cores "
              + (f"({r['imp_wall_s']:.0f} s for dense + IMP)." if r["imp_wall_s"] >= 1 else
                 "(dense and IMP reused from an earlier run of this benchmark in the same folder: the wall times "
                 "below are that run's)."),
              "", "| IMP round | weights remaining | val. accuracy | test accuracy | wall time at its end |",
              "|---|---|---|---|---|"]
    lines += [f"| {x['label']} | {100 * x['weights_remaining']:.2f} % | {100 * x['val_accuracy']:.2f} % "
              f"| {100 * x['test_accuracy']:.2f} % | {x['wall_seconds']:.0f} s |" for x in imp_rows]
    best = {k: (f"{100 * r[k]:.2f} % of the weights, test accuracy {100 * r[k + '_test']:.2f} %" if r[k] else "none")
            for k in ("cs_best", "imp_best")}
    lines += ["", f"* Sparsest CS ticket within 0.3 points on validation: {best['cs_best']}",
              f"* Sparsest IMP ticket within 0.3 points on validation: {best['imp_best']}"]
    if r["level"]:
        cs_time, imp_time = r["cs_time_s"], r["imp_time_s"]
        lines.append(f"* Wall time to a ticket with <= {100 * r['level']:.2f} % of the weights within 0.3 points "
                     "on validation: "
                     f"CS sweep (2 workers) **{cs_time:.0f} s**, IMP **{imp_time:.0f} s**"
                     + (f" (IMP takes **{imp_time / cs_time:.1f}x** as long)" if cs_time and imp_time else ""))
    lines += ["", "![sweep](parallel_search_sweep.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
