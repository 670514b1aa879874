"""Plain vs class-aware streaming of any shard folder: speed, memory, class shares and images ever drawn.

One run prints, side by side for the plain stream (instance), the class-aware streams (balanced, sqrt), an A/A
control (plain again) and wids random access:

* images/s and images per CPU-second (decode and the training transform included; CPU of the rank's process
  and its loader workers), and the ratio to plain measured in the same round: median (min-max) over rounds;
* peak resident memory of the rank's process and of its largest loader worker;
* for the streams, over ``--epochs`` epochs of all ``--ranks x --workers`` readers (undecoded: exactly the
  samples training would decode): total-variation distance of the realised class and bucket shares from the
  target, and per log2 bucket the share of its images ever drawn against what independent draws at the same
  class frequencies give.

Each loader/round runs in a fresh process (rank 0 of ``--ranks``), so peak memory belongs to it alone.
Without a folder, CIFAR-10-LT (imbalance 100) cut from ../shared/data/cifar10 is written to a temporary one,
else a generated long-tailed set. ``tools/make_lt_shards.py`` writes iNat- or ImageNet-LT-shaped sets.

    python tools/bench_stream.py [SHARDS] [--ranks 2] [--workers 2] [--epochs 20] [--samples 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.table import Table

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
MODES = ("instance", "balanced", "sqrt")
LOADERS = {  # row name: what the child process runs
    "stream, plain (instance)": "instance",
    "stream, plain again (A/A control)": "instance",
    "stream, class-aware (balanced)": "balanced",
    "stream, class-aware (sqrt)": "sqrt",
    "wids random access, shuffled": "wids",
}
PLAIN = "stream, plain (instance)"


def write_default_set(out: Path) -> None:
    """CIFAR-10-LT (first n_c images of class c) from the shared shards, else generated 32x32 JPEGs."""
    from ltsam.data.lt import lt_profile
    from ltsam.data.shards import write_shards

    counts = lt_profile(10, 5000, 100)
    records = []
    if (CIFAR / "cifar10.json").is_file():
        shards = sorted(str(p) for p in CIFAR.glob("cifar10-train-*.tar"))
        for sample in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()):
            _, name, index = sample["__key__"].rsplit("_", 2)
            if int(index) < counts[int(sample["cls"])]:
                records.append((sample["__key__"], sample["jpg"], int(sample["cls"])))
    else:
        rng = np.random.default_rng(0)
        for label, n in enumerate(c // 4 for c in counts):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                records.append((f"{label}_{i}", buf.getvalue(), label))
    write_shards(records, out, min_shards_per_group=4, num_workers=2, show_progress=False)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(args: argparse.Namespace) -> None:
    """One loader, one pass of ``--samples`` images for rank 0: prints images, seconds, CPU-s and peak MiB."""
    from timm.data import create_transform
    from torch.utils.data import DataLoader, RandomSampler

    from ltsam.data.stream import StreamingDataset
    from ltsam.data.wids_access import ShardIndexDataset

    transform = create_transform(args.img_size, is_training=True)
    bs, w = args.batch_size, args.workers
    wall, cpu = time.perf_counter(), cpu_seconds()
    if args.child == "wids":
        ds = ShardIndexDataset(args.shards, transform=transform)
        loader = DataLoader(ds, bs, sampler=RandomSampler(ds, num_samples=args.samples), num_workers=w, drop_last=True)
    else:
        ds = StreamingDataset(args.shards, mode=args.child, batch_size=bs, num_workers=w, rank=0,
                              world_size=args.ranks, transform=transform, samples_per_epoch=args.samples * args.ranks)
        loader = DataLoader(ds, batch_size=bs, num_workers=w)
    images = sum(len(y) for _, y in loader)
    del loader  # joins the workers, so their CPU time and peak memory are counted
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"images": images, "wall": wall, "cpu": cpu, "rank_mib": own.ru_maxrss / 1024,
                      "worker_mib": kids.ru_maxrss / 1024}))


def measure(args: argparse.Namespace, mode: str) -> dict:
    argv = [sys.executable, __file__, str(args.shards), "--child", mode, "--ranks", str(args.ranks),
            "--workers", str(args.workers), "--samples", str(args.samples), "--batch-size", str(args.batch_size),
            "--img-size", str(args.img_size)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def draw_statistics(args: argparse.Namespace, mode: str):
    """Every reader's undecoded draws over ``--epochs`` epochs: (DrawCounts, class TV, bucket TV)."""
    import itertools

    from ltsam.data.balance import class_probabilities
    from ltsam.data.stream import DrawCounts, StreamingDataset

    readers = args.ranks * max(1, args.workers)

    def draws():
        for reader in range(readers):  # reader g = rank * workers + worker: simulated as rank g of `readers`
            ds = StreamingDataset(args.shards, mode=mode, batch_size=args.batch_size, rank=reader,
                                  world_size=readers)
            for epoch in range(args.epochs):
                ds.set_epoch(epoch)
                samples = ds._instance_samples(reader) if mode == "instance" else iter(ds.source)
                yield from itertools.islice(samples, ds.quota)

    layout = StreamingDataset(args.shards, batch_size=args.batch_size).layout
    counts = DrawCounts.of(layout, draws())
    target = class_probabilities(layout.class_counts, mode)
    realised = counts.class_draws / counts.class_draws.sum()
    nbc = layout.bucket_class_counts()
    n = np.maximum(1, np.asarray(layout.class_counts, dtype=np.float64))
    bucket_target = np.array([(target * nbc[b] / n).sum() for b in sorted(nbc)])
    bucket_realised = np.array([(realised * nbc[b] / n).sum() for b in sorted(nbc)])
    tv = 0.5 * float(np.abs(realised - target).sum())
    return layout, counts, tv, 0.5 * float(np.abs(bucket_realised - bucket_target).sum())


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """Median and range: the range says how far apart a difference must be before it means anything."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(args: argparse.Namespace, console: Console) -> None:
    runs: dict[str, list[dict]] = {name: [] for name in LOADERS}
    names = list(LOADERS)
    for r in range(args.rounds):  # round-robin, one loader later each round: none always runs first
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(measure(args, LOADERS[name]))
    stats = {mode: draw_statistics(args, mode) for mode in MODES}
    layout = stats["instance"][0]
    if args.rounds:
        speed_table(args, console, layout, runs, stats)
    coverage_table(args, console, layout, stats)


def speed_table(args: argparse.Namespace, console: Console, layout, runs: dict, stats: dict) -> None:
    title = (f"{args.shards.name}: {layout.num_samples:,} images, {len(layout.class_counts):,} classes, "
             f"{len(layout.urls)} shards; rank 0 of {args.ranks} x {args.workers} workers, {args.img_size}px train "
             f"transform, {args.rounds} rounds of {args.samples} images: median (min-max)")
    table = Table(title=title)
    for col in ("loader", "images/s", "images per CPU-s", "vs plain, CPU", "peak MiB rank", "peak MiB worker",
                f"class TV ({args.epochs} ep)", "bucket TV"):
        table.add_column(col, justify="left" if col == "loader" else "right")
    for name, mode in LOADERS.items():
        rate = [x["images"] / x["wall"] for x in runs[name]]
        cpu = [x["images"] / x["cpu"] for x in runs[name]]
        ratio = [a / (b["images"] / b["cpu"]) for a, b in zip(cpu, runs[PLAIN])]
        tvs = ("", "") if mode not in stats or "again" in name else (f"{stats[mode][2]:.4f}", f"{stats[mode][3]:.4f}")
        table.add_row(name, spread(rate), spread(cpu), spread(ratio, "{:.2f}x"),
                      f"{max(x['rank_mib'] for x in runs[name]):,.0f}",
                      f"{max(x['worker_mib'] for x in runs[name]):,.0f}" if args.workers else "-", *tvs)
    console.print(table)
    console.print("The A/A row reads the plain stream twice: its range is the noise floor of a ratio.")


def coverage_table(args: argparse.Namespace, console: Console, layout, stats: dict) -> None:
    from ltsam.data.stream import bucket_coverage

    coverage = {mode: bucket_coverage(layout, stats[mode][1]) for mode in MODES}
    sizes, nbc = layout.bucket_sizes(), layout.bucket_class_counts()
    table = Table(title=f"share of each bucket's images ever drawn over {args.epochs} epochs by all "
                        f"{args.ranks * max(1, args.workers)} readers: drawn / independent draws (ratio)")
    table.add_column("bucket (images per class)", justify="left")
    table.add_column("classes", justify="right")
    table.add_column("images", justify="right")
    for mode in MODES:
        table.add_column(mode, justify="right")
    worst = {mode: 1.0 for mode in MODES}
    for b in sorted(sizes):
        cells = []
        for mode in MODES:
            share, independent = coverage[mode][b]
            worst[mode] = min(worst[mode], share / independent if independent else 1.0)
            cells.append(f"{share:.3f} / {independent:.3f} ({share / max(independent, 1e-12):.2f}x)")
        low, high = (2 ** (b - 1) + 1 if b > 0 else 1), 2**b
        table.add_row(f"{low}-{high}", str(int((nbc[b] > 0).sum())), f"{sizes[b]:,}", *cells)
    console.print(table)
    console.print("class / bucket total-variation distance from the target over all draws: "
                  + ", ".join(f"{m} {stats[m][2]:.4f} / {stats[m][3]:.4f}" for m in MODES))
    console.print("worst bucket, drawn / independent: " + ", ".join(f"{m} {worst[m]:.2f}x" for m in MODES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shards", nargs="?", type=Path, help="a folder written by ltsam.data.shards")
    parser.add_argument("--ranks", type=int, default=2, help="ranks simulated (rank 0 is measured)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--epochs", type=int, default=20, help="epochs over which images ever drawn are counted")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="0: class shares and images ever drawn only")
    parser.add_argument("--samples", type=int, default=4096, help="images per loader per round (rank 0)")
    parser.add_argument("--child", choices=(*MODES, "wids"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    console = Console(width=160)
    if args.shards is not None:
        return report(args, console)
    with tempfile.TemporaryDirectory() as tmp:
        args.shards = Path(tmp, "cifar10_lt")
        write_default_set(args.shards)
        report(args, console)


if __name__ == "__main__":
    main()
