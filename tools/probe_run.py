"""What did a finished run's model learn per class: did it fit its own training images, and does it depend on
where its BatchNorm statistics were gathered?

* **Fit.** Per-class accuracy on the run's training images (evaluation transform). A tail class the model does
  not fit on its training set is underfit: the SAM variants are meant to flatten the minimum of a *fitted*
  (memorised) tail, so a run whose tail is underfit does not test them.
* **BN statistics.** The official SAM-family code runs forwards at the perturbed weights w + eps in train mode,
  so a model's running mean/var mix statistics of perturbed networks (ltsam reproduces this by default,
  ``bn_mode='reference'``). The test accuracy is measured again after re-estimating the statistics at the
  final weights alone (one pass over the training set with its training augmentation, cumulative average).

    python tools/probe_run.py runs/cifar10_lt_small_cpu/{sgd_ce,ssesam_ce}/seed0
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from timm.models import create_model
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ltsam.metrics import LongTailAccuracy
from ltsam.train import data as train_data
from ltsam.train.loop import evaluate
from ltsam_common.train_args import parse_args

REPORTS = ("train", "test", "test_bn")  # training images; test images; test after BN re-estimation
LABELS = {"train": "train", "test": "test", "test_bn": "test, BN at w"}


def load_run(folder: Path) -> tuple[argparse.Namespace, nn.Module, Dataset, Dataset, tuple]:
    """The run's model with its last checkpoint, its two splits, and the (training, evaluation) transforms."""
    args = parse_args(["-c", str(folder / "args.yaml")])
    args.rank, args.world_size, args.workers = 0, 1, 0
    train_set, val_set = train_data.create_datasets(args)
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, **args.model_kwargs)
    _, train_tf, eval_tf = train_data.build_transforms(args, model)
    val_set.transform = eval_tf
    checkpoint = torch.load(folder / "last.pth.tar", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return args, model, train_set, val_set, (train_tf, eval_tf)


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


def probe(folder: Path) -> dict[str, dict]:
    """Long-tail reports (``ltsam.metrics``) of the run's model on its training images, on the evaluation
    set, and on the evaluation set once the BN statistics are re-estimated at the final weights."""
    args, model, train_set, val_set, (train_tf, eval_tf) = load_run(folder)
    meter = LongTailAccuracy(train_set.class_counts, (args.many_shot, args.few_shot))
    batch = args.validation_batch_size or 2 * args.batch_size

    def report(dataset: Dataset) -> dict:
        return evaluate(model, DataLoader(dataset, batch_size=batch), meter, False, nullcontext, torch.device("cpu"))

    train_set.transform = eval_tf
    reports = {"train": report(train_set), "test": report(val_set)}
    train_set.transform = train_tf
    recalibrate(model, DataLoader(train_set, batch_size=batch))
    reports["test_bn"] = report(val_set)
    return reports


def short_names(folders: list[Path]) -> list[str]:
    """Each folder relative to what they all share (at least ``method/seed``), so names stay unique."""
    paths = [f.resolve() for f in folders]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent.parent
    return [str(p.relative_to(min(common, p.parent.parent, key=lambda q: len(q.parts)))) for p in paths]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-class fit and BN-statistics probe of finished runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (args.yaml + last.pth.tar)")
    args = parser.parse_args(argv)
    console = Console()
    missing = [str(f) for f in args.runs if not (f / "last.pth.tar").is_file()]
    if missing:
        console.print(f"[red]no last.pth.tar in {', '.join(missing)}; pass finished runs' folders")
        return 2
    results = {name: probe(folder) for name, folder in zip(short_names(args.runs), args.runs)}

    groups = Table(title="Accuracy (%) on the training images, the test set, and the test set with BN "
                         "statistics re-estimated at the final weights")
    groups.add_column("run")
    groups.add_column("images")
    for column in ("All", "Many", "Medium", "Few"):
        groups.add_column(column, justify="right")
    for name, reports in results.items():
        for kind in REPORTS:
            r = reports[kind]
            groups.add_row(name if kind == "train" else "", LABELS[kind],
                           *(_pct(r[k]) for k in ("mean_class_acc", "many", "medium", "few")),
                           end_section=kind == REPORTS[-1])
    per_class = Table(title="Per-class accuracy (%): train / test / test with BN at w")
    per_class.add_column("class")
    per_class.add_column("train n", justify="right")
    for i in range(len(results)):
        per_class.add_column(f"run {i + 1}", justify="right")
    counts = next(iter(results.values()))["train"]["class_counts"]
    for c, n in enumerate(counts):
        per_class.add_row(str(c), str(n), *("/".join(f"{100 * reports[k]['per_class_acc'][c]:.0f}" for k in REPORTS)
                                            for reports in results.values()))
    console.print(groups)
    console.print(per_class)
    console.print("\n".join(f"run {i + 1}: {name}" for i, name in enumerate(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
