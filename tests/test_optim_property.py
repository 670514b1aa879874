"""Exact over batch compositions x model families x every registered method (and a user-registered one).

Each case runs ltsam's step and a plain re-derivation side by side: first-step G (``p.grad``), then 4 steps of
parameters and every buffer (BatchNorm running statistics included). The compositions are the ones that break
exactness claims: a batch of one (head or tail), one tail or one head sample, all tail, no tail, one sample per
class, and micro-batches that isolate a single sample. The models are the families whose passes differ:
conv-BN (batch-coupled), LayerNorm and GroupNorm nets (subset forwards), a timm ViT (cls token and position
embedding, whose gradients autograd may return as views of one storage), and a net with tied weights.
"""

from __future__ import annotations

import copy

import official
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, conv_bn_net, conv_gn_net
from test_optim_engine import HP, OPTIONS, conv_ln_net, reference_opt, scheme_step
from torch import nn

import ltsam  # noqa: F401  (registers the optimizers)
from ltsam.optim import SAM_FAMILY, ClassAware, Group, register

TAIL = torch.tensor([c for c, n in enumerate(CLASS_COUNTS) if n < 20])  # classes 6..9 (eta=20)
STEPS = 4


def vit(num_classes: int = 10) -> nn.Module:
    """A timm ViT small enough for CPU tests, with its cls token and position embedding."""
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=1, embed_dim=16, num_heads=2,
                             mlp_ratio=2.0, num_classes=num_classes)


class TiedNet(nn.Module):
    """One weight matrix used by two layers (as tied embeddings are): its gradient is the sum of both uses."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, 16)
        self.mix = nn.Linear(16, 16)
        self.unmix = nn.Linear(16, 16)
        self.unmix.weight = self.mix.weight
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x.flatten(1)))
        return self.head(torch.tanh(self.unmix(torch.tanh(self.mix(h)))))


MODELS = {"conv-bn": conv_bn_net, "ln": conv_ln_net, "gn": conv_gn_net, "vit": vit, "tied": TiedNet}


def labels(composition: str, gen: torch.Generator) -> torch.Tensor:
    head = lambda n: torch.randint(0, 6, (n,), generator=gen)  # noqa: E731
    tail = lambda n: torch.randint(6, 10, (n,), generator=gen)  # noqa: E731
    return {
        "one sample, tail": lambda: tail(1),
        "one sample, head": lambda: head(1),
        "one tail": lambda: torch.cat([head(7), tail(1), head(8)]),
        "one head": lambda: torch.cat([tail(5), head(1), tail(10)]),
        "all tail": lambda: tail(16),
        "no tail": lambda: head(16),
        "one per class": lambda: torch.randperm(10, generator=gen),
        "one tail, 4 micro-batches": lambda: torch.cat([head(7), tail(1), head(8)]),
        "one sample per micro-batch": lambda: torch.cat([head(2), tail(1), head(1)]),
    }[composition]()


MICRO_BATCHES = {"one tail, 4 micro-batches": 4, "one sample per micro-batch": 4}
COMPOSITIONS = ["one sample, tail", "one sample, head", "one tail", "one head", "all tail", "no tail",
                "one per class", "one tail, 4 micro-batches", "one sample per micro-batch"]


def data(composition: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        y = labels(composition, gen)
        out.append((torch.randn(len(y), 3, 8, 8, generator=gen), y))
    return out


# -- the methods: each registered one, SSE-SAM in both stages, and one a user registers -------------------------
class ClassRadiusSAM(ClassAware):
    """Each class perturbed along its own gradient with radius rho * (n_max / n_c) ** 0.25 (README's example)."""

    def __init__(self, params, class_counts=None, rho: float = 0.05, **kwargs) -> None:
        super().__init__(params, class_counts=class_counts, **kwargs)
        self.add_radii(rho=rho)
        self.scale = [(max(self.class_counts) / n) ** 0.25 for n in self.class_counts]

    def groups(self, targets, batch_size, device):
        rho = self.param_groups[0]["rho"]
        return [Group(None, (targets == c).to(self.weight_dtype) / batch_size, rho * s)
                for c, s in enumerate(self.scale)]


register("classradiussam", ClassRadiusSAM, description="per-class radius rho * (n_max / n_c) ** 0.25")
CLASS_RADIUS = dict(rho=0.05, class_counts=CLASS_COUNTS)

FOCAL_C = torch.tensor([0.8 * (1 - n / sum(CLASS_COUNTS)) ** 3.0 for n in CLASS_COUNTS], dtype=torch.float64)


def scheme(method: str, y: torch.Tensor, dtype: torch.dtype = torch.float32
           ) -> list[tuple[torch.Tensor | None, torch.Tensor, float]]:
    """algorithms.md §1's groups (a, b, rho) of each method, written from the papers, for scheme_step."""
    b, tail = len(y), torch.isin(y, TAIL).to(dtype)
    if method == "sam":
        return [(None, torch.full((b,), 1 / b, dtype=dtype), 0.05)]
    if method == "imbsam":
        return [((1 - tail) / b, 2 * tail / b, 0.1)]
    if method.startswith("ssesam"):
        return [(None, (1 - tail) / b, 0.05 if method == "ssesam stage 1" else 0.0), (None, tail / b, 0.1)]
    if method == "focalsam":
        c = FOCAL_C.to(dtype)[y]
        return [((1 - c) / b, c / b, 0.2)]
    scale = [(max(CLASS_COUNTS) / n) ** 0.25 for n in CLASS_COUNTS]
    return [(None, (y == c).to(dtype) / b, 0.05 * s) for c, s in enumerate(scale)]


def official_step(method: str, model, opt, x, y) -> None:
    """The official code's own schedule (tests/official.py) for the registered methods."""
    if method == "sam":
        official.sam_step(model, opt, x, y, rho=0.05)
    elif method == "imbsam":
        official.imbsam_step(model, opt, x, y, TAIL, rho=0.1)
    elif method.startswith("ssesam"):
        official.ssesam_step(model, opt, x, y, TAIL, head_rho=0.05 if method == "ssesam stage 1" else 0.0,
                             tail_rho=0.1)
    else:
        official.focalsam_step(model, opt, x, y, CLASS_COUNTS, rho=0.2, gamma=3.0, lam=0.8)


METHODS = [info.name for info in SAM_FAMILY if info.name != "ssesam"] + ["ssesam stage 1", "ssesam stage 2",
                                                                         "classradiussam"]
DELTA = {"sam": 1e-12, "focalsam": 1e-12, "classradiussam": 1e-12}  # the rest: 1e-16 (ImbSAM, SSE-SAM)


def make_optimizer(method: str, model: nn.Module):
    name = method.split(" ")[0]
    options = CLASS_RADIUS if name == "classradiussam" else OPTIONS[name]
    opt = timm.optim.create_optimizer_v2(model.parameters(), opt=name, **HP, **options).attach(model)
    opt.set_epoch(1 if method == "ssesam stage 2" else 0)
    return opt


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return official.per_sample(model, xs, ys)
    return closure


def assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor], what: str, atol: float) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4), \
            f"{what} {i} differs by {(a.float() - b.float()).abs().max():.3g}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_step_equals_the_re_derivation(method, model_name, composition):
    torch.manual_seed(0)
    ours = MODELS[model_name]()
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    chunks = MICRO_BATCHES.get(composition, 1)
    coupled = model_name == "conv-bn"
    for step, (x, y) in enumerate(data(composition, seed=len(composition))):
        opt.step(closure_for(ours, x, y), targets=y, micro_batches=chunks)
        if method == "classradiussam" or (coupled and chunks > 1):
            # with BatchNorm each micro-batch normalises alone: the schedule whose forwards run as those chunks
            scheme_step(ref, ref_opt, x, y, scheme(method, y), DELTA.get(method, 1e-16), chunks=chunks)
        else:  # without batch coupling, N micro-batches equal the whole batch
            official_step(method, ref, ref_opt, x, y)
        if step == 0:
            assert_close([p.grad for p in ours.parameters()], [p.grad for p in ref.parameters()], "G of param",
                         atol=1e-6)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)


@pytest.mark.parametrize("model_name", ["conv-bn", "vit"])
@pytest.mark.parametrize("method", ["imbsam", "ssesam stage 1", "focalsam", "classradiussam"])
def test_a_float64_model_gets_float64_accuracy(method, model_name):
    """Weights, losses and norms follow the model's dtype: float64 agrees to ~1e-15, not float32's ~1e-8."""
    torch.manual_seed(0)
    ours = MODELS[model_name]().double()
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    for x, y in data("one tail", seed=1):
        opt.step(closure_for(ours, x.double(), y), targets=y)
        scheme_step(ref, ref_opt, x.double(), y, scheme(method, y, torch.float64), DELTA.get(method, 1e-16))
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-13, rtol=0), f"{name}: {(a - b).abs().max():.3g}"


# -- torch.compile: one VJP per compiled forward ----------------------------------------------------------------
# aot_eager runs AOTAutograd (the compiled graph autograd sees, as inductor's) with eager kernels, so it is exact
# and compiles in seconds; tools/bench_step.py --compile measures inductor itself.
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_name", ["vit", "ln"])
@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_model_takes_one_gradient_per_forward_and_steps_exactly(method, model_name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = MODELS[model_name]()
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    compiled = torch.compile(ours, backend="aot_eager")
    opt.attach(compiled)
    for x, y in data("one tail", seed=2)[:2]:
        plan = opt.plan(y)
        assert all(len(p.vjps) == 1 for p in plan.at_w), str(plan)  # no retain_graph on a compiled graph
        opt.step(closure_for(compiled, x, y), targets=y)
        if method == "classradiussam":
            scheme_step(ref, ref_opt, x, y, scheme(method, y), DELTA[method])
        else:
            official_step(method, ref, ref_opt, x, y)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method,composition", [("sam", "one tail"), ("ssesam stage 2", "no tail")])
def test_a_compiled_batchnorm_model_replays_by_forwarding_at_w(method, composition):
    """BatchNorm forward hooks do not run inside a compiled graph: the official forwards the engine skips are
    run again at w (no backward), so the running buffers still end where the official schedule leaves them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = conv_bn_net()
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    compiled = torch.compile(ours, backend="aot_eager")
    opt.attach(compiled)
    for x, y in data(composition, seed=3)[:2]:
        opt.step(closure_for(compiled, x, y), targets=y)
        official_step(method, ref, ref_opt, x, y)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)
    official_forwards = {"sam": 2, "ssesam stage 2": 4}[method]
    assert opt.last_passes.forward == official_forwards  # with no tail: w, w + 0 (head), w (tail), w + 0


@pytest.mark.parametrize("method", ["imbsam", "ssesam stage 1", "focalsam"])
def test_a_compiled_batchnorm_model_that_needs_two_gradients_of_one_forward_is_refused(method):
    model = conv_bn_net()
    opt = make_optimizer(method, model)
    opt.attach(torch.compile(model, backend="aot_eager"))
    x, y = data("one tail", seed=0)[0]
    with pytest.raises(ValueError, match=r"compiled model whose passes forward the whole batch \(batch-coupled "
                                         r"layers.*drop --torchcompile"):
        opt.step(closure_for(model, x, y), targets=y)
    assert all(p.grad is None for p in model.parameters())


class PartlyUsedNet(nn.Module):
    """A frozen layer between trained ones, and an auxiliary head that only the first step's loss uses: a
    parameter no pass reaches has no gradient, so the base optimizer must skip it (no weight decay, no momentum),
    as in the official codes and in plain torch training. The test also freezes ``embed`` after two steps (with
    no zero_grad between steps, as in the README's loop): its earlier G must not be applied again."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, 16)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.head = nn.Linear(16, num_classes)
        self.aux = nn.Linear(16, num_classes)
        self.use_aux = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(torch.tanh(self.embed(x.flatten(1)))))
        return self.head(h) + (self.aux(h) if self.use_aux else 0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", METHODS)
def test_a_parameter_no_pass_reaches_is_left_to_the_base_optimizer(method):
    torch.manual_seed(0)
    ours = PartlyUsedNet()
    ref = copy.deepcopy(ours)
    opt, ref_opt = make_optimizer(method, ours), reference_opt(ref)
    for step, (x, y) in enumerate(data("one tail", seed=4)):
        ours.use_aux = ref.use_aux = step == 0
        if step == 2:
            ours.embed.requires_grad_(False), ref.embed.requires_grad_(False)
        opt.step(closure_for(ours, x, y), targets=y)
        if method == "classradiussam":
            scheme_step(ref, ref_opt, x, y, scheme(method, y), DELTA[method])
        else:
            official_step(method, ref, ref_opt, x, y)
        assert (ours.aux.weight.grad is None) == (step > 0) and ours.frozen.weight.grad is None
        assert (ours.embed.weight.grad is None) == (step >= 2)
    assert_close(list(ours.state_dict().values()), list(ref.state_dict().values()), "state entry", atol=2e-6)
