"""Random access to the shards of :mod:`ltsam.data.shards` through ``wids``, for exact sampler semantics.

A stream can only approximate samplers such as ``ClassAwareSampler``; this map-style data set reads sample i
of the same tar files (indexed by ``{split}_wids.json``), so any index sampler, distributed or class-aware,
works unchanged. Labels come from the index and the per-class index from ``{split}_by_class.npz`` (both
written with the shards), so neither samplers nor the corrupt-sample fallback read images or rebuild anything.

Open shards: ``wids`` keeps an LRU cache of open shards and re-indexes a tar on every miss, and a shuffled
sampler touches every shard, so by default all shards stay open, up to ``LTSAM_WIDS_OPEN_SHARDS`` (default
1024, within the usual limit of 1024 file descriptors per process; the environment variable or ``lru_size``
changes it). ``wids``'s own prints and warnings are routed to the ``ltsam.data`` logger (debug level) with
the shard's name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import wids
from PIL import Image
from torch.utils.data import Dataset

from ltsam.counts import load_class_counts
from ltsam.data.integrity import SkipLedger
from ltsam.data.shards import (
    by_class_name,
    check_shard_set,
    class_index,
    counts_name,
    read_shardlist,
    sample_problem,
    shardlist_labels,
    wids_name,
)
from ltsam.data.stream import IMAGE_KEYS

_logger = logging.getLogger("ltsam.data")
OPEN_SHARDS_ENV = "LTSAM_WIDS_OPEN_SHARDS"


@contextlib.contextmanager
def routed_output(where: str) -> Iterator[None]:
    """Capture what ``wids`` prints or warns and log it once, at debug level, naming ``where``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    text = out.getvalue().strip() + "".join(f"\n{w.message}" for w in caught)
    if text.strip():
        _logger.debug("wids, %s: %s", where, text.strip())


def load_class_index(root: Path, split: str, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets) written beside the wids index; built here once only for shards of an older writer."""
    path = root / by_class_name(split)
    if path.is_file():
        with np.load(path) as index:
            return index["order"], index["offsets"]
    _logger.info("%s not found (shards of an older writer): building the per-class index once", path)
    return class_index(labels, num_classes)


class ShardIndexDataset(Dataset):
    """``(image, label)`` by index over a split's shards, with ``targets`` and ``class_counts`` for samplers.

    Local shards are opened in place (no ``wids`` cache copy) unless ``cache_dir`` is given. Every sample read
    is checked against the index (content digest, label range); a sample that fails, or does not decode, is
    skipped, counted once per shard however often it is met (``num_skipped``, ``skipped_by_shard``; the skips
    themselves in ``skip_events``), logged once per shard with its key, and replaced by the next sample of the
    same class. A missing shard, or one whose size differs from the size written, is an error naming it when
    the data set is built; one cut later, at the first access to it.
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
        shardlist = read_shardlist(root, split)
        check_shard_set(root, split, shardlist)
        self.root = root
        self.targets = shardlist_labels(shardlist)
        self.class_counts = load_class_counts(root / counts_name(split))
        self._order, self._offsets = load_class_index(root, split, self.targets, len(self.class_counts))
        self._digests = [d for s in shardlist for d in s.get("digests", [None] * s["nsamples"])]
        self._shard_of = np.repeat(np.arange(len(shardlist)), [s["nsamples"] for s in shardlist])
        self._nsamples = [s["nsamples"] for s in shardlist]
        self.ledger = SkipLedger([s["url"] for s in shardlist], self._nsamples)
        localname = None if cache_dir else str  # identity: read local shards in place, picklable
        self.lru_size = lru_size or min(len(shardlist), int(os.environ.get(OPEN_SHARDS_ENV, 1024)))
        with routed_output(str(index)):
            self.shards = wids.ShardListDataset(
                str(index), transformations=[], localname=localname, cache_dir=cache_dir, lru_size=self.lru_size
            )
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def num_skipped(self) -> int:
        """Distinct bad samples met so far (the class's fall-through may skip one sample many times)."""
        return self.ledger.total

    @property
    def skip_events(self) -> int:
        return self.ledger.skip_events

    def skipped_by_shard(self) -> dict[str, int]:
        return self.ledger.summary()

    def bad_samples(self) -> dict[str, list[int]]:
        return self.ledger.bad_samples()

    def same_class(self, label: int) -> np.ndarray:
        """Indices of the samples of class ``label``, ascending (from the per-class index)."""
        return self._order[self._offsets[label] : self._offsets[label + 1]]

    def _read(self, index: int, shard: int) -> tuple[dict, str | None]:
        """The sample's members as bytes, and what is wrong with it (None if it passes its checks)."""
        url = self.ledger.names[shard]
        with routed_output(url):
            try:
                tar, _, _ = self.shards.get_shard(index)
                found = len(tar)
            except Exception as err:  # wids could not index the tar: cut short or garbled
                raise RuntimeError(f"{self.root / url}: cannot be indexed ({type(err).__name__}: {err}); the "
                                   "shard changed after writing: run `python -m ltsam.data.shards verify`") from err
            if found < self._nsamples[shard]:
                self.ledger.short(shard, found, self._nsamples[shard])
                self.ledger.raise_if_short()
            raw = self.shards[index]
        sample = {k.lstrip("."): (v.read() if isinstance(v, io.IOBase) else v) for k, v in raw.items()
                  if not k.startswith("__")}
        sample["__key__"] = raw.get("__key__")
        _, problem = sample_problem(sample, self._digests[index], self.num_classes)
        return sample, problem

    def _load(self, index: int) -> Image.Image:
        shard = int(self._shard_of[index])
        sample, problem = self._read(index, shard)
        if problem is None:
            data = next(sample[k] for k in IMAGE_KEYS if k in sample)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    return img.convert("RGB")
            except Exception as err:
                problem = f"undecodable image ({err})"
        self.ledger.skip(shard, index - self.ledger.starts[shard], sample["__key__"], problem)
        raise _Skipped

    def __getitem__(self, index: int):
        label = int(self.targets[index])
        candidates = self.same_class(label)
        start = int(np.searchsorted(candidates, index))
        for step in range(len(candidates)):
            try:
                img = self._load(int(candidates[(start + step) % len(candidates)]))
                break
            except _Skipped:  # counted and logged: use the class's next sample
                continue
        else:
            raise RuntimeError(f"every sample of class {label} is unreadable (see the warnings above)")
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label


class _Skipped(Exception):
    """A sample failed its check; the ledger has it."""
