"""Sample digests, a tolerant tar reader that can start at any sample, and the skip ledger of the readers.

The writer records one digest per sample (key, every member's extension and bytes) and one SHA-256 per shard
file; ``verify``, the stream and the ``wids`` reader recompute the sample digest of what they read, so a
flipped byte, a changed label or a swapped payload is caught without decoding anything. What a reader skips
is counted per shard in shared memory (loader workers are separate processes) and logged once per shard
with the shard's name and the first key; a shard that holds fewer samples than its metadata is recorded and
turned into an error naming it (``SkipLedger.raise_if_short``).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import tarfile
from collections.abc import Generator, Mapping, Sequence

_logger = logging.getLogger("ltsam.data")


def sample_digest(key: str, members: Mapping[str, bytes]) -> str:
    """16 hex digits of BLAKE2b over the key and every (extension, bytes) member, in extension order."""
    h = hashlib.blake2b(key.encode(), digest_size=8)
    for ext in sorted(members):
        data = members[ext]
        h.update(b"\0%s\0%d\0" % (ext.encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def digest_as_int(hexdigest: str) -> int:
    return int(hexdigest, 16)


def sample_members(sample: Mapping) -> dict[str, bytes]:
    """The file members of a sample dict (``__key__``-style entries left out)."""
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def read_shard(path: str, start: int = 0) -> Generator[tuple[int, dict], None, int]:
    """``(position, sample)`` of a webdataset tar from sample ``start`` on; sample = ``{"__key__", ext: bytes}``.

    Earlier samples are skipped by their headers (``tarfile`` seeks over the data), so a read can begin
    anywhere in a shard at little cost. A tar cut short ends at the last whole sample; the generator returns
    the number of samples it found (``found = yield from read_shard(...)``), for the callers to compare with
    the metadata.
    """
    position, key, sample = -1, None, {}
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError:  # a garbled header: the shard ends here, the count check reports it
                break
            if member is None:
                break
            if not member.isfile():
                continue
            prefix, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")  # webdataset's rule: the key ends at the base name's first dot
            name_key = f"{prefix}/{stem}" if prefix else stem
            if name_key != key:
                if position >= start:
                    yield position, sample
                position, key, sample = position + 1, name_key, {"__key__": name_key}
            if position >= start:
                try:
                    sample[ext] = tar.extractfile(member).read()
                except (tarfile.ReadError, OSError):  # data cut short: this sample is incomplete, and the last
                    return position
        if position >= start and key is not None and len(sample) > 1:
            yield position, sample
    return position + 1


class SkipLedger:
    """Skipped samples per shard and shards found short, shared by the loader's worker processes.

    ``skip`` counts a sample and logs the first one of each shard (name, key, reason); ``short`` records a
    shard that ended early. Both live in shared memory created before the workers start, so the main process
    reads the totals (``summary``) after an epoch.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.skipped = multiprocessing.Array("q", len(self.names))
        self.found = multiprocessing.Array("q", [-1] * len(self.names))  # samples found in a short shard

    def skip(self, shard: int, key: str | None, reason: str) -> None:
        with self.skipped.get_lock():
            self.skipped[shard] += 1
            first = self.skipped[shard] == 1
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

    def raise_if_short(self, lengths: Sequence[int]) -> None:
        """A shard shorter than its metadata means missing samples: an error naming each such shard."""
        short = self.short_shards()
        if short:
            index = {n: i for i, n in enumerate(self.names)}
            listed = "; ".join(f"{n} holds {f} of {lengths[index[n]]} samples" for n, f in short.items())
            raise RuntimeError(
                f"{len(short)} shard(s) shorter than their metadata: {listed}. The data changed after writing: "
                "run `python -m ltsam.data.shards verify` and rewrite the damaged shards"
            )

    @property
    def total(self) -> int:
        return int(sum(self.skipped[:]))

    def summary(self) -> dict[str, int]:
        """Skipped samples by shard name (shards without skips left out)."""
        return {n: int(c) for n, c in zip(self.names, self.skipped[:]) if c}
