"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685).

    y = W0 x + b + s · B A dropout(x),   s = α / r          (LoRA Eq. 3, with PEFT's dropout placement)
                                         s = α / √r         (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732)

        x ─┬─► base_layer: frozen W0 (out, in), b ─────────────────────────────┐  (nn.Linear or NF4Linear,
           │                                                                   │   in its own dtype)
           └─► x.float() ─► dropout ─► lora_A (in → r) ─► lora_B (r → out) ─► ×s ─(+)─► .to(base dtype) ─► y

A starts kaiming-uniform(a=√5), i.e. U(±1/√in), and B at zero, so step 0 is exactly the base model.
The adapters stay fp32 whatever the base dtype (bf16, or NF4 with a bf16 compute dtype): their
updates are tiny relative to their values, and bf16's 8-bit mantissa would round many of them away.
The sum is cast back to the base output's dtype, as PEFT does.

Attribute names are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so the state-dict key
`layer.0.attention.q_proj.lora_A.weight` is the PEFT file key minus its `base_model.model.model.` prefix.
This file also holds the helpers DoRA shares: the dense view of a frozen base and merging into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4_linear import NF4Linear


def is_linear(module: nn.Module) -> bool:
    """The layers an adapter can wrap: a plain `nn.Linear` or our frozen 4-bit `NF4Linear`."""
    return isinstance(module, (nn.Linear, NF4Linear))


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    # s = α/r (LoRA §4.1: "we scale ΔW x by α/r"); rsLoRA's α/√r keeps the update's size stable as r grows
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_adapter_args(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def base_device(base: nn.Module) -> torch.device:
    t = next(iter([*base.parameters(), *base.buffers()]), None)
    return t.device if t is not None else torch.device("cpu")


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W0 (out, in) as a dense tensor: the weight itself, or NF4's dequantized weight.

    NF4 is dequantized in the dtype it was quantized from, then cast: that is what bitsandbytes'
    `dequantize_4bit` returns, so DoRA's magnitude and norm read exactly the W0 PEFT's QDoRA reads.
    """
    w = base.dequantize(base.weight_dtype) if isinstance(base, NF4Linear) else base.weight
    if w.is_meta:
        raise RuntimeError(f"the base weight of this {type(base).__name__}({base.in_features}, "
                           f"{base.out_features}) is still on the meta device: load the checkpoint first")
    return w.to(dtype)


def make_lora_pair(base: nn.Module, rank: int) -> tuple[nn.Linear, nn.Linear]:
    """lora_A (in → r) and lora_B (r → out), fp32, on the base layer's device, initialised."""
    device = base_device(base)
    lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
    lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
    init_lora_pair(lora_A, lora_B)
    return lora_A, lora_B


@torch.no_grad()
def init_lora_pair(lora_A: nn.Linear, lora_B: nn.Linear) -> None:
    # A ~ kaiming_uniform(a=√5) = U(±1/√in): microsoft/LoRA loralib/layers.py and PEFT's default.
    # B = 0, so B·A = 0 and the adapted model starts as the base model (LoRA §4.1).
    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def frozen_matmul(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W0ᵀ, without the bias, computed the way the base layer computes it: in its dtype (or the
    autocast dtype), and for NF4 through NF4Matmul, whose backward re-dequantizes W0 instead of
    keeping a full-precision copy alive."""
    if isinstance(base, NF4Linear):
        return base.matmul(x, bias=False)
    return F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(base.weight.dtype), base.weight)


def plain_like(base: nn.Module, weight: torch.Tensor, requantize: bool = False) -> nn.Module:
    """A frozen layer that computes x·weightᵀ + base.bias: what a merged adapter leaves behind.

    nn.Linear base: an nn.Linear in the base dtype. NF4 base: an nn.Linear in the compute dtype, or,
    with requantize=True, a fresh NF4Linear (lossy: the merged weight is rounded to 16 levels again).
    """
    bias = base.bias.detach() if base.bias is not None else None
    if isinstance(base, NF4Linear):
        dtype = base.compute_dtype
        if requantize:
            return NF4Linear.from_weight(weight.to(dtype), bias, blocksize=base.blocksize,
                                         double_quant=base.double_quant, compute_dtype=dtype)
    else:
        dtype = base.weight.dtype
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None,
                    device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.requires_grad_(False)
    return out


def wrap_base(adapter: nn.Module, base: nn.Module, rank: int, alpha: float, dropout: float,
              use_rslora: bool) -> None:
    """What LoRA and DoRA share: the frozen base, the scaling s, the dropout and A (r, in), B (out, r)."""
    if not is_linear(base):
        raise TypeError(f"{type(adapter).__name__} wraps an nn.Linear or NF4Linear, got {type(base).__name__}")
    check_adapter_args(rank, alpha, dropout)
    adapter.base_layer = base.requires_grad_(False)
    adapter.in_features, adapter.out_features = base.in_features, base.out_features
    adapter.rank, adapter.alpha, adapter.use_rslora = rank, alpha, use_rslora
    adapter.scaling = lora_scaling(alpha, rank, use_rslora)
    adapter.lora_dropout = make_dropout(dropout)
    adapter.lora_A, adapter.lora_B = make_lora_pair(base, rank)   # A (r, in), B (out, r), fp32


class LoRALinear(nn.Module):
    """y = base(x) + (α/r)·B A dropout(x), wrapping (never subclassing) a frozen linear layer."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False):  # the defaults are PEFT's LoraConfig defaults
        super().__init__()
        wrap_base(self, base, rank, alpha, dropout, use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                                  # (..., out) = x W0ᵀ + b, base dtype
        x = x.to(self.lora_A.weight.dtype)                      # adapters compute in fp32
        h = self.lora_A(self.lora_dropout(x))                   # (..., r)
        return (y + self.scaling * self.lora_B(h)).to(y.dtype)  # LoRA Eq. 3, back to the base dtype

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # ΔW = s·BA, (out, in) fp32

    @torch.no_grad()
    def merged(self, requantize: bool = False) -> nn.Module:
        """The plain layer with W = W0 + s·BA: same output, no adapter cost at inference."""
        W = base_weight(self.base_layer, torch.float32) + self.delta_weight()  # (out, in), fp32 sum
        return plain_like(self.base_layer, W, requantize)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
