"""PyTorch Lightning: :class:`SAMCallback` keeps ltsam's optimizers in step with the Trainer (needs ``.[frameworks]``).

- at fit start it attaches the LightningModule to every SAM-family optimizer (BatchNorm bookkeeping, subset
  forwards) and refuses the setups that cannot give a SAM step (below);
- at each training epoch's start it sets the optimizer's epoch to ``trainer.current_epoch``, so SSE-SAM's stage
  and ``rho_sched`` follow the Trainer, also after resuming from a checkpoint (the epoch is a function of the
  Trainer's progress, not of calls counted by hand).

Refused at fit start, with the reason: a class-aware method in automatic optimisation (Lightning's closure
back-propagates one scalar loss; they need per-sample losses and targets: use manual optimisation),
``precision="16-mixed"`` (Lightning's GradScaler path runs the closure
once itself, then steps the optimizer without it, so the pass at w + eps cannot run; use ``"bf16-mixed"``), and
``accumulate_grad_batches > 1`` in automatic optimisation (Lightning steps with the last micro-batch's closure
only; use manual optimisation and ``micro_batches=N`` on the whole batch), and clipping by value in automatic
optimisation (Lightning clips after each closure call: by value, the perturbation would turn).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from ltsam.optim.engine import SAMFamily
from ltsam.optim.protocol import unwrap


def sam_optimizers(trainer: Trainer) -> list[SAMFamily]:
    """The SAM-family optimizers among the Trainer's (inside any wrapper)."""
    return [opt for opt in map(unwrap, trainer.optimizers) if isinstance(opt, SAMFamily)]


class SAMCallback(Callback):
    """Attach the module, follow the Trainer's epoch, refuse what cannot work (module docstring)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = sam_optimizers(trainer)
        if not optimizers:
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"precision={trainer.precision!r} with {type(optimizers[0]).__name__}: Lightning's GradScaler path "
                "runs the closure once itself and then steps the optimizer without it, so no pass at w + eps can "
                "run; use precision='bf16-mixed' (or '32-true')")
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

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for opt in sam_optimizers(trainer):
            opt.set_epoch(trainer.current_epoch)
