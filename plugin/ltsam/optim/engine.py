"""The perturbation engine shared by every SAM-family method.

**Method contract.** A method turns (targets, class counts, training progress) into K groups, each with
un-perturbed per-sample weights ``a``, perturbed weights ``b`` and a radius (``reference/algorithms.md`` §1):

    G = sum_k [ grad(sum_j a_j l_j)(w) + grad(sum_j b_j l_j)(w + rho_k * unit(grad(sum_j b_j l_j)(w))) ]

Weights include 1/B of the whole batch; a float weight is that weight for every sample. A radius is the name
of a param-group field (``"rho"``, ``"head_rho"``) or a fixed number. A new method is one class: declare its
radii with :meth:`SAMFamily.add_radii` in ``__init__`` and return its groups from :meth:`SAMFamily.groups`.

**Radii live in ``param_groups``.** Every radius a method declares (``rho`` for sam/imbsam/focalsam,
``head_rho`` and ``tail_rho`` for ssesam) is a key of every param group, set at construction (a group that
already has the key keeps its value) and of ``defaults`` (so ``add_param_group`` gets it). The engine reads
them at every step, so ``timm.scheduler`` with ``param_group_field="rho"`` schedules them, and
``state_dict()`` / ``load_state_dict()`` carry them. If param groups hold different values, each parameter is
perturbed with its group's radius (the direction's norm stays global). Negative values are refused.
The optimizer's own ``rho_sched`` options (``step`` / ``multistep`` / ``cosine`` with ``rho_decay_epochs``,
``rho_decay_milestones``, ``rho_decay_rate``, ``rho_min``: :mod:`ltsam.optim.radius`) put timm's schedulers on
every radius in :meth:`SAMFamily.set_epoch` / :meth:`SAMFamily.next_epoch`, so ``ltsam train --rho-sched`` and
train.py's ``--opt-kwargs rho_sched=...`` take the same path.

**The pass plan.** Each step first builds a :class:`PassPlan` (:meth:`SAMFamily.plan`): which forwards run
at w and which weighted gradients (VJPs) each serves, which groups get a perturbed pass and over which
samples, how many times the BatchNorm statistics recorded at w are replayed before each group, and which
all-reduces run. Then it executes the plan. One forward at w serves every un-perturbed term and every
perturbation direction (one VJP per distinct weighting); each group with a positive radius and a sample in
the batch (on any rank) costs one forward and backward at its perturbed weights. Without batch coupling each
pass forwards only the samples its weighting touches. ``last_passes`` reports what ran.

**Gradient accumulation (``micro_batches=N``).** The batch's sample indices [0, B) are split into N
contiguous chunks (``torch.arange(B).tensor_split(N)``); each weighting's gradient at w is accumulated over
the chunks, each group is perturbed once with the whole batch's direction, and its perturbed gradient is
accumulated over the chunks. Weights keep 1/B of the whole batch, so N x B/N equals one batch of B exactly
on a model without batch coupling. With BatchNorm each chunk's forward normalises with that chunk's
statistics (as in any accumulation); the running buffers then end where the official schedule would leave
them if each of its full-batch forwards were the N chunk forwards in order (the replay re-applies every
chunk's statistics recorded at w, in order).

**BatchNorm.** The batch-coupled layers come from an explicit allow-list (``ltsam.optim.batchnorm``: torch
BatchNorm incl. SyncBatchNorm, timm's BatchNormAct2d / SyncBatchNormAct, EvoNorm2dB0/B1/B2 in training mode);
the decision is logged once (logger ``ltsam.optim``). ``bn_mode="reference"`` leaves running buffers where
the official schedule leaves them (replaying the statistics recorded at w for the forwards the engine
skips); under SyncBatchNorm the replay uses the statistics of all ranks (one all-reduce), as SyncBatchNorm
itself does, so ``--sync-bn`` stays exact. ``bn_mode="freeze"`` is davda54/sam's bypass: momentum 0 during
every perturbed forward, ``num_batches_tracked`` still counting it.

**Random layers** (dropout, stochastic depth: :mod:`ltsam.optim.random_layers`). Each sample is forwarded
once per point with gradient, as in the official codes, so the step has the official step's distribution;
with BatchNorm (where a sample's gradient depends on the other samples' masks) the plan is the official
forward schedule: each group's gradients at w come from its own forward at w, and the replays become forwards
at w (fresh masks, as the official repeated forward); a compiled model that would need two forwards of one
sample at w is refused.

**fp16.** With an enabled ``GradScaler`` every backward is scaled by the scaler's scale (a device tensor);
a step whose gradient is not finite is skipped by ``scaler.step`` and counted in ``skipped_steps``, and the
engine puts the batch-coupled layers' buffers back exactly as they were before the step (the perturbed
forward at w + NaN would poison them), also for the classic closure (which scales its own backward).
Parameters are restored by copy and momentum is untouched. :meth:`SAMFamily.apply_gradient` unscales G once and
calls a trainer's hook before the scaler's step (Lightning's ``on_before_optimizer_step``: ``ltsam.lightning``).

**DDP.** Gradients taken with ``torch.autograd.grad`` are all-reduced by the engine: one flattened
all-reduce for all perturbation directions of the step, one for the update G at the end (all-reduce is
linear, so summing before reducing gives the same G up to float rounding).

**Calling conventions** (:mod:`ltsam.optim.protocol`). A closure that takes an index gets subset forwards; one
that takes none runs the whole batch (the plan then forwards every sample); a closure that returns a scalar has
back-propagated itself (davda54's classic closure, ``sam`` / ASAM only): the engine perturbs along ``p.grad``,
runs it again at w + eps and steps, as :meth:`SAMFamily.first_step` / :meth:`SAMFamily.second_step` do.

**Host syncs.** At most one per step: reading which samples each weighting touches (and the label checks)
to decide the plan; none when every weight is a float (SAM). Norms, radii, the BN cumulative-average weight
and the skip counter stay on the device (``skipped_steps`` reads the counter when asked). ``scaler.step``
itself reads its inf flag, as it does for any optimizer.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2, get_optimizer_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import SyncBatchNorm

from ltsam.optim.batchnorm import (
    BatchPolicy,
    FrozenMomentum,
    PolicyLog,
    StatsRecorder,
    accumulation_dtype,
    batch_policy,
    is_distributed,
)
from ltsam.optim.protocol import OptimizerProtocol, SharedState, accumulation_refused, takes_index
from ltsam.optim.radius import RadiusScheduler, check_radius_schedule, create_radius_scheduler

# closure(index=None) -> per-sample losses; with an index tensor, losses of that subset of the batch only
LossClosure = Callable[..., Tensor]
Weights = Tensor | float

BN_MODES = ("reference", "freeze")
EVERY_SAMPLE = -1  # a pass over the whole (micro-)batch, whatever the weights (batch coupling)


@dataclass
class Group:
    """One perturbation group: weights include 1/B, so the groups' losses add up to the batch loss."""

    unperturbed: Weights | None
    perturbed: Weights
    rho: str | float  # a param-group field ("rho", "head_rho", ...) or a fixed radius


@dataclass
class PassCount:
    """Forward and backward passes of a step (a VJP counts as one backward), in total and per micro-batch."""

    forward: int = 0
    backward: int = 0
    micro_batches: int = 1
    forward_per_micro_batch: list[int] = field(default_factory=lambda: [0])
    backward_per_micro_batch: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def zero(cls, micro_batches: int) -> PassCount:
        return cls(0, 0, micro_batches, [0] * micro_batches, [0] * micro_batches)

    def add(self, chunk: int, forward: int = 0, backward: int = 0) -> None:
        self.forward += forward
        self.backward += backward
        self.forward_per_micro_batch[chunk] += forward
        self.backward_per_micro_batch[chunk] += backward


@dataclass
class Pass:
    """One forward over samples of one micro-batch and the weighted gradients taken on its graph."""

    chunk: int
    index: Tensor | None  # the samples it forwards (None: the whole batch)
    size: int
    vjps: list[tuple[str, Weights]]  # (accumulator, per-sample weights over the whole batch)


@dataclass
class PerturbedPass:
    """A group's passes at w + eps: its direction (an accumulator at w), its radius, its forwards."""

    group: int
    radius: str | float
    direction: str
    passes: list[Pass]


@dataclass
class PassPlan:
    """What one step runs, decided before any pass at w (see the module docstring)."""

    micro_batches: int
    at_w: list[Pass]
    groups: list[tuple[int, PerturbedPass | None]]  # per group, in order: BN replays before it, its passes
    record: bool  # record the batch statistics of the forwards at w, for the replays
    # a compiled model runs no forward hooks added after compiling, and random layers draw new masks in the
    # official repeated forward: each replay is then a forward at w without gradient over these (every
    # micro-batch's samples), the official forward minus its backward
    replay_forwards: list[Pass] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)  # the all-reduces, in order (empty without DDP)
    # with BatchNorm and random layers, the official code's own forwards at w of each group (its gradients at w,
    # then for a group not perturbed its forward at w + 0), run before the group's perturbation: each group's
    # gradients then come from its own masks, as in the official code, not from the first forward's
    group_forwards: list[list[Pass]] = field(default_factory=list)

    def counts(self) -> PassCount:
        """The passes this plan runs, per micro-batch."""
        count = PassCount.zero(self.micro_batches)
        for p in self.at_w + [p for _, g in self.groups if g is not None for p in g.passes]:
            count.add(p.chunk, forward=1, backward=len(p.vjps))
        for p in self.replay_forwards * sum(replays for replays, _ in self.groups):
            count.add(p.chunk, forward=1)
        for p in [p for forwards in self.group_forwards for p in forwards]:
            count.add(p.chunk, forward=1, backward=len(p.vjps))
        return count

    def __str__(self) -> str:
        def line(p: Pass) -> str:
            vjps = f"VJP {', '.join(s for s, _ in p.vjps)}" if p.vjps else "without gradient"
            return f"micro-batch {p.chunk}: forward {p.size} samples, {vjps}"

        lines = ["at w (recording BN statistics):" if self.record else "at w:"]
        how = "forward again at w without gradient" if self.replay_forwards else \
            "replay the BN statistics of the forwards at w"
        lines += ["  " + line(p) for p in self.at_w]
        for k, (replays, g) in enumerate(self.groups):
            if replays:
                lines.append(f"group {k}: {how} x{replays}")
            lines += [f"group {k}: at w, {line(p)}" for p in (self.group_forwards[k] if self.group_forwards else [])]
            if g is not None:
                lines.append(f"group {k}: perturb along {g.direction} (radius {g.radius!r})")
                lines += ["  " + line(p) for p in g.passes]
        lines += [f"all-reduce {s}" for s in self.syncs]
        return "\n".join(lines)


class SAMFamily(OptimizerProtocol):
    """Base class of the SAM-family optimizers: wraps any timm optimizer and owns the SAM passes.

    Subclasses declare their radii (:meth:`add_radii`) and implement :meth:`groups`. The base optimizer
    shares ``param_groups`` and ``state`` with this wrapper, so timm schedulers, ``CheckpointSaver`` and
    ``state_dict()`` see the base's momentum and the radii directly.
    """

    needs_targets = True
    perturb_eps = 1e-12

    def __init__(
        self,
        params,
        base: str | type[torch.optim.Optimizer] = "sgd",
        adaptive: bool = False,
        bn_mode: str = "reference",
        subset_forward: bool | None = None,
        epochs: int | None = None,
        rho_sched: str = "none",
        rho_decay_epochs: float | None = None,
        rho_decay_milestones: int | Sequence[int] = (),
        rho_decay_rate: float = 0.1,
        rho_min: float = 0.0,
        eps: float | None = None,
        betas: tuple[float, ...] | None = None,
        momentum: float | None = None,
        **base_kwargs,
    ) -> None:
        self._shared = SharedState()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode='{bn_mode}' is not one of {BN_MODES}")
        # the radius schedule (options named as ltsam train's --rho-* flags), applied by set_epoch / next_epoch
        self.radius_schedule = dict(sched=rho_sched, decay_epochs=rho_decay_epochs, decay_rate=rho_decay_rate,
                                    min_rho=rho_min, decay_milestones=check_radius_schedule(
                                        rho_sched, epochs, rho_decay_epochs, rho_decay_milestones, rho_decay_rate,
                                        rho_min))
        try:
            self.base_optimizer = _create_base(params, base, dict(eps=eps, betas=betas, momentum=momentum),
                                               base_kwargs)
        except TypeError as err:
            raise TypeError(
                f"{type(self).__name__}: an option is neither one of its own nor one of base optimizer "
                f"'{base}' ({err}); options: {', '.join(self._own_options())} plus the base's"
            ) from err
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # the model's own tensors (DeepSpeed's ZeRO later swaps the groups' params for flat partitions), and
        # the param group of each, for its radius
        self._model_params = [p for group in self.param_groups for p in group["params"]]
        self._group_of = [i for i, group in enumerate(self.param_groups) for _ in group["params"]]
        base_name = base if isinstance(base, str) else f"{base.__module__}.{base.__qualname__}"
        self.defaults.update(base=base_name, adaptive=adaptive, bn_mode=bn_mode)
        self.radius_names: tuple[str, ...] = ()
        self.adaptive = adaptive
        self.bn_mode = bn_mode
        self.subset_forward = subset_forward
        self.epochs = epochs
        self.epoch = 0
        self._radius_scheduler: RadiusScheduler | None = None
        self._skipped: Tensor | int = 0
        self._last_finite: Tensor | None = None
        self._checks: list[tuple[Tensor, Callable[[], Exception]]] = []
        self.last_passes = PassCount()
        self._model = None
        self._policy_log = PolicyLog()

    @classmethod
    def _own_options(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters.values()  # merged: see protocol.merged_signature
        return sorted(p.name for p in parameters if p.kind is not p.VAR_KEYWORD and p.name not in ("self", "params"))

    # -- what a method defines -------------------------------------------------------------------------
    def groups(self, targets: Tensor | None, batch_size: int, device: torch.device) -> list[Group]:
        """The method: per-sample weights and radii for this batch, in the official code's group order."""
        raise NotImplementedError

    def add_radii(self, **radii: float) -> None:
        """Declare the method's radii: keys of every param group (and of ``defaults``), read at every step."""
        for name, value in radii.items():
            _check_radius(name, value)
        self.radius_names += tuple(radii)
        self.defaults.update(radii)
        for group in self.param_groups:
            for name, value in radii.items():
                group.setdefault(name, value)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of per-sample weights, losses and norms: float32, or float64 for a float64 model."""
        return accumulation_dtype(self._model_params[0].dtype if self._model_params else torch.float32)

    def defer_check(self, bad: Tensor, error: Callable[[], Exception]) -> None:
        """Raise ``error()`` if the device flag ``bad`` is set; read with the step's one host sync."""
        self._checks.append((bad, error))

    def method_state(self) -> dict:
        """Method-specific state saved with the optimizer (plain numbers only: timm loads weights_only)."""
        return {"epoch": self.epoch, "skipped_steps": self.skipped_steps}

    def load_method_state(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))

    @property
    def skipped_steps(self) -> int:
        """Steps the loss scaler skipped (a device counter: reading it is a host sync)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = int(value)

    # -- training progress -----------------------------------------------------------------------------
    def next_epoch(self) -> None:
        """Call once after each training epoch; methods with a schedule (SSE-SAM's stage, ``rho_sched``) follow it."""
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Set the number of finished epochs directly (for trainers that count epochs themselves); with
        ``rho_sched`` the radii in ``param_groups`` become those of this 0-based epoch. They are a function of the
        epoch alone (from ``initial_<radius>``, kept in ``state_dict``), so a resumed run needs no other state."""
        self.epoch = int(epoch)
        self._radius_scheduler = create_radius_scheduler(self, epochs=self.epochs, **self.radius_schedule)
        if self._radius_scheduler is not None:
            self._radius_scheduler.step(self.epoch)

    def _rebuild_radius_scheduler(self) -> None:
        """A copy's rho_sched scheduler: rebuilt for the copy's epoch (the radii are a function of it)."""
        self.set_epoch(self.epoch)

    def scheduled_radii(self) -> dict[str, float]:
        """The radii ``rho_sched`` set last (first param group), e.g. for the epoch summary; empty without a
        schedule."""
        return {} if self._radius_scheduler is None else self._radius_scheduler.values()

    def attach(self, model: nn.Module) -> SAMFamily:
        """Tell the engine which model the closure runs, for BatchNorm bookkeeping and subset forwards."""
        self._model = model
        return self

    # -- parameters and checkpoints --------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer; its parameters take part in every later SAM step."""
        if not hasattr(self, "_model_params"):  # torch.optim.Optimizer.__init__ registering the base's groups
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        group = self.base_optimizer.param_groups[-1]
        for name in self.radius_names:
            group.setdefault(name, self.defaults[name])
        self._model_params += group["params"]
        self._group_of += [len(self.param_groups) - 1] * len(group["params"])

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus ``"ltsam"`` (the method's state); hooks registered on this
        optimizer (``register_state_dict_pre_hook`` / ``_post_hook``) run as torch's own state_dict runs them."""
        return self._state_dict_with_hooks(lambda: {**self.base_optimizer.state_dict(), "ltsam": self.method_state()})

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_state_dict_with_hooks(state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.load_method_state(state_dict.pop("ltsam", {}))
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:  # a checkpoint from before radii lived in param groups
            for name in self.radius_names:
                group.setdefault(name, self.defaults[name])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: LossClosure | None = None,
        targets: Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        micro_batches: int = 1,
    ) -> Tensor:
        """One SAM-family update. Returns the mean loss of the batch at w (detached).

        ``closure(index=None)`` runs the model and criterion and returns per-sample losses; given an index
        tensor it returns the losses of those samples only. With a ``GradScaler`` every backward is scaled,
        the summed gradient is unscaled once by ``scaler.step`` and a step with inf/NaN is skipped (and
        counted in ``skipped_steps``); the engine also calls ``scaler.update()``. ``micro_batches=N``
        accumulates the batch in N chunks with the same update (module docstring).

        A closure that takes no argument is called for the whole batch (Lightning's and Accelerate's closures);
        for ``sam`` / ASAM it may also be the classic one (zero_grad, forward, backward, return the loss), as in
        davda54/sam. ``targets`` may come from :meth:`set_targets` instead.
        """
        return self.apply_gradient(*self.sam_gradient(closure, targets, scaler, micro_batches), scaler=scaler)

    @torch.no_grad()
    def apply_gradient(self, params: list[Tensor], grads: list[Tensor], loss: Tensor,
                       scaler: torch.amp.GradScaler | None = None,
                       before_update: Callable[[], None] | None = None) -> Tensor:
        """The second half of :meth:`step`: ``p.grad = G`` (from :meth:`sam_gradient`), then the base optimizer's
        update. With an enabled ``GradScaler`` (the one ``sam_gradient`` scaled with) G is unscaled, a step whose G
        is not finite is skipped and counted, and ``scaler.update()`` runs. ``before_update`` runs once, with the
        unscaled G in ``p.grad``, just before the update: a trainer's hook point (Lightning's
        ``on_before_optimizer_step`` and gradient clipping). Returns ``loss``."""
        # every other parameter gets no gradient, so the base step skips it: one no pass reached, and one frozen
        # (requires_grad_(False)) since an earlier step, whose p.grad would otherwise still hold that step's G
        listed = {id(p) for p in params}
        for p in self._model_params:
            if id(p) not in listed:
                p.grad = None
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        scaled = scaler is not None and scaler.is_enabled()
        if scaled:
            self._skipped = self._skipped + self._last_finite.logical_not().long()
            scaler.unscale_(self.base_optimizer)  # what scaler.step would do first; the hook sees unscaled G
        if before_update is not None:
            before_update()
        if scaled:
            scaler.step(self.base_optimizer)
            scaler.update()
        else:
            self.base_optimizer.step()
        self.last_loss = loss
        return loss

    @torch.no_grad()
    def sam_gradient(
        self,
        closure: LossClosure | None,
        targets: Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        micro_batches: int = 1,
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The method's update direction G for every trainable parameter, without stepping.

        Returns (params, G, mean loss). ``step()`` applies G with the base optimizer; a trainer that owns
        the update (DeepSpeed's engine, ``ltsam.timm``) applies it itself, e.g. by back-propagating sum(p * G).
        """
        targets = self._take_targets(targets)
        self._check_call(closure, targets, micro_batches)
        params = [p for p in self._model_params if p.requires_grad]
        whole = not takes_index(closure)
        if whole and micro_batches > 1:
            raise ValueError(f"micro_batches={micro_batches} needs a closure that takes the sample indices "
                             "(closure(index=None)): a closure without arguments can only run the whole batch")
        if self._model is None:
            if whole:  # a classic closure needs no model; anything else is refused by _check_model
                with torch.enable_grad():
                    loss = closure()
                if isinstance(loss, Tensor) and loss.dim() == 0:
                    return self._finite_or_restored(self._classic_gradient(closure, loss, params,
                                                                           FrozenMomentum([])), scaler)
            self._check_model()
        policy = batch_policy(self._model)
        self._policy_log(policy, self.subset_forward)
        coupled = policy.coupled if self.subset_forward is None else not self.subset_forward
        if not coupled and is_distributed() and any(isinstance(m, SyncBatchNorm) for m in policy.replayable):
            raise ValueError(
                "subset_forward=True with SyncBatchNorm under torch.distributed: ranks would run different "
                "forwards and SyncBatchNorm's all-gather would hang; leave subset_forward unset"
            )
        scale = None  # the loss scale stays a device tensor: no host sync
        if scaler is not None and scaler.is_enabled():  # scale() also initialises a fresh scaler
            scale = scaler.scale(torch.ones((), device=params[0].device))
        protected = policy.coupled_buffers() if scale is not None else []
        before = [b.clone() for b in protected]
        recorder = StatsRecorder(policy.replayable if coupled and self.bn_mode == "reference" else [])
        self.last_passes = PassCount.zero(micro_batches)

        first = None
        if targets is None or whole:  # no labels: the batch size comes from the first forward
            with torch.enable_grad(), recorder:
                losses = closure()
            if isinstance(losses, Tensor) and losses.dim() == 0:  # the classic closure: it back-propagated
                frozen = policy.replayable if self.bn_mode == "freeze" else []
                return self._finite_or_restored(self._classic_gradient(closure, losses, params,
                                                                       FrozenMomentum(frozen)),
                                                scaler, protected, before)
            first = self._checked(losses, None if targets is None else targets.shape[0], None, chunk=0)
        if targets is None:
            batch_size, device = first.shape[0], first.device
        else:
            batch_size, device = targets.shape[0], targets.device
        plan = self._plan(targets, batch_size, micro_batches, device, split=not coupled and not whole,
                          reuse_first=first is not None, replay=bool(recorder.layers),
                          one_vjp_per_forward=is_compiled(self._model), random_layers=policy.random)
        total, loss_value, received = self._execute(plan, closure, params, scale, first, recorder, policy)
        return self._finite_or_restored(_received_only(params, total, received, loss_value), scaler, protected,
                                        before)

    def _finite_or_restored(self, result: tuple[list[Tensor], list[Tensor], Tensor],
                            scaler: torch.amp.GradScaler | None, protected: Sequence[Tensor] = (),
                            before: Sequence[Tensor] = ()) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """With an enabled GradScaler: whether G is finite (the scaler will skip the step otherwise), and for a
        step it will skip, the batch-coupled layers' buffers put back as they were before the step."""
        if scaler is not None and scaler.is_enabled():
            self._last_finite = torch.stack(torch._foreach_norm(result[1], float("inf"))).isfinite().all()
            for buffer, saved in zip(protected, before):
                buffer.copy_(torch.where(self._last_finite, buffer, saved))
        return result

    def _classic_gradient(self, closure: Callable[[], Tensor], loss: Tensor, params: list[Tensor],
                          frozen: FrozenMomentum) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """davda54's two passes for a closure that back-propagates itself (it has just run at w): perturb along
        p.grad, run it again at w + eps (BatchNorm momentum 0 there with ``bn_mode="freeze"``), come back to w.
        With a GradScaler the closure scales its own backward (``scaler.scale(loss).backward()``)."""
        self.last_passes = PassCount.zero(1)
        self.last_passes.add(0, forward=1, backward=1)
        self._first_step("a closure that calls backward itself", zero_grad=True)
        try:
            with torch.enable_grad(), frozen:
                closure()
        finally:
            self._restore()
        self.last_passes.add(0, forward=1, backward=1)
        return _in_p_grad(params, loss.detach())

    # -- davda54's two-pass form (sam / ASAM) ------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + eps along the gradients now in ``p.grad`` (after your ``loss.backward()`` at w), as
        davda54/sam's ``first_step``; then run your second forward and backward and call :meth:`second_step`.
        Only for methods with one group perturbed over every sample (``sam`` / ASAM): the class-aware methods
        need per-sample losses and ``step(closure, targets=y)``."""
        if self._shared.two_pass_refused:
            raise RuntimeError(f"{type(self).__name__}.first_step() {self._shared.two_pass_refused}")
        self._first_step("first_step()", zero_grad)
        if self._model is not None:  # for second_step(scaler=...): the buffers the perturbed forward will change
            coupled = batch_policy(self._model).coupled_buffers()
            self._shared.buffers_at_w = list(zip(coupled, [b.clone() for b in coupled]))

    def _first_step(self, what: str, zero_grad: bool) -> None:
        group = self._two_pass_group(what)
        if self._shared.backup is not None:
            raise RuntimeError(f"{type(self).__name__}.first_step() called twice: call second_step() in between")
        params = [p for p in self._model_params if p.requires_grad]
        if all(p.grad is None for p in params):
            raise RuntimeError(f"{type(self).__name__}.first_step() needs the gradients at w in p.grad: call "
                               "loss.backward() first")
        direction = [torch.zeros_like(p) if p.grad is None else p.grad.detach().to(p.dtype, copy=True)
                     for p in params]
        self._shared.backup = [p.detach().clone() for p in params]
        self._perturb(params, direction, group.rho)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        """Back to w, then the base optimizer's step with the gradients at w + eps now in ``p.grad``. To clip,
        call ``clip_grad_norm_`` between your second backward and this call (with a scaler: after
        ``scaler.unscale_(opt.base_optimizer)``).

        With fp16, scale both backwards (``scaler.scale(loss).backward()``; the scale cancels in eps's direction)
        and pass the ``GradScaler`` here: G is unscaled, a step whose G is not finite is skipped and counted in
        ``skipped_steps``, and ``scaler.update()`` runs, as in :meth:`step`. A skipped step also puts back the
        BatchNorm buffers that the forward at w + eps changed (for an attached model)."""
        saved, self._shared.buffers_at_w = self._shared.buffers_at_w, []
        self._restore()
        params, grads, _ = self._finite_or_restored(
            _in_p_grad([p for p in self._model_params if p.requires_grad], self.last_loss), scaler,
            [b for b, _ in saved], [c for _, c in saved])
        self.apply_gradient(params, grads, self.last_loss, scaler)
        if zero_grad:
            self.zero_grad()

    def _restore(self) -> None:
        backup, self._shared.backup = self._shared.backup, None
        if backup is None:
            raise RuntimeError(f"{type(self).__name__}.second_step() without first_step(): the weights are at w")
        torch._foreach_copy_([p for p in self._model_params if p.requires_grad], backup)

    def _two_pass_group(self, what: str) -> Group:
        groups = [] if self.needs_targets else self.groups(None, 1, torch.device("cpu"))
        if len(groups) != 1 or groups[0].unperturbed is not None or not isinstance(groups[0].perturbed, float):
            name = type(self).__name__
            raise RuntimeError(
                f"{name}: {what} is SAM / ASAM's two-pass form (one perturbation along the whole batch's gradient); "
                f"{name} weights each sample by its class, so it needs a closure returning per-sample losses "
                "(criterion with reduction='none') and step(closure, targets=y) or opt.set_targets(y)")
        return groups[0]

    def plan(self, targets: Tensor, micro_batches: int = 1) -> PassPlan:
        """The pass plan of a batch with these labels (what ``step`` would run), for inspection."""
        policy = batch_policy(self._model) if self._model is not None else BatchPolicy()
        coupled = policy.coupled if self.subset_forward is None else not self.subset_forward
        replay = coupled and self.bn_mode == "reference" and bool(policy.replayable)
        return self._plan(targets, targets.shape[0], micro_batches, targets.device, not coupled, False, replay,
                          one_vjp_per_forward=self._model is not None and is_compiled(self._model),
                          random_layers=policy.random)

    # -- planning --------------------------------------------------------------------------------------
    def _plan(self, targets: Tensor | None, batch_size: int, micro_batches: int, device: torch.device,
              split: bool, reuse_first: bool, replay: bool, one_vjp_per_forward: bool = False,
              random_layers: Sequence[str] = ()) -> PassPlan:
        if micro_batches > batch_size:
            raise ValueError(f"micro_batches={micro_batches} exceeds the batch size {batch_size}")
        self._checks = []
        groups = self.groups(targets, batch_size, device)
        chunks = _chunk_bounds(batch_size, micro_batches)
        terms = [g.perturbed for g in groups] + [g.unperturbed for g in groups]
        support = _Support(terms, chunks, device, self._checks)
        self._checks = []
        radii = [self._radii(g.rho) for g in groups]
        active = [any(r > 0 for r in rs) and support.present(k) for k, rs in enumerate(radii)]

        # at w: one gradient per perturbation direction, one for every un-perturbed term together
        # BatchNorm couples each sample's gradient to the other samples' masks: with random layers, every group
        # takes its gradients at w from its own forward, as the official code (the plain plan shares the first)
        per_group = replay and bool(random_layers) and not one_vjp_per_forward
        first_groups = range(1 if per_group else len(groups))
        flat_terms = [(k + len(groups), groups[k].unperturbed) for k in first_groups
                      if groups[k].unperturbed is not None]
        flat_terms += [(k, groups[k].perturbed) for k in first_groups if not active[k] and not per_group]
        at_w = [(f"direction {k}", groups[k].perturbed, 1 << k) for k in first_groups if active[k]]
        if flat_terms:
            bits = reduce(lambda m, t: m | (1 << t[0]), flat_terms, 0)
            if support.count(bits) > 0:
                at_w.append(("G", reduce(lambda s, t: s + t[1], flat_terms[1:], flat_terms[0][1]), bits))
        split_at_w = split and not reuse_first and support.disjoint([bits for _, _, bits in at_w])
        if one_vjp_per_forward and not split and len(at_w) > 1:
            raise ValueError(
                f"{type(self).__name__} on a compiled model whose passes forward the whole batch (batch-coupled "
                "layers such as BatchNorm, or a closure without an index argument): this step needs "
                f"{len(at_w)} gradients of one forward at w, which a compiled graph gives only once, and a repeated "
                "compiled forward with BatchNorm was not exact in ltsam's checks; train this model uncompiled "
                "(drop --torchcompile), or compile a model without BatchNorm (LayerNorm/GroupNorm, ViTs) and give "
                "the closure an index argument"
            )
        if one_vjp_per_forward and random_layers and not support.disjoint([bits for _, _, bits in at_w]):
            raise ValueError(
                f"{type(self).__name__} on a compiled model with random layers active ({random_layers[0]}"
                f"{f' and {len(random_layers) - 1} more' if len(random_layers) > 1 else ''}): this step takes "
                f"{len(at_w)} gradients at w of the same samples, which the official code takes from one forward "
                "(one dropout mask per sample); a compiled graph gives one gradient per forward, and forwarding "
                "again would draw new masks; train uncompiled (drop --torchcompile) or set the drop rates to 0"
            )

        passes = []
        for c in range(len(chunks)):
            if split_at_w:
                passes += [Pass(c, *support.samples(bits, c), [(name, w)]) for name, w, bits in at_w
                           if support.count(bits, c)]
            elif one_vjp_per_forward and split:  # a compiled graph gives one VJP: AOTAutograd may donate buffers
                passes += [Pass(c, index, size, [(name, w)]) for name, w, bits in at_w
                           for index, size in [support.samples(bits, c)] if size]
            else:
                passes.append(Pass(c, *support.samples(EVERY_SAMPLE, c), [(name, w) for name, w, _ in at_w]))
        plan_groups = []
        for k, group in enumerate(groups):
            replays = int(k > 0) + int(not active[k]) if replay else 0
            perturbed = None
            if active[k]:
                bits = 1 << k if split else EVERY_SAMPLE
                perturbed = PerturbedPass(k, group.rho, f"direction {k}", [
                    Pass(c, *support.samples(bits, c), [("G", group.perturbed)])
                    for c in range(len(chunks)) if support.count(bits, c)
                ])
            plan_groups.append((replays, perturbed))
        syncs = []
        if is_distributed():
            syncs = ([", ".join(p.direction for _, p in plan_groups if p)] if any(active) else []) + ["G"]
        if per_group:
            if is_distributed():  # each direction is known only after its group's forward at w
                syncs = [p.direction for _, p in plan_groups if p] + ["G"]
            return PassPlan(micro_batches, passes, [(0, g) for _, g in plan_groups], record=False, syncs=syncs,
                            group_forwards=self._group_forwards(groups, active, support, len(chunks)))
        replays = any(r for r, _ in plan_groups)
        # recorded statistics replay the masks of the forward at w; the official repeated forward draws anew
        if replays and (one_vjp_per_forward or random_layers):
            return PassPlan(micro_batches, passes, plan_groups, record=False, syncs=syncs,
                            replay_forwards=[Pass(p.chunk, p.index, p.size, []) for p in passes])
        return PassPlan(micro_batches, passes, plan_groups, record=replays, syncs=syncs)

    @staticmethod
    def _group_forwards(groups: list[Group], active: list[bool], support: _Support, chunks: int) -> list[list[Pass]]:
        """The official forwards at w of each group that the first forward does not serve (whole (micro-)batch):
        group k > 0's own forward at w (its direction and un-perturbed gradient), and for a group not perturbed
        its forward at w + 0 (its perturbed weights' gradient; without gradient where they touch no sample)."""
        out = []
        for k, group in enumerate(groups):
            own = [(f"direction {k}", group.perturbed)] if active[k] else []
            if group.unperturbed is not None and support.present(k + len(groups)):
                own.append(("G", group.unperturbed))
            at_zero = None if active[k] else [("G", group.perturbed)] if support.present(k) else []
            points = ([own] if k > 0 else []) + ([at_zero] if at_zero is not None else [])
            out.append([Pass(c, *support.samples(EVERY_SAMPLE, c), vjps) for vjps in points for c in range(chunks)])
        return out

    def _radii(self, rho: str | float) -> list[float]:
        """The radius of each param group (a field of the groups, or a fixed number)."""
        if not isinstance(rho, str):
            return [float(rho)] * len(self.param_groups)
        values = []
        for i, group in enumerate(self.param_groups):
            if rho not in group:
                raise KeyError(f"param group {i} has no '{rho}': add groups through the optimizer "
                               f"(add_param_group) or set group['{rho}']")
            _check_radius(f"param_groups[{i}]['{rho}']", group[rho])
            values.append(float(group[rho]))
        return values

    # -- executing -------------------------------------------------------------------------------------
    def _execute(self, plan: PassPlan, closure: LossClosure, params: list[Tensor], scale: Tensor | None,
                 first: Tensor | None, recorder: StatsRecorder, policy: BatchPolicy
                 ) -> tuple[list[Tensor], Tensor, list[bool]]:
        """Runs the plan; returns G, the mean loss at w, and which parameters got a gradient in G."""
        acc: dict[str, list[Tensor]] = {}
        received = [False] * len(params)
        loss_sum, seen = torch.zeros((), device=params[0].device), 0
        with recorder if plan.record else contextlib.nullcontext():
            for p in plan.at_w:
                losses = first if first is not None else self._forward(closure, p.index, p.size, p.chunk,
                                                                       grad=bool(p.vjps))
                first = None
                self._vjps(losses, p, params, scale, acc, received)
                loss_sum, seen = loss_sum + losses.detach().to(accumulation_dtype(losses.dtype)).sum(), seen + p.size
        # a direction whose samples all sit on other ranks (split passes) is 0 here before the all-reduce
        directions = [] if plan.group_forwards else \
            [acc.pop(g.direction, None) or _zeros(params) for _, g in plan.groups if g is not None]
        self._sync(*directions)
        backup = [p.detach().clone() for p in params] if any(g is not None for _, g in plan.groups) else []
        frozen = policy.replayable if self.bn_mode == "freeze" else []
        for k, (replays, group) in enumerate(plan.groups):
            if plan.replay_forwards:
                for p in plan.replay_forwards * replays:
                    self._forward(closure, p.index, p.size, p.chunk, grad=False)
            else:
                recorder.replay(replays)
            for p in plan.group_forwards[k] if plan.group_forwards else []:
                losses = self._forward(closure, p.index, p.size, p.chunk, grad=bool(p.vjps))
                self._vjps(losses, p, params, scale, acc, received)
            if group is None:
                continue
            if plan.group_forwards:  # this group's direction, from its own forward at w
                directions = [acc.pop(group.direction, None) or _zeros(params)]
                self._sync(*directions)
            self._perturb(params, directions.pop(0), group.radius)
            with FrozenMomentum(frozen), torch.enable_grad():
                for p in group.passes:
                    self._vjps(self._forward(closure, p.index, p.size, p.chunk), p, params, scale, acc,
                               received)
            torch._foreach_copy_(params, backup)
        total = acc.pop("G", None) or _zeros(params)
        self._sync(total)
        return total, loss_sum / max(seen, 1), received

    def _forward(self, closure: LossClosure, index: Tensor | None, expected: int | None, chunk: int,
                 grad: bool = True) -> Tensor:
        with torch.set_grad_enabled(grad):
            losses = closure() if index is None else closure(index)
        return self._checked(losses, expected, index, chunk)

    def _checked(self, losses: Tensor, expected: int | None, index: Tensor | None, chunk: int) -> Tensor:
        if not isinstance(losses, Tensor):
            raise TypeError(f"the closure returned {type(losses).__name__}; SAM-family optimizers need a tensor of "
                            "per-sample losses (reduction='none')")
        if losses.dim() != 1:
            raise ValueError(
                f"the closure returned a loss of shape {tuple(losses.shape)}; SAM-family optimizers need "
                "per-sample losses (use reduction='none')"
            )
        if expected is not None and losses.shape[0] != expected:
            what = "targets" if index is None else "samples of the index it was given"
            raise ValueError(f"the closure returned {losses.shape[0]} losses for {expected} {what}")
        self.last_passes.add(chunk, forward=1)
        return losses

    def _vjps(self, losses: Tensor, p: Pass, params: list[Tensor], scale: Tensor | None,
              acc: dict[str, list[Tensor]], received: list[bool]) -> None:
        """Each weighted gradient on this forward's graph, added into its accumulator; ``received`` marks the
        parameters that get a gradient in G."""
        for i, (name, weights) in enumerate(p.vjps):
            if isinstance(weights, Tensor) and p.index is not None:
                weights = weights[p.index]
            with torch.enable_grad():
                dtype = accumulation_dtype(losses.dtype)
                if isinstance(weights, Tensor):
                    weights = weights.to(dtype)
                objective = (losses.to(dtype) * weights).sum()
                if scale is not None:
                    objective = objective * scale
                grads = _gradients(objective, params, retain_graph=i < len(p.vjps) - 1)
            self.last_passes.add(p.chunk, backward=1)
            if name == "G":
                received[:] = [r or g is not None for r, g in zip(received, grads)]
            if name in acc:  # the accumulator is the engine's own: adding into it is safe
                added = [(a, g) for a, g in zip(acc[name], grads) if g is not None]
                torch._foreach_add_([a for a, _ in added], [g for _, g in added])
            else:
                acc[name] = _own(grads, params)

    def _perturb(self, params: list[Tensor], direction: list[Tensor], radius: str | float) -> None:
        """w += rho * g / ||g|| (or the adaptive form); the direction buffers are overwritten with eps."""
        if self.adaptive:
            torch._foreach_mul_(direction, torch._foreach_abs(params))
        norms = torch.stack(torch._foreach_norm(direction))
        norm = torch.linalg.vector_norm(norms.to(accumulation_dtype(norms.dtype)))
        if self.adaptive:
            torch._foreach_mul_(direction, torch._foreach_abs(params))
        radii = self._radii(radius)
        trainable = [self._group_of[i] for i, p in enumerate(self._model_params) if p.requires_grad]
        per_param = [radii[g] for g in trainable]
        for value in sorted(set(per_param)):  # one multiply when every group has the same radius
            chosen = [d for d, r in zip(direction, per_param) if r == value]
            torch._foreach_mul_(chosen, value / (norm + self.perturb_eps))  # on the device: no host sync
        torch._foreach_add_(params, direction)

    def _sync(self, *grad_lists: list[Tensor]) -> None:
        """Average gradients over DDP ranks (one flattened all-reduce for all the lists)."""
        if not is_distributed() or not grad_lists:
            return
        grads = [g for grad_list in grad_lists for g in grad_list]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def _check_call(self, closure: LossClosure | None, targets: Tensor | None, micro_batches: int) -> None:
        name = type(self).__name__
        if closure is None:
            pending = " (first_step() is pending: call second_step())" if self._shared.backup is not None else ""
            two_pass = "" if self.needs_targets else (
                ", or the classic closure (zero_grad, forward, backward, return the loss), or first_step() / "
                "second_step() around your own second backward")
            raise RuntimeError(
                f"{name}.step() needs a closure that returns per-sample losses, e.g. "
                "opt.step(lambda idx=None: criterion(model(x if idx is None else x[idx]), "
                f"y if idx is None else y[idx]), targets=y){two_pass}; without it no SAM update is possible: "
                f"the gradient at w + eps needs another forward{pending}"
            )
        refused = accumulation_refused()
        if refused:
            raise RuntimeError(f"{name}.step() inside {refused}")
        if self.needs_targets and targets is None:
            raise RuntimeError(f"{name}.step() needs targets=<labels of the batch> (or opt.set_targets(y) before "
                               "a step whose call cannot carry them)")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches!r} must be an integer >= 1")
        if micro_batches > 1 and targets is None:
            raise ValueError(
                f"micro_batches={micro_batches} needs targets=<labels of the batch> (or any tensor with one "
                "row per sample): the engine must know the batch size before the first chunk's forward"
            )

    def _check_model(self) -> None:
        if self._model is None:
            raise RuntimeError(
                f"{type(self).__name__} has no model attached: call opt.attach(model) once before training "
                "(it keeps BatchNorm buffers exact and allows subset forwards)"
            )


class _Support:
    """Which samples each weighting touches (non-zero weight), from one device read per step.

    Bit t of a sample's code says term t has a non-zero weight for it. Float terms are known on the host;
    tensor terms are read from the device together with the methods' deferred label checks, and their
    presence on any rank is all-reduced (one MAX) so every rank runs the same plan.
    """

    def __init__(self, terms: list[Weights | None], chunks: list[tuple[int, int]], device: torch.device,
                 checks: list[tuple[Tensor, Callable[[], Exception]]]) -> None:
        self.chunks = chunks
        size = chunks[-1][1]
        self.host_bits = sum(1 << t for t, w in enumerate(terms) if isinstance(w, float | int) and w != 0)
        tensors = [(t, w) for t, w in enumerate(terms) if isinstance(w, Tensor)]
        self.device_code: Tensor | None = None
        self.anywhere = self.host_bits
        codes = [0] * size
        if tensors or checks:
            code = torch.zeros(size, dtype=torch.long, device=device)
            for t, w in tensors:
                code |= (w != 0).long() << t
            present = torch.stack([(w != 0).any() for _, w in tensors]).long() if tensors else code[:0]
            if is_distributed() and tensors:
                dist.all_reduce(present, op=dist.ReduceOp.MAX)
            bad = torch.stack([flag for flag, _ in checks]).long() if checks else code[:0]
            values = torch.cat([present, bad, code]).tolist()  # the step's one host sync
            for (_, error), is_bad in zip(checks, values[len(tensors): len(tensors) + len(checks)]):
                if is_bad:
                    raise error()
            self.anywhere |= sum(1 << t for (t, _), p in zip(tensors, values) if p)
            codes = values[len(tensors) + len(checks):]
            self.device_code = code
        self.codes = [c | self.host_bits for c in codes]

    def present(self, term: int) -> bool:
        """Term has a non-zero weight for some sample on some rank."""
        return bool(self.anywhere >> term & 1)

    def count(self, bits: int, chunk: int | None = None) -> int:
        start, end = (0, self.chunks[-1][1]) if chunk is None else self.chunks[chunk]
        if bits == EVERY_SAMPLE or bits & self.host_bits:
            return end - start
        return sum(1 for c in self.codes[start:end] if c & bits)

    def disjoint(self, masks: list[int]) -> bool:
        return all(sum(1 for m in masks if c & m) <= 1 for c in self.codes)

    def samples(self, bits: int, chunk: int) -> tuple[Tensor | None, int]:
        """The sample indices of the chunk where ``bits`` has weight (None: the whole batch), and how many."""
        start, end = self.chunks[chunk]
        count = self.count(bits, chunk)
        device = self.device_code.device if self.device_code is not None else None
        if count == end - start:
            if len(self.chunks) == 1:
                return None, count
            return torch.arange(start, end, device=device), count
        # the selected samples in order, found on the device without a sync (count is known on the host)
        selected = (self.device_code[start:end] & bits) != 0
        return start + torch.argsort(selected.logical_not().to(torch.uint8), stable=True)[:count], count


def _create_base(params, base: str | type[torch.optim.Optimizer], common: dict[str, object],
                 options: dict[str, object]) -> torch.optim.Optimizer:
    """The base optimizer: a timm name through timm's factory, or an optimizer class (torch's or timm's) called
    directly. ``eps``, ``betas`` and ``momentum`` reach it only when it takes them, as timm's factory does."""
    if isinstance(base, str):
        if "_" in base or base.replace("-", "") in _SAM_NAMES:
            raise ValueError(f"base='{base}' must be a plain timm optimizer name such as 'sgd', 'momentum' or 'adamw'")
        info = get_optimizer_info(base)
        given = {k: v for k, v in common.items() if v is not None and getattr(info, f"has_{k}")}
        return create_optimizer_v2(params, opt=base, **given, **options)
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)) or issubclass(base, SAMFamily):
        raise ValueError(f"base={base!r} must be a timm optimizer name (e.g. 'momentum') or a torch.optim.Optimizer "
                        "class that is not itself SAM-family (e.g. torch.optim.SGD)")
    accepted = inspect.signature(base).parameters
    given = {k: v for k, v in common.items() if v is not None and k in accepted}
    return base(params, **given, **options)


def _zeros(params: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) for p in params]


def is_compiled(model: nn.Module) -> bool:
    """The model (or a submodule) runs through torch.compile: ``torch.compile(model)`` or ``module.compile()``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _gradients(objective: Tensor, params: list[Tensor], retain_graph: bool) -> list[Tensor | None]:
    """``torch.autograd.grad``; torch's refusal of re-entrant checkpointing says how to turn it off in timm."""
    try:
        return list(torch.autograd.grad(objective, params, retain_graph=retain_graph, allow_unused=True))
    except RuntimeError as err:
        if "use_reentrant=True" not in str(err):
            raise
        raise RuntimeError(
            "the model uses re-entrant gradient checkpointing, which cannot give the engine its gradients "
            "(torch.autograd.grad); use the non-re-entrant kind: unset TIMM_REENTRANT_CKPT (timm's default from "
            "1.0.13, or timm.layers.set_reentrant_ckpt(False)), or torch.utils.checkpoint(..., use_reentrant=False)"
        ) from err


def _received_only(params: list[Tensor], grads: list[Tensor], received: list[bool], loss: Tensor
                   ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(params, G, loss) for the parameters that got a gradient. A parameter no pass reached (an unused head, an
    expert no sample was routed to) has no gradient in the official codes and in plain torch training, so the
    base optimizer skips it: a zero G would still apply its weight decay and momentum. Under DDP every rank
    keeps every parameter (which ones a batch reaches may differ between ranks; the all-reduce needs one list)."""
    if is_distributed() or all(received):
        return params, grads, loss
    return [p for p, r in zip(params, received) if r], [g for g, r in zip(grads, received) if r], loss


def _in_p_grad(params: list[Tensor], loss: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(params, G, loss) from the gradients a user's backward left in ``p.grad`` (the classic closure, the
    two-pass form), for the parameters that got one (:func:`_received_only`)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    return _received_only(params, grads, [p.grad is not None for p in params], loss)


def _own(grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor]:
    """Copies of the gradients autograd returned, which the engine then adds into and scales in place.

    Autograd may hand back tensors that share storage (for a one-sample forward through a ViT, the gradients
    of ``cls_token`` and ``pos_embed`` are views of one buffer), so writing into them would count that
    storage twice. Copying one tensor at a time keeps the extra memory to one gradient.
    """
    for i, g in enumerate(grads):
        grads[i] = torch.zeros_like(params[i]) if g is None else g.clone(memory_format=torch.contiguous_format)
    return grads


def _chunk_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of ``torch.arange(size).tensor_split(parts)``, computed on the host."""
    small, extra = divmod(size, parts)
    ends = [(i + 1) * small + min(i + 1, extra) for i in range(parts)]
    return list(zip([0] + ends[:-1], ends))


def _check_radius(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name}={value!r} must be a number >= 0 (the perturbation radius)")


from ltsam_common.names import SAM_METHODS as _SAM_NAMES  # noqa: E402  (the one list of method names)


def check_targets(targets: Tensor, num_classes: int) -> Tensor:
    """Labels as class indices; returns a device flag for labels outside [0, C) (no host sync here)."""
    if targets.dtype.is_floating_point or targets.dim() != 1:
        raise ValueError(
            f"targets must be a 1-d tensor of class indices, got {targets.dtype} of shape {tuple(targets.shape)} "
            "(soft/mixup targets cannot be split into head and tail)"
        )
    return ((targets < 0) | (targets >= num_classes)).any()


def out_of_range(targets: Tensor, num_classes: int) -> ValueError:
    bad = targets[(targets < 0) | (targets >= num_classes)][0].item()
    return ValueError(f"target {bad} is out of range for {num_classes} classes (class_counts has {num_classes})")
