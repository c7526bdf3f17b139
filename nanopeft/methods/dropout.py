"""Dropout for the adapters: torch's sampler (PEFT's masks, seed for seed) or an exact faster one.

    make_dropout(p, "torch")  nn.Dropout(p): bernoulli_ on fp32 uniforms, PEFT's own masks under a seed
    make_dropout(p, "bits")   BitsDropout(p): the same law, each entry kept with probability 1 − p and
                              scaled by 1/(1 − p), drawn from raw random bits (train.py's default)

The adapters only call make_dropout and dropout_active; LoRALinear.lowrank_folded also takes a
BitsDropout's mask and applies the scale elsewhere (MaskedScale with scale None). docs/DORA.md
("Dropout semantics").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import DROPOUT_SAMPLERS
from ..device import host_reads_are_free  # hardware questions live in device.py


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
    their rank-r tensor instead: LoRALinear.lowrank_folded). Drawing the masks costs a fraction of
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
        return MaskedScale.apply(x, self.mask(x.shape, x.device), 1.0 / (1.0 - self.p))

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


class MaskedScale(torch.autograd.Function):
    """y = x · mask · scale, and ∂L/∂x = ∂L/∂y · mask · scale (nn.Dropout's formula and op order);
    scale None: y = x · mask (a caller that applies the scale elsewhere: LoRALinear.lowrank_folded)."""

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
