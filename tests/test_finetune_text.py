"""The cosine classifier from CLIP text features (random-init open_clip towers, no download), and ``ltsam
train`` with pretrained weights, a fine-tuning mode and the text-initialised head, its refusals and resume."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from test_eval import export_digits

from ltsam.finetune.pretrained import PretrainedError, create_backbone
from ltsam.finetune.text import (
    CosineClassifier,
    check_clip_pair,
    compute_text_features,
    read_class_names,
    set_cosine_classifier,
    text_features,
)
from ltsam.train import main as train_main
from ltsam_common.cli import main as ltsam_cli

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VIT = dict(img_size=8, patch_size=4, depth=2, embed_dim=32, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_clip(orthonormal_projection: bool = False) -> CLIP:
    """A random-init CLIP (32-d image features, 16-d joint space) with open_clip's tokenizer vocabulary."""
    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                text_cfg=dict(layers=1, width=32, heads=2, context_length=77, vocab_size=49408))
    if orthonormal_projection:
        with torch.no_grad():
            clip.visual.proj.copy_(torch.linalg.qr(torch.randn(32, 16))[0])
    return clip.eval()


def test_cached_features_equal_fresh_ones_and_a_foreign_cache_is_refused(tmp_path):
    clip = small_clip()
    fresh = compute_text_features(NAMES, "ViT-B-16", None, clip=clip)
    assert fresh.shape == (10, 32) and torch.allclose(fresh.norm(dim=1), torch.ones(10))
    cache = tmp_path / "text.pt"
    assert torch.equal(text_features(NAMES, cache, "ViT-B-16", None, clip=clip), fresh)
    assert torch.equal(text_features(NAMES, cache, "ViT-B-16", None), fresh)  # no tower needed now
    with pytest.raises(ValueError, match=f"text-feature cache '{cache}' was computed for another names"):
        text_features(NAMES[::-1], cache, "ViT-B-16", None)


@torch.no_grad()
def test_initial_cosine_classifier_scores_as_open_clip_zero_shot():
    """With an orthonormal image projection, scale * cos(f, normalize(t P^T)) * |f| / scale equals
    open_clip's cos(f P, t) * |f P|: the same dot products, so the same zero-shot predictions."""
    clip = small_clip(orthonormal_projection=True)
    images = torch.randn(6, 3, 32, 32)
    text = F.normalize(clip.encode_text(__import__("open_clip").get_tokenizer("ViT-B-16")(
        [f"a photo of a {n}." for n in NAMES])), dim=-1)
    projected = clip.encode_image(images)
    zero_shot = F.normalize(projected, dim=-1) @ text.T
    projection = clip.visual.proj
    clip.visual.proj = None  # the pre-projection feature: what the fine-tuned image tower outputs
    features = clip.visual(images)
    clip.visual.proj = projection
    head = CosineClassifier(32, 10, scale=25.0)
    head.weight.copy_(compute_text_features(NAMES, "ViT-B-16", None, clip=clip))
    logits = head(features)
    torch.testing.assert_close(logits / 25.0 * features.norm(dim=1, keepdim=True),
                               zero_shot * projected.norm(dim=1, keepdim=True))
    assert torch.equal(logits.argmax(1), zero_shot.argmax(1))


def test_class_names_file_with_a_wrong_count_is_refused(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(NAMES[:9]) + "\n")
    with pytest.raises(ValueError, match=f"--class-names '{path}' lists 9 class names, but the data set has 10"):
        read_class_names(path, 10)


def test_cosine_head_replaces_the_linear_one():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT)
    weights = F.normalize(torch.randn(10, 32), dim=-1)
    head = set_cosine_classifier(model, 25.0, weights)
    assert model.head is head and torch.equal(head.weight, weights)
    out = model(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 10) and out.abs().max() <= 25.0 + 1e-4
    with pytest.raises(ValueError, match=r"text features of shape \(10, 16\) do not fit the classifier"):
        set_cosine_classifier(timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT), 25.0,
                              torch.randn(10, 16))


def test_tte_averages_the_logits_of_five_or_ten_crops():
    from PIL import Image

    from ltsam.train.loop import evaluate
    from ltsam.tte import tte_transform

    config = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}  # resized to 18: centre symmetric
    image = Image.fromarray(torch.randint(0, 255, (20, 20, 3), dtype=torch.uint8).numpy())
    five, ten = tte_transform(config, "five")(image), tte_transform(config, "ten")(image)
    assert five.shape == (5, 3, 16, 16) and ten.shape == (10, 3, 16, 16)
    # TenCrop: the five crops of the mirror image (its top-left is the mirrored top-right, ...)
    torch.testing.assert_close(ten[5:], five[[1, 0, 3, 2, 4]].flip(-1))
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**VIT, "img_size": 16}).eval()
    recorded = []

    class Meter:
        def reset(self):
            recorded.clear()

        def update(self, logits, y):
            recorded.append(logits)

        def compute(self):
            return {}

    batch = torch.stack([five, five.flip(0)])
    evaluate(model, [(batch, torch.zeros(2))], Meter(), False, __import__("contextlib").nullcontext, "cpu")
    with torch.no_grad():
        expected = model(five).mean(0)
    torch.testing.assert_close(recorded[0], torch.stack([expected, expected]))
    evaluate(model, [(batch, torch.zeros(2))], Meter(), True, __import__("contextlib").nullcontext, "cpu")
    with torch.no_grad():  # --tta with --tte: the crops and their mirror images
        expected = torch.cat([model(five), model(five.flip(-1))]).mean(0)
    torch.testing.assert_close(recorded[0], torch.stack([expected, expected]))


def test_weights_file_of_another_model_is_refused_by_name(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT).state_dict(), path)
    loaded = create_backbone("vit_tiny_patch16_224", pretrained_path=str(path), num_classes=4, **VIT)
    assert loaded.head.out_features == 4
    with pytest.raises(PretrainedError, match=rf"--pretrained-path '{path}': not weights of model 'resnet18' "
                                              r"\(\d+ of its weights are missing"):
        create_backbone("resnet18", pretrained_path=str(path), num_classes=4)


def test_timms_note_on_the_weights_is_shown(tmp_path, caplog):
    """timm's pretrained configs carry notes such as OpenAI CLIP's under a GELU tower ("natively QuickGELU, use
    quickgelu model variant for original results"): a user fine-tuning those weights sees it."""
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT).state_dict(), path)
    note = "natively QuickGELU, use quickgelu model variant for original results"
    with caplog.at_level("WARNING", logger="ltsam.finetune"):
        create_backbone("vit_tiny_patch16_224", pretrained_path=str(path), num_classes=4,
                        pretrained_cfg_overlay=dict(notes=(note,)), **VIT)
    assert f"timm's note on the weights of vit_tiny_patch16_224: {note}" in caplog.text


def test_train_finetunes_with_text_head_and_refuses_another_mode_on_resume(tmp_path, capsys):
    """Digits-LT on a tiny ViT from a weights file: AdaptFormer, cosine head from cached text features,
    Focal-SAM; the backbone stays the file's, and resuming with another --finetune is refused."""
    backbone = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=7, **VIT)
    torch.save(backbone.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    text_features(NAMES, tmp_path / "text.pt", "ViT-B-16", "openai", clip=small_clip())
    flags = ["--n-max", "30", "-b", "16", "--epochs", "1", "--no-progress", "--output", str(tmp_path),
             "--experiment", "ft", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=8", "patch_size=4",
             "depth=2", "embed_dim=32", "num_heads=2", "--mean", "0.5", "--std", "0.5",
             "--pretrained-path", str(tmp_path / "vit.pth"), "--finetune", "adaptformer", "--bottleneck", "2",
             "--classifier", "cosine", "--text-init", "--class-names", str(tmp_path / "names.txt"),
             "--text-cache", str(tmp_path / "text.pt"), "--opt", "focalsam", "--loss", "la"]
    assert train_main([*flags, "--tte", "ten"]) == 0
    # 10 x 32 cosine weights + 2 blocks x (LN 64 + down 66 + up 96 + scale 1)
    assert "--finetune adaptformer: 774 trainable" in capsys.readouterr().err
    trained = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert trained["tte"] == "ten"
    export_digits(tmp_path / "test")  # ltsam eval rebuilds tuner and cosine head from the checkpoint alone
    assert ltsam_cli(["eval", str(tmp_path / "ft" / "last.pth.tar"), "--set", f"test=folder:{tmp_path / 'test'}",
                      "--tte", "ten", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "ft" / "eval" / "results.json").read_text())["sets"]["test"]["top1"] == \
        trained["top1"]
    state = torch.load(tmp_path / "ft" / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    for name, weight in backbone.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(state[name], weight), name
    with pytest.raises(SystemExit, match="finetune: 'adaptformer' in the checkpoint, 'lora' now"):
        train_main([*flags[:-8], "--finetune", "lora", "--classifier", "cosine", "--text-init", "--class-names",
                    str(tmp_path / "names.txt"), "--text-cache", str(tmp_path / "text.pt"), "--opt", "focalsam",
                    "--loss", "la", "--resume", "auto", "--tte", "five"])
    with pytest.raises(SystemExit, match="--finetune vpt-deep does not fit model 'lt_cnn_small'"):
        train_main(["--n-max", "30", "--epochs", "1", "--output", str(tmp_path), "--experiment", "cnn",
                    "--finetune", "vpt-deep"])


def test_text_prompts_name_wordnet_id_folders_by_their_imagenet_class():
    """A folder data set of ImageNet classes (sorted WordNet ids) prompts "a photo of a tench.", not of n01440764."""
    from argparse import Namespace

    from ltsam.train.model import class_names_for

    args = Namespace(class_names=None, dataset="folder", num_classes=2)
    assert class_names_for(args, ["n01440764", "n01443537"]) == ["tench", "goldfish"]
    with pytest.raises(SystemExit, match="class folder 'n99999999' is a WordNet id outside ImageNet-1k"):
        class_names_for(args, ["n01440764", "n99999999"])


def test_a_text_tower_of_another_clip_is_refused(tmp_path):
    """ViT-B-16's text features (the default --clip-model) for a ViT-B/32 image tower, or openai's for a LAION
    tower, would score the wrong image features silently: refused before any text tower is built."""
    from ltsam.train.model import build_model
    from ltsam_common import train_args

    for model, clip_flags, message in [
        ("vit_base_patch32_clip_224.openai", [], "--clip-model ViT-B-16 \\(--clip-pretrained openai\\) is not the CLIP "
         "model of --model vit_base_patch32_clip_224.openai: .*; pass --clip-model ViT-B-32 --clip-pretrained openai"),
        ("vit_base_patch16_clip_224.laion2b", [], "is not the CLIP model of --model vit_base_patch16_clip_224.laion2b"),
    ]:
        args = train_args.build_parser().parse_args([
            "--model", model, "--model-kwargs", "img_size=8", "patch_size=4", "depth=1", "embed_dim=32",
            "num_heads=2", "--num-classes", "10", "--classifier", "cosine", "--text-init", *clip_flags])
        with pytest.raises(SystemExit, match=message):
            build_model(args, NAMES, tmp_path, True, lambda: None)
    check_clip_pair("vit_large_patch14_clip_336.openai", "ViT-L-14-336-quickgelu", "openai")  # the same CLIP
