"""One training epoch and one evaluation pass.

Every update goes through :func:`train_step`, the single place that knows how an optimizer consumes a batch:
plain timm optimizers (backward + step), the SAM family (a closure of per-sample losses), and either of them
inside a DeepSpeed engine (``engine.backward`` + ``engine.step``; the SAM family through ``sam_gradient``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ltsam.metrics import LongTailAccuracy
from ltsam.optim import SAMFamily
from ltsam.optim import deepspeed as ltsam_deepspeed
from ltsam.train.distributed import all_reduce_sum, rng_state, set_rng_state
from ltsam.train.preempt import StopRequest, fault_hook_due, maybe_signal
from ltsam.tte import crop_mean_logits

# test-only fault injection: rank LTSAM_FAULT_RANK (default 1) calls os._exit(1) right after update
# LTSAM_FAULT_AT_STEP, once: the marker file LTSAM_FAULT_MARKER keeps the restarted group alive
FAULT_ENV = ("LTSAM_FAULT_AT_STEP", "LTSAM_FAULT_MARKER", "LTSAM_FAULT_RANK")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: training stops, and the last checkpoint written stays the last good one."""


@dataclass
class StepContext:
    """What one update needs. ``model`` runs plain forwards (DDP-wrapped when distributed); ``module`` is the
    unwrapped model the SAM closure runs, since the SAM engine all-reduces its gradients itself."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    engine: object | None = None  # a DeepSpeed engine, which then owns backward, clipping and the step
    accum_steps: int = 1  # --grad-accum-steps: loader batches (micro-batches) per update

    @property
    def sam(self) -> bool:
        return isinstance(self.optimizer, SAMFamily)


def train_step(ctx: StepContext, x: Tensor, y: Tensor, micro_batches: int = 1) -> Tensor:
    """One optimizer update on the batch; returns this rank's mean loss (detached).

    With ``micro_batches`` N > 1 the batch is N micro-batches, the contiguous chunks ``tensor_split`` gives (the
    loader's batches, concatenated), each forwarded on its own: plain optimizers accumulate the batch-mean
    gradient chunk by chunk (a chunk's mean loss weighted by its share, timm's loss / N for equal chunks); the
    SAM family gets the whole batch and its engine splits it the same way (``micro_batches=N``)."""
    if ctx.engine is not None:
        x = x.to(next(ctx.module.parameters()).dtype)  # DeepSpeed's bf16 mode holds bf16 weights
    if ctx.sam:
        def closure(index: Tensor | None = None) -> Tensor:
            xs, ys = (x, y) if index is None else (x[index], y[index])
            with ctx.autocast():
                return ctx.criterion(ctx.module(xs).float(), ys)

        if ctx.engine is not None:
            return ltsam_deepspeed.step(ctx.engine, ctx.optimizer, closure, targets=y)
        with clip_before_base_step(ctx):
            return ctx.optimizer.step(closure, targets=y, scaler=ctx.scaler, micro_batches=micro_batches)
    if ctx.engine is not None:
        loss = ctx.criterion(ctx.engine(x).float(), y).mean()
        ctx.engine.backward(loss)
        ctx.engine.step()
        return loss.detach()

    ctx.optimizer.zero_grad(set_to_none=True)
    chunks = list(zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)))
    loss = torch.zeros((), device=x.device)
    for i, (xs, ys) in enumerate(chunks):
        last = i + 1 == len(chunks)
        no_sync = ctx.model.no_sync() if not last and hasattr(ctx.model, "no_sync") else nullcontext()
        with no_sync:  # DDP all-reduces the summed gradient once, after the last micro-batch
            with ctx.autocast():
                part = ctx.criterion(ctx.model(xs), ys).mean() * (len(ys) / len(y))
            (ctx.scaler.scale(part) if ctx.scaler is not None else part).backward()
        loss += part.detach().float()
    if ctx.scaler is not None:
        if ctx.clip_grad is not None:
            ctx.scaler.unscale_(ctx.optimizer)
            dispatch_clip_grad(ctx.module.parameters(), ctx.clip_grad, mode=ctx.clip_mode)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        if ctx.clip_grad is not None:
            dispatch_clip_grad(ctx.module.parameters(), ctx.clip_grad, mode=ctx.clip_mode)
        ctx.optimizer.step()
    return loss


def updates_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer updates in an epoch of ``batches`` loader batches (timm: a last, shorter group also steps)."""
    return -(-batches // accum_steps)


@contextmanager
def clip_before_base_step(ctx: StepContext) -> Iterator[None]:
    """``--clip-grad`` for the SAM family: clip the final update direction G, the gradient the base optimizer
    applies (what timm's --clip-grad clips for a plain optimizer, and what ltsam.timm clips; under DeepSpeed its
    ``gradient_clipping``, set from --clip-grad, clips G).

    A step pre-hook on the base optimizer runs after a GradScaler has unscaled G and only when the step is
    taken, so the engine's own step (passes, scaler, skip counting) stays as it is.
    """
    if ctx.clip_grad is None:
        yield
        return
    params = [p for p in ctx.module.parameters() if p.requires_grad]
    handle = ctx.optimizer.base_optimizer.register_step_pre_hook(
        lambda *_: dispatch_clip_grad(params, ctx.clip_grad, mode=ctx.clip_mode))
    try:
        yield
    finally:
        handle.remove()


def progress_bar(enabled: bool) -> Progress:
    """Per-epoch bar with loss, lr, samples/s and (SSE-SAM) the stage; disabled bars render nothing."""
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.3g}  {task.fields[rate]:.0f} samples/s"
                   "{task.fields[stage]}"),
        TimeElapsedColumn(), disable=not enabled, transient=False,
    )


def train_one_epoch(ctx: StepContext, loader: DataLoader, epoch: int, state, scheduler, model_ema,
                    progress: Progress, world_size: int, log_interval: int, device: torch.device,
                    stop: StopRequest | None = None) -> dict:
    """Run one epoch of updates; returns ``{"loss": mean over the epoch and ranks}``, plus ``stopped_at``
    (updates done in the epoch) and ``loss_sum`` when a stop signal ended it early.

    The loss is summed over ranks after every update together with the stop flag, so every rank sees a NaN/inf
    or a signal together and stops at the same step. A run resumed inside the epoch (``state.skip`` > 0)
    replays the epoch's data order from the epoch's starting RNG state, skips the batches already trained and
    then takes the RNG state of the moment it stopped, so it continues as if it never had.
    """
    ctx.module.train()
    stage = getattr(ctx.optimizer, "stage", None)  # SSE-SAM only
    task = progress.add_task("train", total=len(loader), epoch=epoch, loss=float("nan"), rate=0.0,
                             lr=ctx.optimizer.param_groups[0]["lr"], stage=f"  stage {stage}" if stage else "")
    skip = state.skip  # loader batches already trained in this epoch (a multiple of --grad-accum-steps)
    if skip:
        set_rng_state(state.epoch_rng)
    state.epoch_rng = rng_state()  # the data loader draws its seeds from it: a mid-epoch checkpoint keeps it
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    if skip:
        set_rng_state(state.batch_rng)
    total, seen, start = state.loss_sum, updates_per_epoch(skip, ctx.accum_steps), time.perf_counter()
    state.skip, state.loss_sum = 0, 0.0
    micro: list[tuple[Tensor, Tensor]] = []
    for batch_idx, (x, y) in enumerate(batches, start=skip):
        micro.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        if len(micro) < ctx.accum_steps and batch_idx + 1 < len(loader):
            continue  # an update every --grad-accum-steps batches, and one for the epoch's last batches
        xs, ys = (micro[0] if len(micro) == 1 else (torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])))
        loss = train_step(ctx, xs, ys, len(micro)).float().reshape(1)
        micro = []
        reduced = all_reduce_sum(torch.cat([loss, loss.new_tensor([stop.flag if stop is not None else 0.0])]))
        loss, stopping = reduced[:1] / world_size, bool(reduced[1] > 0)
        value = float(loss)
        state.num_updates += 1
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at epoch {epoch}, update {state.num_updates} (batch {batch_idx} "
                                f"of {len(loader)}); stopping without saving")
        total, seen = total + value, seen + 1
        if model_ema is not None:
            model_ema.update(ctx.module, step=state.num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=state.num_updates)
        _maybe_fault(state.num_updates)
        maybe_signal(state.num_updates)
        if (batch_idx + 1) % log_interval == 0 or batch_idx + 1 == len(loader):
            rate = (batch_idx + 1 - skip) * x.shape[0] * world_size / (time.perf_counter() - start)
            progress.update(task, completed=batch_idx + 1, loss=total / seen, rate=rate,
                            lr=ctx.optimizer.param_groups[0]["lr"])
        if stopping:
            return {"loss": total / seen, "stopped_at": batch_idx + 1, "loss_sum": total}
    return {"loss": total / max(seen, 1)}


@torch.no_grad()
def _float_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x).float()


def evaluate(module: nn.Module, loader: DataLoader, meter: LongTailAccuracy, tta: bool,
             autocast: Callable[[], AbstractContextManager], device: torch.device) -> dict:
    """All / Many / Medium / Few over the evaluation set (each rank its share; the meter sums over ranks).

    With ``tta`` the logits of each image and its horizontal mirror are averaged (SSE-SAM's final report); a
    loader of crop stacks (``--tte``, :mod:`ltsam.tte`) has its logits averaged over the crops.
    """
    module.eval()
    meter.reset()
    dtype = next(module.parameters()).dtype  # bf16 under DeepSpeed's bf16 mode
    for x, y in loader:
        x = x.to(device, dtype=dtype, non_blocking=True)
        forward = crop_mean_logits if x.dim() == 5 else _float_logits  # --tte crops
        with autocast():
            logits = forward(module, x)
            if tta:  # the mirror of every image (of every crop): the width is the last dimension
                logits = (logits + forward(module, torch.flip(x, dims=[-1]))) / 2
        meter.update(logits, y)
    return meter.compute()


def _maybe_fault(step: int) -> None:
    if not fault_hook_due(step, FAULT_ENV[0], FAULT_ENV[2], default_rank=1):
        return
    marker = Path(os.environ[FAULT_ENV[1]])
    if marker.exists():
        return
    marker.write_text(f"killed at update {step}\n")
    os._exit(1)
