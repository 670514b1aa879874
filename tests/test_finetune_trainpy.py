"""``LTSAM_FINETUNE`` in timm's unmodified train.py (through ``ltsam.timm``): the options, the wrapped
``create_model``, and one end-to-end run from a ``--pretrained-path`` file with AdaptFormer and SSE-SAM."""

from __future__ import annotations

import pytest
import timm
import torch
from test_timm_trainpy import TAGS, _image_folder, _train_py

import ltsam
from ltsam.finetune import FinetuneOptions
from ltsam.finetune.trainpy import finetune_spec, wrap_create_model

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "depth=2",
            "embed_dim=32", "num_heads=2"]


def test_spec_from_environment_and_yaml():
    assert finetune_spec({}, {}) is None and finetune_spec({"LTSAM_FINETUNE": "full"}, {}) is None
    assert finetune_spec({"LTSAM_FINETUNE": "lora", "LTSAM_FINETUNE_OPTIONS": "lora_rank=4,lora_mlp=true"}, {}) == \
        ("lora", FinetuneOptions(lora_rank=4, lora_mlp=True))
    assert finetune_spec({}, {"ltsam_finetune": "adaptformer", "ltsam_finetune_options": {"bottleneck": 8}}) == \
        ("adaptformer", FinetuneOptions(bottleneck=8))
    for environ, message in [({"LTSAM_FINETUNE": "prompt"}, r"LTSAM_FINETUNE='prompt' is not a fine-tuning mode"),
                             ({"LTSAM_FINETUNE": "ssf", "LTSAM_FINETUNE_OPTIONS": "width=3"},
                              "'width' is not a fine-tuning option"),
                             ({"LTSAM_FINETUNE": "ssf", "LTSAM_FINETUNE_OPTIONS": "blocks=two"},
                              "blocks='two' is not a whole number")]:
        with pytest.raises(ValueError, match=message):
            finetune_spec(environ, {})


def test_wrapped_create_model_freezes_the_backbone():
    create = wrap_create_model(timm.create_model, "vpt-deep", FinetuneOptions(prompt_length=2))
    model = create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                   num_classes=4)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "blocks.0.prompts", "blocks.1.prompts", "head.bias", "head.weight"]
    # with weight decay, every supported timm builds the groups from trainable parameters only (timm < 1.0.31
    # hands a model's every parameter to the optimizer without it; frozen ones then get no gradient, no state)
    optimizer = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.1, weight_decay=5e-4,
                                               class_counts=[4, 3, 2, 1])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


@pytest.mark.parametrize("tag", TAGS[:1])
def test_train_py_finetunes_a_pretrained_file_with_adaptformer(tmp_path, tag):
    counts = [12, 6, 3, 3]
    _image_folder(tmp_path / "data", counts)
    ltsam.counts.save_class_counts(counts, tmp_path / "counts.json")
    torch.manual_seed(0)
    pretrained = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                   num_heads=2, num_classes=7)
    torch.save(pretrained.state_dict(), tmp_path / "backbone.pth")
    output = _train_py(tag, tmp_path, *TINY_VIT, "--pretrained", "--pretrained-path", "backbone.pth",
                       "--img-size", "32", "--val-split", "val", "-b", "8", "--epochs", "1", "--opt", "ssesam",
                       "--opt-kwargs", "class_counts=counts.json", "eta=5", "--experiment", "ft",
                       env={"LTSAM_FINETUNE": "adaptformer", "LTSAM_FINETUNE_OPTIONS": "bottleneck=2"})
    # head 32 x 4 + 4 = 132; per block LN 64 + down 32 x 2 + 2 + up 2 x 32 + 32 + scale 1 = 227
    assert "ltsam.timm: --finetune adaptformer on vit_tiny_patch16_224: 586 trainable of" in output
    assert "ltsam.timm: epoch 0: 3 SSESAM steps" in output
    state = torch.load(tmp_path / "out" / "ft" / "last.pth.tar", weights_only=False)["state_dict"]
    for name, weight in pretrained.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(state[name], weight), f"frozen {name} changed"
    assert not torch.equal(state["blocks.1.adaptformer.up.weight"], torch.zeros(32, 2))
