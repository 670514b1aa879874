"""Many / Medium / Few accuracy, its DDP reduction (2 gloo processes, uneven shares), JSON, plot and table."""

from __future__ import annotations

import json

import numpy as np
import processes
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CLASS_COUNTS
from PIL import Image
from rich.console import Console

from ltsam.metrics import LongTailAccuracy, plot_per_class, results_table, save_report, shot_groups

SPLIT = 37  # rank 0 scores the first 37 samples, rank 1 the other 63: uneven shares and last batches


def _data(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(CLASS_COUNTS), generator=gen), torch.randint(
        0, len(CLASS_COUNTS), (n,), generator=gen
    )


def _score(logits: torch.Tensor, targets: torch.Tensor, batch: int = 8) -> dict:
    meter = LongTailAccuracy(CLASS_COUNTS)
    for i in range(0, len(targets), batch):
        meter.update(logits[i : i + batch], targets[i : i + batch])
    return meter.compute()


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    logits, targets = _data()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    report = _score(logits[part], targets[part])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def test_shot_groups_thresholds():
    assert (
        shot_groups(CLASS_COUNTS) == ["many"] * 3 + ["medium"] * 3 + ["few"] * 4
    )  # 500..180 | 100..36 | 19..4
    assert shot_groups([1001, 1000, 200, 199], "cifar10") == ["many", "medium", "medium", "few"]
    assert shot_groups([50, 10], (40, 10)) == ["many", "medium"]
    with pytest.raises(ValueError, match="unknown shot thresholds 'imagenet'; named ones: default, cifar10"):
        shot_groups([1], "imagenet")


def test_accuracy_against_explicit_computation():
    logits, targets = _data()
    report = _score(logits, targets)
    pred, y = logits.argmax(1).numpy(), targets.numpy()
    per_class = [float((pred[y == c] == c).mean()) for c in range(10)]
    assert report["top1"] == pytest.approx(float((pred == y).mean()))
    assert report["per_class_acc"] == pytest.approx(per_class)
    assert report["mean_class_acc"] == pytest.approx(np.mean(per_class))
    assert report["many"] == pytest.approx(np.mean(per_class[:3]))
    assert report["medium"] == pytest.approx(np.mean(per_class[3:6]))
    assert report["few"] == pytest.approx(np.mean(per_class[6:]))
    assert (report["num_many"], report["num_medium"], report["num_few"]) == (3, 3, 4)


def test_class_without_test_samples_and_bad_targets():
    meter = LongTailAccuracy([50, 5])
    meter.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    report = meter.compute()
    assert (
        report["per_class_acc"] == [0.5, None] and report["few"] is None and report["mean_class_acc"] == 0.5
    )
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        meter.update(torch.zeros(1, 2), torch.tensor([2]))


def test_ddp_reduction_matches_single_process(tmp_path):
    out = tmp_path / "ddp.json"
    # fork: the children inherit the imported modules instead of re-importing torch and timm (seconds each)
    processes.join(mp.start_processes(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=False,
                                      start_method="fork"))
    distributed = json.loads(out.read_text())
    single = _score(*_data())
    assert distributed["per_class_total"] == single["per_class_total"] and distributed["num_samples"] == 100
    for key in ("top1", "mean_class_acc", "many", "medium", "few"):
        assert distributed[key] == pytest.approx(single[key]), key
    assert distributed["per_class_acc"] == pytest.approx(single["per_class_acc"])


def test_json_plot_and_table(tmp_path):
    report = _score(*_data())
    saved = json.loads(save_report(report, tmp_path / "results.json").read_text())
    assert saved["few"] == pytest.approx(report["few"]) and saved["groups"][-1] == "few"
    png = plot_per_class(report, tmp_path / "per_class.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 400
    console = Console(record=True, width=120)
    console.print(results_table({"sgd": report}))
    text = console.export_text()
    assert "Medium" in text and f"{100 * report['few']:.2f} (4)" in text
