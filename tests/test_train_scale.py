"""``ltsam train`` at scale: exact gradient accumulation, --sync-bn, and --dataset list with its list files."""

from __future__ import annotations

import json

import numpy as np
import processes
import pytest
import torch
from PIL import Image

from ltsam.train import main as train_main

# 203 digits (n_max 60): 6 batches of 32 an epoch; test_vit at 8 px with 4 px patches has only LayerNorm, so
# 2 micro-batches of 16 must give the update of one batch of 32 (up to float summation order)
VIT = ["--model", "test_vit", "--model-kwargs", "img_size=8", "patch_size=4", "--mean", "0.5", "--std", "0.5",
       "--n-max", "60", "--epochs", "2",
       "--no-progress", "--seed", "3", "--lr", "0.05", "--eval-interval", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, experiment: str, *flags: str) -> dict:
    assert train_main([*VIT, "--output", str(out), "--experiment", experiment, *flags]) == 0
    return torch.load(out / experiment / "last.pth.tar", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["num_updates"] == b["num_updates"]
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("opt, extra", [
    ("momentum", ["--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5", "--sched-on-updates",
                  "--warmup-epochs", "1", "--warmup-lr", "0.001"]),
    ("sam", ["--opt-kwargs", "rho=0.05", "base=momentum", "--epochs", "1", "--eval-interval", "1"]),
    ("imbsam", ["--eta", "20", "--opt-kwargs", "base=momentum", "--epochs", "1", "--eval-interval", "1"]),
    ("ssesam", ["--eta", "20", "--opt-kwargs", "gamma=0.5", "base=momentum"]),  # stage 1, then stage 2
    ("focalsam", ["--opt-kwargs", "base=momentum", "--epochs", "1", "--eval-interval", "1"]),
])
def test_accumulation_equals_the_whole_batch(tmp_path, opt, extra):
    """2 x 16 with --grad-accum-steps 2 ends with the weights, momentum and update count of batch 32; the
    per-update schedule (warm-up, steps) counts optimizer updates, not loader batches, as timm's does."""
    whole = run(tmp_path, "whole", "--opt", opt, "-b", "32", *extra)
    accumulated = run(tmp_path, "accum", "--opt", opt, "-b", "16", "--grad-accum-steps", "2", *extra)
    assert whole["num_updates"] == 6 * (1 if "--epochs" in extra else 2)
    assert_same_weights(whole, accumulated)
    for key, state in whole["optimizer"]["state"].items():
        torch.testing.assert_close(accumulated["optimizer"]["state"][key]["momentum_buffer"],
                                   state["momentum_buffer"], rtol=1e-4, atol=1e-6)
    rows = [(tmp_path / e / "summary.csv").read_text().splitlines() for e in ("whole", "accum")]
    assert [r.split(",")[-1] for r in rows[0]] == [r.split(",")[-1] for r in rows[1]]  # lr column per epoch


def test_accumulation_with_an_uneven_last_group(tmp_path):
    """6 batches of 32 with --grad-accum-steps 4: updates of 4 and 2 batches, 2 an epoch (timm's rule)."""
    ckpt = run(tmp_path, "uneven", "-b", "32", "--grad-accum-steps", "4", "--epochs", "1", "--eval-interval", "1")
    assert ckpt["num_updates"] == 2


def test_accumulation_refused_under_deepspeed(tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text("{}")
    with pytest.raises(SystemExit, match="--grad-accum-steps with --deepspeed-config is not supported"):
        train_main([*VIT, "--output", str(tmp_path), "--grad-accum-steps", "2", "--deepspeed-config", str(config)])


def test_sync_bn_with_one_process_is_plain_batchnorm(tmp_path):
    """One process: its batch is the global batch, so --sync-bn changes nothing (same recipe at any scale)."""
    flags = ["--model", "lt_cnn_small", "--model-kwargs", "width=8", "-b", "32", "--n-max", "60", "--epochs", "1",
             "--no-progress", "--seed", "1"]
    assert train_main([*flags, "--output", str(tmp_path), "--experiment", "plain"]) == 0
    assert train_main([*flags, "--output", str(tmp_path), "--experiment", "sync", "--sync-bn"]) == 0
    a, b = (torch.load(tmp_path / e / "last.pth.tar", weights_only=True) for e in ("plain", "sync"))
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def _list_dataset(root, counts=(6, 3, 2)) -> tuple:
    lines = []
    for label, n in enumerate(counts):
        for k in range(n):
            rel = f"images/c{label} {k}.png"  # a space in the path: the label is the last field
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * label + k, np.uint8)).save(root / rel)
            lines.append(f"{rel} {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("\n".join(lines[::2]) + "\n")
    return root / "train.txt", root / "val.txt"


LIST = ["--dataset", "list", "--model", "lt_cnn_small", "--model-kwargs", "width=8", "--img-size", "8", "-b", "4",
        "--epochs", "1", "--workers", "0", "--no-progress", "--lr", "0.01"]


def test_list_dataset_trains_with_its_list_files(tmp_path):
    train_list, val_list = _list_dataset(tmp_path / "data")
    out = tmp_path / "out"
    assert train_main([*LIST, "--train-list", str(train_list), "--val-list", str(val_list),
                       "--output", str(out), "--experiment", "list"]) == 0
    assert json.loads((out / "list" / "class_counts.json").read_text())["class_counts"] == [6, 3, 2]
    assert json.loads((out / "list" / "results.json").read_text())["num_samples"] == 6


def test_list_dataset_missing_image_names_list_and_line(tmp_path):
    train_list, val_list = _list_dataset(tmp_path / "data")
    (tmp_path / "data" / "images" / "c1 2.png").unlink()  # line 9 of train.txt
    with pytest.raises(OSError, match=r"c1 2.png' \(listed in .*train.txt, line 9, label 1\) does not decode"):
        train_main([*LIST, "--train-list", str(train_list), "--val-list", str(val_list), "-b", "11",
                    "--output", str(tmp_path / "out")])


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "list"], "--dataset list needs --train-list and --val-list"),
    (["--train-list", "x.txt"], "--train-list applies to --dataset list, not --dataset digits-lt"),
    (["--dataset", "list", "--train-list", "nope.txt", "--val-list", "nope.txt"], "list file 'nope.txt' not found"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be >= 1, got 0"),
])
def test_bad_scale_and_list_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train_main([*flags, "--output", str(tmp_path), "--no-progress"])
    assert message in f"{exc.value.code} {capsys.readouterr().err}"


def test_sync_bn_on_two_gloo_ranks_is_refused_before_training(tmp_path):
    """torch's SyncBatchNorm has no CPU kernel (it raises at the first training forward): with 2 gloo ranks
    --sync-bn stops at start-up, on every rank, with the reason."""
    cmd = [*processes.torchrun(2), "-m", "ltsam.train",
           "--n-max", "60", "-b", "16", "--epochs", "1", "--no-progress", "--sync-bn", "--output", str(tmp_path)]
    result = processes.run(cmd, env=processes.env_with())
    assert result.returncode != 0
    refusal = "--sync-bn: torch's SyncBatchNorm does not run on CPU (gloo)"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]
    assert not list(tmp_path.rglob("*.pth.tar"))


def test_accumulation_under_ddp_equals_the_whole_batch(tmp_path):
    """2 gloo ranks, plain SGD through DDP (all-reduce skipped with no_sync until the last micro-batch): both
    ranks end with the weights of the whole per-rank batch; a missed all-reduce would leave them apart."""
    def torchrun(experiment: str, *flags: str) -> dict:
        cmd = [*processes.torchrun(2), "-m", "ltsam.train", *VIT, "--epochs", "1", "--eval-interval", "1",
               "--output", str(tmp_path), "--experiment", experiment, *flags]
        done = processes.run(cmd, env=processes.env_with())
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(tmp_path / experiment / "last.pth.tar", map_location="cpu", weights_only=True)

    whole = torchrun("whole", "-b", "16")
    accumulated = torchrun("accum", "-b", "8", "--grad-accum-steps", "2")
    assert whole["num_updates"] == 6
    assert_same_weights(whole, accumulated)
