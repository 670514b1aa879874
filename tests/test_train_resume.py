"""Resuming ``ltsam train``: a stop signal mid-epoch, a crash inside the checkpoint rename, configuration
checks and overrides, and the one-sentence errors for files that cannot serve a resume."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import processes
import pytest
import timm.utils.checkpoint_saver
import torch

from ltsam.train import resume as resume_point
from ltsam.train.preempt import REQUEUE_EXIT, StopRequest

# 203 training images (n_max 60, IF 20) in batches of 32: 6 updates an epoch
TINY = ["--n-max", "60", "-b", "32", "--epochs", "2", "--no-progress", "--seed", "3"]
SSESAM = ["--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--train-aug", "crop", "--sampler",
          "balanced", "--model-ema", "--model-ema-decay", "0.9"]

pytestmark = pytest.mark.usefixtures("one_thread")
trainer_module = importlib.import_module("ltsam.train.main")  # the package's ``main`` attribute is the function
train_main = trainer_module.main


def run(out, *flags: str, experiment: str = "run") -> int:
    return train_main([*TINY, "--output", str(out), "--experiment", experiment, *flags])


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["num_updates"] == b["num_updates"]
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert a["optimizer"]["ltsam"] == b["optimizer"]["ltsam"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def trainer(out, experiment: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ltsam.train", *TINY, "--output", str(out), "--experiment", experiment, *flags]
    return processes.run(cmd, env=processes.env_with(env))


def test_sigterm_mid_epoch_checkpoints_and_the_resumed_run_is_bit_identical(tmp_path):
    """SIGTERM after update 8 (2 into epoch 1; 2 loader workers draw the crops): the update in flight completes,
    the checkpoint holds the position inside the epoch, the exit code says requeue, and the resumed run ends with
    the weights, EMA, momentum, RNG and per-epoch losses of a run that never stopped."""
    flags = [*SSESAM, "--workers", "2"]
    straight = trainer(tmp_path, "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = trainer(tmp_path, "stopped", *flags, env={"LTSAM_SIGNAL_AT_STEP": "8"})
    assert stopped.returncode == REQUEUE_EXIT, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at 3 updates into epoch 1 (update 9)" in stopped.stderr
    assert f"Exit code {REQUEUE_EXIT} means 'requeue'" in stopped.stderr
    mid = load(tmp_path / "stopped" / "last.pth.tar")
    assert mid["num_updates"] == 9 and mid["position"]["epoch"] == 1 and mid["position"]["batch"] == 3
    assert mid["position"]["samples"] == 96
    shutil.copytree(tmp_path / "stopped", tmp_path / "rebatched")
    assert_rebatched_resume(tmp_path, flags)
    resumed = trainer(tmp_path, "stopped", *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 1 (update 9, 3 into the epoch)" in resumed.stderr
    a, b = load(tmp_path / "straight" / "last.pth.tar"), load(tmp_path / "stopped" / "last.pth.tar")
    assert_same_training_state(a, b)
    assert (tmp_path / "straight" / "summary.csv").read_text() == (tmp_path / "stopped" / "summary.csv").read_text()


def assert_rebatched_resume(tmp_path, flags: list[str]) -> None:
    """``-b`` overridden on the checkpoint 96 samples into epoch 1: 16 continues 6 batches in (the 96 samples
    are not trained twice; 201 samples make 12 batches of 16, so 6 updates remain); 64 cannot end on 96, and
    the refusal says how to go on."""
    with pytest.raises(SystemExit) as info:
        run(tmp_path, *flags, "-b", "64", "--resume", "auto", "--resume-override", "batch_size",
            experiment="rebatched")
    assert str(info.value.code) == (
        f"ltsam train: --resume-override batch_size: '{tmp_path / 'rebatched' / 'last.pth.tar'}' was written 96 "
        "samples per process into epoch 1, and they do not end on an update of -b 64 x --grad-accum-steps 1; "
        "resume with -b 32 --grad-accum-steps 1 and --stop-epoch 2 to finish that epoch, then change it")
    assert run(tmp_path, *flags, "-b", "16", "--resume", "auto", "--resume-override", "batch_size",
               experiment="rebatched") == 0
    done = load(tmp_path / "rebatched" / "last.pth.tar")
    assert done["epoch"] == 1 and done["num_updates"] == 9 + 6


def test_crash_between_unlink_and_rename_resumes_from_the_newest_complete_file(tmp_path, monkeypatch, capsys):
    """timm's saver unlinks last.pth.tar, then renames tmp.pth.tar onto it: killed in between, the folder holds
    the complete tmp file and older numbered ones. ``--resume auto`` takes tmp (saying so), passes over a
    damaged newer file, and the run ends as one that never crashed."""
    flags = [*SSESAM, "--epochs", "3"]
    assert run(tmp_path, *flags, experiment="straight") == 0
    real_replace = os.replace

    def crash_at_second_rename(src, dst):
        if str(dst).endswith("last.pth.tar") and (tmp_path / "crashed" / "checkpoint-0.pth.tar").exists():
            raise SystemExit("killed inside the rename")
        real_replace(src, dst)

    monkeypatch.setattr(timm.utils.checkpoint_saver.os, "replace", crash_at_second_rename)
    with pytest.raises(SystemExit, match="killed inside the rename"):
        run(tmp_path, *flags, experiment="crashed")
    monkeypatch.undo()
    folder = tmp_path / "crashed"
    assert not (folder / "last.pth.tar").exists() and load(folder / "tmp.pth.tar")["epoch"] == 1
    damaged = folder / "checkpoint-7.pth.tar"  # newest of all, but cut short
    damaged.write_bytes((folder / "tmp.pth.tar").read_bytes()[:1000])
    capsys.readouterr()
    assert run(tmp_path, *flags, "--resume", "auto", experiment="crashed") == 0
    err = capsys.readouterr().err
    assert "passed over 'checkpoint-7.pth.tar' is truncated or damaged" in err
    assert f"resumed from '{folder / 'tmp.pth.tar'}' at epoch 2 (update 12)" in err
    assert_same_training_state(load(tmp_path / "straight" / "last.pth.tar"), load(folder / "last.pth.tar"))


def test_resume_with_another_configuration_is_refused_naming_each_key(tmp_path):
    assert run(tmp_path, *SSESAM, "--stop-epoch", "1") == 0
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--opt", "sgd", "--lr", "0.5", "--imb-factor", "5", "--resume", "auto")
    text = str(info.value.code)
    for part in ("imb_factor: None in the checkpoint, 5.0 now", "lr: 0.05 in the checkpoint, 0.5 now",
                 "opt: 'ssesam' in the checkpoint, 'sgd' now", "--resume-override class_counts eta imb_factor lr "):
        assert part in text, text
    assert "model_ema" in text and "sampler: 'balanced' in the checkpoint, 'none' now" in text
    with pytest.raises(SystemExit, match=r"--resume-override 'epoch' \(did you mean 'epochs'\?\)"):
        run(tmp_path, *SSESAM, "--resume", "auto", "--resume-override", "epoch")


def test_resume_override_epochs_extends_the_schedule_from_the_current_epoch(tmp_path, capsys):
    """A finished 2-epoch run continued to 4 epochs: epochs 2 and 3 train at the cosine lr of a 4-epoch
    schedule (not the finished schedule's lr 0), and the SSE-SAM stage follows the new length."""
    assert run(tmp_path, "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5") == 0
    before = load(tmp_path / "run" / "last.pth.tar")
    with pytest.raises(SystemExit, match="epochs: 2 in the checkpoint, 4 now"):
        run(tmp_path, "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--epochs", "4",
            "--resume", "auto")
    capsys.readouterr()
    assert run(tmp_path, "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--epochs", "4",
               "--resume", "auto", "--resume-override", "epochs") == 0
    assert "epochs 2 -> 4 (--resume-override)" in capsys.readouterr().err
    rows = [r.split(",") for r in (tmp_path / "run" / "summary.csv").read_text().splitlines()]
    lr_after = {int(r[0]): float(r[-1]) for r in rows[1:]}  # lr set for the next epoch, as timm logs it
    cosine = [0.5 * 0.05 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    assert lr_after[2] == pytest.approx(cosine[3]) and lr_after[3] == pytest.approx(cosine[4], abs=1e-12)
    after = load(tmp_path / "run" / "last.pth.tar")
    assert after["epoch"] == 3 and after["num_updates"] == 24 and after["args"]["epochs"] == 4
    assert not torch.equal(before["state_dict"]["head.weight"], after["state_dict"]["head.weight"])


def test_resume_auto_takes_the_checkpoint_furthest_into_training_whatever_the_mtimes(tmp_path):
    """A folder copied without ``-p`` (new mtimes, in any order): ``--resume auto`` goes by what each file holds
    (updates, then epoch), not by which was written last; a ranked copy equal to ``last`` loses the tie."""
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    run_dir.mkdir()
    for name, epoch, updates, position in [("checkpoint-0", 0, 6, None), ("checkpoint-1", 1, 12, None),
                                           ("model_best", 0, 6, None), ("last", 1, 15, {"epoch": 2, "batch": 3})]:
        torch.save({"state_dict": {}, "optimizer": {}, "epoch": epoch, "num_updates": updates, "position": position},
                   run_dir / f"{name}.pth.tar")
    shutil.copytree(run_dir, copy, copy_function=shutil.copyfile)
    now = time.time_ns()
    for age, name in enumerate(["model_best", "checkpoint-0", "checkpoint-1", "last"]):  # best newest, last oldest
        os.utime(copy / f"{name}.pth.tar", ns=(now - age * 10**9, now - age * 10**9))
    point, passed_over = resume_point.resolve_resume("auto", copy)
    assert point.path == copy / "last.pth.tar" and passed_over == []
    shutil.copyfile(copy / "checkpoint-1.pth.tar", copy / "last.pth.tar")  # an epoch's end and its ranked copy
    assert resume_point.resolve_resume("auto", copy)[0].path == copy / "last.pth.tar"


def test_class_counts_compare_by_content_not_path(tmp_path, capsys):
    """The counts the run trained with, given from another path (a copy), resume; changed counts are refused
    with the first class that differs, not a wall of numbers."""
    assert run(tmp_path, "--stop-epoch", "1") == 0
    counts = tmp_path / "elsewhere.json"
    shutil.copyfile(tmp_path / "run" / "class_counts.json", counts)
    capsys.readouterr()
    assert run(tmp_path, "--class-counts", str(counts), "--resume", "auto", "--stop-epoch", "1") == 0  # no training
    assert "resumed from" in capsys.readouterr().err
    data = json.loads(counts.read_text())
    data["class_counts"][4] -= 1
    counts.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--class-counts", str(counts), "--resume", "auto")
    original = load(tmp_path / "run" / "last.pth.tar")["class_counts"][4]
    difference = f"the counts differ in 1 of 10 classes (class 4: {original} in the checkpoint, {original - 1} now)"
    assert f"(class_counts: {difference}); resuming would mix two runs" in str(info.value.code)
    assert run(tmp_path, "--class-counts", str(counts), "--resume", "auto", "--resume-override", "class_counts") == 0
    assert f"; class_counts: {difference} (--resume-override)" in capsys.readouterr().err
    assert load(tmp_path / "run" / "last.pth.tar")["class_counts"][4] == original - 1


def test_full_disk_while_writing_a_checkpoint_is_one_sentence_and_last_stays(tmp_path, capsys):
    """The next checkpoint's tmp file writes into /dev/full (ENOSPC on every write, as a full disk):
    one sentence, exit 1, and last.pth.tar keeps epoch 0."""
    assert run(tmp_path, "--stop-epoch", "1") == 0
    (tmp_path / "run" / "tmp.pth.tar").symlink_to("/dev/full")
    capsys.readouterr()
    assert run(tmp_path, "--resume", "auto") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    folder = tmp_path / "run"
    assert err.startswith(f"ltsam train (rank 0): could not write checkpoint '{folder / 'tmp.pth.tar'}' (No space "
                          "left on device; ") and err.endswith(
        f"'{folder / 'last.pth.tar'}' still holds the previous checkpoint: free space, then rerun with --resume auto")
    assert load(folder / "last.pth.tar")["epoch"] == 0 and not (folder / "tmp.pth.tar").exists()


def test_sigint_stops_like_sigterm_and_a_second_one_interrupts(monkeypatch, capsys):
    """A first SIGINT (Ctrl-C) is a stop request as SIGTERM is (a checkpoint, exit 75); a second one raises
    KeyboardInterrupt, which ``ltsam train`` ends with one line and exit 130, not a traceback."""
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.flag == 1.0 and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "train", interrupted)
    capsys.readouterr()
    assert train_main(["--no-progress"]) == 130
    assert capsys.readouterr().err == ("ltsam train (rank 0): interrupted by SIGINT; nothing more was written (a "
                                       "first SIGINT during training stops after the update in flight and writes a "
                                       "checkpoint)\n")


@pytest.mark.parametrize("content, reason", [
    (b"", "is empty (0 bytes"),
    (b"\x00garbage" * 50, "is not a PyTorch checkpoint"),
    ("truncated", "is truncated or damaged"),
    ("namespace", "holds pickled Python objects beyond tensors and numbers (torch's safe load refuses it: "
                  "unsupported GLOBAL argparse.Namespace)"),
    ("os.system", "holds pickled Python objects beyond tensors and numbers (torch's safe load refuses it: "
                  f"unsupported GLOBAL {os.system.__module__}.system whose module {os.system.__module__} is blocked)"),
])
def test_unreadable_checkpoint_is_one_sentence_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "given.pth.tar"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:-300])
    elif content == "namespace":  # what timm's own train.py writes: args as an argparse.Namespace
        torch.save({"state_dict": {}, "optimizer": {}, "epoch": 0, "args": argparse.Namespace(lr=0.1)}, path)
    elif content == "os.system":  # a hostile file: loading it unsafely would run a command
        torch.save({"state_dict": {}, "optimizer": {}, "epoch": 0, "args": ShellCommand()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--resume", str(path))
    text = str(info.value.code)
    assert text.startswith(f"ltsam train: --resume '{path}' {reason}") and "--resume auto" in text, text
    assert "weights_only" not in text and "\n" not in text


class ShellCommand:
    def __reduce__(self):
        return os.system, ("echo unpickled",)


def test_unwritable_output_folder_is_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        run(blocker / "out")
    text = str(info.value.code)
    assert text.startswith(f"ltsam train: cannot write the output folder '{blocker / 'out' / 'run'}' (Not a "
                           "directory") and text.endswith("choose a writable --output"), text


def test_plain_checkpoint_into_a_deepspeed_run_is_refused_with_the_way(tmp_path):
    assert run(tmp_path, "--epochs", "1") == 0
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--epochs", "1", "--resume", "auto", "--deepspeed-config", str(config))
    assert "was written without DeepSpeed" in str(info.value.code)
    assert "resume it without --deepspeed-config" in str(info.value.code)


def test_overridden_optimizer_option_replaces_the_restored_one(tmp_path):
    """A loaded optimizer state brings back the old weight decay; an allowed override must win over it."""
    assert run(tmp_path, "--weight-decay", "0.001", "--stop-epoch", "1") == 0
    assert run(tmp_path, "--weight-decay", "0.01", "--resume", "auto", "--resume-override", "weight_decay") == 0
    groups = load(tmp_path / "run" / "last.pth.tar")["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} - {0.0} == {0.01}  # timm keeps biases and norms at 0


def test_stop_request_records_sigusr1_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert stop.flag == 0.0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.flag == 1.0 and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is previous
