"""Sparsification methods behind one interface (:class:`Method`)."""

from contsparse.methods.base import Method
from contsparse.methods.cs import ContinuousSparsification, CSSettings
from contsparse.methods.dense import Dense
from contsparse.methods.magnitude import (
    GivenMask,
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    MagnitudePruning,
    PruneSettings,
    RandomPruning,
)
from contsparse.methods.reparam import DiscoveringNeuralWirings, SoftThresholdReparametrization

METHODS = {"cs": ContinuousSparsification, "imp": IterativeMagnitudePruning, "magnitude": MagnitudePruning,
           "random": RandomPruning, "gmp": GradualMagnitudePruning, "str": SoftThresholdReparametrization,
           "dnw": DiscoveringNeuralWirings, "given": GivenMask}

__all__ = ["METHODS", "CSSettings", "ContinuousSparsification", "Dense", "DiscoveringNeuralWirings", "GivenMask",
           "GradualMagnitudePruning", "IterativeMagnitudePruning", "MagnitudePruning", "Method", "PruneSettings",
           "RandomPruning", "SoftThresholdReparametrization"]
