"""The engine's plan and its corners: pass counts per model kind, a new method as one class, radii in
param_groups (scheduled by timm), micro-batches, fp16 overflow, davda54's BN bypass, add_param_group."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import official
import pytest
import timm
import timm.scheduler
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from test_optim_exact import closure_for
from test_optim_identities import step_seeing_offsets
from torch import nn

import ltsam  # noqa: F401
from ltsam.optim import SAM_FAMILY, ClassAware, Group

HP = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, base="momentum")
NAMES = [info.name for info in SAM_FAMILY]
# every method's options for these tests; the tail (eta=20) is classes 6..9
OPTIONS = {
    "sam": dict(rho=0.05),
    "imbsam": dict(rho=0.1, eta=20, class_counts=CLASS_COUNTS),
    "ssesam": dict(head_rho=0.05, tail_rho=0.1, gamma=0.5, eta=20, epochs=2, class_counts=CLASS_COUNTS),
    "focalsam": dict(rho=0.2, gamma=3.0, lam=0.8, class_counts=CLASS_COUNTS),
}
CASES = [(name, 0) for name in NAMES] + [("ssesam", 1)]  # (name, epoch): SSE-SAM in both stages


def conv_ln_net(num_classes: int = 10) -> nn.Module:
    """A LayerNorm net: no batch coupling."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.LayerNorm(16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )


NETS = {"bn": conv_bn_net, "ln": conv_ln_net, "gn": conv_gn_net}


def make(name: str, model: nn.Module, epoch: int = 0, **extra):
    opt = timm.optim.create_optimizer_v2(model.parameters(), opt=name, **HP, **{**OPTIONS[name], **extra})
    opt.attach(model).set_epoch(epoch)
    return opt


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_state_close(a: nn.Module, b: nn.Module, tol: float = 1e-5) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(ta.float(), tb.float(), atol=tol, rtol=0), f"{name} differs by {(ta - tb).abs().max()}"


class Counter:
    """Forwards through the classifier, and the samples each carried, independent of the engine's count."""

    def __init__(self, model: nn.Module) -> None:
        self.samples: list[int] = []
        model[-1].register_forward_hook(lambda m, inputs, out: self.samples.append(inputs[0].shape[0]))


def scheme_step(model, opt, x, y, groups, delta, chunks=1):
    """algorithms.md §1 as the official code schedules it: per group, a forward at w (gradients of a and b),
    eps from b's gradient, a forward at w + eps (b's gradient), restore by copy; then the base step with the
    sum. Each full-batch forward runs as ``chunks`` contiguous chunk forwards whose gradients add up."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts = torch.arange(len(y)).tensor_split(chunks)

    def grad_of(weights, part):
        losses = official.per_sample(model, x[part], y[part])
        grads = torch.autograd.grad((losses * weights[part]).sum(), params, allow_unused=True)
        reached[:] = [r or g is not None for r, g in zip(reached, grads)]
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def summed(weights):
        out = [torch.zeros_like(p) for p in params]
        for part in parts:
            out = [o + g for o, g in zip(out, grad_of(weights, part))]
        return out

    total = [torch.zeros_like(p) for p in params]
    reached = [False] * len(params)  # a parameter no gradient reached keeps p.grad None: the base step skips it
    for a, b, rho in groups:
        at_w = [torch.zeros_like(p) for p in params]
        direction = [torch.zeros_like(p) for p in params]
        for part in parts:  # one forward at w per chunk serves a and b
            losses = official.per_sample(model, x[part], y[part])
            weighted = [(losses * b[part]).sum()] + ([(losses * a[part]).sum()] if a is not None else [])
            for i, (objective, acc) in enumerate(zip(weighted, (direction, at_w))):
                grads = torch.autograd.grad(objective, params, retain_graph=i < len(weighted) - 1, allow_unused=True)
                for j, (o, g) in enumerate(zip(acc, grads)):
                    if g is not None:
                        o.add_(g)
                        reached[j] = reached[j] or acc is at_w
        saved = [p.detach().clone() for p in params]
        norm = torch.norm(torch.stack([d.norm(2) for d in direction]), 2)
        with torch.no_grad():
            torch._foreach_add_(params, [d * (rho / (norm + delta)) for d in direction])
        perturbed = summed(b)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        total = [t + u + g for t, u, g in zip(total, at_w, perturbed)]
    opt.zero_grad()
    for p, t, r in zip(params, total, reached):
        p.grad = t if r else None
    opt.step()


def reference_opt(model):
    return torch.optim.SGD(model.parameters(), lr=HP["lr"], momentum=HP["momentum"], weight_decay=HP["weight_decay"])


# -- the pass plan ---------------------------------------------------------------------------------------
# (name, epoch) -> (forwards, backwards) with batch coupling (every pass full-batch) and without it, where
# ImbSAM / SSE-SAM forward head and tail separately: samples per forward as a function of the tail count t
COUPLED = {("sam", 0): (2, 2), ("imbsam", 0): (2, 3), ("focalsam", 0): (2, 3), ("ssesam", 0): (3, 4),
           ("ssesam", 1): (2, 3)}
SPLIT_SAMPLES = {
    ("sam", 0): lambda t: [16, 16],
    ("imbsam", 0): lambda t: [t, 16 - t, t],  # at w: the tail's direction, the head's gradient; tail at w+eps
    ("focalsam", 0): lambda t: [16, 16],  # a and b weigh every sample: one full forward at w
    ("ssesam", 0): lambda t: [16 - t, t, 16 - t, t],
    ("ssesam", 1): lambda t: [t, 16 - t, t],
}
SPLIT_BACKWARDS = {("sam", 0): 2, ("imbsam", 0): 3, ("focalsam", 0): 3, ("ssesam", 0): 4, ("ssesam", 1): 3}


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("name,epoch", CASES)
def test_pass_counts_per_model_kind(name, epoch, net):
    torch.manual_seed(0)
    model = NETS[net]()
    counter = Counter(model)
    opt = make(name, model, epoch)
    x, y = batches(1)[0]
    plan = opt.plan(y)
    opt.step(closure_for(model, x, y), targets=y)
    t = int((y >= 6).sum())
    if net == "bn":
        forwards, backwards = COUPLED[(name, epoch)]
        assert counter.samples == [16] * forwards
    else:
        assert counter.samples == SPLIT_SAMPLES[(name, epoch)](t)
        forwards, backwards = len(counter.samples), SPLIT_BACKWARDS[(name, epoch)]
    assert (opt.last_passes.forward, opt.last_passes.backward) == (forwards, backwards)
    assert vars(plan.counts()) == vars(opt.last_passes)


@pytest.mark.parametrize("net", list(NETS))
def test_sam_without_targets_costs_two_forwards_and_two_backwards(net):
    torch.manual_seed(0)
    model = NETS[net]()
    counter = Counter(model)
    opt = make("sam", model)
    x, y = batches(1)[0]
    calls = []

    def closure(index=None):
        calls.append(index)
        return closure_for(model, x, y)(index)

    opt.step(closure)
    assert calls == [None, None] and counter.samples == [16, 16]
    assert (opt.last_passes.forward, opt.last_passes.backward) == (2, 2)


def test_plan_reads_as_text():
    model = conv_bn_net()
    opt = make("ssesam", model, epoch=1)
    text = str(opt.plan(batches(1)[0][1]))
    # stage 2: one forward at w (tail direction and the head's gradient); the BN statistics replayed for the
    # official pass at w + 0 (head) and the tail's forward at w; then the tail perturbed
    assert "group 0: replay the BN statistics of the forwards at w x1" in text
    assert "group 1: replay the BN statistics of the forwards at w x1\ngroup 1: perturb along direction 1" in text
    assert text.count("forward 16 samples") == 2


# -- a new method is one small class -------------------------------------------------------------------
class BucketSAM(ClassAware):
    """Classes in frequency buckets split at ``edges`` (training counts); each bucket is perturbed along its
    own gradient with its own radius (``rho0`` for the rarest bucket, ...), SSE-SAM-style."""

    def __init__(self, params, class_counts=None, edges=(20, 100), rhos=(0.2, 0.1, 0.05), **kwargs) -> None:
        super().__init__(params, class_counts=class_counts, **kwargs)
        self.add_radii(**{f"rho{i}": rho for i, rho in enumerate(rhos)})
        self.bucket_of = [sum(count >= edge for edge in edges) for count in self.class_counts]

    def groups(self, targets, batch_size, device):
        bucket = self.class_table(self.bucket_of, targets)
        return [Group(None, (bucket == i).float() / batch_size, f"rho{i}") for i in range(len(self.radius_names))]


@pytest.mark.parametrize("net", ["bn", "gn"])
def test_a_bucket_radius_method_in_one_class_is_exact(net):
    torch.manual_seed(0)
    ours = NETS[net]()
    ref = copy.deepcopy(ours)
    opt = BucketSAM(ours.parameters(), class_counts=CLASS_COUNTS, **HP).attach(ours)
    ref_opt = reference_opt(ref)
    bucket = torch.tensor([sum(c >= e for e in (20, 100)) for c in CLASS_COUNTS])
    for x, y in batches(4):
        opt.step(closure_for(ours, x, y), targets=y)
        groups = [(None, (bucket[y] == i).float() / len(y), rho) for i, rho in enumerate((0.2, 0.1, 0.05))]
        scheme_step(ref, ref_opt, x, y, groups, delta=1e-12)
    assert_state_close(ours, ref)  # BatchNorm buffers included: 3 forwards replace the official 6
    assert opt.last_passes.forward == (4 if net == "bn" else 6)


# -- radii in param_groups -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_radii_live_in_every_param_group_and_the_state_dict(name):
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt=name, weight_decay=1e-3, **OPTIONS[name]).attach(model)
    radii = {"ssesam": ("head_rho", "tail_rho")}.get(name, ("rho",))
    assert opt.radius_names == radii and len(opt.param_groups) == 2  # timm's decay / no-decay groups
    for group in opt.param_groups:
        for key in radii:
            assert group[key] == OPTIONS[name][key]
    for group in opt.param_groups:
        group[radii[-1]] = 0.123
    fresh = timm.optim.create_optimizer_v2(conv_bn_net(), opt=name, weight_decay=1e-3, **OPTIONS[name])
    fresh.load_state_dict(opt.state_dict())
    assert all(group[radii[-1]] == 0.123 for group in fresh.param_groups)
    group = opt.param_groups[0]
    group[radii[0]] = -1.0
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{radii[0]}'\]=-1.0 must be a number >= 0"):
        opt.step(closure_for(model, x, y), targets=y)


class SteppedRadius(timm.scheduler.scheduler.Scheduler):
    """timm's scheduler base on param_group_field='rho' (its concrete schedulers are fixed to 'lr')."""

    def __init__(self, optimizer, every: int, factor: float) -> None:
        super().__init__(optimizer, param_group_field="rho")
        self.every, self.factor = every, factor

    def _get_lr(self, t: int) -> list[float]:
        return [v * self.factor ** (t // self.every) for v in self.base_values]


def test_a_timm_scheduler_drives_rho_exactly():
    """rho 0.05, doubled every 2 steps by a timm scheduler, equals davda54's SAM with that rho at each step."""
    torch.manual_seed(0)
    ours = conv_bn_net()
    ref = copy.deepcopy(ours)
    opt = make("sam", ours)
    sched = SteppedRadius(opt, every=2, factor=2.0)
    ref_opt = reference_opt(ref)
    for step, (x, y) in enumerate(batches(5)):
        sched.step(step)
        rho = 0.05 * 2.0 ** (step // 2)
        assert all(group["rho"] == pytest.approx(rho) for group in opt.param_groups)
        opt.step(closure_for(ours, x, y), targets=y)
        official.sam_step(ref, ref_opt, x, y, rho=rho)
    assert_state_close(ours, ref)


def test_each_param_group_is_perturbed_with_its_own_radius():
    torch.manual_seed(0)
    model = conv_gn_net()
    body, head = list(model[:-1].parameters()), list(model[-1].parameters())
    opt = timm.optim.create_optimizer_v2([{"params": body}, {"params": head, "rho": 0.0}], opt="sam", rho=0.1)
    eps = step_seeing_offsets(model, opt.attach(model))[1]
    assert all(bool((e == 0).all()) for e in eps[len(body):])  # the head's radius is 0
    assert torch.cat([e.flatten() for e in eps[: len(body)]]).norm() > 0


# -- micro-batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("micro_batches", [2, 3])
@pytest.mark.parametrize("name,epoch", CASES)
def test_micro_batches_equal_one_batch_without_batch_coupling(name, epoch, micro_batches):
    torch.manual_seed(0)
    a = conv_gn_net()
    b = copy.deepcopy(a)
    opt_a, opt_b = make(name, a, epoch), make(name, b, epoch)
    for x, y in batches(3):
        loss_a = opt_a.step(closure_for(a, x, y), targets=y, micro_batches=micro_batches)
        loss_b = opt_b.step(closure_for(b, x, y), targets=y)
        assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=0), (pa - pb).abs().max()
    passes = opt_a.last_passes
    assert passes.micro_batches == micro_batches and len(passes.forward_per_micro_batch) == micro_batches
    assert sum(passes.forward_per_micro_batch) == passes.forward
    assert sum(passes.backward_per_micro_batch) == passes.backward
    assert vars(opt_a.plan(y, micro_batches).counts()) == vars(passes)


@pytest.mark.parametrize("name,epoch,scheme", [
    ("sam", 0, lambda y, tail: [(None, torch.full((16,), 1 / 16), 0.05)]),
    ("ssesam", 0, lambda y, tail: [(None, (~tail).float() / 16, 0.05), (None, tail.float() / 16, 0.1)]),
    ("ssesam", 1, lambda y, tail: [(None, (~tail).float() / 16, 0.0), (None, tail.float() / 16, 0.1)]),
])
def test_micro_batches_with_batchnorm_follow_the_chunked_official_schedule(name, epoch, scheme):
    """With BatchNorm each chunk normalises with its own statistics; parameters and running buffers equal
    the official schedule whose every full-batch forward is run as the same chunks, in order."""
    torch.manual_seed(0)
    ours = conv_bn_net()
    ref = copy.deepcopy(ours)
    opt = make(name, ours, epoch)
    ref_opt = reference_opt(ref)
    for x, y in batches(3):
        opt.step(closure_for(ours, x, y), targets=y, micro_batches=2)
        scheme_step(ref, ref_opt, x, y, scheme(y, y >= 6), delta=opt.perturb_eps, chunks=2)
    assert_state_close(ours, ref)
    assert opt.last_passes.forward_per_micro_batch == [COUPLED[(name, epoch)][0]] * 2


def test_micro_batches_refused_when_they_cannot_work():
    model = conv_gn_net()
    opt = make("sam", model)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="micro_batches=2 needs targets"):
        opt.step(closure_for(model, x, y), micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches=17 exceeds the batch size 16"):
        opt.step(closure_for(model, x, y), targets=y, micro_batches=17)
    with pytest.raises(ValueError, match="micro_batches=0 must be an integer >= 1"):
        opt.step(closure_for(model, x, y), targets=y, micro_batches=0)


# -- exact in every corner -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bn_mode", [("sam", "reference"), ("ssesam", "reference"), ("sam", "freeze")])
def test_an_overflowing_fp16_step_leaves_everything_as_it_was(name, bn_mode):
    torch.manual_seed(0)
    model = conv_bn_net()
    opt = make(name, model, bn_mode=bn_mode)
    (x0, y0), (x, y) = batches(2)
    opt.step(closure_for(model, x0, y0), targets=y0)  # a normal step first: momentum exists
    state = copy.deepcopy(model.state_dict())
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()]

    def fp16(index=None):
        with torch.autocast("cpu", dtype=torch.float16):
            return closure_for(model, x, y)(index)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # fp16 gradients overflow at this scale
    opt.step(fp16, targets=y, scaler=scaler)
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0**23
    for key, value in model.state_dict().items():  # parameters and BN buffers, bit for bit
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, opt.state.values()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.step(fp16, targets=y, scaler=scaler)  # a finite step trains on
    assert opt.skipped_steps == 1 and all(torch.isfinite(b).all() for b in model.buffers())
    assert not torch.equal(model.state_dict()["1.running_mean"], state["1.running_mean"])


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_freeze_matches_davda54s_bypass(momentum):
    """bn_mode='freeze' vs davda54/sam with example/utility/bypass_bn.py, BN momentum None (cumulative
    average: num_batches_tracked matters) and 0.1."""
    torch.manual_seed(0)
    ours = conv_bn_net()
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    ref = copy.deepcopy(ours)
    opt = make("sam", ours, bn_mode="freeze")
    ref_opt = reference_opt(ref)
    for x, y in batches(4):
        opt.step(closure_for(ours, x, y), targets=y)
        official.sam_step(ref, ref_opt, x, y, rho=0.05, bypass_bn=True)
    assert_state_close(ours, ref)
    assert int(ours[1].num_batches_tracked) == 8  # both forwards counted, as in davda54


def test_add_param_group_parameters_are_updated():
    torch.manual_seed(0)
    late = conv_gn_net()
    whole = copy.deepcopy(late)
    opt = timm.optim.create_optimizer_v2(list(late[:-1].parameters()), opt="imbsam", **HP, **OPTIONS["imbsam"])
    opt.attach(late)
    opt.add_param_group({"params": list(late[-1].parameters())})
    assert opt.param_groups[-1]["rho"] == 0.1 and opt.param_groups is opt.base_optimizer.param_groups
    make("imbsam", whole)
    opt_whole = make("imbsam", whole)
    for x, y in batches(3):
        opt.step(closure_for(late, x, y), targets=y)
        opt_whole.step(closure_for(whole, x, y), targets=y)
    for pa, pb in zip(late.parameters(), whole.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=0)


# -- host syncs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", ["bn", "gn"])
@pytest.mark.parametrize("name,epoch", CASES)
def test_one_host_sync_per_step_at_most_and_none_for_sam(name, epoch, net):
    """Counted as tools/bench_step.py counts them on CPU (Python-level reads that synchronise on a GPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_step import host_syncs

    torch.manual_seed(0)
    model = NETS[net]()
    opt = make(name, model, epoch)
    (x0, y0), (x, y) = batches(2)
    opt.step(closure_for(model, x0, y0), targets=y0)
    assert host_syncs(lambda: opt.step(closure_for(model, x, y), targets=y, micro_batches=2), "cpu") == (
        0 if name == "sam" else 1)
