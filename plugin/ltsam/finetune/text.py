"""Cosine classifier initialised from CLIP text features (LIFT's and Focal-SAM's "text_feat" head).

The text tower (``open_clip``) encodes the prompt template per class name; the L2-normalised text features
are mapped back to the image tower's feature space by the transpose of CLIP's image projection and normalised
again (``reference/foundation.md``), so they score the backbone's pre-projection feature directly. The
features are computed once and cached in a file: later runs, other ranks and offline machines read the file
and need no text tower.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEMPLATE = "a photo of a {}."
_TIMM_CLIP = re.compile(r"^vit_(base|large|huge|giant|gigantic)_patch(\d+)(?:_plus)?_clip(?:_quickgelu)?_\d+"
                        r"(?:\.(\w+))?$")
_OPEN_CLIP = re.compile(r"^ViT-(B|L|H|g|bigG)-(\d+)(?:-|$)")
_SIZES = {"base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "bigG"}


class CosineClassifier(nn.Module):
    """logits = scale * <normalize(feature), normalize(w_c)>: a bias-free weight per class (LIFT: scale 25)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 25.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(0.0, 0.02))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def set_cosine_classifier(model: nn.Module, scale: float, weights: Tensor | None = None) -> CosineClassifier:
    """Replace the model's classifier (whatever timm calls it) by a cosine classifier of the same shape."""
    old = model.get_classifier()
    name = next((n for n, m in model.named_modules() if m is old and n), None)
    if name is None or not isinstance(old, nn.Linear):
        raise ValueError(f"--classifier cosine: model {type(model).__name__} has no Linear classifier to replace")
    head = CosineClassifier(old.in_features, old.out_features, scale).to(old.weight.device)
    if weights is not None:
        if tuple(weights.shape) != tuple(head.weight.shape):
            raise ValueError(f"--classifier cosine: text features of shape {tuple(weights.shape)} do not fit the "
                             f"classifier ({old.out_features} classes x {old.in_features} features); the CLIP "
                             "text tower must belong to the image tower (--clip-model)")
        with torch.no_grad():
            head.weight.copy_(weights)
    model.set_submodule(name, head)
    return head


def check_clip_pair(model: str, clip_model: str, clip_pretrained: str | None) -> None:
    """Refuse a text tower that is not ``model``'s own CLIP (``vit_base_patch32_clip_224.openai`` needs ViT-B-32
    with openai weights): its features would score another image tower's features, silently. Checked where
    both names say it: a timm CLIP tower (fine-tuned tags aside) and an open_clip ``ViT-{size}-{patch}``."""
    tower, text = _TIMM_CLIP.match(model), _OPEN_CLIP.match(clip_model)
    if not tower or not text or "_ft_" in (tower.group(3) or ""):
        return
    size, patch, tag = _SIZES[tower.group(1)], tower.group(2), tower.group(3)
    if (size, patch) != text.groups() or (tag is not None and (tag == "openai") != (clip_pretrained == "openai")):
        weights = " --clip-pretrained openai" if tag == "openai" else " and its --clip-pretrained weights"
        raise ValueError(f"--clip-model {clip_model} (--clip-pretrained {clip_pretrained}) is not the CLIP model of "
                         f"--model {model}: its text features would score another image tower; pass --clip-model "
                         f"ViT-{size}-{patch}{weights}")


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """One class name per line, in label order; a wrong count names the file and both counts."""
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"--class-names '{path}' lists {len(names)} class names, but the data set has "
                         f"{num_classes} classes; give one name per class, in label order")
    return names


@torch.no_grad()
def compute_text_features(names: Sequence[str], clip_model: str, clip_pretrained: str | None,
                          template: str = TEMPLATE, clip: nn.Module | None = None) -> Tensor:
    """Normalised text features of ``template`` per class, in the image tower's feature space (C x D).

    ``clip`` (an open_clip model) skips building one, e.g. a random-init tower in tests."""
    import open_clip

    if clip is None:
        clip = open_clip.create_model(clip_model, pretrained=clip_pretrained or None)
    clip = clip.eval()
    tokens = open_clip.get_tokenizer(clip_model)([template.format(n.replace("_", " ")) for n in names])
    text = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    projection = getattr(clip.visual, "proj", None)
    if projection is None:
        raise ValueError(f"--clip-model {clip_model}: its image tower has no linear projection to map text "
                         "features back to image features")
    return F.normalize(text @ projection.float().T, dim=-1)


def text_features(names: Sequence[str], cache: str | Path, clip_model: str, clip_pretrained: str | None,
                  template: str = TEMPLATE, clip: nn.Module | None = None) -> Tensor:
    """The cached features when ``cache`` holds them for these names, model and template; else computed and
    written to ``cache``. A cache made for other names or another model is refused, not silently reused."""
    cache = Path(cache)
    key = {"names": list(names), "clip_model": clip_model, "clip_pretrained": clip_pretrained or "",
           "template": template}
    if cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        differs = [k for k, v in key.items() if stored.get(k) != v]
        if differs:
            raise ValueError(f"text-feature cache '{cache}' was computed for another {differs[0].replace('_', ' ')}"
                             f"; delete it or pass another --text-cache")
        return stored["features"]
    features = compute_text_features(names, clip_model, clip_pretrained, template, clip)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({**key, "features": features.cpu()}, tmp)
    tmp.replace(cache)
    return features
