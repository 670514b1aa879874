"""Data for the trainer: long-tailed sets, transforms from timm's data config, rank-sharded loaders, counts.

Training batches come from a sampler (or a shard stream) that reseeds from (seed, epoch) in ``set_epoch``,
never from the global RNG, so a resumed run draws exactly the batches an uninterrupted one would.

Shards written by ``ltsam shards write`` train in two ways: ``--dataset shards`` streams them (``--sampler``
sqrt / balanced / progressive re-balance inside the stream) and ``--dataset shards-wids`` reads them by index
through ``wids``, so every map-style sampler applies exactly. Evaluation reads by index in both: each image once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from torchvision import transforms as T

from ltsam.counts import load_class_counts, save_class_counts
from ltsam.data.factory import create_lt_dataset
from ltsam.data.samplers import create_sampler
from ltsam.data.shards import INFO_NAME
from ltsam.data.stream import StreamingDataset
from ltsam.data.wids_access import ShardIndexDataset
from ltsam_common.train_args import option

COUNTS_FILE = "class_counts.json"
SHARD_DATASETS = ("shards", "shards-wids")


def create_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """Train and evaluation splits without transforms (set later, once the model's data config is known)."""
    if args.dataset in SHARD_DATASETS:
        return shard_datasets(args)
    train_kw, val_kw = list_files(args)
    common = dict(root=args.data_dir, imb_factor=args.imb_factor, n_max=args.n_max)
    try:
        train = create_lt_dataset(args.dataset, split=args.train_split, **common, **train_kw)
        # the same profile, so the (balanced) evaluation set carries the training counts for Many/Medium/Few
        val = create_lt_dataset(args.dataset, split=args.val_split, **common, **val_kw)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"ltsam train: data set '{args.dataset}': {err}") from err
    return train, val


def list_files(args: argparse.Namespace) -> tuple[dict, dict]:
    """``--dataset list``: the list files of each split (``path label`` lines, class counts from the training
    list); image paths are relative to ``--data-dir``, by default the training list's folder."""
    given = [flag for flag, value in (("--train-list", args.train_list), ("--val-list", args.val_list)) if value]
    if args.dataset != "list":
        if given:
            raise SystemExit(f"ltsam train: {given[0]} applies to --dataset list, not --dataset {args.dataset}")
        return {}, {}
    if len(given) < 2:
        raise SystemExit("ltsam train: --dataset list needs --train-list and --val-list, files of "
                         "'relative/path label' lines (paths relative to --data-dir)")
    if args.data_dir is None:
        args.data_dir = str(Path(args.train_list).parent)
    return {"list_file": args.train_list}, {"list_file": args.val_list, "train_list": args.train_list}


def shard_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """The training split streamed (``shards``) or indexed (``shards-wids``); the evaluation split indexed."""
    where = f"ltsam train: data set '{args.dataset}'"
    if args.data_dir is None:
        raise SystemExit(f"{where} needs --data-dir, the folder written by `ltsam shards write`")
    if args.imb_factor is not None or args.n_max is not None:
        raise SystemExit(f"{where}: shards are long-tailed as written; --imb-factor and --n-max do not apply")
    if args.dataset == "shards" and args.sampler == "repeat":
        raise SystemExit(f"{where}: the stream re-balances with --sampler sqrt, balanced or progressive; "
                         "repeat-factor sampling needs random access: use --dataset shards-wids")
    check_shard_splits(args, where)
    try:
        val = ShardIndexDataset(args.data_dir, args.val_split)
        if args.dataset == "shards-wids":
            return ShardIndexDataset(args.data_dir, args.train_split), val
        mode = "instance" if args.sampler == "none" else args.sampler
        train = StreamingDataset(args.data_dir, args.train_split, mode=mode, batch_size=args.batch_size,
                                 num_workers=args.workers, rank=args.rank, world_size=args.world_size,
                                 num_epochs=args.epochs, seed=args.seed)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"{where} in '{args.data_dir}': {err}") from err
    return train, val


def check_shard_splits(args: argparse.Namespace, where: str) -> None:
    """Both splits were written: a missing one is named with the flag that picks it and the splits there are."""
    info = Path(args.data_dir) / INFO_NAME
    if not info.is_file():
        raise SystemExit(f"{where}: '{info}' not found; write shards there with `ltsam shards write --out "
                         f"{args.data_dir} ...`")
    written = sorted(json.loads(info.read_text()).get("splits", {}))
    for name, split in (("train-split", args.train_split), ("val-split", args.val_split)):
        if split not in written:
            choices = f"one of {', '.join(written)}" if written else "a split written there"
            raise SystemExit(f"{where} in '{args.data_dir}' has no split '{split}' (written: "
                             f"{', '.join(written) or 'none'}); pick {choices} with {option(name, 'NAME')}, or "
                             f"write it with `ltsam shards write --split {split} --out {args.data_dir} ...`")


def class_counts_for(args: argparse.Namespace, train: Dataset, output_dir: Path,
                     primary: bool) -> tuple[list[int], Path]:
    """Counts from ``--class-counts`` or the training set; the data set's are written to the output folder."""
    if args.class_counts:
        counts = load_class_counts(args.class_counts)
        if len(counts) != train.num_classes:
            raise SystemExit(f"ltsam train: --class-counts '{args.class_counts}' has {len(counts)} classes, the "
                             f"data set {train.num_classes}")
        return counts, Path(args.class_counts)
    path = output_dir / COUNTS_FILE
    if primary:
        save_class_counts(train.class_counts, path)
    return list(train.class_counts), path


def build_transforms(args: argparse.Namespace, model: nn.Module) -> tuple[dict, object, object]:
    """timm's data config of the model and flags, the training transform ``--train-aug`` names, and eval's."""
    config = resolve_data_config(vars(args), model=model)
    size = config["input_size"][-1]
    normalize = [T.ToTensor(), T.Normalize(config["mean"], config["std"])]
    if args.train_aug == "timm":
        train_tf = create_transform(**config, is_training=True)
        eval_tf = create_transform(**config, is_training=False)
        return config, train_tf, eval_tf
    resize = [T.Resize(size), T.CenterCrop(size)] if args.img_size is None or args.img_size > 64 else []
    eval_tf = T.Compose(resize + normalize)
    crop = [T.RandomCrop(size, padding=max(size // 8, 1))] if args.train_aug in ("crop", "crop-flip") else []
    flip = [T.RandomHorizontalFlip()] if args.train_aug == "crop-flip" else []
    return config, T.Compose(resize + crop + flip + normalize), eval_tf


def train_sampler(args: argparse.Namespace, dataset: Dataset, rank: int, world_size: int) -> Sampler:
    """Instance sampling shards a seeded permutation by rank; the re-balancing samplers come from ltsam.data."""
    if args.sampler == "none":
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                  drop_last=True)
    return create_sampler(args.sampler, dataset, epochs=args.epochs, seed=args.seed, num_replicas=world_size, rank=rank)


def create_loaders(args: argparse.Namespace, train: Dataset, val: Dataset, rank: int, world_size: int,
                   pin_memory: bool) -> tuple[DataLoader, DataLoader]:
    """Training batches from the sampler (a stream shards itself); evaluation shards by rank without padding,
    so no sample counts twice."""
    sampler = None if isinstance(train, IterableDataset) else train_sampler(args, train, rank, world_size)
    if sampler is not None and len(sampler) < args.batch_size:
        raise SystemExit(f"ltsam train: {len(sampler)} training samples per process are fewer than --batch-size "
                         f"{args.batch_size}; lower the batch size")
    # workers persist where their randomness cannot change a resumed run: the stream reseeds its workers from
    # (seed, epoch, rank, worker) every epoch, and evaluation draws nothing; a map-style training set's
    # workers are seeded by the loader at each epoch's start, which only fresh workers follow
    # workers that persist take their seed from a loader generator, not the global RNG, so the global RNG
    # advances alike whether the workers started in this attempt or in an earlier one (exact resume)
    persist = args.workers > 0
    persist_train = persist and isinstance(train, StreamingDataset)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                              pin_memory=pin_memory, drop_last=True, persistent_workers=persist_train,
                              generator=_own_generator(args.seed) if persist_train else None)
    return train_loader, eval_loader(args, val, rank, world_size, pin_memory, persist)


def eval_loader(args: argparse.Namespace, val: Dataset, rank: int, world_size: int, pin_memory: bool,
                persist: bool = False) -> DataLoader:
    """Evaluation batches: each rank its own share of the set, without padding."""
    return DataLoader(val, batch_size=args.validation_batch_size or 2 * args.batch_size,
                      sampler=range(rank, len(val), world_size), num_workers=args.workers, pin_memory=pin_memory,
                      persistent_workers=persist, generator=_own_generator(args.seed))


def _own_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def skipped_samples(*datasets: Dataset, gather: Callable[[dict], list[dict]] = lambda local: [local]) -> dict:
    """For results.json: the distinct samples the shard readers skipped as corrupt (training and evaluation
    sets), in all and by shard, united over the ranks ``gather`` collects (``distributed.all_gather``: every
    rank calls it), so a sample two ranks (or two epochs) skipped counts once; ``skip_events`` counts every skip.
    Empty for data sets that are not shards."""
    readers = [d for d in datasets if hasattr(d, "bad_samples")]
    if not readers:
        return {}
    local: dict = {"bad": {}, "events": sum(d.skip_events for d in readers)}
    for dataset in readers:
        for shard, positions in dataset.bad_samples().items():
            local["bad"].setdefault(shard, set()).update(positions)
    bad: dict[str, set[int]] = {}
    events = 0
    for rank in gather(local):
        events += rank["events"]
        for shard, positions in rank["bad"].items():
            bad.setdefault(shard, set()).update(positions)
    by_shard = {shard: len(positions) for shard, positions in sorted(bad.items())}
    return {"skipped_samples": sum(by_shard.values()), "skipped_by_shard": by_shard, "skip_events": events}


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed the epoch's order: the sampler's, or the stream's for a shard stream."""
    for source in (loader.sampler, loader.dataset):
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)

