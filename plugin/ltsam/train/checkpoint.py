"""Training checkpoints: timm's ``CheckpointSaver`` rotation plus everything an exact resume needs.

timm's saver already writes ``tmp.pth.tar`` and ``os.replace``-s it onto ``last.pth.tar`` (atomic), then
hard-links ranked copies. This subclass adds the scheduler, the GradScaler, the update count and every rank's
RNG state, and stores ``args`` as a plain dict so the file loads with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model
from torch import nn

from ltsam.train.distributed import set_rng_state

LAST = "last.pth.tar"
CHECKPOINT_GLOB = ("last.pth.tar", "checkpoint-*.pth.tar", "model_best.pth.tar")


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch besides the modules."""

    epoch: int = 0          # next epoch to run
    num_updates: int = 0
    wall_s: float = 0.0     # seconds of training the last checkpoint carries, summed over resumed attempts


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

    def _save(self, save_path: str, epoch: int, metric=None) -> None:
        state = {
            "epoch": epoch,
            "arch": self.args.model,
            "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, list,
                                                                                  dict, type(None)))},
            "state_dict": get_state_dict(self.model, unwrap_model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "num_updates": self.train_state.num_updates,
            "wall_s": self.train_state.wall_s,
            "rng": self.pending_rng,
            "version": 2,
            "saver": self.state_dict(epoch, metric),
        }
        if self.model_ema is not None:
            state["state_dict_ema"] = get_state_dict(self.model_ema, unwrap_model)
        if self.scaler is not None:
            state["amp_scaler"] = self.scaler.state_dict()
        if metric is not None:
            state["metric"] = metric
        torch.save(state, save_path)


def existing_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for pattern in CHECKPOINT_GLOB for p in folder.glob(pattern))


def resolve_resume(resume: str | None, folder: Path) -> Path | None:
    """``auto``: the folder's ``last.pth.tar`` if any (a fresh start otherwise); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        last = folder / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise SystemExit(f"ltsam train: --resume '{path}' does not exist (use --resume auto for the output folder's "
                         "last checkpoint)")
    return path


def load_training_state(path: Path, model: nn.Module, optimizer, scheduler, scaler, model_ema, saver: Saver | None,
                        rank: int) -> TrainState:
    """Restore every piece ``Saver`` wrote; returns the epoch to start from and the update count."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("state_dict", "optimizer", "epoch") if k not in ckpt]
    if missing:
        raise SystemExit(f"ltsam train: '{path}' is not an ltsam training checkpoint (no {', '.join(missing)})")
    unwrap_model(model).load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and "amp_scaler" in ckpt:
        scaler.load_state_dict(ckpt["amp_scaler"])
    if model_ema is not None:
        if "state_dict_ema" not in ckpt:
            raise SystemExit(f"ltsam train: '{path}' has no EMA weights but --model-ema is on")
        unwrap_model(model_ema).load_state_dict(ckpt["state_dict_ema"])
    rng = ckpt.get("rng") or []
    if rank < len(rng):
        set_rng_state(rng[rank])
    elif rng:
        raise SystemExit(f"ltsam train: '{path}' holds RNG states of {len(rng)} ranks; rank {rank} cannot resume "
                         "exactly (resume with the same number of processes)")
    same_folder = saver is not None and path.parent.resolve() == Path(saver.checkpoint_dir).resolve()
    if same_folder and ckpt.get("saver") is not None:
        saver.load_state_dict(ckpt["saver"])
    return TrainState(epoch=int(ckpt["epoch"]) + 1, num_updates=int(ckpt.get("num_updates", 0)),
                      wall_s=float(ckpt.get("wall_s", 0.0)))
