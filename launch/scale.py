"""The batch / learning-rate rule applied when a recipe runs on another world size than it was written for.

A recipe's `global_batch_size` (or per-process `program.args.batch_size`) and `program.args.lr` are tuned for
one world size. Its optional `scale:` section says what to keep when the world size changes:

- `keep: global_batch`: the global batch stays, the per-process batch is divided over the world (and over
  `program.args.grad_accum_steps` micro-batches); the lr does not change, since the update does not.
- `keep: per_gpu_batch`: the per-process batch stays, the global batch grows with the world and the lr follows
  `lr_scale`: `linear` (lr x new/old global batch), `sqrt` (x its square root) or `none`.

`scale.reference_world_size` is the world size the batch and lr were written for. Without a `scale:` section
the launcher does what it always did: `global_batch_size` is split over the world, a per-process batch_size is
passed as is, the lr as written. `scale_lr` and `default_lr_scale` are also the rule `ltsam train` applies
when it derives `--lr` from `--lr-base` (timm's train.py rule), so launcher and trainer scale the same way.
This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ltsam_launch.recipe import Recipe

KEEP = ("global_batch", "per_gpu_batch")
LR_SCALES = ("linear", "sqrt", "none")
SECTION = "scale"


def default_lr_scale(opt: str) -> str:
    """timm's default: sqrt for Adam/LAMB-like optimizers, linear otherwise."""
    return "sqrt" if any(name in opt.lower() for name in ("ada", "lamb")) else "linear"


def scale_lr(lr: float, batch: int, reference_batch: int, rule: str) -> float:
    """The lr for global batch `batch`, given `lr` at `reference_batch`."""
    if rule not in LR_SCALES:
        raise ValueError(f"lr scale rule {rule!r}: expected one of {', '.join(LR_SCALES)}")
    ratio = batch / reference_batch
    return lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[rule]


@dataclass(frozen=True)
class Scaled:
    """What the program gets at this world size: per-process micro-batch, lr, and a line for the dry run."""

    per_process: int | None  # None: the recipe's own batch_size (or the program's default) as written
    total: int | None  # the global batch per optimizer step, when known
    lr: float | None  # None: the recipe's lr as written (or the program's own default)
    note: str


def _accumulation(recipe: Recipe) -> int:
    steps = recipe.get("program.args.grad_accum_steps") or 1
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise recipe.error("program.args.grad_accum_steps", "expected an int >= 1")
    return steps


def resolve(recipe: Recipe, world: int | None) -> Scaled:
    """Apply the recipe's rule at `world` processes; a RecipeError names the key when it cannot be applied."""
    total, per_process = recipe.get("global_batch_size"), recipe.get("program.args.batch_size")
    if total is not None and per_process is not None:
        raise recipe.error("program.args.batch_size", "set either global_batch_size (split over processes) "
                                                      "or the per-process batch_size, not both")
    accum = _accumulation(recipe)
    cfg = recipe.get(SECTION) or {}
    lr = recipe.get("program.args.lr")
    if not cfg:
        return _unscaled(recipe, world, total, per_process, accum, lr)
    reference = cfg.get("reference_world_size")
    if reference is None:
        raise recipe.error(f"{SECTION}.reference_world_size", "set the world size the recipe's batch and lr are "
                                                             "written for", value=None)
    if world is None:
        raise recipe.error(SECTION, "needs a fixed world size (the launcher's is elastic or 'auto')")
    if total is None and per_process is None:
        raise recipe.error(SECTION, "needs global_batch_size or program.args.batch_size to scale", value=cfg)
    keep = cfg.get("keep", "global_batch")
    reference_total = total if total is not None else per_process * reference * accum
    micro = f" x {accum} micro-batches" if accum > 1 else ""
    per_gpu = reference_total // (reference * accum)
    if keep == "per_gpu_batch" and reference_total % (reference * accum):
        raise recipe.error("global_batch_size", f"does not divide by the reference world size {reference}{micro}",
                           value=reference_total)
    new_total = reference_total if keep == "global_batch" else per_gpu * world * accum
    if new_total % (world * accum):
        raise recipe.error("global_batch_size", f"does not divide by the world size {world}{micro}", value=new_total)
    rule = cfg.get("lr_scale") or default_lr_scale(str(recipe.get("program.args.opt") or "sgd"))
    if lr is None and keep == "per_gpu_batch" and rule != "none":
        raise recipe.error(f"{SECTION}.lr_scale", "needs program.args.lr, the lr at the reference world size "
                                                  "(without it the program derives its own lr)", value=rule)
    new_lr = None if lr is None else float(f"{scale_lr(lr, new_total, reference_total, rule):.12g}")
    kept = f"global batch {new_total} kept" if keep == "global_batch" else \
        f"per-process batch {per_gpu} kept, global batch {reference_total} -> {new_total}"
    if lr is None:
        lr_text = "lr: the program's default"
    elif keep == "global_batch":
        lr_text = f"lr {lr} kept (the update does not change)"
    else:
        lr_text = f"lr {lr} -> {new_lr} ({rule}, global batch x{new_total / reference_total:g})"
    note = (f"scale: world size {world} (recipe written for {reference}); {kept} = "
            f"{new_total // (world * accum)} per process x {world} process(es) x {accum} micro-batch(es); {lr_text}")
    return Scaled(new_total // (world * accum), new_total, new_lr, note)


def _unscaled(recipe: Recipe, world: int | None, total: int | None, per_process: int | None, accum: int,
              lr: float | None) -> Scaled:
    """No `scale:` section: the global batch is split over the world, a per-process batch passes as is."""
    lr_text = "lr: the program's default" if lr is None else f"lr {lr} as written"
    if total is None:
        shape = f"{per_process} per process" if per_process else "the program's batch per process"
        known = shape + (f" x {world} process(es) x {accum} micro-batch(es)" if world else " x an elastic world")
        global_batch = per_process * world * accum if per_process and world else None
        prefix = f"global batch {global_batch} = " if global_batch else ""
        return Scaled(None, global_batch, None,
                      f"scale: world size {world or 'elastic'}; {prefix}{known}; no scale: section, {lr_text}")
    if world is None:
        raise recipe.error("global_batch_size", "needs a fixed world size (the launcher's is elastic or 'auto')")
    if total % (world * accum):
        micro = f" x {accum} micro-batches" if accum > 1 else ""
        raise recipe.error("global_batch_size", f"does not divide by the world size {world}{micro}")
    return Scaled(total // (world * accum), total, None,
                  f"scale: world size {world}; global batch {total} = {total // (world * accum)} per process x "
                  f"{world} process(es) x {accum} micro-batch(es); no scale: section, {lr_text}")
