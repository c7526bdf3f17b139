"""LayerNorm tuning: train only the LayerNorms' affine parameters, freeze everything else.

    LN(x) = γ ⊙ (x − μ) / √(σ² + ε) + β          γ, β ∈ ℝ^d trained; μ, σ² over the channels of each token

Zhao et al. 2023, "Tuning LayerNorm in Attention" (arXiv:2312.11420), the paper HF PEFT's
`LNTuningConfig` implements; a standard baseline of the unifying study of vision PEFT (Mai et al. 2025,
arXiv:2409.16434; code https://github.com/OSU-MLB/ViT_PEFT_Vision, experiment/build_model.py, which
trains every parameter whose name contains "norm").

What trains on DINOv3: γ and β of every nn.LayerNorm, i.e. norm1 and norm2 of each block and the final
`norm`. LayerScale (`layer_scale1.lambda1`) is a per-channel scale too, but not a norm, and stays frozen,
as in the study. Count: 4d per block + 2d, for GELU and SwiGLU blocks alike: ViT-B/16 38,400,
ViT-7B/16 663,552 (tests/test_methods.py).

Init: the pretrained γ, β, so the model is exactly the base model at step 0; merging is nothing (the
trained tensors are the model's own). The same trained set as PEFT's LNTuningConfig with
target_modules=LN_TARGETS (PEFT trains a copy of each norm and swaps it in when merging; the numbers
are the same). The tensors keep the model's dtype (see the note in nanopeft/methods/bitfit.py).
"""

from __future__ import annotations

import torch.nn as nn

# PEFT's target_modules for this model: PEFT's default table has no DINOv3 entry, so name them.
# A PEFT entry matches a module named exactly so or ending in ".<entry>": layer.N.norm1, layer.N.norm2, norm.
LN_TARGETS = ("norm1", "norm2", "norm")


def add_layernorm(backbone: nn.Module) -> nn.Module:
    """Freeze every backbone parameter, then train the weight and bias of every nn.LayerNorm (in place)."""
    backbone.requires_grad_(False)
    norms = [m for m in backbone.modules() if isinstance(m, nn.LayerNorm)]
    if not any(True for m in norms for _ in m.parameters()):
        raise ValueError(f"add_layernorm: this {type(backbone).__name__} has no LayerNorm with affine parameters")
    for m in norms:
        m.requires_grad_(True)                              # γ (weight) and β (bias) of LN(x)
    return backbone


def layernorm_names(backbone: nn.Module) -> list[str]:
    """The names of the parameters LayerNorm tuning trains, in module order."""
    return [f"{n}.{k}" if n else k for n, m in backbone.named_modules() if isinstance(m, nn.LayerNorm)
            for k, _ in m.named_parameters(recurse=False)]
