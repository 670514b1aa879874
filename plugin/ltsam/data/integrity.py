"""Sample digests, a tolerant tar reader that can start at any sample, and the skip ledger of the readers.

The writer records one digest per sample (key, every member's extension and bytes) and one SHA-256 per shard
file, and the file's size in the ``wids`` index; ``verify``, the stream and the ``wids`` reader recompute the
sample digest of what they read, so a flipped byte, a changed label or a swapped payload is caught without
decoding anything, and a shard not of its written size is refused before anything is read
(:func:`shard_damage`). The bad samples a reader skips are flagged per sample in shared memory (loader
workers are separate processes), so each counts once however often it is met, and logged once per shard
with the shard's name and the first key; a shard that holds fewer samples than its metadata is recorded and
turned into an error naming it (``SkipLedger.raise_if_short``).

The stream reads tars with :func:`read_shard`, which parses only the headers' name and size (and PAX / GNU
long names): ``tarfile`` spent 6x as much CPU per sample on fields nobody uses.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import sys
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

_logger = logging.getLogger("ltsam.data")


def sample_digest(key: str, members: Mapping[str, bytes]) -> str:
    """16 hex digits of BLAKE2b over the key and every (extension, bytes) member, in extension order."""
    h = hashlib.blake2b(key.encode(), digest_size=8)
    for ext in sorted(members):
        data = members[ext]
        h.update(b"\0%s\0%d\0" % (ext.encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def sample_members(sample: Mapping) -> dict[str, bytes]:
    """The file members of a sample dict (``__key__``-style entries left out)."""
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def _pax_fields(data: bytes) -> dict[str, str]:
    """Records ``"LEN key=value\\n"`` of a PAX extended header."""
    fields, pos = {}, 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        fields[key.decode()] = value.decode()
        pos += length
    return fields


def _tar_members(f: BinaryIO, file_size: int) -> Generator[tuple[str, int, int], None, bool]:
    """``(name, data offset, size)`` of a tar's regular files, from the 512-byte headers alone.

    ``tarfile`` spent most of a stream's reading time on header fields nobody uses; this reads name and size
    (PAX ``path``/``size`` and GNU long names included) and seeks over the data. A header cut short or with
    a garbled size ends the listing; returns whether the archive ended where a tar ends (not cut short).
    """
    offset, override = 0, {}
    while offset + 512 <= file_size:
        f.seek(offset)
        header = f.read(512)
        if not header.strip(b"\0"):
            return True  # end-of-archive blocks
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return False
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = f"{prefix.decode('utf-8', 'replace')}/{name}"
        typeflag, data_offset = header[156:157], offset + 512
        offset = data_offset + (size + 511) // 512 * 512
        if typeflag in (b"x", b"L"):  # describes the next member
            f.seek(data_offset)
            data = f.read(size)
            override = _pax_fields(data) if typeflag == b"x" else {"path": data.rstrip(b"\0").decode()}
            continue
        if typeflag in (b"0", b"\0", b"7"):
            name = override.get("path", name)
            size = int(override.get("size", size))
            offset = data_offset + (size + 511) // 512 * 512
            if data_offset + size > file_size:
                return False  # data cut short
            yield name, data_offset, size
        override = {}
    return offset == file_size  # no end-of-archive blocks: complete only if the last member ends the file


def read_shard(path: str, start: int = 0) -> Generator[tuple[int, dict], None, int]:
    """``(position, sample)`` of a webdataset tar from sample ``start`` on; sample = ``{"__key__", ext: bytes}``.

    Earlier samples are skipped by their headers (the data is seeked over), so a read can begin anywhere in
    a shard at little cost. A tar cut short ends at the last whole sample (the one it cut is neither yielded
    nor counted); the generator returns the number of samples it found (``found = yield from
    read_shard(...)``), for the callers to compare with the metadata.
    """
    position, key, sample = -1, None, {}
    with open(path, "rb") as f:
        members = _tar_members(f, os.fstat(f.fileno()).st_size)
        while True:
            try:
                name, data_offset, size = next(members)
            except StopIteration as end:
                complete = end.value
                break
            prefix, _, base = name.rpartition("/")
            stem, _, ext = base.partition(".")  # webdataset's rule: the key ends at the base name's first dot
            name_key = f"{prefix}/{stem}" if prefix else stem
            if name_key != key:
                if position >= start:
                    yield position, sample
                position, key, sample = position + 1, name_key, {"__key__": name_key}
            if position >= start:
                f.seek(data_offset)
                sample[ext] = f.read(size)
    if not complete:  # the last sample may lack members the cut took
        return position
    if position >= start and key is not None:
        yield position, sample
    return position + 1


def count_samples(path: str | os.PathLike) -> int:
    """Whole samples in a tar, from its headers alone (no data is read): what :func:`read_shard` would find."""
    listing = read_shard(os.fspath(path), start=sys.maxsize)
    try:
        next(listing)
    except StopIteration as end:
        return max(0, end.value)
    raise AssertionError("read_shard yielded a sample before its start")


def shard_damage(path: Path, samples: int, filesize: int | None) -> str | None:
    """What is wrong with a shard file before anything is read from it, or None.

    Where the index records the size written, the file must have exactly that size (a stat: a cut anywhere is
    found, even inside the last sample); shards of an older writer are listed by their headers instead and
    must hold the samples the index says.
    """
    if filesize is not None:
        size = path.stat().st_size
        return None if size == filesize else f"{size} bytes, written as {filesize}"
    found = count_samples(path)
    return None if found == samples else f"{found} whole samples, the index says {samples}"


def image_problem(data: bytes, decode: bool = True) -> str | None:
    """What keeps ``data`` from being an image, or None: the header only, or (``decode``) every pixel, so a
    file cut after its header is found (``ImageFile.LOAD_TRUNCATED_IMAGES`` is ignored here)."""
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if decode:
                img.draft("RGB", (1, 1))  # JPEG: decode the whole stream at a reduced scale (same checks)
                img.load()
    except UnidentifiedImageError:
        return "not a recognised image format"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return None


class SkipLedger:
    """Bad samples per shard and shards found short, shared by the loader's worker processes.

    ``skip`` flags a sample (shard, position) as bad and counts the event; a sample read again (the wids
    reader falls through to it again, a later epoch) is one bad sample however often it is skipped. The first
    skip of each shard is logged (name, key, reason); ``short`` records a shard that ended early. Everything
    lives in shared memory created before the workers start, so the main process reads the totals
    (``summary``, ``bad_samples``) after an epoch.
    """

    def __init__(self, names: Sequence[str], lengths: Sequence[int]) -> None:
        self.names = tuple(names)
        self.lengths = tuple(int(n) for n in lengths)
        self.starts = tuple(itertools.accumulate(self.lengths, initial=0))
        self.events = multiprocessing.Array("q", len(self.names))
        self.bad = multiprocessing.Array("b", max(1, self.starts[-1]))  # one flag per sample of the index
        self.found = multiprocessing.Array("q", [-1] * len(self.names))  # samples found in a short shard

    def skip(self, shard: int, position: int, key: str | None, reason: str) -> None:
        with self.events.get_lock():
            self.events[shard] += 1
            first = self.events[shard] == 1
        if 0 <= position < self.lengths[shard]:  # a sample beyond the index is counted as an event only
            self.bad[self.starts[shard] + position] = 1
        if first:
            _logger.warning(
                "%s: skipping sample %s: %s (further skips in this shard are counted, not logged)",
                self.names[shard],
                key,
                reason,
            )

    def short(self, shard: int, found: int, expected: int) -> None:
        with self.found.get_lock():
            first = self.found[shard] < 0
            if first or found < self.found[shard]:
                self.found[shard] = found
        if first:
            _logger.error("%s: holds %d samples, its metadata says %d", self.names[shard], found, expected)

    def short_shards(self) -> dict[str, int]:
        return {n: f for n, f in zip(self.names, self.found[:]) if f >= 0}

    def raise_if_short(self) -> None:
        """A shard shorter than its metadata means missing samples: an error naming each such shard."""
        short = self.short_shards()
        if short:
            index = {n: i for i, n in enumerate(self.names)}
            listed = "; ".join(f"{n} holds {f} of {self.lengths[index[n]]} samples" for n, f in short.items())
            raise RuntimeError(
                f"{len(short)} shard(s) shorter than their metadata: {listed}. The data changed after writing: "
                "run `python -m ltsam.data.shards verify` and rewrite the damaged shards"
            )

    def bad_samples(self) -> dict[str, list[int]]:
        """Positions of the bad samples by shard name (shards without any left out)."""
        flags = np.frombuffer(self.bad.get_obj(), dtype=np.int8)
        return {
            name: (np.flatnonzero(flags[start:stop]).tolist())
            for name, start, stop in zip(self.names, self.starts, self.starts[1:])
            if flags[start:stop].any()
        }

    @property
    def total(self) -> int:
        """Distinct bad samples."""
        return int(np.frombuffer(self.bad.get_obj(), dtype=np.int8).sum(dtype=np.int64))

    @property
    def skip_events(self) -> int:
        """Skips, a sample skipped twice counting twice."""
        return int(sum(self.events[:]))

    def summary(self) -> dict[str, int]:
        """Distinct bad samples by shard name (shards without any left out)."""
        return {name: len(positions) for name, positions in self.bad_samples().items()}
