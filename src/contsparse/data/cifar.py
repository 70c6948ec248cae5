"""CIFAR-10 and CIFAR-100 from the standard python tarball or its extracted batches.

Every file is checked against the published MD5 before it is parsed, and the pickled batches are
read with the numpy-only unpickler (never ``pickle.load``). The last 5,000 training images are the
validation split; the 10,000 test images stay separate. Training batches get pad-4 random crops
and horizontal flips, done on whole batches.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contsparse.data.augment import PadCropFlip
from contsparse.data.download import data_root, fetch_verified, require_data_dir
from contsparse.data.safe_pickle import load_numpy_pickle
from contsparse.data.splits import DatasetSplits, TensorSplit
from contsparse.errors import UserError
from contsparse.storage import file_digest

VALIDATION_SIZE = 5_000
MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)


@dataclass(frozen=True)
class CifarVariant:
    name: str
    archive: str
    archive_md5: str
    folder: str
    train_files: dict[str, str]  # file in the folder -> md5
    test_files: dict[str, str]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarVariant(
    "cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
    {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
     "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
     "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"},
    {"test_batch": "40351d587109b95175f43aff81a1287e"}, "labels", 10,
    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarVariant(
    "cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
    {"train": "16019d7e3df5f24257cddd939b257f8d"}, {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    "fine_labels", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
VARIANTS = {v.name: v for v in (CIFAR10, CIFAR100)}


def load_cifar(variant: CifarVariant, data_dir: str | Path | None = None, download: bool = True,
               mirrors: tuple[str, ...] = MIRRORS) -> DatasetSplits:
    """Find CIFAR in ``data_dir`` (extracted folder or tarball), else in the cache, else download."""
    explicit = data_dir is not None
    directory = Path(data_dir) if explicit else data_root() / variant.name
    if explicit:
        require_data_dir(directory)
    batches = _from_directory(variant, directory)
    fetched = batches is None and download and not explicit and fetch_verified(
        variant.archive, variant.archive_md5, directory / variant.archive, mirrors)
    if fetched:
        batches = _from_directory(variant, directory)
    if batches is None:
        where = f"Put {variant.archive} or its extracted folder {variant.folder}/ there"
        if explicit:  # a given directory is only read, never downloaded into
            raise UserError(f"{variant.name} not found in {directory}. {where}, or drop --data-dir to use the "
                            f"cache ({data_root() / variant.name}), downloaded into when online")
        raise UserError(f"{variant.name} not found in {directory}. {where} (or in --data-dir), or connect to the "
                        f"internet so it can be downloaded from {MIRRORS[0]}")
    return _split(variant, *batches)


def _from_directory(variant: CifarVariant, directory: Path) -> tuple[list[dict], list[dict]] | None:
    folder = directory / variant.folder
    if not folder.is_dir() and any((directory / name).is_file() for name in (*variant.train_files, "batches.meta")):
        folder = directory  # --data-dir names the extracted folder itself
    if folder.is_dir():
        return ([_read_batch(folder / n, md5) for n, md5 in variant.train_files.items()],
                [_read_batch(folder / n, md5) for n, md5 in variant.test_files.items()])
    archive = directory / variant.archive
    if archive.is_file():
        return _read_archive(variant, archive)
    return None


def _read_batch(path: Path, md5: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: the extracted CIFAR folder is incomplete; extract the tarball again")
    digest = file_digest(path, "md5")
    if digest != md5:
        raise UserError(f"{path} has md5 {digest}, expected {md5}: the file is corrupt; extract it again")
    return _parse_batch(path.read_bytes(), str(path))


def _read_archive(variant: CifarVariant, archive: Path) -> tuple[list[dict], list[dict]]:
    digest = file_digest(archive, "md5")
    if digest != variant.archive_md5:
        raise UserError(f"{archive} has md5 {digest}, expected {variant.archive_md5}: the file is corrupt or "
                        "incomplete; delete it and fetch it again")
    try:
        with tarfile.open(archive, "r:gz") as tar:  # read in memory: nothing is extracted to disk
            def member(name: str) -> bytes:
                handle = tar.extractfile(f"{variant.folder}/{name}")
                if handle is None:
                    raise KeyError(name)
                return handle.read()

            return ([_parse_batch(member(n), f"{archive}:{n}") for n in variant.train_files],
                    [_parse_batch(member(n), f"{archive}:{n}") for n in variant.test_files])
    except (tarfile.TarError, KeyError, OSError, EOFError) as err:
        raise UserError(f"{archive} is not a valid CIFAR archive ({err}); delete it and fetch it again") from err


def _parse_batch(data: bytes, source: str) -> dict:
    batch = load_numpy_pickle(io.BytesIO(data), source)
    if isinstance(batch, dict):  # python-2 pickles: str keys once decoded as latin-1; accept bytes too
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch:
        raise UserError(f"{source} is not a CIFAR batch (no data array)")
    return batch


def _split(variant: CifarVariant, train: list[dict], test: list[dict]) -> DatasetSplits:
    def stack(batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        if any(variant.label_key not in b for b in batches):
            raise UserError(f"a {variant.name} batch has no {variant.label_key!r}: is this {variant.name}?")
        y = np.concatenate([np.asarray(b[variant.label_key], dtype=np.int64) for b in batches])
        mean = torch.tensor(variant.mean).view(1, 3, 1, 1)
        std = torch.tensor(variant.std).view(1, 3, 1, 1)
        return (torch.from_numpy(x).float().div_(255.0) - mean) / std, torch.from_numpy(y)

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    cut = max(len(train_y) - VALIDATION_SIZE, len(train_y) * 9 // 10)
    return DatasetSplits(variant.name, TensorSplit(train_x[:cut], train_y[:cut]),
                         TensorSplit(train_x[cut:], train_y[cut:]), TensorSplit(test_x, test_y),
                         (3, 32, 32), variant.num_classes, augment=PadCropFlip(black(variant)))


def black(variant: CifarVariant) -> tuple[float, float, float]:
    """A black pixel after normalisation: the padding of the random crops."""
    return tuple(-m / s for m, s in zip(variant.mean, variant.std, strict=True))  # type: ignore[return-value]
