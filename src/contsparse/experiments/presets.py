"""Named configurations reproducing the paper's settings: ``--preset NAME`` fills every default.

Values come from the reference code's defaults (DESIGN.md section 1 and 3) where they are given
(CIFAR: 85 epochs per round, batch 128, SGD 0.1 with drops at epochs 56 and 71, Nesterov momentum
for weights and mask logits alike, only the 3x3 convs masked; ``s0 = -0.05`` where the reference
defaults to 0, which keeps more weights); IMP run with them prunes globally, as Frankle et al. and
open_lth do for these networks, over the masked layers (open_lth prunes ResNet-20's 1x1 shortcut
convs and classifier too). Conv-2/4/6 follow Frankle & Carbin (2019): Adam, batch 60, their
iteration counts in epochs of 45,000 images, conv layers pruned at 10 % (Conv-6: 15 %) per IMP
round, fully connected ones at 20 %, the output layer at 10 %, weights reset to iteration 0.
ImageNet follows the usual ResNet-50 recipe. Precedence: preset < ``--config`` < flags.
"""

from __future__ import annotations

from typing import Any

from contsparse.errors import UserError

_CIFAR_TICKET: dict[str, Any] = {
    "command": "ticket", "dataset": "cifar10", "epochs": 85, "rounds": 3, "ticket_epochs": None,
    "rewind_epoch": 2, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
    "weight_decay": 1e-4, "lr_schedule": "step", "lr_milestones": [56, 71], "lr_gamma": 0.1,
    "mask_init": -0.05, "penalty": 1e-8, "final_temp": 200.0, "mask_optimizer": "sgd", "mask_lr": 0.1,
    "mask_momentum": 0.9, "mask_nesterov": True, "prune_scope": "global", "synthetic_shape": [3, 32, 32],
    "synthetic_classes": 10,
}


def _frankle_carbin_conv(model: str, lr: float, iterations: int, conv_fraction: float) -> dict[str, Any]:
    """Frankle & Carbin's Conv-2/4/6 settings (their Figure 2); epochs of 45,000 images at batch 60."""
    return {"command": "ticket", "model": model, "dataset": "cifar10", "epochs": round(iterations / 750),
            "rounds": 2, "ticket_epochs": None, "rewind_epoch": 0, "batch_size": 60, "optimizer": "adam", "lr": lr,
            "lr_schedule": "constant", "prune_scope": "layerwise", "prune_fraction": 0.2, "prune_fraction_last": 0.1,
            "prune_fraction_conv": conv_fraction, "synthetic_shape": [3, 32, 32], "synthetic_classes": 10}


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mnist-lenet300-ticket": (
        "LeNet-300-100 on MNIST (the defaults): Frankle & Carbin's optimiser, batch and data split, a short "
        "CPU schedule (2 rounds of 8 epochs, 15-epoch ticket, rewind to epoch 2)", {"command": "ticket"}),
    "cifar10-resnet20-ticket": (
        "ResNet-20 on CIFAR-10: 3 CS rounds of 85 epochs, rewind to epoch 2, 3x3 convs masked",
        {**_CIFAR_TICKET, "model": "resnet20", "mask_exclude": ["downsample", "^fc$"]}),
    "cifar10-vgg16-ticket": (
        "VGG-16 (BN) on CIFAR-10: 3 CS rounds of 85 epochs, rewind to epoch 2, convs masked",
        {**_CIFAR_TICKET, "model": "vgg16", "mask_exclude": ["^fc$"]}),
    "cifar10-conv2-ticket": (
        "Conv-2 on CIFAR-10, Frankle & Carbin settings: Adam 2e-4, 27 epochs (20K iterations) per round, "
        "reset to iteration 0; IMP prunes convs at 10 %",
        _frankle_carbin_conv("conv2", 2e-4, 20_000, 0.1)),
    "cifar10-conv4-ticket": (
        "Conv-4 on CIFAR-10, Frankle & Carbin settings: Adam 3e-4, 33 epochs (25K iterations) per round, "
        "reset to iteration 0; IMP prunes convs at 10 %",
        _frankle_carbin_conv("conv4", 3e-4, 25_000, 0.1)),
    "cifar10-conv6-ticket": (
        "Conv-6 on CIFAR-10, Frankle & Carbin settings: Adam 3e-4, 40 epochs (30K iterations) per round, "
        "reset to iteration 0; IMP prunes convs at 15 %",
        _frankle_carbin_conv("conv6", 3e-4, 30_000, 0.15)),
    "imagenet-resnet50-prune": (
        "ResNet-50 on ImageNet: one CS round of 90 epochs (cosine lr), then 10 epochs of fine-tuning",
        {"command": "prune", "model": "resnet50", "dataset": "imagenet", "epochs": 90, "rounds": 1,
         "ticket_epochs": 10, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
         "weight_decay": 1e-4, "lr_schedule": "cosine", "mask_init": 0.0, "penalty": 1e-8,
         "penalty_normalize": False, "final_temp": 200.0, "mask_lr": 0.1, "mask_momentum": 0.9, "mask_nesterov": True,
         "mask_exclude": ["downsample", "^fc$"], "image_size": 224, "workers": 8,
         "synthetic_shape": [3, 224, 224], "synthetic_classes": 1000}),
}


def preset_values(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name][1])
    except KeyError:
        raise UserError(f"unknown preset {name!r}; available: {', '.join(PRESETS)} (see: contsparse presets)") from None
