"""``ltsam train`` under torchrun with 2 gloo processes: plain DDP, the SAM family, and a killed worker."""

from __future__ import annotations

import json
import os

import processes
import pytest
import torch

from ltsam.train.main import main as train_main
from ltsam.train.preempt import REQUEUE_EXIT

# 203 images over 2 ranks in batches of 16: 6 updates an epoch on each rank
TINY = ["--n-max", "60", "-b", "16", "--epochs", "2", "--no-progress", "--seed", "5"]


def torchrun(out, experiment: str, *flags: str, restarts: int = 0, env: dict | None = None, check: bool = True):
    cmd = [*processes.torchrun(2), "--max-restarts", str(restarts), "-m", "ltsam.train", *TINY, "--output", str(out),
           "--experiment", experiment, *flags]
    result = processes.run(cmd, env=processes.env_with(env))
    assert not check or result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def weights(out, experiment: str) -> dict:
    return torch.load(out / experiment / "last.pth.tar", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("opt", ["sgd", "ssesam"])
def test_two_processes_train_and_report(tmp_path, opt):
    extra = ["--eta", "20", "--opt-kwargs", "gamma=0.5"] if opt == "ssesam" else []
    torchrun(tmp_path, opt, "--opt", opt, *extra)
    results = json.loads((tmp_path / opt / "results.json").read_text())
    assert results["updates"] == 12 and results["num_samples"] == 300  # eval shards cover the test set once
    ckpt = weights(tmp_path, opt)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    if opt == "ssesam":
        pytest.ssesam_straight = ckpt


def test_killed_worker_restarts_group_which_resumes_to_the_same_weights(tmp_path):
    """Rank 1 dies at update 9 (epoch 1); torchrun restarts both ranks, they resume from epoch 0's checkpoint
    and finish with the weights of the uninterrupted 2-process run above."""
    straight = getattr(pytest, "ssesam_straight", None)
    if straight is None:
        tmp = tmp_path / "straight"
        torchrun(tmp, "ssesam", "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5")
        straight = weights(tmp, "ssesam")
    marker = tmp_path / "fault.marker"
    result = torchrun(tmp_path, "ssesam", "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5",
                      "--resume", "auto", restarts=1,
                      env={"LTSAM_FAULT_AT_STEP": "9", "LTSAM_FAULT_MARKER": str(marker)})
    assert marker.read_text().startswith("killed at update 9")
    assert "resumed from" in result.stderr and "at epoch 1" in result.stderr
    resumed = weights(tmp_path, "ssesam")
    assert resumed["num_updates"] == straight["num_updates"] == 12
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name


def forked(out, experiment: str, attempt: str, *flags: str, env: dict | None = None) -> tuple[list[int], str]:
    """``ltsam train`` on 2 forked gloo ranks (env://, as torchrun starts them, without the start-up cost of
    importing torch in fresh processes); returns the exit codes and both ranks' stderr."""
    argv = [*TINY, "--output", str(out), "--experiment", experiment, *flags]

    def rank_main(_rank: int) -> int:
        os.environ.update(env or {})
        torch.set_num_threads(1)
        return train_main(argv)

    logs = out / "logs" / f"{experiment}-{attempt}"
    codes = processes.forked_ranks(rank_main, 2, logs)
    return codes, "".join((logs / f"rank{r}.log").read_text() for r in range(2))


@pytest.mark.parametrize("dist_bn", ["reduce", ""])  # broadcast gives every rank rank 0's: 'reduce' covers it
def test_stop_inside_an_epoch_resumes_with_each_ranks_batchnorm_statistics(tmp_path, dist_bn):
    """SSE-SAM (no DDP wrapper: each rank's BatchNorm sees only its own batches) with EMA, one epoch: SIGTERM on
    rank 1 after update 2. Each rank's running statistics (and their EMA) differ then, so the checkpoint holds
    both ranks' and each resumes its own; the run ends exactly (no tolerance) as one that never stopped, whatever
    --dist-bn does at the epoch's end ('' never equalises them: the final checkpoint holds both too)."""
    flags = ["--epochs", "1", "--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--model-ema",
             "--model-ema-decay", "0.9", "--dist-bn", dist_bn]
    codes, err = forked(tmp_path, "straight", "0", *flags)
    assert codes == [0, 0], err[-3000:]
    codes, err = forked(tmp_path, "stopped", "0", *flags, env={"LTSAM_SIGNAL_AT_STEP": "2", "LTSAM_SIGNAL_RANK": "1"})
    assert codes == [REQUEUE_EXIT] * 2, err[-3000:]
    mid = weights(tmp_path, "stopped")
    assert mid["position"]["batch"] == 3 and mid["position"]["samples"] == 48
    per_rank = mid["rank_buffers"]
    assert len(per_rank) == 2 and set(per_rank[0]) == {"state_dict", "state_dict_ema"}
    assert not torch.equal(*(r["state_dict"]["features.1.running_mean"] for r in per_rank))
    assert all(torch.equal(mid["state_dict"][k], v) for k, v in per_rank[0]["state_dict"].items())  # rank 0's
    codes, err = forked(tmp_path, "stopped", "1", *flags, "--resume", "auto")
    assert codes == [0, 0], err[-3000:]
    assert "at epoch 0 (update 3, 3 into the epoch)" in err
    straight, resumed = weights(tmp_path, "straight"), weights(tmp_path, "stopped")
    assert resumed["num_updates"] == straight["num_updates"] == 6
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name}"
    assert (straight["rank_buffers"] is None) == (resumed["rank_buffers"] is None) == (dist_bn != "")
    for a, b in zip(straight["rank_buffers"] or [], resumed["rank_buffers"] or []):
        assert all(torch.equal(t, b["state_dict"][n]) for n, t in a["state_dict"].items())
    assert straight["optimizer"]["ltsam"] == resumed["optimizer"]["ltsam"]
    assert (tmp_path / "straight" / "summary.csv").read_text() == (tmp_path / "stopped" / "summary.csv").read_text()


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_run_makes_the_same_updates_as_plain_ranks(tmp_path, stage):
    """SSE-SAM through DeepSpeed ZeRO 1/2 (fp32, 2 gloo ranks) ends with the weights of the plain 2-rank run."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    flags = ["--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5"]
    torchrun(tmp_path, "plain", *flags)
    torchrun(tmp_path, "ds", *flags, "--deepspeed-config", str(config), "--zero-stage", str(stage),
             env={"DS_ACCELERATOR": "cpu"})
    plain, ds = weights(tmp_path, "plain"), weights(tmp_path, "ds")
    assert ds["optimizer"]["ltsam"] == plain["optimizer"]["ltsam"] and ds["num_updates"] == 12
    for name, tensor in plain["state_dict"].items():
        assert torch.allclose(tensor.float(), ds["state_dict"][name].float(), atol=1e-5), name
    if stage == 2:
        pytest.deepspeed_zero2 = (config, tmp_path / "ds")


def test_deepspeed_zero2_stopped_at_a_signal_resumes_to_the_same_weights(tmp_path):
    """SIGTERM reaches rank 1 only, after update 8 (epoch 1): both ranks stop after the same update (the flag is
    summed with the loss), DeepSpeed writes its partitions and ltsam the rest (with each rank's BatchNorm
    statistics); the resumed run ends bit-identical to the uninterrupted ZeRO-2 run above (--dist-bn reduce).
    The checkpoint refuses to resume without DeepSpeed, saying how."""
    pytest.importorskip("deepspeed")
    flags = ["--opt", "ssesam", "--eta", "20", "--opt-kwargs", "gamma=0.5", "--zero-stage", "2"]
    env = {"DS_ACCELERATOR": "cpu"}
    config, straight_folder = getattr(pytest, "deepspeed_zero2", (tmp_path / "ds_config.json", None))
    if straight_folder is None:
        config.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
        torchrun(tmp_path, "straight", *flags, "--deepspeed-config", str(config), env=env)
        straight_folder = tmp_path / "straight"
    straight = weights(straight_folder.parent, straight_folder.name)
    flags += ["--deepspeed-config", str(config)]
    stopped = torchrun(tmp_path, "ds", *flags, env={**env, "LTSAM_SIGNAL_AT_STEP": "8", "LTSAM_SIGNAL_RANK": "1"},
                       check=False)
    assert stopped.returncode != 0
    assert "(rank 1): stopped by SIGTERM at 3 updates into epoch 1 (update 9)" in stopped.stderr, stopped.stderr[-3000:]
    assert "(rank 0): stopped by a signal on another rank at 3 updates into epoch 1 (update 9)" in stopped.stderr
    mid = weights(tmp_path, "ds")
    assert mid["deepspeed"] == {"dir": "deepspeed", "tag": "epoch1-update9", "zero_stage": 2}
    assert len(mid["rank_buffers"]) == 2
    assert sorted(p.name for p in (tmp_path / "ds" / "deepspeed" / "epoch1-update9").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    refused = torchrun(tmp_path, "ds", *flags[:-2], "--resume", "auto", check=False)
    assert "was written by DeepSpeed (ZeRO stage 2)" in refused.stderr
    assert "resume it with --deepspeed-config and --zero-stage 2" in refused.stderr
    resumed = torchrun(tmp_path, "ds", *flags, "--resume", "auto", env=env)
    assert "at epoch 1 (update 9, 3 into the epoch)" in resumed.stderr
    final = weights(tmp_path, "ds")
    assert final["num_updates"] == straight["num_updates"] == 12
    assert final["optimizer"]["ltsam"] == straight["optimizer"]["ltsam"]
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, final["state_dict"][name]), name
    assert (tmp_path / "ds" / "summary.csv").read_text() == (straight_folder / "summary.csv").read_text()


def test_deepspeed_zero3_with_a_sam_optimizer_is_refused(tmp_path):
    pytest.importorskip("deepspeed")
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cmd = [*processes.torchrun(1), "-m", "ltsam.train", *TINY, "--output", str(tmp_path), "--opt", "sam",
           "--deepspeed-config", str(config)]
    result = processes.run(cmd, env=processes.env_with({"DS_ACCELERATOR": "cpu"}))
    assert result.returncode != 0
    assert "zero_optimization.stage=3 with SAM" in result.stderr
