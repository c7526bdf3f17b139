"""SSF: scale and shift the output features of frozen layers (Lian et al. 2022, NeurIPS, arXiv:2210.08823).

    y = γ ⊙ base(x) + β          γ, β ∈ ℝ^C, one pair per output channel of the operation it follows

        x ─► base_layer (frozen Linear / NF4Linear / LayerNorm / Conv2d, its own dtype) ─► ×γ ─► +β ─► .to(base dtype)

What trains: the fp32 vectors `ssf_scale` γ and `ssf_shift` β of each wrapped layer; every backbone weight
stays frozen (an NF4 base stays 4-bit). Placement on DINOv3 follows the unifying study (Mai et al. 2025,
arXiv:2409.16434; code https://github.com/OSU-MLB/ViT_PEFT_Vision, the same places as the SSF authors'
code): after the patch conv, norm1, norm2 and the final norm; on the attention's qkv output, which the
study holds as one fused 3d-vector, so here one pair on each of q_proj, k_proj, v_proj (d each, the same
count); after o_proj, before LayerScale; after the MLP's first Linear(s) (gate_proj and up_proj when
gated: our extension, the study never ran SwiGLU) and after down_proj.
Count: 14d + 2h per GELU block, 14d + 4h per SwiGLU block, + 4d: ViT-B/16 205,824, ViT-7B/16 3,620,864.

Init: γ = 1, β = 0 exactly, so step 0 is exactly the base model. This departs on purpose from the study's
and the authors' γ ~ N(1, 0.02), β ~ N(0, 0.02), which starts near but not at the base model, and
gives WiSE (below) a clean θ₀.

Merging (`merged()`): γ, β fold into the layer they follow, y = (diag(γ) W) x + (γ ⊙ b + β), so inference
costs nothing. A layer without a bias gets one (β must live somewhere): DINOv3's k_proj, and every q/k/v
of the 7B. Under RoPE a k bias is not softmax-invariant, so it cannot be dropped.
WiSE-FT (Wortsman et al. 2022, arXiv:2109.01903) is `wise_(α)`: the merged layer is linear in (γ, β), so
interpolating (γ, β) between (1, 0) and the trained values interpolates the merged weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .lora import base_device, base_weight
from ..nf4_linear import NF4Linear

KINDS = (nn.Linear, NF4Linear, nn.LayerNorm, nn.Conv2d)
# inside block N, in forward order; gate_proj only where the MLP is gated
SSF_TARGETS = ("norm1", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
               "norm2", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def num_channels(base: nn.Module) -> int:
    """C, the size of the output channel SSF scales: out_features, out_channels, or the LN width."""
    if isinstance(base, nn.LayerNorm):
        if len(base.normalized_shape) != 1:
            raise ValueError(f"SSF wraps a LayerNorm over one dim, got normalized_shape={base.normalized_shape}")
        return base.normalized_shape[0]
    return base.out_channels if isinstance(base, nn.Conv2d) else base.out_features


class SSF(nn.Module):
    """y = γ ⊙ base(x) + β over the output channel (the last dim; dim 1 of a conv's (B, C, h, w))."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, KINDS):
            raise TypeError(f"SSF wraps an nn.Linear, NF4Linear, nn.LayerNorm or nn.Conv2d, got {type(base).__name__}")
        C, device = num_channels(base), base_device(base)
        self.base_layer = base.requires_grad_(False)
        self.ssf_scale = nn.Parameter(torch.ones(C, device=device, dtype=torch.float32))   # γ = 1
        self.ssf_shift = nn.Parameter(torch.zeros(C, device=device, dtype=torch.float32))  # β = 0

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        g, b = self.ssf_scale, self.ssf_shift                   # (C,), (C,)
        if isinstance(self.base_layer, nn.Conv2d):
            return g[:, None, None], b[:, None, None]           # (C, 1, 1): the channels of (B, C, h, w)
        return g, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                                  # (..., C) or (B, C, h, w), base dtype
        g, b = self.scale_shift()
        return (y * g + b).to(y.dtype)                          # SSF: γ ⊙ y + β in fp32, back to the base dtype

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The plain layer with γ and β folded in: the same output, no SSF cost (fp32 fold, rounded once)."""
        base, g, beta = self.base_layer, self.ssf_scale, self.ssf_shift
        C = g.shape[0]
        if isinstance(base, nn.LayerNorm):
            dtype = base.weight.dtype if base.weight is not None else g.dtype
            w = base.weight.float() if base.weight is not None else torch.ones_like(g)
            b = base.bias.float() if base.bias is not None else torch.zeros_like(g)
            out = nn.LayerNorm(C, eps=base.eps, device=g.device, dtype=dtype)
            out.weight.copy_(g * w)                             # w' = γ ⊙ w
            out.bias.copy_(g * b + beta)                        # b' = γ ⊙ b + β
            return out.requires_grad_(False)
        b = base.bias.float() if base.bias is not None else torch.zeros_like(g)
        if isinstance(base, nn.Conv2d):
            out = copy.deepcopy(base)
            W = base.weight.float() * g[:, None, None, None]    # (C, in/groups, k, k): row c times γ_c
            out.weight = nn.Parameter(W.to(base.weight.dtype))
            out.bias = nn.Parameter((g * b + beta).to(base.weight.dtype))  # b' = γ ⊙ b + β, per out channel
            return out.requires_grad_(False)
        dtype = base.compute_dtype if isinstance(base, NF4Linear) else base.weight.dtype
        W = g[:, None] * base_weight(base, torch.float32)       # W' = diag(γ) W, (out, in) fp32
        out = nn.Linear(base.in_features, C, bias=True, device=g.device, dtype=dtype)
        out.weight.copy_(W)
        out.bias.copy_(g * b + beta)                            # b' = γ ⊙ b + β (b = 0 if the base had none)
        return out.requires_grad_(False)

    @torch.no_grad()
    def wise_(self, alpha: float) -> "SSF":
        """WiSE-FT in place: (γ, β) ← (1 − α)·(1, 0) + α·(γ, β), i.e. γ ← 1 + α(γ − 1), β ← αβ.

        merged() maps (γ, β) linearly to (diag(γ) W, γ ⊙ b + β), so this gives the merged layer
        (1 − α)·(W, b) + α·(W', b'): α = 0 is the pretrained layer, α = 1 leaves the trained one."""
        # torch.lerp is exact at both ends: weight 0 returns start, weight 1 returns end
        self.ssf_scale.copy_(torch.lerp(torch.ones_like(self.ssf_scale), self.ssf_scale, alpha))
        self.ssf_shift.copy_(torch.lerp(torch.zeros_like(self.ssf_shift), self.ssf_shift, alpha))
        return self

    def extra_repr(self) -> str:
        return f"channels={self.ssf_scale.shape[0]}"


def add_ssf(backbone: nn.Module) -> nn.Module:
    """Freeze the backbone and wrap the patch conv, norm1, q/k/v/o_proj, norm2, the MLP's Linears and the
    final norm of a DINOv3ViT in SSF (in place; returns the backbone). Exactly the base model at init."""
    if ssf_layers(backbone):
        raise ValueError("add_ssf: the model already has SSF layers")
    backbone.requires_grad_(False)
    modules = dict(backbone.named_modules())
    names = ["embeddings.patch_embeddings"]
    for i in range(len(backbone.layer)):
        names += [f"layer.{i}.{t}" for t in SSF_TARGETS if f"layer.{i}.{t}" in modules]
    names.append("norm")
    for name in names:
        base = modules[name]
        backbone.set_submodule(name, SSF(base).train(base.training))
    return backbone


def ssf_layers(backbone: nn.Module) -> dict[str, SSF]:
    """{module name: SSF} of every SSF wrapper in the model, in module order."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, SSF)}
