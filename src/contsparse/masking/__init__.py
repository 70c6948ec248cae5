"""How a CS mask attaches to any ``nn.Module``: soft/hard masks, temperature, penalty, accounting.

No training code lives here; methods and the training loop build on it.
"""

from contsparse.masking.accounting import count_zeros, per_layer_remaining, weights_remaining
from contsparse.masking.maskset import MaskSet, attach_masks, find_masks, plain_state_dict
from contsparse.masking.parametrization import ContinuousMask
from contsparse.masking.schedule import TemperatureSchedule
from contsparse.masking.selection import LayerSelection, owner_of

__all__ = ["ContinuousMask", "LayerSelection", "MaskSet", "TemperatureSchedule", "attach_masks",
           "count_zeros", "find_masks", "owner_of", "per_layer_remaining", "plain_state_dict",
           "weights_remaining"]
