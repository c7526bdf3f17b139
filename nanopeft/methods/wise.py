"""WiSE-FT: a weight-space ensemble of the fine-tuned and the pretrained model (Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models", arXiv:2109.01903, Eq. 1).

    θ_α = (1 − α)·θ0 + α·θ1        θ0 pretrained, θ1 fine-tuned; α = 1: the fine-tuned model,
                                    α = 0: the pretrained backbone (the fine-tuned head is kept either way)

One dense model, no extra cost at inference. The unifying study (Mai et al. 2025, arXiv:2409.16434) found
that it trades target accuracy against robustness; `eval.py --wise A` (and predict.py, export.py) applies
it to a run. What θ is, per method:

    lora, dora          the merged weights: W = (1 − α)·W0 + α·W′, W′ = W0 + s·BA (LoRA) or m·V/‖V‖ (DoRA);
                        for LoRA that is W0 + α·s·BA
    ssf                 γ ← 1 + α(γ − 1), β ← α·β: the merged layer is linear in (γ, β), so this is exactly
                        the interpolation of the merged weights (SSF.wise_)
    bitfit, layernorm,  the trained tensors themselves, against their pretrained values θ0 (kept by the
    full                caller before the run's tensors are loaded over them)
    vpt, adaptformer    no θ0 exists for an added module: the added branch is scaled by α (AdaptFormer's
                        output, VPT's prompts; α = 0 removes it), as the study's code does
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .adaptformer import AdaptFormerBlock
from .inject import adapter_layers, method_of, method_tensors
from .lora import base_weight, merged_layer
from .ssf import ssf_layers
from .vpt import PromptedBlock


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--wise must be in [0, 1], got {alpha!r}")
    return float(alpha)


@torch.no_grad()
def wise_(backbone: nn.Module, alpha: float, pretrained: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Interpolate the backbone's method towards the pretrained model, in place (LoRA and DoRA are merged).
    `pretrained`: θ0 of the tensors BitFit, LayerNorm tuning and full fine-tuning train, by name."""
    alpha, method = check_alpha(alpha), method_of(backbone)
    if alpha == 1.0:
        return backbone                                            # θ_1 = θ1: nothing to do
    for name, w in adapter_layers(backbone):                       # LoRA, DoRA
        W0 = base_weight(w.base_layer, torch.float32)              # (out, in)
        W1 = w.merged(dtype=torch.float32).weight                  # W′, the fine-tuned merged weight
        backbone.set_submodule(name, merged_layer(w.base_layer, torch.lerp(W0, W1, alpha)).train(w.training))
    for w in ssf_layers(backbone).values():
        w.wise_(alpha)
    for m in backbone.modules():
        if isinstance(m, (PromptedBlock, AdaptFormerBlock)):
            m.alpha = alpha                                        # the added branch scaled by α
    if method in ("bitfit", "layernorm", "full"):
        if pretrained is None:
            raise ValueError(f"--wise with {method}: the pretrained values of its tensors are needed")
        for name, p in method_tensors(backbone).items():
            p.copy_(torch.lerp(pretrained[name].to(p), p, alpha))  # (1 − α)·θ0 + α·θ1
    return backbone
