"""``--device-modules ltsam.timm`` against timm's real, unmodified train.py.

train.py is not in the timm wheel and is not copied here: the tests read the copies in
``../shared/timm-train/<tag>/train.py`` next to the repository (``LTSAM_TIMM_TRAIN_DIR`` overrides the folder;
``tools/get_timm_train.sh TAG DIR/TAG/train.py`` adds a tag) and run every tag found, each in its own form
(``task`` from 1.0.23, ``loss_fn`` before), with the installed timm. They skip only when the folder holds no
train.py, or for a tag newer than the installed timm.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import processes
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
from ltsam.data.balance import class_probabilities
from ltsam.data.samplers import ClassAwareSampler

pytestmark = pytest.mark.filterwarnings("ignore:ltsam.timm found no train_one_epoch")

REPO = Path(__file__).resolve().parents[1]
TRAIN_DIR = Path(os.environ.get("LTSAM_TIMM_TRAIN_DIR", REPO.parent / "shared" / "timm-train")).resolve()
TRAIN_PYS = {p.parent.name: p for p in sorted(TRAIN_DIR.glob("*/train.py"))}
NO_TRAIN_PY = (f"no timm train.py copies: {TRAIN_DIR}/<tag>/train.py is absent (set LTSAM_TIMM_TRAIN_DIR, or "
               "tools/get_timm_train.sh TAG DIR/TAG/train.py)")
needs_train_py = pytest.mark.skipif(not TRAIN_PYS, reason=NO_TRAIN_PY)


def train_py(tag: str) -> Path:
    """The copy of train.py at ``tag``; skips (by name) a tag newer than the installed timm."""
    if tag not in TRAIN_PYS:
        pytest.skip(f"train.py {tag} is absent from {TRAIN_DIR}" if TRAIN_PYS else NO_TRAIN_PY)
    if version.parse(tag.lstrip("v")) > version.parse(timm.__version__):
        pytest.skip(f"train.py {tag} is newer than the installed timm {timm.__version__}")
    return TRAIN_PYS[tag]


TAGS = sorted(TRAIN_PYS) or ["v1.0.28", "v1.0.22"]  # the copies CI has; absent ones skip with the reason


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


@pytest.fixture(scope="module", params=TAGS)
def train_module(request) -> ModuleType:
    """train.py imported as a module (its main() does not run), with the hook installed as --device-modules would."""
    import ltsam.timm

    path = train_py(request.param)
    spec = importlib.util.spec_from_file_location(f"timm_train_py_{request.param.replace('.', '_')}", path)
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


@needs_train_py
@pytest.mark.parametrize("method", ["imbsam", "ssesam"])
def test_test_vit_batches_of_8_with_one_tail_sample_step_as_the_official_code(train_module, method):
    """train.py --model test_vit -b 8: each batch holds exactly one tail sample (a one-sample pass through the
    cls token and position embedding); train.py's own epoch equals the official step, batch by batch."""
    import official

    torch.manual_seed(0)
    hooked = timm.create_model("test_vit", num_classes=10, img_size=32)
    ref = copy.deepcopy(hooked)
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(3):
        y = torch.randint(0, 6, (8,), generator=gen)
        y[int(torch.randint(0, 8, (1,), generator=gen))] = 9  # one tail sample, anywhere in the batch
        data.append((torch.randn(8, 3, 32, 32, generator=gen), y))
    options = {"imbsam": dict(rho=0.1), "ssesam": dict(head_rho=0.05, tail_rho=0.1, gamma=0.5, epochs=2)}[method]
    opt = timm.optim.create_optimizer_v2(hooked, opt=method, lr=0.05, momentum=0.9, base="momentum", eta=20,
                                         class_counts=CLASS_COUNTS, **options)
    train_module.train_one_epoch(**_epoch_kwargs(train_module, hooked, opt, data, nn.CrossEntropyLoss()))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    tail = torch.tensor([6, 7, 8, 9])
    for x, y in data:
        if method == "imbsam":
            official.imbsam_step(ref, ref_opt, x, y, tail, rho=0.1)
        else:
            official.ssesam_step(ref, ref_opt, x, y, tail, head_rho=0.05, tail_rho=0.1)
    for (name, a), b in zip(hooked.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


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


# -- the scheduled total, wrong starts and their messages (in-process, every tag) --------------------------------


@pytest.mark.parametrize("num_updates_total", [True, False], ids=["scheduler-total", "flags"])
def test_ssesam_stage_follows_epochs_plus_cooldown(train_module, num_updates_total):
    """--epochs 2 --cooldown-epochs 2, gamma 0.5: 4 scheduled epochs, so stage 2 starts at epoch 2, not 1."""
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.05, class_counts=CLASS_COUNTS, eta=20, gamma=0.5)
    data = batches(1)
    overrides = {"num_updates_total": 4 * len(data)} if num_updates_total else {}
    if num_updates_total and "num_updates_total" not in inspect.signature(train_module.train_one_epoch).parameters:
        pytest.skip("this train.py passes no num_updates_total")
    kwargs = _epoch_kwargs(train_module, model, opt, data, nn.CrossEntropyLoss(),
                           args={"epochs": 2, "cooldown_epochs": 2}, epoch=1, **overrides)
    train_module.train_one_epoch(**kwargs)
    assert opt.epochs == 4
    opt.set_epoch(1)
    assert opt.stage == 1
    opt.set_epoch(2)
    assert opt.stage == 2


class _RadiusProbe(list):
    """Batches that record the optimizer's radius in force when train.py iterates them."""

    def __init__(self, batches, optimizer) -> None:
        super().__init__(batches)
        self.optimizer, self.seen = optimizer, []

    def __iter__(self):
        self.seen.append(self.optimizer.param_groups[0]["rho"])
        return super().__iter__()


@needs_train_py
def test_opt_kwargs_rho_sched_schedules_the_radius_in_train_py(train_module):
    """--opt-kwargs rho_sched=multistep rho_decay_milestones=[2] rho_decay_rate=2, parsed by train.py's own parser:
    epochs 0, 1, 2 train with rho 0.1, 0.2, 0.2 (timm's multistep: milestone m from the 0-based epoch m - 1)."""
    parsed = train_module.parser.parse_args(["--opt-kwargs", "rho_sched=multistep", "rho_decay_milestones=[2]",
                                             "rho_decay_rate=2"]).opt_kwargs
    assert parsed == {"rho_sched": "multistep", "rho_decay_milestones": [2], "rho_decay_rate": 2}
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="focalsam", lr=0.05, class_counts=CLASS_COUNTS, rho=0.1,
                                         **parsed)
    data = _RadiusProbe(batches(1), opt)
    for epoch in range(3):
        train_module.train_one_epoch(**_epoch_kwargs(train_module, model, opt, data, nn.CrossEntropyLoss(),
                                                     args={"epochs": 3}, epoch=epoch))
        assert opt.epoch == epoch + 1 and opt.param_groups[0]["rho"] == pytest.approx(0.2)  # next_epoch's radius
    assert data.seen == pytest.approx([0.1, 0.2, 0.2])
    assert all(g["rho"] == pytest.approx(0.2) for g in opt.param_groups)


def _fresh_train_module(tag: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"unhooked_train_py_{tag.replace('.', '_')}", train_py(tag))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tag", TAGS)
def test_sam_opt_or_sampler_without_the_hook_names_the_fix(tag, monkeypatch):
    """What `--device-modules ltsam` (no .timm) leaves behind: train.py's optimizer factory stops with the fix."""
    module = _fresh_train_module(tag)
    ltsam.trainpy.guard_train_py(module)  # what `import ltsam` does when train.py is __main__
    model = conv_bn_net()
    with pytest.raises(ValueError, match=r"--opt ssesam in timm's train.py .*: add --device-modules ltsam\.timm"):
        module.create_optimizer_v2(model, opt="ssesam", lr=0.1, class_counts=CLASS_COUNTS)
    assert isinstance(module.create_optimizer_v2(model, opt="sgd", lr=0.1), torch.optim.SGD)
    monkeypatch.setenv("LTSAM_SAMPLER", "balanced")
    with pytest.raises(ValueError, match=r"LTSAM_SAMPLER in timm's train.py .*: add --device-modules ltsam\.timm"):
        module.create_optimizer_v2(model, opt="sgd", lr=0.1)
    from ltsam.timm import install

    assert install(module)  # with the hook both start
    assert isinstance(module.create_optimizer_v2(model, opt="ssesam", lr=0.1, class_counts=CLASS_COUNTS,
                                                 epochs=2), ltsam.optim.SSESAM)


def test_device_modules_ltsam_without_timm_names_the_fix_in_train_py(tmp_path):
    """The real start-up: `python train.py --device-modules ltsam --opt ssesam` (train.py <= 1.0.22 builds the
    optimizer before the data, so it stops within seconds)."""
    output = _train_py("v1.0.22", tmp_path, "--opt", "ssesam", modules=("ltsam",), check=False)
    assert "ltsam: --opt ssesam in timm's train.py needs ltsam's hook into its training loop: add " \
           "--device-modules ltsam.timm" in output


class _FolderLoader(list):
    """Batches plus the data set timm built, as train.py's loader exposes it (``loader.dataset``)."""

    def __init__(self, batches, dataset) -> None:
        super().__init__(batches)
        self.dataset = dataset


FOLDER_COUNTS = [12, 6, 3, 3]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    _image_folder(root, FOLDER_COUNTS, size=8, val=False)
    return root / "train"


@pytest.mark.parametrize("written, message", [
    (dict(counts=FOLDER_COUNTS, class_names=["class3", "class2", "class1", "class0"]),
     r"counts file '.*counts\.json' lists 4 classes that do not match the 4 of the training folder '.*': class 0 "
     r"is 'class3' in the file but 'class0' in the data; counts follow ImageFolder's sorted class-folder order"),
    (dict(counts=[12, 6, 3]), r"counts file '.*counts\.json' has 3 classes but the training folder '.*' has 4"),
    (dict(counts=[12, 6, 3, 3, 1]), r"counts file '.*counts\.json' has 5 classes but the training folder '.*' has 4"),
    (dict(counts=[3, 3, 6, 12]), r"counts file '.*counts\.json' says class 0 \('class0'\) has 3 training images, "
     r"but the training folder '.*' has 12 \(4 class\(es\) differ\); counts follow ImageFolder's sorted"),
], ids=["names-in-another-order", "fewer-classes", "more-classes", "another-order"])
def test_counts_that_do_not_fit_the_data_set_stop_before_the_first_batch(train_module, image_folder, tmp_path,
                                                                         written, message):
    from timm.data import create_dataset

    dataset = create_dataset("", root=str(image_folder), is_training=True)
    written = dict(written)
    path = ltsam.counts.save_class_counts(written.pop("counts"), tmp_path / "counts.json", **written)
    model = conv_bn_net(4)
    opt = train_module.create_optimizer_v2(model, opt="ssesam", lr=0.05, class_counts=str(path), eta=5, epochs=2)
    data = _FolderLoader(batches(1), dataset)
    with pytest.raises(ValueError, match=message):
        train_module.train_one_epoch(**_epoch_kwargs(train_module, model, opt, data, nn.CrossEntropyLoss()))
    assert opt.epoch == 0


def test_counts_that_fit_the_folder_train(train_module, image_folder, tmp_path):
    from timm.data import create_dataset

    dataset = create_dataset("", root=str(image_folder), is_training=True)
    path = ltsam.counts.save_class_counts(FOLDER_COUNTS, tmp_path / "counts.json",
                                          class_names=[f"class{c}" for c in range(4)])
    model = conv_bn_net(4)
    opt = train_module.create_optimizer_v2(model, opt="imbsam", lr=0.05, class_counts=str(path), eta=5)
    x, y = batches(1)[0]
    train_module.train_one_epoch(**_epoch_kwargs(train_module, model, opt, _FolderLoader([(x, y % 4)], dataset),
                                                 nn.CrossEntropyLoss()))
    assert opt.epoch == 1


def test_label_beyond_the_counts_names_the_file_at_the_batch(train_module, tmp_path):
    """A data set that shows no labels up front (here: plain batches): the batch's labels are checked."""
    path = ltsam.counts.save_class_counts([50, 20, 9, 4, 2], tmp_path / "counts.json")
    model = conv_bn_net()
    opt = train_module.create_optimizer_v2(model, opt="focalsam", lr=0.05, class_counts=str(path))
    with pytest.raises(ValueError, match=r"a batch holds label 9, but the counts file '.*counts\.json' has only 5 "
                                         r"classes; counts follow ImageFolder's sorted class-folder order"):
        train_module.train_one_epoch(**_epoch_kwargs(train_module, model, opt, batches(1), nn.CrossEntropyLoss()))


def test_class_counts_from_the_environment_any_path(train_module, tmp_path, monkeypatch):
    """LTSAM_CLASS_COUNTS takes any path on every timm (--opt-kwargs class_counts=/abs/... is a SyntaxError in
    the option parser of timm < 1.0.30)."""
    path = ltsam.counts.save_class_counts(CLASS_COUNTS, tmp_path / "counts.json").resolve()
    monkeypatch.setenv("LTSAM_CLASS_COUNTS", str(path))
    model = conv_bn_net()
    opt = train_module.create_optimizer_v2(model, opt="imbsam", lr=0.05)
    assert opt.class_counts == CLASS_COUNTS and ltsam.trainpy.counts_source(opt) == f"the counts file '{path}'"
    assert train_module.create_optimizer_v2(model, opt="imbsam", lr=0.05, class_counts=str(path)).class_counts \
        == CLASS_COUNTS
    with pytest.raises(ValueError, match=r"class_counts='other\.json' in --opt-kwargs and LTSAM_CLASS_COUNTS="):
        train_module.create_optimizer_v2(model, opt="imbsam", lr=0.05, class_counts="other.json")
    if version.parse(timm.__version__) >= version.parse("1.0.30"):  # its ParseKwargs takes the plain path too
        for form in (str(path), f"'{path}'"):
            parsed = train_module.parser.parse_args(["--opt-kwargs", f"class_counts={form}"])
            assert parsed.opt_kwargs == {"class_counts": str(path)}


# -- end to end: `python train.py --device-modules ltsam.timm --opt ssesam`, then --resume -------------------


def _image_folder(root: Path, counts: list[int], size: int = 32, val: bool = True) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", counts), ("val", [2] * len(counts)))[:2 if val else 1]:
        for label, n in enumerate(per_class):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (size, size, 3)) + 50 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def _train_py(tag: str, cwd: Path, *extra: str, env: dict | None = None, nproc: int = 1,
              modules: tuple[str, ...] = ("ltsam.timm",), check: bool = True) -> str:
    """Run the unmodified train.py at ``tag`` (under torchrun with gloo for nproc > 1); returns its output."""
    # timm <= 1.0.28 asks for persistent workers even with --workers 0, which torch >= 2.14 refuses
    workers = "0" if version.parse(tag.lstrip("v")) >= version.parse("1.0.29.dev0") else "1"
    launch = [sys.executable]
    if nproc > 1:
        launch = processes.torchrun(nproc)
    command = [*launch, str(train_py(tag)), "--device-modules", *modules, "--data-dir", "data",
               "--train-split", "train", "--model", "test_resnet", "--num-classes", "4", "--workers", workers,
               "--device", "cpu", "--lr", "0.05", "--warmup-epochs", "0", "--output", "out", *extra]
    done = processes.run(command, cwd=cwd, env=processes.env_with(env, tests_on_path=True))
    output = done.stdout + done.stderr
    if check:
        assert done.returncode == 0, output[-3000:]
    else:
        assert done.returncode != 0, output[-3000:]
    return output


SSESAM = ["--opt", "ssesam", "--opt-kwargs", "class_counts=counts.json", "eta=5"]


@pytest.mark.parametrize("tag", TAGS)
def test_train_py_trains_with_ssesam_and_resumes(tmp_path, tag):
    counts = [12, 6, 3, 3]  # 24 images: 3 batches of 8 per epoch; eta=5 makes classes 2 and 3 the tail
    _image_folder(tmp_path / "data", counts)
    ltsam.counts.save_class_counts(counts, tmp_path / "counts.json")
    common = ["--val-split", "val", "--img-size", "32", "-b", "8", *SSESAM]

    first = _train_py(tag, tmp_path, *common, "--epochs", "1", "--experiment", "first", "--amp", "--amp-dtype",
                      "bfloat16")
    assert "ltsam.timm: epoch 0: 3 SSESAM steps" in first
    checkpoint = torch.load(tmp_path / "out" / "first" / "last.pth.tar", weights_only=False)
    assert checkpoint["optimizer"]["ltsam"]["epoch"] == 1
    assert any("momentum_buffer" in s for s in checkpoint["optimizer"]["state"].values())

    resumed = _train_py(tag, tmp_path, *common, "--epochs", "2", "--experiment", "resumed",
                        "--resume", str(tmp_path / "out" / "first" / "last.pth.tar"))
    assert "ltsam.timm: epoch 1: 3 SSESAM steps" in resumed and "epoch 0:" not in resumed
    assert torch.load(tmp_path / "out" / "resumed" / "last.pth.tar", weights_only=False)["optimizer"]["ltsam"][
        "epoch"] == 2


def test_train_py_accumulates_ssesam_steps(tmp_path):
    """`python train.py --grad-accum-steps 2`: 3 batches of 8 an epoch make 2 SSE-SAM steps (2 + 1 batches); the
    loss_fn form (the task form's accumulation is checked in-process, both tags)."""
    counts = [12, 6, 3, 3]
    _image_folder(tmp_path / "data", counts)
    ltsam.counts.save_class_counts(counts, tmp_path / "counts.json")
    output = _train_py("v1.0.22", tmp_path, "--val-split", "val", "--img-size", "32", "-b", "8", *SSESAM,
                       "--epochs", "1", "--experiment", "accum", "--grad-accum-steps", "2")
    assert "ltsam.timm: epoch 0: 2 SSESAM steps" in output


# -- class-aware sampling in train.py: LTSAM_SAMPLER, realised class frequencies ------------------------------

SAMPLER_COUNTS = [40, 12, 5, 3]  # 60 training images; ImageFolder's labels follow the sorted folder names
DRAWS = 384  # per epoch over all ranks: 24 batches of 16 in one process, 12 per rank in two


def _realised(probe: Path, epoch: int, nproc: int) -> list[list[int]]:
    return [json.loads((probe / f"labels-{epoch}-{rank}.json").read_text()) for rank in range(nproc)]


def _assert_class_frequencies(labels: list[int], mode: str) -> None:
    """Each class within 4 standard deviations of the sampler's target share of the epoch."""
    expected = class_probabilities(SAMPLER_COUNTS, mode) * len(labels)
    observed = np.bincount(labels, minlength=len(SAMPLER_COUNTS))
    sigma = np.sqrt(expected * (1 - expected / len(labels)))
    assert (np.abs(observed - expected) <= 4 * sigma).all(), (mode, observed, expected)


SAMPLER_RUNS = [("v1.0.28", 1, "balanced"), ("v1.0.28", 2, "sqrt"), ("v1.0.22", 1, "sqrt"), ("v1.0.22", 2, "balanced")]


@pytest.mark.parametrize("tag, nproc, mode", SAMPLER_RUNS, ids=[f"{t}-{n}proc-{m}" for t, n, m in SAMPLER_RUNS])
def test_train_py_samples_classes_as_ltsam_sampler_says(tmp_path, tag, nproc, mode):
    """Every tag, 1 and 2 processes, balanced and sqrt (pairwise): what train.py trained on, per rank, is the
    seeded stream of ltsam's sampler (rank r takes draws r, r + R, ...), at the sampler's class frequencies.
    One-process runs also train SSE-SAM with --cooldown-epochs, its counts (with class names, checked against the
    folders) from LTSAM_CLASS_COUNTS as an absolute path (a SyntaxError in timm < 1.0.30's --opt-kwargs parser)."""
    _image_folder(tmp_path / "data", SAMPLER_COUNTS, size=16, val=False)
    probe = tmp_path / "probe"
    probe.mkdir()
    env = {"LTSAM_SAMPLER": mode, "LTSAM_SAMPLER_OPTIONS": f"num_samples={DRAWS}", "LTSAM_PROBE_DIR": str(probe)}
    extra = ["--val-split", "", "--img-size", "16", "-b", "16", "--epochs", "1", "--seed", "7"]
    if nproc == 1:  # 3 scheduled epochs: SSE-SAM with gamma 0.5 switches at epoch 2, not at 1 (= 0.5 * --epochs 1)
        counts = ltsam.counts.save_class_counts(SAMPLER_COUNTS, tmp_path / "counts.json", class_names=[
            f"class{c}" for c in range(4)])
        env["LTSAM_CLASS_COUNTS"] = str(counts.resolve())
        extra += ["--cooldown-epochs", "2", "--opt", "ssesam", "--opt-kwargs", "eta=10", "gamma=0.5"]
    output = _train_py(tag, tmp_path, *extra, env=env, nproc=nproc, modules=("ltsam.timm", "trainpy_probe"))

    realised = _realised(probe, 0, nproc)
    labels = np.repeat(np.arange(4), SAMPLER_COUNTS)
    for rank, seen in enumerate(realised):
        sampler = ClassAwareSampler(labels, mode, num_samples=DRAWS, num_replicas=nproc, rank=rank, seed=7)
        assert seen == labels[list(sampler)].tolist(), rank
    _assert_class_frequencies(sum(realised, []), mode)
    if nproc == 1:
        assert [f"epoch {e}: 24 SSESAM steps, stage {s} of 3 epochs" in output for e, s in
                [(0, 1), (1, 1), (2, 2)]] == [True] * 3, output[-3000:]
        assert _realised(probe, 1, 1) != realised  # a new stream each epoch


def test_train_py_streams_wds_shards_class_aware(tmp_path):
    """--dataset wds/ over ltsam's shards: the stream is re-balanced on the .cls label before decoding, and the
    SAM-family counts are checked against the shards' own class counts."""
    from ltsam.data.shards import records_from_arrays, write_shards

    labels = np.repeat(np.arange(4), SAMPLER_COUNTS)
    images = np.random.default_rng(0).integers(0, 255, (len(labels), 16, 16, 3), dtype=np.uint8)
    write_shards(records_from_arrays(images, labels), tmp_path / "data", split="train", maxcount=16,
                 show_progress=False)
    ltsam.counts.save_class_counts(SAMPLER_COUNTS, tmp_path / "counts.json")
    probe = tmp_path / "probe"
    probe.mkdir()
    env = {"LTSAM_SAMPLER": "balanced", "LTSAM_SAMPLER_OPTIONS": f"num_samples={DRAWS}",
           "LTSAM_PROBE_DIR": str(probe)}
    _train_py("v1.0.28", tmp_path, "--dataset", "wds/lt", "--val-split", "", "--img-size", "16", "-b", "16",
              "--epochs", "1", "--opt", "imbsam", "--opt-kwargs", "class_counts=counts.json", "eta=10", env=env,
              modules=("ltsam.timm", "trainpy_probe"))
    (seen,) = _realised(probe, 0, 1)
    assert len(seen) == DRAWS
    _assert_class_frequencies(seen, "balanced")

    from timm.data import create_dataset

    from ltsam.trainpy import SamplerSpec, check_counts, wrap_create_dataset

    dataset = wrap_create_dataset(create_dataset, SamplerSpec("balanced"))(
        "wds/lt", root=str(tmp_path / "data"), split="train", is_training=True, batch_size=16)
    for counts, message in [([40, 12, 5], r"class_counts has 3 classes but the shards '.*' \(split train\) has 4"),
                            ([40, 12, 3, 5], r"class_counts says class 2 has 3 training images, but the shards")]:
        opt = timm.optim.create_optimizer_v2(conv_bn_net(4), opt="imbsam", lr=0.1, class_counts=counts)
        with pytest.raises(ValueError, match=message):
            check_counts(opt, dataset)
