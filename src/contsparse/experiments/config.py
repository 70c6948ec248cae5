"""Run configuration: one flat dataclass, loaded from YAML and/or flags, validated, hashed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from contsparse.data import DataOptions, available_datasets
from contsparse.errors import UserError
from contsparse.experiments.rundir import RunDir, given_file
from contsparse.experiments.starting_weights import weights_digest
from contsparse.experiments.user_modules import import_modules
from contsparse.masking import LayerSelection
from contsparse.masking.parametrization import MIN_SCALED_MASK_INIT
from contsparse.masking.selection import DEFAULT_LAYER_TYPES
from contsparse.methods import METHODS
from contsparse.models import available_models
from contsparse.models.registry import model_spec
from contsparse.training.optim import OPTIMIZERS, SCHEDULES, OptimizerSettings

COMMANDS = ("ticket", "prune", "train")
# Defaults a command or method sets in place of RunConfig's: pruning is one CS round, then
# fine-tuning; the methods that prune once (or reach their target within a round) search one round
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"prune": {"rounds": 1}}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {name: {"rounds": 1} for name in ("magnitude", "random", "gmp", "dnw",
                                                                                "str")}
METHOD_NAMES = tuple(METHODS)


@dataclass
class RunConfig:
    """Everything needed to re-run an experiment. Defaults: CS ticket search on LeNet-300-100/MNIST
    tuned to find a ticket with <= 5 % of the weights at dense accuracy in a few CPU minutes."""

    command: str = "ticket"
    method: str = "cs"
    imports: list[str] = field(default_factory=list)  # the user's modules that register models / datasets
    model: str = "lenet300"
    dataset: str = "mnist"
    data_dir: str | None = None
    augment: bool = True  # the dataset's training augmentation (CIFAR: crops and flips; ImageNet: random crops)
    train_subset: int | None = None  # use only the first N training examples (quick runs, tests)
    image_size: int = 224  # imagenet: training crop / evaluation size
    workers: int = 4  # imagenet: image-decoding processes
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 28, 28])  # synthetic: input shape
    synthetic_classes: int = 10
    synthetic_size: int = 2048

    # schedule
    epochs: int = 8  # per search round (prune: the search; train: all)
    rounds: int = 2
    ticket_epochs: int | None = 15  # ticket training (prune: fine-tuning); None = epochs
    rewind_epoch: int = 2
    batch_size: int = 60

    # weight optimiser (Frankle & Carbin's LeNet settings)
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1

    # CS
    mask_init: float = -0.05
    penalty: float = 1e-8
    penalty_normalize: bool = False
    final_temp: float = 200.0
    temp_schedule: str = "epoch"
    mask_scaling: bool = True
    reference_steps: bool = True  # tickets / fine-tuning step on the scaled weights as the reference code does
    mask_optimizer: str = "sgd"
    mask_lr: float = 0.1
    mask_momentum: float = 0.9
    mask_nesterov: bool = False

    # baselines (imp, magnitude, random, gmp)
    sparsity: float | None = None  # magnitude / random / gmp: fraction of the weights pruned
    prune_fraction: float = 0.2  # imp: share of the remaining weights pruned per round
    prune_fraction_last: float = 0.1  # imp: the same for the output layer
    prune_fraction_conv: float | None = None  # imp: the same for conv layers (None: prune_fraction)
    prune_scope: str = "layerwise"  # or "global"
    gmp_frequency: int = 100  # gmp: steps between pruning steps
    gmp_start_epoch: int = 0  # gmp: epoch of the round at which pruning starts (Zhu & Gupta's t0)
    str_init: float = -5.0  # str: initial threshold logit
    reinit: bool = False  # ticket control: train the mask from a fresh random initialisation
    mask_from: str | None = None  # method given: a masks.safetensors file, or a run directory holding one

    # which layers are masked
    mask_include: list[str] = field(default_factory=list)
    mask_exclude: list[str] = field(default_factory=list)
    exclude_first: bool = False
    exclude_last: bool = False
    mask_transposed_convs: bool = True  # ConvTranspose weights too (the built-in models have none)

    dense_baseline: bool = True  # ticket: also train the dense model with the ticket's settings
    seed: int = 0
    weights_from: str | None = None  # start from these weights (a state_dict file or a finished run), not a random init
    weights_sha256: str | None = None  # that file's digest, taken when the run is set up: what makes it this run
    device: str = "auto"
    amp: bool = False  # bfloat16 autocast (on any device; it pays on GPUs)
    channels_last: bool = False  # CUDA: channels-last memory format for conv models
    compile: bool = False  # torch.compile the model: fused mask kernels, after compiling at each phase's start
    tensorboard: bool = False

    # -- derived settings -----------------------------------------------------------------------
    @property
    def phase_epochs(self) -> int:
        return self.ticket_epochs if self.ticket_epochs is not None else self.epochs

    def weight_optimizer(self) -> OptimizerSettings:
        return OptimizerSettings(self.optimizer, self.lr, self.momentum, self.nesterov, self.weight_decay,
                                 self.lr_schedule, tuple(self.lr_milestones), self.lr_gamma)

    def mask_optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(self.mask_optimizer, self.mask_lr, self.mask_momentum, self.mask_nesterov, 0.0,
                                 self.lr_schedule, tuple(self.lr_milestones), self.lr_gamma)

    def data_options(self) -> DataOptions:
        return DataOptions(image_size=self.image_size, workers=self.workers,
                           synthetic_shape=tuple(self.synthetic_shape), synthetic_classes=self.synthetic_classes,
                           synthetic_size=self.synthetic_size)

    def selection(self) -> LayerSelection:
        types = DEFAULT_LAYER_TYPES if self.mask_transposed_convs else tuple(
            t for t in DEFAULT_LAYER_TYPES if not issubclass(t, nn.modules.conv._ConvTransposeNd))
        return LayerSelection(layer_types=types, include=tuple(self.mask_include), exclude=tuple(self.mask_exclude),
                              exclude_first=self.exclude_first, exclude_last=self.exclude_last)

    def identity(self) -> str:
        """Short hash of every setting that changes the result (names the default run directory).
        Settings added later count only when they differ from their default, so that runs made
        before they existed keep their names."""
        values = dataclasses.asdict(self)
        if self.command == "train":  # settings a dense run does not use count at their defaults (same name)
            defaults = dataclasses.asdict(RunConfig())
            values.update({k: ADDED_LATER.get(k, defaults[k]) for k in NOT_FOR_DENSE})
        values.update({k: ADDED_LATER[k] for k in inert_settings(self)})
        keys = {k: v for k, v in values.items()
                if k not in NOT_IN_IDENTITY and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]

    def default_run_name(self) -> str:
        method = "dense" if self.command == "train" else self.method
        return f"{self.command}-{method}-{self.model}-{self.dataset}-{self.identity()}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dense_variant(self, same_budget: bool = True) -> RunConfig:
        """The dense run this one is read against: a ticket's trains as the ticket does (its
        settings, ``ticket_epochs`` from the start); a pruned model's, with ``same_budget``, as
        long as the pruned one trains in all (its search rounds and fine-tuning)."""
        budget = self.command == "prune" and same_budget
        epochs = self.epochs * self.rounds + self.phase_epochs if budget else self.phase_epochs
        return dataclasses.replace(self, command="train", epochs=epochs, ticket_epochs=None, rounds=1,
                                   dense_baseline=False)


# How, not what (the starting weights are known by their digest, wherever the file lies)
NOT_IN_IDENTITY = {"device", "tensorboard", "data_dir", "workers", "compile", "imports", "weights_from"}
# What a dense run (command train) does not use: with other values it is the same run
NOT_FOR_DENSE = {"method", "rounds", "ticket_epochs", "rewind_epoch", "mask_init", "penalty", "penalty_normalize",
                 "final_temp", "temp_schedule", "mask_scaling", "reference_steps", "mask_optimizer", "mask_lr",
                 "mask_momentum", "mask_nesterov",
                 "sparsity", "prune_fraction", "prune_fraction_last", "prune_fraction_conv", "prune_scope",
                 "gmp_frequency", "gmp_start_epoch", "str_init", "reinit", "mask_from", "dense_baseline"}
# Settings added later -> the value that keeps the older behaviour: older config files and
# checkpoints are read with it, and a setting counts in a run's name only when it differs from it
ADDED_LATER: dict[str, Any] = {"prune_fraction_conv": None, "mask_from": None, "gmp_start_epoch": 0,
                               "reference_steps": False, "mask_nesterov": False, "mask_transposed_convs": False,
                               "weights_from": None, "weights_sha256": None, "augment": True}
DATASETS_WITHOUT_AUGMENTATION = {"mnist", "synthetic"}  # --no-augment has nothing to turn off there
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def unused_settings(config: RunConfig) -> set[str]:
    """Settings that do not make this run what it is: how it runs, for a dense run the
    sparsification settings (a dense run given another --mask-init is the same run), and
    settings that have nothing to act on in this run."""
    return NOT_IN_IDENTITY | inert_settings(config) | (NOT_FOR_DENSE if config.command == "train" else set())


def inert_settings(config: RunConfig) -> set[str]:
    """Settings added later that have nothing to act on in this run (they do not rename it)."""
    inert = set() if config.method == "cs" and config.mask_scaling else {"reference_steps"}  # no scale to follow
    if config.method != "cs" or config.mask_optimizer != "sgd" or config.mask_momentum == 0:  # nothing to act on
        inert.add("mask_nesterov")
    if config.dataset in DATASETS_WITHOUT_AUGMENTATION:
        inert.add("augment")
    if config.model in available_models() and model_spec(config.model).build.__module__.startswith("contsparse."):
        inert.add("mask_transposed_convs")  # the built-in models have no transposed convolutions
    return inert


def settings_differences(saved: dict[str, Any], config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Settings (that make a run what it is) whose saved value differs: ``{key: (saved, now)}``."""
    current, unused = config.to_dict(), unused_settings(config)
    return {k: (saved.get(k), v) for k, v in sorted(current.items()) if k not in unused and saved.get(k) != v}


def describe_differences(differing: dict[str, tuple[Any, Any]]) -> str:
    """``{key: (saved, now)}`` as the messages show it: ``key: saved -> now, ...``."""
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differing.items())


def older_run_hint(differing: dict[str, tuple[Any, Any]]) -> str:
    """For settings that differ only because the run was made before they existed: the flags
    that give it its old behaviour back (``{key: (saved, now)}``), as a sentence; else ``""``."""
    older = {key: saved for key, (saved, _) in differing.items()
             if key in ADDED_LATER and saved == ADDED_LATER[key] and isinstance(saved, bool)}
    flags = [f"--{'' if saved else 'no-'}{key.replace('_', '-')}" for key, saved in older.items()]
    return f"; it predates {', '.join(older)}: add {' '.join(flags)} to go on as it was" if older else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of known keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not a text file ({err.reason} at byte {err.start})") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_saved_config(path: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml``, which contsparse writes with every setting: one that lacks
    the run's identity (emptied or overwritten) is reported as damaged rather than compared key by key."""
    values = load_yaml(path)
    missing = [key for key in ("command", "method", "model", "dataset") if key not in values]
    if missing:
        raise UserError(f"{path} is damaged (no {', '.join(missing)}): restore it, or start the run again in "
                        "another --out")
    return with_later_defaults(values)


def with_later_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """Settings saved by an older version, completed with the defaults of those added since (the
    defaults keep the old behaviour): compared with today's settings, they must not differ."""
    return {**ADDED_LATER, **saved}


def make_config(values: dict[str, Any], check: bool = True) -> RunConfig:
    """Build and validate a config from a dict (YAML values, then flags on top). ``check=False``
    leaves the settings as a whole unchecked (each value is still coerced to its type): a sweep's
    shared settings, which only its points, with their own values, must satisfy."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(FIELDS))}")
    values = {**COMMAND_DEFAULTS.get(str(values.get("command", "ticket")), {}),
              **METHOD_DEFAULTS.get(str(values.get("method", "cs")), {}), **values}
    values = {k: _coerce(k, v) for k, v in values.items()}
    for key in ("data_dir", "weights_from"):  # saved as absolute paths: a resume from another folder finds them
        if values.get(key):
            values[key] = str(Path(values[key]).expanduser().absolute())
    if values.get("weights_from") is not None and not values.get("weights_sha256"):
        values["weights_sha256"] = weights_digest(values["weights_from"])  # the file as it is now, at set-up
    config = RunConfig(**values)
    import_modules(config.imports)  # before validating: they may register the model or dataset named
    if check:
        validate(config)
    return config


def mask_file(source: str | Path) -> Path:
    """The masks file ``--mask-from`` names: the file itself, or a run directory's final masks."""
    return given_file(source, "--mask-from", RunDir.MASKS)


def _coerce(key: str, value: Any) -> Any:
    default = FIELDS[key].default if FIELDS[key].default is not dataclasses.MISSING else FIELDS[key].default_factory()
    if value is None:
        if default is None or key in OPTIONAL_FLOATS or key in OPTIONAL_INTS:  # an optional setting left unset
            return value
        raise UserError(f"{key} needs a value (a key with nothing after the colon in a YAML file is null); "
                        f"give one or leave the key out for the default, {default!r}")
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(value, bool):  # YAML's true/yes is not a number (float(True) would be 1.0)
            raise ValueError
        if isinstance(default, float) or key in OPTIONAL_FLOATS:
            return float(value)
        if isinstance(default, int) or key in OPTIONAL_INTS:
            return _int(value)
        if isinstance(default, list):
            items = value if isinstance(value, list | tuple) else [value]
            kind = LIST_ITEM_TYPES[key]
            if any(x is None or isinstance(x, bool | dict | list) for x in items):
                raise ValueError
            return [_int(x) if kind is int else kind(x) for x in items]
        if key in PATHS and not isinstance(value, str | Path):
            raise ValueError
        return str(value) if not isinstance(value, str) else value
    except (TypeError, ValueError):
        kind = ("float" if key in OPTIONAL_FLOATS else "int" if key in OPTIONAL_INTS else "path" if key in PATHS
                else type(default).__name__)
        raise UserError(f"{key} = {value!r} is not a valid {kind}") from None


OPTIONAL_FLOATS = {"sparsity", "prune_fraction_conv"}  # settings whose default None means "not given"
OPTIONAL_INTS = {"ticket_epochs", "train_subset"}
PATHS = {"data_dir", "mask_from", "weights_from"}  # a YAML list or true is not a path


LIST_ITEM_TYPES: dict[str, type] = {"lr_milestones": int, "synthetic_shape": int, "mask_include": str,
                                    "mask_exclude": str, "imports": str}


def _int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


# Sanity bounds: far beyond any real setting, they turn a typo (an extra digit or exponent) into an
# error instead of a float32 overflow deep in training or a plan of billions of rounds.
LARGEST_SETTING = 1e6
MAX_EPOCHS = 100_000
MAX_ROUNDS = 1_000


def validate(c: RunConfig) -> None:
    """Reject settings that cannot work, with the fix in the message."""
    def fail(message: str) -> None:
        raise UserError(message)

    if c.command not in COMMANDS:
        fail(f"unknown command {c.command!r}; choose from {', '.join(COMMANDS)}")
    if c.method not in METHOD_NAMES:
        fail(f"unknown method {c.method!r}; available: {', '.join(METHOD_NAMES)}")
    if c.model not in available_models():
        fail(f"unknown model {c.model!r}; available: {', '.join(available_models())} (a model of your own: "
             "register it in a module and pass --imports MODULE)")
    if c.dataset not in available_datasets():
        fail(f"unknown dataset {c.dataset!r}; available: {', '.join(available_datasets())}")
    for name in ("lr", "mask_lr", "penalty", "final_temp", "mask_init", "momentum", "mask_momentum",
                 "weight_decay", "lr_gamma", "str_init"):
        value = getattr(c, name)
        if not math.isfinite(value):
            fail(f"{name} must be a finite number, got {value}")
        if abs(value) > LARGEST_SETTING:  # the tensors they scale are float32
            fail(f"{name} = {value:g} is out of range (at most {LARGEST_SETTING:g} in size)")
    if c.epochs < 1 or c.epochs > MAX_EPOCHS:
        fail(f"epochs must be in [1, {MAX_EPOCHS}], got {c.epochs}")
    if c.ticket_epochs is not None and not 1 <= c.ticket_epochs <= MAX_EPOCHS:
        fail(f"ticket_epochs must be in [1, {MAX_EPOCHS}], got {c.ticket_epochs}")
    if c.rounds < 1 or c.rounds > MAX_ROUNDS:
        fail(f"rounds must be in [1, {MAX_ROUNDS}], got {c.rounds}")
    if c.mask_scaling and c.mask_init < MIN_SCALED_MASK_INIT:
        fail(f"mask_init = {c.mask_init:g} with mask scaling multiplies the ticket's weights by 1 / sigmoid(s0) "
             f"> 1e13: give a mask_init >= {MIN_SCALED_MASK_INIT:g} or --no-mask-scaling")
    if not 0 <= c.seed < 2 ** 63:
        fail(f"seed must be in [0, 2**63), got {c.seed}")
    if c.weight_decay < 0 or c.lr_gamma <= 0:
        fail(f"weight_decay must be >= 0 and lr_gamma > 0, got {c.weight_decay:g} and {c.lr_gamma:g}")
    if c.batch_size < 1:
        fail(f"batch_size must be >= 1, got {c.batch_size}")
    if c.lr <= 0 or c.mask_lr <= 0:
        fail("learning rates must be > 0")
    if c.penalty < 0:
        fail(f"penalty must be >= 0, got {c.penalty}")
    if c.final_temp <= 1:
        fail(f"final_temp must be > 1 (the temperature anneals from 1 up to it), got {c.final_temp}")
    if rewinds(c) and not 0 <= c.rewind_epoch < c.epochs:
        fail(f"rewind_epoch must be in [0, epochs) = [0, {c.epochs}), got {c.rewind_epoch}: give --rewind-epoch "
             f"below --epochs (e.g. --rewind-epoch {max(c.epochs - 1, 0) if c.epochs <= 2 else 1})")
    if any(m < 1 for m in c.lr_milestones) or c.lr_milestones != sorted(set(c.lr_milestones)):
        fail(f"lr_milestones are the epochs (from 1) where the learning rate drops, in increasing order; "
             f"got {c.lr_milestones}")
    if c.optimizer not in OPTIMIZERS or c.mask_optimizer not in OPTIMIZERS:
        fail(f"optimizers must be one of {', '.join(OPTIMIZERS)}")
    if c.lr_schedule not in SCHEDULES:
        fail(f"unknown lr_schedule {c.lr_schedule!r}; choose from {', '.join(SCHEDULES)}")
    if c.temp_schedule not in ("epoch", "step"):
        fail(f"temp_schedule must be 'epoch' or 'step', got {c.temp_schedule!r}")
    if c.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", c.device):
        fail(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {c.device!r}")
    if c.train_subset is not None and c.train_subset < 1:
        fail(f"train_subset must be >= 1, got {c.train_subset}")
    if c.image_size < 8:
        fail(f"image_size must be >= 8, got {c.image_size}")
    if c.workers < 0:
        fail(f"workers (image-decoding processes) must be >= 0, got {c.workers}")
    if not c.synthetic_shape or any(d < 1 for d in c.synthetic_shape) or c.synthetic_classes < 2 \
            or c.synthetic_size < 1:
        fail("synthetic_shape needs positive sizes, synthetic_classes >= 2 and synthetic_size >= 1")
    if not 0 <= c.momentum < 1 or not 0 <= c.mask_momentum < 1:
        fail("momentum must be in [0, 1)")
    if c.sparsity is not None and not (math.isfinite(c.sparsity) and 0 < c.sparsity < 1):
        fail(f"sparsity is the fraction of weights pruned and must be in (0, 1), got {c.sparsity}")
    if c.command != "train" and c.method in ("magnitude", "random", "gmp", "dnw") and c.sparsity is None:
        fail(f"method {c.method} prunes to a target: give --sparsity (fraction pruned, e.g. 0.95)")
    reached_by = {"cs": "--mask-init and --penalty", "imp": "--rounds and --prune-fraction",
                  "str": "--weight-decay and --str-init", "given": "the mask of --mask-from"}
    if c.command != "train" and c.method in reached_by and c.sparsity is not None:
        fail(f"--sparsity is the target of magnitude, random, gmp and dnw; method {c.method} would ignore it "
             f"(its sparsity follows from {reached_by[c.method]})")
    if not (0 < c.prune_fraction < 1 and 0 <= c.prune_fraction_last < 1):
        fail("prune_fraction must be in (0, 1) and prune_fraction_last in [0, 1)")
    if c.prune_fraction_conv is not None and not 0 <= c.prune_fraction_conv < 1:
        fail(f"prune_fraction_conv must be in [0, 1), got {c.prune_fraction_conv}")
    if c.method == "given" and c.command != "train":
        if c.command != "ticket":
            fail("method given trains a saved mask as a ticket: use the ticket command")
        if c.mask_from is None:
            fail("method given needs --mask-from: a masks.safetensors file or a run directory holding one")
        mask_file(c.mask_from)  # exists, or a one-line error
    elif c.mask_from is not None:
        fail("--mask-from is for --method given (train a saved mask)")
    if c.weights_sha256 is not None and c.weights_from is None:
        fail("weights_sha256 is the digest of the --weights-from file: give that file, or leave both out")
    if c.weights_from is not None and c.command == "ticket" and c.method == "given" and c.reinit:
        fail("--weights-from has nothing to act on with --method given --reinit: the ticket trains from a fresh "
             "initialisation")
    if c.prune_scope not in ("layerwise", "global"):
        fail(f"prune_scope must be 'layerwise' or 'global', got {c.prune_scope!r}")
    if c.gmp_frequency < 1:
        fail(f"gmp_frequency must be >= 1, got {c.gmp_frequency}")
    if c.gmp_start_epoch < 0 or (c.method == "gmp" and c.command != "train" and c.gmp_start_epoch >= 0.75 * c.epochs):
        fail(f"gmp_start_epoch must be >= 0 and before 3/4 of the round's {c.epochs} epochs (where GMP reaches "
             f"its sparsity), got {c.gmp_start_epoch}")
    for name in ("mask_include", "mask_exclude"):
        for pattern in getattr(c, name):
            try:
                re.compile(pattern)
            except re.error as err:
                fail(f"{name} pattern {pattern!r} is not a valid regular expression ({err})")


def rewinds(config: RunConfig) -> bool:
    """Whether the run goes back to its epoch-k rewind point: a ticket is trained from it, and IMP's
    later rounds restart from it (under prune too). Pruning by CS fine-tunes where it stands."""
    method = METHODS.get(config.method)
    if method is None:
        return False
    return (config.command == "ticket" and not method.trains_from_initialisation) or (
        config.command == "prune" and config.rounds > 1 and method.rewind_between_rounds)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
