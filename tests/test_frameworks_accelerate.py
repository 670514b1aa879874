"""The README's Accelerate loop on 2 processes equals one process with the global batch (also with ltsam's
micro-batches; within 1e-6, a model without BatchNorm), bf16 runs, fp16 with Accelerate's GradScaler equals the
engine's own scaler path (in this process), and ``accelerator.accumulate`` with ``gradient_accumulation_steps > 1``
is refused with the reason."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COUNTS, conv_bn_net, conv_gn_net

pytest.importorskip("accelerate", reason="Accelerate is in the frameworks extra: pip install -e '.[frameworks]'")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import get_grad_scaler  # noqa: E402
from accelerate_worker import CONFIGS, PER_PROCESS, create, dataset, fresh_accelerator  # noqa: E402
from test_optim_exact import closure_for  # noqa: E402

from ltsam.optim import unwrap  # noqa: E402

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


@pytest.fixture
def accelerate_here():
    """Accelerate in this process: its singleton state is reset afterwards."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


FP16 = {"sam": ("sam", {}), "ssesam": ("ssesam", {"class_counts": CLASS_COUNTS, "epochs": 2, "gamma": 0.5})}


def accelerate_fp16(net: torch.nn.Module, method: str, **scaler_options) -> tuple[list[int], torch.optim.Optimizer,
                                                                                   torch.amp.GradScaler]:
    """The README's fp16 loop: Accelerate autocasts the prepared model, the engine scales with accelerator.scaler."""
    accelerator = fresh_accelerator(mixed_precision="fp16")
    if accelerator.scaler is None:  # on CPU Accelerate makes neither; on a GPU its __init__ sets these two
        accelerator.native_amp = True
        accelerator.scaler = get_grad_scaler(accelerator.distributed_type, **scaler_options)
    model, opt, loader = accelerator.prepare(net, create(net, *FP16[method]),
                                             torch.utils.data.DataLoader(dataset(), batch_size=PER_PROCESS))
    net, sam = accelerator.unwrap_model(model), unwrap(opt)
    sam.attach(net)
    stages = []
    for epoch in range(2):
        sam.set_epoch(epoch)
        for x, y in loader:
            sam.step(closure_for(net, x, y), targets=y, scaler=accelerator.scaler)
            stages.append(getattr(sam, "stage", 1))
    return stages, sam, accelerator.scaler


def engine_fp16(net: torch.nn.Module, method: str) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """The engine's own scaler path under the same autocast (Accelerate's: float16, outputs back to float32)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return net(x).float()

    opt, scaler = create(net, *FP16[method]).attach(net), torch.amp.GradScaler("cpu")
    for epoch in range(2):
        opt.set_epoch(epoch)
        for x, y in torch.utils.data.DataLoader(dataset(), batch_size=PER_PROCESS):
            opt.step(closure_for(forward, x, y), targets=y, scaler=scaler)
    return opt, scaler


@pytest.mark.parametrize("method,net", [("sam", conv_gn_net), ("ssesam", conv_gn_net), ("sam", conv_bn_net)])
def test_fp16_with_accelerates_scaler_equals_the_engines_scaler_path(accelerate_here, one_thread, method, net):
    torch.manual_seed(0)
    start = net()
    model = copy.deepcopy(start)
    stages, sam, scaler = accelerate_fp16(model, method)
    reference = copy.deepcopy(start)
    opt, own_scaler = engine_fp16(reference, method)
    for p, q in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(p, q)
    assert scaler.state_dict() == own_scaler.state_dict() and sam.skipped_steps == opt.skipped_steps == 0
    assert stages == ([1, 1, 2, 2] if method == "ssesam" else [1] * 4)


def test_fp16_overflowing_step_is_skipped(accelerate_here, one_thread):
    """A scale that overflows the fp16 gradient: the step leaves the model as it was (BN buffers included), is
    counted, and the scale is halved."""
    torch.manual_seed(0)
    start = conv_bn_net()
    model = copy.deepcopy(start)
    accelerator = fresh_accelerator(mixed_precision="fp16")
    accelerator.native_amp, accelerator.scaler = True, get_grad_scaler(accelerator.distributed_type,
                                                                       init_scale=2.0 ** 40)
    model, opt = accelerator.prepare(model, create(model, "sam", {}))
    net, sam = accelerator.unwrap_model(model), unwrap(opt).attach(accelerator.unwrap_model(model))
    x, y = dataset().tensors
    sam.step(closure_for(net, x[:PER_PROCESS], y[:PER_PROCESS]), targets=y[:PER_PROCESS], scaler=accelerator.scaler)
    for p, q in zip(net.state_dict().values(), start.state_dict().values()):
        assert torch.equal(p, q)
    assert sam.skipped_steps == 1 and accelerator.scaler.get_scale() == 2.0 ** 39
