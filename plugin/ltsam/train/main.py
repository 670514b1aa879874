"""``ltsam train``: composes timm's model, optimizer, scheduler, EMA and checkpoint pieces around the loop.

Order per epoch: train, equalise BatchNorm buffers across ranks, evaluate (every ``--eval-interval``), step the
scheduler, then checkpoint; a checkpoint therefore holds the exact state at the start of the next epoch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from rich import get_console
from rich.console import Console
from timm.optim import create_optimizer_v2, get_optimizer_class, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, distribute_bn, random_seed, update_summary
from timm.utils import summary as timm_summary
from torch.nn.parallel import DistributedDataParallel

import yaml
from ltsam.losses import create_loss
from ltsam.metrics import LongTailAccuracy, plot_per_class, results_table, save_report
from ltsam.optim import SAMFamily
from ltsam.timm_needs import unmet
from ltsam.train import checkpoint as ckpt
from ltsam.train import data as train_data
from ltsam.train import distributed as dist_utils
from ltsam.train import preempt
from ltsam.train import resume as resume_point
from ltsam.train.checkpoint import LAST, Saver, TrainState, existing_checkpoints, load_training_state, write_checkpoint
from ltsam.train.loop import NonFiniteLoss, StepContext, evaluate, progress_bar, train_one_epoch, updates_per_epoch
from ltsam.train.model import build_model
from ltsam.tte import tte_transform
from ltsam_common import requeue
from ltsam_common import train_args as cli_args
from ltsam_common.train_args import option

SUMMARY, RESULTS, PLOT, ARGS = "summary.csv", "results.json", "per_class.png", "args.yaml"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ltsam train`` and ``python -m ltsam.train``; returns the exit status."""
    args = cli_args.parse_args(argv)
    if (too_old := unmet("ltsam train")) is not None:  # before anything starts, not at the first resume or save
        raise SystemExit(too_old)
    device = dist_utils.setup(args)
    console = Console(stderr=True, quiet=args.rank != 0, soft_wrap=True)
    try:
        train(args, device, console)
    except NonFiniteLoss as err:
        print(f"ltsam train (rank {args.rank}): {err}", file=sys.stderr)
        return 3
    except preempt.Preempted as err:
        print(f"ltsam train (rank {args.rank}): {err}", file=sys.stderr)
        requeue.mark_requeue()  # torchrun exits 1 for our 75: the SLURM script also looks for this file
        return preempt.REQUEUE_EXIT
    except ckpt.CheckpointNotWritten as err:
        print(f"ltsam train (rank {args.rank}): {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second SIGINT while stopping, or one outside the training loop
        print(f"ltsam train (rank {args.rank}): interrupted by SIGINT; nothing more was written (a first SIGINT "
              "during training stops after the update in flight and writes a checkpoint)", file=sys.stderr)
        return 130
    finally:
        dist_utils.shutdown()
    return 0


def prepare_output(args: argparse.Namespace, primary: bool) -> tuple[Path, resume_point.ResumePoint | None]:
    """The run folder and the checkpoint to resume; refuses a folder holding another run's checkpoints, or
    one this run cannot write."""
    out = Path(args.output) / cli_args.experiment_name(args)
    if args.resume is None and dist_utils.restarted():
        args.resume = "auto"  # a group torchrun restarted continues from its last checkpoint by itself
    resume, passed_over = resume_point.resolve_resume(args.resume, out)
    if passed_over and resume is None:
        raise SystemExit(f"ltsam train: --resume auto found no complete checkpoint in '{out}': "
                         f"{'; '.join(passed_over)}; pass {option('resume', 'FILE')} with a good file, or "
                         f"{option('overwrite')} to start afresh")
    if primary and passed_over:
        print(f"ltsam train: --resume auto passed over {'; '.join(passed_over)}", file=sys.stderr)
    found = existing_checkpoints(out) if out.is_dir() else []
    if found and not args.resume and not args.overwrite:
        differ = differing_settings(args, out / ARGS)
        if differ == []:
            whose, other = f"a checkpoint of this run ({found[0].name}, same configuration)", ""
        else:
            listed = f"; its {ARGS} differs in {', '.join(differ)}" if differ else ""
            whose = f"another run's checkpoint ({found[0].name}{listed})"
            other = f", or name another folder with {option('experiment', 'NAME')}"
        raise SystemExit(f"ltsam train: output folder '{out}' holds {whose}; continue it with "
                         f"{option('resume', 'auto')} or start afresh with {option('overwrite')}{other}")
    dist_utils.barrier()  # every rank has looked before rank 0 clears anything
    unwritable = resume_point.unwritable(out) if primary else None
    if dist_utils.all_reduce_sum(torch.tensor([float(unwritable is not None)], device=args.device)).item():
        raise SystemExit(f"ltsam train: cannot write the output folder '{out}' ({unwritable or 'see rank 0'}); "
                         f"choose a writable {option('output', 'DIR')}")
    if primary:
        if args.overwrite:
            for path in found + [out / SUMMARY, out / RESULTS]:
                path.unlink(missing_ok=True)
    dist_utils.barrier()
    return out, resume


def differing_settings(args: argparse.Namespace, saved_args: Path) -> list[str] | None:
    """The training settings in which the folder's saved configuration differs from this run's (unset values
    of this run, derived later, compare equal), or None when the folder has no readable one."""
    try:
        saved = yaml.safe_load(saved_args.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    before, now = resume_point.training_config(saved), resume_point.training_config(vars(args))
    return sorted(k for k, v in now.items() if v is not None and k in before and before[k] != v)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, counts_file: Path) -> torch.optim.Optimizer:
    """timm's factory with the flags; the SAM family also gets the class counts, ``--eta`` and ``--epochs``
    (``train`` replaces the epochs by the scheduled total once the scheduler has counted it)."""
    kwargs = {**optimizer_kwargs(cfg=args), **args.opt_kwargs}
    try:
        opt_class = get_optimizer_class(args.opt.lower().split("_")[-1], bind_defaults=False)
    except ValueError as err:
        raise SystemExit(f"ltsam train: --opt {args.opt}: {err}") from err
    sam = isinstance(opt_class, type) and issubclass(opt_class, SAMFamily)
    accepted = {n for klass in opt_class.__mro__[:-2] for n in inspect.signature(klass.__init__).parameters} \
        if sam else set()
    if sam:
        kwargs.setdefault("epochs", args.epochs)
    if "class_counts" in accepted:
        kwargs.setdefault("class_counts", str(counts_file))
    if args.eta is not None:
        if "eta" not in accepted:
            raise SystemExit(f"ltsam train: --eta (the tail threshold) applies to imbsam and ssesam, "
                             f"not --opt {args.opt}")
        kwargs.setdefault("eta", args.eta)
    kwargs.update(radius_schedule_kwargs(args, sam))
    try:
        return create_optimizer_v2(weight_decay_params(args, model, kwargs), **kwargs)
    except (TypeError, ValueError) as err:
        message = str(err)
        if args.rho_sched != "none":  # the flags as typed
            message = re.sub(r"\brho_[a-z_]+", lambda m: "--" + m.group(0).replace("_", "-"), message)
        raise SystemExit(f"ltsam train: cannot build --opt {args.opt}: {message}") from err


def radius_schedule_kwargs(args: argparse.Namespace, sam: bool) -> dict:
    """``--rho-sched`` and its options as the SAM-family optimizer's own ``rho_*`` options: the one path that
    train.py's ``--opt-kwargs rho_sched=...`` takes too (``set_epoch`` applies them)."""
    if args.rho_sched == "none":
        return {}
    if not sam:
        raise SystemExit(f"ltsam train: --opt {args.opt}: --rho-sched={args.rho_sched} schedules SAM-family radii "
                         "(rho, head_rho, tail_rho); plain optimizers have none")
    options = dict(rho_sched=args.rho_sched, rho_decay_epochs=args.rho_decay_epochs,
                   rho_decay_milestones=args.rho_decay_milestones or (), rho_decay_rate=args.rho_decay_rate,
                   rho_min=args.rho_min)
    twice = sorted(set(options) & set(args.opt_kwargs))
    if twice:
        raise SystemExit(f"ltsam train: --opt-kwargs {twice[0]} and --rho-sched both schedule the radii; use one")
    return options


def weight_decay_params(args: argparse.Namespace, model: torch.nn.Module, kwargs: dict):
    """What timm's factory gets: the model (timm groups: no decay on 1-d parameters and ``no_weight_decay()``),
    or for ``--wd-profile official`` the plain parameter list, which the official code's
    ``SGD(model.parameters(), weight_decay=wd)`` decays in full."""
    if args.wd_profile == "timm":
        return model
    grouping = sorted(k for k in ("filter_bias_and_bn", "layer_decay", "param_group_fn") if k in kwargs)
    if grouping:
        raise SystemExit(f"ltsam train: --opt-kwargs {grouping[0]} groups parameters, --wd-profile official "
                         "decays every parameter; use one of them")
    return [p for p in model.parameters() if p.requires_grad]


def deepspeed_clipping(args: argparse.Namespace, config: dict, path: Path) -> float:
    """ds_config ``gradient_clipping`` from ``--clip-grad``: DeepSpeed clips the global norm of the gradient it
    steps with, which for the SAM family is G, as ``ltsam train`` and ltsam.timm clip without DeepSpeed."""
    if args.clip_grad is not None and args.clip_mode != "norm":
        raise SystemExit(f"ltsam train: --clip-mode {args.clip_mode}: DeepSpeed clips by norm only")
    given = config.get("gradient_clipping")
    if given is not None and args.clip_grad is not None and float(given) != args.clip_grad:
        raise SystemExit(f"ltsam train: --clip-grad {args.clip_grad} and --deepspeed-config '{path}' "
                         f"gradient_clipping {given} disagree; set one of them")
    return float(args.clip_grad if args.clip_grad is not None else given or 0.0)


def start_deepspeed(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Wrap model and optimizer in a DeepSpeed engine built from ``--deepspeed-config`` (+ ``--zero-stage``).

    The batch size, accumulation (1) and clipping come from ltsam's own flags, so the update is the one the
    same flags give without DeepSpeed. DeepSpeed's own checkpoint files hold its (partitioned) optimizer state
    (``checkpoint.write_checkpoint``), so every stage resumes.
    """
    from ltsam.optim.deepspeed import DeepSpeedConfigError, initialize

    path = Path(args.deepspeed_config)
    if not path.is_file():
        raise SystemExit(f"ltsam train: --deepspeed-config '{path}' does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"ltsam train: --deepspeed-config '{path}' is not valid JSON: {err}") from err
    if args.zero_stage is not None:
        config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": args.zero_stage}
    if args.grad_accum_steps > 1:
        raise SystemExit("ltsam train: --grad-accum-steps with --deepspeed-config is not supported: the SAM-family "
                         "step goes through DeepSpeed as one whole-batch gradient; run without DeepSpeed (torchrun)")
    if args.amp and not config.get("bf16", {}).get("enabled"):
        raise SystemExit("ltsam train: under DeepSpeed set precision in the ds_config (bf16.enabled), not --amp")
    config.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=1,
                  train_batch_size=args.batch_size * args.world_size)
    config["gradient_clipping"] = deepspeed_clipping(args, config, path)
    try:
        engine, _, _ = initialize(model, optimizer, config)
    except DeepSpeedConfigError as err:
        raise SystemExit(f"ltsam train: --deepspeed-config '{path}': {err}") from err
    return engine


def train(args: argparse.Namespace, device: torch.device, console: Console) -> None:
    start_time = time.perf_counter()
    primary = args.rank == 0
    random_seed(args.seed, args.rank)
    out, resume = prepare_output(args, primary)

    train_set, val_set = train_data.create_datasets(args)
    counts, counts_file = train_data.class_counts_for(args, train_set, out, primary)
    dist_utils.barrier()  # the counts file exists before any rank's optimizer reads it
    args.num_classes = args.num_classes or train_set.num_classes
    cli_args.resolve_lr(args, args.world_size)
    if resume is not None:
        resume_point.check_config(resume, args, counts)  # before anything is built: a mixed run is refused early

    model, trainable = build_model(args, getattr(train_set, "classes", ()), out, primary, dist_utils.barrier)
    model = dist_utils.sync_batchnorm(model, device) if args.sync_bn else model
    model = model.to(device)
    data_config, train_set.transform, val_set.transform = train_data.build_transforms(args, model)
    train_loader, val_loader = train_data.create_loaders(args, train_set, val_set, args.rank, args.world_size,
                                                         pin_memory=device.type == "cuda")

    criterion = create_loss(args.loss, counts, **args.loss_kwargs).to(device)
    optimizer = build_optimizer(args, model, counts_file)
    sam = isinstance(optimizer, SAMFamily)
    if args.torchcompile and args.deepspeed_config:
        raise SystemExit("ltsam train: --torchcompile with --deepspeed-config is not supported; drop one of them")
    compiled = torch.compile(model, backend=args.torchcompile) if args.torchcompile else model
    if sam:
        optimizer.attach(compiled)  # the engine plans one gradient per compiled forward
        dist_utils.broadcast_module(model)  # no DDP wrapper to do it: every rank starts from rank 0's weights
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    scaler = torch.amp.GradScaler(device.type) if args.amp and amp_dtype == torch.float16 and device.type == "cuda" \
        else None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=updates_per_epoch(len(train_loader),
                                                                                    args.grad_accum_steps))
    if sam and "epochs" not in args.opt_kwargs:
        optimizer.epochs = num_epochs  # SSE-SAM's stage follows the scheduled total: --epochs + --cooldown-epochs

    state = TrainState()
    saver = Saver(model, optimizer, args, model_ema, scheduler, scaler, state, out, args.checkpoint_hist) \
        if primary else None
    if saver is not None:
        saver.class_counts = list(counts)
    forward_model, engine = compiled, None
    if args.deepspeed_config:
        engine = start_deepspeed(args, model, optimizer)
        if saver is not None:
            saver.engine = engine
    elif args.distributed and not sam:
        forward_model = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    if resume is not None:  # after DeepSpeed starts: its engine loads its own files
        state = load_training_state(resume, model, optimizer, scheduler, scaler, model_ema, saver, args.rank, engine)
        if saver is not None:
            saver.train_state = state
        changed = "".join(f"; {k} {old!r} -> {new!r} (--resume-override)" if k != "class_counts" else
                          f"; {k}: {resume_point.shown(k, old, new)} (--resume-override)"
                          for k, (old, new) in resume.overridden.items())
        console.print(f"resumed from '{resume.path}' at epoch {state.epoch} (update {state.num_updates}"
                      f"{f', {state.skip} into the epoch' if state.skip else ''}){changed}")
    ctx = StepContext(forward_model, compiled, optimizer, criterion, autocast, scaler, args.clip_grad, args.clip_mode,
                      engine, args.grad_accum_steps)
    meter = LongTailAccuracy(counts, (args.many_shot, args.few_shot))

    if primary:
        timm_summary.trim_summary(str(out / SUMMARY), state.epoch)  # timm >= 1.0.31 (timm_needs)
        cli_args.save_args(args, out / ARGS)
        console.print(f"ltsam train: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
                      f"--finetune {args.finetune}: {sum(p.numel() for p in trainable):,} trainable) "
                      f"on {args.dataset} ({len(train_set)} train / {len(val_set)} eval images, {args.num_classes} "
                      f"classes), --opt {args.opt}, {args.world_size} process(es) on {device}, input "
                      f"{data_config['input_size']}; output '{out}'")

    stop = min(args.stop_epoch or num_epochs, num_epochs)
    earlier_s = state.wall_s  # what earlier attempts trained, as far as their checkpoints carry it
    report = None
    # the bar only on a terminal: in a log file rich would print every epoch's bar at exit, after all tables
    show_bar = primary and not args.no_progress and get_console().is_terminal
    with progress_bar(show_bar) as progress, preempt.StopRequest() as stop_request:
        for epoch in range(state.epoch, stop):
            train_data.set_epoch(train_loader, epoch)
            criterion.set_epoch(epoch)
            if sam:
                optimizer.set_epoch(epoch)
            try:
                train_metrics = train_one_epoch(ctx, train_loader, epoch, state, scheduler, model_ema, progress,
                                                args.world_size, args.log_interval, device, stop_request)
                if sam:
                    train_metrics.update(optimizer.scheduled_radii())  # --rho-sched: radius columns in summary.csv
            except NonFiniteLoss as err:
                last = out / LAST
                kept = f"the last good checkpoint is '{last}'" if last.is_file() else "no checkpoint was written"
                raise NonFiniteLoss(f"{err}; {kept}") from None
            if train_metrics.get("stopped_at", len(train_loader)) < len(train_loader):
                state.loss_sum, state.wall_s = train_metrics["loss_sum"], earlier_s + time.perf_counter() - start_time
                write_checkpoint(saver, engine, out, state, epoch, (model, model_ema),
                                 stopped_at=train_metrics["stopped_at"], samples_per_batch=args.batch_size)
                raise preempt.Preempted(stopped_message(
                    stop_request, out, f"{train_metrics['stopped_at']} updates into epoch {epoch}", state))
            if primary and not show_bar:  # the plain line of the epoch, before its table
                stage = f", stage {optimizer.stage}" if hasattr(optimizer, "stage") else ""
                console.print(f"epoch {epoch}: loss {train_metrics['loss']:.4f}, "
                              f"lr {optimizer.param_groups[0]['lr']:.3g}{stage}")
            if args.distributed and args.dist_bn:
                distribute_bn(model, args.world_size, args.dist_bn == "reduce")
                if model_ema is not None:
                    distribute_bn(model_ema, args.world_size, args.dist_bn == "reduce")
            eval_metrics = {}
            if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == stop:
                report = evaluate(model, val_loader, meter, False, autocast, device)
                eval_metrics = {k: report[k] for k in ("top1", "mean_class_acc", "many", "medium", "few")}
                reports = {f"epoch {epoch}": report}
                if model_ema is not None:
                    ema_report = evaluate(model_ema.module, val_loader, meter, False, autocast, device)
                    eval_metrics.update({f"ema_{k}": ema_report[k] for k in ("top1", "many", "medium", "few")})
                    reports[f"epoch {epoch} EMA"] = ema_report
                if primary:
                    progress.console.print(results_table(reports))
            if scheduler is not None:
                scheduler.step(epoch + 1, eval_metrics.get("top1"))
            state.epoch = epoch + 1
            if primary:
                update_summary(epoch, train_metrics, eval_metrics, str(out / SUMMARY),
                               lr=optimizer.param_groups[0]["lr"])
                state.wall_s = earlier_s + time.perf_counter() - start_time
            write_checkpoint(saver, engine, out, state, epoch, (model, model_ema), metric=eval_metrics.get("top1"))
            if epoch + 1 < stop and dist_utils.all_reduce_sum(torch.tensor([stop_request.flag], device=device)).item():
                raise preempt.Preempted(stopped_message(stop_request, out, f"the end of epoch {epoch}", state))

    if report is None:  # resumed a finished run: nothing trained, evaluate what was loaded
        report = evaluate(model, val_loader, meter, False, autocast, device)
    if args.tta or args.tte != "none":
        if args.tte != "none":
            val_set.transform = tte_transform(data_config, args.tte)
            val_loader = train_data.eval_loader(args, val_set, args.rank, args.world_size, device.type == "cuda")
        report = evaluate(model, val_loader, meter, args.tta, autocast, device)
    skipped = train_data.skipped_samples(train_loader.dataset, val_loader.dataset, gather=dist_utils.all_gather)
    if primary:
        report = dict(report, **skipped)
        finish(args, out, report, state, stop, num_epochs, earlier_s, time.perf_counter() - start_time, console)


def stopped_message(stop_request: preempt.StopRequest, out: Path, at: str, state: TrainState) -> str:
    return (f"stopped by {stop_request.name} at {at} (update {state.num_updates}); checkpoint '{out / LAST}' "
            f"written. Exit code {preempt.REQUEUE_EXIT} means 'requeue': rerun with {option('resume', 'auto')} to "
            "continue")


def finish(args: argparse.Namespace, out: Path, report: dict, state: TrainState, stop: int, num_epochs: int,
           earlier_s: float, attempt_s: float, console: Console) -> None:
    """results.json, the per-class plot and the final All / Many / Medium / Few table.

    ``wall_s`` counts every attempt of a resumed run (``attempt_s`` only this one)."""
    wall = earlier_s + attempt_s
    report = dict(report, model=args.model, dataset=args.dataset, opt=args.opt, loss=args.loss, tta=args.tta,
                  tte=args.tte, epochs_done=state.epoch, epochs=num_epochs, updates=state.num_updates,
                  wall_s=round(wall, 2), attempt_s=round(attempt_s, 2))
    save_report(report, out / RESULTS)
    plot_per_class(report, out / PLOT, title=f"{args.model} / {args.opt} on {args.dataset}")
    title = f"{args.dataset}: {state.epoch}/{num_epochs} epochs{' (stopped)' if stop < num_epochs else ''}" \
            f"{', flip TTA' if args.tta else ''}{f', {args.tte}-crop TTE' if args.tte != 'none' else ''} - accuracy (%)"
    console.print(results_table({args.opt: report}, title=title))
    resumed = f" ({attempt_s:.1f} s in this attempt)" if earlier_s else ""
    console.print(f"done in {wall:.1f} s{resumed}; results in '{out}'")
