"""Long-tail accuracy the way papers report it: All, Many / Medium / Few shot, per class; JSON, plot, table.

Shot groups are defined by TRAINING counts: many ``n > many``, few ``n < few``, medium otherwise (defaults
100 / 20, as ImageNet-LT and CIFAR-100-LT papers; ``"cifar10"`` = 1000 / 200). A group's accuracy is the mean
of its classes' accuracies; "All" is reported both as top-1 over samples and as mean per-class accuracy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ltsam.counts import CountsLike, load_class_counts

SHOT_THRESHOLDS: dict[str, tuple[int, int]] = {"default": (100, 20), "cifar10": (1000, 200)}
GROUPS = ("many", "medium", "few")
GROUP_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}

Thresholds = str | tuple[int, int]


def shot_groups(class_counts: Sequence[int], thresholds: Thresholds = "default") -> list[str]:
    """``many`` / ``medium`` / ``few`` for each class from its training count."""
    if isinstance(thresholds, str):
        if thresholds not in SHOT_THRESHOLDS:
            raise ValueError(
                f"unknown shot thresholds {thresholds!r}; named ones: {', '.join(SHOT_THRESHOLDS)}"
            )
        thresholds = SHOT_THRESHOLDS[thresholds]
    many, few = thresholds
    if few > many:
        raise ValueError(f"thresholds (many={many}, few={few}) need few <= many")
    return ["many" if n > many else "few" if n < few else "medium" for n in class_counts]


def _nanmean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def long_tail_accuracy(
    correct: Sequence[float],
    total: Sequence[float],
    class_counts: Sequence[int],
    thresholds: Thresholds = "default",
) -> dict:
    """Report from per-class correct and total test counts; classes without test samples are left out."""
    correct, total = np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(total > 0, correct / total, np.nan)
    groups = shot_groups(class_counts, thresholds)
    report = {
        "top1": float(correct.sum() / total.sum()) if total.sum() else None,
        "mean_class_acc": _nanmean(per_class),
    }
    for g in GROUPS:
        members = np.array([grp == g for grp in groups])
        report[g] = _nanmean(per_class[members])
        report[f"num_{g}"] = int(members.sum())
    report.update(
        num_samples=int(total.sum()),
        per_class_acc=[None if math.isnan(a) else float(a) for a in per_class],
        per_class_total=[int(t) for t in total],
        class_counts=[int(n) for n in class_counts],
        groups=groups,
    )
    return report


class LongTailAccuracy:
    """Accumulate per-class correct / total over batches; ``compute`` all-reduces them across DDP ranks.

    Sums (not per-rank means) are reduced, so ranks with uneven numbers of samples combine exactly. Call
    ``compute`` on every rank when a process group is initialised (it is a collective).
    """

    def __init__(self, class_counts: CountsLike, thresholds: Thresholds = "default") -> None:
        self.class_counts = load_class_counts(class_counts)
        self.thresholds = thresholds
        shot_groups(self.class_counts, thresholds)  # validates the thresholds now
        self.reset()

    def reset(self) -> None:
        num_classes = len(self.class_counts)
        self.correct = torch.zeros(num_classes, dtype=torch.float64)
        self.total = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        num_classes = len(self.class_counts)
        targets = targets.detach().long().cpu()
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(
                f"targets must lie in [0, {num_classes}), got [{targets.min()}, {targets.max()}]"
            )
        hit = (logits.detach().argmax(dim=1).cpu() == targets).double()
        self.correct += torch.bincount(targets, weights=hit, minlength=num_classes)
        self.total += torch.bincount(targets, minlength=num_classes).double()

    def compute(self) -> dict:
        sums = torch.stack([self.correct, self.total])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            sums = sums.to(backend_device)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            sums = sums.cpu()
        return long_tail_accuracy(sums[0].numpy(), sums[1].numpy(), self.class_counts, self.thresholds)


def save_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as JSON (None for classes or groups without test samples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def plot_per_class(report: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Per-class accuracy bars (classes sorted by training count, coloured by shot group) and the training
    count as a line on a log secondary axis: where the tail loses accuracy, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    counts = np.asarray(report["class_counts"])
    order = np.argsort(-counts, kind="stable")
    acc = np.array([np.nan if a is None else 100 * a for a in report["per_class_acc"]])[order]
    colors = [GROUP_COLORS[report["groups"][i]] for i in order]
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.12 * len(counts) + 4)), 4), dpi=120)
    ax.bar(np.arange(len(order)), np.nan_to_num(acc), color=colors, width=1.0 if len(order) > 50 else 0.8)
    ax.set_xlabel("class, sorted by training count")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    twin = ax.twinx()
    twin.plot(np.arange(len(order)), counts[order], color="black", linewidth=1.5)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    handles = [
        Patch(color=GROUP_COLORS[g], label=f"{g} ({_pct(report[g])})") for g in GROUPS if report[f"num_{g}"]
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title or f"top-1 {_pct(report['top1'])}, mean per-class {_pct(report['mean_class_acc'])}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def results_table(reports: dict[str, dict] | dict, title: str = "Long-tail accuracy (%)"):
    """A rich Table with All (top-1), All (mean per class), Many, Medium, Few; one row per named report."""
    from rich.table import Table

    if "top1" in reports:
        reports = {"": reports}
    table = Table(title=title)
    table.add_column("run")
    for head in ("All", "All (class mean)", "Many", "Medium", "Few"):
        table.add_column(head, justify="right")
    for name, r in reports.items():
        shots = [f"{_pct(r[g])} ({r[f'num_{g}']})" for g in GROUPS]
        table.add_row(name, _pct(r["top1"]), _pct(r["mean_class_acc"]), *shots)
    return table
