"""Images per second, decode and augmentation included, of plain vs class-aware streaming vs ImageFolder.

Default data: CIFAR-10-LT (imbalance 100, 12,406 JPEGs) cut from ../shared/data/cifar10 when present, else a
generated long-tailed set of 32x32 JPEGs. The same image bytes are written once as an ImageFolder and once as
log2-bucketed shards; each loader then reads ``--samples`` images (worker start included) per round, the
loaders taking turns round-robin in one process. Reported per loader: median and range of images/s (wall
and CPU), and of its ratio to the plain stream measured in the same round; an A/A row (the plain stream
again) shows how large a ratio's noise is on this machine.

    python tools/bench_stream.py [--workers 0] [--rounds 9] [--samples 2048] [--img-size 32]
"""

from __future__ import annotations

import argparse
import io
import resource
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

from ltsam.data.files import read_image_folder
from ltsam.data.lt import lt_profile
from ltsam.data.shards import records_from_samples, write_shards
from ltsam.data.stream import StreamingDataset
from ltsam.data.wids_access import ShardIndexDataset

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
PLAIN = "stream, plain (instance)"
CIFAR10_LT_100 = lt_profile(10, 5000, 100)


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


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the loader workers): less exposed than wall time to
    other jobs on a shared machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(make_loader: Callable[[], DataLoader]) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one pass over a fresh loader, worker start included."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = sum(len(y) for _, y in make_loader())
    return n, time.perf_counter() - wall, cpu_seconds() - cpu


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """Median and range: the range says how far apart a difference must be before it means anything."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=0, help="loader workers (0: in-process, least noisy)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--samples", type=int, default=2048, help="images per loader per round")
    args = parser.parse_args()
    console = Console(width=132)
    transform = create_transform(args.img_size, is_training=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_dir = Path(tmp, "folder"), Path(tmp, "shards")
        folder.mkdir()
        make_folder(folder)
        samples, names = read_image_folder(folder)
        write_shards(records_from_samples(samples), shard_dir, class_names=names,
                     min_shards_per_group=max(1, args.workers), num_workers=2, show_progress=False)
        n = len(samples)
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
            PLAIN: stream("instance"),
            "stream, plain again (A/A control)": stream("instance"),
            "stream, class-aware (balanced)": stream("balanced"),
            "stream, class-aware (sqrt)": stream("sqrt"),
            "ImageFolder, shuffled": shuffled(folder_ds),
            "wids random access, shuffled": shuffled(wids_ds),
        }
        names_in_order = list(loaders)
        wall: dict[str, list[float]] = {k: [] for k in loaders}
        cpu: dict[str, list[float]] = {k: [] for k in loaders}
        counts: dict[str, int] = {}
        for r in range(args.rounds):
            # round-robin, starting one loader later each round, so no loader always runs first or after another
            for name in names_in_order[r % len(loaders) :] + names_in_order[: r % len(loaders)]:
                counts[name], seconds, cpu_s = measure(loaders[name])
                wall[name].append(counts[name] / seconds)
                cpu[name].append(counts[name] / cpu_s)
    table = Table(title=f"{n}-image LT set, {args.img_size}px train transform, batch {bs}, {w} workers, "
                        f"{args.rounds} interleaved rounds of {args.samples} images: median (min-max)")
    for col in ("loader", "images/s", "images per CPU-s", "vs plain, paired per round", "vs plain, CPU"):
        table.add_column(col, justify="left" if col == "loader" else "right")
    for name in loaders:
        ratio = [a / b for a, b in zip(wall[name], wall[PLAIN])]
        cpu_ratio = [a / b for a, b in zip(cpu[name], cpu[PLAIN])]
        table.add_row(name, spread(wall[name]), spread(cpu[name]), spread(ratio, "{:.2f}x"),
                      spread(cpu_ratio, "{:.2f}x"))
    console.print(table)
    console.print("The A/A row reads the same loader twice: its range is the noise floor of a ratio.")


if __name__ == "__main__":
    main()
