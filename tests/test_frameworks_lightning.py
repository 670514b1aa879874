"""The README's Lightning recipe: manual optimisation with every method equals the plain loop, automatic with sam,
bf16, fp16 with Lightning's GradScaler (equal to the engine's own scaler path, skipped steps, resume), SSE-SAM's
stage switch on time, checkpoint resume bit-identical, and what SAMCallback refuses."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from test_optim_exact import closure_for
from torch.utils.data import DataLoader, TensorDataset

import ltsam  # noqa: F401

L = pytest.importorskip("lightning", reason="Lightning is in the frameworks extra: pip install -e '.[frameworks]'")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from ltsam.lightning import SAMCallback  # noqa: E402

EPOCHS = 2
OPTIONS = {
    "sam": {},
    "imbsam": {"class_counts": CLASS_COUNTS},
    "ssesam": {"class_counts": CLASS_COUNTS, "epochs": EPOCHS, "gamma": 0.5},
    "focalsam": {"class_counts": CLASS_COUNTS},
}


def create(net: torch.nn.Module, method: str) -> torch.optim.Optimizer:
    return timm.optim.create_optimizer_v2(net, opt=method, lr=0.1, base="momentum", filter_bias_and_bn=False,
                                          **OPTIONS[method])


class LitSAM(L.LightningModule):
    """The README's module: manual optimisation gives the engine per-sample losses and the targets."""

    def __init__(self, net: torch.nn.Module, method: str, manual: bool = True) -> None:
        super().__init__()
        self.net, self.method, self.automatic_optimization = net, method, not manual
        self.stages: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return create(self.net, self.method)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:  # sam only: the classic closure (Lightning's backward), whole batch
            return F.cross_entropy(self(x), y)
        opt = self.optimizers()
        loss = opt.step(lambda idx=None: F.cross_entropy(self(x if idx is None else x[idx]),
                                                        y if idx is None else y[idx], reduction="none"), targets=y)
        if self.method == "ssesam":
            self.stages.append(opt.stage)
        self.log("loss", loss)


def data() -> DataLoader:
    x, y = map(torch.cat, zip(*batches(2)))
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def trainer(epochs: int = EPOCHS, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[SAMCallback()], **kwargs)


def plain_loop(net: torch.nn.Module, method: str) -> torch.nn.Module:
    opt = create(net, method).attach(net)
    for epoch in range(EPOCHS):
        opt.set_epoch(epoch)
        for x, y in data():
            opt.step(closure_for(net, x, y), targets=y)
    return net


def assert_close(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)


@pytest.fixture(scope="module")
def manual_runs(one_thread):
    runs = {}
    for method in OPTIONS:
        torch.manual_seed(0)
        module = LitSAM(conv_gn_net(), method)
        start = copy.deepcopy(module.net)
        trainer().fit(module, data())
        runs[method] = (start, module)
    return runs


@pytest.mark.parametrize("method", list(OPTIONS))
def test_manual_optimisation_equals_the_plain_loop(manual_runs, method):
    start, module = manual_runs[method]
    assert module.trainer.global_step == EPOCHS * 2
    assert_close(module.net, plain_loop(copy.deepcopy(start), method), rtol=1e-5, atol=1e-6)


def test_ssesam_switches_stage_on_time(manual_runs):
    assert manual_runs["ssesam"][1].stages == [1, 1, 2, 2]  # gamma 0.5 of 2 epochs


def test_resume_from_a_checkpoint_is_bit_identical(manual_runs, tmp_path):
    start, uninterrupted = manual_runs["ssesam"]
    first = LitSAM(copy.deepcopy(start), "ssesam")
    run = trainer(epochs=1)
    run.fit(first, data())
    run.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = LitSAM(conv_gn_net(), "ssesam")
    trainer().fit(resumed, data(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.stages == [2, 2]
    for p, q in zip(resumed.net.parameters(), uninterrupted.net.parameters()):
        assert torch.equal(p, q)


def test_automatic_optimisation_with_sam(manual_runs, one_thread):
    start, _ = manual_runs["sam"]
    module = LitSAM(copy.deepcopy(start), "sam", manual=False)
    trainer().fit(module, data())
    assert module.trainer.global_step == EPOCHS * 2
    assert_close(module.net, plain_loop(copy.deepcopy(start), "sam"), rtol=1e-5, atol=1e-6)


def test_automatic_gradient_clipping_by_norm_clips_the_update(manual_runs, one_thread):
    """Lightning clips after each closure call: by norm, the perturbation's direction is unchanged and the update
    is clipped, as the plain loop's pre-hook on the base optimizer clips it."""
    start, _ = manual_runs["sam"]
    module = LitSAM(copy.deepcopy(start), "sam", manual=False)
    trainer(gradient_clip_val=0.05).fit(module, data())
    net = copy.deepcopy(start)
    opt = create(net, "sam").attach(net)

    def clip(*_) -> None:  # a step pre-hook returns None
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)

    opt.base_optimizer.register_step_pre_hook(clip)
    for _ in range(EPOCHS):
        for x, y in data():
            opt.step(closure_for(net, x, y))
    assert_close(module.net, net, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(p, q) for p, q in zip(net.parameters(), plain_loop(copy.deepcopy(start), "sam")
                                                           .parameters()))


def test_bf16_mixed_runs(manual_runs, one_thread):
    start, _ = manual_runs["imbsam"]
    module = LitSAM(copy.deepcopy(start), "imbsam")
    trainer(precision="bf16-mixed").fit(module, data())
    moved = [(p - q).abs().max() for p, q in zip(module.net.parameters(), start.parameters())]
    assert all(torch.isfinite(m) for m in moved) and max(moved) > 0
    assert module.trainer.global_step == EPOCHS * 2


def test_automatic_optimisation_refuses_class_aware_methods_and_accumulation(manual_runs):
    start, _ = manual_runs["sam"]
    with pytest.raises(ValueError, match="ImbSAM in automatic optimisation: it weights each sample by its class"):
        trainer(epochs=1).fit(LitSAM(copy.deepcopy(start), "imbsam", manual=False), data())
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 in automatic optimisation"):
        trainer(epochs=1, accumulate_grad_batches=2).fit(LitSAM(copy.deepcopy(start), "sam", manual=False), data())
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value' in automatic optimisation"):
        trainer(epochs=1, gradient_clip_val=0.1, gradient_clip_algorithm="value").fit(
            LitSAM(copy.deepcopy(start), "sam", manual=False), data())


def fp16(**scaler_options) -> MixedPrecision:
    """What precision="16-mixed" builds on a GPU (on CPU Lightning turns it into bf16): float16 autocast and a
    GradScaler, here a CPU one."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **scaler_options))


def autocast16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.float16, cache_enabled=False)  # MixedPrecision's autocast


class Counted(LitSAM):
    """LitSAM that counts its on_before_optimizer_step calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_calls = 0

    def on_before_optimizer_step(self, optimizer) -> None:
        self.hook_calls += 1


def engine_fp16_loop(net: torch.nn.Module, method: str, classic: bool = False,
                     clip: float = 0.0) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """ltsam's own scaler path under the same autocast: opt.step(closure, targets=y, scaler=GradScaler); ``clip``
    clips the unscaled update by norm (a step pre-hook on the base optimizer runs inside scaler.step)."""
    opt = create(net, method).attach(net)
    scaler = torch.amp.GradScaler("cpu")
    def clip_update(*_) -> None:  # a step pre-hook returns None
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)

    if clip:
        opt.base_optimizer.register_step_pre_hook(clip_update)
    for epoch in range(EPOCHS):
        opt.set_epoch(epoch)
        for x, y in data():
            def classic_closure(x=x, y=y):  # Lightning's automatic closure: zero_grad, scaled backward of the mean
                opt.zero_grad()
                with autocast16():
                    loss = F.cross_entropy(net(x), y)
                scaler.scale(loss).backward()
                return loss.detach()

            with autocast16():
                if classic:
                    opt.step(classic_closure, scaler=scaler)
                else:
                    opt.step(closure_for(net, x, y), targets=y, scaler=scaler)
    return opt, scaler


FP16_CASES = [(m, "gn") for m in OPTIONS] + [("focalsam", "bn")]


@pytest.fixture(scope="module")
def fp16_runs(one_thread):
    runs = {}
    for method, norm in FP16_CASES:
        torch.manual_seed(0)
        module = Counted(conv_gn_net() if norm == "gn" else conv_bn_net(), method)
        start = copy.deepcopy(module.net)
        trainer(plugins=[fp16()]).fit(module, data())
        runs[method, norm] = (start, module)
    return runs


@pytest.mark.parametrize("method,norm", FP16_CASES)
def test_fp16_manual_optimisation_equals_the_engines_scaler_path(fp16_runs, method, norm):
    """precision="16-mixed": the step uses Lightning's own scaler, once per step, and equals the engine's loop."""
    start, module = fp16_runs[method, norm]
    net = copy.deepcopy(start)
    opt, scaler = engine_fp16_loop(net, method)
    for p, q in zip(module.net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(p, q)
    trainer_ = module.trainer
    assert trainer_.global_step == EPOCHS * 2 and module.hook_calls == EPOCHS * 2
    assert trainer_.precision_plugin.scaler.state_dict() == scaler.state_dict()
    assert "optimizer_step" not in vars(trainer_.precision_plugin)  # the adapter is gone after the fit


def test_fp16_ssesam_switches_stage_on_time(fp16_runs):
    assert fp16_runs["ssesam", "gn"][1].stages == [1, 1, 2, 2]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_fp16_automatic_optimisation_with_sam(fp16_runs, one_thread, clip):
    """Lightning's closure scales its own backward; gradient_clip_val clips the unscaled update once."""
    start, _ = fp16_runs["sam", "gn"]
    module = Counted(copy.deepcopy(start), "sam", manual=False)
    trainer(plugins=[fp16()], gradient_clip_val=clip).fit(module, data())
    net = copy.deepcopy(start)
    engine_fp16_loop(net, "sam", classic=True, clip=clip)
    assert_close(module.net, net, rtol=0, atol=0)
    assert module.trainer.global_step == EPOCHS * 2 and module.hook_calls == EPOCHS * 2


class PlainSGD(L.LightningModule):
    """Lightning's own fp16 manual step with a torch optimizer, for what it does with a skipped step."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.automatic_optimization = net, False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        opt.step()


@pytest.mark.parametrize("method,manual", [("sam", True), ("ssesam", True), ("sam", False)])
def test_fp16_overflowing_step_is_skipped_as_lightning_skips_it(method, manual, one_thread):
    """A scale that overflows the fp16 gradient: params and BN buffers unchanged (also with automatic
    optimisation's classic closure), skipped_steps counted, the scale halved, and trainer.global_step counts the
    step, as for a torch optimizer under the same plugin."""
    torch.manual_seed(0)
    start = conv_bn_net()
    module = LitSAM(copy.deepcopy(start), method, manual)
    plain = PlainSGD(copy.deepcopy(start))
    for m in (module, plain):
        trainer(epochs=1, limit_train_batches=1, plugins=[fp16(init_scale=2.0 ** 40)]).fit(m, data())
        for p, q in zip(m.net.parameters(), start.parameters()):
            assert torch.equal(p, q)
        assert m.trainer.global_step == 1 and m.trainer.precision_plugin.scaler.get_scale() == 2.0 ** 39
    assert module.trainer.optimizers[0].skipped_steps == 1
    for p, q in zip(module.net.buffers(), start.buffers()):  # Lightning's own step keeps the forward's BN update
        assert torch.equal(p, q)


def test_fp16_resume_restores_the_scaler(fp16_runs, tmp_path, one_thread):
    """The adapter leaves the plugin's class (the checkpoint's key) as it is: the scaler's state is saved and
    restored, and the resumed run equals the uninterrupted one bit for bit."""
    start, _ = fp16_runs["ssesam", "gn"]
    growing = dict(init_scale=16.0, growth_interval=1)  # doubles every step: a scaler not restored would show
    uninterrupted = LitSAM(copy.deepcopy(start), "ssesam")
    trainer(plugins=[fp16(**growing)]).fit(uninterrupted, data())
    first = LitSAM(copy.deepcopy(start), "ssesam")
    run = trainer(epochs=1, plugins=[fp16(**growing)])
    run.fit(first, data())
    run.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = LitSAM(conv_gn_net(), "ssesam")
    trainer(plugins=[fp16(**growing)]).fit(resumed, data(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.stages == [2, 2]
    scale = resumed.trainer.precision_plugin.scaler.get_scale()
    assert scale == uninterrupted.trainer.precision_plugin.scaler.get_scale() == 16.0 * 2 ** (EPOCHS * 2)
    for p, q in zip(resumed.net.parameters(), uninterrupted.net.parameters()):
        assert torch.equal(p, q)


class TwoPass(LitSAM):
    """davda54's form in manual optimisation: manual_backward, first_step, manual_backward, second_step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.first_step(zero_grad=True)
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.second_step(zero_grad=True)


def test_fp16_first_step_is_refused_with_the_alternative(fp16_runs):
    module = TwoPass(copy.deepcopy(fp16_runs["sam", "gn"][0]), "sam")
    with pytest.raises(RuntimeError, match=r"SAM.first_step\(\) under Lightning's GradScaler \(precision='16-mixed'\): "
                                           r"manual_backward scales p.grad"):
        trainer(epochs=1, plugins=[fp16()]).fit(module, data())
    for p, q in zip(module.net.parameters(), fp16_runs["sam", "gn"][0].parameters()):
        assert torch.equal(p, q)  # refused before any update
