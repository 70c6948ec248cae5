"""Experiments: configuration, run directories and the driver that runs them."""

from contsparse.experiments.config import RunConfig, load_yaml, make_config
from contsparse.experiments.rundir import RunDir
from contsparse.experiments.runner import Runner, plan_phases

__all__ = ["RunConfig", "RunDir", "Runner", "load_yaml", "make_config", "plan_phases"]
