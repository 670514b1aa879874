"""The README's Lightning recipe: manual optimisation with every method equals the plain loop, automatic with sam,
bf16, SSE-SAM's stage switch on time, checkpoint resume bit-identical, and what SAMCallback refuses."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CLASS_COUNTS, batches, conv_gn_net
from test_optim_exact import closure_for
from torch.utils.data import DataLoader, TensorDataset

import ltsam  # noqa: F401

L = pytest.importorskip("lightning", reason="Lightning is in the frameworks extra: pip install -e '.[frameworks]'")
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


def test_a_grad_scaler_precision_is_refused(manual_runs):
    """16-mixed on a GPU brings a GradScaler (on CPU Lightning has none): given one, SAMCallback refuses."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="Lightning's GradScaler path runs the closure once itself"):
        trainer(epochs=1, plugins=[scaled]).fit(LitSAM(copy.deepcopy(manual_runs["sam"][0]), "sam"), data())
