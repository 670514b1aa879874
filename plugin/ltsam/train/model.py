"""The model ``ltsam train`` trains: timm's model (pretrained from the hub or a file), its classifier (linear, or
cosine from CLIP text features) and the ``--finetune`` mode, which decides the trainable parameters."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from ltsam.finetune import FinetuneError, FinetuneOptions, prepare_model
from ltsam.finetune.pretrained import PretrainedError, create_backbone
from ltsam.finetune.text import check_clip_pair, read_class_names, set_cosine_classifier, text_features

TEXT_CACHE = "text_features.pt"
WNID = re.compile(r"^n\d{8}$")


def finetune_options(args: argparse.Namespace) -> FinetuneOptions:
    return FinetuneOptions(blocks=args.finetune_blocks, bottleneck=args.bottleneck, prompt_length=args.prompt_length,
                           lora_rank=args.lora_rank, lora_mlp=args.lora_mlp)


def class_names_for(args: argparse.Namespace, dataset_names: Sequence[str]) -> list[str]:
    """``--class-names``, open_clip's ImageNet names for ImageNet-LT and for WordNet-id class folders, or the data
    set's names; label numbers and WordNet ids are no names for a text prompt."""
    if args.class_names:
        return read_class_names(args.class_names, args.num_classes)
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if args.dataset == "imagenet-lt" and args.num_classes == 1000:  # its folders are WordNet ids, sorted
        return list(IMAGENET_CLASSNAMES)
    names = list(dataset_names)
    if names and all(WNID.match(n) for n in names):  # ImageNet folders (a subset, ImageNet-LT as folders)
        from timm.data import ImageNetInfo

        wnids = ImageNetInfo().label_names()
        unknown = next((n for n in names if n not in wnids), None)
        if unknown is not None:
            raise SystemExit(f"ltsam train: --text-init: class folder '{unknown}' is a WordNet id outside "
                             "ImageNet-1k, which has no class name here; pass --class-names FILE")
        return [IMAGENET_CLASSNAMES[wnids.index(n)] for n in names]
    if len(names) != args.num_classes or all(n.isdigit() for n in names):
        raise SystemExit(f"ltsam train: --text-init needs class names, and --dataset {args.dataset} names its "
                         "classes by number only; pass --class-names FILE (one name per line, in label order)")
    return names


def build_model(args: argparse.Namespace, dataset_names: Sequence[str], out: Path, primary: bool,
                barrier: Callable[[], None]) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model and its trainable parameters. Rank 0 computes the text features (when not cached); the others
    read its cache after ``barrier``."""
    kwargs = dict(args.model_kwargs)
    if args.drop is not None:
        kwargs["drop_rate"] = args.drop
    try:
        model = create_backbone(args.model, args.pretrained, args.pretrained_path, num_classes=args.num_classes,
                                in_chans=args.in_chans, **kwargs)
        if args.classifier == "cosine":
            weights = None
            if args.text_init:
                check_clip_pair(args.model, args.clip_model, args.clip_pretrained)
                cache = Path(args.text_cache) if args.text_cache else out / TEXT_CACHE
                names = class_names_for(args, dataset_names)
                if primary:
                    text_features(names, cache, args.clip_model, args.clip_pretrained, args.prompt_template)
                barrier()
                weights = text_features(names, cache, args.clip_model, args.clip_pretrained, args.prompt_template)
            set_cosine_classifier(model, args.classifier_scale, weights)
        trainable = prepare_model(model, args.finetune, finetune_options(args), name=args.model)
    except (FinetuneError, PretrainedError, ValueError) as err:
        raise SystemExit(f"ltsam train: {err}") from None
    return model, trainable
