"""CIFAR VGG-11/16/19 with batch norm, as in lottery-ticket work (Frankle & Carbin 2019, open_lth):
3x3 convs with BN and ReLU, max-pooling between stages, global average pooling, one Linear layer."""

from __future__ import annotations

import torch
from torch import nn

from contsparse.models.init import glorot_normal_
from contsparse.models.registry import register_model

POOL = "M"
CONFIGS: dict[int, list[int | str]] = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512],
    19: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL, 512, 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, depth: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vgg{depth} needs image inputs (C, H, W), got shape {input_shape}")
        channels = input_shape[0]
        layers: list[nn.Module] = []
        for item in CONFIGS[depth]:
            if item == POOL:
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        glorot_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _register(depth: int) -> None:
    @register_model(f"vgg{depth}", f"VGG-{depth} for CIFAR with batch norm (lottery-ticket variant)")
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return VGG(depth, input_shape, num_classes)


for _depth in CONFIGS:
    _register(_depth)
