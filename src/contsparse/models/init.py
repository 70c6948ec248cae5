"""Weight initialisation shared by the lottery-ticket models."""

from torch import nn


def glorot_normal_(model: nn.Module) -> nn.Module:
    """Glorot (Xavier) normal weights and zero biases for every Linear/Conv, as in Frankle & Carbin."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
