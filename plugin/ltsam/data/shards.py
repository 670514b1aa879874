"""Write long-tailed image data sets as webdataset tar shards, and verify them.

A split written to ``out_dir`` consists of:

* ``{split}-{i:06d}.tar`` shards: one ``KEY.{jpg,png,webp}`` image (the source bytes, not re-encoded unless
  asked; arrays become PNG) and one ``KEY.cls`` ASCII label per sample;
* ``_info.json``: timm's webdataset split description (``--dataset wds/NAME --data-dir out_dir``), plus per
  shard its frequency bucket, class histogram, the digest of its sources (``shard_digests``, for resuming a
  write) and the SHA-256 of the file (``shard_sha256``), and the split's ``class_counts``;
* ``{split}_class_counts.json``: per-class counts (:func:`ltsam.counts.save_class_counts`);
* ``{split}_wids.json``: a ``wids`` index with each shard's size (``filesize``), labels and per-sample
  content digests (:func:`ltsam.data.integrity.sample_digest`), which every reader checks (``digest`` adds
  them to a set an older writer left without);
* ``{split}_by_class.npz``: per class, the indices of its samples (``order[offsets[c]:offsets[c + 1]]``),
  so random-access readers never rebuild it.

Grouping shards by log2 bucket of the class count lets a stream re-balance by mixing buckets without reading
every class's shard (see :mod:`ltsam.data.stream`). Writing is one shard per process task; each shard goes to
a temporary name first and is renamed when complete, and a journal records finished shards, so an interrupted
write resumes without rewriting them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ltsam.counts import save_class_counts
from ltsam.data.factory import LT_DATASETS, create_lt_dataset
from ltsam.data.files import read_image_folder, read_inat_json, read_list_file
from ltsam.data.integrity import image_problem, read_shard, sample_digest, sample_members, shard_damage

# (key, image, label): image is a file path, encoded bytes, an HxW[xC] uint8 array or a PIL image
Record = tuple[str, "str | os.PathLike | bytes | np.ndarray | Image.Image", int]

_logger = logging.getLogger("ltsam.data")
INFO_NAME = "_info.json"
IMAGE_EXTS = ("jpg", "png", "webp")
_SUFFIX_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_SAVE_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def class_bucket(count: int) -> int:
    """log2 bucket of a class count: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ... (counts within 2x share one)."""
    return max(0, math.ceil(math.log2(count))) if count > 0 else -1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def counts_name(split: str) -> str:
    return f"{split}_class_counts.json"


def wids_name(split: str) -> str:
    return f"{split}_wids.json"


def by_class_name(split: str) -> str:
    return f"{split}_by_class.npz"


def read_shardlist(root: str | os.PathLike, split: str = "train") -> list[dict]:
    """The ``wids`` index entries of a split: ``url``, ``nsamples``, ``labels`` and (ltsam >= 0.2) ``digests``."""
    index = Path(root) / wids_name(split)
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found; write shards with `python -m ltsam.data.shards write`")
    return json.loads(index.read_text())["shardlist"]


def read_labels(root: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Every sample's label in index order (shard by shard), from the index: no image is read or decoded."""
    return shardlist_labels(read_shardlist(root, split))


def shardlist_labels(shardlist: list[dict]) -> np.ndarray:
    return np.fromiter((y for s in shardlist for y in s["labels"]), dtype=np.int64,
                       count=sum(s["nsamples"] for s in shardlist))


def load_info(root: str | os.PathLike) -> dict:
    path = Path(root) / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------- sources


def records_from_samples(samples: Iterable[tuple[str, int]]) -> list[Record]:
    """Records from ``(path, label)`` pairs (``ltsam.data.files`` readers, a data set's ``samples``); the source
    bytes are kept. Keys are the paths relative to their common folder, without suffix: unique and readable."""
    samples = [(os.path.abspath(path), int(label)) for path, label in samples]
    root = os.path.commonpath([os.path.dirname(path) for path, _ in samples]) if samples else "."
    return [(Path(os.path.relpath(path, root)).with_suffix("").as_posix(), path, label) for path, label in samples]


def records_from_arrays(images: np.ndarray, labels: Sequence[int], keys: Sequence[str] | None = None) -> list[Record]:
    """Records from an image array (N, H, W[, C]) such as CIFAR-LT; written as PNG."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    keys = keys if keys is not None else [f"{i:07d}" for i in range(len(labels))]
    return [(key, image, int(y)) for key, image, y in zip(keys, images, labels)]


def records_from_dataset(dataset) -> list[Record]:
    """Records of a :func:`ltsam.data.factory.create_lt_dataset` data set: file-based ones through their
    ``samples`` (bytes kept), in-memory ones through their uint8 ``images`` (PNG), so the LT profile the
    data set applied is what gets written."""
    if hasattr(dataset, "samples"):
        return records_from_samples(dataset.samples)
    return records_from_arrays(dataset.images, dataset.targets, getattr(dataset, "keys", None))


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: everything a worker process needs, and the digest that identifies its content."""

    path: str
    records: list[Record]
    reencode: str | None
    digest: str


def _sample_key(key: str) -> str:
    # webdataset splits the member name at the first dot of its base name, so keys must not contain one
    return key.replace(".", "_")


def _sniff_ext(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _encode_pil(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(buf, format=_SAVE_FORMAT[ext], **({"quality": 95} if ext != "png" else {}))
    return buf.getvalue()


def encode_image(image, reencode: str | None = None) -> tuple[str, bytes]:
    """Return (extension, bytes): encoded sources pass through untouched, arrays and PIL images become PNG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return (reencode or "png"), _encode_pil(image, reencode or "png")
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        ext = _SUFFIX_EXT.get(Path(image).suffix.lower()) or _sniff_ext(data)
    else:
        data = bytes(image)
        ext = _sniff_ext(data)
    if reencode is not None and reencode != ext or ext is None:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            ext = reencode or "png"
            data = _encode_pil(img, ext)
    return ext, data


class _HashingFile:
    """A write-only file that hashes what passes through: the shard's SHA-256 without reading it back."""

    def __init__(self, stream) -> None:
        self.stream, self.sha256 = stream, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.stream.write(data)


@dataclass(frozen=True)
class ShardResult:
    """What the metadata records of one written shard."""

    name: str
    labels: list[int]
    digests: list[str]
    sha256: str
    filesize: int

    @property
    def hist(self) -> dict[int, int]:
        return dict(Counter(self.labels))


def _write_shard(task: ShardTask) -> ShardResult:
    """Write one shard under a temporary name and rename it when complete (the rename marks it finished)."""
    tmp = task.path + ".tmp"
    labels, digests = [], []
    # an integer mtime keeps tarfile from adding a PAX header to every member (twice the parsing when read)
    # and makes shards byte-identical across rewrites
    with open(tmp, "wb") as stream:
        hashing = _HashingFile(stream)
        with wds.TarWriter(hashing, mtime=0) as sink:
            for key, image, label in task.records:
                try:
                    ext, data = encode_image(image, task.reencode)
                except Exception as err:  # unreadable source: a sentence, not a worker's traceback
                    problem = f"{type(err).__name__}: {err}"
                else:
                    problem = image_problem(data)
                if problem is not None:
                    source = f" ({os.fspath(image)})" if isinstance(image, (str, os.PathLike)) else ""
                    raise ValueError(f"record {key!r}{source} is not a readable image ({problem}): replace it or "
                                     "leave it out, then write again (finished shards are kept)")
                members = {ext: data, "cls": str(int(label)).encode()}
                sink.write({"__key__": _sample_key(key), **members})
                labels.append(int(label))
                digests.append(sample_digest(_sample_key(key), members))
    filesize = os.path.getsize(tmp)
    os.replace(tmp, task.path)
    return ShardResult(Path(task.path).name, labels, digests, hashing.sha256.hexdigest(), filesize)


def _digest(records: Sequence[Record], reencode: str | None) -> str:
    h = hashlib.sha1(f"{reencode}\n".encode())
    for key, image, label in records:
        src = os.fspath(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
        h.update(f"{key}\t{src}\t{label}\n".encode())
    return h.hexdigest()[:16]


def plan_shards(
    labels: np.ndarray,
    counts: Sequence[int],
    *,
    maxcount: int,
    group_by: str,
    min_shards_per_group: int,
    seed: int,
) -> list[tuple[int, np.ndarray]]:
    """Split record indices into shards: (bucket, indices) per shard, shuffled within each bucket.

    Shards of a bucket have equal sizes (within one), so shard-level resampling draws classes in proportion to
    their counts.
    """
    if group_by not in ("none", "log2"):
        raise ValueError(f"group_by must be 'none' or 'log2', got {group_by!r}")
    rng = np.random.default_rng(seed)
    buckets = np.array(
        [class_bucket(int(counts[y])) if group_by == "log2" else 0 for y in labels], dtype=np.int64
    )
    plan = []
    for bucket in np.unique(buckets):
        idx = rng.permutation(np.flatnonzero(buckets == bucket))
        nshards = min(len(idx), max(min_shards_per_group, math.ceil(len(idx) / maxcount)))
        plan.extend((int(bucket), part) for part in np.array_split(idx, nshards))
    return plan


def _journal_entries(path: Path) -> dict[str, dict]:
    """Finished shards recorded by an interrupted run; a torn last line is ignored."""
    entries = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entries[entry["name"]] = entry
    return entries


def write_shards(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    name: str | None = None,
    maxcount: int = 1000,
    group_by: str = "log2",
    min_shards_per_group: int = 1,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    reencode: str | None = None,
    num_workers: int = 1,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Write ``records`` as shards of ``split`` in ``out_dir`` and return the split's entry of ``_info.json``.

    ``group_by='log2'`` puts classes whose counts share a log2 bucket into the same shards; use
    ``min_shards_per_group >= ranks x workers`` so every bucket can be split without resampling. Finished
    shards of an earlier, interrupted call with the same records are kept.
    """
    if reencode is not None and reencode not in IMAGE_EXTS:
        raise ValueError(f"reencode must be one of {IMAGE_EXTS} or None, got {reencode!r}")
    records = list(records)
    if not records:
        raise ValueError("no records to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([r[2] for r in records], dtype=np.int64)
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min()}")
    num_classes = num_classes or (len(class_names) if class_names else int(labels.max()) + 1)
    if labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} is out of range for {num_classes} classes")
    counts = np.bincount(labels, minlength=num_classes).tolist()

    plan = plan_shards(
        labels,
        counts,
        maxcount=maxcount,
        group_by=group_by,
        min_shards_per_group=min_shards_per_group,
        seed=seed,
    )
    tasks = []
    for i, (_, idx) in enumerate(plan):
        shard_records = [records[j] for j in idx]
        tasks.append(
            ShardTask(
                str(out / shard_name(split, i)), shard_records, reencode, _digest(shard_records, reencode)
            )
        )

    journal = out / f".{split}_journal.jsonl"
    done = _journal_entries(journal)
    previous = load_info(out).get("splits", {}).get(split, {})
    previous_index = {}
    if (out / wids_name(split)).is_file():
        previous_index = {s["url"]: s for s in read_shardlist(out, split)}
    for fname, digest, sha256 in zip(
        previous.get("filenames", []), previous.get("shard_digests", []), previous.get("shard_sha256", [])
    ):
        indexed = previous_index.get(fname, {})
        if "digests" in indexed and "filesize" in indexed:
            done.setdefault(fname, {"name": fname, "labels": indexed["labels"], "digests": indexed["digests"],
                                    "sha256": sha256, "digest": digest, "filesize": indexed["filesize"]})
    results: dict[str, ShardResult] = {}
    todo = []
    for task in tasks:
        fname = Path(task.path).name
        kept = done.get(fname)
        if (  # the same records, and the file as written (a shard cut or changed since is rewritten)
            kept is not None
            and Path(task.path).is_file()
            and kept["digest"] == task.digest
            and len(kept.get("digests", ())) == len(task.records)
            and kept.get("filesize") == Path(task.path).stat().st_size
        ):
            results[fname] = ShardResult(fname, kept["labels"], kept["digests"], kept["sha256"], kept["filesize"])
        else:
            todo.append(task)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        Progress(*columns, disable=not show_progress, transient=False) as progress,
        open(journal, "a") as log,
    ):
        bar = progress.add_task(f"writing {split} shards", total=len(tasks), completed=len(tasks) - len(todo))

        def finished(result: ShardResult, digest: str) -> None:
            results[result.name] = result
            log.write(json.dumps({"name": result.name, "labels": result.labels, "digests": result.digests,
                                  "sha256": result.sha256, "digest": digest, "filesize": result.filesize}) + "\n")
            log.flush()
            progress.advance(bar)

        if num_workers <= 1:
            for task in todo:
                finished(_write_shard(task), task.digest)
        else:
            with ProcessPoolExecutor(num_workers) as pool:
                for task, result in zip(todo, pool.map(_write_shard, todo)):
                    finished(result, task.digest)

    names = [Path(t.path).name for t in tasks]
    entry = {
        "name": split,
        "num_samples": len(records),
        "filenames": names,
        "shard_lengths": [len(results[n].labels) for n in names],
        "group_by": group_by,
        "shard_buckets": [bucket for bucket, _ in plan],
        "shard_class_hist": [{str(k): v for k, v in sorted(results[n].hist.items())} for n in names],
        "shard_digests": [t.digest for t in tasks],
        "shard_sha256": [results[n].sha256 for n in names],
        "num_classes": num_classes,
        "class_counts": counts,
    }
    if class_names:
        entry["class_names"] = list(class_names)
    _write_metadata(out, split, name or out.name, entry, [results[n] for n in names])
    journal.unlink()
    for stale in set(previous.get("filenames", [])) - set(names):
        (out / stale).unlink(missing_ok=True)
    return entry


def _write_metadata(out: Path, split: str, name: str, entry: dict, shards: list[ShardResult]) -> None:
    """_info.json (merged with other splits), the counts file, the wids index and the per-class index, each
    replaced atomically."""
    info = load_info(out)
    info["name"] = name
    info.setdefault("splits", {})[split] = entry
    _replace_json(out / INFO_NAME, info)
    extra = {"class_names": entry["class_names"]} if "class_names" in entry else {}
    save_class_counts(entry["class_counts"], out / counts_name(split), split=split, **extra)
    shardlist = [
        {"url": shard.name, "nsamples": len(shard.labels), "filesize": shard.filesize, "labels": shard.labels,
         "digests": shard.digests}
        for shard in shards
    ]
    _replace_json(
        out / wids_name(split), {"wids_version": 1, "name": f"{name}-{split}", "shardlist": shardlist}
    )
    labels = np.fromiter((y for shard in shards for y in shard.labels), dtype=np.int64)
    order, offsets = class_index(labels, len(entry["class_counts"]))
    tmp = out / (by_class_name(split) + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, order=order, offsets=offsets)
    os.replace(tmp, out / by_class_name(split))


def class_index(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): class c's sample indices are ``order[offsets[c]:offsets[c + 1]]``, ascending."""
    order = np.argsort(labels, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))])
    return order, offsets


def _replace_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- verify


MAX_PROBLEMS_PER_SHARD = 5  # a shard garbled throughout would otherwise print one line per sample


@dataclass(frozen=True)
class ShardCheck:
    """One shard to check: its file, what the metadata says it holds (labels and digests None where an older
    writer left them out), the class count, and whether to decode every image."""

    path: str
    labels: list[int] | None
    digests: list[str] | None
    sha256: str | None
    num_classes: int
    decode: bool = False


@dataclass(frozen=True)
class ShardFound:
    """What re-reading a shard found: problems (naming key and what), and what the writer would record."""

    problems: list[str]
    result: ShardResult

    @property
    def hist(self) -> dict[int, int]:
        return self.result.hist


def sample_problem(sample: dict, expected_digest: str | None, num_classes: int) -> tuple[int | None, str | None]:
    """(label or None, what is wrong or None) of one undecoded sample against its metadata: shared by verify,
    the stream and the wids reader so all three judge a sample alike."""
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        return None, f"label {sample.get('cls')!r:.20} is not an integer"
    if not 0 <= label < num_classes:
        return None, f"label {label} is out of range for {num_classes} classes"
    if expected_digest is not None and sample_digest(sample["__key__"], sample_members(sample)) != expected_digest:
        return label, "content differs from its digest in the index (changed bytes)"
    if not any(ext in sample for ext in (*IMAGE_EXTS, "jpeg")):
        return label, "no image member"
    return label, None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shard(check: ShardCheck) -> ShardFound:
    """Re-read one shard: every sample's label, digest and image (header, or every pixel with ``decode``)
    against the metadata, and the file's SHA-256."""
    problems: list[str] = []
    sha256 = file_sha256(check.path)
    if check.sha256 is not None and sha256 != check.sha256:
        problems.append("file differs from the SHA-256 recorded in _info.json")
    labels, digests = [], []
    n = 0
    expected = len(check.labels) if check.labels is not None else None
    try:
        for position, sample in read_shard(check.path):
            n = position + 1
            key = sample["__key__"]
            digests.append(sample_digest(key, sample_members(sample)))
            if expected is not None and position >= expected:
                problems.append(f"sample {key}: beyond the {expected} samples of the metadata")
                continue
            label, problem = sample_problem(sample, check.digests[position] if check.digests else None,
                                            check.num_classes)
            labels.append(-1 if label is None else label)
            if problem is None:
                image = next(sample[k] for k in (*IMAGE_EXTS, "jpeg") if k in sample)
                reason = image_problem(image, decode=check.decode)
                problem = None if reason is None else f"not a readable image ({reason})"
            if problem is None and check.labels is not None and label != check.labels[position]:
                problem = f"label {label}, the index says {check.labels[position]}"
            if problem:
                problems.append(f"sample {key}: {problem}")
    except Exception as err:  # a garbled tar: reported, not raised
        problems.append(f"unreadable after {n} samples ({type(err).__name__}: {err})")
    if expected is not None and n < expected:
        problems.append(f"{n} samples, metadata says {expected} (truncated?)")
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems[MAX_PROBLEMS_PER_SHARD:] = [f"... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more problems"]
    hist_labels = [y for y in labels if y >= 0]
    result = ShardResult(Path(check.path).name, hist_labels, digests, sha256, os.path.getsize(check.path))
    return ShardFound(problems, result)


def _check_split(root: Path, name: str, entry: dict, decode: bool, num_workers: int,
                 index_required: bool = True) -> tuple[list[str], dict]:
    """(problems, ShardFound by file name) of one split: each shard re-read, then counts against _info.json."""
    problems = []
    try:
        indexed = {s["url"]: s for s in read_shardlist(root, name)}
    except FileNotFoundError as err:
        problems += [str(err)] if index_required else []
        indexed = {}
    paths = [str(root / f) for f in entry["filenames"]]
    sha256 = entry.get("shard_sha256") or [None] * len(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    problems += [f"{p}: missing" for p in missing]
    checks = []
    for fname, path, digest in zip(entry["filenames"], paths, sha256):
        if path in missing:
            continue
        shard_index = indexed.get(fname, {})
        checks.append(ShardCheck(path, shard_index.get("labels"), shard_index.get("digests"), digest,
                                 entry["num_classes"], decode))
    mapper: Callable = map
    pool = ProcessPoolExecutor(num_workers) if num_workers > 1 else None
    if pool is not None:
        mapper = pool.map
    try:
        found = dict(zip((Path(c.path).name for c in checks), mapper(check_shard, checks)))
    finally:
        if pool is not None:
            pool.shutdown()
    totals: Counter[int] = Counter()
    for fname, path, n_expected, hist_expected in zip(
        entry["filenames"], paths, entry["shard_lengths"], entry["shard_class_hist"]
    ):
        if fname not in found:
            continue
        shard = found[fname]
        n, hist = len(shard.result.digests), shard.hist
        totals.update(hist)
        problems += [f"{path}: {p}" for p in shard.problems]
        if n != n_expected and not any("metadata says" in p for p in shard.problems):
            problems.append(f"{path}: {n} samples, metadata says {n_expected}")
        expected = {int(k): v for k, v in hist_expected.items()}
        if hist != expected:
            diff = {
                c: (hist.get(c, 0), expected.get(c, 0))
                for c in set(hist) | set(expected)
                if hist.get(c, 0) != expected.get(c, 0)
            }
            problems.append(f"{path}: label counts differ (class: (found, expected)) {dict(sorted(diff.items()))}")
    if sum(entry["shard_lengths"]) != entry["num_samples"]:
        problems.append(
            f"split {name}: shard lengths sum to {sum(entry['shard_lengths'])}, num_samples says {entry['num_samples']}"
        )
    if not missing:
        counts = [totals.get(c, 0) for c in range(len(entry["class_counts"]))]
        if counts != entry["class_counts"]:
            problems.append(f"split {name}: label totals differ from class_counts")
    return problems, found


def _splits(root: Path, split: str | None) -> tuple[dict, list[str], list[str]]:
    """(the splits of _info.json, the names asked for, problems finding them)."""
    splits = load_info(root).get("splits", {})
    if not splits:
        return splits, [], [f"{root / INFO_NAME}: missing or has no splits"]
    if split and split not in splits:
        return splits, [], [f"split {split!r} not in {root / INFO_NAME} (has {sorted(splits)})"]
    return splits, [split] if split else list(splits), []


def verify(root: str | os.PathLike, split: str | None = None, num_workers: int = 1, decode: bool = False) -> list[str]:
    """Re-read every shard against the metadata: file SHA-256, sample count, and per sample its content digest,
    label and image (header, or every pixel with ``decode``). One line per problem, naming the shard and the
    sample key. Shards written without digests are checked for everything but their content
    (:func:`undigested_note` says so)."""
    root = Path(root)
    splits, names, problems = _splits(root, split)
    for name in names:
        problems += _check_split(root, name, splits[name], decode, num_workers)[0]
    return problems


def undigested_note(root: str | os.PathLike, split: str, shardlist: list[dict] | None = None) -> str | None:
    """A sentence naming a split whose shards lack per-sample digests (an older writer), and the command that
    adds them; None when every shard has them. ``shardlist``: the split's wids index entries, if read."""
    if shardlist is None:
        try:
            shardlist = read_shardlist(root, split)
        except FileNotFoundError:  # no index at all: no shard has digests
            shardlist = [{}] * len(load_info(root).get("splits", {}).get(split, {}).get("filenames", ()))
    lacking = sum("digests" not in s for s in shardlist)
    if not lacking:
        return None
    return (f"{lacking} shard(s) of split {split!r} in {root} were written without per-sample digests (an older "
            f"writer), so their content is not checked: changed image bytes go unnoticed. Add the digests with "
            f"`python -m ltsam.data.shards digest {root} --split {split}`")


def add_digests(root: str | os.PathLike, split: str | None = None, num_workers: int = 1) -> list[str]:
    """Record what an older writer left out (per-sample digests, file SHA-256 and size; the wids and per-class
    indexes where missing) from the shards as they are now, after checking every sample against the rest of
    the metadata and decoding every image. Returns the problems; with any, nothing is written (digests of
    damaged data would bless it)."""
    root = Path(root)
    splits, names, problems = _splits(root, split)
    found_by_split = {}
    for name in names:
        split_problems, found = _check_split(root, name, splits[name], True, num_workers, index_required=False)
        problems += split_problems
        found_by_split[name] = found
    if problems:
        return problems
    data_set_name = load_info(root).get("name", root.name)
    for name in names:
        entry, found = dict(splits[name]), found_by_split[name]
        results = [found[f].result for f in entry["filenames"]]
        entry["shard_sha256"] = [r.sha256 for r in results]
        _write_metadata(root, name, data_set_name, entry, results)
    return []


def check_shard_set(root: Path, split: str, shards: Sequence[dict]) -> None:
    """Before any read: every shard exists and has the size written (older sets: the samples the index says),
    else an error naming each damaged shard and what to do; a warning if the set has no content digests.

    ``shards``: wids-index style entries (``url``, ``nsamples``, optional ``filesize`` and ``digests``).
    """
    missing = [s["url"] for s in shards if not (root / s["url"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards of split {split!r} in {root} are missing, e.g. {missing[:3]}; "
            "restore them or write the set again"
        )
    damage = {s["url"]: shard_damage(root / s["url"], s["nsamples"], s.get("filesize")) for s in shards}
    damaged = {url: what for url, what in damage.items() if what is not None}
    if damaged:
        listed = "; ".join(f"{url}: {what}" for url, what in list(damaged.items())[:5])
        more = f" (and {len(damaged) - 5} more)" if len(damaged) > 5 else ""
        raise ValueError(
            f"{len(damaged)} of {len(shards)} shards of split {split!r} in {root} are damaged (cut short or changed "
            f"since writing): {listed}{more}. Run `python -m ltsam.data.shards verify {root}` for each problem, then "
            "rerun the `write` command that made the set (it rewrites only the damaged shards) or restore them"
        )
    note = undigested_note(root, split, list(shards))
    if note is not None and (root, split) not in _WARNED_UNDIGESTED:
        _WARNED_UNDIGESTED.add((root, split))
        _logger.warning(note)


_WARNED_UNDIGESTED: set[tuple[Path, str]] = set()  # one warning per set and process


# ----------------------------------------------------------------------------------------------- CLI


def _inat_class_names(json_file: str | os.PathLike) -> list[str]:
    """Category names by ``category_id``, kept in the metadata since some code bases re-map labels by name."""
    categories = json.loads(Path(json_file).read_text()).get("categories") or []
    cats = {c["id"]: c.get("name", str(c["id"])) for c in categories}
    return [cats.get(i, str(i)) for i in range(max(cats) + 1)] if cats else []


def _records_from_args(args: argparse.Namespace) -> tuple[list[Record], int | None, list[str] | None]:
    """(records, class count or None, class names or None) of the source named on the command line."""
    if args.dataset:
        dataset = create_lt_dataset(args.dataset, args.data_dir, args.split, args.imb_factor, args.n_max)
        return records_from_dataset(dataset), dataset.num_classes, list(dataset.classes)
    if args.list:
        return records_from_samples(read_list_file(args.list, args.root, args.num_classes)), args.num_classes, None
    if args.inat:
        samples, num_classes = read_inat_json(args.inat, args.root)
        return records_from_samples(samples), num_classes, _inat_class_names(args.inat) or None
    if args.folder:
        samples, classes = read_image_folder(args.folder)
        return records_from_samples(samples), len(classes), classes
    images_key, labels_key = args.npz_keys.split(",")
    with np.load(args.npz) as arrays:
        return records_from_arrays(arrays[images_key], arrays[labels_key]), args.num_classes, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltsam.data.shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser(
        "write", help="write shards from a named LT data set, list file, iNat JSON, image folder or arrays"
    )
    src = write.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--list", help="'path label' list file (ImageNet-LT, iNat list files); paths under --root"
    )
    src.add_argument("--inat", help="iNaturalist-2018 COCO-style JSON (train2018.json); paths under --root")
    src.add_argument("--folder", help="ImageFolder root (one sub-folder per class)")
    src.add_argument("--npz", help=".npz with image and label arrays")
    src.add_argument(
        "--dataset",
        choices=LT_DATASETS,
        help="a named long-tailed data set (create_lt_dataset), e.g. cifar10-lt with the CIFAR-LT profile",
    )
    write.add_argument("--root", default=".", help="image root for --list/--inat")
    write.add_argument("--data-dir", default=None, help="folder holding the files of --dataset")
    write.add_argument("--imb-factor", type=float, default=None, help="--dataset imbalance factor (max / min)")
    write.add_argument("--n-max", type=int, default=None, help="--dataset images of the largest class")
    write.add_argument(
        "--npz-keys", default="images,labels", help="array names in --npz (default: images,labels)"
    )
    write.add_argument("--out", required=True, help="output directory")
    write.add_argument("--split", default="train", help="split written (and read from --dataset)")
    write.add_argument(
        "--name", default=None, help="data set name in _info.json (default: output folder name)"
    )
    write.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    write.add_argument(
        "--group-by",
        choices=("log2", "none"),
        default="log2",
        help="group shards by log2 bucket of the class count (default) or not",
    )
    write.add_argument(
        "--min-shards-per-group",
        type=int,
        default=1,
        help="at least this many shards per bucket (ranks x workers lets each be split)",
    )
    write.add_argument("--num-classes", type=int, default=None)
    write.add_argument(
        "--reencode", choices=IMAGE_EXTS, default=None, help="re-encode images (default: keep bytes)"
    )
    write.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    write.add_argument("--seed", type=int, default=0)
    check = sub.add_parser(
        "verify", help="re-read every shard: SHA-256, counts, and each sample's digest, label and image header"
    )
    check.add_argument("--decode", action="store_true", help="decode every image, not only its header")
    digest = sub.add_parser(
        "digest", help="add the per-sample digests (and file SHA-256 and sizes) an older writer left out, "
                       "after checking and decoding every sample"
    )
    for command in (check, digest):
        command.add_argument("root")
        command.add_argument("--split", default=None)
        command.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    if args.command in ("verify", "digest"):
        return _verify_or_digest(args)
    if not args.dataset and (args.imb_factor is not None or args.n_max is not None or args.data_dir):
        parser.error("--data-dir, --imb-factor and --n-max apply to --dataset only")
    records, num_classes, class_names = _records_from_args(args)
    try:
        entry = write_shards(
            records,
            args.out,
            split=args.split,
            name=args.name,
            maxcount=args.maxcount,
            group_by=args.group_by,
            min_shards_per_group=args.min_shards_per_group,
            num_classes=args.num_classes or num_classes,
            class_names=class_names,
            reencode=args.reencode,
            num_workers=args.workers,
            seed=args.seed,
        )
    except ValueError as err:  # a bad record or option: one sentence, no traceback
        print(f"{parser.prog} write: {err}", file=sys.stderr)
        return 2
    print(f"wrote {entry['num_samples']} samples in {len(entry['filenames'])} shards to {args.out}")
    return 0


def _verify_or_digest(args: argparse.Namespace) -> int:
    """``verify``: problems, then what was not checked; ``digest``: problems, or the digests added."""
    if args.command == "digest":
        problems = add_digests(args.root, args.split, args.workers)
    else:
        problems = verify(args.root, args.split, args.workers, decode=args.decode)
    for line in problems:
        print(line, file=sys.stderr)
    if args.command == "digest":
        print(f"{len(problems)} problem(s) in {args.root}: nothing written, fix them first" if problems
              else f"digests recorded for {args.root}: `verify` now checks every sample's content")
        return 1 if problems else 0
    print(f"{len(problems)} problem(s) in {args.root}")
    _, names, _ = _splits(Path(args.root), args.split)
    notes = [note for name in names if (note := undigested_note(args.root, name)) is not None]
    if not args.decode:
        notes.append("images were checked by their headers only: `verify --decode` decodes every image")
    for note in notes:
        print(f"note: {note}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
