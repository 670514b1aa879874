"""Write a synthetic long-tailed shard set with a real data set's class-count profile, for scale tests.

The profiles give the class of rank r (of C, largest first) ``n(r) = n_max (n_min / n_max)^((r / (C - 1))^k)``:
the data set's largest and smallest class exactly, with ``k`` fitted so the counts add up to its size:

* ``inat2018``: 8,142 classes, 1,000 down to 2 images, 437,513 in all (iNaturalist-2018 train);
* ``imagenet-lt``: 1,000 classes, 1,280 down to 5 images, 115,846 in all (ImageNet-LT train).

``--classes`` resamples the profile's shape onto another class count and ``--images`` scales the counts
down to another total (every class keeping at least n_min images), so a 2-core machine can write an
iNat-shaped set of 8k classes with ~40k images. Images are tiny random JPEGs (``--img-size``), written
with ``ltsam.data.shards``.

    python tools/make_lt_shards.py --profile inat2018 --classes 8142 --images 30000 --out /tmp/inat_like
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from ltsam.data.shards import write_shards

PROFILES = {  # classes, largest class, smallest class, images in all
    "inat2018": (8142, 1000, 2, 437_513),
    "imagenet-lt": (1000, 1280, 5, 115_846),
}


def profile_counts(profile: str, classes: int | None = None, images: int | None = None) -> list[int]:
    """Per-class image counts (largest first) of ``profile``, on ``classes`` classes scaled to ``images``."""
    full_classes, n_max, n_min, total = PROFILES[profile]

    def shape(k: float, positions: np.ndarray) -> np.ndarray:
        return n_max * (n_min / n_max) ** (positions**k)

    low, high = 1e-3, 10.0
    for _ in range(60):  # bisect the exponent: the sum grows with it
        k = (low + high) / 2
        low, high = (k, high) if shape(k, np.linspace(0, 1, full_classes)).sum() < total else (low, k)
    classes = classes or full_classes
    counts = shape(k, np.linspace(0, 1, classes))
    if images is None:
        return np.round(counts).astype(int).tolist()
    # fewer images: scale every count alike, but keep n_min images in the smallest classes
    low, high = 0.0, 1.0
    for _ in range(60):
        g = (low + high) / 2
        low, high = (g, high) if np.maximum(n_min, counts * g).sum() < images else (low, g)
    return np.maximum(n_min, np.round(counts * g)).astype(int).tolist()


def tiny_jpegs(counts: list[int], size: int, seed: int) -> list[tuple[str, bytes, int]]:
    """Records of random-noise JPEGs: a few hundred bytes each, so the stream's own cost dominates."""
    rng = np.random.default_rng(seed)
    records = []
    for label, n in enumerate(counts):
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
            records.append((f"c{label:05d}_{i:05d}", buf.getvalue(), label))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="inat2018")
    parser.add_argument("--classes", type=int, default=None, help="class count (default: the profile's)")
    parser.add_argument("--images", type=int, default=None, help="images in all (default: the profile's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--img-size", type=int, default=8)
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--min-shards-per-group", type=int, default=4, help="ranks x workers to be read")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = profile_counts(args.profile, args.classes, args.images)
    entry = write_shards(tiny_jpegs(counts, args.img_size, args.seed), args.out, maxcount=args.maxcount,
                         min_shards_per_group=args.min_shards_per_group, num_workers=args.workers,
                         num_classes=len(counts), seed=args.seed)
    print(f"{args.profile}-shaped: {len(counts)} classes, {sum(counts)} images ({max(counts)} down to "
          f"{min(counts)} per class) in {len(entry['filenames'])} shards, written to {args.out}")


if __name__ == "__main__":
    main()
