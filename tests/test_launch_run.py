"""Real launches: exit codes, signal forwarding, files written next to the output, a 2-process torchrun on
CPU, and (when available) DeepSpeed and the quickstart through ltsam.train."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from contextlib import AbstractContextManager

import processes
import pytest
from launch_helpers import ROOT, YAML, write

from ltsam_launch import cli

CHILD = """
import signal, sys, time, pathlib
out = pathlib.Path(sys.argv[sys.argv.index('--output') + 1])
def stop(signum, frame):
    (out / 'got').write_text(signal.Signals(signum).name)
    sys.exit(7)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
(out / 'ready').write_text('1')
code = int(sys.argv[sys.argv.index('--exit-code') + 1])
if code < 0:
    time.sleep(60)
sys.exit(code)
"""

WORLD = """
import json, os, pathlib, sys
import torch.distributed as dist
dist.init_process_group("gloo")
t = __import__("torch").tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
out = pathlib.Path(sys.argv[sys.argv.index('--output') + 1])
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps({**{k: os.environ[k] for k in keys}, "sum": t.item()}))
dist.destroy_process_group()
"""


def recipe(tmp_path, script: str, launcher: str, code: int = 0):
    child = write(tmp_path / "child.py", script)
    return write(tmp_path / "r.yaml", f"""
program:
  script: {child}
  args: {{output: {tmp_path / 'out'}, exit_code: {code}}}
launcher:
{launcher}
""")


def launch(path, *overrides) -> AbstractContextManager[subprocess.Popen[str]]:
    """The launcher in its own process group, killed whole (with what it started) when the block ends."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return processes.started([sys.executable, "-m", "ltsam_launch.cli", str(path), *overrides], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_and_files_written(tmp_path, code):
    (tmp_path / "out").mkdir()
    path = recipe(tmp_path, CHILD, "  kind: local\n  env: {LTSAM_TEST: '1'}", code)
    assert cli.main([str(path)]) == code
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["launch-command.sh", "launch-recipe.yaml", "ready"]
    assert "--exit-code" in (tmp_path / "out" / "launch-command.sh").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_child_code_returned(tmp_path, sig):
    (tmp_path / "out").mkdir()
    with launch(recipe(tmp_path, CHILD, "  kind: local", -1)) as proc:
        processes.wait_until((tmp_path / "out" / "ready").exists, proc)
        proc.send_signal(sig)
        processes.finish(proc)
    assert proc.returncode == 7
    assert (tmp_path / "out" / "got").read_text() == sig.name


def test_missing_executable_exits_127(tmp_path, capsys):
    path = recipe(tmp_path, CHILD, "  kind: local\n  python: /no/such/python")
    assert cli.main([str(path)]) == 127
    assert "cannot start /no/such/python" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(tmp_path):
    (tmp_path / "out").mkdir()
    path = recipe(tmp_path, WORLD, "  kind: torchrun\n  env: {OMP_NUM_THREADS: '1'}\n"
                                   "  torchrun: {nproc_per_node: 2, rdzv_backend: c10d, rdzv_endpoint: 'localhost:0'}")
    with launch(path, "~program.args.exit_code") as proc:
        _, err = processes.finish(proc)
    assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "sum": 3.0} for r in (0, 1)]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra)")
def test_deepspeed_two_processes_on_cpu(tmp_path):
    (tmp_path / "out").mkdir()
    script = WORLD.replace('dist.init_process_group("gloo")', "import deepspeed; deepspeed.init_distributed()")
    port = processes.free_port()  # the deepspeed runner's rendezvous: a port the OS says is free, never a fixed one
    path = recipe(tmp_path, script, "  kind: deepspeed\n  env: {DS_ACCELERATOR: cpu, OMP_NUM_THREADS: '1'}\n"
                                    f"  deepspeed: {{num_gpus: 2, zero_stage: 1, master_port: {port}}}")
    with launch(path, "~program.args.exit_code", "global_batch_size=4") as proc:
        _, err = processes.finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "out" / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == 2
    assert [json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["WORLD_SIZE"] for r in (0, 1)] == ["2"] * 2


def _trainer_available() -> bool:
    probe = processes.run([sys.executable, "-c", "import ltsam.train"])
    return probe.returncode == 0 and importlib.util.find_spec("ltsam.train.__main__") is not None


@pytest.mark.skipif(not _trainer_available(), reason="ltsam.train (the trainer) is not there yet")
def test_quickstart_runs_through_ltsam_train(tmp_path):
    with launch(YAML / "quickstart.yaml", f"program.args.output={tmp_path}", "program.args.epochs=1") as proc:
        _, err = processes.finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "launch-recipe.yaml").exists()
