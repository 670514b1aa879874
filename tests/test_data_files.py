"""File-based long-tailed sets: list files (ImageNet-LT), iNat JSON, ImageFolder, and bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ltsam.data.factory import create_lt_dataset

COUNTS = [4, 2, 1]


def _images(root, counts=COUNTS, folders=False) -> list[tuple[str, int]]:
    """Tiny PNGs; returns (relative path, label)."""
    out = []
    for label, n in enumerate(counts):
        for k in range(n):
            rel = f"class_{label}/img_{k}.png" if folders else f"img/{label}_{k}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), 10 * label + k, np.uint8)).save(root / rel)
            out.append((rel, label))
    return out


def test_imagenet_lt_lists(tmp_path):
    pairs = _images(tmp_path)
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(f"{p} {y}" for p, y in pairs) + "\n\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text(f"{pairs[-1][0]} 2\n{pairs[0][0]} 0\n")
    train = create_lt_dataset("imagenet-lt", tmp_path, num_classes=3)
    assert train.class_counts == COUNTS and train.targets == [y for _, y in pairs]
    assert train.samples[0] == (str((tmp_path / pairs[0][0]).resolve()), 0)
    img, label = train[5]
    assert label == 1 and np.asarray(img)[0, 0, 0] == 11
    test = create_lt_dataset("imagenet-lt", tmp_path, split="test", num_classes=3)
    assert test.targets == [2, 0] and test.class_counts == COUNTS and test.num_classes == 3


def test_list_file_errors_name_file_and_line(tmp_path):
    pairs = _images(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{pairs[0][0]} 0\n\n{pairs[1][0]} zero\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: expected 'relative/path label'"):
        create_lt_dataset("list", tmp_path, list_file=bad)
    bad.write_text(f"{pairs[0][0]} 0\n{pairs[1][0]} 7\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: label 7 outside \[0, 3\)"):
        create_lt_dataset("list", tmp_path, list_file=bad, num_classes=3)
    with pytest.raises(
        ValueError, match=r"classes \[1, 2, 3, 4, 5, 6\] have no training sample.*allow_empty=True"
    ):
        create_lt_dataset("list", tmp_path, list_file=bad)
    ok = create_lt_dataset("list", tmp_path, list_file=bad, allow_empty=True)
    assert ok.class_counts == [1, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="needs list_file="):
        create_lt_dataset("list", tmp_path)


def test_broken_image_raises_or_warns(tmp_path):
    pairs = _images(tmp_path)
    (tmp_path / pairs[1][0]).write_bytes(b"not a png")
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"{p} {y}\n" for p, y in pairs))
    ds = create_lt_dataset("list", tmp_path, list_file=listing)
    with pytest.raises(OSError, match=r"image '.*img/0_1.png' \(listed in .*all.txt, line 2, label 0\) does not "
                                      r"decode"):
        ds[1]
    (tmp_path / pairs[5][0]).unlink()  # a missing image names its list file and line too
    with pytest.raises(OSError, match=r"image '.*img/1_1.png' \(listed in .*all.txt, line 6, label 1\) does not "
                                      r"decode: .*No such file"):
        ds[5]
    tolerant = create_lt_dataset("list", tmp_path, list_file=listing, skip_broken=True)
    with pytest.warns(UserWarning, match=r"0_1.png' \(1 broken so far\)"):
        img, label = tolerant[1]
    assert np.asarray(img)[0, 0, 0] == 2 and label == 0  # the next readable sample


def test_inat_json(tmp_path):
    pairs = _images(tmp_path)
    images = [{"id": 100 + i, "file_name": p} for i, (p, _) in enumerate(pairs)]
    anns = [{"id": i, "image_id": 100 + i, "category_id": y} for i, (_, y) in enumerate(pairs)]
    cats = [{"id": c, "name": f"species {c}"} for c in range(4)]  # class 3 has no image
    (tmp_path / "train2018.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    (tmp_path / "val2018.json").write_text(json.dumps({"images": images[:1], "annotations": anns[:1]}))
    with pytest.raises(ValueError, match=r"train2018.json: classes \[3\] have no training sample"):
        create_lt_dataset("inat2018", tmp_path)
    train = create_lt_dataset("inat2018", tmp_path, allow_empty=True)
    assert train.class_counts == COUNTS + [0] and train.num_classes == 4
    val = create_lt_dataset("inat2018", tmp_path, split="val", allow_empty=True)
    assert val.targets == [0] and val.class_counts == COUNTS + [0]
    anns[2]["image_id"] = 999
    (tmp_path / "train2018.json").write_text(json.dumps({"images": images, "annotations": anns}))
    with pytest.raises(ValueError, match="train2018.json: annotation 2 .* unknown image_id"):
        create_lt_dataset("inat2018", tmp_path)


def test_image_folder_sorted_names(tmp_path):
    _images(tmp_path / "train", folders=True)
    _images(tmp_path / "val", counts=[1, 1, 1], folders=True)
    train = create_lt_dataset("folder", tmp_path)
    assert train.classes == ["class_0", "class_1", "class_2"] and train.class_counts == COUNTS
    val = create_lt_dataset("folder", tmp_path, split="val")
    assert val.targets == [0, 1, 2] and val.class_counts == COUNTS
    with pytest.raises(FileNotFoundError, match="image folder .*test' not found"):
        create_lt_dataset("folder", tmp_path, split="test")
    with pytest.raises(ValueError, match="long-tailed as published"):
        create_lt_dataset("folder", tmp_path, imb_factor=10)
    (tmp_path / "train" / "class_3").mkdir()
    with pytest.raises(FileNotFoundError, match="class_3"):
        create_lt_dataset("folder", tmp_path)
