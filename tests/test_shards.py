"""Writing shards: formats timm and wids read, bucket grouping, resume after an interruption, verify."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from timm.data import create_dataset

from ltsam.counts import load_class_counts
from ltsam.data import shards
from ltsam.data.files import read_image_folder
from ltsam.data.integrity import sample_digest
from ltsam.data.lt import LTArrayDataset, lt_profile
from ltsam.data.shards import class_bucket, records_from_arrays, records_from_samples, verify, write_shards
from ltsam.data.stream import ShardLayout

# a long tail over 10 classes (imbalance 50): 556 samples
LT_COUNTS = [int(200 * 0.02 ** (i / 9)) for i in range(10)]


def lt_arrays(counts=LT_COUNTS) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images whose pixels encode (index, label): R + 256 G = sample index, B = 20 * label."""
    labels = np.repeat(np.arange(len(counts)), counts)
    idx = np.arange(len(labels))
    images = np.zeros((len(labels), 8, 8, 3), dtype=np.uint8)
    images[..., 0] = (idx % 256)[:, None, None]
    images[..., 1] = (idx // 256)[:, None, None]
    images[..., 2] = (20 * labels)[:, None, None]
    return images, labels


def write_lt(out: Path, **kwargs) -> dict:
    images, labels = lt_arrays()
    kwargs = {"maxcount": 40, "min_shards_per_group": 4, "show_progress": False, **kwargs}
    return write_shards(records_from_arrays(images, labels), out, **kwargs)


def shard_samples(path: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))


def make_folder(root: Path, counts=(6, 3, 1)) -> None:
    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            Image.new("RGB", (6, 5), (40 * c, i, 0)).save(root / f"class{c}" / f"img.{i}.{ext}", format=fmt)


def test_class_bucket_is_log2_bins():
    assert [class_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 1280)] == [0, 1, 2, 2, 3, 3, 4, 11]


def test_folder_keeps_bytes_and_timm_reads_it(tmp_path):
    make_folder(tmp_path / "src")
    samples, names = read_image_folder(tmp_path / "src")
    records = records_from_samples(samples)
    entry = write_shards(records, tmp_path / "out", maxcount=4, class_names=names, show_progress=False)
    assert entry["num_samples"] == 10 and entry["class_counts"] == [6, 3, 1]
    assert load_class_counts(tmp_path / "out" / "train_class_counts.json") == [6, 3, 1]
    originals = {r[0].replace(".", "_"): Path(r[1]).read_bytes() for r in records}
    seen = {}
    for fname in entry["filenames"]:
        for sample in shard_samples(tmp_path / "out" / fname):
            ext = "jpg" if "jpg" in sample else "png"
            seen[sample["__key__"]] = sample[ext]
    assert seen == originals  # no re-encoding
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["class_names"] == ["class0", "class1", "class2"]
    ds = create_dataset("wds/toy", root=str(tmp_path / "out"), split="train", is_training=True, batch_size=1)
    labels = sorted(int(y) for _, y in ds)
    assert labels == [0] * 6 + [1] * 3 + [2]
    assert verify(tmp_path / "out") == []
    # the same folder named as a data set: file-based sets are written from their samples, bytes kept
    argv = ["write", "--dataset", "folder", "--data-dir", str(tmp_path / "src"), "--maxcount", "4"]
    assert shards.main([*argv, "--out", str(tmp_path / "named"), "--workers", "1"]) == 0
    assert sorted(p.read_bytes() for p in (tmp_path / "named").glob("*.tar")) == sorted(
        p.read_bytes() for p in (tmp_path / "out").glob("*.tar")
    )


def test_list_file_groups_shards_by_frequency_bucket(tmp_path):
    # ImageNet-LT style: `train/<synset>/<file>.JPEG label`, Pareto-like counts from 64 down to 2
    counts = [max(2, int(64 / (c + 1) ** 1.2)) for c in range(24)]
    lines = []
    for c, n in enumerate(counts):
        (tmp_path / "img" / "train" / f"n{c:08d}").mkdir(parents=True)
        for i in range(n):
            rel = f"train/n{c:08d}/n{c:08d}_{i}.JPEG"
            Image.new("RGB", (4, 4), (c, i, 0)).save(tmp_path / "img" / rel, format="JPEG")
            lines.append(f"{rel} {c}")
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert (
        shards.main(
            [
                "write",
                "--list",
                str(tmp_path / "ImageNet_LT_train.txt"),
                "--root",
                str(tmp_path / "img"),
                "--out",
                str(out),
                "--maxcount",
                "16",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    entry = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert entry["class_counts"] == counts and entry["num_samples"] == sum(counts)
    for fname, bucket, hist in zip(entry["filenames"], entry["shard_buckets"], entry["shard_class_hist"]):
        assert {class_bucket(counts[int(c)]) for c in hist} == {bucket}
        assert sorted(int(s["cls"]) for s in shard_samples(out / fname)) == sorted(
            int(c) for c, n in hist.items() for _ in range(n)
        )
    assert len(set(entry["shard_buckets"])) == len({class_bucket(n) for n in counts})
    assert shards.main(["verify", str(out), "--workers", "1"]) == 0


def test_named_dataset_is_written_with_its_lt_profile(tmp_path, monkeypatch):
    # in-memory sets (cifar10-lt, cifar100-lt, mnist-lt) are written from their uint8 arrays as PNG
    calls = []

    def fake_lt_dataset(name, root, split, imb_factor, n_max):
        calls.append((name, root, split, imb_factor, n_max))
        counts = lt_profile(10, n_max, imb_factor)
        images, labels = lt_arrays(counts)
        return LTArrayDataset(images, labels, counts, keys=[f"train_{i:05d}" for i in range(len(labels))])

    monkeypatch.setattr(shards, "create_lt_dataset", fake_lt_dataset)
    argv = ["write", "--dataset", "cifar10-lt", "--data-dir", "/data", "--imb-factor", "10", "--n-max", "50"]
    assert shards.main([*argv, "--out", str(tmp_path), "--workers", "1"]) == 0
    assert calls == [("cifar10-lt", "/data", "train", 10.0, 50)]
    entry = json.loads((tmp_path / "_info.json").read_text())["splits"]["train"]
    assert entry["class_counts"] == lt_profile(10, 50, 10)
    sample = shard_samples(tmp_path / entry["filenames"][0])[0]
    assert sample["__key__"].startswith("train_") and "png" in sample
    assert verify(tmp_path) == []


def test_inat_json_keeps_category_names(tmp_path):
    make_folder(tmp_path / "img", counts=(2, 1))
    files = sorted((tmp_path / "img").rglob("img.*"))
    data = {
        "images": [{"id": i, "file_name": str(f.relative_to(tmp_path / "img"))} for i, f in enumerate(files)],
        "annotations": [{"id": i, "image_id": i, "category_id": int(f.parent.name[-1])} for i, f in enumerate(files)],
        "categories": [{"id": 1, "name": "Bufo"}, {"id": 0, "name": "Abies"}],
    }
    (tmp_path / "train2018.json").write_text(json.dumps(data))
    argv = ["write", "--inat", str(tmp_path / "train2018.json"), "--root", str(tmp_path / "img")]
    assert shards.main([*argv, "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    entry = json.loads((tmp_path / "out" / "_info.json").read_text())["splits"]["train"]
    assert entry["class_counts"] == [2, 1] and entry["class_names"] == ["Abies", "Bufo"]
    with pytest.raises(SystemExit):
        shards.main([*argv, "--imb-factor", "10", "--out", str(tmp_path / "out")])


def test_list_file_errors_name_file_and_line(tmp_path):
    (tmp_path / "train.txt").write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(ValueError, match=r"train.txt, line 2"):
        shards.main(["write", "--list", str(tmp_path / "train.txt"), "--out", str(tmp_path / "out")])


def test_arrays_become_png_and_wids_index_matches(tmp_path):
    entry = write_lt(tmp_path)
    index = json.loads((tmp_path / "train_wids.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == entry["shard_lengths"]
    first = shard_samples(tmp_path / entry["filenames"][0])
    assert "png" in first[0] and [int(s["cls"]) for s in first] == index["shardlist"][0]["labels"]
    # every label without reading an image, in the order of the shards' samples
    in_tars = [int(s["cls"]) for f in entry["filenames"] for s in shard_samples(tmp_path / f)]
    assert shards.read_labels(tmp_path).tolist() == in_tars
    # digests: of each sample's key and members, as read back
    assert index["shardlist"][0]["digests"] == [
        sample_digest(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in first
    ]


def test_interrupted_write_resumes_without_rewriting(tmp_path, monkeypatch):
    real = shards._write_shard
    calls = []

    def failing(task):
        if len(calls) == 3:
            Path(task.path + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        calls.append(task.path)
        return real(task)

    monkeypatch.setattr(shards, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        write_lt(tmp_path)
    assert not (tmp_path / "_info.json").exists()
    finished = {p: os.stat(p).st_mtime_ns for p in calls}

    rewritten = []
    monkeypatch.setattr(shards, "_write_shard", lambda task: rewritten.append(task.path) or real(task))
    entry = write_lt(tmp_path)
    assert set(rewritten).isdisjoint(finished) and len(rewritten) == len(entry["filenames"]) - 3
    assert all(os.stat(p).st_mtime_ns == t for p, t in finished.items())
    assert verify(tmp_path) == [] and not list(tmp_path.glob("*.tmp"))
    rewritten.clear()
    write_lt(tmp_path)  # a complete split is not rewritten either
    assert rewritten == []


def test_verify_reports_tampered_and_missing_shards(tmp_path):
    entry = write_lt(tmp_path)
    victim = tmp_path / entry["filenames"][-1]
    members = []
    with tarfile.open(victim) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(victim, "w") as tar:  # drop one sample, relabel another
        for m, data in members[2:]:
            if m.name.endswith(".cls") and data == b"0":
                data = b"1"
                m.size = 1
            tar.addfile(m, io.BytesIO(data))
    problems = verify(tmp_path)
    assert any(str(victim) in p and "samples" in p for p in problems)
    assert any("label counts differ" in p for p in problems)
    (tmp_path / entry["filenames"][0]).unlink()
    assert any("missing" in p for p in verify(tmp_path, "train"))


def test_rerunning_write_rewrites_only_a_damaged_shard(tmp_path, monkeypatch):
    entry = write_lt(tmp_path)
    victim = tmp_path / entry["filenames"][2]
    victim.write_bytes(victim.read_bytes()[:-2000])
    with pytest.raises(ValueError, match=rf"1 of {len(entry['filenames'])} shards .* damaged .*: {victim.name}: "):
        ShardLayout.load(tmp_path)
    real, rewritten = shards._write_shard, []
    monkeypatch.setattr(shards, "_write_shard", lambda task: rewritten.append(task.path) or real(task))
    assert write_lt(tmp_path) == entry
    assert rewritten == [str(victim)] and verify(tmp_path) == []
    ShardLayout.load(tmp_path)
