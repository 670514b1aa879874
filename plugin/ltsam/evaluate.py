"""``ltsam eval``: a checkpoint of ``ltsam train`` on any number of evaluation sets.

    ltsam eval RUN/last.pth.tar --set test=folder:data/val --set sketch=folder:imagenet-sketch/sketch \\
        --set v2=folder:imagenetv2-matched-frequency --set c=imagenet-c:ImageNet-C --set mine=list:test.txt \\
        --set cgen=corrupt:data/val --corruptions common --severities 1,2,3,4,5

The model is rebuilt from the checkpoint's own arguments (model, ``--finetune`` tuner, classifier) and loads its
weights strictly; the training class counts (the run folder's ``class_counts.json``) give Many / Medium / Few.
Every set reports top-1, mean per-class accuracy, Many / Medium / Few and per-class accuracy.

Labels: a ``list`` set gives them; a ``folder`` set maps its class folders by name: the training class names,
else class numbers (ImageNet-V2's folders), else WordNet ids in ImageNet-1k's order (timm's ``ImageNetInfo``:
ImageNet-Sketch, ImageNet-C; a model trained on ImageNet class folders, all or some, looks both up among its
own WordNet ids), never by position. ``imagenet-c`` reads ``CORRUPTION/SEVERITY/<wnid>/`` folders
and adds the mean over them and a corruption x severity table. ``corrupt`` generates the same from a clean
folder with the ``imagecorruptions`` package (:mod:`ltsam.corruptions`: ``--corruptions``, ``--severities``,
default ImageNet-C's 15 x 5) and reports exactly as ``imagenet-c`` does. A label outside the training classes
is an error naming the set.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset
from torchvision import transforms as T

from ltsam import corruptions
from ltsam.data.files import ImageListDataset, read_image_folder, read_list
from ltsam.metrics import LongTailAccuracy, plot_per_class, results_table, save_report
from ltsam.train import data as train_data
from ltsam.train.loop import evaluate
from ltsam.train.model import WNID, build_model
from ltsam.tte import tte_transform
from ltsam_common import train_args

KINDS = ("folder", "list", "imagenet-c", "corrupt")


class EvalSetError(ValueError):
    """An evaluation set that cannot be read or mapped to the training classes, in one sentence."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltsam eval", description="Evaluate an ltsam train checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint file of ltsam train (e.g. RUN/model_best.pth.tar)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=KIND:PATH",
                        help=f"an evaluation set; KIND is one of {', '.join(KINDS)} (repeat for several)")
    parser.add_argument("--class-counts", default=None,
                        help="training class counts JSON (default: class_counts.json next to the checkpoint)")
    parser.add_argument("--data-root", default=None, help="list sets: image paths relative to this folder "
                                                          "(default: the list file's folder)")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--workers", "-j", type=int, default=4)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--tta", action="store_true", help="average logits over the image and its mirror image")
    parser.add_argument("--tte", default="none", choices=("none", *train_args.TTE_CROPS),
                        help="test-time ensembling over five (ten) crops of the image resized by 248/224")
    parser.add_argument("--corruptions", default=None,
                        help="corrupt sets: corruption names or groups (common, validation, all, noise, blur, "
                             "weather, digital), comma-separated (default: common, ImageNet-C's 15)")
    parser.add_argument("--severities", default=None, help="corrupt sets: comma-separated 1-5 (default: all five)")
    parser.add_argument("--output", default=None, help="folder of results.json (default: CHECKPOINT's folder/eval)")
    return parser


def parse_set(text: str) -> tuple[str, str, Path]:
    name, sep, rest = text.partition("=")
    kind, sep2, path = rest.partition(":")
    if not (sep and sep2 and name and path) or kind not in KINDS:
        raise EvalSetError(f"--set '{text}' is not NAME=KIND:PATH with KIND one of {', '.join(KINDS)}")
    return name, kind, Path(path)


def folder_labels(name: str, folders: list[str], classes: list[str], num_classes: int) -> dict[str, int]:
    """Class folder -> training label: by training class name, class number, or ImageNet WordNet id.

    Trained on ImageNet class folders (WordNet ids, all or some), a WordNet id or an ImageNet class number
    (ImageNet-V2) finds its class among them; trained on 1000 folders named by ImageNet class number (sorted as
    text), a WordNet id finds its number there; any other 1000 classes are taken in ImageNet-1k's order."""
    if set(folders) <= set(classes):
        return {f: classes.index(f) for f in folders}
    imagenet_folders = bool(classes) and all(WNID.match(c) for c in classes)
    if all(f.isdigit() for f in folders) and not imagenet_folders:
        outside = [f for f in folders if int(f) >= num_classes]
        if outside:
            raise EvalSetError(f"eval set '{name}': class folder '{outside[0]}' is outside the {num_classes} "
                               "training classes")
        return {f: int(f) for f in folders}
    if all(WNID.match(f) or (imagenet_folders and f.isdigit()) for f in folders):
        from timm.data import ImageNetInfo

        wnids = ImageNetInfo().label_names()
        if imagenet_folders:
            label_of = {c: i for i, c in enumerate(classes)}
        elif num_classes != len(wnids):
            raise EvalSetError(f"eval set '{name}': its folders are WordNet ids, but the model has {num_classes} "
                               f"classes, not ImageNet's {len(wnids)}")
        elif all(c.isdigit() for c in classes):
            label_of = {wnids[int(c)]: i for i, c in enumerate(classes) if int(c) < len(wnids)}
        else:
            label_of = {w: i for i, w in enumerate(wnids)}
        unknown = [f for f in folders if f.isdigit() and int(f) >= len(wnids) or WNID.match(f) and f not in wnids]
        if unknown:
            raise EvalSetError(f"eval set '{name}': class folder '{unknown[0]}' is not an ImageNet-1k class")
        mapping = {f: label_of.get(wnids[int(f)] if f.isdigit() else f) for f in folders}
        stray = next((f for f, label in mapping.items() if label is None), None)
        if stray is not None:
            raise EvalSetError(f"eval set '{name}': class folder '{stray}' is an ImageNet class outside the "
                               f"{num_classes} training classes; leave it out of the set")
        return mapping
    stray = next(f for f in folders if f not in classes)
    raise EvalSetError(f"eval set '{name}': class folder '{stray}' is neither a training class name, a class "
                       "number nor an ImageNet WordNet id")


def folder_set(name: str, root: Path, classes: list[str], counts: list[int], transform) -> ImageListDataset:
    try:
        samples, folders = read_image_folder(root)
    except (FileNotFoundError, RuntimeError) as err:
        raise EvalSetError(f"eval set '{name}': {err}") from None
    mapping = folder_labels(name, folders, classes, len(counts))
    samples = [(path, mapping[folders[label]]) for path, label in samples]
    return ImageListDataset(samples, class_counts=counts, classes=classes, source=f"eval set '{name}'",
                            transform=transform)


def list_set(name: str, path: Path, root: Path | None, classes: list[str], counts: list[int],
             transform) -> ImageListDataset:
    try:
        samples, origins = read_list(path, root or path.parent, num_classes=len(counts))
        return ImageListDataset(samples, class_counts=counts, classes=classes, source=f"eval set '{name}' ({path})",
                                origins=origins, transform=transform)
    except (FileNotFoundError, ValueError) as err:
        raise EvalSetError(f"eval set '{name}': {err}") from None


def imagenet_c_sets(name: str, root: Path) -> list[tuple[str, str, int, Path]]:
    """(set name, corruption, severity, folder) for each ``CORRUPTION/SEVERITY`` folder of ImageNet-C."""
    found = [(f"{name}/{c.name}/{s.name}", c.name, int(s.name), s) for c in sorted(root.iterdir()) if c.is_dir()
             for s in sorted(c.iterdir()) if s.is_dir() and s.name.isdigit()] if root.is_dir() else []
    if not found:
        raise EvalSetError(f"eval set '{name}': '{root}' holds no CORRUPTION/SEVERITY folders (ImageNet-C layout)")
    return found


def corrupt_sets(name: str, clean: ImageListDataset, options: argparse.Namespace, data_config: dict,
                 plain_tf: T.Compose, in_chans: int) -> list[tuple[str, Dataset, tuple[str, str, int]]]:
    """One generated set per (corruption, severity), named as ``imagenet-c`` names its folders: the clean
    image at the model's input size (``plain_tf``'s resize and crop) is corrupted, then goes through what a
    stored ImageNet-C image would: grey for a one-channel model, ``plain_tf``'s tensor steps or TTE's crops."""
    corruption_names, severities = corruptions.select(options.corruptions or "common",
                                                      options.severities or "1,2,3,4,5")
    height, width = data_config["input_size"][-2:]
    if min(height, width) < corruptions.MIN_SIZE:
        raise EvalSetError(f"eval set '{name}': imagecorruptions needs images of at least {corruptions.MIN_SIZE} x "
                           f"{corruptions.MIN_SIZE} pixels, the model's input is {height} x {width}")
    try:
        corruptions.check_runs(corruption_names, severities)
    except corruptions.CorruptionError as err:
        raise EvalSetError(f"eval set '{name}': {err}") from None
    crop, to_tensor = corruptions.split_at_tensor(plain_tf)
    finish = eval_transform(data_config, options.tte, in_chans, to_tensor)
    return [(f"{name}/{corruption}/{severity}", corruptions.CorruptedImages(clean, corruption, severity, crop, finish),
             (name, corruption, severity)) for corruption in sorted(corruption_names)  # as imagenet-c's folders
            for severity in severities]


def eval_transform(data_config: dict, tte: str, in_chans: int, plain: T.Compose) -> T.Compose:
    """``plain`` (from an image at the model's input size on) or ``--tte``'s crops; grey for a one-channel model:
    image files are read as RGB, and a grey model takes them back to one channel (exactly)."""
    transform = tte_transform(data_config, tte) if tte != "none" else plain
    return T.Compose([T.Grayscale(1), transform]) if in_chans == 1 else transform


def load_run(checkpoint: Path) -> tuple[argparse.Namespace, dict]:
    """The training arguments (the parser's defaults for keys an older checkpoint lacks) and the weights."""
    if not checkpoint.is_file():
        raise SystemExit(f"ltsam eval: checkpoint '{checkpoint}' does not exist")
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "state_dict" not in data or "args" not in data:
        raise SystemExit(f"ltsam eval: '{checkpoint}' is not an ltsam train checkpoint (no state_dict / args)")
    args = train_args.build_parser().parse_args([])
    vars(args).update(data["args"])
    # the checkpoint's weights replace every initial value: no hub download, no text tower
    args.pretrained, args.pretrained_path, args.text_init = False, None, False
    return args, data["state_dict"]


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        sets = [parse_set(text) for text in options.sets]
        if not sets:
            raise EvalSetError("no evaluation set: add --set NAME=KIND:PATH")
        if (options.corruptions or options.severities) and not any(kind == "corrupt" for _, kind, _ in sets):
            raise EvalSetError("--corruptions and --severities choose what corrupt sets generate; add --set "
                               "NAME=corrupt:CLEAN_FOLDER")
        run(options, sets, console)
    except (EvalSetError, corruptions.CorruptionError) as err:
        print(f"ltsam eval: {err}", file=sys.stderr)
        return 2
    return 0


def run(options: argparse.Namespace, sets: list[tuple[str, str, Path]], console: Console) -> dict:
    checkpoint = Path(options.checkpoint)
    args, state_dict = load_run(checkpoint)
    counts_file = Path(options.class_counts) if options.class_counts else checkpoint.parent / "class_counts.json"
    if not counts_file.is_file():
        raise SystemExit(f"ltsam eval: training class counts '{counts_file}' not found; pass --class-counts")
    stored = json.loads(counts_file.read_text())
    meter = LongTailAccuracy(counts_file, (args.many_shot, args.few_shot))
    counts = meter.class_counts
    classes = list(stored.get("classes") or [str(c) for c in range(len(counts))]) if isinstance(stored, dict) \
        else [str(c) for c in range(len(counts))]
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = build_model(args, classes, checkpoint.parent, True, lambda: None)
    model.load_state_dict(state_dict)
    model = model.to(device).eval()
    data_config, _, plain_tf = train_data.build_transforms(args, model)
    eval_tf = eval_transform(data_config, options.tte, args.in_chans, plain_tf)
    loader_args = argparse.Namespace(batch_size=options.batch_size, validation_batch_size=options.batch_size,
                                     workers=options.workers, seed=0)

    datasets: list[tuple[str, Dataset, tuple[str, str, int] | None]] = []
    for name, kind, path in sets:
        if kind == "folder":
            datasets.append((name, folder_set(name, path, classes, counts, eval_tf), None))
        elif kind == "list":
            root = Path(options.data_root) if options.data_root else None
            datasets.append((name, list_set(name, path, root, classes, counts, eval_tf), None))
        elif kind == "imagenet-c":
            for set_name, corruption, severity, folder in imagenet_c_sets(name, path):
                datasets.append((set_name, folder_set(set_name, folder, classes, counts, eval_tf),
                                 (name, corruption, severity)))
        else:
            clean = folder_set(name, path, classes, counts, None)
            datasets += corrupt_sets(name, clean, options, data_config, plain_tf, args.in_chans)

    reports, corrupted = {}, {}
    for name, dataset, c_key in datasets:
        loader = train_data.eval_loader(loader_args, dataset, 0, 1, device.type == "cuda")
        reports[name] = evaluate(model, loader, meter, options.tta, nullcontext, device)
        if c_key is not None:
            corrupted.setdefault(c_key[0], {}).setdefault(c_key[1], {})[c_key[2]] = reports[name]["top1"]
    out = Path(options.output) if options.output else checkpoint.parent / "eval"
    summary = {"checkpoint": str(checkpoint), "model": args.model, "finetune": args.finetune, "tta": options.tta,
               "tte": options.tte, "sets": reports}
    for name, table in corrupted.items():
        means = {c: sum(by.values()) / len(by) for c, by in table.items()}
        summary.setdefault("corruptions", {})[name] = {"mean_top1": sum(means.values()) / len(means),
                                                      "by_corruption": means, "by_severity": table}
    save_report(summary, out / "results.json")
    for name, report in reports.items():
        if "/" not in name:
            plot_per_class(report, out / f"per_class_{name}.png", title=f"{args.model} on {name}")
    ensembled = f", {options.tte}-crop TTE" if options.tte != "none" else ""
    console.print(results_table(reports, title=f"{checkpoint}{ensembled}: accuracy (%)"))
    for name, result in summary.get("corruptions", {}).items():
        console.print(corruption_table(name, result))
        plot_severities(name, result, out / f"severity_{name}.png")
    console.print(f"results in '{out / 'results.json'}'")
    return summary


def corruption_table(name: str, result: dict) -> Table:
    severities = sorted({s for by in result["by_severity"].values() for s in by})
    table = Table(title=f"{name}: top-1 (%) by corruption and severity; mean over {len(result['by_corruption'])} "
                        f"corruptions {100 * result['mean_top1']:.2f}")
    table.add_column("corruption")
    for severity in severities:
        table.add_column(str(severity), justify="right")
    table.add_column("mean", justify="right")
    for corruption, by in result["by_severity"].items():
        table.add_row(corruption, *[f"{100 * by[s]:.2f}" if s in by else "-" for s in severities],
                      f"{100 * result['by_corruption'][corruption]:.2f}")
    return table


def plot_severities(name: str, result: dict, path: Path) -> Path:
    """Top-1 against severity, one line per corruption: how fast each corruption takes accuracy away."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for corruption, by in result["by_severity"].items():
        severities = sorted(by)
        ax.plot(severities, [100 * by[s] for s in severities], marker="o", label=corruption)
    ax.set_xlabel("severity")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{name}: mean top-1 {100 * result['mean_top1']:.2f}%")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
