"""Reading shards: rank/worker splitting, equal batches per rank, realised class frequencies, failures."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_shards import LT_COUNTS, lt_arrays, write_lt
from timm.data import IterableImageDataset
from torch.utils.data import DataLoader, get_worker_info

from ltsam.data import stream
from ltsam.data.balance import class_probabilities
from ltsam.data.samplers import ClassAwareSampler
from ltsam.data.shards import records_from_arrays, write_shards
from ltsam.data.stream import ClassAwareReaderWds, ClassAwareSource, ShardLayout, StreamingDataset, mixing_plan
from ltsam.data.wids_access import ShardIndexDataset

TV_TOLERANCE = 0.05  # total variation between realised and target class shares


def identify(img: Image.Image) -> torch.Tensor:
    """(sample index, label, worker id) read back from the pixels written by ``lt_arrays``."""
    r, g, b = img.getpixel((0, 0))
    info = get_worker_info()
    return torch.tensor([r + 256 * g, b // 20, info.id if info else 0])


def total_variation(labels: list[int], target: np.ndarray) -> float:
    realised = np.bincount(labels, minlength=len(target)) / len(labels)
    return 0.5 * float(np.abs(realised - target).sum())


@pytest.fixture(scope="module")
def lt_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lt")
    write_lt(root)
    return root


def run_epoch(root, rank, world, workers, epoch=0, **kwargs) -> tuple[list[torch.Tensor], int]:
    ds = StreamingDataset(
        root, batch_size=8, num_workers=workers, rank=rank, world_size=world, transform=identify, **kwargs
    )
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=8, num_workers=workers)
    return [x for x, _ in loader], len(loader)


def test_single_process_reads_labels_and_a_full_epoch(lt_root):
    batches, expected = run_epoch(lt_root, 0, 1, 0)
    ids = torch.cat(batches)
    _, labels = lt_arrays()
    assert len(batches) == expected and len(ids) == 8 * (sum(LT_COUNTS) // 8)
    assert (torch.as_tensor(labels)[ids[:, 0]] == ids[:, 1]).all()
    assert len(set(ids[:, 0].tolist())) == len(ids)  # one reader, one pass: no repeats


def test_two_ranks_two_workers_disjoint_and_equal_batches(lt_root):
    readers: dict[int, tuple[int, int]] = {}
    nbatches = []
    for rank in (0, 1):
        batches, expected = run_epoch(lt_root, rank, 2, 2, epoch=3)
        assert len(batches) == expected
        nbatches.append(len(batches))
        for x in batches:
            for index, _, worker in x.tolist():
                assert readers.setdefault(index, (rank, worker)) == (rank, worker), (
                    "sample read by two readers"
                )
    assert nbatches[0] == nbatches[1]
    assert len({r for r in readers.values()}) == 4
    # a full pass: each of the 4 readers leaves out less than one batch of its slice
    assert len(readers) > sum(LT_COUNTS) - 4 * 8


def test_instance_epochs_are_full_passes_with_uneven_shards(tmp_path):
    # log2 bucketing gives shards of very different sizes (4 to 37 samples); 4 readers still read equal slices
    write_lt(tmp_path, min_shards_per_group=1)
    lengths = ShardLayout.load(tmp_path).lengths
    assert max(lengths) > 8 * min(lengths)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            batches, _ = run_epoch(tmp_path, rank, 2, 2, epoch=epoch)
            seen += torch.cat(batches)[:, 0].tolist()
        assert len(seen) == len(set(seen)) > sum(LT_COUNTS) - 4 * 8


@pytest.mark.parametrize("mode", ["balanced", "sqrt"])
def test_undersampled_bucket_coverage_matches_independent_draws(lt_root, mode):
    """Over E epochs every bucket has at least the share of its images drawn that independent draws at the
    same class frequencies would give, the head buckets that the mode under-samples included; the class
    frequencies stay on target. 4 readers (4 ranks here, as 2 ranks x 2 workers), one data pass an epoch."""
    layout = ShardLayout.load(lt_root)
    drawn = []
    for rank in range(4):
        ds = StreamingDataset(lt_root, mode=mode, batch_size=1, rank=rank, world_size=4, seed=3)
        for epoch in range(2):
            ds.set_epoch(epoch)
            drawn += list(itertools.islice(iter(ds.source), ds.quota))  # what __iter__ decodes
    coverage = stream.bucket_coverage(layout, stream.DrawCounts.of(layout, drawn))
    for bucket, (share, independent) in coverage.items():
        assert share >= independent - 0.02, (bucket, share, independent)
    assert coverage[max(coverage)][1] < 0.8  # the head really is under-sampled: the check above has teeth
    assert total_variation([int(s["cls"]) for s in drawn], class_probabilities(LT_COUNTS, mode)) < TV_TOLERANCE


def test_persistent_workers_repeat_an_epoch_exactly(lt_root):
    """Workers reseed from (seed, epoch, rank, worker) each epoch: epoch 1 of persistent workers (which ran
    epoch 0 before) equals epoch 1 of fresh ones, random augmentation included, as a resumed run needs."""

    def noisy(img: Image.Image) -> torch.Tensor:
        return torch.cat([identify(img).double(), torch.rand(1, dtype=torch.float64)])

    ds = StreamingDataset(lt_root, mode="sqrt", batch_size=8, num_workers=2, transform=noisy, samples_per_epoch=160)
    persistent = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        epochs.append(torch.cat([x for x, _ in persistent]))
    fresh = torch.cat([x for x, _ in DataLoader(ds, batch_size=8, num_workers=2)])
    assert torch.equal(fresh, epochs[1]) and not torch.equal(epochs[0], epochs[1])


@pytest.mark.parametrize("group_by", ["log2", "none"])
def test_mixing_plan_is_exact(tmp_path, group_by):
    images, labels = lt_arrays()
    write_shards(
        records_from_arrays(images, labels), tmp_path, maxcount=40, group_by=group_by, show_progress=False
    )
    layout = ShardLayout.load(tmp_path)
    nbc = layout.bucket_class_counts()
    for mode, progress in [("instance", 0), ("sqrt", 0), ("balanced", 0), ("progressive", 0.5)]:
        probs, rates = mixing_plan(layout, mode, progress)
        realised = sum(p * nbc[b] * r / (nbc[b] * r).sum() for (b, p), r in zip(probs.items(), rates))
        np.testing.assert_allclose(realised, class_probabilities(LT_COUNTS, mode, progress), atol=1e-12)
        if group_by == "log2":  # within a log2 bucket no class needs more than ~2x duplication
            assert max((r[nbc[b] > 0]).max() for b, r in zip(probs, rates)) < 2.5


@pytest.mark.parametrize("mode,epoch", [("sqrt", 0), ("balanced", 0), ("progressive", 2)])
def test_realised_class_frequencies(lt_root, mode, epoch):
    labels = []
    for rank in (0, 1):
        batches, _ = run_epoch(
            lt_root, rank, 2, 2, epoch=epoch, mode=mode, samples_per_epoch=4000, num_epochs=5
        )
        labels += torch.cat(batches)[:, 1].tolist()
    assert len(labels) == 4000
    target = class_probabilities(LT_COUNTS, mode, progress=epoch / 4)
    assert total_variation(labels, target) < TV_TOLERANCE


def test_unbucketed_layout_rebalances_by_duplication(tmp_path):
    images, labels = lt_arrays()
    write_shards(
        records_from_arrays(images, labels), tmp_path, maxcount=40, group_by="none", show_progress=False
    )
    batches, _ = run_epoch(tmp_path, 0, 1, 0, mode="balanced", samples_per_epoch=3000, shuffle_size=1000)
    realised = torch.cat(batches)[:, 1].tolist()
    assert total_variation(realised, class_probabilities(LT_COUNTS, "balanced")) < TV_TOLERANCE


def test_rejected_samples_are_not_decoded(lt_root, monkeypatch):
    decoded = []
    real = stream.decode_sample
    monkeypatch.setattr(stream, "decode_sample", lambda s: decoded.append(s["__key__"]) or real(s))
    ds = StreamingDataset(lt_root, mode="balanced", batch_size=8, samples_per_epoch=800)
    assert len(list(ds)) == 800 and len(decoded) == 800


def test_writer_refuses_bytes_that_are_no_image(tmp_path):
    images, labels = lt_arrays()
    records = records_from_arrays(images, labels)
    records[5] = (records[5][0], b"\xff\xd8\xff not a jpeg", records[5][2])
    with pytest.raises(ValueError, match=r"record '0000005' is not a readable image \(not a recognised image format\)"):
        write_shards(records, tmp_path, maxcount=40, show_progress=False)


def test_missing_shard_and_too_few_shards_fail_at_build(tmp_path):
    entry = write_lt(tmp_path, min_shards_per_group=1)
    n = len(entry["filenames"])
    with pytest.raises(ValueError, match=rf"{n} shards but {n} ranks x 2 workers = {2 * n} readers"):
        StreamingDataset(tmp_path, num_workers=2, rank=0, world_size=n)
    with pytest.raises(RuntimeError, match="num_workers=2"):
        next(iter(StreamingDataset(tmp_path, num_workers=2)))
    (tmp_path / entry["filenames"][1]).unlink()
    with pytest.raises(FileNotFoundError, match="1 of .* shards .* missing"):
        StreamingDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardIndexDataset(tmp_path)


def test_wids_random_access(lt_root):
    ds = ShardIndexDataset(lt_root, transform=identify)
    _, labels = lt_arrays()
    assert len(ds) == len(labels) and ds.class_counts == LT_COUNTS
    assert sorted(ds.targets) == sorted(labels.tolist())
    for i in np.random.default_rng(0).choice(len(ds), 50):
        ident, label = ds[int(i)]
        assert label == ds.targets[i] == ident[1]


def test_wids_loads_the_class_index_written_with_the_shards(lt_root, monkeypatch, capfd, caplog):
    from ltsam.data import wids_access

    monkeypatch.setattr(wids_access, "class_index", lambda *a: pytest.fail("per-class index rebuilt"))
    with caplog.at_level(logging.DEBUG, logger="ltsam.data"):
        ds = ShardIndexDataset(lt_root)
        for label in range(len(LT_COUNTS)):
            np.testing.assert_array_equal(ds.same_class(label), np.flatnonzero(ds.targets == label))
            ds[int(ds.same_class(label)[0])]
    assert ds.lru_size == len(ShardLayout.load(lt_root).urls)  # every shard stays open
    # wids prints a summary on construction: routed to the logger with the index's name, not printed
    assert capfd.readouterr() == ("", "") and "wids, " in caplog.text and "train_wids.json" in caplog.text


def test_wids_exact_class_aware_sampling_over_two_ranks(lt_root):
    # the map-style sampler runs unchanged over the shards: labels come from the index, images from the tars
    ds = ShardIndexDataset(lt_root, transform=identify)
    labels, indices = [], []
    for rank in (0, 1):
        sampler = ClassAwareSampler(ds, "balanced", num_samples=2000, num_replicas=2, rank=rank, seed=1)
        for x, y in DataLoader(ds, batch_size=50, sampler=sampler):
            assert (x[:, 1] == y).all()
            labels += y.tolist()
            indices += x[:, 0].tolist()
    assert len(labels) == 2000 and len(set(indices)) > 0.5 * sum(LT_COUNTS)
    assert total_variation(labels, class_probabilities(LT_COUNTS, "balanced")) < TV_TOLERANCE


def test_timm_reader_class_aware(lt_root):
    for mode, tolerance in [("instance", None), ("balanced", 0.1)]:
        reader = ClassAwareReaderWds(str(lt_root), "train", mode=mode, batch_size=8, rank=0, world_size=1)
        ds = IterableImageDataset(str(lt_root), reader=reader, transform=identify)
        ds.set_loader_cfg(num_workers=2)
        labels = torch.cat([x[:, 1] for x, _ in DataLoader(ds, batch_size=8, num_workers=2)]).tolist()
        assert len(labels) == len(ds)
        if tolerance:
            assert total_variation(labels, class_probabilities(LT_COUNTS, mode)) < tolerance


def test_progressive_start_offsets_cost_one_plan_per_epoch_and_match_the_full_sum(lt_root, monkeypatch):
    readers, epochs = 4, 30
    source = ClassAwareSource(ShardLayout.load(lt_root), "progressive", num_epochs=epochs)

    def summed_again(epoch: int) -> dict[int, float]:  # the former computation: every earlier epoch's plan
        past = dict.fromkeys(source.layout.bucket_sizes(), 0.0)
        for earlier in range(epoch):
            for b, length in source.bucket_reads(earlier, readers).items():
                past[b] += length
        return past

    expected = {epoch: summed_again(epoch) for epoch in (0, 1, 7, 29, 33)}
    fresh_starts = ClassAwareSource(source.layout, "progressive", num_epochs=epochs).bucket_starts(33, 1, readers)
    real, plans = source.bucket_reads, []
    monkeypatch.setattr(source, "bucket_reads", lambda epoch, n: plans.append(epoch) or real(epoch, n))
    for epoch in range(34):
        before = len(plans)
        starts = source.bucket_starts(epoch, 1, readers)
        assert len(plans) - before <= 2  # this epoch's plan and the one added to the running sum
        if epoch in expected:
            assert source.past_reads(epoch, readers) == expected[epoch]  # bit for bit
    assert starts == fresh_starts
