"""Radius schedules: timm's epoch schedulers driving the SAM-family radii that live in ``param_groups``.

Every param group of a SAM-family optimizer carries its radius fields (``optimizer.radius_names``: ``rho``;
SSE-SAM ``head_rho`` and ``tail_rho``; a new method's own) and the engine reads them at every step, so a timm
scheduler built with ``param_group_field=<field>`` schedules a radius exactly as it schedules the learning
rate: step, multi-step or cosine, in epochs. timm's LR scheduler classes hand ``"lr"`` to their base class;
:class:`_RadiusField` sits between them and ``timm.scheduler.Scheduler`` in the method resolution order and
hands on the radius field instead (and ignores layer decay's ``lr_scale``, which multiplies learning rates,
not radii).

Focal-SAM's ImageNet-LT schedule (rho 0.1, then 0.2 from the epoch with ``epoch + 1 >= 0.8 * epochs``) is
``multistep`` with milestone ``0.8 * epochs`` and rate 2: timm applies milestone m from the 0-based epoch m - 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

SCHEDULES = ("none", "step", "multistep", "cosine")


class _RadiusField(Scheduler):
    """Mixin for a timm LR scheduler class: its param_group_field becomes the class's ``field``."""

    field = "rho"

    def __init__(self, optimizer: torch.optim.Optimizer, param_group_field: str, **kwargs) -> None:
        super().__init__(optimizer, param_group_field=self.field, **kwargs)

    def update_groups(self, values: float | list[float]) -> None:
        if not isinstance(values, (list, tuple)):
            values = [values] * len(self.optimizer.param_groups)
        for group, value in zip(self.optimizer.param_groups, values):
            group[self.param_group_field] = value


def _on_field(scheduler_class: type[Scheduler], field: str) -> type[Scheduler]:
    return type(f"{scheduler_class.__name__}[{field}]", (scheduler_class, _RadiusField), {"field": field})


class RadiusScheduler:
    """One timm scheduler per radius field of the optimizer; ``step(epoch)`` sets the radii of that epoch."""

    def __init__(self, schedulers: list[Scheduler]) -> None:
        self.schedulers = schedulers

    def step(self, epoch: int) -> None:
        """The radii of 0-based ``epoch``: a function of the epoch alone, so a resumed run needs no state."""
        for scheduler in self.schedulers:
            scheduler.step(epoch)

    def values(self) -> dict[str, float]:
        """The radii now in force (first param group), e.g. for the epoch summary."""
        group = self.schedulers[0].optimizer.param_groups[0]
        return {s.param_group_field: float(group[s.param_group_field]) for s in self.schedulers}


def check_radius_schedule(sched: str = "none", epochs: int | None = None, decay_epochs: float | None = None,
                          decay_milestones: int | Sequence[int] = (), decay_rate: float = 0.1,
                          min_rho: float = 0.0) -> tuple[int, ...]:
    """Refuse options that schedule nothing sensible (named as the optimizer's ``rho_*`` options); returns the
    milestones as a tuple (one int is one milestone: train.py's ``--opt-kwargs rho_decay_milestones=160``).
    ``epochs=None`` defers cosine's check to the epoch the schedule is first applied."""
    if sched not in SCHEDULES:
        raise ValueError(f"rho_sched={sched!r} is not one of {', '.join(SCHEDULES)}")
    milestones = (decay_milestones,) if isinstance(decay_milestones, int | float) else tuple(decay_milestones)
    if sched == "step" and not (decay_epochs and decay_epochs > 0):
        raise ValueError(f"rho_sched=step needs rho_decay_epochs > 0 (got {decay_epochs})")
    if sched == "multistep" and not milestones:
        raise ValueError("rho_sched=multistep needs rho_decay_milestones (epochs, e.g. 160)")
    if not all(isinstance(m, int | float) and m > 0 for m in milestones):
        raise ValueError(f"rho_decay_milestones={decay_milestones!r} must be epochs > 0 (a number or a list)")
    if sched == "cosine" and epochs is not None and not epochs > 0:
        raise ValueError(f"rho_sched=cosine needs the number of epochs (got {epochs})")
    if min_rho < 0 or decay_rate < 0:
        raise ValueError(f"rho_min={min_rho} and rho_decay_rate={decay_rate} must be >= 0 (radii are >= 0)")
    return milestones


def create_radius_scheduler(optimizer: torch.optim.Optimizer, sched: str = "none", epochs: int | None = None,
                            decay_epochs: float | None = None, decay_milestones: int | Sequence[int] = (),
                            decay_rate: float = 0.1, min_rho: float = 0.0) -> RadiusScheduler | None:
    """A schedule for every radius of ``optimizer`` (None for ``sched="none"``), named like timm's lr options:
    ``step`` multiplies by ``decay_rate`` every ``decay_epochs``, ``multistep`` at each of ``decay_milestones``,
    ``cosine`` anneals from the configured radius to ``min_rho`` over ``epochs``. Each radius starts from its
    param groups' ``initial_<field>`` (timm's record of the configured value, kept in ``state_dict``)."""
    milestones = check_radius_schedule(sched, epochs, decay_epochs, decay_milestones, decay_rate, min_rho)
    if sched == "none":
        return None
    fields = getattr(optimizer, "radius_names", ())  # the radii a SAM-family method declared (add_radii)
    if not fields:
        raise ValueError(f"rho_sched={sched} schedules SAM-family radii (param group fields such as rho, head_rho, "
                         f"tail_rho); {type(optimizer).__name__} has none")
    if sched == "cosine" and epochs is None:
        raise ValueError("rho_sched=cosine needs the number of epochs (the optimizer's epochs=N; ltsam train and "
                         "ltsam.timm set it to the scheduled total)")
    build = {
        "step": lambda cls: cls(optimizer, decay_t=decay_epochs, decay_rate=decay_rate),
        "multistep": lambda cls: cls(optimizer, decay_t=sorted(milestones), decay_rate=decay_rate),
        "cosine": lambda cls: cls(optimizer, t_initial=epochs, lr_min=min_rho),
    }[sched]
    base = {"step": StepLRScheduler, "multistep": MultiStepLRScheduler, "cosine": CosineLRScheduler}[sched]
    return RadiusScheduler([build(_on_field(base, field)) for field in fields])
