"""Images per second, decode and augmentation included, of plain vs class-aware streaming vs ImageFolder.

Default data: CIFAR-10-LT (imbalance 100, 12,406 JPEGs) cut from ../shared/data/cifar10 when present, else a
generated long-tailed set of 32x32 JPEGs. The same image bytes are written once as an ImageFolder and once as
log2-bucketed shards; each loader then reads ``--samples`` images (worker start included), in alternating
rounds, and the median rate per loader is reported.

    python tools/bench_stream.py [--workers 0] [--rounds 5] [--samples 2048] [--img-size 32]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.table import Table
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, RandomSampler

from ltsam.data.shards import records_from_folder, write_shards
from ltsam.data.stream import StreamingDataset
from ltsam.data.wids_access import ShardIndexDataset

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def make_folder(folder: Path) -> None:
    """CIFAR-10-LT (first n_c images of class c) from the shared shards, else generated JPEGs."""
    if (CIFAR / "cifar10.json").is_file():
        shards = sorted(str(p) for p in CIFAR.glob("cifar10-train-*.tar"))
        for sample in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()):
            _, name, index = sample["__key__"].rsplit("_", 2)
            label = int(sample["cls"])
            if int(index) < CIFAR10_LT_100[label]:
                (folder / f"{label:02d}_{name}").mkdir(exist_ok=True)
                (folder / f"{label:02d}_{name}" / f"{index}.jpg").write_bytes(sample["jpg"])
        return
    rng = np.random.default_rng(0)
    for label, n in enumerate(c // 4 for c in CIFAR10_LT_100):
        (folder / f"{label:02d}").mkdir()
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            (folder / f"{label:02d}" / f"{i}.jpg").write_bytes(buf.getvalue())


def images_per_second(make_loader: Callable[[], DataLoader]) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(len(y) for _, y in make_loader())
    return n, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=0, help="loader workers (0: in-process, least noisy)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2048, help="images per loader per round")
    args = parser.parse_args()
    console = Console()
    transform = create_transform(args.img_size, is_training=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_dir = Path(tmp, "folder"), Path(tmp, "shards")
        folder.mkdir()
        make_folder(folder)
        records, names = records_from_folder(folder)
        write_shards(records, shard_dir, class_names=names, min_shards_per_group=max(1, args.workers),
                     num_workers=2, show_progress=False)
        n = len(records)
        bs, w = args.batch_size, args.workers

        def stream(mode: str) -> Callable[[], DataLoader]:
            ds = StreamingDataset(shard_dir, mode=mode, batch_size=bs, num_workers=w, transform=transform,
                                  samples_per_epoch=args.samples)
            return lambda: DataLoader(ds, batch_size=bs, num_workers=w)

        def shuffled(ds) -> Callable[[], DataLoader]:
            sampler = RandomSampler(ds, num_samples=args.samples)
            return lambda: DataLoader(ds, bs, sampler=sampler, num_workers=w, drop_last=True)

        folder_ds = create_dataset("", root=str(folder), is_training=True, transform=transform)
        wids_ds = ShardIndexDataset(shard_dir, transform=transform)
        loaders = {
            "stream, plain (instance)": stream("instance"),
            "stream, class-aware (balanced)": stream("balanced"),
            "stream, class-aware (sqrt)": stream("sqrt"),
            "ImageFolder, shuffled": shuffled(folder_ds),
            "wids random access, shuffled": shuffled(wids_ds),
        }
        results: dict[str, list[float]] = {k: [] for k in loaders}
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, make in loaders.items():
                counts[name], rate = images_per_second(make)
                results[name].append(rate)
    plain = statistics.median(results["stream, plain (instance)"])
    table = Table(title=f"{n}-image LT set, {args.img_size}px train transform, batch {bs}, {w} workers, "
                        f"median of {args.rounds} rounds")
    for col in ("loader", "images/round", "images/s", "vs plain stream"):
        table.add_column(col, justify="left" if col == "loader" else "right")
    for name, rates in results.items():
        rate = statistics.median(rates)
        table.add_row(name, str(counts[name]), f"{rate:,.0f}", f"{rate / plain:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
