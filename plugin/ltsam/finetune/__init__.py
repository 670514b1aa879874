"""Lightweight (parameter-efficient) fine-tuning of pretrained timm models, as LIFT and Focal-SAM run it.

One call, :func:`prepare_model`, adds the mode's tuner to the model, freezes every other backbone weight
(``requires_grad=False``) and returns the trainable parameters (tuner + classifier), which are all an
optimizer should hold: the SAM-family perturbation and its norm then cover exactly them.

Placement rule (every tuner mode): the tuner enters each of the last ``blocks`` transformer blocks (default:
all) of a timm ``VisionTransformer`` whose blocks are timm's pre-norm ``Block``; LoRA goes through ``peft`` on
those blocks' attention ``qkv`` Linear (timm fuses q, k and v, so the update covers all three) and, with
``lora_mlp``, every Linear of their MLP (fc1, fc2; SwiGLU's fc1_g, fc1_x, fc2). VPT prompts follow the prefix
tokens (class, distillation, register tokens: whichever the model has) and are counted among them, so every
pooling skips them; DeiT distilled trains both heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ltsam.finetune.modules import Bottleneck, TunedBlock, add_scale_shift, prompt_init_bound
from ltsam_common.names import FINETUNE_MODES

MODES = FINETUNE_MODES
BLOCK_MODES = ("vpt-shallow", "vpt-deep", "adapter", "adaptformer", "lora", "ssf")


class FinetuneError(ValueError):
    """A fine-tuning request that does not fit the model, in one sentence."""


@dataclass(frozen=True)
class FinetuneOptions:
    """Sizes of the tuners; ``None`` takes LIFT's default for the model."""

    blocks: int | None = None  # tune the last N transformer blocks (None: all)
    bottleneck: int | None = None  # AdaptFormer / Adapter width
    prompt_length: int = 10  # VPT tokens
    lora_rank: int | None = None
    lora_mlp: bool = False  # LoRA also on the MLP Linears


def default_bottleneck(num_classes: int, num_layers: int) -> int:
    """LIFT's size rule: 2 ** max(0, floor(log2(C / (2 L)))); 1000 classes and 12 layers give 32."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * num_layers))))


def _tuned_blocks(model: nn.Module, mode: str, name: str, blocks: int | None) -> list[tuple[int, Block]]:
    if not isinstance(model, VisionTransformer) or not all(type(b) in (Block, TunedBlock) for b in model.blocks):
        raise FinetuneError(f"--finetune {mode} does not fit model '{name}': it needs a timm VisionTransformer "
                            "with timm's pre-norm Block (e.g. vit_base_patch16_clip_224); use full, classifier, "
                            "bias or ln for other models")
    depth = len(model.blocks)
    count = depth if blocks is None else blocks
    if not 1 <= count <= depth:
        raise FinetuneError(f"--finetune-blocks {blocks} must lie in [1, {depth}] for model '{name}' "
                            f"({depth} blocks)")
    return list(enumerate(model.blocks))[depth - count:]


def prepare_model(model: nn.Module, mode: str, options: FinetuneOptions | None = None,
                  name: str | None = None) -> list[nn.Parameter]:
    """Add ``mode``'s tuner to ``model`` in place, freeze the rest and return the trainable parameters.

    ``name`` (the timm model name) only words errors. Raises :class:`FinetuneError` for an unknown mode or one
    that does not fit the model (VPT on a CNN), naming both.
    """
    options = options or FinetuneOptions()
    name = name or type(model).__name__
    if mode not in MODES:
        raise FinetuneError(f"--finetune '{mode}' is not a fine-tuning mode; choose one of {', '.join(MODES)}")
    for flag, size in (("--bottleneck", options.bottleneck), ("--lora-rank", options.lora_rank)):
        if size is not None and size < 1:  # 0 would silently mean the default size
            raise FinetuneError(f"{flag} must be >= 1, got {size} (leave it out for LIFT's default)")
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    heads = model.get_classifier()  # DeiT distilled: (head, head_dist), both trained
    heads = heads if isinstance(heads, tuple) else (heads,)
    head_ids = {id(p) for head in heads if isinstance(head, nn.Module) for p in head.parameters()}
    if not head_ids:
        raise FinetuneError(f"--finetune {mode}: model '{name}' has no trainable classifier (num_classes=0?)")
    tuned = _tuned_blocks(model, mode, name, options.blocks) if mode in BLOCK_MODES else []
    if mode == "lora":
        _add_lora(model, tuned, options)
    else:
        _add_modules(model, mode, tuned, options, name)
    tuner_ids = _tuner_parameter_ids(model, mode)
    trainable = [p for p in model.parameters() if id(p) in head_ids or id(p) in tuner_ids]
    if not tuner_ids and mode != "classifier":
        raise FinetuneError(f"--finetune {mode}: model '{name}' has no {_WHAT.get(mode, 'tuner')} to tune")
    for p in model.parameters():
        p.requires_grad_(id(p) in head_ids or id(p) in tuner_ids)
    return trainable


_WHAT = {"bias": "bias", "ln": "LayerNorm parameters"}
_TUNER_KEYS = ("prompts", "adaptformer.", "adapter.", ".ssf.", "lora_")


def _tuner_parameter_ids(model: nn.Module, mode: str) -> set[int]:
    """The parameters ``mode`` trains besides the classifier."""
    if mode == "classifier":
        return set()
    if mode == "bias":
        return {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    if mode == "ln":
        return {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    return {id(p) for n, p in model.named_parameters() if any(key in n for key in _TUNER_KEYS)}


def _mlp_linears(block: Block) -> list[str]:
    """The MLP's Linear layers by name: fc1, fc2 (timm's Mlp, GluMlp) or fc1_g, fc1_x, fc2 (SwiGLU: AIMv2)."""
    return [n for n, m in block.mlp.named_children() if isinstance(m, nn.Linear)]


def _add_modules(model: nn.Module, mode: str, tuned: list[tuple[int, Block]], options: FinetuneOptions,
                 name: str) -> None:
    if not tuned:  # bias, ln, classifier: nothing to add
        return
    dim = model.embed_dim
    if mode in ("adapter", "adaptformer"):
        width = options.bottleneck or default_bottleneck(model.num_classes, len(model.blocks))
        for _, block in tuned:
            setattr(TunedBlock.from_block(block), mode, Bottleneck(dim, width, scaled=mode == "adaptformer"))
    elif mode == "ssf":
        for _, block in tuned:
            for module in (block.norm1, block.attn.qkv, block.attn.proj, block.norm2,
                           *(getattr(block.mlp, n) for n in _mlp_linears(block))):
                add_scale_shift(module, module.out_features if isinstance(module, nn.Linear) else dim)
    else:  # VPT: the prompts stay in the sequence to the end, counted as prefix tokens so pooling skips them
        length = options.prompt_length
        if length < 1:
            raise FinetuneError(f"--prompt-length must be >= 1, got {length}")
        if getattr(model, "dynamic_img_size", False):  # timm would resample prompts as position embeddings
            raise FinetuneError(f"--finetune {mode} does not fit model '{name}' built with dynamic_img_size=True "
                                "(timm counts the prompts as prefix tokens when it resamples position "
                                "embeddings); build it without dynamic_img_size")
        patch = model.patch_embed.patch_size[0]
        bound = prompt_init_bound(patch, dim)
        prompt_at = model.num_prefix_tokens
        for k, (_, block) in enumerate(tuned):
            if mode == "vpt-shallow" and k > 0:
                break
            prompts = nn.init.uniform_(model.patch_embed.proj.weight.new_empty(length, dim), -bound, bound)
            TunedBlock.from_block(block).prompts = nn.Parameter(prompts)
            block.insert_prompts = k == 0
            block.prompt_at = prompt_at
        model.num_prefix_tokens += length


def _add_lora(model: nn.Module, tuned: list[tuple[int, Block]], options: FinetuneOptions) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    rank = options.lora_rank or default_bottleneck(model.num_classes, len(model.blocks))
    targets = [f"blocks.{i}.attn.qkv" for i, _ in tuned]
    if options.lora_mlp:
        targets += [f"blocks.{i}.mlp.{n}" for i, block in tuned for n in _mlp_linears(block)]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=targets)
    inject_adapter_in_model(config, model)
