"""Damaged shards, end to end: verify, the stream and the wids reader each skip-count-report or fail by name.

Five kinds of damage, made by rewriting a written shard: one flipped byte in an image, a label out of range,
an image replaced by bytes that are no image, a shard truncated, a shard deleted.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_shards import lt_arrays, write_lt
from test_stream import identify
from torch.utils.data import DataLoader

from ltsam.data import shards
from ltsam.data.shards import read_labels, records_from_arrays, verify, write_shards
from ltsam.data.stream import StreamingDataset
from ltsam.data.wids_access import ShardIndexDataset

POSITION = 3  # the damaged sample's position in the first shard holding more than 8 samples


def rewrite_member(shard: Path, key: str, ext: str, change) -> None:
    """Rewrite one member of a tar with ``change(bytes) -> bytes``, everything else kept."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == f"{key}.{ext}":
                data = change(data)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def flip_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


SAMPLE_DAMAGE = {
    "flipped byte": ("png", flip_byte, "content differs from its digest"),
    "label out of range": ("cls", lambda _: b"99", "label 99 is out of range for 10 classes"),
    "non-image payload": ("png", lambda _: b"<html>not an image</html>", "content differs from its digest"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_lt(root)
    return root


def damaged_copy(clean: Path, tmp_path: Path, damage: str) -> tuple[Path, str, str, int]:
    """A copy of the clean set with one kind of damage: (root, shard name, key and index of the damaged
    sample)."""
    root = tmp_path / "shards"
    shutil.copytree(clean, root)
    shardlist = json.loads((root / "train_wids.json").read_text())["shardlist"]
    shard = next(i for i, s in enumerate(shardlist) if s["nsamples"] > 8)
    name = shardlist[shard]["url"]
    with tarfile.open(root / name) as tar:
        key = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))[POSITION]
    index = sum(s["nsamples"] for s in shardlist[:shard]) + POSITION
    if damage in SAMPLE_DAMAGE:
        ext, change, _ = SAMPLE_DAMAGE[damage]
        rewrite_member(root / name, key, ext, change)
    elif damage in CUTS:
        cut_shard(root / name, damage)
    return root, name, key, index


def cut_shard(path: Path, cut: str) -> None:
    """Truncate a shard: at half its size, or inside its last sample's image (the tar then ends 1 KiB early
    and lists every sample but the last)."""
    data = path.read_bytes()
    if cut == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return
    with tarfile.open(path) as tar:
        last_image = [m for m in tar.getmembers() if not m.name.endswith(".cls")][-1]
    path.write_bytes(data[: last_image.offset_data + last_image.size - 1])


CUTS = ("truncated", "cut inside the last sample")


def strip_sizes(root: Path) -> None:
    """The wids index as an older writer left it: no file sizes, so the build-time check lists the headers."""
    index = root / "train_wids.json"
    data = json.loads(index.read_text())
    for shard in data["shardlist"]:
        del shard["filesize"]
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", list(SAMPLE_DAMAGE))
def test_verify_names_shard_key_and_what(clean, tmp_path, damage):
    root, name, key, index = damaged_copy(clean, tmp_path, damage)
    problems = verify(root)
    assert any(name in p and f"sample {key}: {SAMPLE_DAMAGE[damage][2]}" in p for p in problems), problems
    assert any(name in p and "SHA-256" in p for p in problems)


def test_verify_names_truncated_and_deleted_shards(clean, tmp_path):
    root, name, _, index = damaged_copy(clean, tmp_path, "truncated")
    assert any(name in p and "metadata says" in p for p in verify(root))
    (root / name).unlink()
    assert any(name in p and "missing" in p for p in verify(root))


@pytest.mark.parametrize("damage", list(SAMPLE_DAMAGE))
def test_stream_skips_counts_and_names_a_damaged_sample(clean, tmp_path, caplog, damage):
    root, name, key, index = damaged_copy(clean, tmp_path, damage)
    ds = StreamingDataset(root, batch_size=1, transform=identify)  # one reader, batch 1: every sample read
    with caplog.at_level(logging.WARNING, logger="ltsam.data"):
        ids = torch.stack([x for x, _ in ds])
    assert len(ids) == len(ds) == len(read_labels(root))  # the quota is still filled
    assert ds.num_skipped == 1 and ds.skipped_by_shard() == {name: 1}
    assert f"{name}: skipping sample {key}" in caplog.text
    # what was trained on is the written data: every image's pixels match its label
    assert len(set(ids[:, 0].tolist())) == len(ids) - 1
    ds.set_epoch(1)
    for _ in ds:  # met again in the next epoch: still one bad sample, two skips
        pass
    assert ds.num_skipped == 1 and ds.skip_events == 2 and ds.bad_samples() == {name: [POSITION]}


@pytest.mark.parametrize("sizes", ["recorded", "older writer"])
@pytest.mark.parametrize("cut", CUTS)
def test_a_cut_shard_stops_every_reader_when_built(clean, tmp_path, cut, sizes):
    """Found before the first batch, wherever the cut: by the size written, or for sets without sizes by the
    samples the headers list."""
    root, name, _, _ = damaged_copy(clean, tmp_path, cut)
    if sizes == "older writer":
        strip_sizes(root)
    what = r"\d+ bytes, written as \d+" if sizes == "recorded" else r"\d+ whole samples, the index says \d+"
    message = rf"1 of \d+ shards of split 'train' in .* are damaged .*: {name}: {what}\. Run `python -m ltsam"
    for build in (partial(StreamingDataset, mode="instance"), partial(StreamingDataset, mode="balanced"),
                  ShardIndexDataset):
        with pytest.raises(ValueError, match=message):
            build(root)


@pytest.mark.parametrize("mode", ["instance", "balanced"])
def test_stream_fails_at_epoch_end_on_a_shard_cut_while_training(clean, tmp_path, mode):
    root, name, _, index = damaged_copy(clean, tmp_path, "none")
    ds = StreamingDataset(root, mode=mode, batch_size=4, samples_per_epoch=2000, transform=identify)
    cut_shard(root / name, "truncated")
    with pytest.raises(RuntimeError, match=rf"{name} holds \d+ of \d+ samples"):
        for _ in DataLoader(ds, batch_size=4):
            pass


def test_stream_deleted_shard_fails_at_build_or_epoch_end(clean, tmp_path):
    root, name, _, index = damaged_copy(clean, tmp_path, "none")
    ds = StreamingDataset(root, batch_size=4, transform=identify)
    (root / name).unlink()  # deleted while training
    with pytest.raises(RuntimeError, match=rf"{name} holds 0 of \d+ samples"):
        list(ds)
    with pytest.raises(FileNotFoundError, match=name):
        StreamingDataset(root)


@pytest.mark.parametrize("damage", list(SAMPLE_DAMAGE))
def test_wids_skips_counts_and_names_a_damaged_sample(clean, tmp_path, caplog, damage):
    root, name, key, index = damaged_copy(clean, tmp_path, damage)
    ds = ShardIndexDataset(root, transform=identify)
    with caplog.at_level(logging.WARNING, logger="ltsam.data"):
        ident, label = ds[index]
    _, labels = lt_arrays()
    # the class's next sample stands in: same label, another image
    written = ShardIndexDataset(clean, transform=identify)[index][0]
    assert label == ds.targets[index] == ident[1] == written[1] and ident[0] != written[0]
    assert labels[int(ident[0])] == label and ds.num_skipped == 1
    assert ds.skipped_by_shard() == {name: 1} and f"{name}: skipping sample {key}" in caplog.text
    ds[index]  # the same bad sample again: one bad sample, two skips, logged once per shard
    assert ds.num_skipped == 1 and ds.skip_events == 2 and caplog.text.count("skipping sample") == 1
    assert ds.bad_samples() == {name: [POSITION]}


def test_wids_counts_each_bad_sample_once_however_often_the_class_falls_through(clean, tmp_path):
    """Every sample of one class's run in a shard damaged, every index read: the fall-through meets each bad
    sample many times, the count is of bad samples."""
    root, name, _, _ = damaged_copy(clean, tmp_path, "none")
    ds = ShardIndexDataset(root, transform=identify)
    shard = ds.ledger.names.index(name)
    start, stop = ds.ledger.starts[shard], ds.ledger.starts[shard + 1]
    label = int(ds.targets[start])
    positions = [i - start for i in range(start, stop) if ds.targets[i] == label][:6]
    with tarfile.open(root / name) as tar:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    for position in positions:
        rewrite_member(root / name, keys[position], "png", flip_byte)
    ds = ShardIndexDataset(root, transform=identify)
    for index in ds.same_class(label):
        assert ds[int(index)][1] == label
    assert ds.num_skipped == len(positions) and ds.bad_samples() == {name: positions}
    assert ds.skip_events > len(positions)  # samples after a bad one fall through it again


def test_wids_fails_on_a_truncated_shard_and_a_deleted_one(clean, tmp_path):
    root, name, _, index = damaged_copy(clean, tmp_path, "none")
    ds = ShardIndexDataset(root)
    cut_shard(root / name, "truncated")  # cut after the set was built: found at the first access
    with pytest.raises(RuntimeError, match=name):
        ds[index]
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        ShardIndexDataset(root)


def without_digests(clean: Path, tmp_path: Path) -> Path:
    """A copy of the clean set as a writer without digests left it: no per-sample digests, file sizes or
    SHA-256s."""
    root = tmp_path / "older"
    shutil.copytree(clean, root)
    index = json.loads((root / "train_wids.json").read_text())
    for shard in index["shardlist"]:
        del shard["digests"], shard["filesize"]
    (root / "train_wids.json").write_text(json.dumps(index))
    info = json.loads((root / "_info.json").read_text())
    del info["splits"]["train"]["shard_sha256"]
    (root / "_info.json").write_text(json.dumps(info))
    return root


def test_a_set_without_digests_is_named_and_the_digest_command_adds_them(clean, tmp_path, caplog, capsys):
    root = without_digests(clean, tmp_path)
    command = f"`python -m ltsam.data.shards digest {root} --split train`"
    assert verify(root) == [] and shards.main(["verify", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"of split 'train' in {root} were written without per-sample digests" in out and command in out
    with caplog.at_level(logging.WARNING, logger="ltsam.data"):
        StreamingDataset(root)
        ShardIndexDataset(root)
    assert caplog.text.count("without per-sample digests") == 1 and command in caplog.text  # once per set

    assert shards.main(["digest", str(root), "--workers", "1"]) == 0
    # what the writer recorded, recovered from the shards: digests, sizes, SHA-256s
    for name in ("train_wids.json", "_info.json"):
        assert json.loads((root / name).read_text()) == json.loads((clean / name).read_text())
    shards.main(["verify", str(root), "--workers", "1"])
    assert "without per-sample digests" not in capsys.readouterr().out


def test_the_digest_command_writes_a_missing_index(clean, tmp_path):
    root = without_digests(clean, tmp_path)
    (root / "train_wids.json").unlink()
    (root / "train_by_class.npz").unlink()
    assert shards.add_digests(root) == []
    for name in ("train_wids.json", "_info.json"):
        assert json.loads((root / name).read_text()) == json.loads((clean / name).read_text())
    assert (root / "train_by_class.npz").read_bytes() == (clean / "train_by_class.npz").read_bytes()


def test_the_digest_command_refuses_a_damaged_set(clean, tmp_path, capsys):
    root, name, key, _ = damaged_copy(clean, tmp_path, "label out of range")
    root = without_digests(root, tmp_path)
    before = (root / "train_wids.json").read_bytes()
    assert shards.main(["digest", str(root), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert f"{name}: sample {key}: label 99 is out of range for 10 classes" in captured.err
    assert "nothing written, fix them first" in captured.out and (root / "train_wids.json").read_bytes() == before


def jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_verify_decode_finds_a_jpeg_cut_after_its_header(tmp_path, monkeypatch, capsys):
    """Bad images that passed an older writer: a JPEG cut to 90 % (header intact) is found by decoding only,
    bytes that are no image by their header; messages name the sample, never a Python object."""
    images, labels = lt_arrays()
    records = records_from_arrays(images, labels)
    data = jpeg_bytes()
    records[5] = (records[5][0], data[: len(data) * 9 // 10], records[5][2])
    records[6] = (records[6][0], b"\xff\xd8\xff not a jpeg", records[6][2])
    with monkeypatch.context() as older_writer:
        older_writer.setattr(shards, "image_problem", lambda data, decode=True: None)
        write_shards(records, tmp_path, maxcount=40, show_progress=False)
    header_only, decoded = verify(tmp_path), verify(tmp_path, decode=True)
    no_image = "sample 0000006: not a readable image (not a recognised image format)"
    assert len(header_only) == 1 and no_image in header_only[0]
    cut = next(p for p in decoded if p != header_only[0])
    assert len(decoded) == 2 and "sample 0000005: not a readable image (OSError: image file is truncated" in cut
    assert not any("<_io" in p for p in decoded)
    assert shards.main(["verify", str(tmp_path), "--workers", "1"]) == 1
    assert "note: images were checked by their headers only: `verify --decode`" in capsys.readouterr().out


def test_writer_refuses_a_cut_jpeg_with_one_sentence(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    data = jpeg_bytes()
    (folder / "cat" / "a.jpg").write_bytes(data)
    (folder / "dog" / "b.jpg").write_bytes(data[: len(data) * 9 // 10])
    out = tmp_path / "out"
    assert shards.main(["write", "--folder", str(folder), "--out", str(out), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(
        re.escape(f"python -m ltsam.data.shards write: record 'dog/b' ({folder / 'dog' / 'b.jpg'}) is not a readable "
                  "image (OSError: image file is truncated (") + r"\d+" + re.escape(
                  " bytes not processed)): replace it or leave it out, then write again (finished shards are kept)"),
        err[0])
