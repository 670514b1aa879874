"""The small tuner modules no maintained library provides (AdaptFormer, Adapter, SSF, VPT prompts), and the one
place they enter a timm ViT: :class:`TunedBlock`, timm's pre-norm ``Block`` with the tuner slots filled.

Every module starts as the identity of the pretrained model (zero ``up`` projection, prompts aside), so a
fine-tuning run starts from the backbone's own predictions (``reference/foundation.md``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """LayerNorm -> down -> ReLU -> up: the shared body of AdaptFormer and the Houlsby adapter.

    ``up`` is zero so the branch adds nothing at the start; ``down`` is Kaiming-normal; biases zero.
    """

    def __init__(self, dim: int, bottleneck: int, scaled: bool) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_normal_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(1)) if scaled else None  # 1-d: DeepSpeed broadcasts bytes of it

    def forward(self, x: Tensor) -> Tensor:
        out = self.up(torch.relu(self.down(self.ln(x))))
        return out if self.scale is None else out * self.scale


class ScaleShift(nn.Module):
    """SSF: a learnable per-channel scale (init N(1, 0.02)) and shift (init N(0, 0.02)) of a layer's output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def _scale_shift_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    # a module-level function reading the hooked module's own child: a deep copy (EMA) uses its own copy
    return module.ssf(output)


def add_scale_shift(module: nn.Module, dim: int) -> None:
    """SSF after ``module``: its output passes through ``module.ssf`` (state-dict keys of the layer unchanged)."""
    module.ssf = ScaleShift(dim)
    module.register_forward_hook(_scale_shift_hook)


def prompt_init_bound(patch_size: int, dim: int) -> float:
    """VPT's Xavier-uniform bound for prompts in the patch-embedding space: sqrt(6 / (3 * p * p + dim))."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + dim))


class TunedBlock(Block):
    """timm's ``Block`` with tuner slots, all empty unless set by :func:`ltsam.finetune.prepare_model`:

    * ``prompts`` (VPT): ``insert_prompts`` puts them after the ``prompt_at`` prefix tokens; otherwise they
      replace the previous block's prompts in the same positions (VPT-deep);
    * ``adaptformer``: parallel to the MLP, fed the block's residual stream h: h + MLP(LN2(h)) + s * f(h);
    * ``adapter``: sequential after the MLP output y: y + f(y).

    Only the class changes (``block.__class__``): the block's own weights keep their state-dict keys.
    """

    insert_prompts: bool = False
    prompt_at: int = 0

    @classmethod
    def from_block(cls, block: Block) -> TunedBlock:
        """Turn ``block`` (timm's ``Block`` or already tuned) into a ``TunedBlock`` in place, slots empty."""
        if type(block) is not cls:
            block.__class__ = cls
            block.register_parameter("prompts", None)
            block.register_module("adaptformer", None)
            block.register_module("adapter", None)
        return block

    def forward(self, x: Tensor, **attention_options: Any) -> Tensor:
        """``attention_options``: what the installed timm's ViT passes its blocks for the attention (none in
        timm 1.0.13, ``attn_mask`` in 1.0.22, also ``is_causal`` in 1.0.31), passed on as given."""
        if self.prompts is not None:
            length = self.prompts.shape[0]
            prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            kept = x[:, self.prompt_at:] if self.insert_prompts else x[:, self.prompt_at + length:]
            x = torch.cat([x[:, :self.prompt_at], prompts, kept], dim=1)
        h = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attention_options)))
        y = self.mlp(self.norm2(h))
        if self.adapter is not None:
            y = y + self.adapter(y)
        out = h + self.drop_path2(self.ls2(y))
        if self.adaptformer is not None:
            out = out + self.adaptformer(h)
        return out
