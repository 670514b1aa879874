"""The perturbation engine shared by every SAM-family method.

A method turns (targets, class counts, training progress) into K groups, each with un-perturbed per-sample
weights ``a``, perturbed weights ``b`` and a radius ``rho`` (``reference/algorithms.md`` §1):

    G = sum_k [ grad(sum_j a_j l_j)(w) + grad(sum_j b_j l_j)(w + rho_k * unit(grad(sum_j b_j l_j)(w))) ]

The engine owns the passes. One forward at w serves every un-perturbed term and every perturbation
direction (one vector-Jacobian product per distinct weighting); each group with rho > 0 and a sample in
the batch costs one forward and backward at its perturbed weights. A group that costs no pass still leaves
the BatchNorm running buffers exactly where the official schedule (per group: a forward at w, then one at
w + eps) would leave them, by replaying the statistics recorded at w.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# closure(index=None) -> per-sample losses; with an index tensor, losses of that subset of the batch only
LossClosure = Callable[..., Tensor]

BN_MODES = ("reference", "freeze")


@dataclass
class Group:
    """One perturbation group: weights include 1/B, so the groups' losses add up to the batch loss."""

    unperturbed: Tensor | None
    perturbed: Tensor
    rho: float


@dataclass
class PassCount:
    """Forward and backward passes of the last step (a VJP counts as one backward)."""

    forward: int = 0
    backward: int = 0


class SAMFamily(torch.optim.Optimizer):
    """Base class of the SAM-family optimizers: wraps any timm optimizer and owns the SAM passes.

    Subclasses implement :meth:`groups`. The base optimizer shares ``param_groups`` and ``state`` with this
    wrapper, so timm schedulers, ``CheckpointSaver`` and ``state_dict()`` see the base's momentum directly.
    """

    needs_targets = True
    perturb_eps = 1e-12

    def __init__(
        self,
        params,
        base: str = "sgd",
        adaptive: bool = False,
        bn_mode: str = "reference",
        subset_forward: bool | None = None,
        epochs: int | None = None,
        **base_kwargs,
    ) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode='{bn_mode}' is not one of {BN_MODES}")
        if "_" in base or base.replace("-", "") in _SAM_NAMES:
            raise ValueError(f"base='{base}' must be a plain timm optimizer name such as 'sgd', 'momentum' or 'adamw'")
        try:
            self.base_optimizer = create_optimizer_v2(params, opt=base, **base_kwargs)
        except TypeError as err:
            raise TypeError(
                f"{type(self).__name__}: an option is neither one of its own nor one of base optimizer "
                f"'{base}' ({err}); options: {', '.join(self._own_options())} plus the base's"
            ) from err
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # the model's own tensors: DeepSpeed's ZeRO later swaps the groups' params for flat partitions
        self._model_params = [p for group in self.param_groups for p in group["params"]]
        self.defaults.update(base=base, adaptive=adaptive, bn_mode=bn_mode)
        self.adaptive = adaptive
        self.bn_mode = bn_mode
        self.subset_forward = subset_forward
        self.epochs = epochs
        self.epoch = 0
        self.skipped_steps = 0
        self.last_passes = PassCount()
        self._model: nn.Module | None = None

    @classmethod
    def _own_options(cls) -> list[str]:
        names = []
        for klass in cls.__mro__:
            if klass is torch.optim.Optimizer:
                break
            code = klass.__init__.__code__
            names += [n for n in code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount] if n != "params"]
        return sorted(set(names))

    # -- what a method defines -------------------------------------------------------------------------
    def groups(self, targets: Tensor | None, batch_size: int, device: torch.device) -> list[Group]:
        """The method: per-sample weights and radii for this batch, in the official code's group order."""
        raise NotImplementedError

    def method_state(self) -> dict:
        """Method-specific state saved with the optimizer (plain numbers only: timm loads weights_only)."""
        return {"epoch": self.epoch, "skipped_steps": self.skipped_steps}

    def load_method_state(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # -- training progress -----------------------------------------------------------------------------
    def next_epoch(self) -> None:
        """Call once after each training epoch; methods with a schedule (SSE-SAM's stage) follow it."""
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        """Set the number of finished epochs directly (for trainers that count epochs themselves)."""
        self.epoch = int(epoch)

    def attach(self, model: nn.Module) -> SAMFamily:
        """Tell the engine which model the closure runs, for BatchNorm bookkeeping and subset forwards."""
        self._model = model
        return self

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = self.base_optimizer.state_dict()
        state["ltsam"] = self.method_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.load_method_state(state_dict.pop("ltsam", {}))
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: LossClosure | None = None,
        targets: Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One SAM-family update. Returns the mean loss of the batch at w (detached).

        ``closure(index=None)`` runs the model and criterion and returns per-sample losses; given an index
        tensor it returns the losses of those samples only. With a ``GradScaler`` every backward is scaled,
        the summed gradient is unscaled once by ``scaler.step`` and a step with inf/NaN is skipped (and
        counted in ``skipped_steps``); the engine also calls ``scaler.update()``.
        """
        params, total, loss_value = self.sam_gradient(closure, targets, scaler)
        for p, g in zip(params, total):
            p.grad = g.to(p.dtype)
        if scaler is not None and scaler.is_enabled():
            if not torch.stack(torch._foreach_norm(total)).isfinite().all():
                self.skipped_steps += 1
            scaler.step(self.base_optimizer)
            scaler.update()
        else:
            self.base_optimizer.step()
        return loss_value

    @torch.no_grad()
    def sam_gradient(
        self,
        closure: LossClosure | None,
        targets: Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The method's update direction G for every trainable parameter, without stepping.

        Returns (params, G, mean loss). ``step()`` applies G with the base optimizer; a trainer that owns
        the update (DeepSpeed's engine) applies it itself, e.g. by back-propagating sum(p * G).
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that returns per-sample losses, e.g. "
                "opt.step(lambda idx=None: criterion(model(x if idx is None else x[idx]), "
                "y if idx is None else y[idx]), targets=y); without it no SAM update is possible"
            )
        if self.needs_targets and targets is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs targets=<labels of the batch>")
        if self._model is None:
            raise RuntimeError(
                f"{type(self).__name__} has no model attached: call opt.attach(model) once before training "
                "(it keeps BatchNorm buffers exact and allows subset forwards)"
            )
        params = [p for p in self._model_params if p.requires_grad]
        self.last_passes = PassCount()
        scale = 1.0
        if scaler is not None and scaler.is_enabled():  # scale() also initialises a fresh scaler
            scale = float(scaler.scale(torch.ones((), device=params[0].device)))
        bn_layers = [m for m in self._model.modules() if isinstance(m, _BatchNorm) and m.training]
        coupled = bool(bn_layers) if self.subset_forward is None else not self.subset_forward
        replay = bn_layers if self.bn_mode == "reference" and coupled else []

        first = None
        if targets is None:  # no labels (plain SAM): the batch size comes from the first forward
            with torch.enable_grad():
                first = self._forward(closure, None, record=replay)
            groups = self.groups(None, first.shape[0], first.device)
        else:  # the groups follow from the labels alone: decide before any forward
            groups = self.groups(targets, targets.shape[0], targets.device)
        active = self._active(groups, groups[0].perturbed.device)
        if len(groups) == 1 and all(active):
            replay = []  # the official schedule has no forward at w to replay: record no statistics

        # at w: one gradient per perturbation direction, and one for every un-perturbed term together
        # (each ``a``, plus the ``b`` of groups that need no perturbed pass)
        flat = sum(g.unperturbed for g in groups if g.unperturbed is not None) + sum(
            g.perturbed for g, is_active in zip(groups, active) if not is_active
        )
        weightings = [g.perturbed for g, is_active in zip(groups, active) if is_active]
        has_flat = isinstance(flat, Tensor) and bool(flat.any())
        if has_flat:
            weightings.append(flat)
        grads_at_w, loss_value = self._grads_at_w(closure, first, weightings, params, scale, not coupled, replay)
        total = grads_at_w.pop() if has_flat else _zeros(params)
        directions = grads_at_w  # popped one by one, so each is freed once its group is done
        self._sync(total)

        backup = [p.detach().clone() for p in params] if any(active) else []
        for index, (group, is_active) in enumerate(zip(groups, active)):
            if index > 0:
                self._replay_bn(replay)  # the official schedule re-runs a forward at w per group ...
            if not is_active:
                self._replay_bn(replay)  # ... and one at w + 0 when the group has no perturbed pass
                continue
            direction = directions.pop(0)
            self._sync(direction)
            self._perturb(params, direction, group.rho)
            grads = self._perturbed_grads(closure, group.perturbed, params, scale, coupled, bn_layers)
            self._sync(grads)
            torch._foreach_add_(total, grads)
            torch._foreach_copy_(params, backup)
        for m in bn_layers:
            m.__dict__.pop("_ltsam_stats", None)
        return params, total, loss_value

    # -- pieces of the step ----------------------------------------------------------------------------
    def _grads_at_w(self, closure, losses, weightings, params, scale, split, record) -> tuple[list, Tensor]:
        """Gradients of each weighted loss at w, and the batch's mean loss.

        With batch coupling: one full-batch forward and one VJP per weighting on its graph. Without it, and
        when the weightings cover disjoint samples (ImbSAM's and SSE-SAM's head and tail), each weighting
        forwards only its own samples, so the pass at w costs what one plain forward and backward costs.
        """
        supports = [w != 0 for w in weightings]
        disjoint = split and bool(weightings) and not bool((torch.stack(supports).sum(0) > 1).any())
        if not disjoint:
            if losses is None:
                with torch.enable_grad():
                    losses = self._forward(closure, None, record=record)
            if weightings and losses.shape[0] != weightings[0].shape[0]:
                raise ValueError(f"the closure returned {losses.shape[0]} losses for {weightings[0].shape[0]} targets")
            last = len(weightings) - 1
            grads = [self._vjp(losses, w, params, scale, keep=i < last) for i, w in enumerate(weightings)]
            return grads, losses.detach().float().mean()
        grads, loss_sum, seen = [], 0.0, 0
        for weights, support in zip(weightings, supports):
            index = support.nonzero().squeeze(1)
            if index.numel() == 0:  # another rank holds this weighting's samples
                grads.append(_zeros(params))
                continue
            with torch.enable_grad():
                part = self._forward(closure, index)
            grads.append(self._vjp(part, weights[index], params, scale, keep=False))
            loss_sum, seen = loss_sum + part.detach().float().sum(), seen + index.numel()
        return grads, loss_sum / max(seen, 1)

    def _forward(self, closure: LossClosure, index: Tensor | None, record=()) -> Tensor:
        hooks = [m.register_forward_hook(_record_batch_stats) for m in record]
        try:
            losses = closure() if index is None else closure(index)
        finally:
            for hook in hooks:
                hook.remove()
        expected = None if index is None else index.numel()
        if losses.dim() == 1 and expected is not None and losses.shape[0] != expected:
            raise ValueError(f"the closure returned {losses.shape[0]} losses for a subset of {expected} samples")
        if losses.dim() != 1:
            raise ValueError(
                f"the closure returned a loss of shape {tuple(losses.shape)}; SAM-family optimizers need "
                "per-sample losses (use reduction='none')"
            )
        self.last_passes.forward += 1
        return losses

    def _vjp(self, losses: Tensor, weights: Tensor, params: list[Tensor], scale: float, keep: bool) -> list[Tensor]:
        with torch.enable_grad():
            objective = (losses.float() * weights).sum() * scale
            grads = torch.autograd.grad(objective, params, retain_graph=keep, allow_unused=True)
        self.last_passes.backward += 1
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _perturbed_grads(self, closure, weights, params, scale, coupled, bn_layers) -> list[Tensor]:
        """Gradient of the group's loss at the perturbed weights; only its own samples when exact."""
        subset = None if coupled else weights.nonzero().squeeze(1)
        if subset is not None and subset.numel() == 0:
            return _zeros(params)  # another rank has this group's samples; this one contributes 0
        with torch.enable_grad(), _FrozenBN(bn_layers if self.bn_mode == "freeze" else []):
            losses = self._forward(closure, subset)
        return self._vjp(losses, weights if subset is None else weights[subset], params, scale, keep=False)

    def _active(self, groups: list[Group], device: torch.device) -> list[bool]:
        """A group needs a perturbed pass when rho > 0 and some rank has a sample with non-zero weight."""
        flags = torch.tensor([float(g.rho > 0 and bool(g.perturbed.any())) for g in groups], device=device)
        if _distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(f) for f in flags.tolist()]

    def _perturb(self, params: list[Tensor], direction: list[Tensor], rho: float) -> None:
        """w += rho * g / ||g|| (or the adaptive form); the direction buffers are overwritten with eps."""
        if self.adaptive:
            torch._foreach_mul_(direction, torch._foreach_abs(params))
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction)).float())
        if self.adaptive:
            torch._foreach_mul_(direction, torch._foreach_abs(params))
        torch._foreach_mul_(direction, rho / (float(norm) + self.perturb_eps))
        torch._foreach_add_(params, direction)

    def _sync(self, grads: list[Tensor]) -> None:
        """Average gradients over DDP ranks, so every perturbation uses the global gradient."""
        if not _distributed():
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @staticmethod
    def _replay_bn(layers: list[_BatchNorm]) -> None:
        """Apply the running-buffer update a skipped forward at w would have made."""
        for m in layers:
            stats = getattr(m, "_ltsam_stats", None)
            if stats is None or not m.track_running_stats:
                continue
            mean, var = stats
            m.num_batches_tracked.add_(1)
            momentum = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.lerp_(mean.to(m.running_mean.dtype), momentum)
            m.running_var.lerp_(var.to(m.running_var.dtype), momentum)


class _FrozenBN:
    """Zero BatchNorm momentum during a perturbed pass (davda54/sam's bypass), restoring it afterwards."""

    def __init__(self, layers: list[_BatchNorm]) -> None:
        self.layers = layers
        self.saved: list = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.layers, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _record_batch_stats(module: _BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    """Forward hook: keep the batch mean and unbiased variance BatchNorm used to update its buffers."""
    x = inputs[0].detach().float()
    dims = [d for d in range(x.dim()) if d != 1]
    count = x.numel() // x.shape[1]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False) * (count / max(count - 1, 1))
    module._ltsam_stats = (mean, var)


def _zeros(params: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) for p in params]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


from ltsam_common.names import SAM_METHODS as _SAM_NAMES  # noqa: E402  (the one list of method names)


def tail_mask(counts: list[int], eta: float) -> Tensor:
    """Classes with fewer than ``eta`` training samples form the tail (as in ImbSAM and SSE-SAM)."""
    return torch.tensor([c < eta for c in counts], dtype=torch.bool)


def check_targets(targets: Tensor, num_classes: int) -> None:
    """Labels outside [0, C) would index the class tables silently wrong: refuse them with the value."""
    if targets.dtype.is_floating_point or targets.dim() != 1:
        raise ValueError(
            f"targets must be a 1-d tensor of class indices, got {targets.dtype} of shape {tuple(targets.shape)} "
            "(soft/mixup targets cannot be split into head and tail)"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)][0].item()
        raise ValueError(f"target {bad} is out of range for {num_classes} classes (class_counts has {num_classes})")

