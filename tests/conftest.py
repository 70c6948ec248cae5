from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    """A tiny ImageNet-style folder: train/<class>/ with ``per_class`` JPEGs, val/<class>/ with one."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"img{i}.JPEG", quality=90)
