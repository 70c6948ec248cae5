"""Conv-2/4/6 of Frankle & Carbin (2019): VGG-like blocks of 3x3 convs, then three FC layers."""

from __future__ import annotations

import torch
from torch import nn

from contsparse.models.init import glorot_normal_
from contsparse.models.registry import register_model


class ConvNet(nn.Module):
    """``blocks`` pairs of 3x3 convs (64, 128, 256 channels), each pair followed by 2x2 max-pooling,
    then FC 256-256-classes. Built for any (C, H, W) input with H, W divisible by ``2**blocks``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, blocks: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"conv{2 * blocks} needs image inputs (C, H, W), got shape {input_shape}")
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for width_out in (64, 128, 256)[:blocks]:
            layers += [nn.Conv2d(channels, width_out, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width_out, width_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width_out
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"input {input_shape} is too small for conv{2 * blocks}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * height * width, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes))
        glorot_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("conv2", "Conv-2 (Frankle & Carbin 2019): 2 conv layers + 3 FC")
def conv2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ConvNet(input_shape, num_classes, 1)


@register_model("conv4", "Conv-4 (Frankle & Carbin 2019): 4 conv layers + 3 FC")
def conv4(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ConvNet(input_shape, num_classes, 2)


@register_model("conv6", "Conv-6 (Frankle & Carbin 2019): 6 conv layers + 3 FC")
def conv6(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ConvNet(input_shape, num_classes, 3)
