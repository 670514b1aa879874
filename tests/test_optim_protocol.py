"""The optimizers as torch optimizers: copies, state-dict hooks, signatures and registry metadata, base= a class,
the classic closure, first_step/second_step, set_targets, wrappers that copy __dict__, and clipping."""

from __future__ import annotations

import copy
import functools
import inspect
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from test_optim_exact import closure_for

import ltsam  # noqa: F401
from ltsam.optim import SAM, SSESAM, ImbSAM
from ltsam.optim.protocol import takes_index, unwrap
from ltsam_common.names import SAM_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")


def sam(net: torch.nn.Module, **kwargs) -> SAM:
    return timm.optim.create_optimizer_v2(net, opt="sam", lr=0.1, base="momentum", filter_bias_and_bn=False,
                                          **kwargs).attach(net)


def params_of(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_continues_exactly_as_the_original(copy_fn):
    torch.manual_seed(0)
    net = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(net, opt="ssesam", lr=0.1, class_counts=CLASS_COUNTS, epochs=4,
                                         gamma=0.5).attach(net)
    data = batches(4)
    for x, y in data[:2]:
        opt.step(closure_for(net, x, y), targets=y)
    opt.next_epoch()
    net_copy, opt_copy = copy_fn((net, opt))
    assert opt_copy._model is net_copy and opt_copy.epoch == 1 and opt_copy.param_groups[0]["params"][0] is \
        next(net_copy.parameters())
    for x, y in data[2:]:
        opt.step(closure_for(net, x, y), targets=y)
        opt_copy.step(closure_for(net_copy, x, y), targets=y)
    for p, q in zip(net.parameters(), net_copy.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(net.buffers(), net_copy.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_keeps_the_radius_schedule(copy_fn):
    net = conv_gn_net()
    opt = timm.optim.create_optimizer_v2(net, opt="focalsam", class_counts=CLASS_COUNTS, rho_sched="cosine",
                                         epochs=10).attach(net)
    opt.set_epoch(3)
    opt_copy = copy_fn(opt)
    assert opt_copy.scheduled_radii() == opt.scheduled_radii() and opt.scheduled_radii()["rho"] < 0.2
    opt_copy.next_epoch()
    opt.next_epoch()
    assert opt_copy.param_groups[0]["rho"] == opt.param_groups[0]["rho"]


def test_state_dict_hooks_registered_on_the_optimizer_fire():
    net = conv_gn_net()
    opt = sam(net)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", sd["extra"])) or
                                          {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o.epoch)))
    state = opt.state_dict()
    assert state["extra"] == 1 and "ltsam" in state
    state["ltsam"]["epoch"] = 3
    opt.load_state_dict(state)
    assert calls == [("pre", True), ("load_pre", 1), ("load_post", 3)]


@pytest.mark.parametrize("name", SAM_METHODS)
def test_registry_metadata_matches_the_signature(name):
    info = timm.optim.get_optimizer_info(name)
    accepted = inspect.signature(timm.optim.get_optimizer_class(name, bind_defaults=False).__init__).parameters
    assert (info.has_eps, info.has_betas, info.has_momentum) == tuple(k in accepted for k in ("eps", "betas",
                                                                                               "momentum"))
    assert {"base", "rho_sched", "bn_mode"} <= set(accepted)  # the engine's options, spelled out


def test_eps_betas_momentum_reach_the_base_only_when_it_takes_them():
    net = conv_gn_net()
    sgd = timm.optim.create_optimizer_v2(net, opt="sam", lr=0.1, eps=1e-6, betas=(0.5, 0.6), momentum=0.5)
    assert sgd.param_groups[0]["momentum"] == 0.5 and "betas" not in sgd.param_groups[0]
    adamw = timm.optim.create_optimizer_v2(net, opt="sam", lr=0.1, base="adamw", eps=1e-6, betas=(0.5, 0.6),
                                           momentum=0.5)
    assert adamw.param_groups[0]["betas"] == (0.5, 0.6) and adamw.param_groups[0]["eps"] == 1e-6
    assert "momentum" not in adamw.param_groups[0]


@pytest.mark.parametrize("base", [torch.optim.SGD, timm.optim.Lars])
def test_base_may_be_an_optimizer_class(base):
    net = conv_gn_net()
    opt = SAM(net.parameters(), base=base, lr=0.1, momentum=0.9, eps=1e-6, betas=(0.5, 0.6))
    assert type(opt.base_optimizer) is base and opt.param_groups[0]["momentum"] == 0.9
    assert opt.defaults["base"] == f"{base.__module__}.{base.__qualname__}"  # a name: state_dict stays plain
    x, y = batches(1)[0]
    opt.attach(net).step(closure_for(net, x, y))
    with pytest.raises(ValueError, match=r"base=<class 'torch.nn.modules.linear.Linear'> must be a timm optimizer "
                                         "name"):
        SAM(net.parameters(), base=torch.nn.Linear)


def test_davda54s_positional_base_is_explained():
    net = conv_gn_net()
    with pytest.raises(TypeError, match=r"SAM\(params, SGD, \.\.\.\): the second positional argument is rho, not "
                                        r"the base optimizer; pass the base by name, e\.g\. "
                                        r"SAM\(params, base=torch\.optim\.sgd\.SGD"):
        SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="the second positional argument is class_counts"):
        ImbSAM(net.parameters(), torch.optim.SGD, lr=0.1)


def test_classic_closure_equals_per_sample_closure_and_first_second_step():
    """davda54's calling conventions give the engine's update: the classic closure (zero_grad, forward, backward,
    return the loss) through step(), and first_step()/second_step() around the user's own backward."""
    torch.manual_seed(0)
    nets = [conv_gn_net() for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    opts = [sam(net, rho=0.1) for net in nets]

    def classic_for(x: torch.Tensor, y: torch.Tensor):
        def classic():
            opts[1].zero_grad()
            loss = F.cross_entropy(nets[1](x), y)
            loss.backward()
            return loss
        return classic

    for x, y in batches(3):
        opts[0].step(closure_for(nets[0], x, y))
        loss = opts[1].step(classic_for(x, y))
        assert loss.dim() == 0 and opts[1].last_loss is loss
        F.cross_entropy(nets[2](x), y).backward()
        opts[2].first_step(zero_grad=True)
        F.cross_entropy(nets[2](x), y).backward()
        opts[2].second_step(zero_grad=True)
    for other in nets[1:]:
        for p, q in zip(nets[0].parameters(), other.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_two_pass_form_with_a_grad_scaler_steps_as_the_classic_closure_and_skips_an_overflow():
    """fp16 (CPU autocast) with both backwards scaled: second_step(scaler=...) unscales G and steps as
    step(classic closure, scaler=...) does; an overflowing step is skipped, counted, halves the scale, and
    leaves the weights at w and the BatchNorm buffers as the forward at w left them (not NaN)."""
    torch.manual_seed(0)
    nets = [conv_bn_net() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [sam(net, rho=0.1) for net in nets]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) for _ in nets]

    def loss_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(net(x), y)

    def two_pass(x: torch.Tensor, y: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        scaler.scale(loss_of(nets[1], x, y)).backward()
        opts[1].first_step(zero_grad=True)
        scaler.scale(loss_of(nets[1], x, y)).backward()
        opts[1].second_step(zero_grad=True, scaler=scaler)

    for x, y in batches(3):
        def classic(x=x, y=y) -> torch.Tensor:
            opts[0].zero_grad()
            loss = loss_of(nets[0], x, y)
            scalers[0].scale(loss).backward()
            return loss
        opts[0].step(classic, scaler=scalers[0])
        two_pass(x, y, scalers[1])
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert scalers[0].get_scale() == scalers[1].get_scale()

    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)
    x, y = batches(1, seed=4)[0]
    before = params_of(nets[1])
    overflowing.scale(loss_of(nets[1], x, y)).backward()
    after_forward_at_w = [b.clone() for b in nets[1].buffers()]
    opts[1].first_step(zero_grad=True)
    overflowing.scale(loss_of(nets[1], x, y)).backward()
    opts[1].second_step(zero_grad=True, scaler=overflowing)
    assert all(torch.equal(p, q) for p, q in zip(nets[1].parameters(), before))
    assert all(torch.equal(b, c) for b, c in zip(nets[1].buffers(), after_forward_at_w))
    assert opts[1].skipped_steps == 1 and overflowing.get_scale() == 2.0 ** 119


def test_classic_closure_and_two_pass_form_are_refused_for_class_aware_methods():
    net = conv_gn_net()
    opt = timm.optim.create_optimizer_v2(net, opt="imbsam", class_counts=CLASS_COUNTS).attach(net)
    x, y = batches(1)[0]

    def classic():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    message = "ImbSAM weights each sample by its class, so it needs a closure returning per-sample losses"
    with pytest.raises(RuntimeError, match=message):
        opt.step(classic, targets=y)
    with pytest.raises(RuntimeError, match=message):
        opt.first_step()


def test_misuse_of_the_two_pass_form_is_refused():
    net = conv_gn_net()
    opt = sam(net)
    with pytest.raises(RuntimeError, match=r"first_step\(\) needs the gradients at w in p.grad"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"second_step\(\) without first_step\(\)"):
        opt.second_step()
    x, y = batches(1)[0]
    F.cross_entropy(net(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) is pending: call second_step\(\)"):
        opt.step()


def test_set_targets_reaches_a_step_without_targets_once():
    torch.manual_seed(0)
    nets = [conv_gn_net(), conv_gn_net()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [timm.optim.create_optimizer_v2(n, opt="focalsam", lr=0.1, class_counts=CLASS_COUNTS).attach(n)
            for n in nets]
    for x, y in batches(2):
        opts[0].step(closure_for(nets[0], x, y), targets=y)
        opts[1].set_targets(y)
        opts[1].step(closure_for(nets[1], x, y))
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match=r"needs targets=<labels of the batch> \(or opt.set_targets\(y\)"):
        opts[1].step(closure_for(nets[1], x, y))  # consumed by the step it was set for


def test_a_wrapper_that_copies_dict_shares_progress_model_and_targets():
    """LightningOptimizer copies the optimizer's __dict__: what it sets must reach the optimizer."""
    lightning = pytest.importorskip("lightning.pytorch.core.optimizer")
    net = conv_gn_net()
    opt = SSESAM(net.parameters(), class_counts=CLASS_COUNTS, epochs=2, gamma=0.5)
    wrapper = lightning.LightningOptimizer(opt)
    wrapper.attach(net)
    wrapper.next_epoch()
    wrapper.set_targets(torch.tensor([0]))
    assert unwrap(wrapper) is opt
    assert opt._model is net and opt.epoch == 1 and opt.stage == 2 and opt._shared.targets is not None


def test_clipping_in_a_plain_loop():
    """clip_grad_norm_ before step() clips nothing (the engine recomputes the gradients); the two ways that work
    clip the update G: a step pre-hook on the base optimizer, or clip between the second backward and
    second_step()."""
    torch.manual_seed(0)
    nets = [conv_gn_net() for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    opts = [sam(net) for net in nets]
    max_norm = 0.05
    norms = []
    hook = opts[0].base_optimizer.register_step_pre_hook(
        lambda *_: norms.append(torch.nn.utils.clip_grad_norm_(nets[0].parameters(), max_norm)))
    for x, y in batches(2):
        opts[0].step(closure_for(nets[0], x, y))
        F.cross_entropy(nets[1](x), y).backward()
        opts[1].first_step(zero_grad=True)
        F.cross_entropy(nets[1](x), y).backward()
        torch.nn.utils.clip_grad_norm_(nets[1].parameters(), max_norm)
        opts[1].second_step(zero_grad=True)
        opts[2].step(closure_for(nets[2], x, y))  # unclipped
    hook.remove()
    assert min(norms) > max_norm  # clipping changed the update
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(p, q) for p, q in zip(nets[0].parameters(), nets[2].parameters()))


def test_the_closure_kind_comes_from_its_signature():
    def per_sample(index=None):
        return index

    def forwarding(*args, **kwargs):
        return args

    assert takes_index(per_sample) and takes_index(lambda idx=None: idx)
    assert not takes_index(lambda: None) and not takes_index(forwarding)
    assert not takes_index(functools.partial(per_sample, None))  # Lightning's wrapped closure is a partial
