"""``--device-modules ltsam.timm`` against a real timm train.py.

train.py is not in the timm wheel and is not copied here: the tests that need it run when
``LTSAM_TIMM_TRAIN_PY`` names a checkout of it (``tools/get_timm_train.sh v1.0.28 /tmp/train.py``) and skip
otherwise. Use a train.py no newer than the installed timm; an older one runs with that timm version first on
PYTHONPATH (e.g. ``pip install --no-deps --target /tmp/timm1022 timm==1.0.22``).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from packaging import version
from PIL import Image
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import NativeScaler
from torch import nn

import ltsam

pytestmark = pytest.mark.filterwarnings("ignore:ltsam.timm found no train_one_epoch")

TRAIN_PY = os.environ.get("LTSAM_TIMM_TRAIN_PY")
needs_train_py = pytest.mark.skipif(
    not TRAIN_PY, reason="set LTSAM_TIMM_TRAIN_PY=/path/to/timm/train.py (tools/get_timm_train.sh)"
)


def test_per_sample_criterion_is_train_pys_loss_before_its_mean():
    from ltsam.timm import per_sample_criterion

    torch.manual_seed(0)
    logits, hard = torch.randn(6, 5), torch.randint(0, 5, (6,))
    soft = torch.softmax(torch.randn(6, 5), -1)
    for criterion, target in [(LabelSmoothingCrossEntropy(0.1), hard), (nn.CrossEntropyLoss(), hard),
                              (nn.CrossEntropyLoss(label_smoothing=0.2), hard), (SoftTargetCrossEntropy(), soft)]:
        losses = per_sample_criterion(criterion)(logits, target)
        assert losses.shape == (6,)
        torch.testing.assert_close(losses.mean(), criterion(logits, target))
    with pytest.raises(ValueError, match="--bce-loss"):
        per_sample_criterion(BinaryCrossEntropy())


# -- in-process: train.py's own train_one_epoch, hooked, against ltsam's own step ------------------------------


@pytest.fixture(scope="module")
def train_module() -> ModuleType:
    """train.py imported as a module (its main() does not run), with the hook installed as --device-modules would."""
    import ltsam.timm

    spec = importlib.util.spec_from_file_location("timm_train_py", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert ltsam.timm.install(module)
    return module


def _epoch_kwargs(module: ModuleType, model: nn.Module, opt, data, criterion, **overrides) -> dict:
    """Arguments for either train_one_epoch form: ``task`` (timm >= 1.0.23) or ``loss_fn`` (<= 1.0.22)."""
    args = module.parser.parse_args([])
    args.prefetcher, args.distributed, args.world_size, args.rank, args.epochs = True, False, 1, 0, 2
    for key, value in overrides.pop("args", {}).items():
        setattr(args, key, value)
    kwargs = dict(epoch=0, model=model, loader=data, optimizer=opt, args=args, device=torch.device("cpu"))
    if "task" in inspect.signature(module.train_one_epoch).parameters:
        from timm.task import ClassificationTask

        kwargs["task"] = ClassificationTask(model, criterion=criterion, device=torch.device("cpu"), verbose=False)
    else:
        kwargs["loss_fn"] = criterion
    return {**kwargs, **overrides}


def _ssesam(model: nn.Module):
    return timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.05, class_counts=CLASS_COUNTS, eta=20,
                                          gamma=0.5, epochs=2)


@needs_train_py
@pytest.mark.parametrize("amp", ["fp32", "fp16-scaler"])
def test_hooked_epoch_equals_ltsams_own_step(train_module, amp):
    """Same weights, BN buffers and passes per step as opt.step(closure); train.py's backward adds nothing."""
    torch.manual_seed(0)
    hooked = conv_bn_net()
    own = copy.deepcopy(hooked)
    data = batches(3)
    smoothing = 0.1
    opt = _ssesam(hooked)
    loss_scaler = NativeScaler(device="cpu") if amp == "fp16-scaler" else None
    kwargs = _epoch_kwargs(train_module, hooked, opt, data, LabelSmoothingCrossEntropy(smoothing),
                           loss_scaler=loss_scaler)
    metrics = train_module.train_one_epoch(**kwargs)
    assert opt.epoch == 1 and "step" not in opt.__dict__ and "forward" not in hooked.__dict__

    reference = _ssesam(own).attach(own)
    scaler = torch.amp.GradScaler("cpu") if loss_scaler is not None else None
    losses = []
    for x, y in data:
        def closure(index=None, x=x, y=y):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return nn.functional.cross_entropy(own(xs), ys, reduction="none", label_smoothing=smoothing)

        reference.zero_grad()
        losses.append(float(reference.step(closure, targets=y, scaler=scaler)))
    reference.next_epoch()
    for (name, a), b in zip(hooked.state_dict().items(), own.state_dict().values()):
        assert torch.equal(a, b), name
    assert vars(opt.last_passes) == vars(reference.last_passes)
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    if loss_scaler is not None:
        assert loss_scaler._scaler.get_scale() == scaler.get_scale()


@needs_train_py
def test_step_the_loss_scaler_skips_is_counted(train_module):
    model = conv_bn_net()
    opt = _ssesam(model)
    (x, y), = batches(1)
    x[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    kwargs = _epoch_kwargs(train_module, model, opt, [(x, y)], nn.CrossEntropyLoss(),
                           loss_scaler=NativeScaler(device="cpu"))
    train_module.train_one_epoch(**kwargs)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@needs_train_py
@pytest.mark.parametrize("method", ["sam", "ssesam"])
def test_accumulated_micro_batches_equal_whole_batches(train_module, method):
    """--grad-accum-steps 2 over 7 micro-batches of 8 (updates of 2, 2, 2 and 1: timm's last shorter group) ends
    with the weights of batches 16, 16, 16, 8 on a GroupNorm net; passes are reported per micro-batch."""
    torch.manual_seed(0)
    whole_model = conv_gn_net()
    accum_model = copy.deepcopy(whole_model)
    data = batches(3) + [tuple(t[:8] for t in batches(1, seed=5)[0])]
    micro = [(x[i:i + 8], y[i:i + 8]) for x, y in data for i in range(0, len(y), 8)]
    assert len(micro) == 7

    def make(model):
        extra = {"class_counts": CLASS_COUNTS, "eta": 20, "gamma": 0.5, "epochs": 2} if method == "ssesam" else {}
        return timm.optim.create_optimizer_v2(model, opt=method, lr=0.05, **extra)

    whole_opt, accum_opt = make(whole_model), make(accum_model)
    whole = train_module.train_one_epoch(**_epoch_kwargs(train_module, whole_model, whole_opt, data,
                                                         nn.CrossEntropyLoss()))
    accum = train_module.train_one_epoch(**_epoch_kwargs(train_module, accum_model, accum_opt, micro,
                                                         nn.CrossEntropyLoss(), args={"grad_accum_steps": 2}))
    for (name, a), b in zip(whole_model.state_dict().items(), accum_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert accum_opt.last_passes.micro_batches == 1  # the epoch's last update had one micro-batch
    # train.py's epoch loss weighs each logged value by its batch: every sample's loss counts once in both
    assert accum["loss"] == pytest.approx(whole["loss"], rel=1e-5)


REFUSALS = [
    ({"args": {"mixup": 0.8}}, "--mixup/--cutmix"),
    ({"args": {"cutmix": 1.0}}, "--mixup/--cutmix"),
    ({"args": {"jsd_loss": True}}, "--jsd-loss"),
    ({"args": {"bce_loss": True}}, "--bce-loss"),
    ({"args": {"aug_splits": 2}}, "--aug-splits"),
    ({"naflex_mode": True}, "--naflex-loader"),
    ({"scheduled_batch_mode": True}, "--train-img-sizes"),
]


@needs_train_py
@pytest.mark.parametrize("overrides, flag", REFUSALS, ids=[flag for _, flag in REFUSALS])
def test_inexact_setups_are_refused_by_flag(train_module, overrides, flag):
    model = conv_bn_net()
    opt = _ssesam(model)
    params = inspect.signature(train_module.train_one_epoch).parameters
    if any(key not in params for key in overrides if key != "args"):
        pytest.skip(f"this train.py has no {flag}")
    kwargs = _epoch_kwargs(train_module, model, opt, batches(1), nn.CrossEntropyLoss(), **overrides)
    with pytest.raises(ValueError, match=flag):
        train_module.train_one_epoch(**kwargs)
    assert "step" not in opt.__dict__ and opt.epoch == 0


@needs_train_py
def test_plain_sgd_passes_through_untouched(train_module):
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    train_module.train_one_epoch(**_epoch_kwargs(train_module, model, opt, batches(1), nn.CrossEntropyLoss()))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# -- end to end: `python train.py --device-modules ltsam.timm --opt ssesam`, then --resume -------------------


def _image_folder(root: Path, counts: list[int]) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", counts), ("val", [2] * len(counts))):
        for label, n in enumerate(per_class):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (32, 32, 3)) + 50 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def _train_py(cwd: Path, *extra: str) -> str:
    # timm <= 1.0.28 asks for persistent workers even with --workers 0, which torch >= 2.14 refuses
    workers = "0" if version.parse(timm.__version__) >= version.parse("1.0.29.dev0") else "1"
    command = [sys.executable, TRAIN_PY, "--device-modules", "ltsam.timm", "--data-dir", "data",
               "--train-split", "train", "--val-split", "val", "--model", "resnet10t", "--img-size", "32",
               "--num-classes", "4", "-b", "8", "--workers", workers, "--device", "cpu", "--lr", "0.05",
               "--warmup-epochs", "0", "--output", "out", "--opt", "ssesam",
               "--opt-kwargs", "class_counts=counts.json", "eta=5", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only oversubscribe a shared CPU
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@needs_train_py
def test_train_py_trains_with_ssesam_and_resumes(tmp_path):
    counts = [12, 6, 3, 3]  # 24 images: 3 batches of 8 per epoch; eta=5 makes classes 2 and 3 the tail
    _image_folder(tmp_path / "data", counts)
    ltsam.counts.save_class_counts(counts, tmp_path / "counts.json")

    first = _train_py(tmp_path, "--epochs", "1", "--experiment", "first", "--amp", "--amp-dtype", "bfloat16")
    assert "ltsam.timm: epoch 0: 3 SSESAM steps" in first
    checkpoint = torch.load(tmp_path / "out" / "first" / "last.pth.tar", weights_only=False)
    assert checkpoint["optimizer"]["ltsam"]["epoch"] == 1
    assert any("momentum_buffer" in s for s in checkpoint["optimizer"]["state"].values())

    resumed = _train_py(tmp_path, "--epochs", "2", "--experiment", "resumed",
                        "--resume", str(tmp_path / "out" / "first" / "last.pth.tar"))
    assert "ltsam.timm: epoch 1: 3 SSESAM steps" in resumed and "epoch 0:" not in resumed
    assert torch.load(tmp_path / "out" / "resumed" / "last.pth.tar", weights_only=False)["optimizer"]["ltsam"][
        "epoch"] == 2


@needs_train_py
def test_train_py_accumulates_ssesam_steps(tmp_path):
    """`python train.py --grad-accum-steps 2`: 3 batches of 8 an epoch make 2 SSE-SAM steps (2 + 1 batches)."""
    counts = [12, 6, 3, 3]
    _image_folder(tmp_path / "data", counts)
    ltsam.counts.save_class_counts(counts, tmp_path / "counts.json")
    output = _train_py(tmp_path, "--epochs", "1", "--experiment", "accum", "--grad-accum-steps", "2")
    assert "ltsam.timm: epoch 0: 2 SSESAM steps" in output
