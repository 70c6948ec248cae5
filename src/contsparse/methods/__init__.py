"""Sparsification methods behind one interface (:class:`Method`)."""

from contsparse.methods.base import Method
from contsparse.methods.cs import ContinuousSparsification, CSSettings
from contsparse.methods.dense import Dense

METHODS = {"cs": ContinuousSparsification}

__all__ = ["METHODS", "CSSettings", "ContinuousSparsification", "Dense", "Method"]
