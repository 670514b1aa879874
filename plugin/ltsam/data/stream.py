"""Stream shards written by :mod:`ltsam.data.shards`, with class-aware sampling inside the stream.

Two pipelines, both giving every rank the same number of batches per epoch (so DDP never hangs at an epoch's
end):

* ``instance``: shards are shuffled identically on every rank (seed + epoch), dealt to the global workers
  ``rank * num_workers + worker`` and read once; each worker yields a fixed quota (``with_epoch``), re-reading
  its own shards if they hold fewer samples. Workers never share a shard, so an epoch's samples are disjoint
  across ranks and workers.
* ``sqrt`` / ``balanced`` / ``progressive``: every worker resamples the shards of each frequency bucket
  (``webdataset.ResampledShards``) and a seeded mixer draws a bucket per sample. The label (``.cls``) is read
  before the image is decoded: each sample is emitted ``floor(r) + Bernoulli(frac r)`` times, r its class's
  emission rate, so rejected samples cost no decode. With rates ``r_c ~ p_c / n_c`` and bucket probabilities
  ``P_b ~ sum_c n_bc r_c``, class c comes out with probability ``p_c = class_probabilities(counts, mode)``
  exactly in expectation, whatever the layout; log2-bucketed shards keep every r_c near 1.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from timm.data.readers.reader_wds import ReaderWds, _decode, log_and_continue
from timm.data.readers.shared_count import SharedCount
from torch.utils.data import IterableDataset, get_worker_info

from ltsam.counts import load_class_counts
from ltsam.data.balance import MODES, class_probabilities
from ltsam.data.shards import INFO_NAME, counts_name

_logger = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardLayout:
    """One split's shards as recorded in ``_info.json``; building it checks that every shard exists."""

    root: Path
    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    buckets: tuple[int, ...]
    class_hist: tuple[dict[int, int], ...]
    class_counts: tuple[int, ...]

    @classmethod
    def load(cls, root: str | os.PathLike, split: str = "train") -> ShardLayout:
        root = Path(root)
        info_path = root / INFO_NAME
        if not info_path.is_file():
            raise FileNotFoundError(
                f"{info_path} not found; write shards with `python -m ltsam.data.shards write`"
            )
        splits = json.loads(info_path.read_text()).get("splits", {})
        if split not in splits:
            raise KeyError(f"split {split!r} not in {info_path} (has {sorted(splits)})")
        entry = splits[split]
        urls = tuple(str(root / f) for f in entry["filenames"])
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(urls)} shards of split {split!r} listed in {info_path} are missing, "
                f"e.g. {missing[:3]}"
            )
        hists = entry.get("shard_class_hist")
        counts_file = root / counts_name(split)
        counts = load_class_counts(counts_file if counts_file.is_file() else entry["class_counts"])
        if hists is None:  # a layout from another writer: one bucket, histogram unknown per shard
            hists = [{}] * len(urls)
        return cls(
            root=root,
            split=split,
            urls=urls,
            lengths=tuple(entry["shard_lengths"]),
            buckets=tuple(entry.get("shard_buckets", [0] * len(urls))),
            class_hist=tuple({int(k): int(v) for k, v in h.items()} for h in hists),
            class_counts=tuple(counts),
        )

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def bucket_class_counts(self) -> dict[int, np.ndarray]:
        """Per bucket, how many samples of each class its shards hold (the n_bc of the mixing weights)."""
        out: dict[int, np.ndarray] = {}
        for bucket, hist in zip(self.buckets, self.class_hist):
            counts = out.setdefault(bucket, np.zeros(len(self.class_counts)))
            for c, n in hist.items():
                counts[c] += n
        if len(out) == 1 and not out[next(iter(out))].any():
            out = {next(iter(out)): np.asarray(self.class_counts, dtype=np.float64)}
        return out


def mixing_plan(layout: ShardLayout, mode: str, progress: float = 0.0) -> tuple[dict[int, float], np.ndarray]:
    """Bucket probabilities P_b and per-(bucket, class) emission rates realising ``class_probabilities``.

    Rates are scaled so each bucket emits one sample per sample read on average; returns ({bucket: P_b},
    rates[bucket_index, class]) with bucket_index following the sorted bucket ids.
    """
    target = class_probabilities(layout.class_counts, mode, progress)
    n = np.asarray(layout.class_counts, dtype=np.float64)
    per_class = np.divide(target, n, out=np.zeros_like(target), where=n > 0)
    nbc = layout.bucket_class_counts()
    buckets = sorted(nbc)
    mass = np.array([(nbc[b] * per_class).sum() for b in buckets])
    probs = {b: float(m / mass.sum()) for b, m in zip(buckets, mass)}
    rates = np.stack(
        [per_class * nbc[b].sum() / m if m > 0 else per_class * 0 for b, m in zip(buckets, mass)]
    )
    return probs, rates


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size from the arguments, else from an initialised torch.distributed, else (0, 1)."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_shard_count(layout: ShardLayout, world_size: int, num_workers: int) -> None:
    """Fewer shards than global workers would leave a worker idle and hang DDP: refuse it up front."""
    workers = world_size * max(1, num_workers)
    if len(layout.urls) < workers:
        raise ValueError(
            f"split {layout.split!r} in {layout.root} has {len(layout.urls)} shards but {world_size} ranks x "
            f"{max(1, num_workers)} workers = {workers} readers need at least one each; rewrite with a "
            f"smaller --maxcount or --min-shards-per-group, or use fewer loader workers"
        )


class _SkipCounter:
    """Warn about, and count across worker processes, samples that could not be read or decoded."""

    def __init__(self) -> None:
        self.value = multiprocessing.Value("q", 0)

    def __call__(self, exn: Exception) -> bool:
        with self.value.get_lock():
            self.value.value += 1
            n = self.value.value
        _logger.warning("skipping a corrupt sample (%d so far): %r", n, exn)
        return True


def _emit(src: Iterator[dict], rates: np.ndarray, rng: random.Random, on_error: Callable) -> Iterator[dict]:
    """Repeat-factor stage on the undecoded sample: emit it floor(r) + Bernoulli(frac r) times.

    Rates become plain floats first: numpy scalar arithmetic per sample cost more than the mixing itself.
    """
    whole = [int(r) for r in rates.tolist()]
    frac = [r - w for r, w in zip(rates.tolist(), whole)]
    for sample in src:
        try:
            label = int(sample["cls"])
            repeats = whole[label] + (rng.random() < frac[label])
        except (KeyError, ValueError, IndexError) as err:
            on_error(err)
            continue
        for _ in range(repeats):
            yield sample


def _mix(sources: list[Iterator[dict]], probs: np.ndarray, rng: np.random.Generator) -> Iterator[dict]:
    """Seeded RandomMix over infinite sources (webdataset's uses the global ``random``); draws in blocks."""
    while True:
        for i in rng.choice(len(sources), size=1024, p=probs).tolist():
            yield next(sources[i])


class ClassAwareSource(IterableDataset):
    """Infinite stream of undecoded samples whose classes follow ``class_probabilities(counts, mode)``.

    Seeds mix ``seed``, the epoch, the rank and the loader worker, so runs repeat and readers differ. The
    epoch lives in shared memory (``set_epoch``) so persistent workers follow a progressive schedule.
    """

    def __init__(
        self,
        layout: ShardLayout,
        mode: str,
        *,
        num_epochs: int = 1,
        seed: int = 0,
        rank: int = 0,
        shuffle_size: int = 2000,
        epoch: SharedCount | None = None,
        on_error: Callable[[Exception], bool] = log_and_continue,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
        self.layout, self.mode, self.num_epochs, self.seed, self.rank = layout, mode, num_epochs, seed, rank
        self.shuffle_size = shuffle_size
        self.epoch = epoch if epoch is not None else SharedCount()
        self.on_error = on_error

    def progress(self, epoch: int) -> float:
        return min(1.0, epoch / max(1, self.num_epochs - 1))

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch.value
        info = get_worker_info()
        worker_seed = wds.utils.make_seed(self.seed, epoch, self.rank, info.id if info else 0)
        probs, rates = mixing_plan(self.layout, self.mode, self.progress(epoch))
        sources, weights = [], []
        for (bucket, p), bucket_rates in zip(probs.items(), rates):
            if p <= 0:
                continue
            urls = [u for u, b in zip(self.layout.urls, self.layout.buckets) if b == bucket]
            shards = wds.ResampledShards(
                urls, seed=bucket, worker_seed=lambda s=worker_seed: s, deterministic=True
            )
            samples = wds.DataPipeline(shards, wds.tarfile_to_samples(handler=self.on_error))
            rng = random.Random(wds.utils.make_seed(worker_seed, bucket))
            sources.append(_emit(iter(samples), bucket_rates, rng, self.on_error))
            weights.append(p)
        mixed = _mix(sources, np.asarray(weights) / sum(weights), np.random.default_rng(worker_seed))
        shuffle = wds.shuffle(
            self.shuffle_size, initial=min(self.shuffle_size, 100), rng=random.Random(worker_seed)
        )
        yield from shuffle(mixed)


def decode_sample(sample: dict) -> tuple[Image.Image, int]:
    """PIL RGB image and int label of an undecoded sample."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} has none of {IMAGE_KEYS}")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB"), int(sample["cls"])


class StreamingDataset(IterableDataset):
    """Images and labels streamed from shards, a fixed number per rank per epoch.

    ``len(dataset)`` is the samples per rank per epoch; use ``DataLoader(dataset, batch_size, num_workers)``
    with the same ``num_workers`` given here (every worker yields whole batches). ``mode=None`` or
    ``'instance'`` reads each shard once per epoch; other modes re-balance in the stream (module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        mode: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        samples_per_epoch: int | None = None,
        num_epochs: int = 1,
        seed: int = 0,
        shuffle_size: int = 2000,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        super().__init__()
        self.layout = ShardLayout.load(root, split)
        self.mode = mode or "instance"
        if self.mode not in MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.num_workers = num_workers
        check_shard_count(self.layout, self.world_size, num_workers)
        self.batch_size, self.seed, self.shuffle_size = batch_size, seed, shuffle_size
        self.transform, self.target_transform = transform, target_transform
        self.skipped = _SkipCounter()
        self.epoch = SharedCount()
        readers = self.world_size * max(1, num_workers)
        total = samples_per_epoch or self.layout.num_samples
        self.quota = total // (readers * batch_size) * batch_size  # per worker, whole batches
        if self.quota == 0:
            raise ValueError(
                f"{total} samples per epoch over {readers} readers is less than one batch of {batch_size} "
                "each"
            )
        self.source = ClassAwareSource(
            self.layout,
            self.mode,
            num_epochs=num_epochs,
            seed=seed,
            rank=self.rank,
            shuffle_size=shuffle_size,
            epoch=self.epoch,
            on_error=self.skipped,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = epoch

    @property
    def class_counts(self) -> list[int]:
        return list(self.layout.class_counts)

    @property
    def num_classes(self) -> int:
        return len(self.layout.class_counts)

    @property
    def num_skipped(self) -> int:
        return self.skipped.value.value

    def __len__(self) -> int:
        return self.quota * max(1, self.num_workers)

    def _instance_samples(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        readers = self.world_size * max(1, self.num_workers)
        order = list(self.layout.urls)
        random.Random(wds.utils.make_seed(self.seed, self.epoch.value)).shuffle(order)
        mine = order[self.rank * max(1, self.num_workers) + worker :: readers]
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch.value, self.rank, worker))
        return iter(
            wds.DataPipeline(
                wds.SimpleShardList(mine),
                wds.tarfile_to_samples(handler=self.skipped),
                wds.shuffle(self.shuffle_size, initial=min(self.shuffle_size, 100), rng=rng),
            ).repeat(nepochs=-1)
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor | Image.Image, int]]:
        info = get_worker_info()
        if (info.num_workers if info else 0) != self.num_workers:
            raise RuntimeError(
                f"StreamingDataset was built for num_workers={self.num_workers} but runs with "
                f"{info.num_workers if info else 0} loader workers; pass the loader's num_workers"
            )
        samples = self._instance_samples() if self.mode == "instance" else iter(self.source)
        produced = 0
        while produced < self.quota:
            sample = next(samples)
            try:
                img, label = decode_sample(sample)
            except Exception as err:  # corrupt image bytes or label: counted, and the quota still filled
                self.skipped(err)
                continue
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                label = self.target_transform(label)
            produced += 1
            yield img, label


class ClassAwareReaderWds(ReaderWds):
    """timm's ``wds/`` reader with class-aware sampling before decoding.

    Use as ``timm.data.IterableImageDataset(root, reader=ClassAwareReaderWds(root, split, mode='sqrt'))``;
    timm's own pipeline (and its ``with_epoch`` sizing) is kept for ``instance``.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        *,
        mode: str = "instance",
        num_epochs: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root, split=split, is_training=True, **kwargs)
        self.layout = ShardLayout.load(root, split)
        self.mode = mode
        if rank is not None or world_size is not None:
            self.dist_rank, self.dist_num_replicas = resolve_rank(rank, world_size)
        self.class_num_epochs = num_epochs
        ClassAwareSource(self.layout, mode)  # validates the mode now rather than in a worker

    def set_loader_cfg(self, num_workers: int | None = None) -> None:
        super().set_loader_cfg(num_workers)
        check_shard_count(self.layout, self.dist_num_replicas, num_workers or 0)

    def _lazy_init(self) -> None:
        super()._lazy_init()
        if self.mode == "instance":
            return
        source = ClassAwareSource(
            self.layout,
            self.mode,
            num_epochs=self.class_num_epochs,
            seed=self.common_seed,
            rank=self.dist_rank,
            shuffle_size=self.sample_shuffle_size,
            epoch=self.epoch_count,
        )
        decode = partial(_decode, image_key=self.input_key, image_mode=self.input_img_mode)
        self.ds = wds.DataPipeline(
            source,
            wds.map(decode, handler=log_and_continue),
            wds.rename(image=self.input_key, target="target"),
        )
