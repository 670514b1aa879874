"""``--device-modules ltsam.timm``: SAM-family optimizers in timm's own, unmodified ``train.py``.

    python train.py --device-modules ltsam.timm --opt ssesam --opt-kwargs class_counts=counts.json ...

timm's train.py imports the modules named by ``--device-modules`` right after parsing its arguments, while it
runs as ``__main__``. Importing this module registers the optimizers (``import ltsam``) and wraps
``__main__.train_one_epoch``. For a SAM-family optimizer the wrapped epoch swaps the batch's loss computation
(``task(input, target)`` from timm 1.0.23, ``loss_fn(model(input), target)`` before) for the method's full
gradient G, computed by the engine on the batch with a per-sample criterion. G is written to ``p.grad`` and the
returned loss is detached, so train.py's own backward touches no parameter and costs nothing, and train.py's
clipping (``--clip-grad`` clips G), ``NativeScaler`` (fp16: every engine backward is scaled by its scale) and
``optimizer.step()`` (the base optimizer's step) apply G exactly as they would a plain gradient. A step through
the hook therefore costs what ``opt.step(closure, targets=y)`` costs.

The per-sample criterion follows train.py's loss: cross-entropy on hard labels with its ``--smoothing``
(``(1 - s) * nll + s * mean_c(-log p_c)``, timm's ``LabelSmoothingCrossEntropy`` before its batch mean), or the
soft-target cross-entropy under mixup/cutmix (plain ``sam`` only). Setups that cannot be exact are refused with
the flag's name: mixup/cutmix with imbsam/ssesam/focalsam, ``--naflex-loader``,
``--train-img-sizes``, ``--aug-splits``, ``--jsd-loss``, ``--bce-loss``, distillation tasks, Lookahead, and
``--torchcompile`` where train.py compiles the whole task (1.0.23-1.0.26).
``--grad-accum-steps`` N buffers N loader batches and makes one SAM-family step on them (``micro_batches=N``).
After each epoch the optimizer's epoch advances (SSE-SAM's stage), and ``epochs`` defaults to the scheduled
total (``--epochs`` + ``--cooldown-epochs``, as train.py's scheduler counts). Class-aware sampling
(``LTSAM_SAMPLER``), ``LTSAM_CLASS_COUNTS`` and the counts checks: :mod:`ltsam.trainpy`; lightweight
fine-tuning (``LTSAM_FINETUNE``): :mod:`ltsam.finetune.trainpy`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn

import ltsam  # noqa: F401  (registers sam, imbsam, ssesam, focalsam in timm's optimizer registry)
from ltsam import trainpy
from ltsam.finetune.trainpy import install_finetune
from ltsam.optim import SAMFamily

_logger = logging.getLogger(__name__)
_MARKER = trainpy.HOOK_MARKER

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def install(namespace: ModuleType) -> bool:
    """Wrap ``namespace.train_one_epoch`` (and the data factories under ``LTSAM_SAMPLER``) once; returns False
    when the namespace has none."""
    original = getattr(namespace, "train_one_epoch", None)
    if not callable(original):
        return False
    if not getattr(original, _MARKER, False):
        namespace.train_one_epoch = wrap_train_one_epoch(original)
        trainpy.install_sampling(namespace)
        install_finetune(namespace)
    trainpy.guard_train_py(namespace)
    return True


def wrap_train_one_epoch(original: Callable[..., Any]) -> Callable[..., Any]:
    """The SAM-aware epoch: binds train.py's arguments by name, so every signature since 1.0.x works."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def train_one_epoch(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        trainpy.prepare_epoch(arguments)
        optimizer = _sam_optimizer(arguments["optimizer"])
        if optimizer is None:
            return original(*args, **kwargs)
        _refuse_inexact(optimizer, arguments)
        train_args = arguments["args"]
        trainpy.check_counts(optimizer, getattr(arguments["loader"], "dataset", None))
        if optimizer.epochs is None:
            optimizer.epochs = trainpy.scheduled_epochs(arguments)
        optimizer.set_epoch(arguments["epoch"])  # train.py's epoch counter is the truth, also after --resume
        stage = f", stage {optimizer.stage} of {optimizer.epochs} epochs" if hasattr(optimizer, "stage") else ""
        with _sam_epoch(optimizer, arguments) as step:
            metrics = original(*bound.args, **bound.kwargs)
        optimizer.next_epoch()
        if getattr(train_args, "rank", 0) == 0:
            passes = optimizer.last_passes
            _logger.info(
                f"ltsam.timm: epoch {arguments['epoch']}: {step.steps} {type(optimizer).__name__} steps{stage} "
                f"({passes.forward} forward + {passes.backward} backward passes in the last), "
                f"{step.skipped} skipped by the loss scaler"
            )
        return metrics

    setattr(train_one_epoch, _MARKER, True)
    return train_one_epoch


def per_sample_criterion(criterion: Any) -> PerSampleLoss:
    """train.py's training loss without its batch mean, or a clear refusal when it has no such form."""
    if isinstance(criterion, SoftTargetCrossEntropy):
        return lambda logits, target: torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)
    if isinstance(criterion, LabelSmoothingCrossEntropy):
        smoothing = float(criterion.smoothing)
    elif type(criterion) is nn.CrossEntropyLoss and criterion.weight is None:
        smoothing = float(criterion.label_smoothing)
    else:
        raise ValueError(
            f"ltsam.timm: train.py's loss {type(criterion).__name__} has no per-sample form here; SAM-family "
            "optimizers train with cross-entropy (optionally --smoothing) or, for --opt sam, mixup's soft "
            "cross-entropy: drop --bce-loss / --jsd-loss"
        )
    return lambda logits, target: F.cross_entropy(logits, target, reduction="none", label_smoothing=smoothing)


class _HookedStep:
    """Per batch: the engine's gradient G on the captured batch, then the base step when train.py steps.

    With ``--grad-accum-steps`` N the loader's batches are micro-batches: they are buffered until train.py's
    update (every N batches, and the epoch's last shorter group, timm's rule), then one SAM-family step runs on
    their concatenation with ``micro_batches`` = their number, so the update is the one of the whole batch."""

    def __init__(self, optimizer: SAMFamily, module: nn.Module, criterion: PerSampleLoss,
                 scaler: torch.amp.GradScaler | None, accum_steps: int = 1, num_batches: int = 0) -> None:
        self.optimizer, self.module, self.criterion, self.scaler = optimizer, module, criterion, scaler
        self.accum_steps, self.num_batches = accum_steps, num_batches
        self.buffer: list[tuple[Tensor, Tensor]] = []
        self.seen = 0  # loader batches of this epoch so far
        self.pending = False
        self.computing = False
        self.steps = 0
        self.skipped = 0

    def group_size(self) -> int:
        """Micro-batches in the current update: N, or what is left for the epoch's last update."""
        full = self.num_batches - self.num_batches % self.accum_steps
        return self.accum_steps if self.seen < full else self.num_batches - full

    def loss(self, input: Tensor, target: Tensor) -> Tensor:
        """Set p.grad = G for the batch; the returned mean loss is a leaf, so train.py's backward is free.

        Under accumulation train.py divides each micro-batch's loss by N and logs it times N: the micro-batches
        before the update report 0 and the last reports the group's N x mean loss, so train.py's epoch loss (its
        average) is the mean loss of every sample, while a single logged value is not a micro-batch's own."""
        if self.accum_steps > 1:
            size = self.group_size()
            if not self.buffer:
                self.settle()
            self.buffer.append((input, target))
            self.seen += 1
            if len(self.buffer) < size:
                return torch.zeros((), device=input.device, requires_grad=True) * 1.0  # train.py divides in place
            input, target = (torch.cat(parts) for parts in zip(*self.buffer))
            self.buffer = []
            return self._gradient(input, target, size) * size
        self.settle()
        return self._gradient(input, target, 1)

    def _gradient(self, input: Tensor, target: Tensor, micro_batches: int) -> Tensor:
        """G of the (accumulated) batch into p.grad; returns its mean loss as a grad-requiring stand-in."""
        trainpy.check_batch_labels(self.optimizer, target)
        device = input.device.type
        enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

        def closure(index: Tensor | None = None) -> Tensor:
            x, y = (input, target) if index is None else (input[index], target[index])
            with torch.autocast(device, dtype=dtype, enabled=enabled):  # the autocast train.py trains under
                return self.criterion(self.module(x), y)

        self.computing = True
        try:
            with torch.autocast(device, enabled=False):  # backward passes outside autocast, as torch advises
                params, grads, loss = self.optimizer.sam_gradient(closure, targets=target, scaler=self.scaler,
                                                                  micro_batches=micro_batches)
        finally:
            self.computing = False
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        self.pending = True
        return loss.requires_grad_()

    def settle(self) -> None:
        """Count a gradient that was never stepped: the loss scaler found inf/NaN and skipped the step."""
        if self.pending:
            self.pending = False
            self.skipped += 1
            self.optimizer.skipped_steps += 1

    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """train.py's optimizer.step() (directly or inside GradScaler.step): apply G with the base optimizer."""
        if closure is not None or not self.pending:
            raise RuntimeError(
                "ltsam.timm: optimizer.step() was called without a SAM-family gradient of the current batch; "
                "only train.py's own loop (one step per batch) is supported"
            )
        self.pending = False
        self.steps += 1
        self.optimizer.base_optimizer.step()


@contextlib.contextmanager
def _sam_epoch(optimizer: SAMFamily, arguments: dict[str, Any]) -> Iterator[_HookedStep]:
    """Route the epoch's loss computation and optimizer.step() through the engine, undone afterwards."""
    scaler = _grad_scaler(arguments.get("loss_scaler"))
    accum = {"accum_steps": max(1, getattr(arguments["args"], "grad_accum_steps", 1)),
             "num_batches": len(arguments["loader"])}
    task = arguments.get("task")
    with contextlib.ExitStack() as stack:
        if task is not None:  # timm >= 1.0.23: loss = task(input, target)['loss']
            module = task.get_trainable_module() if hasattr(task, "get_trainable_module") else task.model  # 1.0.2[3-6]
            step = _HookedStep(optimizer, _unwrap(module), per_sample_criterion(task.criterion), scaler, **accum)
            stack.enter_context(_patched(task, "forward", lambda input, target: {"loss": step.loss(input, target)}))
        else:  # timm <= 1.0.22: loss = loss_fn(model(input), target); train.py's model call hands its input on
            model = arguments["model"]
            step = _HookedStep(optimizer, _unwrap(model), per_sample_criterion(arguments["loss_fn"]), scaler, **accum)
            forward = model.forward
            stack.enter_context(_patched(model, "forward", lambda *a, **kw: forward(*a, **kw) if step.computing
                                         else a[0]))
            arguments["loss_fn"] = step.loss
        optimizer.attach(step.module)
        stack.enter_context(_patched(optimizer, "step", step.step))
        yield step
        step.settle()
        if step.buffer:
            raise RuntimeError(f"ltsam.timm: the epoch ended with {len(step.buffer)} micro-batch(es) that train.py "
                               f"never stepped: its loader yielded {step.seen} batches, not len(loader) = "
                               f"{step.num_batches}")


def _refuse_inexact(optimizer: SAMFamily, arguments: dict[str, Any]) -> None:
    """Setups where the hooked step would not be the method's exact step: name the flag."""
    args = arguments["args"]
    name = type(optimizer).__name__
    problems = []
    if arguments.get("naflex_mode"):
        problems.append("--naflex-loader (variable-resolution batches and loss scaling)")
    if arguments.get("scheduled_batch_mode"):
        problems.append("--train-img-sizes (scheduled batch sizes rescale the loss)")
    if getattr(args, "aug_splits", 0) > 0:
        problems.append("--aug-splits (split batches and the JSD loss)")
    if getattr(args, "jsd_loss", False):
        problems.append("--jsd-loss (no per-sample form)")
    if getattr(args, "bce_loss", False):
        problems.append("--bce-loss (use cross-entropy)")
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and optimizer.needs_targets:
        problems.append(f"--mixup/--cutmix ({name} splits the batch by hard labels; soft targets cannot be)")
    task = arguments.get("task")
    if hasattr(task, "_orig_mod"):
        problems.append("--torchcompile with a train.py that compiles the whole task (1.0.23-1.0.26)")
    elif task is not None and type(task).__name__ != "ClassificationTask":
        problems.append(f"the {type(task).__name__} task (--kd-model-name distillation has no per-sample loss here)")
    if arguments.get("loss_scaler") is not None and _grad_scaler(arguments["loss_scaler"]) is None:
        problems.append(f"loss scaler {type(arguments['loss_scaler']).__name__} (only timm's NativeScaler)")
    if problems:
        raise ValueError(f"ltsam.timm: --opt {getattr(args, 'opt', name)} cannot train exactly with "
                         + "; ".join(problems))


def _sam_optimizer(optimizer: torch.optim.Optimizer) -> SAMFamily | None:
    if isinstance(optimizer, SAMFamily):
        return optimizer
    if isinstance(getattr(optimizer, "_base_optimizer", None), SAMFamily):
        raise ValueError("ltsam.timm: a lookahead_ prefix around a SAM-family optimizer is not supported; drop it")
    return None


def _grad_scaler(loss_scaler: Any) -> torch.amp.GradScaler | None:
    scaler = getattr(loss_scaler, "_scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def _unwrap(module: nn.Module) -> nn.Module:
    """The module without DDP: the engine all-reduces G itself, a synced forward would reduce twice."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.module
    return module


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the duration of the block (modules call ``self.forward``)."""
    missing = object()
    previous = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, previous)


if not install(sys.modules["__main__"]):
    warnings.warn(
        "ltsam.timm found no train_one_epoch in __main__ and patched nothing: it is meant for "
        "`python train.py --device-modules ltsam.timm`; elsewhere call ltsam.timm.install(train_module)",
        stacklevel=2,
    )
