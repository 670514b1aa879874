"""Training checkpoints: timm's ``CheckpointSaver`` rotation plus everything an exact resume needs.

timm's saver already writes ``tmp.pth.tar`` and ``os.replace``-s it onto ``last.pth.tar`` (atomic), then
hard-links ranked copies. This subclass adds the scheduler, the GradScaler, the update count and every rank's
RNG state, and stores ``args`` as a plain dict so the file loads with ``weights_only=True``. A checkpoint
written at a stop signal also holds the position inside the epoch. Buffers (BatchNorm running statistics) differ
between ranks whenever each rank has normalised its own batches since they were last made equal (inside an epoch;
always with ``--dist-bn ''``): the file then holds every rank's, and each rank resumes with its own. Under
DeepSpeed the engine's own ``save_checkpoint`` writes the (partitioned) optimizer state into ``deepspeed/<tag>``
first, on every rank; ltsam's file then names that tag and holds the rest (RNG, SSE-SAM stage, EMA, scheduler,
position).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model
from torch import nn

from ltsam.optim import SAMFamily
from ltsam.train import distributed as dist_utils
from ltsam.train.distributed import set_rng_state
from ltsam.train.resume import CANDIDATES, DEEPSPEED_DIR, LAST, SCHEDULE_KEYS, TMP, ResumePoint

# optimizer flags whose values live in the param groups (which a loaded state_dict would otherwise restore)
GROUP_KEYS = {"weight_decay": "weight_decay", "momentum": "momentum", "opt_eps": "eps", "opt_betas": "betas"}


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch besides the modules."""

    epoch: int = 0          # next epoch to run
    num_updates: int = 0
    wall_s: float = 0.0     # seconds of training the last checkpoint carries, summed over resumed attempts
    skip: int = 0           # updates of ``epoch`` already done (a run resumed from a checkpoint at a signal)
    loss_sum: float = 0.0   # their summed loss, so the epoch's mean loss is the uninterrupted run's
    epoch_rng: dict | None = None  # this rank's RNG state when the epoch began, and when the run stopped in it
    batch_rng: dict | None = None


class Saver(CheckpointSaver):
    """``CheckpointSaver`` whose files hold the whole training state (see module docstring)."""

    def __init__(self, model: nn.Module, optimizer, args: argparse.Namespace, model_ema, scheduler, scaler,
                 train_state: TrainState, checkpoint_dir: Path, max_history: int) -> None:
        super().__init__(model, optimizer, args=args, model_ema=model_ema, checkpoint_dir=str(checkpoint_dir),
                         recovery_dir=str(checkpoint_dir), max_history=max_history)
        self.scheduler = scheduler
        self.scaler = scaler
        self.train_state = train_state
        self.pending_rng: list[dict] | None = None  # every rank's RNG state, gathered just before a save
        self.pending_buffers: list[dict] | None = None  # every rank's buffers, when they differ between ranks
        self.class_counts: list[int] | None = None  # what the class-aware pieces were built from, by content
        self.engine = None  # a DeepSpeed engine: its own files hold the optimizer state
        self.deepspeed_tag: str | None = None
        self.position: dict | None = None  # where inside an epoch a run stopped at a signal

    def _save(self, save_path: str, epoch: int, metric=None) -> None:
        state = {
            "epoch": epoch,
            "arch": self.args.model,
            "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, list,
                                                                                  dict, type(None)))},
            "state_dict": get_state_dict(self.model, unwrap_model),
            "optimizer": self.optimizer.state_dict() if self.engine is None else
            {"ltsam": self.optimizer.method_state()} if isinstance(self.optimizer, SAMFamily) else {},
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "num_updates": self.train_state.num_updates,
            "wall_s": self.train_state.wall_s,
            "rng": self.pending_rng,
            "rank_buffers": self.pending_buffers,
            "class_counts": self.class_counts,
            "position": self.position,
            "version": 2,
            "saver": self.state_dict(epoch, metric) if self.position is None else self.state_dict(),
        }
        if self.engine is not None:
            state["deepspeed"] = {"dir": DEEPSPEED_DIR, "tag": self.deepspeed_tag,
                                  "zero_stage": int(self.engine.zero_optimization_stage())}
        if self.model_ema is not None:
            state["state_dict_ema"] = get_state_dict(self.model_ema, unwrap_model)
        if self.scaler is not None:
            state["amp_scaler"] = self.scaler.state_dict()
        if metric is not None:
            state["metric"] = metric
        try:  # through a Python file: a full disk is then OSError ENOSPC, not torch's "unexpected pos 704 vs 598"
            with open(save_path, "wb") as file:
                torch.save(state, file)
        except (OSError, RuntimeError) as err:
            Path(save_path).unlink(missing_ok=True)
            raise CheckpointNotWritten(unwritten_message(Path(save_path), err)) from None

    def save_position(self, position: dict) -> None:
        """A checkpoint inside epoch ``position["epoch"]``: ``last`` only (atomically), no ranked copy."""
        self.position = position
        tmp, last = Path(self.checkpoint_dir) / TMP, Path(self.checkpoint_dir) / LAST
        try:
            self._save(str(tmp), position["epoch"] - 1)
            self._replace(str(tmp), str(last))
        finally:
            self.position = None


class CheckpointNotWritten(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota); the message says which file is still good."""


def unwritten_message(path: Path, err: Exception) -> str:
    """One sentence: what failed, the free space, and that ``last.pth.tar`` (replaced atomically) is intact."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    free = shutil.disk_usage(path.parent).free / 2**20
    last = path.parent / LAST
    kept = f"'{last}' still holds the previous checkpoint" if last.is_file() else "no earlier checkpoint exists"
    return (f"could not write checkpoint '{path}' ({reason}; {free:.0f} MiB free on its disk); {kept}: free "
            "space, then rerun with --resume auto")


def rank_buffers(model: nn.Module, model_ema) -> dict:
    """This rank's buffers by state-dict key, of the model and its EMA (which averages them too)."""
    local = {}
    for key, module in (("state_dict", model), ("state_dict_ema", model_ema)):
        if module is not None:
            module = unwrap_model(module)
            names = {name for name, _ in module.named_buffers()}
            local[key] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k in names}
    return local


def differing(every: list[dict]) -> list[dict] | None:
    """``every`` when some rank's buffers differ from rank 0's, else None (rank 0's, in ``state_dict``, serve)."""
    first = every[0]
    same = all(torch.equal(tensor, other[key][name]) for other in every[1:] for key, tensors in first.items()
               for name, tensor in tensors.items())
    return None if same else every


def existing_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for pattern in CANDIDATES for p in folder.glob(pattern))


def write_checkpoint(saver: Saver | None, engine, out: Path, state: TrainState, epoch: int, modules: tuple,
                     metric=None, stopped_at: int | None = None, samples_per_batch: int = 0) -> None:
    """Collective (every rank calls it): DeepSpeed's files first, then ltsam's on rank 0. ``modules``: the model
    and its EMA (or None), whose buffers each rank contributes. ``stopped_at``: the loader batches done in
    ``epoch`` (of ``samples_per_batch`` samples on each rank) when a stop signal ended it early; otherwise
    ``epoch`` is complete. A failed write ends every rank with ``CheckpointNotWritten``."""
    tag = None
    if engine is not None:  # every rank writes its own partition; the tag is complete before ltsam names it
        tag = f"epoch{epoch}" if stopped_at is None else f"epoch{epoch}-update{state.num_updates}"
        engine.save_checkpoint(str(out / DEEPSPEED_DIR), tag=tag, save_latest=False)
    states = dist_utils.gather((dist_utils.rng_state(), state.epoch_rng, rank_buffers(*modules)))
    failure = None
    if saver is not None:
        saver.pending_rng = [now for now, _, _ in states]
        saver.pending_buffers = differing([buffers for _, _, buffers in states])
        saver.deepspeed_tag = tag
        try:
            if stopped_at is None:
                saver.save_checkpoint(epoch, metric=metric)
            else:
                saver.save_position({"epoch": epoch, "batch": stopped_at, "samples": stopped_at * samples_per_batch,
                                     "loss_sum": state.loss_sum, "epoch_rng": [start for _, start, _ in states]})
        except CheckpointNotWritten as err:
            failure = err
        if engine is not None and failure is None:
            prune_deepspeed_tags(out, tag, saver)
    # instead of a barrier: the checkpoint is on disk (or known lost) before any rank can go on, fail or exit
    failed = torch.tensor([float(failure is not None)], device=next(modules[0].parameters()).device)
    if dist_utils.all_reduce_sum(failed).item():
        raise failure or CheckpointNotWritten("rank 0 could not write the checkpoint (its message says why)")


def prune_deepspeed_tags(out: Path, current: str, saver: Saver) -> None:
    """Delete DeepSpeed tags no ltsam checkpoint refers to: keep the newest, the ranked copies' and the best."""
    keep = {current, f"epoch{saver.best_epoch}"} | {f"epoch{p.name.split('-')[1].split('.')[0]}"
                                                   for p in out.glob("checkpoint-*.pth.tar")}
    for tag_dir in (out / DEEPSPEED_DIR).iterdir():
        if tag_dir.is_dir() and tag_dir.name not in keep:
            shutil.rmtree(tag_dir, ignore_errors=True)


def load_training_state(point: ResumePoint, model: nn.Module, optimizer, scheduler, scaler, model_ema,
                        saver: Saver | None, rank: int, engine=None) -> TrainState:
    """Restore every piece ``Saver`` wrote; returns the epoch (and update inside it) to start from.

    Under DeepSpeed, the engine loads its own tag (weights and partitioned optimizer state). Overridden
    schedule keys rebuild the lr at the current epoch of the new schedule instead of restoring the old one.
    """
    ckpt, path = point.data, point.path
    written_by = ckpt.get("deepspeed")  # resume.check_config made sure it matches ``engine``
    fresh_groups = [dict(g) for g in optimizer.param_groups]
    if engine is not None:
        stage = int(engine.zero_optimization_stage())
        if stage != written_by["zero_stage"]:
            raise SystemExit(f"ltsam train: '{path}' was written at ZeRO stage {written_by['zero_stage']}, this run "
                             f"uses stage {stage}; resume with --zero-stage {written_by['zero_stage']}")
        loaded, _ = engine.load_checkpoint(str(path.parent / written_by["dir"]), tag=written_by["tag"],
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise SystemExit(f"ltsam train: DeepSpeed could not load '{path.parent / written_by['dir']}/"
                             f"{written_by['tag']}' named by '{path}'; resume from another checkpoint")
        if isinstance(optimizer, SAMFamily):
            optimizer.load_method_state(ckpt["optimizer"].get("ltsam", {}))
            # DeepSpeed loaded the base optimizer, which made new param groups: the wrapper (and through it
            # timm's scheduler) must set the lr on those, as SAMFamily.load_state_dict does itself
            optimizer.param_groups, optimizer.state = optimizer.base_optimizer.param_groups, \
                optimizer.base_optimizer.state
    else:
        unwrap_model(model).load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
    restore_overridden_groups(optimizer, fresh_groups, point.overridden)
    if scaler is not None and "amp_scaler" in ckpt:
        scaler.load_state_dict(ckpt["amp_scaler"])
    if model_ema is not None:
        if "state_dict_ema" not in ckpt:
            raise SystemExit(f"ltsam train: '{path}' has no EMA weights but --model-ema is on")
        unwrap_model(model_ema).load_state_dict(ckpt["state_dict_ema"])
    own_buffers(ckpt.get("rank_buffers"), rank, path, model, model_ema)
    position = ckpt.get("position") or {}
    state = TrainState(epoch=int(position.get("epoch", int(ckpt["epoch"]) + 1)),
                       num_updates=int(ckpt.get("num_updates", 0)), wall_s=float(ckpt.get("wall_s", 0.0)),
                       skip=int(position.get("batch", 0)), loss_sum=float(position.get("loss_sum", 0.0)))
    if scheduler is not None and SCHEDULE_KEYS & point.overridden.keys():
        scheduler.step(state.epoch)  # the new schedule, where the run stands; not the old one's lr
        scheduler.step_update(state.num_updates)
    elif scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt.get("rng") or []
    if rank < len(rng):
        if state.skip:  # restored inside the loop, after the epoch's batches are replayed
            state.epoch_rng, state.batch_rng = position["epoch_rng"][rank], rng[rank]
        else:
            set_rng_state(rng[rank])
    elif rng:
        raise SystemExit(f"ltsam train: '{path}' holds RNG states of {len(rng)} ranks; rank {rank} cannot resume "
                         "exactly (resume with the same number of processes)")
    same_folder = saver is not None and path.parent.resolve() == Path(saver.checkpoint_dir).resolve()
    if same_folder and ckpt.get("saver") is not None:
        saver.load_state_dict(ckpt["saver"])
    return state


def own_buffers(every: list[dict] | None, rank: int, path: Path, model: nn.Module, model_ema) -> None:
    """This rank's own buffers, where the checkpoint holds every rank's (they differed when it was written)."""
    if not every:
        return
    if rank >= len(every):
        raise SystemExit(f"ltsam train: '{path}' holds the BatchNorm statistics of {len(every)} ranks; rank {rank} "
                         "cannot resume exactly (resume with the same number of processes)")
    for key, module in (("state_dict", model), ("state_dict_ema", model_ema)):
        if module is not None and key in every[rank]:
            unwrap_model(module).load_state_dict(every[rank][key], strict=False)


def restore_overridden_groups(optimizer, fresh_groups: list[dict], overridden: dict) -> None:
    """A loaded optimizer state brings back the old param-group values: put this run's back for the optimizer
    flags the user allowed to change (``--resume-override weight_decay`` must change the weight decay)."""
    names = {GROUP_KEYS[k] for k in overridden if k in GROUP_KEYS}
    if "opt_kwargs" in overridden:
        names |= set(overridden["opt_kwargs"][1])
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update({k: fresh[k] for k in names if k in fresh})
