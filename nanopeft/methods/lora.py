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
DoRALinear (nanopeft/methods/dora.py) is this class plus a magnitude; the helpers below the class (the dense
view of a frozen base, merging) serve both. The dropout samplers live in nanopeft/methods/dropout.py.
docs/DORA.md ("LoRA", "Dropout semantics", "Merging").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .dropout import BitsDropout, MaskedScale, make_dropout
from ..nf4_linear import NF4Linear


class LoRALinear(nn.Module):
    """y = base(x) + (α/r)·B A dropout(x), wrapping (never subclassing) a frozen linear layer: `base_layer`
    is the frozen nn.Linear / NF4Linear; A (r, in) and B (out, r) are fp32. DoRALinear extends it."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, dropout_sampler: str = "torch"):  # PEFT's LoraConfig defaults
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear or NF4Linear, got {type(base).__name__}")
        check_adapter_args(rank, alpha, dropout)
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.lora_dropout = make_dropout(dropout, dropout_sampler)
        self.lora_A, self.lora_B = make_lora_pair(base, rank)   # A (r, in), B (out, r), fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The low-rank path runs first: backward needs its tensors, never x W0ᵀ. Under gradient
        # checkpointing the recomputation stops at the last saved tensor (torch's non-reentrant
        # early stop), so for a block's last Linear (the MLP's down projection) it now ends before
        # the frozen product: a third of a ViT block's matmuls are not recomputed. The sum is the same.
        xa = x.to(self.lora_A.weight.dtype)                     # adapters compute in fp32
        su = self.lowrank(xa)                                   # (..., out) = s·B A dropout(x)
        y = self.base_layer(x)                                  # (..., out) = x W0ᵀ + b, base dtype
        return (y + su).to(y.dtype)                             # LoRA Eq. 3, back to the base dtype

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # ΔW = s·BA, (out, in) fp32

    @torch.no_grad()
    def merged(self, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain layer with W = W0 + s·BA: same output, no adapter cost at inference."""
        W = base_weight(self.base_layer, torch.float32) + self.delta_weight()  # (out, in), fp32 sum
        return merged_layer(self.base_layer, W, requantize, dtype)

    def lowrank(self, xa: torch.Tensor) -> torch.Tensor:
        """s·B A dropout(x), (..., out) fp32: as written, or with BitsDropout in training the folded fast path below."""
        if isinstance(self.lora_dropout, BitsDropout) and self.lora_dropout.training:
            return self.lowrank_folded(xa)
        return self.scaling * self.lora_B(self.lora_A(self.lora_dropout(xa)))

    def lowrank_folded(self, xa: torch.Tensor) -> torch.Tensor:
        """Fast path (it pays on a whole step: docs/BENCHMARKS.md): s·B A dropout(x) in training with BitsDropout,
        its two scalars moved onto the rank-r tensor:

            s · B A (x ⊙ m / (1 − p))  =  B ((s / (1 − p)) · A (x ⊙ m))      (A, B linear, no bias)

        The written order scales the (N, in) input by 1/(1 − p) and the (N, out) output by s, in forward
        and again in backward; here one (N, r) tensor is scaled, r ≪ in, out. The same mask (the same
        draw from the generator as BitsDropout's), the same value up to fp32 rounding (tests/test_lora.py).
        LoRA takes it, and DoRA in "lora" dropout mode (its frozen path sees x, not x̃)."""
        d = self.lora_dropout
        h = self.lora_A(MaskedScale.apply(xa, d.mask(xa.shape, xa.device), None))  # (..., r)
        return self.lora_B(h * (self.scaling / (1.0 - d.p)))   # (..., out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


# ---- what LoRA and DoRA build on: checks, init, the dense view of a frozen base --------------------------

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


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
    """W0 (out, in) as a dense tensor: the weight itself, or NF4's dequantized weight; with `rows`
    (k,) only those rows, (k, in) (for NF4, only those rows are dequantized).

    NF4 is dequantized in the dtype it was quantized from, then cast: that is what bitsandbytes'
    `dequantize_4bit` returns, so DoRA's magnitude and norm read exactly the W0 PEFT's QDoRA reads.
    """
    if base.weight.is_meta:  # NF4Linear.weight is its packed codes
        raise RuntimeError(f"the base weight of this {type(base).__name__}({base.in_features}, "
                           f"{base.out_features}) is still on the meta device: load the checkpoint first")
    if isinstance(base, NF4Linear):
        w = base.dequantize(base.weight_dtype, rows)
    else:
        w = base.weight if rows is None else base.weight[rows]
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


# ---- merging: what an adapter leaves behind ----------------------------------------------------------

def merged_layer(base: nn.Module, weight: torch.Tensor, requantize: bool = False,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen layer computing x·weightᵀ + base.bias: what a merged adapter leaves in its place.

    An nn.Linear in `dtype` (default: the base dtype; for NF4 its compute dtype), or, with
    requantize=True and an NF4 base, a fresh NF4Linear (lossy: the merged weight is rounded to NF4
    again; 4× smaller). docs/DORA.md ("Merging").
    """
    bias = base.bias.detach() if base.bias is not None else None
    nf4 = isinstance(base, NF4Linear)
    dtype = dtype or (base.compute_dtype if nf4 else base.weight.dtype)
    if nf4 and requantize:
        return NF4Linear.from_weight(weight.to(dtype), bias, blocksize=base.blocksize,
                                     double_quant=base.double_quant, compute_dtype=dtype)
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight)  # the fp32 merged sum, rounded once into `dtype`
        if bias is not None:
            out.bias.copy_(bias)
    return out.requires_grad_(False)
