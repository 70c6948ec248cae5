"""Lottery tickets on LeNet-300-100/MNIST: CS vs IMP (with rewinding) vs random pruning.

Shared settings are Frankle & Carbin's (Adam 1.2e-3, batch 60, rewind to epoch 2), with 15
epochs of training per ticket (IMP: per round; 55 in the original, shortened to fit a CPU).
Records, per method, the fewest weights remaining at which the ticket's test accuracy is still
>= dense - 0.3 points, and the training epochs it took to find and train that ticket.

    python benchmarks/tickets_mnist.py     # writes benchmarks/results/tickets_mnist.{json,md,*.png}
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_results

from contsparse.experiments import make_config
from contsparse.experiments.compare import ComparePlan, run_comparison
from contsparse.reports.compare import markdown_table, write_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tickets-mnist"))
    parser.add_argument("--imp-rounds", type=int, default=18)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    base = make_config({"ticket_epochs": 15})
    plan = ComparePlan(base, tuple(range(args.seeds)), (-0.03, -0.05, -0.08), args.imp_rounds, 3)
    rows = [r.as_dict() for r in run_comparison(plan, args.out, print)]
    result = write_comparison(rows, args.out, f"LeNet-300-100 / MNIST, {args.seeds} seed(s)")
    for name in ("accuracy_vs_weights.png", "accuracy_vs_epochs.png"):
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out / name, RESULTS / f"tickets_mnist_{name}")
    command = " ".join(["python benchmarks/tickets_mnist.py", *sys.argv[1:]])
    best = result["best"]
    lines = ["# Lottery tickets on LeNet-300-100 / MNIST: CS vs IMP vs random", "",
             f"Command: `{command}`. Dense test accuracy {100 * result['dense_accuracy']:.2f} %, validation "
             f"{100 * result['dense_val_accuracy']:.2f} %. Each method's ticket is chosen on the validation set "
             "(5,000 training images held out), its test accuracy reported.", "",
             "| method | fewest weights remaining at validation accuracy >= dense - 0.3 points | test accuracy "
             "| training epochs |", "|---|---|---|---|"]
    for method in ("cs", "imp", "random"):
        g = best.get(method)
        lines.append(f"| {method} | {100 * g['weights_remaining']:.2f} % | {100 * g['test_accuracy']:.2f} % | "
                     f"{g['train_epochs']:.0f} |" if g else f"| {method} | none within 0.3 points | - | - |")
    lines += ["", "![accuracy vs weights](tickets_mnist_accuracy_vs_weights.png)",
              "![accuracy vs epochs](tickets_mnist_accuracy_vs_epochs.png)", "", "All tickets:", "",
              markdown_table(result["groups"], best, result["dense_accuracy"], result["dense_val_accuracy"])]
    write_results("tickets_mnist", {"machine": machine(), "command": command, "rows": rows, **result},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
