"""Command-line flags of ``ltsam train``: timm train.py's names for what they share, plus the long-tail flags.

A ``-c/--config`` YAML file sets parser defaults (as in timm), so the command line still wins; unlike timm,
a key that is not a flag is an error naming the file, the key and the closest flag.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml
from ltsam_common import yamlio
from ltsam_common.names import FINETUNE_MODES, LOSSES, SAM_METHODS
from ltsam_common.names import SAMPLERS as DATA_SAMPLERS
from ltsam_launch.scale import default_lr_scale, scale_lr

# what the trainer picks when neither the command line nor the YAML names a value: per data set, so that the
# default run (embedded digits) is a seconds-long CPU run and CIFAR follows algorithms.md §12
DATASET_DEFAULTS: dict[str, dict] = {
    "digits-lt": dict(model="lt_cnn_small", in_chans=1, img_size=8, epochs=30, batch_size=64, lr=0.05,
                      warmup_epochs=0, workers=0, train_aug="none", weight_decay=5e-4),
    "mnist-lt": dict(model="lt_cnn_small", in_chans=1, img_size=28, epochs=30, batch_size=64, lr=0.05,
                     warmup_epochs=0, workers=0, train_aug="crop", weight_decay=5e-4),
    "cifar10-lt": dict(model="resnet32_cifar", epochs=200, batch_size=64, lr=0.1, warmup_epochs=0,
                       train_aug="crop-flip", weight_decay=2e-4),
    "cifar100-lt": dict(model="resnet32_cifar", epochs=200, batch_size=64, lr=0.1, warmup_epochs=0,
                        train_aug="crop-flip", weight_decay=1e-3),
}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, as torch's DataLoader counts them for its worker warning)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


FALLBACK_DEFAULTS = dict(model="resnet50", epochs=100, batch_size=128, lr=None, warmup_epochs=5,
                         workers=min(4, usable_cpus()), train_aug="timm", weight_decay=2e-5, img_size=None,
                         in_chans=3)

LAUNCH_RECIPE_ENV = "LTSAM_LAUNCH_RECIPE"  # set by ltsam-launch for its program: the recipe it ran
SAMPLERS = ("none", *DATA_SAMPLERS)
TTE_CROPS = ("five", "ten")  # ltsam.tte.TTE_CROPS (no torch here)
RHO_SCHEDULES = ("none", "step", "multistep", "cosine")  # ltsam.optim.radius.SCHEDULES (no torch here)
# which parameters --weight-decay decays: timm's grouping, or every parameter as the official SAM-family code
WD_PROFILES = ("timm", "official")


class ParseKwargs(argparse.Action):
    """``k=v`` pairs into a dict, values through ``ast.literal_eval`` with a string fallback (timm's rule)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for value in values:
            key, sep, raw = value.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects key=value pairs, got '{value}'")
            try:
                kw[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                kw[key] = str(raw)
        setattr(namespace, self.dest, kw)


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)" if action.default not in ("", [], {}) else f"{text} (default: none)"


PER_DATA_SET = "default: the data set's recipe, see DATASET_DEFAULTS in ltsam_common/train_args.py"


def option(name: str, value: object = True) -> str:
    """A flag as the user gives it, for messages: `--name value` to ``ltsam train``, or the override
    `program.args.name=value` of the recipe when ``ltsam-launch`` started this trainer (``LAUNCH_RECIPE_ENV``)."""
    recipe = os.environ.get(LAUNCH_RECIPE_ENV)
    if recipe:
        shown = str(value).lower() if isinstance(value, bool) else value
        return f"`ltsam-launch {recipe} program.args.{name.replace('-', '_')}={shown}`"
    return f"`--{name}`" if value is True else f"`--{name} {value}`"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltsam train", description="Long-tailed training with timm and ltsam.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-c", "--config", default="",
                        help="YAML file of flags (names with - or _), used as defaults: the command line wins; "
                             "a key that is not a flag is an error")
    group = parser.add_argument_group("Data")
    group.add_argument("--data-dir", default=None, help="data root (default: the data set's own default)")
    group.add_argument("--dataset", default="digits-lt",
                       help="digits-lt (embedded), mnist-lt, cifar10-lt, cifar100-lt, imagenet-lt, inat2018, "
                            "folder, list; or shards written by `ltsam shards write` in --data-dir: 'shards' "
                            "streams them (--sampler re-balances in the stream), 'shards-wids' reads by index")
    group.add_argument("--train-list", default=None,
                       help="--dataset list: training list file, 'relative/path label' lines (paths relative to "
                            "--data-dir, default this file's folder); it gives the class counts")
    group.add_argument("--val-list", default=None,
                       help="--dataset list: evaluation list file, same format (default: none)")
    group.add_argument("--train-split", default="train", help="split trained on (shards: the written split name)")
    group.add_argument("--val-split", default="test",
                       help="split evaluated each --eval-interval epochs (shards: the written split name, e.g. "
                            "validation)")
    group.add_argument("--imb-factor", type=float, default=None,
                       help="max/min class count of the -LT profile (default: the data set's own)")
    group.add_argument("--n-max", type=int, default=None, help="images of the largest class (default: all)")
    group.add_argument("--class-counts", default=None,
                       help="JSON of per-class training counts (default: from the data set, written to the output)")
    group.add_argument("--sampler", default="none", choices=SAMPLERS,
                       help=f"none (instance shuffling) or one of {', '.join(DATA_SAMPLERS)} (repeat: repeat-factor)")
    group.add_argument("--train-aug", default=None, choices=("none", "crop", "crop-flip", "timm"),
                       help=f"training augmentation: none, pad-and-crop (+ flip, the CIFAR recipe), or timm's "
                            f"({PER_DATA_SET})")
    group.add_argument("--workers", "-j", type=int, default=None,
                       help=f"data loading processes per rank (default: the data set's recipe, else "
                            f"{FALLBACK_DEFAULTS['workers']}: 4 at most, and no more than this machine's CPUs)")

    group = parser.add_argument_group("Model")
    group.add_argument("--model", default=None, help=f"timm model name ({PER_DATA_SET})")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights (hub)")
    group.add_argument("--pretrained-path", default=None, metavar="FILE",
                       help="the pretrained weights from this local file (timm's pretrained_cfg_overlay file=...); "
                            "implies --pretrained (default: none)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data set's)")
    group.add_argument("--in-chans", type=int, default=None, help=f"image channels ({PER_DATA_SET})")
    group.add_argument("--img-size", type=int, default=None,
                       help="input image size (default: the data set's recipe, else the model's)")
    group.add_argument("--mean", type=float, nargs="+", default=None,
                       help="normalisation mean per channel (default: the data set's, else the model's)")
    group.add_argument("--std", type=float, nargs="+", default=None,
                       help="normalisation std per channel (default: the data set's, else the model's)")
    group.add_argument("--drop", type=float, default=None,
                       help="dropout rate before the classifier (default: the model's)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra timm create_model options, e.g. drop_path_rate=0.1")
    group.add_argument("-b", "--batch-size", type=int, default=None,
                       help=f"per-process batch size (of one micro-batch with --grad-accum-steps; {PER_DATA_SET})")
    group.add_argument("--grad-accum-steps", type=int, default=1,
                       help="optimizer step every N loader batches: the update of one batch N x --batch-size")
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None,
                       help="evaluation batch size (default: --batch-size)")

    group = parser.add_argument_group("Fine-tuning (ltsam.finetune; the tuner enters the last --finetune-blocks "
                                      "blocks of a timm ViT)")
    group.add_argument("--finetune", default="full", choices=FINETUNE_MODES,
                       help="which parameters train: all (full), the classifier only, biases (BitFit), LayerNorms, "
                            "or a tuner + the classifier (VPT, Adapter, AdaptFormer, LoRA via peft, SSF)")
    group.add_argument("--finetune-blocks", type=int, default=None, help="tune the last N blocks (default: all)")
    group.add_argument("--bottleneck", type=int, default=None,
                       help="Adapter / AdaptFormer width (default LIFT's 2**floor(log2(classes / (2 * blocks))))")
    group.add_argument("--prompt-length", type=int, default=10, help="VPT prompt tokens")
    group.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: as --bottleneck)")
    group.add_argument("--lora-mlp", action="store_true", help="LoRA also on the MLP Linears (not only attn qkv)")
    group.add_argument("--classifier", default="linear", choices=("linear", "cosine"),
                       help="cosine: scale * cosine(feature, class weight), bias-free (LIFT's head)")
    group.add_argument("--classifier-scale", type=float, default=25.0, help="scale of the cosine classifier")
    group.add_argument("--text-init", action="store_true",
                       help="initialise the cosine classifier from CLIP text features of --prompt-template per class "
                            "name (open_clip; cached in --text-cache)")
    group.add_argument("--class-names", default=None, metavar="FILE",
                       help="one class name per line in label order (default: the data set's class names)")
    group.add_argument("--clip-model", default="ViT-B-16", help="open_clip model of the text tower")
    group.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag (or a local file)")
    group.add_argument("--prompt-template", default="a photo of a {}.",
                       help="--text-init: the text of each class, {} replaced by its name")
    group.add_argument("--text-cache", default=None, metavar="FILE",
                       help="text-feature cache (default: text_features.pt in the run folder); reused when present")

    group = parser.add_argument_group("Optimizer")
    group.add_argument("--opt", default="sgd",
                       help=f"timm optimizer name, e.g. sgd, momentum, adamw, or one of {', '.join(SAM_METHODS)}")
    group.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    group.add_argument("--opt-betas", type=float, nargs="+", default=None,
                       help="optimizer betas (default: the optimizer's)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument("--weight-decay", type=float, default=None, help=f"weight decay ({PER_DATA_SET})")
    group.add_argument("--wd-profile", default="timm", choices=WD_PROFILES,
                       help="which parameters --weight-decay decays: timm (not biases, norm weights or the model's "
                            "no_weight_decay() list) or official (every parameter, as the official SSE-SAM, ImbSAM "
                            "and Focal-SAM code: torch SGD on model.parameters())")
    group.add_argument("--clip-grad", type=float, default=None,
                       help="clip the gradient the optimizer applies (SAM family: the final update direction G; "
                            "default: no clipping)")
    group.add_argument("--clip-mode", default="norm", help="norm, value or agc (timm's dispatch_clip_grad)")
    group.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra optimizer options, e.g. rho=0.05 base=momentum (class_counts and epochs are "
                            "filled in for the SAM family)")
    group.add_argument("--eta", type=float, default=None,
                       help="tail threshold n_c < eta of imbsam / ssesam (default: the method's)")

    group = parser.add_argument_group("Loss")
    group.add_argument("--loss", default="ce", choices=LOSSES,
                       help="ce, or a long-tail loss: ldam, la (logit adjustment), vs, bsce (balanced softmax)")
    group.add_argument("--loss-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra loss options, e.g. tau=1.0")

    group = parser.add_argument_group("Schedule")
    group.add_argument("--sched", default="cosine", help="timm lr schedule: cosine, step, multistep, plateau, ...")
    group.add_argument("--sched-on-updates", action="store_true",
                       help="step the lr schedule every update instead of every epoch")
    group.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: the data set's recipe; data sets without one take --lr-base "
                            "x global batch / --lr-base-size)")
    group.add_argument("--lr-base", type=float, default=0.1,
                       help="lr at --lr-base-size, used only when neither --lr nor the data set's recipe sets the lr")
    group.add_argument("--lr-base-size", type=int, default=256, help="global batch size of --lr-base")
    group.add_argument("--lr-base-scale", default="",
                       help="linear or sqrt (default: sqrt for ada/lamb optimizers, else linear)")
    group.add_argument("--warmup-lr", type=float, default=1e-5, help="lr at the start of warmup")
    group.add_argument("--min-lr", type=float, default=0.0, help="lower lr bound of the schedule")
    group.add_argument("--epochs", type=int, default=None, help=f"epochs of the schedule ({PER_DATA_SET})")
    group.add_argument("--stop-epoch", type=int, default=None,
                       help="stop after this many epochs without changing the schedule (resume to continue; "
                            "default: --epochs)")
    group.add_argument("--warmup-epochs", type=int, default=None, help=f"linear lr warmup epochs ({PER_DATA_SET})")
    group.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    group.add_argument("--decay-epochs", type=float, default=None,
                       help="step schedule: decay every N epochs (default: timm's)")
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270],
                       help="multistep schedule: epochs at which the lr decays")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step / multistep lr decay factor")

    group = parser.add_argument_group("Radius schedule (SAM family; timm's schedulers on the radii in param_groups)")
    group.add_argument("--rho-sched", default="none", choices=RHO_SCHEDULES,
                       help="schedule every radius (rho; SSE-SAM head_rho and tail_rho) from its --opt-kwargs value, "
                            "set at the start of each epoch: step, multistep or cosine, as timm's lr schedules")
    group.add_argument("--rho-decay-epochs", type=float, default=None,
                       help="step: multiply every N epochs (no default: required with --rho-sched step)")
    group.add_argument("--rho-decay-milestones", type=int, nargs="+", default=None,
                       help="multistep: epochs at which to multiply (timm: milestone m from the 0-based epoch m-1; "
                            "no default: required with --rho-sched multistep)")
    group.add_argument("--rho-decay-rate", type=float, default=0.1,
                       help="step / multistep factor (2 doubles the radius, as Focal-SAM's ImageNet-LT recipe)")
    group.add_argument("--rho-min", type=float, default=0.0, help="cosine: the radius of the last epoch")

    group = parser.add_argument_group("Precision, EMA, distribution")
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"), help="autocast dtype")
    group.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per update")
    group.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup (timm's ModelEmaV3)")
    group.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    group.add_argument("--sync-bn", action="store_true",
                       help="BatchNorm over the global batch (SyncBatchNorm; GPUs only) instead of each process's")
    group.add_argument("--dist-bn", default="reduce", choices=("reduce", "broadcast", ""),
                       help="how BatchNorm buffers are made equal across ranks at the end of each epoch")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="train the torch.compile'd model (backend, default inductor); SAM-family steps take one "
                            "gradient per compiled forward; with BatchNorm only sam (others refused)")
    group.add_argument("--deepspeed-config", default=None,
                       help="train through DeepSpeed with this ds_config JSON (ZeRO 0, 1 or 2; bf16 or fp32; "
                            "default: no DeepSpeed)")
    group.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
                       help="override the ds_config's zero_optimization.stage (default: the ds_config's)")

    group = parser.add_argument_group("Evaluation and output")
    group.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and at the end)")
    group.add_argument("--tta", action="store_true", help="average logits over the image and its mirror image")
    group.add_argument("--tte", default="none", choices=("none", *TTE_CROPS),
                       help="test-time ensembling of the final evaluation (LIFT): resize by 248/224 and average the "
                            "logits of five crops (ten: and their mirror images)")
    group.add_argument("--many-shot", type=int, default=100, help="Many: train count above this")
    group.add_argument("--few-shot", type=int, default=20, help="Few: train count below this")
    group.add_argument("--output", default="./output/train", help="parent folder of the run folder")
    group.add_argument("--experiment", default=None,
                       help="folder under --output (default: <dataset>-<model>-<opt>-seed<seed>)")
    group.add_argument("--resume", default=None,
                       help="checkpoint to resume, or 'auto' for the output folder's newest complete one "
                            "(default: start afresh)")
    group.add_argument("--resume-override", nargs="+", default=[], metavar="KEY",
                       help="training settings that may differ from the resumed checkpoint's (e.g. epochs: the "
                            "schedule is rebuilt for the new total); any other difference is refused")
    group.add_argument("--overwrite", action="store_true", help="start afresh in a folder holding a checkpoint")
    group.add_argument("--checkpoint-hist", type=int, default=3, help="best checkpoints kept")
    group.add_argument("--seed", type=int, default=42, help="random seed (model init, sampling, augmentation)")
    group.add_argument("--log-interval", type=int, default=20, help="updates between plain log lines")
    group.add_argument("--no-progress", action="store_true",
                       help="plain log lines instead of a progress bar (always so when stderr is not a terminal)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the YAML of ``-c`` as defaults, then fill the per-data-set defaults."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, rest = config_parser.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(rest)
    args.config = known.config
    fill_defaults(args)
    check_args(parser, args)
    return args


def argv_problem(argv: list[str]) -> str | None:
    """What ``ltsam train`` would refuse in ``argv``, in its own words, or None; prints nothing. The launcher
    checks a recipe's program args with it before a job starts (no torch is imported here)."""
    said = io.StringIO()
    try:
        with redirect_stderr(said), redirect_stdout(io.StringIO()):
            parse_args(argv)
    except SystemExit as stop:
        if stop.code in (0, None):
            return None
        lines = said.getvalue().strip().splitlines()
        return lines[-1].removeprefix(f"{build_parser().prog}: error: ") if lines else str(stop.code)
    return None


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """YAML keys must be flags (dashes or underscores): a typo would otherwise be ignored silently."""
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    try:
        doc = yamlio.load(path, "config file")
        return doc.check_keys("", known, what="flag", normalize=lambda key: key.replace("-", "_"))
    except yamlio.YamlError as err:
        raise SystemExit(f"ltsam train: -c {err}") from None


def fill_defaults(args: argparse.Namespace) -> None:
    """Values left at None take the data set's recipe default, then the generic one."""
    table = {**FALLBACK_DEFAULTS, **DATASET_DEFAULTS.get(args.dataset, {})}
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations that would fail late or train something other than asked."""
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.stop_epoch is not None and not 0 < args.stop_epoch <= args.epochs:
        parser.error(f"--stop-epoch must lie in [1, --epochs={args.epochs}], got {args.stop_epoch}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.grad_accum_steps < 1:
        parser.error(f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}")
    if args.eval_interval < 1:
        parser.error(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.resume_override and not args.resume:
        parser.error("--resume-override applies to a resumed run: add --resume")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: resume continues the folder's run")
    if args.text_init and args.classifier != "cosine":
        parser.error("--text-init initialises the cosine classifier: add --classifier cosine")
    if args.few_shot > args.many_shot:
        parser.error(f"--few-shot ({args.few_shot}) must not exceed --many-shot ({args.many_shot})")


def resolve_lr(args: argparse.Namespace, world_size: int) -> None:
    """timm's rule: without --lr, lr = lr_base * global batch / lr_base_size (sqrt-scaled for ada/lamb); the
    launcher's scale rule (launch/scale.py) is the same function."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    args.lr = scale_lr(args.lr_base, global_batch, args.lr_base_size,
                       args.lr_base_scale or default_lr_scale(args.opt))


def experiment_name(args: argparse.Namespace) -> str:
    """Deterministic (no timestamp), so a restarted worker finds the folder it must resume from."""
    return args.experiment or f"{args.dataset.replace('/', '_')}-{args.model}-{args.opt}-seed{args.seed}"


def save_args(args: argparse.Namespace, path: Path) -> None:
    """The exact configuration run, loadable again with ``-c``."""
    skip = {"config", "distributed", "world_size", "rank", "local_rank", "dist_url"}  # per process, not config
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    cfg["device"] = str(cfg.get("device"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=True))
    tmp.replace(path)
