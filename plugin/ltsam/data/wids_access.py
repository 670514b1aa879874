"""Random access to the shards of :mod:`ltsam.data.shards` through ``wids``, for exact sampler semantics.

A stream can only approximate samplers such as ``ClassAwareSampler``; this map-style data set reads sample i
of the same tar files (indexed by ``{split}_wids.json``), so any index sampler, distributed or class-aware,
works unchanged. Labels come from the index, so samplers need no image reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import wids
from PIL import Image
from torch.utils.data import Dataset

from ltsam.counts import load_class_counts
from ltsam.data.shards import counts_name, wids_name
from ltsam.data.stream import IMAGE_KEYS

_logger = logging.getLogger(__name__)


class ShardIndexDataset(Dataset):
    """``(image, label)`` by index over a split's shards, with ``targets`` and ``class_counts`` for samplers.

    Local shards are opened in place (no ``wids`` cache copy) unless ``cache_dir`` is given; up to
    ``lru_size`` shards (default: all, at most 200) stay open, since a shuffled sampler touches all of them. A
    corrupt sample is skipped with a warning, counted in ``num_skipped``, and replaced by the next sample of
    the same class.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        cache_dir: str | None = None,
        lru_size: int | None = None,
    ) -> None:
        root = Path(root)
        index = root / wids_name(split)
        if not index.is_file():
            raise FileNotFoundError(
                f"{index} not found; write shards with `python -m ltsam.data.shards write`"
            )
        shardlist = json.loads(index.read_text())["shardlist"]
        missing = [s["url"] for s in shardlist if not (root / s["url"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shards listed in {index} are missing, e.g. {missing[:3]}"
            )
        self.targets = [int(y) for s in shardlist for y in s["labels"]]
        self.class_counts = load_class_counts(root / counts_name(split))
        localname = None if cache_dir else str  # identity: read local shards in place, picklable
        # random indices touch every shard: keep them all open (wids re-indexes a tar on each cache miss)
        lru_size = lru_size or min(len(shardlist), 200)
        with contextlib.redirect_stderr(io.StringIO()):  # wids prints a summary line on every construction
            self.shards = wids.ShardListDataset(
                str(index), transformations=[], localname=localname, cache_dir=cache_dir, lru_size=lru_size
            )
        self.transform, self.target_transform = transform, target_transform
        self.num_skipped = 0
        self._by_class: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def _load(self, index: int) -> Image.Image:
        sample = self.shards[index]
        data = next((sample[f".{k}"] for k in IMAGE_KEYS if f".{k}" in sample), None)
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} has none of {IMAGE_KEYS}")
        raw = data.read() if isinstance(data, io.IOBase) else data
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")

    def _same_class(self, label: int) -> np.ndarray:
        if label not in self._by_class:
            self._by_class[label] = np.flatnonzero(np.asarray(self.targets) == label)
        return self._by_class[label]

    def __getitem__(self, index: int):
        label = self.targets[index]
        candidates = self._same_class(label)
        start = int(np.searchsorted(candidates, index))
        for step in range(len(candidates)):
            i = int(candidates[(start + step) % len(candidates)])
            try:
                img = self._load(i)
                break
            except Exception as err:  # corrupt bytes: warn, count, use the class's next sample
                self.num_skipped += 1
                _logger.warning("skipping corrupt sample %d (%d so far): %r", i, self.num_skipped, err)
        else:
            raise RuntimeError(f"every sample of class {label} is unreadable")
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label
