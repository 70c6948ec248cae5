"""CIFAR-10/100 (tarball, extracted batches, download), image folders, synthetic data, augmentation,
on tiny files written in exactly the real formats."""

import dataclasses
import hashlib
import io
import pickle
import struct
import tarfile
import threading
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from contsparse.cli import main
from contsparse.data import DataOptions, load_dataset
from contsparse.data import cifar as cifar_module
from contsparse.data.augment import PadCropFlip, pad_crop_flip
from contsparse.errors import UserError


class Python2Pickler(pickle._Pickler):
    """Writes byte strings as Python 2's cPickle did (BINSTRING opcodes), as in the real CIFAR files."""

    def save_bytes(self, obj: bytes) -> None:
        size = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj if size < 256
                   else pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def cifar_batch(n: int, label_key: str, classes: int, seed: int, python2: bool = True) -> bytes:
    """A batch as the real files hold it: a protocol-2 pickle of a dict with data (N, 3072) uint8."""
    rng = np.random.default_rng(seed)
    batch = {"batch_label": "training batch", label_key: rng.integers(0, classes, n).tolist(),
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
    if not python2:  # as re-saved by Python 3
        return pickle.dumps(batch, protocol=2)
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    return buffer.getvalue()


def write_cifar(root: Path, variant, n: int = 40, as_tarball: bool = True, python2: bool = True):
    """Write the variant's files (tarball or extracted folder) and return it with their checksums."""
    files = {name: cifar_batch(n, variant.label_key, variant.num_classes, i, python2)
             for i, name in enumerate([*variant.train_files, *variant.test_files])}
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    if as_tarball:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{variant.folder}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (root / variant.archive).write_bytes(buffer.getvalue())
        archive_md5 = hashlib.md5(buffer.getvalue()).hexdigest()
    else:
        (root / variant.folder).mkdir(parents=True)
        for name, data in files.items():
            (root / variant.folder / name).write_bytes(data)
        archive_md5 = variant.archive_md5
    return dataclasses.replace(variant, archive_md5=archive_md5,
                               train_files={k: md5[k] for k in variant.train_files},
                               test_files={k: md5[k] for k in variant.test_files})


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tarball, python2", [(True, True), (False, True), (True, False)])
def test_cifar_from_tarball_or_folder(name, as_tarball, python2, tmp_path, monkeypatch):
    variant = write_cifar(tmp_path, cifar_module.VARIANTS[name], as_tarball=as_tarball, python2=python2)
    monkeypatch.setitem(cifar_module.VARIANTS, name, variant)
    data = load_dataset(name, tmp_path)
    train_files = len(variant.train_files) * 40
    assert len(data.train) + len(data.val) == train_files and len(data.test) == 40
    assert data.input_shape == (3, 32, 32) and data.num_classes == variant.num_classes
    assert data.train.x.shape[1:] == (3, 32, 32) and abs(float(data.train.x.mean())) < 1.5
    assert data.augment == PadCropFlip(cifar_module.black(variant))  # pads with black, not the mean colour
    assert data.augment.fill[0] == pytest.approx(-variant.mean[0] / variant.std[0])
    if not as_tarball:  # --data-dir naming the extracted folder itself finds the same batches
        inside = load_dataset(name, tmp_path / variant.folder)
        assert torch.equal(inside.test.x, data.test.x) and torch.equal(inside.train.y, data.train.y)



@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pixels_and_labels_are_the_files(name, tmp_path, monkeypatch):
    """Row i of a batch's (N, 3072) bytes is image i, channel-major (1024 red, green, blue values),
    each channel row by row; inputs are byte / 255 normalised per channel."""
    variant = write_cifar(tmp_path, cifar_module.VARIANTS[name], as_tarball=False)
    monkeypatch.setitem(cifar_module.VARIANTS, name, variant)
    data = load_dataset(name, tmp_path)
    raw = pickle.loads((tmp_path / variant.folder / next(iter(variant.test_files))).read_bytes(), encoding="latin1")
    pixels = torch.from_numpy(np.asarray(raw["data"])).float()
    for i, c, h, w in [(0, 0, 0, 0), (3, 1, 5, 17), (39, 2, 31, 31), (7, 2, 0, 31)]:
        expected = (pixels[i, c * 1024 + h * 32 + w] / 255 - variant.mean[c]) / variant.std[c]
        assert float(data.test.x[i, c, h, w]) == pytest.approx(float(expected), abs=1e-5)
    assert data.test.y.tolist() == raw[variant.label_key]

def test_cifar_corrupt_files_are_refused(tmp_path, monkeypatch):
    variant = write_cifar(tmp_path, cifar_module.CIFAR10)
    monkeypatch.setitem(cifar_module.VARIANTS, "cifar10", variant)
    archive = tmp_path / variant.archive
    archive.write_bytes(archive.read_bytes()[:-10])
    with pytest.raises(UserError, match="md5"):
        load_dataset("cifar10", tmp_path)


def test_malicious_cifar_batch_is_refused_without_running(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    variant = write_cifar(tmp_path, cifar_module.CIFAR10, as_tarball=False)
    evil = pickle.dumps(Evil(), protocol=2)
    (tmp_path / variant.folder / "data_batch_1").write_bytes(evil)
    variant = dataclasses.replace(variant, train_files={**variant.train_files,
                                                       "data_batch_1": hashlib.md5(evil).hexdigest()})
    monkeypatch.setitem(cifar_module.VARIANTS, "cifar10", variant)  # even with a matching checksum
    with pytest.raises(UserError, match="refused to load"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_cifar_download_from_a_local_server(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    variant = write_cifar(served, cifar_module.CIFAR10)
    monkeypatch.setitem(cifar_module.VARIANTS, "cifar10", variant)
    monkeypatch.setenv("CONTSPARSE_DATA", str(tmp_path / "cache"))
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        data = cifar_module.load_cifar(variant, None, mirrors=("http://127.0.0.1:9/", url))
    finally:
        server.shutdown()
    assert len(data.test) == 40
    assert (tmp_path / "cache" / "cifar10" / variant.archive).is_file()


def test_cifar_offline_message_names_the_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTSPARSE_DATA", str(tmp_path))
    with pytest.raises(UserError) as error:
        cifar_module.load_cifar(cifar_module.CIFAR10, None, mirrors=("http://127.0.0.1:9/",))
    assert "cifar-10-python.tar.gz" in str(error.value) and "--data-dir" in str(error.value)
    (tmp_path / "given").mkdir()
    with pytest.raises(UserError) as error:  # a given directory is never downloaded into
        cifar_module.load_cifar(cifar_module.CIFAR10, tmp_path / "given")
    assert "drop --data-dir" in str(error.value) and "internet" not in str(error.value)


def test_image_folder_batches_are_decoded_augmented_and_resumable(tmp_path):
    write_image_folder(tmp_path)
    data = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0))
    assert data.num_classes == 2 and data.input_shape == (3, 24, 24)
    assert len(data.train) + len(data.val) == 6 and len(data.test) == 2
    batches = data.train.batches(2, shuffle=True, seed=1)
    batches.set_epoch(3)
    full = list(batches)
    assert full[0][0].shape == (2, 3, 24, 24) and full[0][1].dtype == torch.long
    again = list(batches.iterate(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[1:], again, strict=True))
    batches.set_epoch(4)
    assert not torch.equal(torch.cat([x for x, _ in batches]), torch.cat([x for x, _ in full]))
    largest = data.train.batches(2, shuffle=True, seed=2**63 - 1)  # derived seeds beyond 64 bits are folded
    largest.set_epoch(5)
    assert sum(len(y) for _, y in largest) == len(data.train)


def test_image_folder_batches_decode_only_each_process_share(tmp_path):
    """Under data parallelism each process decodes its tensor_split share of every batch; the
    shares put together are the whole batch, and a batch smaller than the processes leaves some
    shares empty."""
    write_image_folder(tmp_path)
    data = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0))
    assert len(data.train) == 5  # batches of 2, 2 and 1
    whole = list(data.train.batches(2, shuffle=True, seed=1))
    shares = [list(data.train.batches(2, shuffle=True, seed=1, shard=(rank, 2))) for rank in (0, 1)]
    for (x, y), first, second in zip(whole, *shares, strict=True):
        assert first.global_size == second.global_size == len(y)
        assert torch.equal(torch.cat([first.x, second.x]), x) and torch.equal(torch.cat([first.y, second.y]), y)
    assert shares[1][-1].x.shape == (0, 3, 24, 24) and shares[1][-1].y.dtype == torch.long


def test_evaluation_of_shares_adds_up_over_the_processes(tmp_path):
    from contsparse.training import StepSettings, evaluate

    write_image_folder(tmp_path, per_class=3)
    test = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0)).test
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 2))
    cpu = torch.device("cpu")
    whole = evaluate(model, test.batches(2), cpu)
    sums = []  # each process's [loss, correct, seen]; every process gets the total back
    for rank in (0, 1):
        speed = StepSettings(shard=(rank, 2), all_sum=lambda values: sums.append(values) or values)
        evaluate(model, test.batches(2, shard=(rank, 2)), cpu, speed)
    loss, correct, seen = (sum(column) for column in zip(*sums, strict=True))
    assert seen == len(test) == 2 and [values[2] for values in sums] == [1, 1]  # one image each
    assert loss / seen == pytest.approx(whole.loss) and correct / seen == whole.accuracy


def test_image_folder_trains_through_the_cli_with_worker_processes(tmp_path, capsys):
    write_image_folder(tmp_path / "data", per_class=4)
    argv = ["train", "--model", "resnet18", "--dataset", "imagenet", "--data-dir", str(tmp_path / "data"),
            "--image-size", "32", "--workers", "2", "--epochs", "1", "--batch-size", "4", "--out",
            str(tmp_path / "run")]
    assert main(argv) == 0
    assert "resnet18 / imagenet" in capsys.readouterr().out


def test_image_folder_subset_spans_the_classes(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b", "c"), per_class=4)
    train = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0)).train
    small = train.subset(3)
    assert len(small) == 3 and sorted(small.y.tolist()) == [0, 1, 2]  # the first 3 files are of one class
    assert set(small.files) <= set(train.files) and train.subset(len(train)) is train


def test_a_broken_image_in_a_worker_process_is_one_line(tmp_path):
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / "cat" / "img0.JPEG"
    broken.write_bytes(broken.read_bytes()[:40])
    data = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=1))
    with pytest.raises(UserError) as error:
        for split in (data.train, data.val):
            list(split.batches(8))
    assert str(error.value).startswith(f"cannot decode image {broken}:") and "\n" not in str(error.value)


def test_image_folder_layout_errors(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="train/<class>/ and val/<class>/"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset("imagenet", None)


def test_image_folder_skips_hidden_entries_and_refuses_an_empty_class(tmp_path):
    """Hidden folders (.ipynb_checkpoints) and files (macOS ._x.JPEG) are not data; an empty class
    folder would be a dead output the model never sees an example of."""
    write_image_folder(tmp_path)
    for split in ("train", "val"):
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "cat" / "._img0.JPEG").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble, not an image
    data = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0))
    assert data.num_classes == 2 and len(data.train) + len(data.val) == 6
    (tmp_path / "train" / "aaa_empty").mkdir()
    with pytest.raises(UserError, match="aaa_empty holds no images"):
        load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0))


def test_image_folder_decodes_16_bit_images_and_names_undecodable_ones(tmp_path):
    from PIL import Image

    write_image_folder(tmp_path, per_class=1)
    for split in ("train", "val"):  # every image mid-grey in 16 bits: clipped, it would be white
        for path in (tmp_path / split).glob("*/*.JPEG"):
            path.unlink()
            Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(path.with_suffix(".png"))
    data = load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0))
    x, _ = next(iter(data.test.batches(2)))
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    pixels = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 255), atol=1e-5, rtol=0)
    bomb = next((tmp_path / "val").glob("*/*.png"))
    Image.new("1", (14_000, 14_000)).save(bomb)  # 196 M pixels: Pillow's decompression-bomb guard
    with pytest.raises(UserError, match=f"cannot decode image {bomb}"):
        list(load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0)).test.batches(2))


def test_a_flat_imagenet_val_folder_is_named_as_the_problem(tmp_path):
    write_image_folder(tmp_path)
    for folder in (tmp_path / "val").iterdir():  # ILSVRC's val archive: the images, no class folders
        for image in folder.iterdir():
            image.rename(tmp_path / "val" / f"{folder.name}_{image.name}")
        folder.rmdir()
    with pytest.raises(UserError, match="holds its images directly"):
        load_dataset("imagenet", tmp_path, DataOptions(image_size=24, workers=0))


def test_synthetic_data_of_any_shape():
    data = load_dataset("synthetic", None, DataOptions(synthetic_shape=(3, 8, 8), synthetic_classes=5,
                                                       synthetic_size=100))
    assert data.train.x.shape == (100, 3, 8, 8) and data.num_classes == 5 and int(data.train.y.max()) < 5


def test_pad_crop_flip_is_a_seeded_batched_crop():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    a = pad_crop_flip(x, torch.Generator().manual_seed(5), pad=2)
    b = pad_crop_flip(x, torch.Generator().manual_seed(5), pad=2)
    assert a.shape == x.shape and torch.equal(a, b)
    for image, original in zip(a, x, strict=True):  # every value is a pixel of the image or padding
        assert set(image.unique().tolist()) <= set(original.unique().tolist()) | {0.0}
    filled = pad_crop_flip(x, torch.Generator().manual_seed(5), pad=2, fill=(-1.0, -2.0, -3.0))
    for image, zero_padded in zip(filled, a, strict=True):  # the same crops, padded with fill
        for channel, value in enumerate((-1.0, -2.0, -3.0)):
            border = zero_padded[channel] == 0
            assert torch.equal(image[channel][~border], zero_padded[channel][~border])
            assert set(image[channel][border].tolist()) <= {value, 0.0}  # 0 is also a pixel value of x
    # with no padding, a crop is the image or its mirror
    c = pad_crop_flip(x, torch.Generator().manual_seed(1), pad=0)
    assert all(torch.equal(ci, xi) or torch.equal(ci, xi.flip(2)) for ci, xi in zip(c, x, strict=True))


def test_random_resized_crop_falls_back_to_the_centre_at_a_clamped_aspect_ratio():
    """An image no 3/4-4/3 crop of 8 % of its area fits in (here 1000 x 20) is cropped as
    torchvision does: centred, its aspect ratio clamped to 4/3 (27 x 20), not a 20 x 20 square."""
    from PIL import Image

    from contsparse.data.imagenet import _random_resized_crop

    image = Image.new("RGB", (1000, 20), (255, 0, 0))
    image.paste((0, 255, 0), (484, 0, 516, 20))  # green beside the centre's square, red further out
    image.paste((0, 0, 255), (490, 0, 510, 20))  # the centre's 20 x 20 square blue
    crop = _random_resized_crop(image, 8, torch.Generator().manual_seed(0))
    assert crop.size == (8, 8)
    assert crop.getpixel((0, 4))[1] > 200 and crop.getpixel((7, 4))[1] > 200  # the 27-wide crop's green edges
    assert crop.getpixel((4, 4)) == (0, 0, 255) and all(crop.getpixel((x, 4))[0] < 50 for x in range(8))
