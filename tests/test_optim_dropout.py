"""Exact with dropout and stochastic depth (ltsam.optim.random_layers).

The official codes forward the whole batch; ltsam forwards subsets, so torch's random draws differ. What must
hold, and is checked here over methods x batch compositions: with masks that are a function of (sample,
point) (tests/keyed_dropout.py) the step equals the official step, and ltsam forwards each sample exactly once
at w and at most once at a perturbed point with gradient, which is what makes the step equal in distribution.
Where every pass is a whole-batch forward in the official order (sam, focalsam) the real draws are the official
ones: same seed, same step. BatchNorm replays become forwards at w; a compiled model that would forward a sample
twice at w is refused by name.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from keyed_dropout import keyed_pair, tag
from test_optim_engine import reference_opt, scheme_step
from test_optim_property import (
    DELTA,
    METHODS,
    MICRO_BATCHES,
    assert_close,
    closure_for,
    data,
    make_optimizer,
    official_step,
    scheme,
)
from timm.layers import DropBlock2d, PatchDropout
from torch import nn

from ltsam.optim.batchnorm import batch_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def dropout_vit(num_classes: int = 10) -> nn.Module:
    """A small timm ViT with every kind of dropout it has: position, attention, projection, MLP, head, drop path."""
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=2, embed_dim=16, num_heads=2,
                             mlp_ratio=2.0, num_classes=num_classes, drop_rate=0.2, pos_drop_rate=0.1,
                             proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3)


def dropout_bn_net(num_classes: int = 10) -> nn.Module:
    """conv-BN with dropout between the BatchNorm layers: the second BN's statistics depend on the masks."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, num_classes),
    )


def test_random_layers_are_listed_and_drop_block_couples_the_batch():
    vit = dropout_vit()
    names = batch_policy(vit).random
    assert "pos_drop (Dropout)" in names and "blocks.1.drop_path1 (DropPath)" in names
    assert "blocks.0.attn.attn_drop (Dropout)" in names and "head_drop (Dropout)" in names
    assert not any(n.startswith("blocks.0.drop_path") for n in names)  # rate 0 in the first block: no draw
    assert batch_policy(vit.eval()).random == []
    assert batch_policy(nn.Sequential(PatchDropout(0.5), nn.Linear(4, 4))).random == ["0 (PatchDropout)"]
    blocked = batch_policy(nn.Sequential(nn.Conv2d(3, 3, 1), DropBlock2d(0.1, 3)))
    assert blocked.coupled and blocked.random == []  # its mask is scaled by the whole batch's keep rate


COMPOSITIONS = ["one sample, tail", "one tail", "one head", "no tail", "one tail, 4 micro-batches",
                "one sample per micro-batch"]


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("method", METHODS)
def test_step_with_dropout_equals_the_official_step_drawing_the_same_masks(method, composition):
    torch.manual_seed(0)
    ours, ref = keyed_pair(dropout_vit())
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    for step, (x, y) in enumerate(data(composition, seed=len(composition))):
        x = tag(x)
        ours.start_step()
        ref.start_step()
        opt.step(closure_for(ours, x, y), targets=y, micro_batches=MICRO_BATCHES.get(composition, 1))
        at_w = {i: n for (i, point), n in ours.forwards.items() if point == "w"}
        perturbed = [n for (_, point), n in ours.forwards.items() if point == "perturbed"]
        assert at_w == dict.fromkeys(range(len(y)), 1), f"forwards at w per sample: {at_w}"
        assert all(n == 1 for n in perturbed), f"a sample forwarded twice at a perturbed point: {ours.forwards}"
        if method == "classradiussam":
            scheme_step(ref, ref_opt, x, y, scheme(method, y), DELTA[method])
        else:
            official_step(method, ref, ref_opt, x, y)
        if step == 0:
            assert_close([p.grad for p in ours.parameters()], [p.grad for p in ref.parameters()], "G of param",
                         atol=1e-6)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["sam", "focalsam"])
def test_whole_batch_passes_draw_the_official_masks_with_the_same_seed(method, checkpointing):
    """Real torch dropout: sam's and focalsam's passes are the official forwards in the official order. With
    timm's gradient checkpointing each VJP recomputes the blocks, with the forward's masks (torch restores the
    random state), so focalsam's two gradients at w still share them."""
    torch.manual_seed(0)
    ours = dropout_vit()
    ref = copy.deepcopy(ours)
    ours.set_grad_checkpointing(checkpointing)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    for step, (x, y) in enumerate(data("one tail", seed=5)):
        torch.manual_seed(100 + step)
        opt.step(closure_for(ours, x, y), targets=y)
        torch.manual_seed(100 + step)
        official_step(method, ref, ref_opt, x, y)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)
    changed = copy.deepcopy(ref)
    torch.manual_seed(7)
    official_step(method, changed, reference_opt(changed), *data("one tail", seed=5)[0])
    torch.manual_seed(8)
    official_step(method, ref, reference_opt(ref), *data("one tail", seed=5)[0])
    assert not torch.allclose(changed.head.weight, ref.head.weight), "the seed does not change the step"


@pytest.mark.parametrize("method,composition", [("ssesam stage 1", "one tail"), ("ssesam stage 2", "one tail"),
                                                ("ssesam stage 2", "no tail")])
def test_batchnorm_with_dropout_replays_by_forwarding_at_w(method, composition):
    """The official repeated forward at w draws new masks, so recorded statistics would replay the first
    forward's: the engine runs each group's own forward at w, making as many draws as the official 4 forwards;
    with keyed masks the buffers are the official ones."""
    torch.manual_seed(0)
    ours, ref = keyed_pair(dropout_bn_net())
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    for x, y in data(composition, seed=9)[:3]:
        x = tag(x)
        ours.start_step()
        ref.start_step()
        assert "group 1: at w, micro-batch 0: forward 16 samples" in str(opt.plan(y))
        opt.step(closure_for(ours, x, y), targets=y)
        assert opt.last_passes.forward == 4
        official_step(method, ref, ref_opt, x, y)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)


@pytest.mark.parametrize("method,composition", [("ssesam stage 1", "one tail"), ("ssesam stage 2", "one tail"),
                                                ("ssesam stage 1", "one sample per micro-batch")])
def test_batchnorm_with_dropout_takes_each_groups_gradients_from_its_own_forward(method, composition):
    """With BatchNorm, a sample's gradient depends on the other samples' masks: the official code takes each
    group's gradients at w from that group's own forward (fresh masks), so the engine does too, in the official
    order. With the same seed, torch's real draws are then the official ones (from one forward at w, SSE-SAM's
    tail direction would share the head's masks and differ)."""
    torch.manual_seed(0)
    ours = dropout_bn_net()
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    chunks = MICRO_BATCHES.get(composition, 1)
    for step, (x, y) in enumerate(data(composition, seed=10)[:2]):
        torch.manual_seed(100 + step)
        opt.step(closure_for(ours, x, y), targets=y, micro_batches=chunks)
        torch.manual_seed(100 + step)
        if chunks > 1:
            scheme_step(ref, ref_opt, x, y, scheme(method, y), DELTA.get(method, 1e-16), chunks=chunks)
        else:
            official_step(method, ref, ref_opt, x, y)
        assert opt.last_passes.forward == 4 * chunks
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)


def test_a_compiled_model_that_would_forward_a_sample_twice_at_w_is_refused():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = data("one tail", seed=0)[0]
    model = dropout_vit()
    compiled = torch.compile(model, backend="aot_eager")
    focal = make_optimizer("focalsam", model).attach(compiled)
    with pytest.raises(ValueError, match=r"FocalSAM on a compiled model with random layers active \(pos_drop "
                                         r"\(Dropout\) and \d+ more\): this step takes 2 gradients at w .*drop "
                                         r"--torchcompile"):
        focal.step(closure_for(compiled, x, y), targets=y)
    assert all(p.grad is None for p in model.parameters())
    imbsam = make_optimizer("imbsam", model).attach(compiled)  # head and tail gradients: disjoint samples
    plan = imbsam.plan(y)
    assert [p.size for p in plan.at_w] == [1, 15] and all(len(p.vjps) == 1 for p in plan.at_w), str(plan)
    before = model.head.weight.detach().clone()
    imbsam.step(closure_for(compiled, x, y), targets=y)
    assert not torch.equal(before, model.head.weight)


def test_re_entrant_checkpointing_is_refused_saying_how_to_turn_it_off():
    torch.manual_seed(0)
    model = dropout_vit()
    model.set_grad_checkpointing(True)
    opt = make_optimizer("imbsam", model)
    x, y = data("one tail", seed=0)[0]
    timm.layers.set_reentrant_ckpt(True)
    try:
        with pytest.raises(RuntimeError, match=r"re-entrant gradient checkpointing.*unset TIMM_REENTRANT_CKPT"):
            opt.step(closure_for(model, x, y), targets=y)
    finally:
        timm.layers.set_reentrant_ckpt(False)
    opt.step(closure_for(model, x, y), targets=y)  # the non-re-entrant default steps


def test_densenet_dropout_between_batchnorms_makes_the_replays_forwards():
    """timm's DenseNet layers call F.dropout (proj_drop_rate) before the next layer's BatchNorm: listed by their
    rate, so an ImbSAM step without tail (the official w + 0 forward skipped) forwards again at w and, with the
    same seed, draws exactly the official masks: recorded statistics would replay the first forward's."""
    torch.manual_seed(0)
    ours = timm.create_model("densenet121", growth_rate=4, block_config=(1, 1), bn_size=2, num_classes=10,
                             proj_drop_rate=0.3)
    assert batch_policy(ours).random == ["features.denseblock1.denselayer1 (DenseLayer)",
                                         "features.denseblock2.denselayer1 (DenseLayer)"]
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer("imbsam", ours), reference_opt(ref)
    for step, (x, y) in enumerate(data("no tail", seed=6)[:2]):
        torch.manual_seed(100 + step)
        opt.step(closure_for(ours, x, y), targets=y)
        torch.manual_seed(100 + step)
        official_step("imbsam", ref, ref_opt, x, y)
    assert opt.last_passes.forward == 2
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)
