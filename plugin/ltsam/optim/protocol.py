"""What makes a SAM-family optimizer behave as a torch optimizer wherever one is handed around.

- **Copies.** ``pickle`` and ``copy.deepcopy`` keep the whole optimizer (torch's ``Optimizer.__getstate__``
  keeps only defaults, state and param groups, so a copy would lose its base optimizer and engine). The
  attached model travels with the copy: ``deepcopy((model, opt))`` gives a copy whose optimizer drives the copied
  model, and copying the optimizer alone copies the model its parameters belong to (they are the same tensors).
- **Wrappers.** Lightning's ``LightningOptimizer`` copies the optimizer's ``__dict__`` into the wrapper, so
  anything the wrapper sets (``next_epoch()``, ``attach()``, ``set_targets()``, ``opt.epochs = N``) would land on
  the wrapper only. Progress, the attached model, pending targets and the step's reports live in one shared
  :class:`SharedState` that the wrapper's copy of ``__dict__`` points to as well. :func:`unwrap` finds the
  SAM-family optimizer inside Lightning's and Accelerate's wrappers.
- **Signatures.** Each method's ``__init__`` shows every option it takes (its own, the engine's and ``eps``,
  ``betas``, ``momentum``, which go to the base optimizer when it takes them), so ``inspect.signature`` and
  timm's registry metadata (``has_eps``/``has_betas``/``has_momentum``) agree.
- **Closures.** A closure that takes an argument gets sample indices (subset forwards); one that takes none is
  called for the whole batch (Lightning's and Accelerate's closures take none). Decided once per step by
  ``inspect``, not by catching errors.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class SharedState:
    """State a wrapper that copies ``__dict__`` (LightningOptimizer) must see and change with the optimizer."""

    epoch: int = 0
    epochs: int | None = None
    model: Any = None
    radius_scheduler: Any = None
    skipped: Tensor | int = 0
    last_finite: Tensor | None = None
    last_passes: Any = None
    last_loss: Tensor | None = None
    targets: Tensor | None = None  # set_targets(): consumed by the next step
    backup: list[Tensor] | None = None  # the weights at w between first_step() and second_step()
    buffers_at_w: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)  # (buffer, copy): second_step
    two_pass_refused: str | None = None  # why first_step() cannot be right in this trainer (ltsam.lightning sets it)


def _shared(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._shared, name), lambda self, value: setattr(self._shared, name, value),
                    doc=doc)


def takes_index(closure: Callable) -> bool:
    """Whether ``closure`` names a positional parameter (the sample indices of a subset forward). A bare
    ``*args`` does not count: generic wrappers (Lightning's ``Closure``) forward it to a closure without one."""
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it with no argument
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside Lightning's ``LightningOptimizer`` (``_optimizer``) or Accelerate's
    ``AcceleratedOptimizer`` (``optimizer``); any other optimizer is returned as it is."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = optimizer.__dict__.get("_optimizer", optimizer.__dict__.get("optimizer"))
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def accumulation_refused() -> str | None:
    """The reason a step inside ``accelerator.accumulate`` with N > 1 cannot be right, or None.

    Accelerate skips the optimizer's step on all but the last micro-batch, so the engine would see only the last
    micro-batch's closure: its SAM update would silently drop the others. Read from Accelerate's shared
    ``GradientState`` without creating one."""
    state_module = sys.modules.get("accelerate.state")
    if state_module is None:
        return None
    shared = getattr(getattr(state_module, "GradientState", None), "_shared_state", {})
    steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
    if steps <= 1:
        return None
    return (f"Accelerator(gradient_accumulation_steps={steps}): Accelerate steps the optimizer on the last "
            "micro-batch only, so a SAM-family step would perturb and update along that micro-batch alone; keep "
            "gradient_accumulation_steps=1, give step() the whole batch and pass micro_batches=N (exact "
            "accumulation inside the step)")


def merged_signature(cls: type) -> inspect.Signature:
    """``cls.__init__``'s signature with the ``**kwargs`` it hands to its parent spelled out: the parent's named
    options become keyword-only parameters, and the parent's own ``**kwargs`` (the base optimizer's options) ends
    the list."""
    own = inspect.signature(cls.__dict__["__init__"])
    params = list(own.parameters.values())
    if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        return own
    parent = next(k for k in cls.__mro__[1:] if "__init__" in k.__dict__)
    if parent.__init__ is torch.optim.Optimizer.__init__:  # the engine's **kwargs are the base optimizer's
        return own
    names = {p.name for p in params}
    inherited = [p for p in inspect.signature(parent.__init__).parameters.values()
                 if p.name not in names and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    tail = [p for p in inspect.signature(parent.__init__).parameters.values() if p.kind is p.VAR_KEYWORD]
    head = [p for p in params[:-1] if p.kind is not p.KEYWORD_ONLY]
    keyword = [p for p in params[:-1] if p.kind is p.KEYWORD_ONLY]
    keyword += [p.replace(kind=p.KEYWORD_ONLY) for p in inherited]
    return own.replace(parameters=head + keyword + (tail or params[-1:]))


def refuse_positional_base(owner: str, name: str, value: object) -> None:
    """davda54's ``SAM(params, torch.optim.SGD, ...)`` puts the base class where ltsam has its first option."""
    if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
        raise TypeError(
            f"{owner}(params, {value.__name__}, ...): the second positional argument is {name}, not the base "
            f"optimizer; pass the base by name, e.g. {owner}(params, base={value.__module__}.{value.__qualname__}, "
            "lr=0.1) (an optimizer class or a timm optimizer name such as 'momentum')")


class OptimizerProtocol(torch.optim.Optimizer):
    """The torch-optimizer behaviour of :class:`ltsam.optim.engine.SAMFamily` (module docstring)."""

    _shared: SharedState
    epoch = _shared("epoch", "Training epochs finished (SSE-SAM's stage and rho_sched follow it).")
    epochs = _shared("epochs", "Total training epochs (SSE-SAM's stage switch, cosine rho_sched).")
    _model = _shared("model", "The model the closure runs (attach()).")
    _radius_scheduler = _shared("radius_scheduler", "rho_sched's schedulers, rebuilt by set_epoch().")
    _skipped = _shared("skipped", "Steps a GradScaler skipped (a device counter).")
    _last_finite = _shared("last_finite", "Whether the last step's gradient was finite (with a GradScaler).")
    last_passes = _shared("last_passes", "The forward and backward passes the last step ran (PassCount).")
    last_loss = _shared("last_loss", "The mean loss at w of the last step (detached), also when a wrapper "
                                     "such as AcceleratedOptimizer.step() drops step()'s return value.")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__.__signature__ = merged_signature(cls)

    # -- copies --------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # rho_sched's scheduler cannot travel (its classes are made at run time): the copy rebuilds it
        return {**self.__dict__, "_shared": dataclasses.replace(self._shared, radius_scheduler=None),
                "_rebuild_radius_scheduler": self._shared.radius_scheduler is not None}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        rebuild = state.pop("_rebuild_radius_scheduler", False)
        super().__setstate__(state)  # torch's: restores hook dicts missing from old pickles
        if rebuild:
            self._rebuild_radius_scheduler()

    def _rebuild_radius_scheduler(self) -> None:
        raise NotImplementedError

    # -- state-dict hooks registered on this optimizer (torch's register_*_state_dict_*_hook) ----------------
    def _state_dict_with_hooks(self, build: Callable[[], dict]) -> dict:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = build()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            state = state if result is None else result
        return state

    def _load_state_dict_with_hooks(self, state_dict: dict, load: Callable[[dict], None]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- targets through wrappers ----------------------------------------------------------------------------
    def set_targets(self, targets: Tensor) -> None:
        """Labels of the batch the next ``step()`` runs, for loops whose ``step(closure)`` call cannot carry
        ``targets=`` (Lightning's automatic loop, ``AcceleratedOptimizer.step``). Used by that step only."""
        if not isinstance(targets, Tensor):
            raise TypeError(f"set_targets() takes the batch's label tensor, got {type(targets).__name__}")
        self._shared.targets = targets

    def _take_targets(self, targets: Tensor | None) -> Tensor | None:
        pending, self._shared.targets = self._shared.targets, None
        return pending if targets is None else targets
