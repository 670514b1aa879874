"""The CLIP fine-tuning recipes: each plans a command that ``ltsam train`` parses into the official values
(reference/foundation.md); the launcher's dry run of every recipe is in test_launch_commands.py."""

from __future__ import annotations

import pytest
from launch_helpers import YAML, planned

from ltsam_common.train_args import parse_args

OFFICIAL = {  # recipe: (opt, opt_kwargs, finetune, lr, amp, processes)
    "cifar100_lt_clip_focalsam": ("focalsam", {"rho": 0.05, "gamma": 5.5, "lam": 0.8}, "adaptformer", 0.01, True, 1),
    "cifar100_lt_clip_full": ("focalsam", {"rho": 0.05, "gamma": 5.5, "lam": 0.8}, "full", 0.001, True, 1),
    "cifar100_lt_clip_ssesam": ("ssesam", {"head_rho": 0.05, "tail_rho": 0.1, "gamma": 0.7}, "adaptformer", 0.01,
                                True, 1),
    "cifar100_lt_clip_imbsam": ("imbsam", {"rho": 0.05}, "adaptformer", 0.01, True, 1),
    "imagenet_lt_clip_focalsam_torchrun": ("focalsam", {"rho": 0.05, "gamma": 0.5, "lam": 0.8}, "adaptformer", 0.01,
                                           True, 1),
    "inat2018_clip_focalsam_4gpu": ("focalsam", {"rho": 0.02, "gamma": 0.2, "lam": 1.0}, "adaptformer", 0.01,
                                    False, 4),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_clip_recipe_parses_into_the_official_setting(name):
    argv = planned(YAML / f"{name}.yaml").commands[0]
    args = parse_args(argv[argv.index("ltsam.train") + 1:])
    opt, opt_kwargs, finetune, lr, amp, processes = OFFICIAL[name]
    assert (args.opt, args.finetune, args.lr, args.amp) == (opt, finetune, lr, amp)
    assert args.opt_kwargs == {**opt_kwargs, "base": "momentum"}
    assert (args.model, args.pretrained, args.classifier, args.classifier_scale, args.text_init) == (
        "vit_base_patch16_clip_quickgelu_224.openai", True, "cosine", 25.0, True)
    assert (args.loss, args.weight_decay, args.momentum, args.epochs, args.sched, args.min_lr) == (
        "la", 5e-4, 0.9, 20, "cosine", 0.0)
    assert args.batch_size * processes == 128
