"""Validation before anything starts: each error names the file, the key, the value (and a suggestion)."""

from __future__ import annotations

import sys

import processes
import pytest
from launch_helpers import ROOT, YAML, planned, write

from ltsam_common.names import SAM_METHODS
from ltsam_launch.errors import RecipeError

PROGRAM = "program:\n  module: ltsam.train\n  args: {opt: sgd}\n"


def error(path, *overrides, env=None) -> str:
    with pytest.raises(RecipeError) as err:
        planned(path, *overrides, env=env)
    return str(err.value)


def test_unknown_key_suggests_nearest(tmp_path):
    path = write(tmp_path / "r.yaml", PROGRAM + "launcher:\n  kind: torchrun\n  torchrun: {nproc_per_nod: 8}\n")
    assert error(path) == (f"{path}:6: launcher.torchrun.nproc_per_nod = 8: unknown key; "
                           "did you mean 'nproc_per_node'?")


def test_unknown_key_from_command_line_names_it():
    message = error(YAML / "quickstart.yaml", "launcher.knd=torchrun")
    assert message == "command line: launcher.knd = 'torchrun': unknown key; did you mean 'kind'?"


def test_error_names_the_base_file_that_set_the_key(tmp_path):
    write(tmp_path / "base.yaml", PROGRAM + "global_batch_size: 60\n")
    child = write(tmp_path / "child.yaml",
                  "base: base.yaml\nlauncher: {kind: torchrun, torchrun: {nproc_per_node: 8}}\n")
    assert error(child).startswith(f"{tmp_path / 'base.yaml'}:4: global_batch_size = 60: does not divide")


@pytest.mark.parametrize("override, expected", [
    ("global_batch_size=abc", "global_batch_size = 'abc': expected int, got str"),
    ("global_batch_size=true", "global_batch_size = True: expected int, got bool"),
    ("global_batch_size=0", "global_batch_size = 0: must be at least 1"),
    ("precision=fp8", "precision = 'fp8': expected one of 'fp32', 'bf16', 'fp16', got str"),
    ("launcher.kind=mpi", "launcher.kind = 'mpi': expected one of 'local', 'torchrun', 'deepspeed', 'slurm'"),
    ("launcher.env={A: [1]}", "launcher.env = {'A': [1]}: holds [1] (list)"),
    ("program.args.x={a: {b: 1}}", "program.args.x = {'a': {'b': 1}}: only scalars, lists and flat mappings"),
    ("program.script=t.py", "program = {"),
    ("precision=bf16", "precision = 'bf16': set precision or program.args.amp/amp_dtype, not both"),
])
def test_wrong_types_and_conflicts(override, expected):
    extra = ["program.args.amp=true"] if override.startswith("precision=bf16") else []
    assert expected in error(YAML / "quickstart.yaml", override, *extra)


def test_batch_must_divide_world_and_not_be_given_twice():
    message = error(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml", "global_batch_size=100")
    assert message == "command line: global_batch_size = 100: does not divide by the world size 16"
    assert "not both" in error(YAML / "quickstart.yaml", "program.args.batch_size=32")
    assert "needs a fixed world size" in error(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml",
                                               "launcher.torchrun.nnodes=1:4", "~scale")
    assert error(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml", "launcher.torchrun.nnodes=1:4").startswith(
        f"{YAML / 'imagenet_lt_r50_ssesam_torchrun.yaml'}:8: scale = {{'keep': 'global_batch', "
        "'reference_world_size': 16}: needs a fixed world size")


@pytest.mark.parametrize("overrides, expected", [
    (["launcher.torchrun.rdzv_backend=static"], "static rendezvous on several nodes needs node_rank"),
    (["launcher.torchrun.rdzv_backend=static", "launcher.torchrun.node_rank=2", "launcher.torchrun.master_addr=h",
      "~launcher.torchrun.rdzv_endpoint"], "node_rank = 2: must be below nnodes (2)"),
    (["launcher.torchrun.master_port=1"], "master_port = 1: only for rdzv_backend: static"),
    (["~launcher.torchrun.rdzv_endpoint"], "c10d on several nodes needs HOST:PORT"),
    (["launcher.torchrun.nnodes=4:1"], "nnodes = '4:1': expected an int or MIN:MAX"),
    (["launcher.torchrun.nproc_per_node=0"], "must be at least 1"),
])
def test_torchrun_world_checks(overrides, expected):
    assert expected in error(YAML / "imagenet_lt_r50_ssesam_torchrun.yaml", *overrides)


def test_deepspeed_hostfile_checks(tmp_path):
    recipe = YAML / "inat2018_r50_focalsam_deepspeed.yaml"
    missing = tmp_path / "nope"
    assert error(recipe, "~launcher.deepspeed.num_gpus", f"launcher.deepspeed.hostfile={missing}") == (
        f"command line: launcher.deepspeed.hostfile = '{missing}': hostfile not found")
    hosts = write(tmp_path / "hosts", "# two nodes\nw0 slots=4\nw1 slots=4\n")
    ok = ["~launcher.deepspeed.num_gpus", f"launcher.deepspeed.hostfile={hosts}"]
    assert "--batch-size 64" in " ".join(planned(recipe, *ok).commands[0])  # 512 over 8
    assert "--batch-size 128" in " ".join(planned(recipe, *ok, "launcher.deepspeed.include=w1").commands[0])
    assert "does not divide by the world size 7" in error(recipe, *ok, "launcher.deepspeed.exclude=w1:0")
    assert "host 'w9' is not in the hostfile" in error(recipe, *ok, "launcher.deepspeed.include=w9")
    assert "has only 2 host(s)" in error(recipe, *ok, "launcher.deepspeed.num_nodes=3")
    assert "does not combine include/exclude with num_gpus" in error(recipe, "launcher.deepspeed.include=w0")
    write(hosts, "w0 slots=4\nw0 slots=4\n")
    assert "hosts:2: duplicate host" in error(recipe, *ok)


def test_deepspeed_needs_a_known_world_and_batch():
    recipe = YAML / "inat2018_r50_focalsam_deepspeed.yaml"
    assert "set num_gpus (or a hostfile)" in error(recipe, "~launcher.deepspeed.num_gpus")
    assert "DeepSpeed needs a batch size" in error(recipe, "~global_batch_size")
    assert "no_ssh runs once per node" in error(recipe, "launcher.deepspeed.multinode_launcher=no_ssh")


@pytest.mark.parametrize("opt", [*SAM_METHODS, "SAM", "lookahead_ssesam"])
def test_zero3_refused_for_the_sam_family(opt):
    message = error(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "launcher.deepspeed.zero_stage=3",
                    f"program.args.opt={opt}")
    assert message.startswith("command line: launcher.deepspeed.zero_stage = 3: ZeRO-3 partitions the weights")


def test_zero3_from_a_config_file_is_refused_too(tmp_path):
    config = write(tmp_path / "ds.json", '{"zero_optimization": {"stage": 3}}')
    message = error(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "~launcher.deepspeed.zero_stage",
                    f"launcher.deepspeed.config_file={config}")
    assert "launcher.deepspeed.config_file" in message and "ZeRO-3" in message
    planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "launcher.deepspeed.zero_stage=3", "program.args.opt=adamw")


def test_fp16_on_cpu_refused():
    message = error(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "precision=fp16", "program.args.device=cpu")
    assert message == "command line: precision = 'fp16': DeepSpeed has no fp16 on CPU; use bf16 or fp32"
    planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "precision=bf16", "program.args.device=cpu")


def test_slurm_rejects_what_slurm_decides():
    message = error(YAML / "imagenet_lt_r50_ssesam_slurm.yaml", "launcher.torchrun.nnodes=4")
    assert message.startswith("command line: launcher.torchrun.nnodes = 4: set by the SLURM launcher")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path / "r.yaml", PROGRAM + "launchr: {kind: local}\n")
    result = processes.run([sys.executable, "-m", "ltsam_launch.cli", str(path), "--dry-run"], cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"ltsam-launch: {path}:4: launchr = {{'kind': 'local'}}: unknown key; "
                             "did you mean 'launcher'?\n")
