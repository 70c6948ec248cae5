"""The one training loop (steps, evaluation, progress), optimisers and checkpoint I/O."""

from contsparse.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from contsparse.training.loop import EpochResult, NonFiniteLossError, StepSettings, evaluate, train_epoch
from contsparse.training.optim import OptimizerSettings, build_optimizer, learning_rate, set_learning_rate
from contsparse.training.rng import restore_rng, rng_state, seed_everything
from contsparse.training.speed import flush_denormals, tune_cpu_allocator

__all__ = ["EpochResult", "NonFiniteLossError", "OptimizerSettings", "StepSettings", "build_optimizer", "evaluate",
           "flush_denormals", "has_checkpoint", "learning_rate", "load_checkpoint", "restore_rng", "rng_state",
           "save_checkpoint", "seed_everything", "set_learning_rate", "train_epoch", "tune_cpu_allocator"]
