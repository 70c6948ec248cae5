"""ImageNet (or any image classification set) from the usual class-folder layout.

``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``; classes are the sorted folder names
of ``train``. The ``val`` folder is the test split (as in every ImageNet paper) and a seeded
hold-out of the training images is the validation split. Images are decoded and augmented by
DataLoader worker processes (random resized crop + flip for training; resize and centre crop for
evaluation), each image drawing from a generator seeded by (seed, epoch, index), so batches are
reproducible and an epoch can resume mid-way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from contsparse.data.download import require_data_dir
from contsparse.data.splits import DatasetSplits, Shard, ShareOfBatch
from contsparse.errors import UserError
from contsparse.seeds import seeded_generator

EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VALIDATION_FRACTION = 0.01


@dataclass(frozen=True)
class FolderSplit:
    """Image files with labels; decoded on demand. Quacks like a TensorSplit where the runner asks."""

    files: tuple[str, ...]
    y: Tensor
    train: bool
    image_size: int = 224
    workers: int = 4

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, n: int) -> FolderSplit:
        """``n`` images spread evenly over the split: the files are sorted by class, so the first
        ``n`` would all be of the first classes."""
        if n >= len(self):
            return self
        picked = [(2 * i + 1) * len(self) // (2 * n) for i in range(n)]  # the middles of n equal slices
        return replace(self, files=tuple(self.files[i] for i in picked), y=self.y[picked])

    def to(self, device: torch.device | str) -> FolderSplit:
        return self  # batches are moved to the device as they are served

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, augment=None,
                shard: Shard | None = None) -> FolderBatches:
        return FolderBatches(self, batch_size, shuffle, seed, shard)


class _Images(Dataset):
    def __init__(self, split: FolderSplit, seed: int, epoch: int) -> None:
        self.split, self.seed, self.epoch = split, seed, epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image  # in the worker: decoding is the slow part

        path = self.split.files[index]
        try:
            with Image.open(path) as image:
                image = _rgb(image)
                size = self.split.image_size
                if self.split.train:
                    generator = seeded_generator((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
                    image = _random_resized_crop(image, size, generator)
                    if torch.rand((), generator=generator) < 0.5:
                        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                else:
                    image = _resize_centre_crop(image, size)
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # ValueError: an oversized PNG chunk
            raise UserError(f"cannot decode image {path}: {err}") from err
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        x = pixels.permute(2, 0, 1).float().div_(255.0)
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        return x, int(self.split.y[index])


def _rgb(image):
    """8-bit RGB. 16- and 32-bit grey images (16-bit PNGs, TIFFs) are scaled from 16 bits:
    ``convert("RGB")`` clips them, and mid-grey would become white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        import numpy as np
        from PIL import Image

        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray(np.clip(pixels >> 8, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ValueError("32-bit float pixels have no agreed range; convert the image to 8 or 16 bits")
    return image.convert("RGB")


def _random_resized_crop(image, size: int, generator: torch.Generator):
    """Inception-style crop: 8-100 % of the area, aspect ratio 3/4-4/3, resized to ``size``."""
    from PIL import Image

    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * (0.08 + 0.92 * torch.rand((), generator=generator).item())
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=generator).item()
        ratio = math.exp(log_ratio)
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    # no fit in 10 tries (an extreme aspect ratio): the whole image, its ratio clamped to 3/4-4/3, centred
    w, h = min(width, round(height * 4 / 3)), min(height, round(width * 4 / 3))
    left, top = (width - w) / 2, (height - h) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def _resize_centre_crop(image, size: int, scale: float = 256 / 224):
    from PIL import Image

    width, height = image.size
    side = min(width, height) / scale  # the centre square that becomes the crop after resizing
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


class FolderBatches:
    """Mini-batches of a :class:`FolderSplit` decoded by DataLoader workers; same interface as
    :class:`~contsparse.data.splits.BatchIterator` (``set_epoch``, ``iterate(start)``). With a
    ``shard`` only the process's :class:`ShareOfBatch` of each batch is decoded."""

    def __init__(self, split: FolderSplit, batch_size: int, shuffle: bool, seed: int,
                 shard: Shard | None = None) -> None:
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.shard = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self):
        return self.iterate()

    def iterate(self, start: int = 0):
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=seeded_generator(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(n)
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, len(self))]
        shares = batches if self.shard is None else [b.tensor_split(self.shard[1])[self.shard[0]] for b in batches]
        loader = DataLoader(_Images(self.split, self.seed, self.epoch), batch_sampler=[b.tolist() for b in shares],
                            num_workers=self.split.workers, pin_memory=torch.cuda.is_available(),
                            persistent_workers=False, collate_fn=functools.partial(_collate, self.split.image_size))
        try:
            if self.shard is None:
                yield from loader
            else:
                for (x, y), whole in zip(loader, batches, strict=True):
                    yield ShareOfBatch(x, y, len(whole))
        except UserError as err:  # raised in a worker, whose traceback the DataLoader puts in the message
            raise UserError(_original_message(str(err))) from None


def _collate(size: int, samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Stack decoded images and their labels; a process's share of a batch smaller than the
    number of processes may be empty."""
    if not samples:
        return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples], dtype=torch.long)


def _original_message(message: str) -> str:
    """A worker's UserError message without the DataLoader's "Caught UserError in ..." traceback."""
    _, marker, original = message.rstrip().rpartition("UserError: ")
    return original if marker else message


def _visible_folders(root: Path) -> list[Path]:
    """Class folders, sorted; hidden ones (``.ipynb_checkpoints``, ``.DS_Store`` folders) are not classes."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(directory: Path | None, image_size: int = 224, workers: int = 4) -> DatasetSplits:
    if directory is None:
        raise UserError("imagenet needs --data-dir pointing at a folder with train/<class>/ and val/<class>/")
    require_data_dir(directory, "give the folder that holds train/ and val/")
    train_dir, val_dir = directory / "train", directory / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"{directory} must hold train/<class>/ and val/<class>/ image folders")
    classes = [p.name for p in _visible_folders(train_dir)]
    if not classes:
        raise UserError(f"{train_dir} has no class folders")
    index = {name: i for i, name in enumerate(classes)}

    def listing(root: Path) -> tuple[list[str], list[int]]:
        files, labels = [], []
        for folder in _visible_folders(root):
            if folder.name not in index:
                raise UserError(f"{folder} is a class that {train_dir} does not have")
            images = [str(path) for path in sorted(folder.iterdir())
                      if path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")]
            if not images and root == train_dir:  # a dead output for a class it never sees
                raise UserError(f"{folder} holds no images ({', '.join(EXTENSIONS)}): remove it or fill it")
            files += images
            labels += [index[folder.name]] * len(images)
        return files, labels

    files, labels = listing(train_dir)
    test_files, test_labels = listing(val_dir)
    if not test_files and any(p.suffix.lower() in EXTENSIONS for p in val_dir.iterdir()):
        raise UserError(f"{val_dir} holds its images directly, as ILSVRC's val archive unpacks: sort them into "
                        "val/<class>/ folders named as in train/ (ILSVRC's devkit lists each image's class)")
    if not files or not test_files:
        raise UserError(f"no images ({', '.join(EXTENSIONS)}) in {train_dir} or {val_dir}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    held = max(1, int(len(files) * VALIDATION_FRACTION))
    val_idx, train_idx = sorted(order[:held]), sorted(order[held:])

    def split(idx: list[int], source: list[str], y: list[int], train: bool) -> FolderSplit:
        return FolderSplit(tuple(source[i] for i in idx), torch.tensor([y[i] for i in idx], dtype=torch.long),
                           train, image_size, workers)

    return DatasetSplits("imagenet", split(train_idx, files, labels, True), split(val_idx, files, labels, False),
                         split(list(range(len(test_files))), test_files, test_labels, False),
                         (3, image_size, image_size), len(classes))
