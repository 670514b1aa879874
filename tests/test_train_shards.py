"""``ltsam train`` on shards written by ltsam's own writer: streamed (class-aware in the stream) and indexed."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from test_integrity import flip_byte, rewrite_member
from torch.utils.data import DataLoader

from ltsam.counts import load_class_counts
from ltsam.data.factory import create_lt_dataset
from ltsam.data.shards import records_from_dataset, write_shards
from ltsam.data.stream import StreamingDataset
from ltsam.train import data as train_data
from ltsam.train import main as train_main

# digits-lt at n_max 60, IF 20: 203 training images, 6 batches of 32 an epoch; RGB once decoded from PNG
FLAGS = ["--model", "lt_cnn_small", "--in-chans", "3", "--img-size", "8", "--train-aug", "none", "--workers", "0",
         "--lr", "0.05", "--warmup-epochs", "0", "-b", "32", "--epochs", "3", "--no-progress", "--seed", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> tuple[Path, list[int], int]:
    """Shards of the digits-lt train and test splits, their training counts and the test size."""
    root = tmp_path_factory.mktemp("digits_shards")
    train = create_lt_dataset("digits-lt", split="train", n_max=60)
    test = create_lt_dataset("digits-lt", split="test", n_max=60)
    for split, data in (("train", train), ("test", test)):
        write_shards(records_from_dataset(data), root, split=split, maxcount=16, show_progress=False)
    return root, list(train.class_counts), len(test)


def run(root: Path, out: Path, *flags: str, experiment: str = "run") -> int:
    return train_main([*FLAGS, "--data-dir", str(root), "--output", str(out), "--experiment", experiment, *flags])


@pytest.mark.parametrize("dataset, sampler", [("shards", "balanced"), ("shards-wids", "repeat")])
def test_trains_from_shards_with_their_counts(digits_shards, tmp_path, dataset, sampler):
    root, counts, test_size = digits_shards
    assert run(root, tmp_path, "--dataset", dataset, "--sampler", sampler, "--opt", "ssesam", "--eta", "20") == 0
    folder = tmp_path / "run"
    assert load_class_counts(folder / "class_counts.json") == counts
    results = json.loads((folder / "results.json").read_text())
    # one epoch is len(train) // batch updates whether streamed or sampled; every test image evaluated once
    assert results["updates"] == 3 * (sum(counts) // 32) and results["num_samples"] == test_size
    assert results["class_counts"] == counts and results["top1"] > 0.2


def test_stream_resumes_bit_identical(digits_shards, tmp_path):
    root, _, _ = digits_shards
    flags = ["--dataset", "shards", "--sampler", "sqrt", "--opt", "sam"]
    assert run(root, tmp_path, *flags, experiment="straight") == 0
    assert run(root, tmp_path, *flags, "--stop-epoch", "1", experiment="stopped") == 0
    assert run(root, tmp_path, *flags, "--resume", "auto", experiment="stopped") == 0
    straight, resumed = (torch.load(tmp_path / e / "last.pth.tar", weights_only=True)["state_dict"]
                         for e in ("straight", "stopped"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_stream_stopped_by_a_signal_mid_epoch_resumes_bit_identical(digits_shards, tmp_path, monkeypatch):
    """SIGTERM after update 7 (epoch 1, 2 loader workers reading the shards): the resumed run replays the
    epoch's stream up to the stop and ends with the uninterrupted run's weights."""
    root, _, _ = digits_shards
    flags = ["--dataset", "shards", "--sampler", "sqrt", "--opt", "sam", "--workers", "2", "--epochs", "2"]
    assert run(root, tmp_path, *flags, experiment="straight") == 0
    monkeypatch.setenv("LTSAM_SIGNAL_AT_STEP", "7")
    assert run(root, tmp_path, *flags, experiment="stopped") == 75  # preempt.REQUEUE_EXIT
    assert torch.load(tmp_path / "stopped" / "last.pth.tar", weights_only=True)["position"]["batch"] == 2
    monkeypatch.delenv("LTSAM_SIGNAL_AT_STEP")
    assert run(root, tmp_path, *flags, "--resume", "auto", experiment="stopped") == 0
    straight, resumed = (torch.load(tmp_path / e / "last.pth.tar", weights_only=True)
                         for e in ("straight", "stopped"))
    assert straight["num_updates"] == resumed["num_updates"] == 12
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in straight["state_dict"].items())


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "shards", "--sampler", "repeat"], "use --dataset shards-wids"),
    (["--dataset", "shards", "--n-max", "10"], "long-tailed as written"),
    (["--dataset", "shards", "--train-split", "nosuch"], "split 'nosuch' not in"),
    (["--dataset", "shards-wids", "--val-split", "val"], "val_wids.json not found"),
])
def test_bad_shard_flags_name_the_problem(digits_shards, tmp_path, flags, message):
    root, _, _ = digits_shards
    with pytest.raises(SystemExit, match=message):
        run(root, tmp_path, *flags)


def test_each_epoch_reseeds_the_stream(digits_shards):
    """The trainer's set_epoch reaches the stream itself (no sampler): epoch e's batches depend on e."""
    root, _, _ = digits_shards
    stream = StreamingDataset(root, mode="sqrt", batch_size=32, transform=lambda img: torch.zeros(1))
    loader = DataLoader(stream, batch_size=32)
    labels = []
    for epoch in (0, 1, 0):
        train_data.set_epoch(loader, epoch)
        labels.append(torch.cat([y for _, y in loader]))
    assert loader.dataset.epoch.value == 0
    assert torch.equal(labels[0], labels[2]) and not torch.equal(labels[0], labels[1])


@pytest.mark.parametrize("dataset", ["shards", "shards-wids"])
def test_trainer_reports_skips_in_results_and_stops_on_a_truncated_shard(digits_shards, tmp_path, dataset):
    root = tmp_path / "digits"
    shutil.copytree(digits_shards[0], root)
    shardlist = json.loads((root / "train_wids.json").read_text())["shardlist"]
    name = max(shardlist, key=lambda s: s["nsamples"])["url"]  # of the head bucket: its classes live on
    with tarfile.open(root / name) as tar:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    for key in keys[::2]:  # half a shard: some are read whatever the epoch's order
        rewrite_member(root / name, key, "png", flip_byte)
    assert run(root, tmp_path, "--dataset", dataset, "--epochs", "1", "--opt", "sgd") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    bad = len(keys[::2])
    assert 0 < results["skipped_samples"] <= bad and results["skipped_by_shard"] == {name: results["skipped_samples"]}
    assert results["skip_events"] >= results["skipped_samples"]
    (root / name).write_bytes((root / name).read_bytes()[:3000])
    with pytest.raises(SystemExit, match=rf"{name}: 3000 bytes, written as \d+"):  # before the first batch
        run(root, tmp_path, "--dataset", dataset, "--epochs", "1", "--opt", "sgd", experiment="truncated")


def test_skip_counts_in_results_count_each_bad_sample_once_over_ranks():
    """results.json unites every rank's bad samples (not only rank 0's): a sample two ranks skipped counts once,
    every rank reports the same totals, and the skip events add up."""

    class Reader:
        def __init__(self, bad: dict[str, list[int]], events: int) -> None:
            self.bad, self.skip_events = bad, events

        def bad_samples(self) -> dict[str, list[int]]:
            return self.bad

    train, val = Reader({"a.tar": [0, 3]}, 5), Reader({"b.tar": [1]}, 1)
    other_rank = {"bad": {"a.tar": {3, 7}, "c.tar": {0, 1, 2, 4}}, "events": 9}
    gathered = train_data.skipped_samples(train, val, gather=lambda local: [local, other_rank])
    assert gathered == {"skipped_samples": 8, "skipped_by_shard": {"a.tar": 3, "b.tar": 1, "c.tar": 4},
                        "skip_events": 15}
    assert train_data.skipped_samples(train, val) == {"skipped_samples": 3,
                                                      "skipped_by_shard": {"a.tar": 2, "b.tar": 1}, "skip_events": 6}
    assert train_data.skipped_samples(object(), object(), gather=lambda local: [local, other_rank]) == {}
