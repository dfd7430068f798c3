"""Datasets for fine-tuning and evaluating converted models: digits, CIFAR-10/100, SVHN, image folders.

Every dataset comes back as train/test splits of ``(normalized float32 CxHxW tensor, int label)`` items,
preprocessed the way the model expects (its data config's mean, std and interpolation), together with
the normalization that was applied, so that attacks can map inputs back to pixel space [0, 1].

CIFAR's files are pickles; they are read with an unpickler that can only rebuild numpy arrays, so a
tampered download cannot run code. Downloads are optional: offline, the error says where to put the files.
"""

from __future__ import annotations

import http.client
import os
import pickle
import tarfile
import warnings
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .errors import LcnnError, first_line
from .models import DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, DataConfig

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "folder:PATH")
FOLDER_PREFIX = "folder:"
NATIVE_SIZE = 32  # digits (after upsampling), CIFAR and SVHN

# Failures a download can end in: no network (URLError is an OSError), HTTP errors, a bad checksum
# (torchvision raises RuntimeError), a broken archive.
DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, http.client.HTTPException, tarfile.TarError)

# Globals a CIFAR pickle needs to rebuild its numpy arrays and (Python 3 protocol 2) bytes objects.
# numpy 2 renamed numpy.core to numpy._core; files written by either must load.
ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


@dataclass(frozen=True)
class _CifarLayout:
    """Where one CIFAR variant lives on disk and which pickle keys hold its labels."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    labels_key: bytes
    names_key: bytes
    num_classes: int
    url: str
    archive: str
    archive_md5: str


CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{index}" for index in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        labels_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _CifarLayout(
        name="cifar100",
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        labels_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}

SVHN_PAGE = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {  # split -> (file name, md5), as torchvision.datasets.SVHN has them
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}


@dataclass
class DatasetSplits:
    """A dataset's two splits and what a caller needs to undo or repeat their preprocessing."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    interpolation: str = "bilinear"
    train_unaugmented: Dataset | None = None  # the train split with the test split's preprocessing

    @property
    def calibration_pool(self) -> Dataset:
        """Train images as the model sees them at test time: what beta is calibrated on."""
        return self.train_unaugmented if self.train_unaugmented is not None else self.train


@dataclass(frozen=True)
class _Preprocessing:
    size: int
    interpolation: InterpolationMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class _ArrayImageDataset(Dataset):
    """HxWx3 uint8 images held in memory and transformed one at a time, so augmentation differs per epoch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]):
        self.images = images
        self.targets = [int(label) for label in labels]  # as torchvision datasets name them
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


class _GrayscaleTensorDataset(Dataset):
    """Resized 1xHxW images in [0, 1], served as normalized RGB; storing one channel keeps large sizes small."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.images = images
        self.targets = [int(label) for label in labels]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return (self.images[index].expand(3, -1, -1) - self.mean) / self.std, self.targets[index]


def default_data_dir() -> Path:
    """Where datasets are cached: $LCNN_DATA_DIR, else $XDG_CACHE_HOME (or ~/.cache)/lcnn_convert/datasets."""
    if os.environ.get("LCNN_DATA_DIR"):
        return Path(os.environ["LCNN_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "lcnn_convert" / "datasets"


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    data_config: DataConfig | Mapping[str, Any] | None = None,
    image_size: int | None = None,
    download: bool = True,
) -> DatasetSplits:
    """Load a dataset's train and test splits, preprocessed for a model with ``data_config``.

    ``name`` is one of DATASETS; ``folder:PATH`` reads PATH/train/<class>/* and PATH/val/<class>/*.
    ``data_config`` is what ``models.data_config`` returns, or a timm-style dict (default: ImageNet
    mean/std, bilinear).
    Output images are ``image_size`` pixels square: by default 32 for the 32x32 datasets (their own
    size; upscaling them to the model's 224 would only cost time) and the model's input size for folders.
    """
    config = data_config.to_dict() if isinstance(data_config, DataConfig) else dict(data_config or {})
    normalized_name = name.strip()
    is_folder = normalized_name.lower().startswith(FOLDER_PREFIX)
    if not is_folder:
        normalized_name = normalized_name.lower()
    if not is_folder and normalized_name not in ("digits", "svhn", *CIFAR_LAYOUTS):
        raise LcnnError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    default_size = int(config.get("input_size", DEFAULT_INPUT_SIZE)[-1]) if is_folder else NATIVE_SIZE
    preprocessing = _preprocessing(config, default_size if image_size is None else image_size)
    if is_folder:
        return _load_folder(normalized_name[len(FOLDER_PREFIX) :], preprocessing)
    if normalized_name == "digits":
        return _load_digits(preprocessing)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if normalized_name == "svhn":
        return _load_svhn(root, preprocessing, download)
    return _load_cifar(CIFAR_LAYOUTS[normalized_name], root, preprocessing, download)


def _preprocessing(config: Mapping[str, Any], size: Any) -> _Preprocessing:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LcnnError(f"image size must be a positive integer, got {size!r}")
    interpolation = config.get("interpolation", "bilinear")
    try:
        mode = InterpolationMode(interpolation)
    except ValueError:
        valid = ", ".join(option.value for option in InterpolationMode)
        raise LcnnError(f"unknown interpolation '{interpolation}' in the data config: use one of {valid}") from None
    statistics = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        values = tuple(float(value) for value in config.get(key, default))
        if len(values) != 3 or (key == "std" and min(values) <= 0):
            raise LcnnError(f"data config {key} must be 3 {'positive ' if key == 'std' else ''}numbers, got {values}")
        statistics[key] = values
    return _Preprocessing(size, mode, statistics["mean"], statistics["std"])


def _pil_transform(
    preprocessing: _Preprocessing, native_size: int | None, crop: bool, flip: bool
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side and center-crop (keeps the aspect ratio; skipped at ``native_size``), optionally
    augment, then turn into a normalized tensor.

    Augmentation runs at the output size, so the crop padding is the CIFAR recipe's 4 pixels per 32.
    """
    size = preprocessing.size
    steps: list[Callable] = []
    if native_size != size:
        steps += [transforms.Resize(size, interpolation=preprocessing.interpolation), transforms.CenterCrop(size)]
    if crop:
        steps.append(transforms.RandomCrop(size, padding=round(size / 8)))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std)]
    return transforms.Compose(steps)


class UnreadableExample(LcnnError):
    """An example of a dataset could not be read or decoded."""


class _ReadChecked(Dataset):
    """A dataset whose unreadable examples (a truncated or corrupt image file, ...) raise one clear line."""

    def __init__(self, dataset: Dataset, split: str) -> None:
        self.dataset = dataset
        self.split = split
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        if not isinstance(self.dataset, Sized):
            raise TypeError(
                f"{type(self.dataset).__name__} has no length: a map-style dataset (with __len__) is needed"
            )
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken files
            samples = getattr(self.dataset, "samples", None)
            where = f" ({samples[index][0]})" if samples else ""
            raise UnreadableExample(
                f"cannot read {self.split} example {index}{where}: {first_line(error)}; fix or remove it"
            ) from error


# Pillow's modes for 16-bit greyscale (PNG, TIFF); Image.convert("RGB") clips them to white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: str) -> Image.Image:
    """An RGB image, decoded faithfully: 16-bit greyscale is scaled to 8 bits, not clipped, and an image
    that would decompress to more pixels than Pillow's limit (a decompression bomb) is refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with open(path, "rb") as handle:
                image = Image.open(handle)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"refusing a decompression bomb: {first_line(error, 120)}") from None
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{image.mode} image with values outside 16 bits: refusing to guess its range")
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point image (mode F): convert it to 8- or 16-bit PNG/JPEG first")
    return image.convert("RGB")


def _image_files(
    directory: str, class_to_idx: dict[str, int], extensions=None, is_valid_file=None, allow_empty: bool = False
) -> list[tuple[str, int]]:
    """ImageFolder's listing, following symlinked folders but never one already visited (a link to an
    ancestor would otherwise list a class again and again)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    extensions = IMG_EXTENSIONS if extensions is None and is_valid_file is None else extensions
    if is_valid_file is None:

        def is_valid_file(path: str) -> bool:
            return has_file_allowed_extension(path, extensions)

    samples = []
    for class_name in sorted(class_to_idx):
        seen: set[tuple[int, int]] = set()
        for root, folders, files in os.walk(os.path.join(directory, class_name), followlinks=True):
            status = os.stat(root)
            if (status.st_dev, status.st_ino) in seen:
                folders[:] = []
                continue
            seen.add((status.st_dev, status.st_ino))
            folders.sort()
            samples += [
                (os.path.join(root, name), class_to_idx[class_name])
                for name in sorted(files)
                if is_valid_file(os.path.join(root, name))
            ]
    if not samples and not allow_empty:
        raise FileNotFoundError(f"no valid image files in {directory}")
    return samples


def _image_folder(directory: Path, transform: Callable):
    from torchvision.datasets import ImageFolder

    class _SafeImageFolder(ImageFolder):
        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            return _image_files(directory, class_to_idx, extensions, is_valid_file, allow_empty)

    return _SafeImageFolder(str(directory), transform=transform, loader=read_image)


def _splits(
    name: str,
    train: Dataset,
    test: Dataset,
    classes: list[str],
    preprocessing: _Preprocessing,
    train_unaugmented: Dataset | None = None,
) -> DatasetSplits:
    if len(classes) < 2:
        raise LcnnError(
            f"dataset {name} has {len(classes)} class ({', '.join(classes)}): a classifier needs at least 2"
        )
    return DatasetSplits(
        name=name,
        train=_ReadChecked(train, "train"),
        test=_ReadChecked(test, "test"),
        num_classes=len(classes),
        classes=classes,
        mean=preprocessing.mean,
        std=preprocessing.std,
        image_size=preprocessing.size,
        interpolation=preprocessing.interpolation.value,
        train_unaugmented=None if train_unaugmented is None else _ReadChecked(train_unaugmented, "train"),
    )


def _load_digits(preprocessing: _Preprocessing) -> DatasetSplits:
    """scikit-learn's bundled 8x8 digits: a real dataset that needs no download, with a fixed split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise LcnnError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_index, test_index = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    # Resizing float "F" images with PIL supports every interpolation mode without rounding to 8 bits.
    resized = np.stack(
        [
            np.asarray(
                transforms.functional.resize(
                    Image.fromarray((image / 16.0).astype(np.float32)),  # mode "F"
                    [preprocessing.size, preprocessing.size],
                    interpolation=preprocessing.interpolation,
                )
            )
            for image in digits.images
        ]
    )
    images = torch.from_numpy(resized).clamp_(0.0, 1.0).unsqueeze(1)  # bicubic overshoots [0, 1]
    train, test = (
        _GrayscaleTensorDataset(images[index], labels[index], preprocessing.mean, preprocessing.std)
        for index in (train_index, test_index)
    )
    return _splits("digits", train, test, [str(digit) for digit in range(10)], preprocessing)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else: a CIFAR file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise LcnnError(f"missing CIFAR file {path}: re-extract the dataset archive there")
    try:
        with path.open("rb") as file:
            content = _ArrayOnlyUnpickler(file, encoding="bytes").load()
    except pickle.UnpicklingError as error:
        if str(error).startswith("forbidden global"):
            raise LcnnError(
                f"refusing to read {path}: it would import {str(error).removeprefix('forbidden global ')}, "
                "and CIFAR files hold only numpy arrays"
            ) from error
        raise LcnnError(f"cannot read {path}: not a valid CIFAR pickle ({error})") from error
    except Exception as error:  # a damaged pickle fails inside the unpickler in arbitrary ways
        raise LcnnError(f"cannot read {path}: not a valid CIFAR pickle ({type(error).__name__})") from error
    if not isinstance(content, dict):
        raise LcnnError(f"cannot read {path}: expected a dict, found {type(content).__name__}")
    return content


def _cifar_batch(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch as (N x 32 x 32 x 3 uint8 images, N labels), with its shapes checked."""
    batch = _read_cifar_pickle(path)
    data, labels = batch.get(b"data"), batch.get(layout.labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise LcnnError(f"cannot read {path}: b'data' should be an N x 3072 uint8 array, found {found}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(data),):
        raise LcnnError(f"cannot read {path}: {layout.labels_key!r} should hold one label per image ({len(data)})")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise LcnnError(f"cannot read {path}: labels must lie in 0..{layout.num_classes - 1}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R, G, B planes -> HWC
    return images, labels


def _cifar_class_names(path: Path, layout: _CifarLayout) -> list[str]:
    names = _read_cifar_pickle(path).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise LcnnError(f"cannot read {path}: {layout.names_key!r} should list {layout.num_classes} class names")
    return [name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name) for name in names]


def _where_to_put(what: str, root: Path, source: str) -> str:
    return f"put {what} into {root} (from {source}) or pass --data-dir"


def _load_cifar(layout: _CifarLayout, root: Path, preprocessing: _Preprocessing, download: bool) -> DatasetSplits:
    folder = root / layout.folder
    where = _where_to_put(f"the extracted '{layout.folder}' folder", root, layout.url)
    if not folder.is_dir():
        if not download:
            raise LcnnError(f"{layout.name} not found at {folder}; {where}")
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(layout.url, str(root), filename=layout.archive, md5=layout.archive_md5)
        except DOWNLOAD_ERRORS as error:
            raise LcnnError(f"could not download {layout.name} ({first_line(error)}); {where}") from error
        if not folder.is_dir():
            raise LcnnError(f"the {layout.name} archive did not contain '{layout.folder}'; {where}")
    train_batches = [_cifar_batch(folder / file, layout) for file in layout.train_files]
    test_images, test_labels = _cifar_batch(folder / layout.test_file, layout)
    classes = _cifar_class_names(folder / layout.meta_file, layout)
    train_images = np.concatenate([images for images, _ in train_batches])
    train_labels = np.concatenate([labels for _, labels in train_batches])
    plain = _pil_transform(preprocessing, NATIVE_SIZE, False, False)
    train = _ArrayImageDataset(
        train_images, train_labels, _pil_transform(preprocessing, NATIVE_SIZE, crop=True, flip=True)
    )
    test = _ArrayImageDataset(test_images, test_labels, plain)
    return _splits(
        layout.name, train, test, classes, preprocessing, _ArrayImageDataset(train_images, train_labels, plain)
    )


def _read_svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file as (N x 32 x 32 x 3 uint8 images, N labels 0..9); SVHN stores digit 0 as 10."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise LcnnError("the svhn dataset needs scipy: pip install scipy") from None
    try:
        content = loadmat(str(path), variable_names=["X", "y"])
    except Exception as error:  # scipy reports damaged .mat files with many exception types
        raise LcnnError(f"cannot read {path}: not a valid SVHN .mat file ({first_line(error)})") from error
    images, labels = content.get("X"), content.get("y")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        found = f"shape {images.shape}" if isinstance(images, np.ndarray) else "nothing"
        raise LcnnError(f"cannot read {path}: 'X' should be a 32 x 32 x 3 x N array, found {found}")
    if not isinstance(labels, np.ndarray) or labels.size != images.shape[3]:
        raise LcnnError(f"cannot read {path}: 'y' should hold one label per image ({images.shape[3]})")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() > 10):
        raise LcnnError(f"cannot read {path}: labels must lie in 0..10")
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2).astype(np.uint8)), labels


def _load_svhn(root: Path, preprocessing: _Preprocessing, download: bool) -> DatasetSplits:
    file_names = " and ".join(file for file, _ in SVHN_FILES.values())
    where = _where_to_put(file_names, root, SVHN_PAGE)
    missing = [(file, md5) for file, md5 in SVHN_FILES.values() if not (root / file).is_file()]
    if missing and not download:
        raise LcnnError(f"svhn not found: {root / missing[0][0]} is missing; {where}")
    if missing:
        from torchvision.datasets.utils import download_url

        for file, md5 in missing:
            try:
                download_url(SVHN_PAGE + file, str(root), filename=file, md5=md5)
            except DOWNLOAD_ERRORS as error:
                raise LcnnError(f"could not download svhn {file} ({first_line(error)}); {where}") from error
    train_images, train_labels = _read_svhn_split(root / SVHN_FILES["train"][0])
    test_images, test_labels = _read_svhn_split(root / SVHN_FILES["test"][0])
    # Random crops only: flipping a house number makes a different (or no) digit.
    plain = _pil_transform(preprocessing, NATIVE_SIZE, False, False)
    train = _ArrayImageDataset(train_images, train_labels, _pil_transform(preprocessing, NATIVE_SIZE, True, False))
    test = _ArrayImageDataset(test_images, test_labels, plain)
    unaugmented = _ArrayImageDataset(train_images, train_labels, plain)
    return _splits("svhn", train, test, [str(digit) for digit in range(10)], preprocessing, unaugmented)


def _load_folder(path_text: str, preprocessing: _Preprocessing) -> DatasetSplits:
    """An ImageFolder tree: PATH/train/<class>/* and PATH/val/<class>/*, with the same classes in both."""
    if not path_text.strip():
        raise LcnnError("folder dataset needs a path: folder:PATH with PATH/train/<class>/ and PATH/val/<class>/")
    root = Path(path_text.strip()).expanduser().resolve()
    if not root.is_dir():
        raise LcnnError(f"dataset folder not found: {root}")
    splits = {}
    for split, augment in (("train", True), ("val", False)):
        split_dir = root / split
        if not split_dir.is_dir():
            raise LcnnError(f"dataset folder {root} has no {split}/ folder: expected {split_dir}/<class>/*.png|jpg")
        try:
            splits[split] = _image_folder(split_dir, _pil_transform(preprocessing, None, augment, augment))
        except FileNotFoundError as error:
            raise LcnnError(
                f"no images found in {split_dir} ({first_line(error)}): expected {split_dir}/<class>/*.png|jpg"
            ) from error
    train_classes, val_classes = splits["train"].classes, splits["val"].classes
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise LcnnError(
            f"dataset folder {root}: train/ and val/ must have the same class folders "
            f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'})"
        )
    unaugmented = _image_folder(root / "train", _pil_transform(preprocessing, None, False, False))
    return _splits(
        f"{FOLDER_PREFIX}{root}", splits["train"], splits["val"], list(train_classes), preprocessing, unaugmented
    )
