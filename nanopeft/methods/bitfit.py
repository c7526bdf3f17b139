"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2022, ACL, arXiv:2106.10199).

    y = W₀ x + b          W₀ frozen, b trained, for every affine map of the backbone

What trains on DINOv3: every parameter whose name ends in "bias", i.e.
    embeddings.patch_embeddings.bias                 the patch conv                     d
    layer.N.attention.{q,k,v,o}_proj.bias            the projections that have a bias   ViT-S/B/L: q, v, o; 7B: o
    layer.N.mlp.{gate,up,down}_proj.bias             the MLP                            h (+h gated) + d
    layer.N.norm1.bias, layer.N.norm2.bias, norm.bias the LayerNorms' β                 2d per block + d
LayerScale λ and the LayerNorm weights stay frozen. This is the selection of the paper's code
(`--bias-terms all`: every parameter named "...bias", LayerNorm biases included;
https://github.com/benzakenelad/BitFit) and of the unifying study (Mai et al. 2025, arXiv:2409.16434; code
https://github.com/OSU-MLB/ViT_PEFT_Vision, experiment/build_model.py, the substring "bias").

Count on DINOv3: per block (#biased q/k/v/o)·d + MLP biases + 2d, plus 2d (patch conv, final norm):
ViT-B/16 (q, v, o biased, GELU MLP) 6d + h per block, 93,696 in all; ViT-7B/16 (o only, SwiGLU)
4d + 2h per block, 1,318,912 in all (tests/test_methods.py derives both from the config).

Init: the pretrained biases themselves, so the model is exactly the base model at step 0. Merging is
nothing: the trained biases simply are the model's biases (save them, load them over the base).
An NF4 base keeps its 4-bit weights frozen; NF4Linear's bias is an ordinary Parameter whose gradient
NF4Matmul returns (nanopeft/nf4_linear.py), so BitFit trains it like any other bias.

The trained tensors keep the dtype the model was loaded in (they *are* the model's tensors): train a
bf16 model's biases with fp32 master copies or under autocast from an fp32 model, or bf16's 8-bit
mantissa rounds small updates away.
"""

from __future__ import annotations

import torch.nn as nn


def is_bias(name: str) -> bool:
    # "layer.3.attention.q_proj.bias", "norm.bias", "embeddings.patch_embeddings.bias"; never "lambda1"
    return name == "bias" or name.endswith(".bias")


def add_bitfit(backbone: nn.Module) -> nn.Module:
    """Freeze every backbone parameter, then make every bias trainable (in place; returns the backbone)."""
    backbone.requires_grad_(False)
    names = bitfit_names(backbone)
    if not names:
        raise ValueError(f"add_bitfit: this {type(backbone).__name__} has no parameter named '...bias'")
    params = dict(backbone.named_parameters())
    for n in names:
        params[n].requires_grad_(True)                      # y = W₀ x + b: only b learns
    return backbone


def bitfit_names(backbone: nn.Module) -> list[str]:
    """The names of the parameters BitFit trains (every bias), in module order."""
    return [n for n, _ in backbone.named_parameters() if is_bias(n)]
