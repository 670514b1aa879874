"""Dry runs: every recipe in yaml/ and every launcher kind, with exact argv for representative cases."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys

import processes
import pytest
from launch_helpers import ENV, ROOT, YAML, planned, srun_line

from ltsam_launch import cli
from ltsam_launch.program import to_flags, tool

PY = sys.executable
RECIPES = sorted(YAML.glob("*.yaml"))
CIFAR = ["--data-dir", "../shared/data", "--dataset", "cifar100-lt", "--imb-factor", "100", "--num-classes", "100",
         "--model", "resnet34_cifar", "--epochs", "200", "--sched", "cosine", "--warmup-epochs", "0", "--min-lr", "0"]


def test_flag_mapping_is_generic():
    args = {"data_dir": "d", "amp": True, "model_ema": False, "resume": None, "device_modules": ["ltsam.timm"],
            "opt_kwargs": {"rho": 0.05, "base": "momentum", "class_counts": [5, 3], "skip": None},
            "lr": 0.001, "empty": [], "none_kw": {}}
    assert to_flags(args) == ["--data-dir", "d", "--amp", "--device-modules", "ltsam.timm", "--opt-kwargs",
                              "rho=0.05", "base=momentum", "class_counts=[5, 3]", "--lr", "0.001"]


@pytest.mark.parametrize("data", [None, "/data/set with space"], ids=["LTSAM_DATA-unset", "LTSAM_DATA-set"])
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_dry_runs(path, data, capsys, monkeypatch):
    """Every recipe dry-runs; its data comes from LTSAM_DATA, else the repo-relative ../shared/data."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    if data is None:
        monkeypatch.delenv("LTSAM_DATA", raising=False)
    else:
        monkeypatch.setenv("LTSAM_DATA", data)
    assert cli.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = planned(path, env={} if data is None else {"LTSAM_DATA": data})
    assert out.splitlines()[-1] == shlex.join(plan.commands[-1])
    assert "# ---- " + str(plan.log_dir / "launch-recipe.yaml") in out
    assert "\n# scale: world size " in out
    argv = shlex.split(srun_line(plan.files["launch-job.sbatch"]))[-1] if "launch-job.sbatch" in plan.files \
        else shlex.join(plan.commands[0])
    if "--data-dir" in argv:
        expected = "../shared/data" if data is None else data
        assert shlex.split(argv)[shlex.split(argv).index("--data-dir") + 1].startswith(expected)


def test_quickstart_local_exact():
    plan = planned(YAML / "quickstart.yaml")
    assert plan.commands == [[PY, "-m", "ltsam.train", "--dataset", "digits-lt", "--model", "lt_cnn_small",
                              "--device", "cpu", "--epochs", "30", "--warmup-epochs", "0", "--sched", "cosine",
                              "--lr", "0.05", "--weight-decay", "0.0005", "--opt", "ssesam",
                              "--opt-kwargs", "head_rho=0.05", "tail_rho=0.1", "gamma=0.7", "eta=20",
                              "base=momentum", "--momentum", "0.9", "--loss", "ce", "--workers", "0", "--seed", "0",
                              "--output", "runs/quickstart", "--batch-size", "64"]]
    assert plan.execute and str(plan.log_dir) == "runs/quickstart"


@pytest.mark.parametrize("method, expected", [
    ("sgd", ["--opt", "momentum", "--lr", "0.01"]),
    ("sam", ["--opt", "sam", "--lr", "0.01"]),
    ("imbsam", ["--opt-kwargs", "rho=0.05", "eta=20", "tail_weight=2", "base=momentum"]),
    ("ssesam", ["--opt-kwargs", "head_rho=0.05", "tail_rho=0.1", "gamma=0.7", "eta=100", "base=momentum"]),
    ("focalsam", ["--opt-kwargs", "rho=0.3", "gamma=3.2", "lam=0.8", "base=momentum"]),
])
def test_cifar100_lt_methods(method, expected):
    argv = planned(YAML / f"cifar100_lt_{method}.yaml").commands[0]
    text = shlex.join(argv)
    assert shlex.join(expected) in text
    assert "--momentum 0.9 --weight-decay 0.001 --wd-profile official" in text and "--batch-size 64" in text
    assert f"--output runs/cifar100-lt/{method}" in text
    if method == "focalsam":
        assert "--model resnet32_cifar" in text and "--loss la" in text and "--lr 0.1" in text
    else:
        assert argv[:3 + len(CIFAR)] == [PY, "-m", "ltsam.train", *CIFAR] and "--seed 9826" in text


def test_env_and_override_reach_the_command(monkeypatch):
    plan = planned(YAML / "cifar100_lt_ssesam.yaml", "program.args.epochs=2", "program.args.lr=1e-3",
                   env={"LTSAM_OUTPUT": "/scratch/o", "LTSAM_DATA": "/data"})
    text = shlex.join(plan.commands[0])
    assert "--data-dir /data " in text and "--epochs 2 " in text and "--lr 0.001 " in text
    assert str(plan.log_dir) == "/scratch/o/cifar100-lt/ssesam"


def test_imagenet_torchrun_exact():
    argv = planned(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml", env={"RDZV_HOST": "node0"}).commands[0]
    assert argv[:8] == [tool("torchrun"), "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=node0:29500", "--rdzv-id=imagenet-lt-r50-ssesam", "--max-restarts=3", "-m"]
    assert argv[8] == "ltsam.train" and argv[-2:] == ["--batch-size", "16"]


def test_torchrun_static_and_standalone():
    static = planned(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml", "launcher.torchrun.rdzv_backend=static",
                     "~launcher.torchrun.rdzv_endpoint", "~launcher.torchrun.rdzv_id",
                     "launcher.torchrun.node_rank=1", "launcher.torchrun.master_addr=10.0.0.1",
                     "launcher.torchrun.master_port=29400").commands[0]
    assert static[:8] == [tool("torchrun"), "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=static",
                          "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29400", "--max-restarts=3"]
    local = planned(YAML / "quickstart.yaml", "launcher.kind=torchrun", "launcher.torchrun.nproc_per_node=2",
                    "precision=bf16").commands[0]
    assert local[:4] == [tool("torchrun"), "--standalone", "--nproc-per-node=2", "-m"]
    assert local[-5:] == ["--batch-size", "32", "--amp", "--amp-dtype", "bfloat16"]


def test_elastic_nnodes_stays_a_string():
    argv = planned(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml", "launcher.torchrun.nnodes=1:4",
                   "~global_batch_size", "program.args.batch_size=16", "~scale").commands[0]
    assert argv[1] == "--nnodes=1:4"


def test_inat_deepspeed_exact_and_ds_config():
    plan = planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml")
    argv = plan.commands[0]
    assert argv[:5] == [tool("deepspeed"), "--num_gpus=4", "--no_local_rank", "--module", "ltsam.train"]
    assert argv[-6:] == ["--batch-size", "128", "--deepspeed-config", "runs/inat2018/r50-focalsam/ds_config.json",
                         "--zero-stage", "2"]
    assert "--amp" not in argv and "--opt-kwargs rho=0.2 gamma=2.0 lam=1.1 base=momentum" in shlex.join(argv)
    assert json.loads(plan.files["ds_config.json"]) == {
        "gradient_accumulation_steps": 1, "train_batch_size": 512, "train_micro_batch_size_per_gpu": 128,
        "bf16": {"enabled": False}, "fp16": {"enabled": False}, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True}


def test_deepspeed_hostfile_multinode_and_config_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("w0 slots=8\nw1 slots=8\n")
    config = tmp_path / "ds.json"
    config.write_text('{"gradient_clipping": 1.0, "zero_optimization": {"stage": 1, "overlap_comm": true}}')
    plan = planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "~launcher.deepspeed.num_gpus",
                   "~launcher.deepspeed.zero_stage", f"launcher.deepspeed.hostfile={hosts}",
                   "launcher.deepspeed.multinode_launcher=openmpi", "launcher.deepspeed.master_addr=w0",
                   "precision=bf16", f"launcher.deepspeed.config_file={config}",
                   "launcher.deepspeed.config={steps_per_print: 50}")
    assert plan.commands[0][:5] == [tool("deepspeed"), f"--hostfile={hosts}", "--master_addr=w0",
                                    "--launcher=openmpi", "--no_local_rank"]
    assert json.loads(plan.files["ds_config.json"]) == {
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 1, "overlap_comm": True},
        "train_batch_size": 512, "train_micro_batch_size_per_gpu": 32, "bf16": {"enabled": True},
        "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 50}
    assert plan.commands[0][-2:] == ["--zero-stage", "1"]


def test_slurm_torchrun_script():
    plan = planned(YAML / "imagenet_lt_r50_ssesam_slurm.yaml")
    script = plan.files["launch-job.sbatch"]
    assert plan.commands == [[tool("sbatch"), "runs/imagenet-lt/r50-ssesam/launch-job.sbatch"]]
    assert not plan.execute
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --time=48:00:00",
                 "#SBATCH --partition=gpu", ". .venv/bin/activate"):
        assert line in script.splitlines()
    srun = srun_line(script)
    assert srun.startswith('srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 '
                           'bash -c ')
    inner = shlex.split(srun)[-1]
    assert inner.startswith('python -m torch.distributed.run --nnodes="${SLURM_NNODES}" --nproc-per-node=8 '
                            '--rdzv-backend=c10d --rdzv-endpoint="${HEAD_NODE}":29500 '
                            '--rdzv-id="${SLURM_JOB_ID}" --max-restarts=3 -m ltsam.train ')
    assert inner.endswith("--batch-size 16 --resume auto")  # a requeued or resubmitted job continues


def test_slurm_script_expands_on_each_node(tmp_path):
    """Run the srun line's inner command through bash with fake SLURM variables: the values arrive intact."""
    plan = planned(YAML / "imagenet_lt_r50_ssesam_slurm.yaml", "launcher.torchrun.executable=echo",
                   "program.args.note=$${SLURM_JOB_ID}/a b")
    inner = shlex.split(srun_line(plan.files["launch-job.sbatch"]))[-1]
    env = {"SLURM_NNODES": "2", "HEAD_NODE": "node7", "SLURM_JOB_ID": "42", "PATH": "/usr/bin:/bin"}
    out = processes.run(["bash", "-c", inner], env=env, check=True).stdout
    assert out.startswith("--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node7:29500 "
                          "--rdzv-id=42 ")
    assert "--note 42/a b" in out


def test_slurm_deepspeed_script():
    plan = planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "launcher.kind=slurm",
                   "launcher.slurm.runner=deepspeed", "launcher.slurm.nodes=2", "launcher.slurm.gpus_per_node=4",
                   "~launcher.deepspeed.num_gpus", "launcher.slurm.submit=true")
    script = plan.files["launch-job.sbatch"]
    assert plan.execute and "ds_config.json" in plan.files
    assert json.loads(plan.files["ds_config.json"])["train_micro_batch_size_per_gpu"] == 64
    assert 'export HOSTFILE=runs/inat2018/r50-focalsam/hostfile."${SLURM_JOB_ID}"' in script
    assert 'sed "s/\\$/ slots=4/" > "$HOSTFILE"' in script
    inner = shlex.split(srun_line(script))[-1]
    assert inner.startswith(f'{PY} -m deepspeed.launcher.runner --hostfile="${{HOSTFILE}}" '
                            '--master_addr="${HEAD_NODE}" --master_port=29500 --node_rank="${SLURM_NODEID}" '
                            '--no_ssh --no_local_rank --module ltsam.train ')


FAKE_SRUN = """#!/bin/bash
# a job step that runs until SIGTERM, then checkpoints and exits as ltsam.train does at a stop signal
trap 'echo "step got TERM" >> "$LOG"; exit 75' TERM
echo "step started" >> "$LOG"
while :; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in show) echo node1 ;; *) echo "scontrol $*" >> "$LOG" ;; esac
"""


def test_slurm_script_requeues_at_the_stop_signal(tmp_path):
    """The dry run's sbatch script asks for requeue and a signal ahead of the time limit; run under bash with
    a fake srun and scontrol, USR1 to the batch shell reaches the step as SIGTERM and the job is requeued."""
    plan = planned(YAML / "imagenet_lt_r50_ssesam_slurm.yaml", "launcher.slurm.signal=USR1@300",
                   "launcher.slurm.setup=[]")
    script = plan.files["launch-job.sbatch"]
    assert {"#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"} <= set(script.splitlines())
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(script)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n1",
           "SLURM_NNODES": "1"}
    with processes.started(["bash", str(tmp_path / "job.sbatch")], env=env, cwd=tmp_path,
                           stderr=subprocess.PIPE) as job:  # the step must be running before the signal comes
        processes.wait_until(lambda: log.is_file() and "step started" in log.read_text(), job)
        job.send_signal(signal.SIGUSR1)
        _, err = processes.finish(job)
    assert job.returncode == 75
    assert log.read_text().splitlines() == ["step started", "step got TERM", "scontrol requeue 42"]
    assert "requeueing job 42" in err
    no_requeue = planned(YAML / "imagenet_lt_r50_ssesam_slurm.yaml", "launcher.slurm.requeue=false")
    assert "--requeue" not in no_requeue.files["launch-job.sbatch"] and "--resume auto" not in srun_line(
        no_requeue.files["launch-job.sbatch"])


def test_launcher_never_imports_torch():
    code = ("import sys, ltsam_launch.cli, ltsam_launch.schema, ltsam_launch.runner, ltsam_launch.backends; "
            "assert 'ltsam_common.names' in sys.modules and 'ltsam_common.yamlio' in sys.modules; "
            "assert not any(m in ('torch', 'ltsam') or m.startswith(('torch.', 'ltsam.')) for m in sys.modules), "
            "'imported'")
    processes.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_imagenet_focalsam_recipe_has_its_stepped_radius():
    from ltsam.train.args import parse_args

    argv = planned(YAML / "imagenet_lt_r50_focalsam_torchrun.yaml").commands[0]
    assert argv[:4] == [tool("torchrun"), "--standalone", "--nproc-per-node=2", "-m"]
    args = parse_args(argv[argv.index("ltsam.train") + 1:])
    assert (args.opt, args.opt_kwargs) == ("focalsam", {"rho": 0.1, "gamma": 0.8, "lam": 0.8, "base": "momentum"})
    assert (args.rho_sched, args.rho_decay_milestones, args.rho_decay_rate) == ("multistep", [160], 2.0)
    assert (args.wd_profile, args.weight_decay, args.loss, args.epochs, args.batch_size) == (
        "official", 5e-4, "la", 200, 128)
