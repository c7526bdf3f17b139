"""NF4Linear: a frozen Linear stored in NF4, and the autograd function that keeps only 4 bits for backward.

    forward:  y = x Ŵᵀ + b            Ŵ = dequantize(NF4 codes, absmax)  in the compute dtype
    backward: ∂L/∂x = ∂L/∂y · Ŵ       Ŵ dequantized again: nothing full-precision is saved (QLoRA §3)
              no gradient reaches the frozen weight
    Ŵ comes from nf4_cuda.py: the CUDA kernel on a GPU, nf4.py's torch ops elsewhere (the same bits),
    written into a reused buffer.

The state dict is what transformers writes for a bitsandbytes `Linear4bit` (see nf4.py), so a
checkpoint saved pre-quantized by transformers + bitsandbytes loads into it as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import nf4_cuda
from .nf4 import (NESTED_BLOCKSIZE, NESTED_KEYS, NF4_CODES, QS_KEY, NF4Weight, dynamic_map, nf4_from_state_dict,
                  nf4_state_dict, quant_state_meta, reused_buffer)


def _scratch(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor | None:
    """A reused buffer for the Ŵ that NF4Matmul multiplies with and drops at once: on CPU a fresh Ŵ
    over glibc's mmap threshold (32 MB) is page-faulted in on every call, which costs about as much as
    the dequantize itself (docs/BENCHMARKS.md); on CUDA it spares the allocator a large block per call.
    Holds the largest Ŵ per dtype and thread (the backward runs on autograd's thread). Safe because
    every use is ordered on one stream: F.linear has read Ŵ before the next dequantize overwrites it."""
    if torch.compiler.is_compiling():
        return None
    return reused_buffer("nf4_linear.w", w.numel, dtype, w.packed.device).view(w.shape)


class NF4Matmul(torch.autograd.Function):
    """y = x Ŵᵀ + b, Ŵ = dequant(NF4). Backward dequantizes again, so autograd keeps only the 4-bit
    tensors (~0.52 byte per weight) and never a full-precision Ŵ. QLoRA §3: gradients flow through the
    frozen 4-bit weight into the adapters, never to the weight itself."""

    @staticmethod
    def forward(ctx, x, w: NF4Weight, bias):
        # The 4-bit weight is kept on ctx, not through save_for_backward: it is the layer's own frozen
        # buffers (no copy, no activation), and a saved tensor would be packed *after* this product.
        # Gradient checkpointing (non-reentrant, early stop) ends a block's recomputation at the last
        # tensor the block saved; saving nothing here lets it stop before the block's last frozen
        # product, which backward never reads (see LoRALinear.forward).
        ctx.w = w
        return F.linear(x, nf4_cuda.dequantize(w, x.dtype, out=_scratch(w, x.dtype)), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = ctx.w
            gx = grad @ nf4_cuda.dequantize(w, grad.dtype, out=_scratch(w, grad.dtype))  # (..., out) @ (out, in)
        if ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, gb


class NF4Linear(nn.Module):
    """A frozen Linear stored in NF4: y = x Ŵᵀ + b in `compute_dtype` (or the autocast dtype).

    Every NF4 tensor is a buffer (so `.to(device)` and meta construction work); the state dict holds
    the keys transformers writes for a bitsandbytes `Linear4bit`, so such checkpoints load as they are.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32, device=None,
                 weight_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        n, nb, u8 = in_features * out_features, -(-in_features * out_features // blocksize), torch.uint8
        # an unloaded layer dequantizes to exactly 0: code 7 is 0.0, every absmax is 0 (DYN[127] = 0)
        w = NF4Weight(torch.full(((n + 1) // 2, 1), 0x77, dtype=u8, device=device),
                      torch.full((nb,), 127, dtype=u8, device=device) if double_quant else torch.zeros(nb, device=device),
                      torch.tensor(NF4_CODES, device=device), torch.Size((out_features, in_features)),
                      weight_dtype or compute_dtype, blocksize)
        if double_quant:
            w.offset, w.nested_quant_map = torch.zeros((), device=device), dynamic_map().to(device)
            w.nested_absmax = torch.zeros(-(-nb // NESTED_BLOCKSIZE), device=device)
        self._set_nf4(w)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.weight_dtype, device=device),
                                 requires_grad=False) if bias else None

    def _set_nf4(self, w: NF4Weight) -> None:
        self.blocksize, self.nested_blocksize, self.weight_dtype = w.blocksize, w.nested_blocksize, w.dtype
        self.double_quant = w.double_quant
        for k in NF4Weight.TENSORS:  # `weight` is the packed tensor, as in bitsandbytes; the state dict
            t = getattr(w, k)       # entries are written and read by _save/_load_from_state_dict
            self.register_buffer("weight" if k == "packed" else k, None if t is None else t.detach(), persistent=False)

    def nf4_weight(self) -> NF4Weight:
        """The stored weight as an NF4Weight (views of the buffers, no copy)."""
        return NF4Weight(self.weight, self.absmax, self.quant_map, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.offset, self.nested_absmax,
                         self.nested_quant_map, self.nested_blocksize)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    name: str | None = None) -> NF4Linear:
        """Quantize a (out, in) weight; compute dtype defaults to the weight's dtype."""
        if weight.dim() != 2:
            raise ValueError(f"{name or 'weight'}: NF4Linear needs a 2-D (out, in) weight, got {tuple(weight.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype or weight.dtype, device="meta")
        layer._set_nf4(nf4_cuda.quantize_nf4(weight, blocksize, double_quant, name=name))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize an nn.Linear (weight and bias); compute dtype defaults to its dtype."""
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, compute_dtype,
                               name=f"Linear({linear.in_features}, {linear.out_features}).weight")

    def dequantize(self, dtype: torch.dtype | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Ŵ (out, in) in `dtype`, by default the compute dtype; or only its rows `rows` (k, in), which
        costs k rows where the blocks do not straddle rows (in a multiple of the blocksize)."""
        w, dtype = self.nf4_weight(), dtype or self.compute_dtype
        if rows is None:
            return nf4_cuda.dequantize(w, dtype)
        if self.in_features % self.blocksize:
            return nf4_cuda.dequantize(w, dtype)[rows]
        return nf4_cuda.dequantize(w.rows(rows), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def matmul(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """x Ŵᵀ (+ b) in the autocast dtype if autocast is on, else the compute dtype. bias=False is
        what the adapters use: they add the bias themselves."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.compute_dtype
        b = self.bias.to(dtype) if bias and self.bias is not None else None
        return NF4Matmul.apply(x.to(dtype), self.nf4_weight(), b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must move the fp32 statistics but never round them: that would change Ŵ
        keep = {k: b for k, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            if self._buffers[k].dtype != torch.float32:
                self._buffers[k] = old.to(self._buffers[k].device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        d = nf4_state_dict(self.nf4_weight())
        if self.bias is not None:  # bitsandbytes' order: weight, bias, then the quant state
            d = {"weight": d.pop("weight"), "bias": self.bias} | d
        for k, v in d.items():
            destination[prefix + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # NF4 entries here (ours or bitsandbytes': their JSON says whether they are double-quantized,
        # and that layout wins); the bias, and any key nobody expects, the way nn.Module does it
        d = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        nested = "nested_offset" in quant_state_meta(d[QS_KEY]) if QS_KEY in d else self.double_quant
        need = ["weight", "weight.absmax", "weight.quant_map", QS_KEY, *(NESTED_KEYS if nested else ())]
        missing_keys += [prefix + k for k in need if k not in d]
        if all(k in d for k in need):
            try:
                w = nf4_from_state_dict(d, prefix + "weight")
                if tuple(w.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"{prefix}weight: shape {list(w.shape)}, this layer is "
                                     f"({self.out_features}, {self.in_features})")
                if not local_metadata.get("assign_to_params_buffers", False):  # copy, like nn.Module
                    w = w.to(w.packed.device if self.weight.is_meta else self.weight.device, copy=True)
                self._set_nf4(w)
            except ValueError as e:
                error_msgs.append(str(e))
        rest = {prefix + k: v for k, v in d.items() if k not in need}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def nf4_nbytes(module: nn.Module) -> int:
    """Bytes of all NF4 storage (packed codes + statistics + maps) in a module tree."""
    return sum(m.nf4_weight().nbytes for m in module.modules() if isinstance(m, NF4Linear))
