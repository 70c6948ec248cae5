"""contsparse: Continuous Sparsification for PyTorch.

Learned L0 masks on any model, lottery-ticket search and pruning.
"""

from contsparse.masking import LayerSelection, MaskSet, TemperatureSchedule, attach_masks, find_masks

__version__ = "0.1.0"

__all__ = ["LayerSelection", "MaskSet", "TemperatureSchedule", "__version__", "attach_masks", "find_masks"]
