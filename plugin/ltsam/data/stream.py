"""Stream shards written by :mod:`ltsam.data.shards`, with class-aware sampling inside the stream.

Every rank gets the same number of batches per epoch (so DDP never hangs at an epoch's end), every read is
checked against the index (digest, label range; see :mod:`ltsam.data.integrity`), and everything is a pure
function of (seed, epoch, rank, worker), so a stopped run resumes bit-identical. The R = ranks x workers
readers are "global workers" ``g = rank * num_workers + worker``.

* ``instance``: the shards, shuffled by (seed, epoch) alike on every rank, form one sequence of N samples;
  reader g reads the contiguous slice ``[g N / R, (g + 1) N / R)`` (starting mid-shard where it falls)
  through a shuffle buffer and yields a whole-batch quota of it. So an epoch visits every image once except
  at most one batch per reader that the whole-batch rule cuts (a random one, as the buffer empties last), and
  no image twice: readers do not overlap. Only if samples were skipped does a reader run past its slice to
  fill its quota.
* ``sqrt`` / ``balanced`` / ``progressive``: each reader reads every frequency bucket as an endless cycle
  over that bucket's shards (a fixed, seeded shard order; samples were shuffled within the bucket when
  written), and a seeded mixer draws a bucket per sample. The label (``.cls``) is read before the image is
  decoded: each sample is emitted ``floor(r) + Bernoulli(frac r)`` times, r its class's emission rate, so
  rejected samples cost no decode. With rates ``r_c ~ p_c / n_c`` and bucket probabilities
  ``P_b ~ sum_c n_bc r_c``, class c comes out with probability ``p_c = class_probabilities(counts, mode)``
  exactly in expectation, whatever the layout; log2-bucketed shards keep every r_c near 1.

  **Where a reader starts in a bucket** decides which images are ever drawn (a reader that always starts at
  a shard's first sample draws only prefixes). With ``L_b(e)`` the samples a reader is expected to read from
  bucket b in epoch e and ``u_b`` a seeded random offset:

  - long arcs (``L_b(e) >= TILED_ARC``): reader g starts at ``u_b + R * C_b(e) + g * L_b(e)`` (mod the
    bucket's size), ``C_b(e) = sum_{e' < e} L_b(e')``. The readers' arcs tile the bucket's cycle, epoch
    after epoch, so a bucket read T times in all over E epochs has ``min(1, T / n_b)`` of its images read
    (up to the random overshoot at the arc ends), where independent draws reach ``1 - exp(-T / n_b)``;
  - short arcs (their random length would make tiles overlap): the readers start ``n_b / R`` apart, and
    epoch e shifts them all by ``frac(e * GOLDEN)`` of that spacing, a sequence that spreads the arcs of any
    number of epochs evenly.

  A read image is drawn unless its class's emission rate rejects it (rates lie within 0.5-1 inside a log2
  bucket, and never exceed 1, so nothing is drawn twice from one read) or the shuffle buffer still holds it
  when the epoch ends (``StreamingDataset`` keeps that buffer at an eighth of the quota). So the share of
  a bucket ever drawn is at least the independent draws' share: measured by
  ``tests/test_stream.py::test_undersampled_bucket_coverage_matches_independent_draws`` and
  ``tools/bench_stream.py``.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
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
from ltsam.data.integrity import SkipLedger, read_shard
from ltsam.data.shards import INFO_NAME, check_shard_set, counts_name, read_shardlist, sample_problem, wids_name

_logger = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardLayout:
    """One split's shards as recorded in ``_info.json``; loading it checks that every shard exists and has the
    size it was written with (:func:`ltsam.data.shards.check_shard_set`)."""

    root: Path
    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    buckets: tuple[int, ...]
    class_hist: tuple[dict[int, int], ...]
    class_counts: tuple[int, ...]
    # per shard, from the wids index when there is one: each sample's label and content digest
    sample_labels: tuple[np.ndarray | None, ...] = field(default=(), repr=False)
    sample_digests: tuple[tuple[str, ...] | None, ...] = field(default=(), repr=False)

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
        hists = entry.get("shard_class_hist")
        counts_file = root / counts_name(split)
        counts = load_class_counts(counts_file if counts_file.is_file() else entry["class_counts"])
        if hists is None:  # a layout from another writer: one bucket, histogram unknown per shard
            hists = [{}] * len(urls)
        indexed = {}
        if (root / wids_name(split)).is_file():
            indexed = {s["url"]: s for s in read_shardlist(root, split)}
        shard_index = [indexed.get(f, {}) for f in entry["filenames"]]
        check_shard_set(root, split, [{**s, "url": f, "nsamples": n}
                                      for s, f, n in zip(shard_index, entry["filenames"], entry["shard_lengths"])])
        return cls(
            root=root,
            split=split,
            urls=urls,
            lengths=tuple(entry["shard_lengths"]),
            buckets=tuple(entry.get("shard_buckets", [0] * len(urls))),
            class_hist=tuple({int(k): int(v) for k, v in h.items()} for h in hists),
            class_counts=tuple(counts),
            sample_labels=tuple(
                np.asarray(s["labels"], dtype=np.int64) if "labels" in s else None for s in shard_index
            ),
            sample_digests=tuple(tuple(s["digests"]) if "digests" in s else None for s in shard_index),
        )

    def __post_init__(self) -> None:
        if not self.sample_labels:  # built by hand: nothing per sample to check against
            object.__setattr__(self, "sample_labels", (None,) * len(self.urls))
            object.__setattr__(self, "sample_digests", (None,) * len(self.urls))

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def bucket_sizes(self) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for bucket, n in zip(self.buckets, self.lengths):
            sizes[bucket] = sizes.get(bucket, 0) + n
        return sizes

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


MIN_EMISSION = 0.25  # a bucket emits at least this many samples per sample read


def mixing_plan(layout: ShardLayout, mode: str, progress: float = 0.0) -> tuple[dict[int, float], np.ndarray]:
    """Bucket probabilities P_b and per-(bucket, class) emission rates realising ``class_probabilities``.

    Within a bucket only the rates' ratios matter; they are scaled so the largest is 1: a read sample is
    emitted at most once (no duplicates, so every draw is a distinct read), at the price of reading up to
    twice per emission in a log2 bucket. A layout whose classes differ more inside a bucket (``group_by
    none``) would read too much for each emission: there the rates are scaled up until a bucket emits
    ``MIN_EMISSION`` samples per read, duplicating its rarest classes. Returns ({bucket: P_b},
    rates[bucket_index, class]) with bucket_index following the sorted bucket ids.
    """
    target = class_probabilities(layout.class_counts, mode, progress)
    n = np.asarray(layout.class_counts, dtype=np.float64)
    per_class = np.divide(target, n, out=np.zeros_like(target), where=n > 0)
    nbc = layout.bucket_class_counts()
    buckets = sorted(nbc)
    mass = np.array([(nbc[b] * per_class).sum() for b in buckets])
    probs = {b: float(m / mass.sum()) for b, m in zip(buckets, mass)}
    rates = np.zeros((len(buckets), len(n)))
    for i, (b, m) in enumerate(zip(buckets, mass)):
        if m > 0:
            present = per_class * (nbc[b] > 0)
            rates[i] = per_class / max(present.max(), MIN_EMISSION * m / nbc[b].sum())
    return probs, rates


def emission_per_read(layout: ShardLayout, rates: np.ndarray) -> dict[int, float]:
    """Per bucket, samples emitted per sample read (the mean rate over its samples)."""
    nbc = layout.bucket_class_counts()
    return {b: float((nbc[b] * r).sum() / nbc[b].sum()) for b, r in zip(sorted(nbc), rates)}


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


class ShardReader:
    """Reads shards by index, checks each sample against the index, and records skips and short shards.

    Picklable (the loader hands it to its workers); the ledger's counters are in shared memory.
    """

    def __init__(self, layout: ShardLayout, ledger: SkipLedger | None = None) -> None:
        self.layout = layout
        self.ledger = ledger if ledger is not None else SkipLedger([Path(u).name for u in layout.urls], layout.lengths)

    def read(self, shard: int, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Checked samples ``start:stop`` of one shard, each tagged with ``__shard__`` and ``__position__``; a
        shard that ends
        before its metadata's length (or cannot be opened) is recorded in the ledger."""
        layout, expected = self.layout, self.layout.lengths[shard]
        stop = expected if stop is None else stop
        labels, digests = layout.sample_labels[shard], layout.sample_digests[shard]
        num_classes = len(layout.class_counts)
        found = 0
        try:
            samples = read_shard(layout.urls[shard], start)
            while True:
                try:
                    position, sample = next(samples)
                except StopIteration as end:
                    found = end.value
                    break
                if position >= stop:
                    samples.close()
                    return
                digest = digests[position] if digests is not None and position < len(digests) else None
                label, problem = sample_problem(sample, digest, num_classes)
                if problem is None and labels is not None and position < len(labels) and label != labels[position]:
                    problem = f"label {label}, the index says {labels[position]}"
                if problem is not None:
                    self.ledger.skip(shard, position, sample["__key__"], problem)
                    continue
                sample["__shard__"], sample["__position__"] = shard, position
                yield sample
        except (OSError, tarfile.TarError) as err:  # deleted or unreadable since the layout was loaded
            _logger.error("%s: cannot be read (%s)", layout.urls[shard], err)
        if found < expected:
            self.ledger.short(shard, found, expected)

    def cycle(self, shards: Sequence[int], offset: int) -> Iterator[dict]:
        """Endless read of the shards in this order, wrapping around, from sample ``offset`` of their
        concatenation (metadata lengths)."""
        lengths = [self.layout.lengths[i] for i in shards]
        total = sum(lengths)
        if total == 0:
            raise ValueError(f"shards {[self.layout.urls[i] for i in shards][:3]} hold no samples")
        offset %= total
        i = 0
        while offset >= lengths[i]:
            offset -= lengths[i]
            i += 1
        while True:
            produced = False
            for step in range(len(shards)):
                j = (i + step) % len(shards)
                for sample in self.read(shards[j], offset if step == 0 else 0):
                    produced = True
                    yield sample
            if not produced:
                self.ledger.raise_if_short()
                raise RuntimeError(f"no readable sample in {len(shards)} shards, e.g. {self.layout.urls[shards[0]]}")
            offset = 0


TILED_ARC = 64  # expected reads per reader and epoch from which a bucket's arcs are tiled, not spread
GOLDEN = (5**0.5 - 1) / 2  # epoch e shifts short arcs by frac(e x GOLDEN): evenly spread for any E


def _emit(src: Iterator[dict], rates: list[float], rng: random.Random) -> Iterator[dict]:
    """Repeat-factor stage on the undecoded sample: emit it floor(r) + Bernoulli(frac r) times.

    Rates are plain floats: numpy scalar arithmetic per sample cost more than the mixing itself. Labels were
    checked by the reader.
    """
    whole = [int(r) for r in rates]
    frac = [r - w for r, w in zip(rates, whole)]
    for sample in src:
        label = int(sample["cls"])
        for _ in range(whole[label] + (rng.random() < frac[label])):
            yield sample


def _mix(sources: list[Iterator[dict]], probs: np.ndarray, rng: np.random.Generator) -> Iterator[dict]:
    """Seeded RandomMix over infinite sources (webdataset's uses the global ``random``); draws in blocks."""
    while True:
        for i in rng.choice(len(sources), size=1024, p=probs).tolist():
            yield next(sources[i])


def _shuffle(size: int, seed: int) -> Callable[[Iterator[dict]], Iterator[dict]]:
    return wds.shuffle(size, initial=min(size, 100), rng=random.Random(seed))


def expected_reads(quota: int, shuffle_size: int) -> int:
    """Samples one reader pulls from its source in an epoch: its quota plus what the shuffle buffer holds
    when the quota is reached (the buffer fills two samples per sample it yields)."""
    return quota + min(quota, shuffle_size)


class ClassAwareSource(IterableDataset):
    """Infinite stream of undecoded samples whose classes follow ``class_probabilities(counts, mode)``.

    Seeds mix ``seed``, the epoch, the rank and the loader worker, so runs repeat and readers differ; where
    each reader starts in each bucket follows the module docstring, from ``reads_per_epoch`` (samples one
    reader pulls from this source per epoch, :func:`expected_reads`). The epoch lives in shared memory
    (``set_epoch``) so persistent workers follow.
    """

    def __init__(
        self,
        layout: ShardLayout,
        mode: str,
        *,
        num_epochs: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        reads_per_epoch: int | None = None,
        shuffle_size: int = 2000,
        epoch: SharedCount | None = None,
        reader: ShardReader | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
        self.layout, self.mode, self.num_epochs, self.seed = layout, mode, num_epochs, seed
        self.rank, self.world_size = rank, world_size
        self.reads_per_epoch = reads_per_epoch
        self.shuffle_size = shuffle_size
        self.epoch = epoch if epoch is not None else SharedCount()
        self.reader = reader if reader is not None else ShardReader(layout)
        self._past_reads: dict[int, list[dict[int, float]]] = {}

    def progress(self, epoch: int) -> float:
        return min(1.0, epoch / max(1, self.num_epochs - 1))

    def bucket_reads(self, epoch: int, readers: int) -> dict[int, float]:
        """Samples one reader is expected to read from each bucket in ``epoch``: L_b(e) = P_b(e) x emitted
        samples / emissions per read."""
        emitted = self.reads_per_epoch or max(1, self.layout.num_samples // readers)
        probs, rates = mixing_plan(self.layout, self.mode, self.progress(epoch))
        efficiency = emission_per_read(self.layout, rates)
        return {b: p * emitted / efficiency[b] if p > 0 else 0.0 for b, p in probs.items()}

    def past_reads(self, epoch: int, readers: int) -> dict[int, float]:
        """C_b(e) = sum of L_b(e') over the epochs e' < e, where L_b changes with the epoch (progressive).

        The running sums are kept (per reader count), so a worker that goes through the epochs in order
        computes one epoch's plan per epoch, not all earlier ones again; the sums are added epoch by epoch in
        the same order either way, so the result is the same to the last bit.
        """
        sums = self._past_reads.setdefault(readers, [dict.fromkeys(self.layout.bucket_sizes(), 0.0)])
        while len(sums) <= epoch:
            running = dict(sums[-1])
            for b, length in self.bucket_reads(len(sums) - 1, readers).items():
                running[b] += length
            sums.append(running)
        return sums[epoch]

    def bucket_starts(self, epoch: int, reader: int, readers: int) -> dict[int, int]:
        """Where ``reader`` of ``readers`` starts reading each bucket's cycle in ``epoch`` (module docstring):
        tiled after the arcs of all readers and earlier epochs where an arc is long, at random where short."""
        sizes = self.layout.bucket_sizes()
        now = self.bucket_reads(epoch, readers)
        past = self.past_reads(epoch, readers) if self.mode == "progressive" else {
            b: epoch * length for b, length in now.items()}
        starts = {}
        for b, length in now.items():
            if length >= TILED_ARC:
                base = random.Random(wds.utils.make_seed(self.seed, b)).randrange(sizes[b])
                starts[b] = int(base + readers * past[b] + reader * length) % sizes[b]
            else:  # readers spread evenly; epochs shift them by golden-ratio fractions of that spacing
                base = random.Random(wds.utils.make_seed(self.seed, b)).randrange(sizes[b])
                spacing = sizes[b] / readers
                starts[b] = int(base + (epoch * GOLDEN % 1.0 + reader) * spacing) % sizes[b]
        return starts

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch.value
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        worker_seed = wds.utils.make_seed(self.seed, epoch, self.rank, worker)
        probs, rates = mixing_plan(self.layout, self.mode, self.progress(epoch))
        starts = self.bucket_starts(epoch, reader, readers)
        sources, weights = [], []
        for (bucket, p), bucket_rates in zip(probs.items(), rates):
            if p <= 0:
                continue
            shards = [i for i, b in enumerate(self.layout.buckets) if b == bucket]
            random.Random(wds.utils.make_seed(self.seed, bucket)).shuffle(shards)
            rng = random.Random(wds.utils.make_seed(worker_seed, bucket))
            sources.append(_emit(self.reader.cycle(shards, starts[bucket]), bucket_rates.tolist(), rng))
            weights.append(p)
        mixed = _mix(sources, np.asarray(weights) / sum(weights), np.random.default_rng(worker_seed))
        yield from _shuffle(self.shuffle_size, worker_seed)(mixed)


@dataclass
class DrawCounts:
    """What a stream drew, aggregated as it goes: distinct images per bucket and draws per class."""

    distinct: dict[int, set[tuple[int, str]]]
    class_draws: np.ndarray

    @classmethod
    def of(cls, layout: ShardLayout, drawn: Iterable[dict]) -> DrawCounts:
        """``drawn``: undecoded samples (``__shard__`` and ``__key__`` identify an image), consumed lazily."""
        counts = cls({}, np.zeros(len(layout.class_counts)))
        for sample in drawn:
            shard = sample["__shard__"]
            counts.distinct.setdefault(layout.buckets[shard], set()).add((shard, sample["__key__"]))
            counts.class_draws[int(sample["cls"])] += 1
        return counts


def bucket_coverage(layout: ShardLayout, drawn: DrawCounts) -> dict[int, tuple[float, float]]:
    """Per bucket: (share of its images drawn at least once, the share that independent draws at the same
    per-class draw counts give in expectation, ``sum_c n_bc (1 - (1 - 1/n_c)^d_c) / n_b``)."""
    n = np.asarray(layout.class_counts, dtype=np.float64)
    hit = 1.0 - np.power(1.0 - np.divide(1.0, n, out=np.zeros_like(n), where=n > 0), drawn.class_draws)
    sizes = layout.bucket_sizes()
    return {
        b: (len(drawn.distinct.get(b, ())) / sizes[b], float((nbc * hit).sum() / sizes[b]))
        for b, nbc in sorted(layout.bucket_class_counts().items())
    }


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
    ``'instance'`` reads each image once per epoch; other modes re-balance in the stream (module docstring).
    A shard missing or not of its written size is an error when the data set is built. Samples that fail
    their check or do not decode are skipped and counted once each however often met (``num_skipped``,
    ``skipped_by_shard``; every skip in ``skip_events``); a shard found shorter than its metadata while
    reading (cut after the build) is an error when the epoch's quota is done.
    Loader workers reseed Python, NumPy and torch from (seed, epoch, rank, worker) at each epoch, so random
    augmentation repeats exactly with persistent workers too.
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
        self.reader = ShardReader(self.layout)
        self.epoch = SharedCount()
        self.readers = self.world_size * max(1, num_workers)
        total = samples_per_epoch or self.layout.num_samples
        self.quota = total // (self.readers * batch_size) * batch_size  # per worker, whole batches
        if self.quota == 0:
            raise ValueError(
                f"{total} samples per epoch over {self.readers} readers is less than one batch of {batch_size} "
                "each"
            )
        # the class-aware stream is already mixed per sample: a buffer of an eighth of the quota decorrelates
        # batches, and keeps the reads the epoch's end leaves unused (and so the images never drawn) small
        mixed_shuffle = min(shuffle_size, max(batch_size, self.quota // 8))
        self.source = ClassAwareSource(
            self.layout,
            self.mode,
            num_epochs=num_epochs,
            seed=seed,
            rank=self.rank,
            world_size=self.world_size,
            reads_per_epoch=expected_reads(self.quota, mixed_shuffle),
            shuffle_size=mixed_shuffle,
            epoch=self.epoch,
            reader=self.reader,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = epoch
        if self.mode == "progressive":  # extend the running sums here: workers started afresh inherit them
            self.source.past_reads(epoch, self.readers)

    @property
    def class_counts(self) -> list[int]:
        return list(self.layout.class_counts)

    @property
    def num_classes(self) -> int:
        return len(self.layout.class_counts)

    @property
    def num_skipped(self) -> int:
        """Distinct bad samples met so far (a sample skipped in several epochs counts once)."""
        return self.reader.ledger.total

    @property
    def skip_events(self) -> int:
        return self.reader.ledger.skip_events

    def skipped_by_shard(self) -> dict[str, int]:
        return self.reader.ledger.summary()

    def bad_samples(self) -> dict[str, list[int]]:
        return self.reader.ledger.bad_samples()

    def __len__(self) -> int:
        return self.quota * max(1, self.num_workers)

    def instance_slice(self, epoch: int, reader: int) -> tuple[list[int], int, int]:
        """(shard order of the epoch, first sample, samples) of ``reader``'s slice of the epoch's sequence."""
        order = list(range(len(self.layout.urls)))
        random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(order)
        n = self.layout.num_samples
        start = reader * n // self.readers
        return order, start, (reader + 1) * n // self.readers - start

    def _instance_samples(self, reader: int) -> Iterator[dict]:
        order, start, length = self.instance_slice(self.epoch.value, reader)
        rng_seed = wds.utils.make_seed(self.seed, self.epoch.value, self.rank, reader)
        samples = self.reader.cycle(order, start)
        mine = _shuffle(self.shuffle_size, rng_seed)(itertools.islice(samples, length))
        return itertools.chain(mine, samples)  # past the slice only if skipped samples left the quota short

    def __iter__(self) -> Iterator[tuple[torch.Tensor | Image.Image, int]]:
        info = get_worker_info()
        if (info.num_workers if info else 0) != self.num_workers:
            raise RuntimeError(
                f"StreamingDataset was built for num_workers={self.num_workers} but runs with "
                f"{info.num_workers if info else 0} loader workers; pass the loader's num_workers"
            )
        worker = info.id if info else 0
        if info is not None:  # this process is the worker: reseed what augmentations draw from, every epoch
            seed = wds.utils.make_seed(self.seed, self.epoch.value, self.rank, worker)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        reader = self.rank * max(1, self.num_workers) + worker
        samples = self._instance_samples(reader) if self.mode == "instance" else iter(self.source)
        produced = 0
        while produced < self.quota:
            sample = next(samples)
            try:
                img, label = decode_sample(sample)
            except Exception as err:  # undecodable despite a matching digest: counted, the quota still filled
                self.reader.ledger.skip(sample["__shard__"], sample["__position__"], sample["__key__"],
                                        f"undecodable image ({err})")
                continue
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                label = self.target_transform(label)
            produced += 1
            yield img, label
        self.reader.ledger.raise_if_short()


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
        self.shard_reader = ShardReader(self.layout)  # its skip counts are shared with the loader's workers
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
            world_size=self.dist_num_replicas,
            reads_per_epoch=expected_reads(int(self._num_samples_per_worker()), self.sample_shuffle_size),
            shuffle_size=self.sample_shuffle_size,
            epoch=self.epoch_count,
            reader=self.shard_reader,
        )
        decode = partial(_decode, image_key=self.input_key, image_mode=self.input_img_mode)
        self.ds = wds.DataPipeline(
            source,
            wds.map(decode, handler=log_and_continue),
            wds.rename(image=self.input_key, target="target"),
        )
