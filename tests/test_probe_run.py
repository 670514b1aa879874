"""tools/probe_run.py: per-class fit on the training images and BN statistics re-estimated at the final weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ltsam.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("probe_run", ROOT / "tools" / "probe_run.py")
probe_run = importlib.util.module_from_spec(_spec)
sys.modules["probe_run"] = probe_run
_spec.loader.exec_module(probe_run)


def test_recalibrate_averages_the_batches_statistics():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5.0
    loader = DataLoader(TensorDataset(x, torch.zeros(32)), batch_size=8)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(100.0)  # stale statistics that must not survive
    assert probe_run.recalibrate(model, loader) == 1
    with torch.no_grad():
        features = model[0](x)
    batch_vars = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in features.split(8)])
    assert torch.allclose(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[1].running_var, batch_vars.mean(0), atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_probe_reproduces_the_runs_report_and_counts_its_training_images(tmp_path, capsys):
    flags = ["--n-max", "60", "-b", "32", "--epochs", "2", "--no-progress", "--seed", "3", "--opt", "sam"]
    assert train_main([*flags, "--output", str(tmp_path), "--experiment", "run"]) == 0
    folder = tmp_path / "run"
    reports = probe_run.probe(folder)
    report = json.loads((folder / "results.json").read_text())
    # the rebuilt model and data give exactly the trainer's own final evaluation
    assert reports["test"]["per_class_acc"] == report["per_class_acc"]
    # the training images are the run's own: their per-class totals are its class counts
    assert reports["train"]["per_class_total"] == report["class_counts"]
    assert len(reports["test_bn"]["per_class_acc"]) == len(report["class_counts"])
    assert probe_run.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "Per-class accuracy" in out and f"{tmp_path.name}/run" in out
    assert probe_run.main([str(tmp_path / "missing")]) == 2
    assert "no last.pth.tar in" in capsys.readouterr().out


def test_short_names_stay_unique():
    runs = [Path("r/long/sgd_ce/seed0"), Path("r/short/sgd_ce/seed0"), Path("r/short/sam_ce/seed1")]
    assert probe_run.short_names(runs) == ["long/sgd_ce/seed0", "short/sgd_ce/seed0", "short/sam_ce/seed1"]
    assert probe_run.short_names(runs[1:]) == ["sgd_ce/seed0", "sam_ce/seed1"]
