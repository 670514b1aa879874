"""The README's Accelerate loop on 2 processes equals one process with the global batch (also with ltsam's
micro-batches; within 1e-6, a model without BatchNorm), bf16 runs, and ``accelerator.accumulate`` with
``gradient_accumulation_steps > 1`` is refused with the reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import conv_gn_net

pytest.importorskip("accelerate", reason="Accelerate is in the frameworks extra: pip install -e '.[frameworks]'")
from accelerate_worker import CONFIGS, PER_PROCESS, create, dataset  # noqa: E402
from test_optim_exact import closure_for  # noqa: E402

HERE = Path(__file__).parent
WORLD = 2


def one_process(method: str, options: dict) -> list[torch.Tensor]:
    """The same epochs on one process whose batch is both processes' batches together."""
    torch.manual_seed(0)
    model = conv_gn_net()
    opt = create(model, method, options).attach(model)
    for epoch in range(2):
        opt.set_epoch(epoch)
        for x, y in torch.utils.data.DataLoader(dataset(), batch_size=PER_PROCESS * WORLD):
            opt.step(closure_for(model, x, y), targets=y)
    return [p.detach() for p in model.parameters()]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate") / "results.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(HERE / "accelerate_worker.py"), str(out)]  # --standalone: the rendezvous port comes from the OS
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process Accelerate run timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("name", [n for n, (_, _, precision, _) in CONFIGS.items() if precision == "no"])
def test_two_processes_equal_one_with_the_global_batch(two_processes, name):
    method, options, _, _ = CONFIGS[name]
    for a, b in zip(one_process(method, options), two_processes[name]):
        assert torch.allclose(a, b, atol=1e-6), f"{name}: {(a - b).abs().max()}"


def test_bf16_runs(two_processes):
    start = [p.detach() for p in (torch.manual_seed(0), conv_gn_net())[1].parameters()]
    moved = [(p - q).abs().max() for p, q in zip(two_processes["imbsam bf16"], start)]
    assert all(torch.isfinite(m) for m in moved) and max(moved) > 0


def test_accumulate_is_refused_with_the_reason(two_processes):
    assert two_processes["accumulate"] == (
        "SAM.step() inside Accelerator(gradient_accumulation_steps=2): Accelerate steps the optimizer on the last "
        "micro-batch only, so a SAM-family step would perturb and update along that micro-batch alone; keep "
        "gradient_accumulation_steps=1, give step() the whole batch and pass micro_batches=N (exact accumulation "
        "inside the step)")
