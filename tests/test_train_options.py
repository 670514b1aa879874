"""``ltsam train``'s optimizer options against plain re-derivations: the official weight-decay profile,
--clip-grad with a SAM-family optimizer, and a scheduled radius."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import official
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from test_optim_exact import LR, MOMENTUM, TAIL, WD, assert_same_state, closure_for
from test_timm_trainpy import needs_train_py, train_module  # noqa: F401  (fixture: train.py with the ltsam.timm hook)

from ltsam.counts import save_class_counts
from ltsam.losses import create_loss
from ltsam.train.args import parse_args
from ltsam.train.loop import StepContext, train_step
from ltsam.train.main import build_optimizer
from ltsam_common.names import SAM_METHODS

SSESAM = ["--opt", "ssesam", "--eta", "20", "--opt-kwargs", "base=momentum", "head_rho=0.05", "tail_rho=0.1"]


def trainer(tmp_path, model, *flags: str):
    """The parsed flags, optimizer and step context ``ltsam train`` builds from them (same lr, momentum, wd as the
    re-derivations in test_optim_exact)."""
    args = parse_args(["--lr", str(LR), "--momentum", str(MOMENTUM), "--weight-decay", str(WD), *flags])
    counts = save_class_counts(CLASS_COUNTS, tmp_path / "counts.json")
    optimizer = build_optimizer(args, model, counts)
    if hasattr(optimizer, "attach"):
        optimizer.attach(model)
    criterion = create_loss("ce", CLASS_COUNTS)
    return args, optimizer, StepContext(model, model, optimizer, criterion, nullcontext, None, args.clip_grad,
                                        args.clip_mode)


def test_official_wd_profile_decays_every_parameter_as_the_official_code(tmp_path):
    torch.manual_seed(0)
    ours = conv_bn_net()
    ref, timm_grouped = copy.deepcopy(ours), copy.deepcopy(ours)
    _, optimizer, ctx = trainer(tmp_path, ours, *SSESAM, "--wd-profile", "official")
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == WD for p in ours.parameters())  # 1-d parameters (bias, BN) decayed too
    *_, timm_ctx = trainer(tmp_path, timm_grouped, *SSESAM)  # the default profile: timm's grouping
    reference = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches(4):
        train_step(ctx, x, y)
        train_step(timm_ctx, x, y)
        official.ssesam_step(ref, reference, x, y, tail_classes=TAIL, head_rho=0.05, tail_rho=0.1)
    assert_same_state(ours, ref)
    bias_gap = max((a - b).abs().max() for a, b in zip(timm_grouped.parameters(), ref.parameters())
                   if a.dim() == 1)
    assert bias_gap > 1e-5  # timm's profile leaves 1-d parameters undecayed: a different update


def test_filter_bias_and_bn_false_is_the_official_decay_for_train_py_and_plain_loops():
    """What the README shows (and train.py's --opt-kwargs filter_bias_and_bn=False does): every parameter of a
    model without a no_weight_decay() list is decayed, as ltsam train's --wd-profile official decays it."""
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=LR, weight_decay=WD, class_counts=CLASS_COUNTS,
                                         filter_bias_and_bn=False)
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(len(list(model.parameters())), WD)]


def test_official_wd_profile_refuses_a_competing_grouping(tmp_path):
    with pytest.raises(SystemExit, match="filter_bias_and_bn groups parameters, --wd-profile official"):
        trainer(tmp_path, conv_bn_net(), "--wd-profile", "official", "--opt-kwargs", "filter_bias_and_bn=True")


METHOD_FLAGS = {"sam": [], "imbsam": ["--eta", "20"], "ssesam": ["--eta", "20"], "focalsam": []}


@pytest.mark.parametrize("method", SAM_METHODS)
def test_clip_grad_clips_the_sam_update_direction(tmp_path, method):
    """--clip-grad with a SAM-family optimizer: sam_gradient -> clip_grad_norm_(G) -> base step."""
    torch.manual_seed(1)
    ours = conv_bn_net()
    ref, unclipped = copy.deepcopy(ours), copy.deepcopy(ours)
    flags = ["--opt", method, *METHOD_FLAGS[method], "--opt-kwargs", "base=momentum"]
    *_, ctx = trainer(tmp_path, ours, *flags, "--clip-grad", "0.05")
    _, reference, _ = trainer(tmp_path, ref, *flags)
    *_, plain = trainer(tmp_path, unclipped, *flags)
    norms = []
    for x, y in batches(3):
        train_step(ctx, x, y)
        train_step(plain, x, y)
        params, update, _ = reference.sam_gradient(closure_for(ref, x, y), targets=y)
        for p, g in zip(params, update):
            p.grad = g
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05)))
        reference.base_optimizer.step()
    assert min(norms) > 0.05  # clipping was active at every step
    assert_same_state(ours, ref, tol=1e-6)
    gap = max((a - b).abs().max() for a, b in zip(ours.state_dict().values(), unclipped.state_dict().values()))
    assert gap > 1e-4  # and it changed the update


def test_clip_grad_under_deepspeed_is_gradient_clipping(tmp_path):
    from argparse import Namespace

    from ltsam.train.main import deepspeed_clipping

    args = Namespace(clip_grad=1.5, clip_mode="norm")
    assert deepspeed_clipping(args, {}, tmp_path) == 1.5
    assert deepspeed_clipping(Namespace(clip_grad=None, clip_mode="norm"), {}, tmp_path) == 0.0  # not DS's 1.0
    assert deepspeed_clipping(Namespace(clip_grad=None, clip_mode="norm"), {"gradient_clipping": 2}, tmp_path) == 2
    with pytest.raises(SystemExit, match="--clip-grad 1.5 and --deepspeed-config .* gradient_clipping 2 disagree"):
        deepspeed_clipping(args, {"gradient_clipping": 2}, tmp_path)
    with pytest.raises(SystemExit, match="--clip-mode value: DeepSpeed clips by norm only"):
        deepspeed_clipping(Namespace(clip_grad=1.0, clip_mode="value"), {}, tmp_path)


def test_clip_grad_with_a_grad_scaler_clips_the_unscaled_direction(tmp_path):
    """The clip runs inside the scaler's step, after unscaling: a scale of 1024 changes nothing."""
    torch.manual_seed(2)
    scaled = conv_bn_net()
    ref = copy.deepcopy(scaled)
    flags = ["--opt", "ssesam", "--eta", "20", "--clip-grad", "0.05"]
    *_, ctx = trainer(tmp_path, scaled, *flags)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    *_, plain = trainer(tmp_path, ref, *flags)
    for x, y in batches(3):
        train_step(ctx, x, y)
        train_step(plain, x, y)
    assert ctx.scaler.get_scale() == 1024.0  # no step was skipped
    assert_same_state(scaled, ref, tol=1e-6)


def _radius_groups(**fields: float) -> torch.optim.Optimizer:
    """A plain SGD whose param groups carry radius fields and that names them, as the SAM family's do (two
    groups, one with timm's layer-decay lr_scale, which must not scale a radius)."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], lr=0.3)
    for group in opt.param_groups:
        group.update(fields)
    opt.radius_names = tuple(fields)
    return opt


def test_multistep_radius_schedule_is_focal_sams_imagenet_rule():
    """Focal-SAM sets rho = 0.1 while epoch + 1 < 0.8 * epochs, else 0.2, before each (0-based) epoch."""
    from ltsam.optim.radius import create_radius_scheduler

    opt = _radius_groups(rho=0.1)
    schedule = create_radius_scheduler(opt, "multistep", epochs=200, decay_milestones=[160], decay_rate=2.0)
    for epoch in range(200):
        schedule.step(epoch)
        expected = 0.1 if epoch + 1 < 0.8 * 200 else 0.2
        assert [g["rho"] for g in opt.param_groups] == pytest.approx([expected] * 2), epoch
        assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]  # the learning rate is not touched
    assert schedule.values() == {"rho": pytest.approx(0.2)}


def test_cosine_and_step_radius_schedules_drive_every_radius_field():
    from ltsam.optim.radius import create_radius_scheduler

    opt = _radius_groups(head_rho=0.05, tail_rho=0.1)
    schedule = create_radius_scheduler(opt, "cosine", epochs=4, min_rho=0.01)
    for epoch in range(4):
        schedule.step(epoch)
        factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * epoch / 4))).item()
        assert opt.param_groups[1]["head_rho"] == pytest.approx(0.01 + (0.05 - 0.01) * factor)
        assert opt.param_groups[1]["tail_rho"] == pytest.approx(0.01 + (0.1 - 0.01) * factor)
    step = create_radius_scheduler(_radius_groups(rho=0.2), "step", decay_epochs=2, decay_rate=0.5)
    step.step(5)
    assert step.values() == {"rho": pytest.approx(0.2 * 0.5**2)}


@pytest.mark.parametrize("kwargs, message", [
    (dict(sched="step"), "rho_sched=step needs rho_decay_epochs > 0"),
    (dict(sched="multistep"), "rho_sched=multistep needs rho_decay_milestones"),
    (dict(sched="linear"), "rho_sched='linear' is not one of none, step, multistep, cosine"),
])
def test_radius_schedule_errors(kwargs, message):
    from ltsam.optim.radius import create_radius_scheduler

    with pytest.raises(ValueError, match=message):
        create_radius_scheduler(_radius_groups(rho=0.1), epochs=10, **kwargs)
    with pytest.raises(ValueError, match="SGD has none"):
        create_radius_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "cosine", 10)


def test_rho_sched_with_a_plain_optimizer_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--opt sgd: --rho-sched=cosine schedules SAM-family radii"):
        trainer(tmp_path, conv_bn_net(), "--opt", "sgd", "--rho-sched", "cosine")
    with pytest.raises(SystemExit, match=r"--opt-kwargs rho_sched and --rho-sched both schedule"):
        trainer(tmp_path, conv_bn_net(), "--opt", "sam", "--rho-sched", "cosine", "--opt-kwargs", "rho_sched=step")
    with pytest.raises(SystemExit, match=r"--rho-sched=step needs --rho-decay-epochs > 0"):
        trainer(tmp_path, conv_bn_net(), "--opt", "sam", "--rho-sched", "step")


@pytest.mark.parametrize("options, message", [
    (dict(rho_sched="multistep"), "rho_sched=multistep needs rho_decay_milestones"),
    (dict(rho_sched="multistep", rho_decay_milestones="[2]"), "rho_decay_milestones='\\[2\\]' must be epochs"),
    (dict(rho_sched="cosine", epochs=0), "rho_sched=cosine needs the number of epochs"),
])
def test_the_optimizers_own_schedule_options_are_checked_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        timm.optim.create_optimizer_v2(conv_bn_net(), opt="sam", lr=0.1, **options)
    opt = timm.optim.create_optimizer_v2(conv_bn_net(), opt="sam", lr=0.1, rho_sched="cosine")  # epochs come later
    with pytest.raises(ValueError, match="the optimizer's epochs=N"):
        opt.set_epoch(0)
    opt.epochs = 4
    opt.set_epoch(2)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.05 * 0.5)  # cosine half way, to rho_min 0


@needs_train_py
@pytest.mark.filterwarnings("ignore:ltsam.timm found no train_one_epoch")
def test_clip_grad_in_timms_train_py_clips_the_same_update_as_ltsam_train(tmp_path, train_module):  # noqa: F811
    """One meaning of --clip-grad: train.py through ltsam.timm and ltsam train make the same clipped SSE-SAM step."""
    from test_timm_trainpy import _epoch_kwargs

    torch.manual_seed(4)
    hooked = conv_bn_net()
    own = copy.deepcopy(hooked)
    flags = ["--opt", "ssesam", "--eta", "20", "--epochs", "2", "--clip-grad", "0.05"]
    args, opt, _ = trainer(tmp_path, hooked, *flags)
    *_, ctx = trainer(tmp_path, own, *flags)
    data = batches(3)
    train_module.train_one_epoch(**_epoch_kwargs(train_module, hooked, opt, data, torch.nn.CrossEntropyLoss(),
                                                 args={"clip_grad": 0.05, "clip_mode": "norm"}))
    for x, y in data:
        train_step(ctx, x, y)
    assert_same_state(hooked, own, tol=1e-6)


def test_clip_grad_under_deepspeed_clips_the_same_update_direction(tmp_path):
    """DeepSpeed's gradient_clipping (from --clip-grad) clips the surrogate gradient, which is G."""
    pytest.importorskip("deepspeed")
    import processes
    from ddp_worker import METHODS

    cmd = [*processes.torchrun(1), str(processes.TESTS / "deepspeed_clip_worker.py"), str(tmp_path / "ds.pt")]
    result = processes.run(cmd, env=processes.env_with({"DS_ACCELERATOR": "cpu"}, tests_on_path=True))
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    model = conv_gn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.05, weight_decay=5e-4,
                                         **METHODS["ssesam"]).attach(model)
    for x, y in batches(4):
        params, update, _ = opt.sam_gradient(closure_for(model, x, y), targets=y)
        for p, g in zip(params, update):
            p.grad = g
        assert float(torch.nn.utils.clip_grad_norm_(params, 0.05)) > 0.05
        opt.base_optimizer.step()
    for a, b in zip(model.parameters(), torch.load(tmp_path / "ds.pt", weights_only=True)):
        assert torch.allclose(a.detach(), b, atol=1e-6), (a - b).abs().max()


SCHEDULED = {
    "focalsam": (["--opt-kwargs", "base=momentum", "rho=0.1", "gamma=3.2", "lam=0.8"],
                 lambda ref, opt, x, y, scale: official.focalsam_step(ref, opt, x, y, class_counts=CLASS_COUNTS,
                                                                      rho=0.1 * scale, gamma=3.2, lam=0.8)),
    "ssesam": (["--eta", "20", "--opt-kwargs", "base=momentum", "head_rho=0.05", "tail_rho=0.1", "gamma=1.0"],
               lambda ref, opt, x, y, scale: official.ssesam_step(ref, opt, x, y, tail_classes=TAIL,
                                                                  head_rho=0.05 * scale, tail_rho=0.1 * scale)),
}


SCHEDULE_FLAGS = ["--rho-sched", "multistep", "--rho-decay-milestones", "2", "--rho-decay-rate", "2"]
# the same schedule as the optimizer's own options, as train.py's --opt-kwargs hand them to its constructor
SCHEDULE_KWARGS = ["rho_sched=multistep", "rho_decay_milestones=[2]", "rho_decay_rate=2"]


@pytest.mark.parametrize("schedule", ["--rho-sched", "opt-kwargs"])
@pytest.mark.parametrize("method", SCHEDULED)
def test_scheduled_radius_equals_a_re_derivation_with_that_radius_per_step(tmp_path, method, schedule):
    """multistep, milestone 2, rate 2, from ltsam train's flags or the optimizer's own options: every radius
    doubles from the 0-based epoch 1 on, and each step is the official one with that epoch's radius."""
    torch.manual_seed(3)
    ours = conv_bn_net()
    ref = copy.deepcopy(ours)
    flags, official_step = SCHEDULED[method]
    flags = [*flags, *SCHEDULE_KWARGS] if schedule == "opt-kwargs" else [*flags, *SCHEDULE_FLAGS]
    args, optimizer, ctx = trainer(tmp_path, ours, "--opt", method, *flags, "--wd-profile", "official", "--epochs",
                                   "3")
    base = {name: optimizer.param_groups[0][name] for name in optimizer.radius_names}
    reference = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    data = batches(6)
    for epoch in range(3):
        optimizer.set_epoch(epoch)
        scale = 2.0 if epoch + 1 >= 2 else 1.0  # timm's multistep: milestone m from the 0-based epoch m - 1
        assert optimizer.scheduled_radii() == pytest.approx({k: v * scale for k, v in base.items()})
        assert all(g[k] == pytest.approx(v * scale) for g in optimizer.param_groups for k, v in base.items())
        for x, y in data[2 * epoch: 2 * epoch + 2]:
            train_step(ctx, x, y)
            official_step(ref, reference, x, y, scale)
    assert_same_state(ours, ref)


def test_scheduled_radii_after_loading_a_checkpoint_are_those_of_the_epoch():
    """A fresh optimizer that loads a state_dict saved at epoch 2 (radius doubled) and sets epoch e has the
    radii an uninterrupted run has at e, before and after the milestone."""
    options = dict(opt="focalsam", lr=0.1, class_counts=CLASS_COUNTS, rho=0.1, rho_sched="multistep",
                   rho_decay_milestones=[160], rho_decay_rate=2.0, epochs=200)
    model = conv_bn_net()
    running = timm.optim.create_optimizer_v2(model, **options)
    running.set_epoch(170)
    saved = copy.deepcopy(running.state_dict())
    assert running.param_groups[0]["rho"] == pytest.approx(0.2)
    for epoch in (0, 158, 159, 170):
        resumed = timm.optim.create_optimizer_v2(model, **options)
        resumed.load_state_dict(saved)
        resumed.set_epoch(epoch)
        running.set_epoch(epoch)
        expected = 0.1 if epoch + 1 < 160 else 0.2
        assert [g["rho"] for g in resumed.param_groups] == pytest.approx([expected] * len(resumed.param_groups))
        assert [g["rho"] for g in running.param_groups] == [g["rho"] for g in resumed.param_groups]


def test_rho_sched_end_to_end_writes_the_radii_and_resumes_them(tmp_path, one_thread):
    """ltsam train on the embedded digits: the radius of each epoch in summary.csv, also across a resume."""
    import csv

    from ltsam.train import main as train_main

    flags = ["--n-max", "60", "-b", "32", "--epochs", "3", "--no-progress", "--output", str(tmp_path),
             "--experiment", "run", "--opt", "focalsam", "--opt-kwargs", "rho=0.1", "--rho-sched", "multistep",
             "--rho-decay-milestones", "2", "--rho-decay-rate", "2"]
    assert train_main([*flags, "--stop-epoch", "1"]) == 0
    assert train_main([*flags, "--resume", "auto"]) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert [float(r["train_rho"]) for r in rows] == pytest.approx([0.1, 0.2, 0.2])
