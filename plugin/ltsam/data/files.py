"""Long-tailed sets of image files: ImageNet-LT, iNaturalist-2018, any ImageFolder or ``path label`` list.

Class ids are stable and documented per reader: list files use the integer written in the file, iNat uses
``category_id`` as given, ImageFolder the position of the folder name in sorted order (torchvision's rule).
Images load lazily with torchvision's ``default_loader`` (PIL, RGB).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from ltsam.counts import save_class_counts
from ltsam.data.lt import count_classes

Samples = list[tuple[str, int]]


def read_list_file(
    list_file: str | os.PathLike, root: str | os.PathLike, num_classes: int | None = None
) -> Samples:
    """``path label`` lines (ImageNet-LT's ``ImageNet_LT_train.txt``); paths relative to ``root``.

    The label is the last whitespace-separated field, so paths may contain spaces; blank lines are skipped.
    Labels must lie in ``[0, num_classes)`` (``num_classes`` None: any label >= 0).
    """
    return read_list(list_file, root, num_classes)[0]


def read_list(
    list_file: str | os.PathLike, root: str | os.PathLike, num_classes: int | None = None
) -> tuple[Samples, list[str]]:
    """:func:`read_list_file` plus each sample's origin ``'list_file:line'``, for errors about its image."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file '{list_file}' not found")
    root = Path(root).resolve()
    samples, origins = [], []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(
                f"{list_file}, line {lineno}: expected 'relative/path label', got {line.strip()!r}"
            )
        if not 0 <= int(fields[1]) < (num_classes or float("inf")):
            raise ValueError(
                f"{list_file}, line {lineno}: label {fields[1]} outside [0, {num_classes or 'inf'})"
            )
        samples.append((str(root / fields[0]), int(fields[1])))
        origins.append(f"{list_file}, line {lineno}")
    return samples, origins


def read_inat_json(json_file: str | os.PathLike, root: str | os.PathLike) -> tuple[Samples, int | None]:
    """iNaturalist-2018 ``train2018.json`` / ``val2018.json`` (COCO style) -> samples and the category count.

    Labels are ``category_id`` as given; the class count is ``len(categories)`` when the file lists them.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(f"iNaturalist file '{json_file}' not found (train2018.json / val2018.json)")
    try:
        data = json.loads(json_file.read_text())
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{json_file}: not a COCO-style file with images[{{id, file_name}}] and "
            f"annotations[{{image_id, category_id}}]: {err!r}"
        ) from err
    categories = data.get("categories")
    num_classes = len(categories) if categories else float("inf")
    root = Path(root).resolve()
    samples = []
    for i, ann in enumerate(annotations):
        label = ann.get("category_id")
        if ann.get("image_id") not in files or not isinstance(label, int) or not 0 <= label < num_classes:
            raise ValueError(
                f"{json_file}: annotation {i} ({ann!r:.100}) has an unknown image_id or a "
                f"category_id outside [0, {num_classes})"
            )
        samples.append((str(root / files[ann["image_id"]]), label))
    return samples, (None if num_classes == float("inf") else num_classes)


def read_image_folder(root: str | os.PathLike, allow_empty: bool = False) -> tuple[Samples, list[str]]:
    """ImageFolder ``root/<class>/<image>``: label = index of the folder name in sorted order."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder '{root}' not found")
    classes, class_to_idx = find_classes(root)
    return make_dataset(root, class_to_idx, IMG_EXTENSIONS, allow_empty=allow_empty), classes


class ImageListDataset(Dataset):
    """``(transform(PIL image), label)`` over ``samples`` of (absolute path, label).

    ``class_counts`` are the TRAINING split's counts (computed from ``samples`` unless given, i.e. pass the
    training counts when building a val/test split). A file that does not decode raises an error naming it;
    with ``skip_broken=True`` (large crawled sets) the next readable sample is returned instead and a warning
    counts the broken files seen so far. ``origins`` (one per sample, e.g. ``'train.txt, line 12'``) name
    where a sample was listed, so an error about its image says which line to fix.
    """

    def __init__(
        self,
        samples: Samples,
        num_classes: int | None = None,
        class_counts: Sequence[int] | None = None,
        transform=None,
        classes: Sequence[str] | None = None,
        allow_empty: bool = False,
        skip_broken: bool = False,
        source: str = "image list",
        origins: Sequence[str] | None = None,
    ) -> None:
        labels = [y for _, y in samples]
        if class_counts is None:
            num_classes, class_counts = count_classes(labels, num_classes, source, allow_empty)
        else:
            num_classes = count_classes(labels, len(class_counts), source, allow_empty=True)[0]
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.class_counts = [int(n) for n in class_counts]
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
        self.transform = transform
        self.origins = list(origins) if origins is not None else None
        self.skip_broken = skip_broken
        self.broken: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            position = (index + attempt) % len(self.samples)
            path, label = self.samples[position]
            try:
                img = default_loader(path)
            except Exception as err:
                if not self.skip_broken:
                    where = f"listed in {self.origins[position]}" if self.origins else f"sample {position}"
                    raise OSError(
                        f"image '{path}' ({where}, label {label}) does not decode: {err}"
                    ) from err
                self.broken.add(path)
                warnings.warn(
                    f"skipping undecodable image '{path}' ({len(self.broken)} broken so far): {err}",
                    stacklevel=2,
                )
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise OSError(f"no image of the {len(self.samples)} in this data set decodes")

    def save_class_counts(self, path: str | os.PathLike):
        return save_class_counts(self.class_counts, path, classes=self.classes)


def _train_counts(samples: Samples, num_classes: int | None, source: str, allow_empty: bool) -> list[int]:
    return count_classes([y for _, y in samples], num_classes, source, allow_empty)[1]


def imagenet_lt(
    root: str | os.PathLike,
    split: str = "train",
    list_dir: str | os.PathLike | None = None,
    num_classes: int = 1000,
    **kwargs,
) -> ImageListDataset:
    """ImageNet-LT: ``{list_dir}/ImageNet_LT_{split}.txt`` (default ``list_dir``: ``root``) over ``root``.

    Splits: train (115,846 images, 1000 classes, 1280 to 5 per class), val, test. Counts come from the
    train list whatever the split.
    """
    list_dir = Path(list_dir if list_dir is not None else root)
    train_list = list_dir / "ImageNet_LT_train.txt"
    counts = _train_counts(
        read_list_file(train_list, root, num_classes),
        num_classes,
        str(train_list),
        kwargs.pop("allow_empty", False),
    )
    split_list = list_dir / f"ImageNet_LT_{split}.txt"
    samples, origins = read_list(split_list, root, num_classes)
    return ImageListDataset(samples, class_counts=counts, source=str(split_list), origins=origins, **kwargs)


def inat2018(
    root: str | os.PathLike,
    split: str = "train",
    json_dir: str | os.PathLike | None = None,
    **kwargs,
) -> ImageListDataset:
    """iNaturalist-2018: ``{json_dir}/{train,val}2018.json`` (default ``json_dir`` = ``root``), 8,142 classes.

    Labels are ``category_id``; counts come from ``train2018.json`` whatever the split.
    """
    json_dir = Path(json_dir if json_dir is not None else root)
    train_samples, num_classes = read_inat_json(json_dir / "train2018.json", root)
    counts = _train_counts(
        train_samples, num_classes, str(json_dir / "train2018.json"), kwargs.pop("allow_empty", False)
    )
    if split == "train":
        samples = train_samples
    else:
        samples = read_inat_json(json_dir / f"{split}2018.json", root)[0]
    return ImageListDataset(samples, class_counts=counts, source=f"{json_dir / split}2018.json", **kwargs)


def image_folder(
    root: str | os.PathLike, split: str = "train", allow_empty: bool = False, **kwargs
) -> ImageListDataset:
    """ImageFolder: ``root/{split}/<class>/...``; without ``root/train``, ``root`` itself is the training set.

    Counts (and the class list) come from the training folder (``root/train`` or ``root``).
    """
    root = Path(root)
    split_dir = root / split if (root / split).is_dir() or split != "train" else root
    train_dir = root / "train" if (root / "train").is_dir() else root
    train_samples, classes = read_image_folder(train_dir, allow_empty)
    counts = _train_counts(train_samples, len(classes), str(train_dir), allow_empty)
    samples, split_classes = read_image_folder(split_dir, allow_empty=True)
    if split_classes != classes:
        raise ValueError(f"class folders of '{split_dir}' differ from those of '{train_dir}'")
    return ImageListDataset(samples, class_counts=counts, classes=classes, source=str(split_dir), **kwargs)


def image_list(
    list_file: str | os.PathLike,
    root: str | os.PathLike,
    train_list: str | os.PathLike | None = None,
    num_classes: int | None = None,
    allow_empty: bool = False,
    **kwargs,
) -> ImageListDataset:
    """Any ``path label`` list over ``root``; ``train_list`` (default ``list_file``) gives the counts."""
    train_samples, origins = read_list(train_list or list_file, root, num_classes)
    counts = _train_counts(train_samples, num_classes, str(train_list or list_file), allow_empty)
    samples = train_samples
    if train_list is not None:
        samples, origins = read_list(list_file, root, len(counts))
    return ImageListDataset(samples, class_counts=counts, source=str(list_file), origins=origins, **kwargs)
