"""Which layers couple the samples of a batch, and the engine's bookkeeping of their running statistics.

A layer is batch-coupled when its training-mode output of one sample depends on the other samples of the
batch (it normalises with batch statistics). Only an explicit allow-list is trusted:

* ``torch.nn.modules.batchnorm._BatchNorm`` subclasses: BatchNorm1d/2d/3d, SyncBatchNorm, timm's
  BatchNormAct2d, SyncBatchNormAct and SplitBatchNorm2d; coupled in training mode (and in eval mode without
  running buffers);
* timm's EvoNorm2dB0 / B1 / B2 in training mode when their batch-variance branch is on (B0 with ``v``,
  B1/B2 with ``apply_act``); the S-variants use per-sample statistics and are not coupled.

Their running buffers are *replayable*: the engine records the batch statistics of each forward at w and
re-applies them where the official schedule ran a forward the engine skips. Any other module in training
mode that holds ``running_mean`` / ``running_var`` buffers (a custom BatchNorm) is treated as coupled, so
every pass forwards the whole (micro-)batch and gradients stay exact, but its buffers are not replayed; the
engine says so in its log. Frozen BatchNorm (timm's, torchvision's: ``Frozen`` in the class name) is
per-sample. timm's DropBlock2d in training scales its mask by the whole batch's keep rate: coupled, without
buffers. The policy also lists the per-sample random layers (:mod:`ltsam.optim.random_layers`).

SyncBatchNorm under torch.distributed normalises with the statistics of all ranks; the replay combines the
recorded per-rank statistics the same way (one all-reduce over every SyncBatchNorm layer), so the running
buffers stay exactly those of the official schedule with SyncBatchNorm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from timm.layers import EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dB2, SplitBatchNorm2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

from ltsam.optim.random_layers import is_batch_coupled_random, is_random

_logger = logging.getLogger("ltsam.optim")
_EVONORM_B = (EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dB2)


def _evonorm_uses_batch(module: nn.Module) -> bool:
    if isinstance(module, EvoNorm2dB0):
        return module.training and module.v is not None
    return module.training and bool(module.apply_act)


def is_batch_coupled(module: nn.Module) -> bool:
    """True for an allow-listed layer that currently normalises with batch statistics."""
    if isinstance(module, _BatchNorm):
        return module.training or module.running_mean is None
    if isinstance(module, _EVONORM_B):
        return _evonorm_uses_batch(module)
    return False


def _has_running_stats(module: nn.Module) -> bool:
    return any(name in ("running_mean", "running_var") for name, _ in module.named_buffers(recurse=False))


@dataclass
class BatchPolicy:
    """What a model's layers mean for the passes: which couple the batch, and which buffers can be replayed."""

    replayable: list[nn.Module] = field(default_factory=list)  # allow-listed, training, with running buffers
    coupled_other: list[nn.Module] = field(default_factory=list)  # allow-listed without buffers, or unknown
    unknown: list[str] = field(default_factory=list)  # names of unknown layers with running buffers
    random: list[str] = field(default_factory=list)  # names of per-sample random layers drawing now

    @property
    def coupled(self) -> bool:
        return bool(self.replayable or self.coupled_other)

    def coupled_buffers(self) -> list[Tensor]:
        """The buffers of the batch-coupled layers: what a forward at w + NaN would poison."""
        return [b for m in self.replayable + self.coupled_other for b in m.buffers(recurse=False)]

    def summary(self) -> str:
        random = ""
        if self.random:
            random = (f"; random layers ({len(self.random)}, e.g. {self.random[0]}): each sample forwarded once "
                      "per point, as the official code")
        return self._coupling() + random

    def _coupling(self) -> str:
        if not self.coupled:
            return "no batch-coupled layer: passes forward only the samples their weighting needs"
        kinds: dict[str, int] = {}
        for m in self.replayable:
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
        text = (f"batch-coupled layers: {', '.join(f'{n} x{c}' for n, c in sorted(kinds.items())) or 'none'} "
                "(buffers replayed); every pass forwards the whole (micro-)batch")
        if self.unknown:
            text += (f"; unknown layers with running statistics treated as batch-coupled, their buffers NOT "
                     f"replayed: {', '.join(self.unknown[:5])}{' ...' if len(self.unknown) > 5 else ''}")
        return text


def batch_policy(model: nn.Module) -> BatchPolicy:
    """The model's batch coupling now (training mode can change between steps, so the engine asks each step)."""
    policy = BatchPolicy()
    for name, module in model.named_modules():
        name = name.replace("_orig_mod.", "")  # a compiled model's wrapper: name the layer as the user does
        if is_random(module):
            policy.random.append(f"{name} ({type(module).__name__})")
        if is_batch_coupled_random(module):
            policy.coupled_other.append(module)
        elif is_batch_coupled(module):
            tracks = getattr(module, "running_var", None) is not None and module.training
            (policy.replayable if tracks else policy.coupled_other).append(module)
        elif (module.training and _has_running_stats(module) and not isinstance(module, (_BatchNorm, *_EVONORM_B))
              and "Frozen" not in type(module).__name__):  # timm's / torchvision's frozen BN: per-sample
            policy.coupled_other.append(module)
            policy.unknown.append(f"{name} ({type(module).__name__})")
    return policy


class PolicyLog:
    """Logs the batch-coupling decision once, and again only when it changes (e.g. after model.eval())."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, policy: BatchPolicy, subset_forward: bool | None) -> None:
        text = policy.summary()
        if subset_forward is not None:
            text += f" (overridden: subset_forward={subset_forward})"
        if text != self.last:
            (_logger.warning if policy.unknown else _logger.info)("ltsam: %s", text)
            self.last = text


# -- recording and replaying the statistics of forwards at w ----------------------------------------------
Stats = tuple[Tensor, Tensor, int]  # per-channel batch mean, biased variance, samples per channel


class StatsRecorder:
    """While active, every forward of the given layers appends its batch statistics (in order)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.stats: dict[nn.Module, list[Stats]] = {m: [] for m in layers}
        self._hooks: list = []

    def __enter__(self) -> StatsRecorder:
        self._hooks = [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach()
        if isinstance(module, SplitBatchNorm2d) and module.training:
            # its own buffers see only the first split (each aux_bn, recorded by its own hook, sees another)
            x = x[: x.shape[0] // module.num_splits]
        x = x.to(accumulation_dtype(x.dtype))
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dims, correction=0)
        self.stats[module].append((mean, var, x.numel() // x.shape[1]))

    def replay(self, times: int) -> None:
        """Apply ``times`` more times the buffer updates of the recorded forwards (each in its order)."""
        if times == 0:
            return
        stats = self._global_stats()
        for _ in range(times):
            for m in self.layers:
                for mean, var in stats[m]:
                    _update_buffers(m, mean, var)

    def _global_stats(self) -> dict[nn.Module, list[tuple[Tensor, Tensor]]]:
        """Mean and unbiased variance per recorded forward; SyncBatchNorm's over all ranks (one all-reduce)."""
        synced = [m for m in self.layers if isinstance(m, SyncBatchNorm) and is_distributed()]
        out = {m: [(mean, var * n / max(n - 1, 1)) for mean, var, n in self.stats[m]]
               for m in self.layers if m not in synced}
        if synced:
            out.update(_combine_over_ranks({m: self.stats[m] for m in synced}))
        return out


def _combine_over_ranks(stats: dict[nn.Module, list[Stats]]) -> dict[nn.Module, list[tuple[Tensor, Tensor]]]:
    """Statistics of the union of every rank's samples, as SyncBatchNorm computes them: sum n, n*mean and
    n*(var + mean^2) over ranks in float64 (one flattened all-reduce), then mean and unbiased variance."""
    pieces = []
    for entries in stats.values():
        for mean, var, n in entries:
            mean64, var64 = mean.double(), var.double()
            count = torch.full((1,), float(n), dtype=torch.float64, device=mean.device)
            pieces += [count, n * mean64, n * (var64 + mean64 * mean64)]
    flat = torch.cat(pieces)
    groups = {getattr(m, "process_group", None) for m in stats}
    if len(groups) != 1:
        raise RuntimeError("ltsam: SyncBatchNorm layers with different process groups cannot be replayed exactly")
    dist.all_reduce(flat, group=groups.pop())
    out: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
    offset = 0
    for m, entries in stats.items():
        out[m] = []
        for mean, _, _ in entries:
            dtype = mean.dtype
            c = mean.numel()
            total = flat[offset]
            sums, squares = flat[offset + 1: offset + 1 + c], flat[offset + 1 + c: offset + 1 + 2 * c]
            offset += 1 + 2 * c
            global_mean = sums / total
            unbiased = (squares - total * global_mean * global_mean) / (total - 1).clamp_min(1)
            out[m].append((global_mean.to(dtype), unbiased.to(dtype)))
    return out


def _update_buffers(m: nn.Module, mean: Tensor, var: Tensor) -> None:
    """The running-buffer update one training forward with these batch statistics makes."""
    if isinstance(m, _BatchNorm):
        m.num_batches_tracked.add_(1)
        # momentum None: cumulative average, weight 1/n computed on the device (no host sync)
        weight = m.momentum if m.momentum is not None else 1.0 / m.num_batches_tracked.to(m.running_mean.dtype)
        m.running_mean.lerp_(mean.to(m.running_mean.dtype), weight)
        m.running_var.lerp_(var.to(m.running_var.dtype), weight)
    else:  # EvoNorm-B: running variance only, fixed momentum
        m.running_var.lerp_(var.to(m.running_var.dtype), m.momentum)


class FrozenMomentum:
    """davda54/sam's bypass: momentum 0 during a perturbed forward, restored afterwards.

    As in davda54/sam, ``num_batches_tracked`` still counts the perturbed forward (it is not restored), so
    with BatchNorm ``momentum=None`` the cumulative average weighs later batches as davda54's does.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.saved: list = []

    def __enter__(self) -> None:
        self.saved = [m.momentum for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, momentum in zip(self.layers, self.saved):
            m.momentum = momentum


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses, weights, norms and batch statistics in at least float32 (fp16/bf16 under autocast); a float64
    model keeps float64."""
    return torch.promote_types(dtype, torch.float32)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
