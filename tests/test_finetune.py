"""Lightweight fine-tuning (ltsam.finetune): every SAM-family method's step over the trainable parameters only
equals the plain re-derivation of tests/official.py with an SGD that holds only them; frozen weights stay
bit-identical; modes that do not fit the model are refused by name."""

from __future__ import annotations

import copy

import official
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, batches
from keyed_dropout import KeyedMasks, tag
from torch import nn

from ltsam.finetune import MODES, FinetuneError, FinetuneOptions, default_bottleneck, prepare_model

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
TAIL = torch.tensor([c for c, n in enumerate(CLASS_COUNTS) if n < 20])
LIGHT_MODES = [m for m in MODES if m != "full"]
METHODS = {
    "sam": (dict(rho=0.05), official.sam_step, dict(rho=0.05)),
    "imbsam": (dict(rho=0.1, eta=20, class_counts=CLASS_COUNTS), official.imbsam_step,
               dict(tail_classes=TAIL, rho=0.1)),
    "ssesam": (dict(head_rho=0.05, tail_rho=0.1, gamma=0.5, eta=20, epochs=2, class_counts=CLASS_COUNTS),
               official.ssesam_step, dict(tail_classes=TAIL, head_rho=0.05, tail_rho=0.1)),
    "focalsam": (dict(rho=0.3, gamma=3.2, lam=0.8, class_counts=CLASS_COUNTS), official.focalsam_step,
                 dict(class_counts=CLASS_COUNTS, rho=0.3, gamma=3.2, lam=0.8)),
}


DROPOUT = dict(drop_rate=0.2, pos_drop_rate=0.1, proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3)


def tiny_vit(**drop_rates: float) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                             num_classes=10, **drop_rates)


def prepared(mode: str, dropout: bool = False, **options) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(0)
    model = tiny_vit(**(DROPOUT if dropout else {}))
    trainable = prepare_model(model, mode, FinetuneOptions(**options))
    with torch.no_grad():  # move off the identity initialisation (zero up-projections) so every tuner matters
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
    return model, trainable


def one_batch(tail_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 samples; ``tail_samples`` 1: a single tail sample, so the engine's tail pass forwards one sample
    (the ViT case whose cls_token / pos_embed gradients alias)."""
    x, y = batches(1)[0]
    if tail_samples == 1:
        y = y % 6
        y[0] = 8
    return x, y


@pytest.mark.parametrize("tail_samples,dropout", [(2, False), (1, False), (1, True)])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode", LIGHT_MODES)
def test_step_over_trainable_parameters_matches_reference(mode, method, tail_samples, dropout, one_thread):
    """With dropout, every random layer draws its mask per (sample, point) (tests/keyed_dropout.py): ltsam's
    subset forwards and the official full-batch forwards then drop the same units."""
    ours, trainable = prepared(mode, dropout)
    ref = copy.deepcopy(ours)
    if dropout:
        ours, ref = KeyedMasks(ours), KeyedMasks(ref)
        ours.start_step()
        ref.start_step()
    frozen_before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    opt_kwargs, step_fn, ref_kwargs = METHODS[method]
    opt = timm.optim.create_optimizer_v2(trainable, opt=method, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                                         base="momentum", **opt_kwargs).attach(ours)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM,
                              weight_decay=WD)
    for x, y in [one_batch(tail_samples)]:
        x = tag(x) if dropout else x
        opt.step(lambda index=None, x=x, y=y: official.per_sample(
            ours, x if index is None else x[index], y if index is None else y[index]), targets=y)
        step_fn(ref, ref_opt, x, y, **ref_kwargs)
        if dropout:  # one forward per sample at w, as the official code
            assert sorted(i for i, point in ours.forwards if point == "w") == list(range(len(y)))
            assert max(ours.forwards.values()) == 1, ours.forwards
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"{mode}/{method}: {name} differs by {(a - b).abs().max()}"
        if name in frozen_before:
            assert torch.equal(a, frozen_before[name]), f"{mode}/{method}: frozen {name} changed"
            assert a.grad is None, f"{mode}/{method}: frozen {name} holds a gradient"
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)


def test_trainable_counts_per_mode():
    """Counts of the tiny ViT (depth 2, width 32, MLP 128, 10 classes, bottleneck 1, prompts 10, rank 1)."""
    head = 32 * 10 + 10
    expected = {
        "classifier": head,
        "bias": head + 32 + 2 * (32 + 96 + 32 + 32 + 128 + 32) + 32,  # patch embedding, blocks, final norm
        "ln": head + 2 * 2 * 64 + 64,
        "vpt-shallow": head + 10 * 32,
        "vpt-deep": head + 2 * 10 * 32,
        "adapter": head + 2 * (64 + 32 + 1 + 32 + 32),
        "adaptformer": head + 2 * (64 + 32 + 1 + 32 + 32 + 1),
        "lora": head + 2 * (32 * 1 + 1 * 96),
        "ssf": head + 2 * 2 * (32 + 96 + 32 + 32 + 128 + 32),
    }
    assert default_bottleneck(10, 2) == 2 ** 1 and default_bottleneck(1000, 12) == 32
    for mode, count in expected.items():
        _, trainable = prepared(mode, bottleneck=1, lora_rank=1)
        assert sum(p.numel() for p in trainable) == count, mode
        assert all(p.dim() >= 1 for p in trainable), f"{mode}: DeepSpeed's broadcast refuses 0-d parameters"


def test_partial_blocks_and_prompt_tokens_skip_pooling():
    model, trainable = prepared("vpt-deep", blocks=1, prompt_length=3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["blocks.1.prompts", "head.weight",
                                                                             "head.bias"]
    assert model.num_prefix_tokens == 4
    assert model.forward_features(torch.randn(2, 3, 8, 8)).shape == (2, 1 + 3 + 4, 32)


def test_ema_copy_uses_its_own_tuners():
    model, _ = prepared("ssf")
    copy_ = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        copy_.blocks[0].norm1.ssf.shift.add_(1.0)
    assert not torch.allclose(copy_(x), model(x))


def test_mode_that_does_not_fit_is_refused_by_name():
    cnn = timm.create_model("lt_cnn_small", num_classes=3)
    for mode in ("vpt-deep", "adaptformer", "lora"):
        with pytest.raises(FinetuneError, match=f"--finetune {mode} does not fit model 'lt_cnn_small'"):
            prepare_model(cnn, mode, name="lt_cnn_small")
    with pytest.raises(FinetuneError, match="--finetune ln: model 'lt_cnn_small' has no LayerNorm parameters"):
        prepare_model(cnn, "ln", name="lt_cnn_small")
    with pytest.raises(FinetuneError, match="--finetune 'prompt' is not a fine-tuning mode"):
        prepare_model(tiny_vit(), "prompt")
    with pytest.raises(FinetuneError, match=r"--lora-rank must be >= 1, got 0"):
        prepare_model(tiny_vit(), "lora", FinetuneOptions(lora_rank=0))
    with pytest.raises(FinetuneError, match=r"--finetune-blocks 5 must lie in \[1, 2\]"):
        prepare_model(tiny_vit(), "adapter", FinetuneOptions(blocks=5), name="vit")


def test_vit_families_without_class_token_with_swiglu_or_two_heads():
    """AIMv2's layout (no class token, average pooling, SwiGLU MLP) and DeiT distilled (two heads): VPT prompts
    stay out of the pooling, SSF and LoRA reach every MLP Linear, both heads train; dynamic sizes refuse VPT."""
    shrunk = dict(img_size=8, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=5)
    aimv2 = timm.create_model("aimv2_large_patch14_224", **shrunk)
    prepare_model(aimv2, "vpt-deep", FinetuneOptions(prompt_length=3))
    tokens = aimv2.forward_features(torch.randn(2, 3, 8, 8))
    assert tokens.shape == (2, 3 + 4, 32)
    torch.testing.assert_close(aimv2.forward_head(tokens, pre_logits=True), tokens[:, 3:].mean(1))
    for mode, tuned in (("ssf", ["fc1_g.ssf.scale", "fc1_x.ssf.scale", "fc2.ssf.scale"]),
                        ("lora", ["fc1_g.lora_A.default.weight", "fc1_x.lora_A.default.weight",
                                  "fc2.lora_A.default.weight"])):
        model = timm.create_model("aimv2_large_patch14_224", **shrunk)
        prepare_model(model, mode, FinetuneOptions(lora_rank=1, lora_mlp=True))
        assert [n for n, p in model.blocks[0].mlp.named_parameters() if p.requires_grad and "shift" not in n
                and "lora_B" not in n] == tuned, mode
    deit = timm.create_model("deit_tiny_distilled_patch16_224", **shrunk)
    trainable = prepare_model(deit, "adaptformer", FinetuneOptions(bottleneck=1))
    assert {id(p) for p in (*deit.head.parameters(), *deit.head_dist.parameters())} <= {id(p) for p in trainable}
    dynamic = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **shrunk)
    with pytest.raises(FinetuneError, match="--finetune vpt-shallow does not fit model 'vit' built with "
                                            "dynamic_img_size=True"):
        prepare_model(dynamic, "vpt-shallow", name="vit")
