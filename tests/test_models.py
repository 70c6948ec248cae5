"""The model registry: published parameter counts, forward shapes, torchvision-compatible names."""

import pytest
import torch

from contsparse.masking import LayerSelection, attach_masks
from contsparse.models import available_models, build_model

# name -> (input shape, classes, parameters): published counts (torchvision for the ImageNet ResNets)
COUNTS = {
    "lenet300": ((1, 28, 28), 10, 266_610),
    # Frankle & Carbin list 4.3M, 2.4M and 1.7M; their own layer description (3x3 same convs of
    # 64/128/256 in pairs, 2x2 pools, FC 256-256-10) gives 2.26M for Conv-6, as here
    "conv2": ((3, 32, 32), 10, 4_301_642),
    "conv4": ((3, 32, 32), 10, 2_425_930),
    "conv6": ((3, 32, 32), 10, 2_262_602),
    "resnet20": ((3, 32, 32), 10, 272_474),
    "resnet32": ((3, 32, 32), 10, 466_906),
    "resnet56": ((3, 32, 32), 10, 855_770),
    "vgg11": ((3, 32, 32), 10, 9_231_114),
    "vgg16": ((3, 32, 32), 10, 14_728_266),
    "vgg19": ((3, 32, 32), 10, 20_040_522),
    "resnet18": ((3, 224, 224), 1000, 11_689_512),
    "resnet50": ((3, 224, 224), 1000, 25_557_032),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_and_forward_shapes(name):
    shape, classes, count = COUNTS[name]
    model = build_model(name, shape, classes)
    assert sum(p.numel() for p in model.parameters()) == count
    small = (3, 64, 64) if name in ("resnet18", "resnet50") else shape  # any size works; keep it quick
    with torch.no_grad():
        assert model.eval()(torch.randn(2, *small)).shape == (2, classes)


def test_every_registered_model_is_covered():
    assert set(COUNTS) <= set(available_models())  # (other tests register models of their own)


def test_imagenet_resnets_use_torchvision_names():
    state = build_model("resnet50", (3, 224, 224), 1000).state_dict()
    assert len(state) == 320  # as torchvision's resnet50
    for key, shape in {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                       "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer3.5.bn2.running_var": (256,),
                       "fc.weight": (1000, 2048)}.items():
        assert tuple(state[key].shape) == shape
    assert len(build_model("resnet18", (3, 224, 224), 1000).state_dict()) == 122


def test_cs_masks_attach_to_the_3x3_convs_of_resnet20():
    model = build_model("resnet20", (3, 32, 32), 10)
    masks = attach_masks(model, 0.0, selection=LayerSelection(exclude=("downsample", "^fc$")))
    assert len(masks.masks) == 19 and all("downsample" not in n and n != "fc.weight" for n in masks.masks)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_initialisation_follows_the_references():
    """CIFAR ResNets: Xavier-normal as in the CS reference code; ImageNet ResNets: torchvision's
    Kaiming (fan-out); Frankle & Carbin's models: Glorot normal. Checked by each layer's std."""
    import math

    torch.manual_seed(0)
    cifar = build_model("resnet20", (3, 32, 32), 10)
    conv = cifar.layer2[1].conv1.weight  # 32 -> 32 channels, 3x3
    xavier = math.sqrt(2 / (32 * 9 + 32 * 9))
    assert conv.std().item() == pytest.approx(xavier, rel=0.05)
    assert cifar.fc.weight.std().item() == pytest.approx(math.sqrt(2 / (64 + 10)), rel=0.15)
    imagenet = build_model("resnet18", (3, 64, 64), 10)
    kaiming = math.sqrt(2 / (128 * 9))  # fan-out of a 128 -> 128 3x3 conv
    assert imagenet.layer2[1].conv1.weight.std().item() == pytest.approx(kaiming, rel=0.05)
    lenet = build_model("lenet300", (1, 28, 28), 10)
    assert lenet.hidden[0].weight.std().item() == pytest.approx(math.sqrt(2 / (784 + 300)), rel=0.05)
