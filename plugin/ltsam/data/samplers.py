"""Class-aware samplers for map-style data sets, single-process or DDP, and a timm loader that uses them.

The class arithmetic is :mod:`ltsam.data.balance` (shared with the webdataset stream). Every epoch one
stream of indices is drawn from ``seed + epoch`` on every rank; rank ``r`` of ``R`` takes positions
``r, r + R, ...``, so ranks get disjoint shares of equal length, and ``set_epoch`` reshuffles. Draws are
with replacement (a tail class is re-drawn many times per epoch, which is the point).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from ltsam.data.balance import class_probabilities, repeat_factors
from ltsam_common.names import SAMPLERS


def _labels(data: Dataset | Sequence[int]) -> np.ndarray:
    targets = getattr(data, "targets", data)
    labels = np.asarray(targets, dtype=np.int64)
    if labels.ndim != 1 or labels.size == 0 or labels.min() < 0:
        raise ValueError(
            "a class-aware sampler needs a non-empty data set with non-negative integer `targets`"
        )
    return labels


def _replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """As torch's DistributedSampler: each argument defaults from an initialised process group, else 1 / 0."""
    live = dist.is_available() and dist.is_initialized()
    num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if live else 1)
    rank = rank if rank is not None else (dist.get_rank() if live else 0)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
    return num_replicas, rank


class _EpochStreamSampler(Sampler[int]):
    """One seeded stream per epoch, dealt round-robin to the ranks; subclasses draw ``_stream(rng)``."""

    def __init__(
        self,
        data: Dataset | Sequence[int],
        num_samples: int | None,
        num_replicas: int | None,
        rank: int | None,
        seed: int,
    ) -> None:
        self.labels = _labels(data)
        self.class_counts = np.bincount(self.labels)
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.total = num_samples if num_samples is not None else len(self.labels)
        self.num_samples = math.ceil(self.total / self.num_replicas)  # per rank
        self.seed = seed
        self.epoch = 0
        order = np.argsort(self.labels, kind="stable")
        self._by_class = order  # sample indices grouped by class
        self._starts = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def _draw_in_classes(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly chosen sample of each given class."""
        offsets = (rng.random(len(classes)) * self.class_counts[classes]).astype(np.int64)
        return self._by_class[self._starts[classes] + offsets]

    def _stream(self, rng: np.random.Generator, length: int) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        stream = self._stream(rng, self.num_samples * self.num_replicas)
        return iter(stream[self.rank :: self.num_replicas].tolist())


class ClassAwareSampler(_EpochStreamSampler):
    """Each draw picks a class with ``class_probabilities(counts, mode, progress)``, then one of its samples.

    ``mode``: ``balanced`` (uniform over classes, Kang et al. 2020), ``sqrt`` (p_c ~ sqrt(n_c)),
    ``progressive`` (instance -> balanced, progress = epoch / (epochs - 1)), or ``instance``.
    ``num_samples`` (default: the data set's size) is the epoch length over all ranks.
    """

    def __init__(
        self,
        data: Dataset | Sequence[int],
        mode: str = "balanced",
        epochs: int | None = None,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(data, num_samples, num_replicas, rank, seed)
        if mode == "progressive" and (epochs is None or epochs < 1):
            raise ValueError("the progressive sampler needs epochs= the number of training epochs (>= 1)")
        class_probabilities(self.class_counts, mode)  # rejects an unknown mode now rather than at iteration
        self.mode = mode
        self.epochs = epochs

    @property
    def progress(self) -> float:
        return min(1.0, self.epoch / (self.epochs - 1)) if self.epochs and self.epochs > 1 else 0.0

    def class_probs(self) -> np.ndarray:
        """This epoch's probability of drawing each class."""
        return class_probabilities(self.class_counts, self.mode, self.progress)

    def _stream(self, rng: np.random.Generator, length: int) -> np.ndarray:
        classes = rng.choice(len(self.class_counts), size=length, p=self.class_probs())
        return self._draw_in_classes(classes, rng)


class RepeatFactorSampler(_EpochStreamSampler):
    """Repeat-factor sampling (LVIS): each image of class c appears floor(r_c) + Bernoulli(frac r_c) times.

    ``r_c = max(1, sqrt(threshold / f_c))`` (:func:`ltsam.data.balance.repeat_factors`). The epoch length is
    fixed at the expected size ``round(sum_i r_i)`` so ``len`` is stable and equal on every rank: the
    shuffled stochastic repeat list is cut or wrapped around to it.
    """

    def __init__(
        self,
        data: Dataset | Sequence[int],
        threshold: float = 0.001,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        labels = _labels(data)
        self.factors = repeat_factors(np.bincount(labels), threshold)[labels]
        super().__init__(labels, round(float(self.factors.sum())), num_replicas, rank, seed)

    def _stream(self, rng: np.random.Generator, length: int) -> np.ndarray:
        whole = np.floor(self.factors)
        repeats = whole + (rng.random(len(whole)) < self.factors - whole)
        stream = rng.permutation(np.repeat(np.arange(len(self.labels)), repeats.astype(np.int64)))
        return np.resize(stream, length)


def create_sampler(
    name: str, data: Dataset | Sequence[int], epochs: int | None = None, seed: int = 0, **kwargs
) -> Sampler[int]:
    """``balanced`` / ``sqrt`` / ``progressive`` (needs ``epochs``) / ``repeat`` (``threshold=``)."""
    if name == "repeat":
        return RepeatFactorSampler(data, seed=seed, **kwargs)
    if name in SAMPLERS:
        return ClassAwareSampler(data, name, epochs=epochs, seed=seed, **kwargs)
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")


def create_lt_loader(dataset: Dataset, *args, sampler: Sampler[int] | None = None, **kwargs):
    """``timm.data.create_loader`` with ``sampler`` in place of timm's own shuffling.

    timm builds the transforms (and the ``PrefetchLoader`` when ``use_prefetcher``), then the inner
    DataLoader is rebuilt with the same settings and ``sampler``. Pass ``distributed=False`` semantics: the
    sampler already splits the data among ranks. Call ``sampler.set_epoch(epoch)`` every epoch.
    """
    from timm.data import create_loader

    kwargs["distributed"] = False
    loader = create_loader(dataset, *args, **kwargs)
    if sampler is None:
        return loader
    inner = getattr(loader, "loader", loader)
    rebuilt = type(inner)(
        inner.dataset,
        batch_size=inner.batch_size,
        sampler=sampler,
        num_workers=inner.num_workers,
        collate_fn=inner.collate_fn,
        pin_memory=inner.pin_memory,
        drop_last=inner.drop_last,
        worker_init_fn=inner.worker_init_fn,
        persistent_workers=inner.persistent_workers,
    )
    if inner is loader:
        return rebuilt
    loader.loader = rebuilt
    return loader
