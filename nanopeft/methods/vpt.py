"""VPT-Deep: learnable prompt tokens fed to every block (Jia et al. 2022, ECCV, arXiv:2203.12119).

    [x_i, _, E_i] = L_i([x_{i−1}, P_{i−1}, E_{i−1}])      i = 1 … L          (VPT-Deep)

    x (B, N, D) = [CLS, R registers │ h·w patches]
        └─► [CLS, R registers, n_p prompts │ h·w patches]  (B, N + n_p, D)
                └─► frozen Block L_i ─► drop the n_p prompt outputs ─► (B, N, D)

Each block gets fresh prompts P_{i−1} ∈ ℝ^{n_p×D}; what the previous block made of its prompts is thrown
away, as in the paper and in the unifying study's code (Mai et al. 2025, arXiv:2409.16434;
https://github.com/OSU-MLB/ViT_PEFT_Vision, model/vpt.py). What trains: the fp32 prompts, L·n_p·D numbers
(ViT-B/16, n_p = 10: 92,160; ViT-7B/16: 1,638,400). Only the deep variant is here.

Placement on DINOv3: right after CLS and the registers, before the patches. DINOv3 rotates (RoPE) only
the last h·w tokens and leaves every token before them un-rotated (Attention: prefix = N − h·w), so the
prompts are position-free tokens like the registers: trainable, per-block registers. The original VPT
puts them after CLS, the study in front of CLS; among un-rotated tokens attention is permutation-
equivariant, so the three orders give the kept tokens the same values (up to summation order). After
CLS + registers, CLS stays at index 0 and the registers at 1…R: nothing downstream (features(), a pooler)
changes.

Init: Xavier-uniform U(−v, v), v = √(6 / (3·p² + D)) with p the patch size (fan-in of a 3×p×p patch,
fan-out D), as in the VPT code and the study's: v = 0.0625 at p = 16, D = 768. Prompt dropout (default
0.1, the study's; the VPT code's default is 0) acts on the prompts in training, one mask per image.
VPT is NOT the base model at init: the prompts change attention from block 0 on. It cannot be merged:
each block attends over n_p more tokens at inference too. WiSE-style `alpha` scales the prompts;
alpha = 0 inserts none, so the block is exactly the base block.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .lora import base_device


class PromptedBlock(nn.Module):
    """A frozen DINOv3 Block (`base_layer`) run on [prefix, prompts, patches]; the prompt outputs are dropped."""

    def __init__(self, block: nn.Module, num_prompts: int, dropout: float = 0.1, patch_size: int = 16):
        super().__init__()
        check_vpt_args(num_prompts, dropout)
        D = block.norm1.normalized_shape[0]
        self.base_layer = block.requires_grad_(False)
        self.num_prompts, self.alpha = num_prompts, 1.0
        self.prompts = nn.Parameter(torch.empty(num_prompts, D, device=base_device(block), dtype=torch.float32))
        v = math.sqrt(6.0 / (3 * patch_size ** 2 + D))          # Xavier: √(6 / (fan_in + fan_out))
        nn.init.uniform_(self.prompts, -v, v)
        self.prompt_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:
            return self.base_layer(x, cos, sin)                 # no prompts at all: the base block exactly
        B, N, _ = x.shape
        prefix = N - cos.shape[-2]                              # CLS + registers: the un-rotated tokens before the patches
        P = self.prompt_dropout(self.prompts.expand(B, -1, -1)) * self.alpha  # (B, n_p, D) fp32, mask per image
        x = torch.cat([x[:, :prefix], P.to(x.dtype), x[:, prefix:]], dim=1)    # (B, N + n_p, D)
        x = self.base_layer(x, cos, sin)                        # prompts un-rotated: still before the h·w patches
        return torch.cat([x[:, :prefix], x[:, prefix + self.num_prompts:]], dim=1)  # (B, N, D): prompt outputs dropped

    def extra_repr(self) -> str:
        return f"num_prompts={self.num_prompts}, alpha={self.alpha:g}"


def check_vpt_args(num_prompts, dropout) -> None:
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def add_vpt(backbone: nn.Module, num_prompts: int, dropout: float = 0.1) -> nn.Module:
    """Freeze the backbone and wrap every block of `backbone.layer` in a PromptedBlock (in place)."""
    check_vpt_args(num_prompts, dropout)
    if vpt_blocks(backbone):
        raise ValueError("add_vpt: the model already has prompts; unwrap_vpt(model) first")
    backbone.requires_grad_(False)
    p = backbone.config.patch_size
    for i, block in enumerate(backbone.layer):
        backbone.layer[i] = PromptedBlock(block, num_prompts, dropout, p).train(block.training)
    return backbone


def vpt_blocks(backbone: nn.Module) -> dict[str, PromptedBlock]:
    """{module name: PromptedBlock} ("layer.0", ...), in module order."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, PromptedBlock)}


def unwrap_vpt(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Put the plain blocks back (in place); returns the prompts, {"layer.0.prompts": (n_p, D), ...}."""
    blocks = vpt_blocks(backbone)
    for name, pb in blocks.items():
        backbone.set_submodule(name, pb.base_layer)
    return {f"{name}.prompts": pb.prompts.detach() for name, pb in blocks.items()}
