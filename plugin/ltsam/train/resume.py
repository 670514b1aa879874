"""Which checkpoint a run resumes from, and whether it may.

* Reading: a truncated, empty or foreign file given to ``--resume`` ends in one sentence naming it.
* ``--resume auto``: every checkpoint file in the output folder is a candidate, including the ``tmp.pth.tar``
  timm's saver leaves when a crash falls between its unlink of ``last.pth.tar`` and the rename; of those that load
  and are complete (their DeepSpeed files too) the one furthest into training (updates, then epoch) is taken, by
  what the files hold, never by modification time (a copy without ``-p`` scrambles those); the files passed over
  are named.
* Configuration: the checkpoint's ``args`` are compared with this run's; every key that shapes training must
  match unless ``--resume-override`` names it, so a resumed run never trains a mix of two configurations. The
  class counts are compared by content (the file may have moved), not by ``--class-counts``' path.
* Position: a checkpoint written inside an epoch records the samples each rank had trained; a resume with another
  ``--batch-size`` or ``--grad-accum-steps`` (``--resume-override``) skips exactly those samples, or is refused
  when they do not end on an update of the new size.
"""

from __future__ import annotations

import argparse
import difflib
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

TMP, LAST = "tmp.pth.tar", "last.pth.tar"
CANDIDATES = (TMP, LAST, "checkpoint-*.pth.tar", "model_best.pth.tar")
REQUIRED_KEYS = ("state_dict", "optimizer", "epoch")
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint tags, next to ltsam's files

# flags that do not change what is trained: where things are, what is printed or evaluated, how often a
# checkpoint is kept, the backend that runs the same update (checked on its own in ``load_training_state``)
NOT_TRAINING_CONFIG = frozenset({
    "config", "output", "experiment", "resume", "resume_override", "overwrite", "checkpoint_hist", "log_interval",
    "no_progress", "eval_interval", "tta", "tte", "many_shot", "few_shot", "stop_epoch", "data_dir", "val_split",
    "val_list",
    "validation_batch_size", "device", "distributed", "rank", "local_rank", "dist_url", "deepspeed_config",
    "zero_stage",
})
# overriding one of these rebuilds the lr schedule for the new values at the current epoch
SCHEDULE_KEYS = frozenset({"epochs", "sched", "sched_on_updates", "lr", "lr_base", "lr_base_size", "lr_base_scale",
                           "warmup_lr", "min_lr", "warmup_epochs", "cooldown_epochs", "decay_epochs",
                           "decay_milestones", "decay_rate"})


@dataclass
class ResumePoint:
    """A checkpoint that loaded and is complete, with the differing keys the user allowed."""

    path: Path
    data: dict
    overridden: dict[str, tuple] = field(default_factory=dict)  # key -> (checkpoint's value, this run's)


class UnreadableCheckpoint(Exception):
    """Why a checkpoint file cannot serve a resume, in words that fit in one sentence."""


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, or ``UnreadableCheckpoint`` saying what is wrong with the file."""
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint("is empty (0 bytes: its write was cut short)")
    with path.open("rb") as file:
        zipped = file.read(4) == b"PK\x03\x04"  # torch.save's format: a zip archive
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's text here would suggest an unsafe load: never pass it on
        found = re.search(r"GLOBAL ([\w.]+)( whose module [\w.]+ is blocked)?", str(err))
        if found:
            raise UnreadableCheckpoint("holds pickled Python objects beyond tensors and numbers (torch's safe load "
                                       f"refuses it: unsupported GLOBAL {found.group(1)}{found.group(2) or ''}), "
                                       "so it is not an ltsam training checkpoint") from None
        raise UnreadableCheckpoint("is not a PyTorch checkpoint (unrecognised bytes)") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError):
        if zipped:
            raise UnreadableCheckpoint("is truncated or damaged (its zip archive is incomplete)") from None
        raise UnreadableCheckpoint("is not a PyTorch checkpoint (unrecognised bytes)") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise UnreadableCheckpoint(f"is not an ltsam training checkpoint (no {', '.join(missing)})")
    engine = data.get("deepspeed")
    if engine is not None and not (path.parent / engine["dir"] / engine["tag"]).is_dir():
        raise UnreadableCheckpoint(f"refers to DeepSpeed state '{engine['dir']}/{engine['tag']}', which is missing")
    return data


def progress(data: dict) -> tuple[int, int]:
    """How far into training a checkpoint is: (updates, epochs started); a stop inside an epoch counts it."""
    position = data.get("position") or {}
    return int(data.get("num_updates", 0)), int(position.get("epoch", int(data["epoch"]) + 1))


def find_newest_complete(folder: Path) -> tuple[ResumePoint | None, list[str]]:
    """The checkpoint in ``folder`` furthest into training (``progress``) that loads and is complete, and
    ``name: why`` of each file passed over as unreadable. Ties (a ranked copy and ``last`` are one state) go to
    ``tmp``, then ``last``, then by name. Every candidate is read once, one at a time."""
    files = {p for pattern in CANDIDATES for p in folder.glob(pattern) if p.is_file()}
    preference = {TMP: 0, LAST: 1}
    best, best_key, skipped = None, None, []
    for path in sorted(files, key=lambda p: (preference.get(p.name, 2), p.name)):
        try:
            data = read_checkpoint(path)
        except UnreadableCheckpoint as err:
            skipped.append(f"'{path.name}' {err}")
            continue
        if best_key is None or progress(data) > best_key:
            best, best_key = ResumePoint(path, data), progress(data)
    return best, skipped


def resolve_resume(resume: str | None, folder: Path) -> tuple[ResumePoint | None, list[str]]:
    """``auto``: the folder's newest complete checkpoint (a fresh start when there is none); a path must be one."""
    if not resume:
        return None, []
    if resume == "auto":
        return find_newest_complete(folder) if folder.is_dir() else (None, [])
    path = Path(resume)
    if not path.is_file():
        raise SystemExit(f"ltsam train: --resume '{path}' does not exist (use --resume auto for the output folder's "
                         "newest complete checkpoint)")
    try:
        return ResumePoint(path, read_checkpoint(path)), []
    except UnreadableCheckpoint as err:
        raise SystemExit(f"ltsam train: --resume '{path}' {err}; pass a complete checkpoint of an ltsam run "
                         "(last.pth.tar or checkpoint-N.pth.tar), or --resume auto to take the newest complete one "
                         "in the output folder") from None


def _plain(value):
    """Tuples as lists, so a value read back from a checkpoint compares equal to the one parsed now."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def training_config(args: dict) -> dict:
    """The keys of ``args`` that shape training (all but ``NOT_TRAINING_CONFIG``): new flags count by default."""
    return {k: _plain(v) for k, v in args.items() if k not in NOT_TRAINING_CONFIG}


def check_config(point: ResumePoint, args: argparse.Namespace, class_counts: list[int]) -> None:
    """Refuse a resume whose training configuration differs, naming each key and both values, unless
    ``--resume-override`` lists the key; allowed differences are recorded in ``point.overridden``.
    ``class_counts``: this run's, compared with the checkpoint's by content where it records them."""
    check_backend(point, args)
    saved, now = training_config(point.data.get("args") or {}), training_config(vars(args))
    if point.data.get("class_counts") is not None:  # the counts themselves, not the path of the file holding them
        saved["class_counts"], now["class_counts"] = list(point.data["class_counts"]), list(class_counts)
    allowed = {k.replace("-", "_") for k in args.resume_override or []}
    unknown = sorted(allowed - now.keys())
    if unknown:
        hints = [f"'{k}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(k, sorted(now), n=1))
                             else "") for k in unknown]
        raise SystemExit(f"ltsam train: --resume-override {', '.join(hints)}: not a training setting a checkpoint "
                         "records")
    differ = {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]}
    refused = {k: v for k, v in differ.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {shown(k, old, new)}" for k, (old, new) in refused.items())
        raise SystemExit(f"ltsam train: --resume '{point.path}' was trained with another configuration ({listed}); "
                         "resuming would mix two runs. Resume with the checkpoint's values, start a new run "
                         f"(--experiment), or allow the change with --resume-override {' '.join(refused)}")
    point.overridden = {k: v for k, v in differ.items() if k in allowed}
    check_position(point, args)


def shown(key: str, old, new) -> str:
    """Both values of a differing key; class counts (thousands of numbers) by their first difference."""
    if key != "class_counts" or not isinstance(old, list) or not isinstance(new, list):
        return f"{old!r} in the checkpoint, {new!r} now"
    if len(old) != len(new):
        return f"{len(old)} classes in the checkpoint, {len(new)} now"
    first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    return (f"the counts differ in {sum(a != b for a, b in zip(old, new))} of {len(old)} classes (class {first}: "
            f"{old[first]} in the checkpoint, {new[first]} now)")


def check_position(point: ResumePoint, args: argparse.Namespace) -> None:
    """A checkpoint inside an epoch and an overridden batch size or accumulation: the samples each rank trained
    in that epoch become loader batches of the new size (``position["batch"]``), or the resume is refused."""
    position = point.data.get("position")
    changed = {"batch_size", "grad_accum_steps"} & point.overridden.keys()
    if not position or not changed:
        return
    saved = point.data.get("args") or {}
    samples = int(position.get("samples", position["batch"] * saved.get("batch_size", args.batch_size)))
    batch = samples // args.batch_size
    if args.dataset == "shards" or samples % args.batch_size or batch % args.grad_accum_steps:
        old = f"-b {saved.get('batch_size')} --grad-accum-steps {saved.get('grad_accum_steps', 1)}"
        why = ("the shard stream's order depends on the batch size" if args.dataset == "shards" else
               f"they do not end on an update of -b {args.batch_size} x --grad-accum-steps {args.grad_accum_steps}")
        raise SystemExit(f"ltsam train: --resume-override {' '.join(sorted(changed))}: '{point.path}' was written "
                         f"{samples} samples per process into epoch {position['epoch']}, and {why}; resume with "
                         f"{old} and --stop-epoch {position['epoch'] + 1} to finish that epoch, then change it")
    point.data["position"] = {**position, "batch": batch}


def check_backend(point: ResumePoint, args: argparse.Namespace) -> None:
    """DeepSpeed keeps the optimizer state in its own partitioned files, a plain run in ltsam's file: neither
    can take the other's, so a move between them is refused (before DeepSpeed starts) with the way to resume."""
    written_by = point.data.get("deepspeed")
    if args.deepspeed_config and written_by is None:
        raise SystemExit(f"ltsam train: --resume '{point.path}' was written without DeepSpeed: its optimizer state "
                         "is a plain PyTorch one that a DeepSpeed engine cannot take; resume it without "
                         "--deepspeed-config (the update is the same), or start a new DeepSpeed run")
    if not args.deepspeed_config and written_by is not None:
        raise SystemExit(f"ltsam train: --resume '{point.path}' was written by DeepSpeed (ZeRO stage "
                         f"{written_by['zero_stage']}): its optimizer state is in DeepSpeed's files "
                         f"('{written_by['dir']}/{written_by['tag']}'); resume it with --deepspeed-config and "
                         f"--zero-stage {written_by['zero_stage']}")


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot take this run's files (created if missing), or None when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"{err.strerror or type(err).__name__}{f': {err.filename}' if err.filename else ''}"
    return None
