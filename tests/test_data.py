"""Datasets: tiny copies of each real on-disk format, read through load_dataset without a network."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.utils
from PIL import Image
from torch.utils.data import DataLoader

from lcnn_convert.data import DATASETS, DatasetSplits, UnreadableExample, default_data_dir, load_dataset
from lcnn_convert.errors import LcnnError
from lcnn_convert.models import IMAGENET_MEAN, IMAGENET_STD, DataConfig

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
IMAGES_PER_BATCH = 4
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def cifar_rows(planes: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 pixels as CIFAR stores them: one row of 3072 bytes, the R, G and B planes in turn."""
    return np.ascontiguousarray(planes.transpose(0, 3, 1, 2).reshape(len(planes), 3072), dtype=np.uint8)


def red_image() -> np.ndarray:
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 255
    return image


def ramp_image() -> np.ndarray:
    """Red counts 0..255 along rows, so any mix-up of the plane or row order shows."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = (np.arange(32 * 32) % 256).reshape(32, 32)
    image[..., 2] = 7
    return image


def left_white_image() -> np.ndarray:
    """White left half, black right half: with crops shifting <= 4 px, columns 4..11 stay white unless mirrored."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = 255
    return image


def random_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def dump_pickle(path: Path, content: dict) -> None:
    with path.open("wb") as file:
        pickle.dump(content, file, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A cifar-10-batches-py folder laid out like the real one; the first train and test images are known."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for batch in range(1, 6):
        images = random_images(IMAGES_PER_BATCH, seed=batch)
        if batch == 1:
            images[0] = left_white_image()
        labels = [(batch * IMAGES_PER_BATCH + index) % 10 for index in range(IMAGES_PER_BATCH)]
        dump_pickle(
            folder / f"data_batch_{batch}",
            {
                b"batch_label": f"training batch {batch} of 5".encode(),
                b"labels": labels,
                b"data": cifar_rows(images),
                b"filenames": [f"image_{batch}_{index}.png".encode() for index in range(IMAGES_PER_BATCH)],
            },
        )
    test_images = np.stack([red_image(), ramp_image(), *random_images(4, seed=9)])
    dump_pickle(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 9, 0, 1, 2, 3], b"data": cifar_rows(test_images)},
    )
    dump_pickle(folder / "batches.meta", {b"num_cases_per_batch": 4, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, count, fine in (("train", 8, [0, 99, 5, 42, 7, 7, 63, 12]), ("test", 3, [99, 1, 50])):
        dump_pickle(
            folder / split,
            {
                b"filenames": [f"{split}_{index}.png".encode() for index in range(count)],
                b"batch_label": split.encode(),
                b"fine_labels": fine,
                b"coarse_labels": [label // 5 for label in fine],
                b"data": cifar_rows(random_images(count, seed=count)),
            },
        )
    dump_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{index}".encode() for index in range(100)],
            b"coarse_label_names": [f"coarse_{index}".encode() for index in range(20)],
        },
    )
    return tmp_path


def unnormalize(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def test_cifar10_reads_the_real_format(cifar10_dir):
    splits = load_dataset("cifar10", data_dir=cifar10_dir, download=False)
    assert isinstance(splits, DatasetSplits)
    assert (splits.name, splits.num_classes, splits.image_size) == ("cifar10", 10, 32)
    assert splits.classes == [name.decode() for name in CIFAR10_NAMES]
    assert (splits.mean, splits.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert len(splits.train) == 5 * IMAGES_PER_BATCH and len(splits.test) == 6
    assert [splits.train[index][1] for index in range(4)] == [4, 5, 6, 7]

    red, label = splits.test[0]
    assert red.shape == (3, 32, 32) and red.dtype == torch.float32 and label == 3
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    assert torch.allclose(red[0], torch.full((32, 32), expected[0]), atol=1e-5)
    assert torch.allclose(red[1], torch.full((32, 32), expected[1]), atol=1e-5)

    ramp = unnormalize(splits.test[1][0])
    assert torch.allclose(ramp[0] * 255, torch.from_numpy(ramp_image()[..., 0]).float(), atol=1e-3)
    assert torch.allclose(ramp[2] * 255, torch.full((32, 32), 7.0), atol=1e-3)

    batch, labels = next(iter(DataLoader(splits.train, batch_size=8, num_workers=0)))
    assert batch.shape == (8, 3, 32, 32) and labels.dtype == torch.int64


def test_cifar_augments_only_the_train_split_with_crops_and_flips(cifar10_dir):
    splits = load_dataset("cifar10", data_dir=cifar10_dir, download=False)
    torch.manual_seed(0)
    train_draws = [splits.train[0][0] for _ in range(30)]
    assert any(not torch.equal(draw, train_draws[0]) for draw in train_draws)
    assert any(unnormalize(draw)[:, :, 4:12].mean() < 0.1 for draw in train_draws), "never flipped"
    test_draws = [splits.test[2][0] for _ in range(5)]
    assert all(torch.equal(draw, test_draws[0]) for draw in test_draws)


def test_cifar_image_size_and_interpolation_follow_the_data_config(cifar10_dir):
    config = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bicubic"}
    splits = load_dataset("cifar10", data_dir=cifar10_dir, data_config=config, image_size=64, download=False)
    red = splits.test[0][0]
    assert splits.image_size == 64 and red.shape == (3, 64, 64) and splits.train[0][0].shape == (3, 64, 64)
    assert (splits.mean, splits.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(red[0], torch.full((64, 64), 2.0), atol=1e-5)
    with pytest.raises(LcnnError, match="unknown interpolation 'sinc'"):
        load_dataset("cifar10", data_dir=cifar10_dir, data_config={"interpolation": "sinc"}, download=False)


def test_cifar100_uses_the_fine_labels(cifar100_dir):
    splits = load_dataset("CIFAR100", data_dir=cifar100_dir, download=False)
    assert (splits.name, splits.num_classes, len(splits.train), len(splits.test)) == ("cifar100", 100, 8, 3)
    assert splits.classes[:2] == ["fine_0", "fine_1"] and splits.classes[-1] == "fine_99"
    assert [splits.train[index][1] for index in range(8)] == [0, 99, 5, 42, 7, 7, 63, 12]
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and label == 99


def write_svhn(root: Path) -> None:
    images = np.stack([left_white_image(), red_image(), *random_images(2, seed=3)])  # N x H x W x C
    for file, labels in (("train_32x32.mat", [10, 1, 5, 9]), ("test_32x32.mat", [3, 10, 2, 10])):
        y = np.array(labels, dtype=np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / file, {"X": images.transpose(1, 2, 3, 0), "y": y})


def test_svhn_maps_label_10_to_0_and_crops_without_flipping(tmp_path):
    write_svhn(tmp_path)
    splits = load_dataset("svhn", data_dir=tmp_path, download=False)
    assert (splits.num_classes, splits.classes, len(splits.train), len(splits.test)) == (10, list("0123456789"), 4, 4)
    assert [splits.train[index][1] for index in range(4)] == [0, 1, 5, 9]
    assert [splits.test[index][1] for index in range(4)] == [3, 0, 2, 0]
    red = unnormalize(splits.test[1][0])
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    torch.manual_seed(0)
    draws = [unnormalize(splits.train[0][0]) for _ in range(30)]
    assert any(not torch.equal(draw, draws[0]) for draw in draws)
    assert all(draw[:, 4:28, 4:12].min() > 0.99 and draw[:, :, 20:28].max() < 0.01 for draw in draws), "flipped"


def write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for split in ("train", "val"):
        write_png(root / split / "cat" / "a.png", (40, 30), (255, 0, 0))
        write_png(root / split / "cat" / "b.jpg", (30, 40), (250, 10, 10))
        write_png(root / split / "dog" / "a.png", (36, 36), (128, 128, 128), mode="L")
    return root


def test_image_folder_reads_train_and_val(image_folder):
    config = DataConfig((3, 56, 56), IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    splits = load_dataset(f"folder:{image_folder}", data_config=config)
    assert splits.name == f"folder:{image_folder.resolve()}"
    assert (splits.classes, splits.num_classes, splits.image_size) == (["cat", "dog"], 2, 56)
    assert len(splits.train) == 3 and len(splits.test) == 3
    gray, label = splits.test[2]
    assert gray.shape == (3, 56, 56) and label == 1
    assert torch.allclose(unnormalize(gray), torch.full((3, 56, 56), 128 / 255), atol=1e-5)
    assert splits.train[0][0].shape == (3, 56, 56)

    resized = load_dataset(f"folder:{image_folder}", data_config=config, image_size=24)
    assert resized.image_size == 24
    assert resized.test[0][0].shape == resized.train[1][0].shape == (3, 24, 24)
    assert load_dataset(f"folder:{image_folder}").image_size == 224


@pytest.mark.parametrize("damage", [b"not an image", "truncate"])
def test_an_unreadable_image_is_named_in_one_line(image_folder, damage):
    broken = image_folder / "train" / "cat" / "b.jpg"
    broken.write_bytes(damage if isinstance(damage, bytes) else broken.read_bytes()[:60])
    splits = load_dataset(f"folder:{image_folder}")
    assert splits.train[0][0].shape == (3, 224, 224)  # the others still load
    with pytest.raises(UnreadableExample) as caught:
        splits.train[1]
    message = str(caught.value)
    assert message.startswith("cannot read train example 1 (") and str(broken) in message
    assert "\n" not in message and isinstance(caught.value, LcnnError)


def test_digits_split_is_fixed_and_stratified():
    from sklearn.datasets import load_digits

    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.test), splits.num_classes) == (1437, 360, 10)
    assert splits.classes == [str(digit) for digit in range(10)]
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    pixels = unnormalize(image)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)

    totals = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(splits.test.targets, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * totals) <= 1)

    again = load_dataset("digits")
    assert again.test.targets == splits.test.targets and again.train.targets == splits.train.targets
    assert all(torch.equal(again.train[index][0], splits.train[index][0]) for index in (0, 700, 1436))
    assert torch.equal(splits.train[5][0], splits.train[5][0]), "digits must not be augmented"

    large = load_dataset("digits", image_size=48, data_config={"interpolation": "bicubic"})
    assert large.image_size == 48 and large.train[0][0].shape == (3, 48, 48)


def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LCNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "lcnn_convert" / "datasets"
    monkeypatch.setenv("LCNN_DATA_DIR", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data"


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(LcnnError) as caught:
        load_dataset("mnist")
    assert_one_line(caught, "unknown dataset 'mnist'", *DATASETS)


def test_missing_cifar_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(LcnnError) as caught:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert_one_line(caught, str(tmp_path), "cifar-10-batches-py", "cifar-10-python.tar.gz", "--data-dir")


def refuse_network(*args, **kwargs):
    raise URLError("no network here")


def test_offline_download_fails_in_one_actionable_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", refuse_network)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse_network)
    with pytest.raises(LcnnError) as caught:
        load_dataset("cifar100", data_dir=tmp_path)
    assert_one_line(caught, "could not download cifar100", "no network here", str(tmp_path), "'cifar-100-python'")
    with pytest.raises(LcnnError) as caught:
        load_dataset("svhn", data_dir=tmp_path)
    assert_one_line(caught, "could not download svhn", "train_32x32.mat and test_32x32.mat", str(tmp_path))


def test_truncated_cifar_pickle_names_the_file(cifar10_dir):
    batch = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(LcnnError) as caught:
        load_dataset("cifar10", data_dir=cifar10_dir, download=False)
    assert_one_line(caught, f"cannot read {batch}")


def test_cifar_arrays_of_the_wrong_shape_are_rejected(cifar10_dir):
    batch = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    dump_pickle(batch, {b"labels": [0, 1], b"data": np.zeros((2, 32, 32, 3), np.uint8)})
    with pytest.raises(LcnnError) as caught:
        load_dataset("cifar10", data_dir=cifar10_dir, download=False)
    assert_one_line(caught, f"cannot read {batch}", "N x 3072")


class CreatesFile:
    """Unpickling this calls open(path, "w"): proof that code in the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_cifar_pickle_carrying_code_is_refused_without_running_it(cifar10_dir):
    batch = cifar10_dir / "cifar-10-batches-py" / "data_batch_1"
    payload = pickle.dumps({b"data": CreatesFile(cifar10_dir / "pwned"), b"labels": []}, protocol=2)
    batch.write_bytes(payload)
    with pytest.raises(LcnnError) as caught:
        load_dataset("cifar10", data_dir=cifar10_dir, download=False)
    assert_one_line(caught, f"refusing to read {batch}", "open")
    assert not (cifar10_dir / "pwned").exists()

    pickle.loads(payload.replace(b"pwned", b"armed"))  # the payload is live: a plain unpickler runs it
    assert (cifar10_dir / "armed").exists()


def test_corrupt_svhn_file_names_the_file(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(LcnnError) as caught:
        load_dataset("svhn", data_dir=tmp_path, download=False)
    assert_one_line(caught, f"cannot read {tmp_path / 'test_32x32.mat'}")


@pytest.mark.parametrize("content", ["nothing", "empty class folder"])
def test_image_folder_without_images_is_refused(tmp_path, content):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        if content == "empty class folder":
            (tmp_path / split / "cat").mkdir()
            (tmp_path / split / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(LcnnError) as caught:
        load_dataset(f"folder:{tmp_path}")
    assert_one_line(caught, f"no images found in {tmp_path / 'train'}")


def test_image_folder_needs_val_and_matching_classes(image_folder, tmp_path):
    with pytest.raises(LcnnError) as caught:
        load_dataset(f"folder:{tmp_path / 'absent'}")
    assert_one_line(caught, "dataset folder not found", str(tmp_path / "absent"))

    write_png(image_folder / "val" / "bird" / "a.png", (8, 8), (0, 0, 255))
    with pytest.raises(LcnnError) as caught:
        load_dataset(f"folder:{image_folder}")
    assert_one_line(caught, "same class folders", "only in val: ['bird']")

    for path in sorted((image_folder / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (image_folder / "val").rmdir()
    with pytest.raises(LcnnError) as caught:
        load_dataset(f"folder:{image_folder}")
    assert_one_line(caught, "no val/ folder", str(image_folder / "val"))
