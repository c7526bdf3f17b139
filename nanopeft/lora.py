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
This file also holds what DoRA shares: AdapterBase (the state both adapters hold), the dense view of a
frozen base, the dropout samplers, and merging. docs/DORA.md ("LoRA", "Dropout semantics", "Merging").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DROPOUT_SAMPLERS
from .device import host_reads_are_free  # hardware questions live in device.py
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


# ---- dropout: torch's sampler (PEFT's masks, seed for seed), and a faster exact one ----------------

class BitsDropout(nn.Module):
    """Dropout(p) whose Bernoulli mask comes from raw random numbers instead of fp32 `bernoulli_`.

    Two exact samplers of the same law (each entry dropped independently with probability p); `mask`
    picks the cheaper one:

    - bits (any p; the only one off the CPU): one int32 draw per entry,
          keep_i = (u_i < t),  u_i uniform on the 2³² int32 values,  t = −2³¹ + round((1 − p)·2³²)
      so P(keep) = round((1 − p)·2³²) / 2³², within 2⁻³³ of 1 − p: finer than the 2⁻²⁴ grid of an fp32
      uniform. The bits are drawn 64 at a time (`random_` over the full int64 range, two int32 lanes).
    - skips (CPU, p ≤ SKIPS_MAX_P): only the dropped entries are drawn. The gaps between drops are
      i.i.d. Geometric(p), G = ⌊ln U / ln(1 − p)⌋ with U uniform on fp64's [0, 1) (inversion:
      P(G ≥ k) = P(U ≤ (1 − p)^k) = (1 − p)^k; Devroye 1986, "Non-Uniform Random Variate Generation",
      §X.2), so about p·n fp64 draws instead of n int32 ones: at p = 0.05, 20× fewer draws (each with
      a log and a scatter). Off the CPU it is not used: its "has it reached the end" test is a host sync.

    Kept entries are scaled by 1/(1 − p), as nn.Dropout does, so E[dropout(x)] = x. Both draw from
    torch's global generator, so `torch.manual_seed` and gradient checkpointing's RNG replay work as for
    nn.Dropout; the mask *stream* differs from bernoulli_'s, so the masks differ seed for seed (same
    distribution). Applying the mask costs what nn.Dropout's does (the adapters fold the 1/(1 − p) into
    their rank-r tensor instead: AdapterBase.lowrank_folded). Drawing the masks costs a fraction of
    fp32 `bernoulli_` (measured in docs/BENCHMARKS.md, "Whole step and inference"), so it is train.py's
    default (--dropout-sampler bits); make_dropout(p, "torch") keeps PEFT's masks seed for seed.
    Backward keeps the bool mask, like nn.Dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"BitsDropout needs 0 < p < 1, got {p!r}")
        self.p = p
        self.threshold = -2**31 + round((1.0 - p) * 2**32)  # int32: keep u < t

    def mask(self, shape, device) -> torch.Tensor:
        """A bool keep-mask of `shape`: P(True) = 1 − p per entry, independently."""
        if host_reads_are_free(device) and self.p <= SKIPS_MAX_P:  # skips ends on a host read
            return skips_keep_mask(shape, self.p, device)
        return keep_mask(shape, self.threshold, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return _MaskedScale.apply(x, self.mask(x.shape, x.device), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keep_mask(shape, threshold: int, device) -> torch.Tensor:
    """A bool mask of `shape` with P(True) = (threshold + 2³¹) / 2³² per entry (see BitsDropout)."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, None)  # full range
    return (bits.view(torch.int32)[:n] < threshold).view(shape)


# above it, skips' p·n fp64 uniforms (a log and a scatter each) cost more than bits' n int32 lanes and
# one compare (measured at p = 0.05 and 0.3: docs/BENCHMARKS.md "Inference with prepacked weights, ...")
SKIPS_MAX_P = 0.1


def skips_keep_mask(shape, p: float, device) -> torch.Tensor:
    """A bool mask of `shape` with P(False) = p per entry, independently, by geometric skips (see
    BitsDropout): the positions of the drops are running sums of Geometric(p) gaps + 1."""
    n = math.prod(shape)
    keep = torch.ones(n + 1, dtype=torch.bool, device=device)  # slot n: the drops that land past the end
    inv = 1.0 / math.log1p(-p)                                  # 1 / ln(1 − p) < 0
    start = 0                                                   # the first position not yet decided
    while start < n:
        m = n - start
        k = int(m * p + 6 * math.sqrt(m * p * (1 - p))) + 16    # enough gaps to pass the end all but ~1e-9 of the time
        gaps = torch.rand(k, dtype=torch.float64, device=device).log_().mul_(inv).floor_()  # G = ⌊ln U / ln(1−p)⌋
        drops = gaps.add_(1).cumsum_(0).add_(start - 1).clamp_(max=n)  # start − 1 + Σ (G_j + 1); ln 0: +∞ → n
        keep[drops.long()] = False                              # fp64 holds these integers exactly (n < 2⁵³)
        start = int(drops[-1]) + 1                              # past the end (> n) unless the gaps ran out
    return keep[:n].view(shape)


class _MaskedScale(torch.autograd.Function):
    """y = x · mask · scale, and ∂L/∂x = ∂L/∂y · mask · scale (nn.Dropout's formula and op order);
    scale None: y = x · mask (a caller that applies the scale elsewhere: AdapterBase.lowrank_folded)."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        y = x.mul(mask)
        return y if scale is None else y.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        g = grad.mul(mask)
        return (g if ctx.scale is None else g.mul_(ctx.scale)), None, None




def make_dropout(p: float, sampler: str = "torch") -> nn.Module:
    """Identity at p = 0; else nn.Dropout (sampler="torch": PEFT's own masks under the same seed) or
    BitsDropout (sampler="bits": the same Bernoulli(1 − p) keep law, drawn faster)."""
    if sampler not in DROPOUT_SAMPLERS:
        raise ValueError(f"dropout_sampler must be one of {DROPOUT_SAMPLERS}, got {sampler!r}")
    if p == 0:
        return nn.Identity()
    return nn.Dropout(p) if sampler == "torch" else BitsDropout(p)


def dropout_active(module: nn.Module) -> bool:
    """True when `module` (an adapter's lora_dropout) changes its input: training and p > 0."""
    return module.training and isinstance(module, (nn.Dropout, BitsDropout))


def output_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype base(x) returns: the autocast dtype if autocast is on, else the base's compute dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return base.compute_dtype if isinstance(base, NF4Linear) else base.weight.dtype


def frozen_matmul(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W0ᵀ, without the bias, computed the way the base layer computes it: in its dtype (or the
    autocast dtype), and for NF4 through NF4Matmul, whose backward re-dequantizes W0 instead of
    keeping a full-precision copy alive."""
    if isinstance(base, NF4Linear):
        return base.matmul(x, bias=False)
    return F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(base.weight.dtype), base.weight)


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


# ---- the adapters --------------------------------------------------------------------------------------

class AdapterBase(nn.Module):
    """What LoRA and DoRA share: the frozen base, s, the dropout, and A (r, in), B (out, r) in fp32.

    An adapter wraps its base (never subclasses it): `base_layer` is the frozen nn.Linear / NF4Linear.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool,
                 dropout_sampler: str = "torch"):
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

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"

    def lowrank_folded(self, xa: torch.Tensor) -> torch.Tensor:
        """s·B A dropout(x) in training with BitsDropout, its two scalars moved onto the rank-r tensor:

            s · B A (x ⊙ m / (1 − p))  =  B ((s / (1 − p)) · A (x ⊙ m))      (A, B linear, no bias)

        The written order scales the (N, in) input by 1/(1 − p) and the (N, out) output by s, in forward
        and again in backward; here one (N, r) tensor is scaled, r ≪ in, out. The same mask (the same
        draw from the generator as BitsDropout's), the same value up to fp32 rounding (tests/test_lora.py).
        LoRA takes it, and DoRA in "lora" dropout mode (its frozen path sees x, not x̃)."""
        d = self.lora_dropout
        h = self.lora_A(_MaskedScale.apply(xa, d.mask(xa.shape, xa.device), None))  # (..., r)
        return self.lora_B(h * (self.scaling / (1.0 - d.p)))   # (..., out)

    def lowrank(self, xa: torch.Tensor) -> torch.Tensor:
        """s·B A dropout(x), (..., out) fp32: folded (above) with BitsDropout in training, else as written."""
        if isinstance(self.lora_dropout, BitsDropout) and self.lora_dropout.training:
            return self.lowrank_folded(xa)
        return self.scaling * self.lora_B(self.lora_A(self.lora_dropout(xa)))


class LoRALinear(AdapterBase):
    """y = base(x) + (α/r)·B A dropout(x), wrapping (never subclassing) a frozen linear layer."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, dropout_sampler: str = "torch"):  # PEFT's LoraConfig defaults
        super().__init__(base, rank, alpha, dropout, use_rslora, dropout_sampler)

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
