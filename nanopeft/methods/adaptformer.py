"""AdaptFormer: a bottleneck MLP in parallel with each frozen MLP (Chen et al. 2022, NeurIPS, arXiv:2205.13535).

    x′  = x + dp(λ1 · Attn(LN1(x)))                      the frozen attention half of the block, unchanged
    x̃   = W_up · dropout(ReLU(W_down x′ + b_down)) + b_up   down: D → r, up: r → D
    out = x′ + dp(λ2 · (MLP(LN2(x′)) + s·x̃))             s fixed (default 0.1), times `alpha` for WiSE

        x′ ─┬─► LN2 ─► MLP (frozen) ─────────────────────────────┐
            └─► down ─► ReLU ─► dropout ─► up ─► ×s·α  (fp32) ───(+)─► ×λ2 (frozen) ─► drop-path ─► (+ x′) ─► out

What trains: down (D·r + r) and up (r·D + D) of every block, fp32: L·(2Dr + r + D) (r = 64: ViT-B/16
1,189,632; ViT-7B/16 21,137,920). Every backbone weight stays frozen; an NF4 base stays 4-bit.

Placement on DINOv3 follows the unifying study's code (Mai et al. 2025, arXiv:2409.16434;
https://github.com/OSU-MLB/ViT_PEFT_Vision, its AdaptFormer setting: parallel, adapter input "before"
the norm, Kaiming init): the adapter reads the un-normalised residual stream x′, as the original
AdaptFormer code does too, and its output joins the MLP branch *before* the frozen LayerScale λ2, so the
adapter is scaled per channel like the MLP it runs beside (the original has no LayerScale). Two
differences from the study, both deliberate: the study applies drop-path to the MLP and adapter branches
separately, here one drop-path acts on their sum (the same at drop-path 0 and in eval); and the adapter
path is computed in fp32 and added to the MLP output before one rounding to the base dtype.

Init (the study's and LoRA's): W_down Kaiming-uniform(a = √5), i.e. U(±1/√D); b_down = 0; W_up = 0,
b_up = 0, so x̃ = 0 and the block is exactly the base block at step 0. The ReLU branch cannot be merged
into the weights; only its output scale can move: `alpha` (WiSE-FT as the study does it, scaling the
branch, Wortsman et al. 2022, arXiv:2109.01903) with alpha = 0 the base block exactly.

forward re-states Block.forward (nanopeft/backbones/dinov3.py) with the branch added; tests check it
against the base block, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import base_device


class AdaptFormerBlock(nn.Module):
    """A frozen DINOv3 Block (`base_layer`) with AdaptFormer's parallel bottleneck beside its MLP."""

    def __init__(self, block: nn.Module, rank: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        check_adaptformer_args(rank, scale, dropout)
        D, device = block.norm1.normalized_shape[0], base_device(block)
        self.base_layer = block.requires_grad_(False)
        self.rank, self.scale, self.alpha = rank, scale, 1.0
        self.down = nn.Linear(D, rank, bias=True, device=device, dtype=torch.float32)  # D → r
        self.up = nn.Linear(rank, D, bias=True, device=device, dtype=torch.float32)    # r → D
        self.adapter_dropout = nn.Dropout(dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # U(±1/√D)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)                              # x̃ = 0: the base block at init
            nn.init.zeros_(self.up.bias)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ = up(dropout(ReLU(down(x)))), (B, N, D) fp32."""
        h = F.relu(self.down(x.float()))                       # (B, N, r), fp32 like the adapter
        return self.up(self.adapter_dropout(h))                 # (B, N, D)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        x = x + b.drop_path(b.layer_scale1(b.attention(b.norm1(x), cos, sin)))  # x′ = x + dp(λ1·Attn(LN1 x))
        s = self.scale * self.alpha
        if s == 0:                                              # WiSE alpha = 0: the base block exactly
            return x + b.drop_path(b.layer_scale2(b.mlp(b.norm2(x))))
        a = self.adapter(x)                                     # x̃ from the un-normalised x′, fp32
        h = b.mlp(b.norm2(x))                                   # MLP(LN2(x′)), (B, N, D) base dtype
        return x + b.drop_path(b.layer_scale2((h + s * a).to(h.dtype)))  # x′ + dp(λ2·(MLP + s·x̃))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, alpha={self.alpha:g}"


def check_adaptformer_args(rank, scale, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def add_adaptformer(backbone: nn.Module, rank: int, scale: float = 0.1, dropout: float = 0.1) -> nn.Module:
    """Freeze the backbone and wrap every block of `backbone.layer` in an AdaptFormerBlock (in place).
    The study's defaults: r = 64, s = 0.1 (its VTAB grid: r ∈ {4, 16, 32}, s ∈ {0.05, 0.1, 0.2})."""
    check_adaptformer_args(rank, scale, dropout)
    if adaptformer_blocks(backbone):
        raise ValueError("add_adaptformer: the model already has adapters; unwrap_adaptformer(model) first")
    backbone.requires_grad_(False)
    for i, block in enumerate(backbone.layer):
        backbone.layer[i] = AdaptFormerBlock(block, rank, scale, dropout).train(block.training)
    return backbone


def adaptformer_blocks(backbone: nn.Module) -> dict[str, AdaptFormerBlock]:
    """{module name: AdaptFormerBlock} ("layer.0", ...), in module order."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, AdaptFormerBlock)}


def unwrap_adaptformer(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Put the plain blocks back (in place); returns the adapter tensors, {"layer.0.down.weight": ..., ...}."""
    blocks = adaptformer_blocks(backbone)
    out = {}
    for name, blk in blocks.items():
        out |= {f"{name}.{k}": v.detach() for k, v in blk.named_parameters() if not k.startswith("base_layer.")}
        backbone.set_submodule(name, blk.base_layer)
    return out
