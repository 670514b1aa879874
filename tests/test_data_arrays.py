"""In-memory long-tailed sets: CIFAR-LT profile, fake CIFAR pickles, digits-LT, the shared real data."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from ltsam.counts import load_class_counts
from ltsam.data.factory import create_lt_dataset
from ltsam.data.lt import lt_profile

CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_official_profile_counts():
    assert lt_profile(10, 5000, 100) == CIFAR10_IF100
    assert sum(lt_profile(100, 500, 100)) == 10847
    assert lt_profile(10, 5000, 1) == [5000] * 10
    with pytest.raises(ValueError, match="imb_factor >= 1"):
        lt_profile(10, 5000, 0.5)


def _write_cifar(root, num_classes: int, per_class: int, test_per_class: int = 2):
    """Tiny CIFAR python files in the official layout; pixel 0 of image k in class c is k, pixel 1 is c."""

    def batch(n):
        labels = [c for _ in range(n) for c in range(num_classes)]  # classes interleaved, as in CIFAR
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        seen = {}
        for i, c in enumerate(labels):
            data[i, 0], data[i, 1] = seen.setdefault(c, 0), c
            seen[c] += 1
        return data, labels

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        data, labels = batch(per_class)
        for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
            entry = {"data": data[part], "labels": [labels[i] for i in part]}
            (folder / f"data_batch_{b}").write_bytes(pickle.dumps(entry))
        data, labels = batch(test_per_class)
        (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}))
        names = {"label_names": [f"c{i}" for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(names))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir()
        for name, n in (("train", per_class), ("test", test_per_class)):
            data, labels = batch(n)
            (folder / name).write_bytes(
                pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels})
            )


def test_cifar10_lt_keeps_first_images_per_class(tmp_path):
    _write_cifar(tmp_path, 10, per_class=20)
    ds = create_lt_dataset("cifar10-lt", tmp_path, imb_factor=10, n_max=20)
    expected = [int(20 * 0.1 ** (i / 9)) for i in range(10)]  # 20, 15, 11, ..., 2
    assert ds.class_counts == expected == np.bincount(ds.targets).tolist()
    assert ds.classes[3] == "c3" and ds.num_classes == 10
    img, label = ds[sum(expected[:3])]  # the first image kept for class 3; R plane: pixel 0 index, 1 class
    arr = np.asarray(img)
    assert label == 3 and arr.shape == (32, 32, 3) and arr[0, 0, 0] == 0 and arr[0, 1, 0] == 3
    # within each class the k-th kept image is the k-th image of that class in the files
    firsts = ds.images[:, 0, 0, 0]
    assert firsts[: expected[0]].tolist() == list(range(expected[0]))
    test = create_lt_dataset("cifar10-lt", tmp_path, split="test", imb_factor=10, n_max=20)
    assert len(test) == 20 and test.class_counts == expected
    x, y = ds.tensors()
    assert x.shape == (len(ds), 3, 32, 32) and x.max() <= 1 and y.dtype == torch.long


def test_cifar100_lt_and_errors(tmp_path):
    _write_cifar(tmp_path, 100, per_class=5)
    ds = create_lt_dataset("cifar100-lt", tmp_path, imb_factor=5, n_max=5)
    assert ds.class_counts[0] == 5 and ds.class_counts[-1] == 1 and len(ds) == sum(ds.class_counts)
    with pytest.raises(ValueError, match="class 0 has 5 images but the long-tailed profile asks for 6"):
        create_lt_dataset("cifar100-lt", tmp_path, n_max=6)
    with pytest.raises(
        FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1' not found.*cifar-10-python"
    ):
        create_lt_dataset("cifar10-lt", tmp_path)


def test_cifar_label_out_of_range_names_file(tmp_path):
    _write_cifar(tmp_path, 10, per_class=5)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(path.read_bytes())
    entry["labels"][0] = 12
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"data_batch_2'.*label 12, outside \[0, 10\)"):
        create_lt_dataset("cifar10-lt", tmp_path, n_max=5)


def test_digits_lt_default_counts_and_split(tmp_path):
    train = create_lt_dataset()
    test = create_lt_dataset(split="test")
    assert train.class_counts == [144, 103, 74, 53, 38, 27, 19, 14, 10, 7]
    assert len(train) == 489 and np.bincount(test.targets).tolist() == [30] * 10
    assert not set(train.keys) & set(test.keys)  # the held-out images never enter training
    assert test.class_counts == train.class_counts
    img, _ = train[0]
    assert img.size == (8, 8) and img.mode == "L"
    other = create_lt_dataset("digits-lt", seed=1)
    assert other.keys != train.keys and other.class_counts == train.class_counts
    path = train.save_class_counts(tmp_path / "counts.json")
    assert load_class_counts(path) == train.class_counts
    assert json.loads(path.read_text())["num_samples"] == 489


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: digits-lt, mnist-lt, cifar10-lt"):
        create_lt_dataset("cifar-lt")
    with pytest.raises(ValueError, match="needs root="):
        create_lt_dataset("mnist-lt")


needs_shared = pytest.mark.skipif(not (SHARED_DATA / "mnist.npz").is_file(), reason="shared data absent")


@needs_shared
def test_mnist_lt_from_shared_npz():
    train = create_lt_dataset("mnist-lt", SHARED_DATA)
    assert train.class_counts == [860, 515, 309, 185, 111, 66, 39, 23, 14, 8] and len(train) == 2130
    with np.load(SHARED_DATA / "mnist.npz") as raw:
        first_sevens = raw["train_images"][raw["train_labels"] == 7][:23]
    assert np.array_equal(train.images[np.asarray(train.targets) == 7], first_sevens)
    assert len(create_lt_dataset("mnist-lt", SHARED_DATA, split="test")) == 10000


@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "cifar10.json").is_file(), reason="shared data absent")
def test_cifar10_lt_from_shared_shards():
    train = create_lt_dataset("cifar10-lt", SHARED_DATA / "cifar10")
    assert np.bincount(train.targets).tolist() == CIFAR10_IF100 == train.class_counts
    assert train.classes[0] == "airplane" and train.images.shape == (12406, 32, 32, 3)
    # "first n of class c" by the key's index: class 9 (truck) keeps exactly indices 0..49
    trucks = sorted(int(k.rsplit("_", 1)[1]) for k, y in zip(train.keys, train.targets) if y == 9)
    assert trucks == list(range(50)) and all(k.startswith("train_truck_") for k in train.keys[-50:])
