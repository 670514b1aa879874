"""Cluster defaults: rendezvous host required on several nodes, one interpreter in the sbatch script, hostile
recipe values stay one argument each, `launcher.env` names, and the batch / lr scale rule of the dry run."""

from __future__ import annotations

import json
import shlex
import stat
import sys
from pathlib import Path

import processes
import pytest
from launch_helpers import ENV, YAML, planned, srun_line

from ltsam_launch import backends, cli, recipe, scale
from ltsam_launch.errors import RecipeError

SLURM = YAML / "imagenet_lt_r50_ssesam_slurm.yaml"
TORCHRUN = YAML / "imagenet_lt_r50_ssesam_torchrun.yaml"
HOSTILE = "a b'c\"d $(touch pwned) `id` ; e & f | g # h \\ i $HOME ~ *"
MULTILINE = HOSTILE + "\n$(touch pwned2)\n"  # a line break is fine in a shell word, not in an #SBATCH line


def multi_node_recipes() -> list[Path]:
    """Every shipped recipe whose launcher starts on several nodes and needs a rendezvous host from the user
    (SLURM finds its head node itself)."""
    found = []
    for path in sorted(YAML.glob("*.yaml")):
        loaded = recipe.load(path, (), ENV)
        nnodes = loaded.get("launcher.torchrun.nnodes", 1)
        if backends.kind(loaded) == "torchrun" and nnodes != 1:
            found.append(path)
    return found


def test_there_is_a_multi_node_recipe():
    assert TORCHRUN in multi_node_recipes()


@pytest.mark.parametrize("path", multi_node_recipes(), ids=lambda p: p.stem)
def test_multi_node_without_rendezvous_host_fails_naming_key_and_variable(path, capsys, monkeypatch):
    monkeypatch.delenv("RDZV_HOST", raising=False)
    assert cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "launcher.torchrun.rdzv_endpoint" in err and "RDZV_HOST" in err and str(path) in err
    monkeypatch.setenv("RDZV_HOST", "")  # set but empty: the host part is empty
    assert cli.main([str(path), "--dry-run"]) == 2
    assert "launcher.torchrun.rdzv_endpoint = ':29500': c10d on several nodes needs HOST:PORT" in \
        capsys.readouterr().err


def test_single_node_recipe_with_multi_node_override_needs_a_host():
    with pytest.raises(RecipeError, match="rdzv_endpoint = ':29400': c10d on several nodes needs HOST:PORT"):
        planned(YAML / "quickstart.yaml", "launcher.kind=torchrun", "launcher.torchrun.nnodes=2",
                "launcher.torchrun.rdzv_backend=c10d", "launcher.torchrun.rdzv_endpoint=:29400")


def test_sbatch_uses_one_interpreter():
    """After `setup` activates a venv, torchrun is that venv's module, not the submitting machine's binary."""
    inner = shlex.split(srun_line(planned(SLURM).files["launch-job.sbatch"]))[-1]
    assert inner.startswith("python -m torch.distributed.run ")
    inner = shlex.split(srun_line(planned(SLURM, "~launcher.slurm.setup").files["launch-job.sbatch"]))[-1]
    assert inner.startswith(f"{shlex.quote(sys.executable)} -m torch.distributed.run ")
    script = planned(SLURM, "launcher.python=/opt/env/bin/python3").files["launch-job.sbatch"]
    inner = shlex.split(srun_line(script))[-1]
    assert inner.startswith("/opt/env/bin/python3 -m torch.distributed.run ")


@pytest.mark.parametrize("key", ["A B", "1X", "X;rm", "X=Y", "$X"])
def test_env_keys_must_be_names(key):
    with pytest.raises(RecipeError, match="not an environment variable name"):
        planned(SLURM, f"launcher.env={json.dumps({key: 1})}")


@pytest.mark.parametrize("override", ['launcher.slurm.partition="gpu\\nhostile"', 'launcher.slurm.job_name="a\\rb"',
                                      'launcher.slurm.sbatch_args=["--comment=a\\nb"]'])
def test_line_breaks_in_sbatch_lines_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(RecipeError, match=f"{key} = .*: a line break or NUL cannot be written into an #SBATCH line"):
        planned(SLURM, override)


def _fake_tools(folder: Path) -> Path:
    """`srun` runs what follows its options, `scontrol show hostnames` prints two nodes; the "torchrun"
    prints its argv as JSON (one line) and the environment variables the recipe sets."""
    folder.mkdir()
    tools = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == -* ]]; do echo "srun-option $1" >&2; shift; done\nexec "$@"\n',
        "scontrol": "#!/bin/bash\nprintf 'node7\\nnode8\\n'\n",
        "argv dump": f"#!{sys.executable}\nimport json, os, sys\n"
                     "env = {k: os.environ.get(k) for k in ('NCCL_SOCKET_IFNAME', 'HOSTILE_ENV')}\n"
                     "print(json.dumps({'argv': sys.argv[1:], **env}))\n",
    }
    for name, text in tools.items():
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def test_hostile_values_stay_one_argument_each(tmp_path):
    """Every recipe value reaches sbatch, the shell and the program as exactly itself, one argument each."""
    tools = _fake_tools(tmp_path / "fake bin")
    out = tmp_path / "out dir #1"
    plan = planned(SLURM, f"launcher.torchrun.executable={json.dumps(str(tools / 'argv dump'))}",
                   "~launcher.slurm.setup", f"launcher.log_dir={json.dumps(str(out))}",
                   f"launcher.slurm.job_name={json.dumps(HOSTILE)}", f"launcher.slurm.partition={json.dumps(HOSTILE)}",
                   f"launcher.slurm.sbatch_args={json.dumps(['--comment=' + HOSTILE])}",
                   f"launcher.slurm.srun_args={json.dumps(['--label=' + HOSTILE])}",
                   f"launcher.env={json.dumps({'NCCL_SOCKET_IFNAME': '^lo,docker', 'HOSTILE_ENV': MULTILINE})}",
                   f"program.args.note={json.dumps(MULTILINE)}", f"program.args.tags={json.dumps([HOSTILE, 'x y'])}")
    text = plan.files["launch-job.sbatch"]
    sbatch = {line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")}
    parsed = [shlex.split(line) for line in sbatch]
    assert all(len(words) == 1 for words in parsed), parsed  # sbatch reads quotes and backslashes as shlex does
    options = {words[0] for words in parsed}
    for expected in (f"--job-name={HOSTILE}", f"--partition={HOSTILE}", f"--comment={HOSTILE}",
                     f"--output={out / 'slurm-%j.out'}", "--cpus-per-task=64", f"--chdir={Path.cwd()}"):
        assert expected in options
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    processes.run(["bash", "-n", str(script)], check=True)

    env = {"PATH": f"{tools}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[7-8]",
           "HOME": str(tmp_path / "home")}  # set, so an unquoted $HOME would show
    run = processes.run(["bash", str(script)], env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert f"srun-option --label={HOSTILE}" in run.stderr and "srun-option --cpus-per-task=64" in run.stderr
    seen = json.loads(run.stdout)
    assert seen["NCCL_SOCKET_IFNAME"] == "^lo,docker" and seen["HOSTILE_ENV"] == MULTILINE
    argv = seen["argv"]
    assert argv[:5] == ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node7:29500",
                        "--rdzv-id=42"]
    assert argv[argv.index("--note") + 1] == MULTILINE
    assert argv[argv.index("--tags") + 1: argv.index("--tags") + 3] == [HOSTILE, "x y"]


# -- the batch / lr scale rule -----------------------------------------------------------------------------
def dry_run(capsys, *overrides: str) -> tuple[str, list[str]]:
    assert cli.main([str(TORCHRUN), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("# scale: "))
    return note, shlex.split(out.splitlines()[-1])


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture
def rdzv(monkeypatch):
    monkeypatch.setenv("RDZV_HOST", "node0")


@pytest.mark.parametrize("nnodes, keep, rule, batch, lr, text", [
    (2, "global_batch", "linear", 16, "0.1", "global batch 256 kept = 16 per process x 16 process(es) x 1 "
                                             "micro-batch(es); lr 0.1 kept"),
    (4, "global_batch", "linear", 8, "0.1", "global batch 256 kept = 8 per process x 32 process(es)"),
    (4, "per_gpu_batch", "linear", 16, "0.2", "per-process batch 16 kept, global batch 256 -> 512 = 16 per process "
                                              "x 32 process(es) x 1 micro-batch(es); lr 0.1 -> 0.2 (linear, global "
                                              "batch x2)"),
    (8, "per_gpu_batch", "sqrt", 16, "0.2", "global batch 256 -> 1024"),
    (1, "per_gpu_batch", "sqrt", 16, "0.0707106781187", "lr 0.1 -> 0.0707106781187 (sqrt, global batch x0.5)"),
    (4, "per_gpu_batch", "none", 16, "0.1", "lr 0.1 -> 0.1 (none, global batch x2)"),
])
def test_scale_rule_in_the_dry_run(capsys, rdzv, nnodes, keep, rule, batch, lr, text):
    note, argv = dry_run(capsys, f"launcher.torchrun.nnodes={nnodes}", f"scale.keep={keep}", f"scale.lr_scale={rule}")
    assert note.startswith(f"# scale: world size {8 * nnodes} (recipe written for 16); ") and text in note
    assert flag(argv, "--batch-size") == str(batch) and flag(argv, "--lr") == lr


def test_scale_rule_with_accumulation(capsys, rdzv):
    note, argv = dry_run(capsys, "launcher.torchrun.nnodes=4", "program.args.grad_accum_steps=2")
    assert "global batch 256 kept = 4 per process x 32 process(es) x 2 micro-batch(es)" in note
    assert flag(argv, "--batch-size") == "4" and flag(argv, "--grad-accum-steps") == "2"


def test_scale_rule_from_a_per_process_batch(capsys, rdzv):
    note, argv = dry_run(capsys, "~global_batch_size", "program.args.batch_size=32", "scale.keep=per_gpu_batch")
    assert "per-process batch 32 kept, global batch 512 -> 512" in note and flag(argv, "--batch-size") == "32"
    note, argv = dry_run(capsys, "~global_batch_size", "program.args.batch_size=32", "launcher.torchrun.nnodes=4")
    assert "global batch 512 kept = 16 per process x 32 process(es)" in note and flag(argv, "--batch-size") == "16"


def test_scale_rule_reaches_the_deepspeed_config():
    plan = planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "scale.keep=per_gpu_batch",
                   "scale.reference_world_size=2", "scale.lr_scale=sqrt")
    config = json.loads(plan.files["ds_config.json"])
    assert config["train_batch_size"] == 1024 and config["train_micro_batch_size_per_gpu"] == 256
    argv = plan.commands[0]
    assert flag(argv, "--batch-size") == "256" and float(flag(argv, "--lr")) == pytest.approx(0.2 * 2**0.5)


@pytest.mark.parametrize("overrides, message", [
    (["~scale.reference_world_size"], "scale.reference_world_size = None: set the world size"),
    (["scale.keep=per_gpu_batch", "~program.args.lr"], "scale.lr_scale = 'linear': needs program.args.lr"),
    (["scale.keep=per_gpu_batch", "scale.reference_world_size=3"], "does not divide by the reference world size 3"),
    (["program.args.grad_accum_steps=3"], "global_batch_size = 256: does not divide by the world size 16 x 3 micro"),
    (["scale.keep=all"], "scale.keep = 'all': expected one of 'global_batch', 'per_gpu_batch'"),
    (["scale.lr_scale=cubic"], "scale.lr_scale = 'cubic': expected one of 'linear', 'sqrt', 'none'"),
])
def test_scale_rule_errors_name_the_key(overrides, message):
    with pytest.raises(RecipeError) as err:
        planned(TORCHRUN, *overrides)
    assert message in str(err.value)


def test_grad_accumulation_under_deepspeed_is_refused():
    with pytest.raises(RecipeError, match="program.args.grad_accum_steps = 2: ltsam train does not accumulate"):
        planned(YAML / "inat2018_r50_focalsam_deepspeed.yaml", "program.args.grad_accum_steps=2")


def test_trainer_and_launcher_share_the_lr_rule():
    """`ltsam train` without --lr derives it with the launcher's function (timm's rule, accumulation counted)."""
    from ltsam.train.args import parse_args, resolve_lr

    args = parse_args(["--dataset", "folder", "--opt", "adamw", "-b", "32", "--grad-accum-steps", "2",
                       "--lr-base", "0.001"])
    resolve_lr(args, world_size=2)
    assert args.lr == pytest.approx(scale.scale_lr(0.001, 32 * 2 * 2, 256, "sqrt")) == pytest.approx(0.001 * 0.5**0.5)
    args = parse_args(["--dataset", "folder", "-b", "16", "--lr-base", "0.1"])
    resolve_lr(args, world_size=4)
    assert args.lr == pytest.approx(0.1 * 64 / 256)
    assert scale.default_lr_scale("lamb") == "sqrt" and scale.default_lr_scale("momentum") == "linear"


def test_launcher_env_reaches_the_local_child():
    plan = planned(YAML / "quickstart.yaml", 'launcher.env={NCCL_DEBUG: WARN, OMP_NUM_THREADS: 2}')
    assert backends.environment(plan)["NCCL_DEBUG"] == "WARN" and plan.env["OMP_NUM_THREADS"] == "2"
