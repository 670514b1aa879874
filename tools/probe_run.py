"""Does a finished run's accuracy depend on where its BatchNorm statistics were gathered?

The official SAM-family code runs forwards at the perturbed weights w + eps in train mode, so the running
mean/var a model is evaluated with mix statistics of perturbed networks (ltsam reproduces this by default,
``bn_mode='reference'``). This tool re-estimates the statistics at the final weights w alone (one pass over
the training set with its training augmentation, cumulative average) and evaluates the run's model before and
after, per class. A large gap means the perturbed-weight statistics, not the weights, cost the accuracy.

    python tools/probe_bn.py runs/cifar10_lt_small_cpu/{sgd_ce,ssesam_ce}/seed0
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from timm.models import create_model
from torch import nn
from torch.utils.data import DataLoader

from ltsam.metrics import LongTailAccuracy
from ltsam.train import data as train_data
from ltsam.train.args import parse_args
from ltsam.train.loop import evaluate


def load_run(folder: Path) -> tuple[argparse.Namespace, nn.Module, DataLoader, DataLoader, list[int]]:
    """The run's model with its last checkpoint, its training loader (training augmentation) and eval loader."""
    args = parse_args(["-c", str(folder / "args.yaml")])
    args.rank, args.world_size, args.workers = 0, 1, 0
    train_set, val_set = train_data.create_datasets(args)
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, **args.model_kwargs)
    _, train_set.transform, val_set.transform = train_data.build_transforms(args, model)
    checkpoint = torch.load(folder / "last.pth.tar", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    batch = args.validation_batch_size or 2 * args.batch_size
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=batch, shuffle=False)
    return args, model, train_loader, val_loader, list(train_set.class_counts)


@torch.no_grad()
def recalibrate(model: nn.Module, loader: DataLoader) -> int:
    """Replace every BatchNorm's running statistics by their average over ``loader`` at the current weights;
    returns how many layers were reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for x, _ in loader:
        model(x)
    return len(norms)


def probe(folder: Path) -> tuple[dict, dict]:
    """The run's long-tail report with its own BN statistics, and with statistics re-estimated at w."""
    run_args, model, train_loader, val_loader, counts = load_run(folder)
    meter = LongTailAccuracy(counts, (run_args.many_shot, run_args.few_shot))
    before = evaluate(model, val_loader, meter, False, nullcontext, torch.device("cpu"))
    recalibrate(model, train_loader)
    return before, evaluate(model, val_loader, meter, False, nullcontext, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (args.yaml + last.pth.tar)")
    args = parser.parse_args(argv)
    console = Console()
    missing = [str(f) for f in args.runs if not (f / "last.pth.tar").is_file()]
    if missing:
        console.print(f"[red]no last.pth.tar in {', '.join(missing)}; pass finished runs' folders")
        return 2
    results: dict[str, tuple[dict, dict]] = {}
    for folder in args.runs:
        results[f"{folder.parent.name}/{folder.name}"] = probe(folder)

    def change(a: float | None, b: float | None) -> str:
        return "-" if a is None else f"{100 * a:.1f} -> {100 * b:.1f}"

    groups = Table(title="Accuracy (%): the run's BN statistics -> re-estimated at the final weights")
    for column in ("run", "All", "Many", "Medium", "Few"):
        groups.add_column(column, justify="left" if column == "run" else "right")
    for name, (before, after) in results.items():
        groups.add_row(name, *(change(before[k], after[k]) for k in ("mean_class_acc", "many", "medium", "few")))
    per_class = Table(title="Per-class accuracy (%), before -> after")
    per_class.add_column("class")
    per_class.add_column("train n", justify="right")
    for i in range(len(results)):
        per_class.add_column(f"run {i + 1}", justify="right")
    first = next(iter(results.values()))[0]
    for c, n in enumerate(first["class_counts"]):
        per_class.add_row(str(c), str(n), *(change(b["per_class_acc"][c], a["per_class_acc"][c])
                                            for b, a in results.values()))
    console.print(groups)
    console.print(per_class)
    console.print("\n".join(f"run {i + 1}: {name}" for i, name in enumerate(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
