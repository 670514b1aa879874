"""Class-aware samplers: realised class frequencies, rank shares, determinism, and timm's loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLASS_COUNTS

from ltsam.data.factory import create_lt_dataset
from ltsam.data.samplers import ClassAwareSampler, RepeatFactorSampler, create_lt_loader, create_sampler
from ltsam_common.names import SAMPLERS

LABELS = np.repeat(np.arange(len(CLASS_COUNTS)), CLASS_COUNTS)
N = np.asarray(CLASS_COUNTS, dtype=float)
DRAWS = 40_000
# a class frequency over 40,000 draws has standard deviation <= 0.0025; 0.012 is > 4.5 sigma
TOL = 0.012


def _freq(sampler) -> np.ndarray:
    return np.bincount(LABELS[list(sampler)], minlength=len(N)) / len(sampler)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("balanced", np.full(len(N), 0.1)), ("sqrt", np.sqrt(N) / np.sqrt(N).sum()), ("instance", N / N.sum())],
)
def test_class_frequencies(mode, expected):
    freq = _freq(ClassAwareSampler(LABELS, mode, num_samples=DRAWS, seed=3))
    np.testing.assert_allclose(freq, expected, atol=TOL)


def test_within_class_draws_are_uniform():
    sampler = ClassAwareSampler(LABELS, "balanced", num_samples=DRAWS)
    draws = np.array(list(sampler))
    tail = draws[LABELS[draws] == 9]  # class 9 has 4 samples: each about a quarter of its draws
    np.testing.assert_allclose(np.bincount(tail - tail.min(), minlength=4) / len(tail), 0.25, atol=0.03)


def test_progressive_moves_from_instance_to_balanced():
    sampler = ClassAwareSampler(LABELS, "progressive", epochs=5, num_samples=DRAWS)
    np.testing.assert_allclose(_freq(sampler), N / N.sum(), atol=TOL)  # epoch 0
    sampler.set_epoch(2)
    np.testing.assert_allclose(_freq(sampler), 0.5 * N / N.sum() + 0.05, atol=TOL)
    sampler.set_epoch(4)
    np.testing.assert_allclose(_freq(sampler), 0.1, atol=TOL)
    with pytest.raises(ValueError, match="needs epochs="):
        ClassAwareSampler(LABELS, "progressive")


def test_repeat_factor_sampling():
    threshold = 0.05
    f = N / N.sum()
    r = np.maximum(1, np.sqrt(threshold / f))
    sampler = RepeatFactorSampler(LABELS, threshold=threshold)
    assert len(sampler) == round(float((N * r).sum()))
    hits = np.zeros(len(N))
    for epoch in range(20):
        sampler.set_epoch(epoch)
        assert len(list(sampler)) == len(sampler)
        hits += np.bincount(LABELS[list(sampler)], minlength=len(N))
    np.testing.assert_allclose(hits / hits.sum(), N * r / (N * r).sum(), atol=TOL)


@pytest.mark.parametrize("name", SAMPLERS)
def test_ranks_share_one_stream(name):
    kw = {"threshold": 0.05} if name == "repeat" else {"num_samples": 1200}
    single = create_sampler(name, LABELS, epochs=3, seed=7, num_replicas=1, rank=0, **kw)
    ranks = [create_sampler(name, LABELS, epochs=3, seed=7, num_replicas=3, rank=r, **kw) for r in range(3)]
    for s in [single, *ranks]:
        s.set_epoch(1)
    shares = [list(s) for s in ranks]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(ranks[0])
    # rank r holds stream positions r, r + 3, ...: disjoint positions that interleave back into one stream
    interleaved = np.stack(shares, axis=1).reshape(-1)
    whole = list(single)
    assert interleaved[: len(whole)].tolist() == whole[: len(interleaved)]


def test_determinism_and_reshuffle():
    a, b = ClassAwareSampler(LABELS, seed=1), ClassAwareSampler(LABELS, seed=1)
    assert list(a) == list(b) and list(a) == list(a)
    b.set_epoch(1)
    assert list(a) != list(b) and len(a) == len(b) == len(LABELS)
    assert list(ClassAwareSampler(LABELS, seed=2)) != list(a)
    with pytest.raises(ValueError, match="unknown sampling mode 'uniform'"):
        ClassAwareSampler(LABELS, "uniform")
    with pytest.raises(ValueError, match="unknown sampler 'cb'; valid names: balanced, sqrt"):
        create_sampler("cb", LABELS)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        ClassAwareSampler(LABELS, num_replicas=2, rank=2)


@pytest.mark.parametrize("prefetch", [False, True])
def test_timm_loader_uses_the_sampler(prefetch):
    ds = create_lt_dataset("digits-lt")
    sampler = ClassAwareSampler(ds, "balanced", seed=5)
    loader = create_lt_loader(
        ds,
        (1, 8, 8),
        32,
        is_training=True,
        no_aug=True,
        mean=(0.5,),
        std=(0.5,),
        use_prefetcher=prefetch,
        device=torch.device("cpu"),
        sampler=sampler,
    )
    inner = loader.loader if prefetch else loader
    assert inner.sampler is sampler and len(loader) == len(ds) // 32  # timm drops the last partial batch
    seen = torch.cat([y for _, y in loader]).tolist()
    expected = [ds.targets[i] for i in sampler][: len(seen)]
    assert seen == expected
    x, _ = next(iter(loader))
    assert x.shape == (32, 1, 8, 8)
