"""Runs one experiment (ticket search, pruning or dense training) in a run directory, resumably.

A run is a list of phases (search rounds, then ticket training or fine-tuning; or dense
training) executed epoch by epoch by the one training loop. After every epoch the full state is
checkpointed, so re-running the same command continues where a run stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

import contsparse
from contsparse import faults
from contsparse.data import BatchIterator, DatasetSplits, TensorSplit, load_dataset, make_batches, without_augmentation
from contsparse.errors import RunInterrupted, UserError, raised_by_torch_compile
from contsparse.experiments.config import (
    RunConfig,
    describe_differences,
    dump_yaml,
    load_saved_config,
    mask_file,
    older_run_hint,
    rewinds,
    settings_differences,
    unused_settings,
    with_later_defaults,
)
from contsparse.experiments.distributed import Distributed, device_for, from_environment
from contsparse.experiments.interrupt import StopRequest
from contsparse.experiments.lock import RunLock
from contsparse.experiments.rundir import RunDir
from contsparse.experiments.starting_weights import load_starting_weights
from contsparse.masking import kernels, per_layer_remaining, plain_state_dict, weights_remaining
from contsparse.masking.accounting import weights_remaining_all_layers
from contsparse.masking.maskset import check_binary_mask
from contsparse.methods import (
    METHODS,
    ContinuousSparsification,
    CSSettings,
    Dense,
    GivenMask,
    Method,
    PruneSettings,
)
from contsparse.models import build_model
from contsparse.seeds import SEED_RANGE
from contsparse.training import (
    EpochResult,
    NonFiniteLossError,
    StepSettings,
    build_optimizer,
    evaluate,
    flush_denormals,
    has_checkpoint,
    learning_rate,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_learning_rate,
    train_epoch,
    tune_cpu_allocator,
)
from contsparse.training.checkpoint import read_checkpoint_entry

Log = Callable[[str], None]


@dataclass(frozen=True)
class Phase:
    kind: str  # "search" | "ticket" | "finetune" | "dense"
    round: int
    epochs: int

    @property
    def hard(self) -> bool:
        return self.kind in ("ticket", "finetune")

    def label(self) -> str:
        return f"{self.kind} {self.round}" if self.kind == "search" else self.kind


def plan_phases(config: RunConfig) -> list[Phase]:
    if config.command == "train":
        return [Phase("dense", 0, config.epochs)]
    final = "ticket" if config.command == "ticket" else "finetune"
    if METHODS[config.method].trains_from_initialisation:  # a given mask: no search
        return [Phase(final, 0, config.phase_epochs)]
    search = [Phase("search", r, config.epochs) for r in range(config.rounds)]
    return [*search, Phase(final, 0, config.phase_epochs)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"numbered from 0")
    return device


def build_method(config: RunConfig, steps_per_epoch: int) -> Method:
    if config.command == "train":
        return Dense(config.selection())
    if config.method == "given":
        return GivenMask(PruneSettings(selection=config.selection()), given_masks(config.mask_from))
    if config.method == "cs":
        return ContinuousSparsification(CSSettings(
            mask_init=config.mask_init, penalty=config.penalty, penalty_normalize=config.penalty_normalize,
            final_temp=config.final_temp, epochs_per_round=config.epochs, temp_schedule=config.temp_schedule,
            steps_per_epoch=steps_per_epoch, scale_by_init=config.mask_scaling, reference_steps=config.reference_steps,
            selection=config.selection()))
    settings = PruneSettings(
        fraction=config.prune_fraction, last_fraction=config.prune_fraction_last,
        conv_fraction=config.prune_fraction_conv,
        sparsity=config.sparsity if config.sparsity is not None else 0.0, scope=config.prune_scope, seed=config.seed,
        epochs_per_round=config.epochs, steps_per_epoch=steps_per_epoch, gmp_frequency=config.gmp_frequency,
        gmp_start_epoch=config.gmp_start_epoch, str_init=config.str_init, selection=config.selection())
    return METHODS[config.method](settings)


def given_masks(source: str | None) -> dict[str, torch.Tensor]:
    """The masks ``--mask-from`` names, as bool tensors."""
    path = mask_file(source or "")
    try:
        masks = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UserError(f"--mask-from {path} cannot be read ({err})") from err
    try:
        for name, mask in masks.items():
            check_binary_mask(name, mask)
    except ValueError as err:
        raise UserError(f"--mask-from {path}: {err}") from err
    return {name: mask.bool() for name, mask in masks.items()}


def masked_model(config: RunConfig, data: DatasetSplits, steps_per_epoch: int,
                 starting_weights: bool = True) -> tuple[nn.Module, Method]:
    """The run's architecture, from ``--weights-from`` where given (``starting_weights=False``:
    the random initialisation, as the re-initialised control wants), with its method's masks attached."""
    try:
        model = build_model(config.model, data.input_shape, data.num_classes)
    except ValueError as err:  # e.g. a conv model given flat inputs
        raise UserError(f"cannot build {config.model} for inputs of shape {tuple(data.input_shape)} and "
                        f"{data.num_classes} classes: {err}") from err
    if config.weights_from is not None and starting_weights:
        load_starting_weights(model, config.weights_from, config.weights_sha256)
    method = build_method(config, steps_per_epoch)
    try:
        method.attach(model)
    except ValueError as err:
        raise UserError(f"cannot attach masks: {err}") from err
    return model, method


def load_model_state(model: nn.Module, method: Method, saved: dict[str, Any], phases: list[Phase]) -> None:
    """A checkpoint's model state into ``model``; one taken in a hard phase holds hardened masks,
    so the masks are hardened first (same structure). The checkpoint taken after the last epoch
    (before the final evaluation) is in the last phase's state."""
    progress = saved["progress"]
    finished = progress["phase"] >= len(phases)
    phase = phases[-1] if finished else phases[progress["phase"]]
    if phase.hard and (finished or progress["entered"]):
        method.harden()
    model.load_state_dict(saved["model"])


def rewind_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what rewinding restores: weights and norm statistics, not mask state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and is_rewind_key(k)}


def is_rewind_key(key: str) -> bool:
    """Weights and norm statistics are rewound; mask logits and mask state are not."""
    return not (key.endswith(".logits") or key.endswith(".hard_mask") or key.endswith("_extra_state"))


def _new_progress() -> dict[str, Any]:
    return {"phase": 0, "epoch": 0, "step": 0, "entered": False, "elapsed": 0.0, "epochs_done": 0,
            "metrics_lines": 0, "round_remaining": [], "curve": []}


@dataclass
class _Setup:
    """What one execution of a run trains with."""

    device: torch.device
    model: nn.Module
    method: Method
    phases: list[Phase]
    train_batches: BatchIterator
    val_batches: BatchIterator
    test_batches: BatchIterator
    speed: StepSettings


@dataclass
class _State:
    """Where a run stands, all of it checkpointed. ``progress``: phase, epoch and step, whether the
    current phase's start (rewind, hardening) is done (``entered``), counters and per-round
    records; ``partial``: running sums of an epoch stopped after ``step`` steps;
    ``optimizer_state``: the checkpoint's optimiser states, loaded once the optimisers exist."""

    progress: dict[str, Any] = field(default_factory=_new_progress)
    rewind: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    partial: dict[str, torch.Tensor] | None = None
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)


class Runner:
    """Executes one :class:`RunConfig` in one run directory.

    ``force`` lets a run resume under changed settings (they are logged and saved); without it a
    directory holding a run with other settings is refused.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, log: Log = tqdm.write,
                 data: DatasetSplits | None = None, force: bool = False, *, keep_if_finished: bool = False,
                 epochs_flag: str = "--epochs", sweep_point: bool = False, notes: tuple[str, ...] = ()) -> None:
        self.config = config
        self.notes = notes  # said once the run is accepted and before it trains (advice on its settings)
        self.run = RunDir(run_dir)
        self.log = log
        self.force = force
        # A forced ticket run's dense baseline: finished, it stays as it was trained (it is what
        # the ticket is compared with), and its epochs are the ticket run's --ticket-epochs.
        self.keep_if_finished = keep_if_finished
        self.epochs_flag = epochs_flag
        # A sweep's point: its folder is named by its settings, so advice names the sweep, not --out
        self.sweep_point = sweep_point
        self._data = data
        self.dist = Distributed()

    # -- entry point ----------------------------------------------------------------------------
    def _on_rank_0(self, check: Callable[[], object]) -> None:
        """Run ``check`` in the first process only; under torchrun what it refuses (a one-line
        error, or the machine's: a name too long, a read-only folder) reaches every process, which
        would otherwise fail in the next collective with a connection error. The exchange is also
        a barrier: what the check made (the run folder) exists for every process afterwards."""
        refusal = None
        if self.dist.is_main:
            try:
                check()
            except (UserError, OSError) as err:
                if not self.dist.enabled:
                    raise
                refusal = str(err) if isinstance(err, UserError) else \
                    f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
        if self.dist.enabled:
            given = [r for r in self.dist.gather(refusal) if r]
            if given:
                raise UserError(str(given[0]))

    def _check_processes_agree(self) -> None:
        """torchrun's processes must run one configuration of one contsparse: different settings
        would train a different model than the one recorded, or hang in a collective."""
        if not self.dist.enabled:
            return
        mine = (contsparse.__version__, self.config.identity(), str(self.run.path.absolute()), self.force)
        views = self.dist.gather((*mine, self.config.to_dict()))
        first = views[0]
        if any(view[:4] != first[:4] for view in views):
            rank, (version, _, out, force, settings) = next((r, v) for r, v in enumerate(views) if v[:4] != first[:4])
            differing = sorted(k for k in settings if settings[k] != first[4].get(k))
            what = (f"contsparse {first[0]} vs {version}" if version != first[0]
                    else f"--out {first[2]} vs {out}" if out != first[2]
                    else f"--force {first[3]} vs {force}" if force != first[3]
                    else ", ".join(f"{k}: {first[4].get(k)!r} vs {settings[k]!r}" for k in differing))
            raise UserError(f"the torchrun processes were given different settings (rank 0 vs rank {rank}: {what}); "
                            "start every process with the same command")

    def execute(self) -> dict[str, Any]:
        flush_denormals()  # first: it reaches OpenMP's worker threads only if they start after it
        self.dist = from_environment(self.config.device)
        self.run.writable = self.dist.is_main
        if not self.dist.is_main:
            self.log = _silent
        self._check_processes_agree()
        with ExitStack() as stack:
            def take_the_folder() -> None:
                self._refuse_foreign_folder()  # before the lock file would be left in it
                fresh = not self.run.path.exists()
                self.run.create()
                lock = stack.enter_context(RunLock(self.run.path))
                if fresh:  # a new run that stops before writing its settings leaves no folder behind
                    stack.callback(self.run.remove_if_unclaimed)  # (while it still holds the lock)
                if lock.stale_owner:
                    self.log(f"{self.run.path}: taking over the lock left by a stopped run ({lock.stale_owner})")

            self._on_rank_0(take_the_folder)
            self.check_settings()
            self.dist.barrier()  # every process has read the directory before the first one writes to it
            if self.run.is_finished():
                self.log(f"{self.run.path}: already finished, nothing to do")
                return self.run.read_summary()
            data = self._load_data()  # a data problem stops the run before anything is written, as do
            resolve_device(device_for(self.config.device, self.dist))  # a missing GPU,
            steps = len(make_batches(data.train, self.config.batch_size, shard=self.dist.shard))
            fresh = not has_checkpoint(self.run.checkpoint_dir)  # a checkpoint holds the weights: no file needed
            method = masked_model(self.config, data, steps, fresh)[1]  # weights or masks that do not fit,
            try:  # a schedule the data's size rules out (a run trained under it goes on as it began)
                if not self.run.has_started():
                    method.check_schedule()
            except ValueError as err:
                raise UserError(str(err)) from err
            if self.config.tensorboard:  # and a missing tensorboard package (rank 0 writes the logs)
                self._on_rank_0(_summary_writer_class)
            baseline = self._dense_baseline()  # and so does a refusal of the baseline's settings
            self.run.write_config(dump_yaml(self.config))
            for note in self.notes:
                self.log(f"note: {note}")
            dense_summary = None
            if baseline is not None:
                self.log("dense baseline (same settings as ticket training)")
                dense_summary = baseline.execute()
            with StopRequest() as stop:
                try:
                    return self._train(dense_summary, stop)
                except Exception as err:
                    if self.config.compile and raised_by_torch_compile(err):
                        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                        raise UserError(f"torch.compile failed ({reason}); run without --compile") from err
                    raise

    def _refuse_foreign_folder(self) -> None:
        if self.run.path.is_dir() and not self.run.file(RunDir.CONFIG).is_file() and not self.run.is_empty():
            raise UserError(f"{self.run.path} exists and is not a contsparse run directory; choose another --out")

    def check_settings(self) -> None:
        """Refuse, in one line and before anything is written, settings this run directory cannot
        take: another run's, or (with ``force``) ones its checkpoint cannot continue under."""
        path = self.run.file(RunDir.CONFIG)
        if not path.is_file():
            self._refuse_foreign_folder()
            return
        saved = load_saved_config(path)
        # A config.yaml edited by hand must not slip changes past the checks below: it is judged
        # against the settings the checkpoint was trained under (checkpoints record them)
        trained = (read_checkpoint_entry(self.run.checkpoint_dir, "config")
                   if self.run.config_edited() and not self.run.is_finished() else None)
        if isinstance(trained, dict):
            trained = with_later_defaults(trained)
        unused = unused_settings(self.config)  # how a run runs (data_dir, device, ...) may change freely
        edits = {key: (value, saved.get(key)) for key, value in trained.items()
                 if key not in unused and saved.get(key) != value} if isinstance(trained, dict) else {}
        differing = settings_differences(trained if edits else saved, self.config)
        if not differing:
            return
        if not self.run.has_started():
            return  # nothing trained yet (it failed to start): the new settings simply replace the old
        details = describe_differences(differing)
        if edits and not self.force:
            edited = describe_differences(edits)
            raise UserError(f"{path} differs from the settings {self.run.path}'s checkpoint was trained with "
                            f"({edited}): restore it to resume as trained, or resume with --force to go on "
                            "with these settings")
        if self.run.is_finished() and self.keep_if_finished:
            self.log(f"{self.run.path}: finished before the settings changed ({details}): kept as it is")
            return
        older = older_run_hint(differing)
        if "weights_sha256" in differing and not self.run.is_finished() and has_checkpoint(self.run.checkpoint_dir):
            began = str(differing["weights_sha256"][0])[:12]
            raise UserError(f"{self.run.path} began from other starting weights (sha256 {began}...), which it keeps "
                            "(its checkpoint holds them; --force cannot change them): continue it with `contsparse "
                            f"resume {self.run.path}`, or run these settings in a new directory (--out)")
        if self.run.is_finished():
            raise UserError(f"{self.run.path} holds a finished run with other settings ({details}); "
                            + ("delete that folder to run this sweep point again" if self.sweep_point else
                               "run those settings in a new directory (--out)") + older)
        if not self.force:
            raise UserError(f"{self.run.path} holds a run with other settings ({details}); "
                            + ("run the sweep with --force to resume it with the point's settings, or delete that "
                               "folder to start the point again" if self.sweep_point else
                               "run them in a new directory (--out), give the saved ones to resume it, or "
                               "--force to resume it with the new ones") + older)
        self._refuse_impossible_resume(details, differing)
        self.log(f"--force: resuming {self.run.path} with changed settings ({details})")

    def _settings_already_acted(self, differing: dict[str, tuple[Any, Any]], phase: int,
                                rewind_stored: bool, entered: bool = False) -> str | None:
        """The first changed setting that an earlier part of the run has already applied, or None.

        ``rounds``: each finished search round ended as the last one (its mask fixed) or not (CS
        resets its logits); a change that turns a finished round from one into the other would
        leave a mask built for the other plan (a CS ticket with no weights, say). ``rewind_epoch``:
        the rewind point is stored once. Pruning targets: the mask they made exists once the
        search is over. ``reference_steps``: the ticket's optimiser, once made, holds its state in
        the parameter groups the setting chose. (The starting weights: see check_settings.)"""
        if self.config.command == "train":
            return None
        if "rounds" in differing:
            old, new = (int(value) for value in differing["rounds"])
            if phase > min(old, new) - 1:  # round min-1 has ended, and is the last round of only one plan
                return f"rounds ({old} -> {new}: {phase} round(s) have ended)"
        if "rewind_epoch" in differing and rewind_stored:
            return "rewind_epoch (the rewind point is stored)"
        searched = phase >= self.config.rounds  # past the search rounds: the final mask exists
        targets = sorted(set(differing) & {"sparsity", "prune_fraction", "prune_fraction_last", "prune_fraction_conv",
                                           "prune_scope"})
        if targets and searched:
            return ", ".join(targets) + " (the search that pruned to it is over)"
        if "reference_steps" in differing and searched and (entered or phase > self.config.rounds):
            return "reference_steps (the ticket's optimiser has begun with the other steps)"
        return None

    def _dense_baseline(self) -> Runner | None:
        """The runner of a ticket run's dense baseline (in ``dense/``), whose settings are checked
        now, before the ticket run writes anything; None without a baseline."""
        if self.config.command != "ticket" or not self.config.dense_baseline:
            return None

        def baseline(log: Log) -> Runner:
            return Runner(self.config.dense_variant(), self.run.path / "dense", log, self._load_data(), self.force,
                          keep_if_finished=self.force, epochs_flag="--ticket-epochs")

        if (self.run.path / "dense").is_dir():
            baseline(_silent).check_settings()
        return baseline(self.log)

    def _refuse_impossible_resume(self, details: str, differing: dict[str, tuple[Any, Any]]) -> None:
        """``--force`` with settings the checkpoint cannot continue under: fewer epochs than the
        current phase has trained, a model (architecture, masked layers, method) its tensors do
        not fit, another s0 or mask scaling (the masks keep those they were saved with), or a
        setting that has already acted (a round already ended as the last one or not, the rewind
        point already stored, the search that pruned to a target already over).
        Refused before anything is written."""
        if not has_checkpoint(self.run.checkpoint_dir):
            return
        changed = set(differing)
        fixed = sorted(changed & {"mask_init", "mask_scaling"})
        if fixed:
            raise UserError(f"{self.run.path}: {' and '.join(fixed)} cannot change in a started run (its masks "
                            "keep the values they were saved with); resume with the saved ones, or start a new "
                            "run with --out")
        saved = load_checkpoint(self.run.checkpoint_dir, "cpu", warn=_silent)
        progress, phases = saved["progress"], plan_phases(self.config)
        acted = self._settings_already_acted(differing, progress["phase"], saved["rewind"] is not None,
                                             bool(progress.get("entered")))
        if acted:
            raise UserError(f"{self.run.path}: {acted} cannot change any more (the run has already acted on it); "
                            "resume with the saved value, or start a new run with --out" + older_run_hint(differing))
        if progress["phase"] < len(phases) and progress["epoch"] >= phases[progress["phase"]].epochs:
            phase = phases[progress["phase"]]
            flag = {"search": "--epochs", "dense": self.epochs_flag}.get(phase.kind, "--ticket-epochs")
            trained = f"{progress['epoch']} epoch{'s' if progress['epoch'] != 1 else ''}"
            raise UserError(f"{self.run.path} has trained {trained} of {phase.label()}, which the "
                            f"new settings end after {phase.epochs}: resume with {flag} {progress['epoch'] + 1} or "
                            "more, or start a new run with --out")
        with torch.random.fork_rng(devices=[]):  # a model built only to try the checkpoint on
            model, method = masked_model(self.config, self._load_data(), 1, starting_weights=False)
        try:
            load_model_state(model, method, saved, phases)
        except RuntimeError as err:
            raise UserError(f"{self.run.path} holds a checkpoint whose tensors do not fit the model of the new "
                            f"settings ({details}); resume with the saved settings, or start a new run with "
                            "--out") from err

    def _load_data(self) -> DatasetSplits:
        if self._data is None:
            data = load_dataset(self.config.dataset, self.config.data_dir, self.config.data_options())
            if self.config.train_subset is not None:
                data = dataclasses.replace(data, train=data.train.subset(self.config.train_subset))
            if not self.config.augment:
                data = without_augmentation(data)
            check_labels(data)
            self._data = data
        return self._data

    # -- the training ---------------------------------------------------------------------------
    def _train(self, dense_summary: dict[str, Any] | None, stop: StopRequest) -> dict[str, Any]:
        setup = self._setup()
        state = self._restore(setup)
        writer = _tensorboard(self.run.path) if self.config.tensorboard and self.dist.is_main else None
        trainable: nn.Module | None = None  # the module the steps run on: the model, or DDP around it
        started = time.perf_counter() - state.progress["elapsed"]
        while state.progress["phase"] < len(setup.phases):
            phase = setup.phases[state.progress["phase"]]
            entering = not state.progress["entered"]
            if state.rewind is None and setup.method.trains_from_initialisation:
                state.rewind = rewind_state(setup.model)  # no search: the ticket starts from iteration 0
            self._before_epoch(setup, state, phase, entering)
            if entering or trainable is None:
                trainable = self.dist.wrap(setup.model, setup.device)
            if entering and phase.hard:
                self._checkpoint(setup, state)  # phase boundary: rewound, hardened, fresh optimisers
            epoch = state.progress["epoch"]
            if phase.kind == "search" and phase.round == 0 and epoch == self.config.rewind_epoch \
                    and state.rewind is None and rewinds(self.config):
                state.rewind = rewind_state(setup.model)
                self._checkpoint(setup, state)  # the rewind point is stored
            record = self._epoch_or_explain(setup, state, phase, stop, trainable)
            if isinstance(record, EpochResult):  # stopped by a signal mid-epoch
                state.progress["step"], state.partial = record.steps, record.totals
                state.progress["elapsed"] = time.perf_counter() - started
                self._checkpoint(setup, state)
                reason = stop.reason or "another process was signalled"
                raise RunInterrupted(f"stopped ({reason}) in {phase.label()}, epoch {epoch + 1}, after step "
                                     f"{record.steps}; checkpoint saved in {self.run.path}")
            self._after_epoch(setup, state, phase, record)
            state.progress["elapsed"] = time.perf_counter() - started
            record["seconds"] = round(state.progress["elapsed"], 3)
            self._record(state, record, writer)
            self._checkpoint(setup, state)
            faults.inject(f"epoch:{state.progress['epochs_done']}")
            if self.dist.enabled and self.dist.all_sum([float(stop.requested())], setup.device)[0] > 0:
                # a request after the epoch's last collective check: the processes stop together here
                raise RunInterrupted(f"stopped after {phase.label()}, epoch {epoch + 1}; checkpoint saved in "
                                     f"{self.run.path}")
        if writer is not None:
            writer.close()
        return self._finish(setup, state.progress, dense_summary)

    def _setup(self) -> _Setup:
        """Device, data batches, the model with the method's masks attached, and the phases."""
        config = self.config
        device = resolve_device(device_for(config.device, self.dist))
        if device.type == "cpu":
            tune_cpu_allocator()
            if config.method == "cs" and kernels.enabled() and kernels.failure() is None and not kernels.compiled():
                self.log("compiling the fused CPU mask kernels (once per machine, about 20 s)")
                kernels.load()
        data = self._load_data()
        if device.type == "cuda":
            data = dataclasses.replace(data, train=data.train.to(device), val=data.val.to(device),
                                       test=data.test.to(device))
        seed_everything(config.seed)
        shard = self.dist.shard  # image folders decode only this process's share of each batch
        train_batches = make_batches(data.train, config.batch_size, shuffle=True, seed=config.seed,
                                     augment=data.augment, shard=shard)
        eval_batch = 1000 if isinstance(data.val, TensorSplit) else config.batch_size
        model, method = masked_model(config, data, len(train_batches), not has_checkpoint(self.run.checkpoint_dir))
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if config.compile:
            model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model
        speed = StepSettings(self.dist.shard, (lambda v: self.dist.all_sum(v, device)) if self.dist.enabled else None,
                             config.amp, config.channels_last)
        return _Setup(device, model, method, plan_phases(config), train_batches,
                      make_batches(data.val, eval_batch, shard=shard), make_batches(data.test, eval_batch, shard=shard),
                      speed)

    def _restore(self, setup: _Setup) -> _State:
        """A fresh state, or the checkpointed one with the model and RNGs as they were saved."""
        if not has_checkpoint(self.run.checkpoint_dir):
            if self.run.file(RunDir.METRICS).is_file():  # records of a run whose checkpoints were deleted
                self.log(f"{self.run.path} has no checkpoint: training starts from the beginning (the old "
                         f"{RunDir.METRICS} records are dropped)")
                self.run.truncate_metrics(0)
            if self.config.weights_from is not None:
                self.log(f"starting from the weights in {self.config.weights_from} (sha256 "
                         f"{self.config.weights_sha256})")
            return _State()
        saved = load_checkpoint(self.run.checkpoint_dir, setup.device, warn=self.log, set_aside_damaged=True)
        state = _State(saved["progress"], saved["rewind"], saved["optimizers"], saved["partial"])
        progress, phases = state.progress, setup.phases
        load_model_state(setup.model, setup.method, saved, phases)
        rng, own = saved["rng"], saved["rng"].get("processes")
        if self.dist.enabled and own is not None and len(own) == self.dist.world_size:
            rng = own[self.dist.rank]  # saved by as many processes: this one's own generators
        restore_rng(rng)
        if "metrics" in progress:  # the records themselves (checkpoints before them held only their count)
            if self.run.restore_metrics(progress["metrics"]):
                self.log(f"{self.run.file(RunDir.METRICS)} was missing records (cut short, damaged or deleted): "
                         f"its {len(progress['metrics'])} records up to the checkpoint are restored from it")
        else:  # a checkpoint from before: keep from now on the records it counts
            self.run.truncate_metrics(progress["metrics_lines"])
            if self.run.writable:
                progress["metrics"] = self.run.metrics_lines()
        where = phases[min(progress["phase"], len(phases) - 1)].label()
        self.log(f"resuming {self.run.path} at {where}, epoch {progress['epoch'] + 1}"
                 + (f", step {progress['step']}" if progress["step"] else ""))
        return state

    def _checkpoint(self, setup: _Setup, state: _State) -> None:
        rng = rng_state()
        if self.dist.enabled:  # every process reaches each checkpoint: a collective is safe here
            # Each process's generators drift apart (dropout on shards of unequal size, its own GPU's
            # generator): each resumes with its own. Process 0's stay on top for another world size.
            rng["processes"] = self.dist.gather(rng)
        if self.dist.is_main:
            save_checkpoint({"progress": state.progress, "config": self.config.to_dict(),
                             "model": setup.model.state_dict(),
                             "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
                             "rewind": state.rewind, "rng": rng, "partial": state.partial},
                            self.run.checkpoint_dir)

    def _before_epoch(self, setup: _Setup, state: _State, phase: Phase, entering: bool) -> None:
        """Enter the phase if it has not been (rewind, hardening) and have its optimisers ready."""
        if entering:
            self._enter_phase(phase, setup.model, setup.method, state.rewind)
            state.progress["entered"] = True
        # Search rounds share their optimisers (as in the reference code); ticket training and
        # fine-tuning start with fresh ones.
        fresh_phase = entering and (phase.kind != "search" or setup.method.fresh_optimizers_each_round)
        if not state.optimizers or fresh_phase:
            state.optimizers = self._optimizers(phase, setup.model, setup.method)
            if state.optimizer_state is not None and not fresh_phase:
                for name, optimizer in state.optimizers.items():
                    optimizer.load_state_dict(state.optimizer_state[name])
            state.optimizer_state = None

    def _epoch_or_explain(self, setup: _Setup, state: _State, phase: Phase, stop: StopRequest,
                          trainable: nn.Module) -> dict[str, Any] | EpochResult:
        """:meth:`_epoch`, with a diverged loss turned into a user error that says how to go on."""
        progress = state.progress
        try:
            return self._epoch(phase, progress["epoch"], progress["step"], state.partial, stop, trainable, setup,
                               state.optimizers, progress["epochs_done"])
        except NonFiniteLossError as err:
            kept = (f"the checkpoint of epoch {progress['epochs_done']} is kept" if progress["epochs_done"]
                    else "no epoch had finished")
            lower = self.config.lr / 10
            how = (f"Give this point a lower lr in the sweep (lr={lower:g}: a new point, in its own folder)"
                   if self.sweep_point else f"Continue with a lower --lr (or --mask-lr): contsparse resume "
                   f"{self.run.path} --lr {lower:g} --force")
            raise UserError(f"training diverged in {phase.label()}, epoch {progress['epoch'] + 1} ({err}); {kept}. "
                            f"{how}") from err

    def _after_epoch(self, setup: _Setup, state: _State, phase: Phase, record: dict[str, Any]) -> None:
        """Advance the progress past a finished epoch; at the end of a search round, record the
        round (and test its ticket, for methods that train one per round)."""
        progress = state.progress
        progress["epochs_done"] += 1
        progress["epoch"] += 1
        progress["step"], state.partial = 0, None
        if progress["epoch"] < phase.epochs:
            return
        if phase.kind == "search":
            last = phase.round == self.config.rounds - 1
            method = setup.method
            if method.resets_at_round_end:  # the mask the round ended with, before the next round's reset
                produced = method.final_mask()
            if method.records_round_tickets:  # this round trained a ticket: test it, keep its mask
                self.run.save_tensors(f"{RunDir.ROUND_MASKS}/round-{phase.round}.safetensors",
                                      {k: v.to(torch.uint8) for k, v in setup.method.final_mask().items()})
                progress.setdefault("curve", []).append({
                    "round": phase.round, "weights_remaining": record["weights_remaining"],
                    "test_accuracy": evaluate(setup.model, setup.test_batches, setup.device, setup.speed).accuracy,
                    "val_accuracy": record["val_accuracy"], "train_epochs": progress["epochs_done"]})
            method.end_of_round(phase.round, last)
            if not method.resets_at_round_end:  # pruning methods make the round's mask at its end
                produced = method.final_mask()
            progress["round_remaining"].append(weights_remaining(produced))
            empty = [name for name, kept in per_layer_remaining(produced).items() if kept == 0]
            if empty:
                what = ("every weight, so its ticket cannot learn" if len(empty) == len(produced) else
                        f"every weight of {', '.join(empty[:3])}{' and more' if len(empty) > 3 else ''} (without a "
                        "skip connection around it, no input reaches the output)")
                advice = ("raise --mask-init or lower --penalty (short runs on little data prune the most)"
                          if self.config.method == "cs" else "prune less (a lower --sparsity or --prune-fraction; "
                          "STR: a lower --weight-decay), or rank the weights per layer (--prune-scope layerwise)")
                self.log(f"warning: {phase.label()} pruned {what}; {advice}")
        progress["phase"] += 1
        progress["epoch"] = 0
        progress["entered"] = False

    def _record(self, state: _State, record: dict[str, Any], writer: Any) -> None:
        """The epoch's line in metrics.jsonl (and TensorBoard)."""
        line = self.run.append_metrics(record)
        if line is not None:  # (None in processes that do not write)
            state.progress.setdefault("metrics", []).append(line)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float):
                    writer.add_scalar(key, value, state.progress["epochs_done"])
        state.progress["metrics_lines"] += 1

    def _enter_phase(self, phase: Phase, model: nn.Module, method: Method,
                     rewind: dict[str, torch.Tensor] | None) -> None:
        restart = phase.kind == "ticket" or (phase.kind == "search" and phase.round > 0
                                             and method.rewind_between_rounds)
        if restart:
            if rewind is None:
                raise RuntimeError("no rewind point was stored")
            # --reinit: every network trained from the rewind point starts from a fresh
            # initialisation instead, IMP's round tickets included (not only the final ticket)
            start = self._fresh_init(model, phase) if self.config.reinit else rewind
            model.load_state_dict(start, strict=False)
            method.harden()
            method.after_rewind()
            origin = ("re-initialised (--reinit control)" if start is not rewind
                      else "at their initialisation (iteration 0)" if method.trains_from_initialisation
                      else f"rewound to epoch {self.config.rewind_epoch}")
            self.log(f"{phase.label()}: weights {origin}, {weights_remaining(method.final_mask()):.4f} of them kept")
        elif phase.kind == "finetune":
            method.harden()

    def _fresh_init(self, model: nn.Module, phase: Phase) -> dict[str, torch.Tensor]:
        """Weights of a new random initialisation in ``model``'s layout: the ticket's mask with
        other weights, the control that shows whether the ticket's own initial values matter.
        Each of IMP's rounds draws its own: with one initialisation for all of them, every round
        would rewind to the same weights, which is IMP again (rewound to iteration 0 of those
        weights) and finds real tickets, not a control."""
        offset = 0 if phase.kind == "ticket" else 7_919 * phase.round  # the final ticket: as before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.config.seed + 1_000_003 + offset) % SEED_RANGE)
            fresh, _ = masked_model(self.config, self._load_data(), 1, starting_weights=False)
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in rewind_state(fresh).items()}

    def _optimizers(self, phase: Phase, model: nn.Module, method: Method) -> dict[str, torch.optim.Optimizer]:
        weights = [p for p in method.weight_parameters(model) if p.requires_grad]
        optimizers = {"weights": build_optimizer(weights, self.config.weight_optimizer(), method.step_scales())}
        if phase.kind == "search" and method.search_parameters():
            optimizers["masks"] = build_optimizer(method.search_parameters(), self.config.mask_optimizer_settings())
        return optimizers

    def _epoch(self, phase: Phase, epoch: int, step: int, partial: dict[str, torch.Tensor] | None,
               stop: StopRequest, trainable: nn.Module, setup: _Setup,
               optimizers: dict[str, torch.optim.Optimizer], global_epoch: int) -> dict[str, Any] | EpochResult:
        """Train one epoch (from ``step`` on), then validate: the epoch's metrics record, or the
        unfinished :class:`EpochResult` when ``stop`` was requested."""
        config = self.config
        model, method, device, speed = setup.model, setup.method, setup.device, setup.speed
        train_batches, val_batches = setup.train_batches, setup.val_batches
        lr = learning_rate(config.weight_optimizer(), epoch, phase.epochs)
        set_learning_rate(optimizers["weights"], lr)
        if "masks" in optimizers:
            set_learning_rate(optimizers["masks"], learning_rate(config.mask_optimizer_settings(), epoch, phase.epochs))
        train_batches.set_epoch(global_epoch)
        search = phase.kind == "search"
        if search:  # a step beyond the epoch: resumed under --force with fewer batches (its epoch is over)
            method.before_epoch(phase.round, epoch, min(step, len(train_batches)))

        def after_step(step: int) -> None:
            if search:
                method.after_step(phase.round, epoch, step)
            elif phase.hard:
                method.after_hard_step()
            faults.inject(f"step:{global_epoch}:{step + 1}")
        desc = f"{phase.label()} {epoch + 1}/{phase.epochs}"
        tick = time.perf_counter()
        # Under data parallelism a stop request is honoured at the next step where the processes
        # check together (every CHECK_EVERY steps), or at the epoch's end.
        result = train_epoch(trainable, train_batches, list(optimizers.values()), device=device,
                             regularizer=method.regularizer if search else None,
                             reported_regularizer=method.reported_penalty if search else None, after_step=after_step,
                             postfix=method.progress, desc=desc, resume=partial,
                             should_stop=stop.requested, speed=speed)
        if not result.complete:
            return result
        val = evaluate(model, val_batches, device, speed)
        mask = method.final_mask()
        record: dict[str, Any] = {
            "phase": phase.kind, "round": phase.round, "epoch": epoch, "lr": lr,
            "train_loss": round(result.loss, 5), "train_accuracy": round(result.accuracy, 5),
            "val_loss": round(val.loss, 5), "val_accuracy": round(val.accuracy, 5),
            "weights_remaining": round(weights_remaining(mask), 6), **method.epoch_metrics()}
        if search and method.has_penalty:  # IMP, magnitude, ... have none: no column of zeros
            record["penalty"] = result.regularizer
        extras = f" beta {record['temperature']:.3g}" if "temperature" in record and search else ""
        self.log(f"[{desc}] loss {result.loss:.4f} train {result.accuracy:.4f} val {val.accuracy:.4f} "
                 f"kept {record['weights_remaining']:.4f}{extras} ({time.perf_counter() - tick:.1f}s)")
        return record

    def _finish(self, setup: _Setup, progress: dict[str, Any], dense_summary: dict[str, Any] | None) -> dict[str, Any]:
        config = self.config
        test = evaluate(setup.model, setup.test_batches, setup.device, setup.speed)
        val = evaluate(setup.model, setup.val_batches, setup.device, setup.speed)
        mask = setup.method.final_mask()
        self.run.save_tensors(RunDir.MASKS, {k: v.to(torch.uint8) for k, v in mask.items()})
        self.run.save_tensors(RunDir.MODEL, plain_state_dict(setup.model))
        summary = {
            "command": config.command,
            "method": "dense" if config.command == "train" else config.method,
            "model": config.model,
            "dataset": config.dataset,
            "input_shape": list(self._load_data().input_shape),
            "num_classes": self._load_data().num_classes,
            "weights_remaining": weights_remaining(mask),
            "weights_remaining_all_layers": weights_remaining_all_layers(setup.model, mask),
            "test_accuracy": test.accuracy,
            "val_accuracy": val.accuracy,
            "dense_test_accuracy": (test.accuracy if config.command == "train"
                                    else dense_summary["test_accuracy"] if dense_summary else None),
            "train_epochs": progress["epochs_done"],
            "wall_seconds": round(progress["elapsed"], 2),
            "rounds_weights_remaining": progress["round_remaining"],
            "round_tickets": progress.get("curve", []),
            "per_layer": per_layer_remaining(mask),
            "contsparse_version": contsparse.__version__,
            "seed": config.seed,
            "run_dir": str(self.run.path),
        }
        if config.weights_from is not None:  # the file as it was when the run was set up
            summary["weights_from"] = config.weights_from
            summary["weights_from_sha256"] = config.weights_sha256
        if dense_summary is not None:
            summary["dense_wall_seconds"] = dense_summary["wall_seconds"]
            summary["dense_train_epochs"] = dense_summary["train_epochs"]
            summary["dense_val_accuracy"] = dense_summary.get("val_accuracy")
        self.run.write_summary(summary)
        return summary


def _silent(_message: str) -> None:
    """The log of data-parallel processes other than rank 0."""


def check_labels(data: DatasetSplits) -> None:
    """Labels outside ``[0, num_classes)`` would fail deep inside the loss, and an empty
    evaluation split would report NaN accuracies: say so up front."""
    for name, split in (("validation", data.val), ("test", data.test)):
        if not len(split):
            raise UserError(f"the {name} split of {data.name} is empty: every epoch is evaluated on the validation "
                            "split (tickets are chosen by it) and the final model on the test split; give it examples")
    for name, split in (("train", data.train), ("validation", data.val), ("test", data.test)):
        if split.y.is_floating_point() or split.y.dtype == torch.bool:
            raise UserError(f"the {name} split of {data.name} has {str(split.y.dtype).removeprefix('torch.')} "
                            "labels; give class indices as integers")
        if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= data.num_classes):
            raise UserError(f"the {name} split of {data.name} has labels {int(split.y.min())}..{int(split.y.max())}, "
                            f"outside [0, {data.num_classes}) for its {data.num_classes} classes; check the data")


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'contsparse[tensorboard]'") from err
    return SummaryWriter


def _tensorboard(path: Path) -> Any:
    return _summary_writer_class()(str(path / "tensorboard"))
