"""PyTorch Lightning: :class:`SAMCallback` keeps ltsam's optimizers in step with the Trainer (needs ``.[frameworks]``).

- at fit start it attaches the LightningModule to every SAM-family optimizer (BatchNorm bookkeeping, subset
  forwards) and refuses the setups that cannot give a SAM step (below);
- at each training epoch's start it sets the optimizer's epoch to ``trainer.current_epoch``, so SSE-SAM's stage
  and ``rho_sched`` follow the Trainer, also after resuming from a checkpoint (the epoch is a function of the
  Trainer's progress, not of calls counted by hand);
- with ``precision="16-mixed"`` (Lightning's ``MixedPrecision`` with a GradScaler) it puts :class:`ScaledSAMStep`
  on that plugin for the fit: Lightning's own fp16 step runs the closure once and then calls
  ``scaler.step(optimizer)`` without it, so no pass at w + eps could run; the adapter runs the whole SAM step
  with the plugin's own scaler instead. Users write the same code as for bf16.

Refused at fit start, with the reason: a class-aware method in automatic optimisation (Lightning's closure
back-propagates one scalar loss; they need per-sample losses and targets: use manual optimisation), a GradScaler
in a precision plugin other than ``MixedPrecision`` (FSDP's: not adapted), ``accumulate_grad_batches > 1`` in
automatic optimisation (Lightning steps with the last micro-batch's closure only; use manual optimisation and
``micro_batches=N`` on the whole batch), and clipping by value in automatic optimisation (Lightning clips after
each closure call: by value, the perturbation would turn). Under the GradScaler, ``first_step()`` is refused when
called (``manual_backward`` leaves p.grad scaled and ``second_step()`` would bypass the scaler and the step count).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from ltsam.optim.engine import SAMFamily
from ltsam.optim.protocol import unwrap


class ScaledSAMStep:
    """``MixedPrecision.optimizer_step`` for SAM-family optimizers under the plugin's GradScaler (16-mixed).

    Installed on the plugin instance by :class:`SAMCallback` for one fit (class and checkpoint key unchanged, so
    the scaler's state is saved and restored by Lightning as always); other optimizers go to Lightning's method.
    The step is the engine's own scaler path with ``trainer.precision_plugin.scaler``: every backward scaled by
    it (in automatic optimisation Lightning's closure scales its own, as for any optimizer), G unscaled once,
    ``on_before_optimizer_step`` (and automatic optimisation's gradient clipping) once per step with the unscaled
    G, a non-finite step skipped (``skipped_steps``), ``scaler.update()``. ``LightningOptimizer.step`` around it
    counts the step in ``trainer.global_step``, skipped or not, as Lightning's own fp16 step is counted.
    """

    def __init__(self, plugin: MixedPrecision) -> None:
        self.plugin = plugin
        self.lightning_step = plugin.optimizer_step

    def __call__(self, optimizer: Any, model: LightningModule, closure: Any, **kwargs: Any) -> Any:
        sam = unwrap(optimizer)
        if not isinstance(sam, SAMFamily):
            return self.lightning_step(optimizer, model=model, closure=closure, **kwargs)
        scaler = self.plugin.scaler
        # Precision._after_closure: the on_before_optimizer_step hooks and the clipping Lightning's loop asks for
        hooks = partial(self.plugin._after_closure, model, optimizer)
        return sam.apply_gradient(*sam.sam_gradient(closure, scaler=scaler, **kwargs), scaler=scaler,
                                  before_update=hooks)

    @classmethod
    def install(cls, plugin: MixedPrecision) -> None:
        if not isinstance(plugin.__dict__.get("optimizer_step"), cls):
            plugin.optimizer_step = cls(plugin)

    @classmethod
    def remove(cls, plugin: Precision) -> None:
        if isinstance(plugin.__dict__.get("optimizer_step"), cls):
            del plugin.optimizer_step


FIRST_STEP_UNDER_SCALER = (
    "under Lightning's GradScaler (precision='16-mixed'): manual_backward scales p.grad, and second_step() would "
    "apply it without unscaling, past the scaler's skip and trainer.global_step; step through Lightning instead: "
    "self.optimizers().step(closure, targets=y) with a closure returning per-sample losses")


def sam_optimizers(trainer: Trainer) -> list[SAMFamily]:
    """The SAM-family optimizers among the Trainer's (inside any wrapper)."""
    return [opt for opt in map(unwrap, trainer.optimizers) if isinstance(opt, SAMFamily)]


class SAMCallback(Callback):
    """Attach the module, follow the Trainer's epoch, adapt fp16's GradScaler step, refuse what cannot work
    (module docstring)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = sam_optimizers(trainer)
        if not optimizers:
            return
        plugin = trainer.precision_plugin
        if getattr(plugin, "scaler", None) is not None and not isinstance(plugin, MixedPrecision):
            raise ValueError(
                f"{type(plugin).__name__} with a GradScaler and {type(optimizers[0]).__name__}: SAMCallback adapts "
                "the GradScaler step of Lightning's MixedPrecision (precision='16-mixed') only; use that, or "
                "precision='bf16-mixed'")
        aware = [type(opt).__name__ for opt in optimizers if opt.needs_targets]
        if pl_module.automatic_optimization and aware:
            raise ValueError(
                f"{aware[0]} in automatic optimisation: it weights each sample by its class, so it needs per-sample "
                "losses and the batch's targets, and Lightning's automatic closure back-propagates one scalar loss; "
                "use manual optimisation (self.automatic_optimization = False) and "
                "self.optimizers().step(closure, targets=y) with a closure returning per-sample losses")
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} in automatic optimisation: Lightning "
                "steps with the last micro-batch's closure only, so the SAM step would drop the others; use manual "
                "optimisation and opt.step(closure, targets=y, micro_batches=N) on the whole batch")
        if pl_module.automatic_optimization and trainer.gradient_clip_val and \
                trainer.gradient_clip_algorithm == "value":
            raise ValueError(
                "gradient_clip_algorithm='value' in automatic optimisation: Lightning clips after each closure call, "
                "and clipping the gradient at w by value turns the perturbation's direction; clip by norm (the "
                "default: it clips the update and leaves the direction as it is)")
        for opt in optimizers:
            if opt._model is None:
                opt.attach(pl_module)
        if getattr(plugin, "scaler", None) is not None:
            ScaledSAMStep.install(plugin)
            for opt in optimizers:
                opt._shared.two_pass_refused = FIRST_STEP_UNDER_SCALER

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        ScaledSAMStep.remove(trainer.precision_plugin)
        for opt in sam_optimizers(trainer):
            opt._shared.two_pass_refused = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for opt in sam_optimizers(trainer):
            opt.set_epoch(trainer.current_epoch)
