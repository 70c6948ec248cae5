"""Sparsification methods behind one interface (:class:`Method`)."""

from contsparse.methods.base import Method
from contsparse.methods.cs import ContinuousSparsification, CSSettings
from contsparse.methods.dense import Dense
from contsparse.methods.magnitude import (
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    MagnitudePruning,
    PruneSettings,
    RandomPruning,
)

METHODS = {"cs": ContinuousSparsification, "imp": IterativeMagnitudePruning, "magnitude": MagnitudePruning,
           "random": RandomPruning, "gmp": GradualMagnitudePruning}

__all__ = ["METHODS", "CSSettings", "ContinuousSparsification", "Dense", "GradualMagnitudePruning",
           "IterativeMagnitudePruning", "MagnitudePruning", "Method", "PruneSettings", "RandomPruning"]
