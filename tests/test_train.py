"""``ltsam train`` end to end on the embedded digits, in-process: every optimizer, exact resume, refusals."""

from __future__ import annotations

import pytest
import torch

from ltsam.cli import main as ltsam_cli
from ltsam.train import main as train_main

# 203 training images (n_max 60, IF 20) in batches of 32: 6 updates an epoch, seconds per run on CPU
TINY = ["--n-max", "60", "-b", "32", "--epochs", "2", "--no-progress", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, *flags: str, experiment: str = "run") -> int:
    return train_main([*TINY, "--output", str(out), "--experiment", experiment, *flags])


def load(out, experiment: str = "run", name: str = "last.pth.tar") -> dict:
    return torch.load(out / experiment / name, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("opt, extra", [
    ("sgd", []),
    ("sam", ["--opt-kwargs", "rho=0.05"]),
    ("imbsam", ["--eta", "20"]),
    ("ssesam", ["--eta", "20", "--opt-kwargs", "gamma=0.5"]),
    ("focalsam", ["--loss", "la"]),
])
def test_each_optimizer_trains_and_writes_its_outputs(tmp_path, opt, extra):
    assert run(tmp_path, "--opt", opt, *extra) == 0
    folder = tmp_path / "run"
    for name in ("summary.csv", "results.json", "per_class.png", "args.yaml", "class_counts.json", "last.pth.tar"):
        assert (folder / name).is_file(), name
    results = __import__("json").loads((folder / "results.json").read_text())
    assert results["epochs_done"] == 2 and results["updates"] == 12
    assert {"top1", "many", "medium", "few"} <= results.keys() and results["top1"] > 0.2
    ckpt = load(tmp_path)
    if opt != "sgd":  # the method state travels with the optimizer, epochs filled in by the trainer
        assert ckpt["optimizer"]["ltsam"]["epoch"] == 1
    assert len((folder / "summary.csv").read_text().splitlines()) == 3


def test_ssesam_stage_follows_the_scheduled_total_with_cooldown(tmp_path, monkeypatch):
    """--epochs 1 --cooldown-epochs 2, gamma 0.5: 3 scheduled epochs, so stage 2 from epoch 2 (not from epoch 1,
    which half of --epochs alone would give)."""
    from ltsam.optim import SSESAM

    seen = []
    set_epoch = SSESAM.set_epoch

    def recording_set_epoch(self, epoch):
        set_epoch(self, epoch)
        seen.append((epoch, self.epochs, self.stage))

    monkeypatch.setattr(SSESAM, "set_epoch", recording_set_epoch)
    assert run(tmp_path, "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--epochs", "1",
               "--cooldown-epochs", "2") == 0
    assert seen == [(0, 3, 1), (1, 3, 1), (2, 3, 2)]


def test_stop_and_resume_ends_bit_identical(tmp_path):
    """SSE-SAM switching stage mid-run, random crops, class-balanced sampling and EMA: a run stopped after
    one epoch and resumed must end with exactly the weights, EMA, momentum and RNG of one that never stopped."""
    flags = ["--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--epochs", "3", "--train-aug", "crop",
             "--sampler", "balanced", "--model-ema", "--model-ema-decay", "0.9"]
    assert run(tmp_path, *flags, experiment="straight") == 0
    assert run(tmp_path, *flags, "--stop-epoch", "1", experiment="stopped") == 0
    first = load(tmp_path, "stopped")
    assert first["epoch"] == 0 and first["wall_s"] > 0
    assert run(tmp_path, *flags, "--resume", "auto", experiment="stopped") == 0
    # wall time counts both attempts: what the first one's checkpoint carried plus the second one
    report = __import__("json").loads((tmp_path / "stopped" / "results.json").read_text())
    assert report["wall_s"] == pytest.approx(first["wall_s"] + report["attempt_s"], abs=0.02)
    a, b = load(tmp_path, "straight"), load(tmp_path, "stopped")
    assert a["epoch"] == b["epoch"] == 2 and a["num_updates"] == b["num_updates"] == 18
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    momentum_a, momentum_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert momentum_a.keys() == momentum_b.keys()
    assert all(torch.equal(momentum_a[k]["momentum_buffer"], momentum_b[k]["momentum_buffer"]) for k in momentum_a)
    assert a["optimizer"]["ltsam"] == b["optimizer"]["ltsam"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    rows = (tmp_path / "stopped" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]


def test_nan_loss_stops_naming_step_batch_and_value_and_keeps_last_checkpoint(tmp_path, capsys):
    # epoch 0 trains at lr 0.01, epoch 1 at 1e10: the loss blows up within epoch 1
    code = run(tmp_path, "--sched", "step", "--decay-epochs", "1", "--decay-rate", "1e12", "--lr", "0.01",
               "--epochs", "3")
    assert code == 3
    err = capsys.readouterr().err
    assert "at epoch 1, update" in err and "(batch" in err and ("loss is nan" in err or "loss is inf" in err)
    assert "last good checkpoint" in err
    assert load(tmp_path)["epoch"] == 0


def test_folder_with_another_runs_checkpoint_is_refused_unless_resumed_or_overwritten(tmp_path):
    assert run(tmp_path, "--epochs", "1") == 0
    with pytest.raises(SystemExit, match="holds another run's checkpoint.*--resume auto.*--overwrite"):
        run(tmp_path, "--epochs", "1")
    assert run(tmp_path, "--epochs", "1", "--overwrite") == 0
    assert len((tmp_path / "run" / "summary.csv").read_text().splitlines()) == 2


def test_tta_final_report(tmp_path):
    assert run(tmp_path, "--epochs", "1", "--tta") == 0
    assert __import__("json").loads((tmp_path / "run" / "results.json").read_text())["tta"] is True


def test_yaml_config_sets_defaults_and_unknown_keys_are_named(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("opt: sam\nopt_kwargs: {rho: 0.1}\nepochs: 1\n")
    assert run(tmp_path, "-c", str(good)) == 0
    saved = (tmp_path / "run" / "args.yaml").read_text()
    assert "opt: sam" in saved and "rho: 0.1" in saved
    # the exact configuration written is a valid config again
    assert run(tmp_path, "-c", str(tmp_path / "run" / "args.yaml"), "--experiment", "again") == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("wieght-decay: 0.1\n")
    with pytest.raises(SystemExit, match=r"-c .*bad.yaml:1: wieght-decay: unknown flag; did you mean 'weight_decay'"):
        run(tmp_path, "-c", str(bad))


@pytest.mark.parametrize("flags, message", [
    (["--stop-epoch", "5"], "--stop-epoch must lie in"),
    (["--eta", "20"], "--eta .* applies to imbsam and ssesam"),
    (["--opt", "nosuchopt"], "--opt nosuchopt"),
    (["--opt", "ssesam", "--opt-kwargs", "head_rho=-1"], "head_rho=-1"),
    (["--resume", "missing.pth.tar"], "--resume 'missing.pth.tar' does not exist"),
    (["--dataset", "mnist-lt"], "needs root="),
])
def test_bad_flags_give_clear_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, *flags)
    text = str(info.value.code) + capsys.readouterr().err
    assert __import__("re").search(message, text), text


def test_console_script_dispatches_and_suggests(capsys):
    assert ltsam_cli(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ltsam_cli(["train", "--help"])
    assert info.value.code == 0 and "--opt-kwargs" in capsys.readouterr().out


def test_torchcompile_trains_sam_as_the_eager_run_and_refuses_imbsam_with_batchnorm(tmp_path):
    """--torchcompile: the engine takes one gradient per compiled forward (aot_eager: AOTAutograd's graphs, eager
    kernels, so the weights equal the eager run's); ImbSAM needs two gradients of one forward on this BatchNorm
    net, which is refused naming the flag."""
    torch._dynamo.reset()
    assert run(tmp_path, "--opt", "sam", "--epochs", "1", experiment="eager") == 0
    assert run(tmp_path, "--opt", "sam", "--epochs", "1", "--torchcompile", "aot_eager", experiment="compiled") == 0
    eager, compiled = load(tmp_path, "eager")["state_dict"], load(tmp_path, "compiled")["state_dict"]
    assert eager.keys() == compiled.keys()
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="ImbSAM on a compiled model whose passes forward the whole batch.*"
                                         "--torchcompile"):
        run(tmp_path, "--opt", "imbsam", "--eta", "20", "--epochs", "1", "--torchcompile", "aot_eager",
            experiment="refused")
