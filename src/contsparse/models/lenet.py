"""LeNet-300-100, the fully connected MNIST network of the lottery-ticket papers."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from contsparse.models.init import glorot_normal_
from contsparse.models.registry import register_model


class LeNet300(nn.Module):
    """784-300-100-10 MLP with ReLU (266,200 weights); flattens any input to ``in_features``."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, ...] = (300, 100)):
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.output = nn.Linear(sizes[-1], num_classes)
        glorot_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.output(x)


@register_model("lenet300", "LeNet-300-100 MLP (Frankle & Carbin 2019), 266k weights")
def lenet300(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LeNet300(math.prod(input_shape), num_classes)
