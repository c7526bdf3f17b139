"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

DoRA splits each weight into a magnitude and a direction, and lets LoRA move only the direction:

    W' = m · (W0 + s·BA) / ‖W0 + s·BA‖_c                       (DoRA Eq. 5)

‖·‖_c is the norm of each column of the paper's (in, out) weight, i.e. of each output *row* of
torch's (out, in) layout, so m and the norm n are (out,) vectors. m starts at ‖W0‖_c (Eq. 2); with
B = 0 that makes W' = W0 at step 0. Following §4.3 the norm n is a constant in backward
("we suggest treating ‖V + ΔV‖_c in Eq. (5) as a constant"), so no gradient flows through it: the
paper's reason is memory — backward then keeps no graph of the (out, in) matrix W0 + s·BA — at a loss of
accuracy it found negligible. Merging is Eq. 5 itself: W' replaces W0 in a plain layer (`merged`).
With g = m / sg(n) the layer computes, by dropout mode (docs/DORA.md "Dropout semantics"):

    y = g ⊙ (x W0ᵀ + s · x Aᵀ Bᵀ) + b                                  (no dropout, or eval: Eq. 5)
    y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s · (x̃ Aᵀ Bᵀ),  x̃ = dropout(x)   ("peft", training)
    y = g ⊙ (x W0ᵀ + s · x̃ Aᵀ Bᵀ) + b                                 ("lora", training)

"peft" is PEFT's semantics (the study's; the default): the frozen path sees x, the rescaling and
the LoRA term see x̃, which costs a second product with W0. "lora" drops out only the low-rank
path's input, as LoRA does: one product with W0, a LoRA-priced step. With p = 0 both are Eq. 5.

Two implementations of the same numbers:
  forward_textbook  Eq. 5 as written: the dense W0 + s·BA and its row norms, every call (what
                    PEFT does). Read this one first; tests prove the fast one equal to it.
  forward_fast      the row-append trick and a cached ‖W0‖² (below, fenced): W0 is read (for NF4:
                    dequantized) once per step, exactly as for LoRA. DoRALinear.forward runs it.
                    Under gradient checkpointing a block's last DoRA layer keeps the tensors of m's
                    gradient, so its frozen product is not recomputed (docs/DORA.md "Gradient
                    checkpointing").
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DORA_DROPOUT_MODES
from .dropout import dropout_active
from .lora import LoRALinear, base_device, base_weight, merged_layer
from ..nf4_linear import NF4Linear


class DoRALinear(LoRALinear):
    """y = g ⊙ (x W0ᵀ + s·x AᵀBᵀ) + b with g = m / sg(‖W0 + s·BA‖_row), wrapping a frozen linear layer."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, dropout_sampler: str = "torch", dora_dropout: str = "peft"):
        super().__init__(base, rank, alpha, dropout, use_rslora, dropout_sampler)  # PEFT's defaults
        if dora_dropout not in DORA_DROPOUT_MODES:
            raise ValueError(f"dora_dropout must be one of {DORA_DROPOUT_MODES}, got {dora_dropout!r}")
        self.dora_dropout = dora_dropout
        self.fast = True  # forward runs forward_fast; False runs forward_textbook (same numbers, slower)
        # The last Linear of a transformer block (add_adapters sets it): see "checkpointing" in forward_fast
        self.ends_block = False
        # m (out,), fp32. PEFT's file key is `<path>.lora_magnitude_vector` (no `.weight`): so is ours.
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(base.out_features, device=base_device(base), dtype=torch.float32))
        self._w0_sq = (None, None)  # (state key of the base, ‖W0_i‖² (out,)): a cache, not state
        if not self.lora_magnitude_vector.is_meta:
            self.init_magnitude()
        # else: a model built on meta has no weights to take norms of; inject.init_dora_magnitudes
        # initialises m once the base weights are loaded, and forward refuses to run before that.

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """m = ‖W0 + s·BA‖_row (DoRA Eq. 2; = ‖W0‖_row while B = 0), so that W' = W0 + s·BA exactly."""
        n = self.weight_norm()
        m = self.lora_magnitude_vector
        if m.is_meta:  # a meta tensor cannot be written to: replace it
            self.lora_magnitude_vector = nn.Parameter(n, requires_grad=m.requires_grad)
        else:          # in place: an optimizer holding m keeps working
            m.copy_(n)

    def _check_magnitude(self) -> None:
        if self.lora_magnitude_vector.is_meta:
            raise RuntimeError("DoRALinear: the magnitude vector m is still on the meta device (the model was "
                               "built on meta); call nanopeft.methods.inject.init_dora_magnitudes(model) once the base "
                               "weights are loaded")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fast(x) if self.fast else self.forward_textbook(x)

    # ---- the simple version: Eq. 5 as written ----------------------------------------------------------

    def forward_textbook(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 5 with the dense W0 + s·BA, all in fp32 (a reference: it materialises (out, in) twice)."""
        self._check_magnitude()
        A, B, s, m = self.lora_A.weight, self.lora_B.weight, self.scaling, self.lora_magnitude_vector
        W0 = base_weight(self.base_layer)                       # (out, in) fp32, dense
        V = W0 + s * (B @ A)                                    # W0 + s·BA (out, in); grads reach A, B
        g = m / torch.linalg.vector_norm(V, dim=1).detach()     # m / sg(‖V‖_c)  (Eq. 5, §4.3)
        b = self.base_layer.bias
        b = torch.zeros((), device=x.device) if b is None else b.float()
        xf = x.float()                                          # (..., in): the adapters compute in fp32
        xd = self.lora_dropout(xf)                              # x̃ (x itself in eval or at p = 0)
        if dropout_active(self.lora_dropout) and self.dora_dropout == "peft":
            y = xf @ W0.T + b + (g - 1) * (xd @ W0.T) + g * (s * (xd @ A.T @ B.T))  # (..., out)
        else:  # Eq. 5; in "lora" mode only the low-rank path sees x̃
            y = g * (xf @ W0.T + s * (xd @ A.T @ B.T)) + b
        return y.to(output_dtype(self.base_layer, x))          # the dtype the base layer outputs

    # ---- the fast version: the row-append trick (see the fenced notes above) ---------------------------

    def __getstate__(self):  # pickling (torch.save of the module): weak references do not pickle
        return {**self.__dict__, "_w0_sq": (None, None)}

    def _w0_sq_norm(self) -> torch.Tensor:
        key = _state_key(self.base_layer)
        if not _same_state(key, self._w0_sq[0]):
            self._w0_sq = (key, base_weight(self.base_layer).square().sum(dim=1))  # (out,), fp32
        return self._w0_sq[1]

    @torch.no_grad()
    def _norm(self, AW: torch.Tensor) -> torch.Tensor:
        """n = ‖W0 + s·BA‖ of every output row, (out,) fp32, from AW = A W0ᵀ (r, out)."""
        A, B, s = self.lora_A.weight.float(), self.lora_B.weight.float(), self.scaling  # (r, in), (out, r)
        w0_sq = self._w0_sq_norm()                                  # ‖W0_i‖²
        cross = (AW.float().T * B).sum(dim=1)                       # ⟨W0_i, (BA)_i⟩ = Σ_k (W0Aᵀ)_ik B_ik
        ba_sq = ((B @ (A @ A.T)) * B).sum(dim=1)                    # ‖(BA)_i‖²: (r, r) -> (out, r) -> (out,)
        n_sq = w0_sq + 2 * s * cross + s * s * ba_sq                # ‖W0_i + s(BA)_i‖²
        n = n_sq.clamp_min(0).sqrt()
        parts = w0_sq + s * s * ba_sq                               # 0 only where W0_i and B_i are 0
        ratio = torch.where(parts > 0, n_sq / parts, 1.0)           # 1 when s(BA)_i ⟂ W0_i, → 0 as they cancel
        dense = lambda i: torch.linalg.vector_norm(base_weight(self.base_layer, rows=i) + s * (B[i] @ A), dim=1)
        worst = ratio.topk(min(DENSE_ROWS, n.numel()), largest=False).indices  # fixed size: no host sync
        return n.scatter(0, worst, torch.where(ratio[worst] < CANCELLATION, dense(worst), n[worst]))

    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·BA‖_row (out,), fp32, as forward computes it."""
        with torch.no_grad():
            return self._norm(frozen_matmul(self.base_layer, self.lora_A.weight))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        self._check_magnitude()
        m, A = self.lora_magnitude_vector, self.lora_A.weight
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)                     # (N, in)
        N = x.shape[0]
        dropout = dropout_active(self.lora_dropout)
        two_pass = dropout and self.dora_dropout == "peft"      # x̃ W0ᵀ needed besides x W0ᵀ
        xa = x.to(A.dtype)                                      # the adapters compute in fp32
        # The low-rank path runs before the frozen product, as in LoRALinear.forward (see checkpointing below)
        if two_pass:  # x̃ feeds the second frozen product too, so it is formed here
            xd = self.lora_dropout(xa)                          # x̃ (N, in)
            u = self.lora_B(self.lora_A(xd))                    # B A x̃ (N, out), fp32; s in the sum below
        else:         # only the low-rank path sees x̃ (drawn, and folded with BitsDropout, in lowrank)
            su = self.lowrank(xa)                               # s·B A x̃ (N, out), fp32
        rows = [x, xd, A.detach()] if two_pass else [x, A.detach()]
        P = frozen_matmul(self.base_layer, torch.cat([t.to(x.dtype) for t in rows]))  # [x; (x̃;) A] W0ᵀ
        # one split, not slices: each slice's backward would write its gradient into a zeroed P-sized tensor
        xW, *xdW, AW = P.split([N, N, self.rank] if two_pass else [N, self.rank])  # (N, out) ... (r, out)
        frozen = xdW[0] if two_pass else xW                     # x̃ W0ᵀ ("peft"), x W0ᵀ otherwise
        z = torch.add(frozen, u, alpha=self.scaling) if two_pass else frozen + su  # x̃ W0ᵀ + s·B A x̃, (N, out)
        b = self.base_layer.bias
        b = torch.zeros((), device=z.device) if b is None else b.to(z.dtype)
        # Checkpointing: m's gradient needs z and n, which come out of the frozen product; saved the usual
        # way they would make a checkpointed block recompute its last frozen product too (the early stop
        # ends at the last saved tensor). The block's last Linear (ends_block) keeps them instead, outside
        # the checkpoint: (N, out) fp32 per block, as large as the block input the checkpoint keeps (twice
        # that in bf16), for one frozen product per block not recomputed (a third of a ViT-B block's
        # frozen FLOPs, a fifth of a SwiGLU block's). The same numbers (tests/test_lora.py counts them).
        with _kept_for_backward() if self.ends_block else contextlib.nullcontext():
            g = m / self._norm(AW)                              # (out,): m / sg(n), DoRA §4.3
            if two_pass:  # x W0ᵀ + b − x̃ W0ᵀ + g ⊙ z̃  =  y0 + (g − 1) ⊙ x̃W0ᵀ + g ⊙ s·x̃AᵀBᵀ
                y = torch.addcmul((xW + b) - frozen, g, z)
            else:         # b + g ⊙ (x W0ᵀ + s·x̃ AᵀBᵀ)  (Eq. 5); autograd keeps z alone, for m's gradient
                y = torch.addcmul(b, g, z)
        return y.to(P.dtype).view(*lead, self.out_features)    # back to the base layer's dtype

    # ---- merging ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def merged(self, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain layer with W' = m · (W0 + s·BA) / ‖W0 + s·BA‖_row (Eq. 5), same output as forward."""
        BA = self.lora_B.weight.float() @ self.lora_A.weight.float()          # (out, in)
        V = base_weight(self.base_layer, torch.float32) + self.scaling * BA    # W0 + s·BA, a new tensor
        n = torch.linalg.vector_norm(V, dim=1)                                 # ‖V‖_c (out,): V is dense here
        g = self.lora_magnitude_vector.float() / n
        return merged_layer(self.base_layer, V * g[:, None], requantize, dtype)  # m · V / ‖V‖_c

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dora_dropout={self.dora_dropout!r}"


# ---- fast path: the norm without forming W0 + s·BA (docs/DORA.md "The column norm without
# materialising W") ------------------------------------------------------------------------------------
#
# PEFT builds the dense (out, in) matrix W0 + s·BA every step (plus an identity matrix to get BA).
# Expanded row by row,
#
#     ‖W0_i + s(BA)_i‖² = ‖W0_i‖² + 2s·⟨(W0 Aᵀ)_i, B_i⟩ + s²·⟨B_i (A Aᵀ), B_i⟩
#
# needs ‖W0_i‖² (cached: W0 is frozen), A Aᵀ (r, r) and W0 Aᵀ (out, r). W0 Aᵀ is the one product with
# W0, and it rides along with the base matmul: the r rows of A are appended to the batch,
#
#     [x; x̃; A] W0ᵀ = [x W0ᵀ; x̃ W0ᵀ; A W0ᵀ]        (x̃ rows only in "peft" mode with active dropout)
#
# For an NF4 base, W0 is the dequantized weight the base forward multiplies with. In a bf16 compute
# dtype A W0ᵀ is a bf16 product; it only enters the cross term, which moves n by ~1e-5 relative, far
# below the bf16 rounding of the output.

# A row whose squared norm is below this fraction of ‖W0_i‖² + s²‖(BA)_i‖² has lost most of its
# digits to cancellation in the expanded sum (s·BA pointing against W0): recompute it densely.
# Above it, the expanded sum's relative error is at most ~8× that of its terms.
CANCELLATION = 0.25
# Finding exactly the cancelling rows (a nonzero()) would be a host sync in every DoRA layer's forward on an
# accelerator, so the DENSE_ROWS rows of lowest ratio are recomputed densely on every call instead: a
# fixed-size top-k, no sync, on every device (an exact CPU-only search did not pay: docs/BENCHMARKS.md).
# Every cancelling row is among them unless more than DENSE_ROWS rows of one layer cancel; those left out
# are then the mildest (highest ratio) of them, and keep the expanded sum's value.
DENSE_ROWS = 32


def _state_key(module: nn.Module):
    """Identifies the current values of a module's tensors: each tensor (by weak reference, so a new
    tensor that reuses a freed address is not taken for the old one) and its in-place version counter.

    load_state_dict copies in place (bumps _version) or assigns new tensors (the old refs go dead).
    Inference-mode tensors keep no version counter: then there is no key and no caching.
    """
    try:
        return tuple((weakref.ref(t), t._version) for t in (*module.parameters(), *module.buffers()))
    except RuntimeError:
        return None


def _kept_for_backward():
    """Tensors saved for backward inside this context are held as they are, even inside a checkpointed
    block: the innermost saved-tensor hooks win, and these keep the tensor instead of dropping it for
    recomputation. Outside checkpointing autograd keeps them anyway, so nothing changes there."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _same_state(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and \
        all(ra() is not None and ra() is rb() and va == vb for (ra, va), (rb, vb) in zip(a, b))


# ---- the frozen product in the base layer's own arithmetic (DoRA's second pass needs it alone) -----

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
