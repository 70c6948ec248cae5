"""ResNets: the CIFAR family (He et al. 2016: ResNet-20/32/56) and the ImageNet ResNet-18/50.

Parameter names follow torchvision (``conv1, bn1, layer1.0.conv1, ..., downsample.0, fc``), so an
ImageNet ``state_dict`` from torchvision loads as is, and masks can be chosen by the same names
(e.g. exclude ``downsample`` and ``fc``). The CIFAR models use a 1x1 conv + BN shortcut where the
shape changes, as open_lth does (272,474 parameters for ResNet-20); the CS reference code's 1x1
shortcut has no BN, and its masks leave the shortcut unmasked either way.
"""

from __future__ import annotations

import torch
from torch import nn

from contsparse.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: "ResNet v1.5"
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _stage(block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int,
           stride: int) -> tuple[nn.Sequential, int]:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


def _init(model: nn.Module, weights: str = "kaiming") -> None:
    """torchvision's ImageNet init (``kaiming``), or the CS reference code's for the CIFAR ResNets
    (``xavier``: Xavier-normal convolution and Linear weights, DESIGN.md section 1)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and weights == "kaiming":
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Conv2d | nn.Linear) and weights == "xavier":
            nn.init.xavier_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16-32-64 channels, ``n`` basic blocks per stage."""

    def __init__(self, depth: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 or len(input_shape) != 3:
            raise ValueError(f"resnet{depth}: depth must be 6n+2 and inputs (C, H, W), got {input_shape}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, inplanes = _stage(BasicBlock, 16, 16, blocks, 1)
        self.layer2, inplanes = _stage(BasicBlock, inplanes, 32, blocks, 2)
        self.layer3, inplanes = _stage(BasicBlock, inplanes, 64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _init(self, weights="xavier")  # as the CS reference code initialises its ResNet-20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet (same module names and shapes)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], input_shape: tuple[int, ...],
                 num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet needs image inputs (C, H, W), got shape {input_shape}")
        self.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        self.layer1, inplanes = _stage(block, inplanes, 64, layers[0], 1)
        self.layer2, inplanes = _stage(block, inplanes, 128, layers[1], 2)
        self.layer3, inplanes = _stage(block, inplanes, 256, layers[2], 2)
        self.layer4, inplanes = _stage(block, inplanes, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _register_cifar(depth: int) -> None:
    @register_model(f"resnet{depth}", f"ResNet-{depth} for CIFAR (He et al. 2016)")
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return CifarResNet(depth, input_shape, num_classes)


for _depth in (20, 32, 56):
    _register_cifar(_depth)


@register_model("resnet18", "ResNet-18 for ImageNet (torchvision parameter names)")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], input_shape, num_classes)


@register_model("resnet50", "ResNet-50 for ImageNet (torchvision parameter names)")
def resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], input_shape, num_classes)
