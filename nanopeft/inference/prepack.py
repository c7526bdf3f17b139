"""CPU inference: every dense Linear's weight reordered once into oneDNN's blocked layout.

    merge_adapters(model)          # the simple path: dense nn.Linear layers, y = x Wᵀ + b per call
    prepack_linears(model, rows)   # the fast path beside it: the same y, W packed ahead of time

A CPU GEMM does not read W as it is stored: it first copies W into panels shaped for its micro-kernel
(the B-packing of the GotoBLAS / BLIS design: Goto & van de Geijn 2008, "Anatomy of high-performance
matrix multiplication"), on every call. When the other operand is short (batch 1 of a ViT-B: 201 token
rows against a 768 × 3072 weight), that copy is a large share of the call. oneDNN can do it once: W is
reordered into the layout its kernel reads (`torch.ops.mkldnn._reorder_linear_weight`, the same op
torch.compile's weight prepacking uses) and each call runs the kernel on it directly
(`torch.ops.mkldnn._linear_pointwise`). Outputs match nn.Linear up to fp32 summation order; the speed-up
is largest at small batches (docs/BENCHMARKS.md "Whole step and inference").

Inference only: the packed weight is an opaque oneDNN tensor, not a Parameter; no gradient reaches it,
state_dict() no longer holds it, and .to() does not move it. Pack last, after merging and loading, and
export or save from the unpacked model. Only fp32 CPU weights are packed, and only without autocast
(autocast does not know these ops, so a packed layer under bf16 autocast would silently stay fp32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.inject import adapter_layers


def prepack_available() -> bool:
    """Whether this torch build has oneDNN and the two ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x Wᵀ + b, as the nn.Linear it was built from, with W held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # rows: the expected number of input rows (batch × tokens), oneDNN's hint for the layout; any
        # other row count is still exact, only perhaps a little slower
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), max(1, rows))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only (its weight takes no gradient): run the model "
                               "under torch.inference_mode() or torch.no_grad()")
        # (..., in) -> (..., out); the post-op "none": no fused activation
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _packs_exactly(linear: nn.Linear, rows: int) -> bool:
    """One layer, packed and run beside F.linear on random rows: a oneDNN build that cannot run this
    CPU's kernels, or gives other numbers, leaves the model unpacked instead of wrong."""
    x = torch.randn(min(rows, 8), linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            got = PackedLinear(linear, rows)(x)
        except RuntimeError:
            return False
        want = F.linear(x, linear.weight, linear.bias)
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def prepack_linears(model: nn.Module, rows: int) -> int:
    """Replace every fp32 CPU nn.Linear in `model` by its PackedLinear (in place); the number replaced.
    0 where prepack_available() is False or the check on the first layer fails."""
    layers = [(name, m) for name, m in model.named_modules()
              if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if not layers or not prepack_available() or not _packs_exactly(layers[0][1], rows):
        return 0
    for name, m in layers:
        model.set_submodule(name, PackedLinear(m, rows))
    return len(layers)


PREPACK_MAX_BATCH = 1  # re-measured (20 alternating pairs): ViT-B batch 1 pays (1.04×), batch 16 does not


def prepack_for_inference(model: nn.Module, device: torch.device, amp: torch.dtype | None, batch_size: int,
                          image_size: int, enabled: bool = True) -> str:
    """eval.py / predict.py: pack the model's Linears where it pays (CPU, fp32, no autocast) and return
    the line they print saying what was done and why. The layout hint is a batch's patch tokens at
    DINOv3's 16-pixel patches (any other row count is still exact)."""
    rows = batch_size * (image_size // 16) ** 2
    if not enabled:
        return "CPU weight prepacking: off (--prepack no)"
    if device.type != "cpu" or amp is not None:
        return f"CPU weight prepacking: not used ({device.type}{', autocast' if amp is not None else ''})"
    if adapter_layers(model):  # an unmerged adapter reads its lora_A / lora_B weights itself
        return "CPU weight prepacking: not used (adapters unmerged)"
    if batch_size > PREPACK_MAX_BATCH:
        return (f"CPU weight prepacking: not used at batch {batch_size} (it pays only at batch "
                f"{PREPACK_MAX_BATCH}: docs/BENCHMARKS.md)")
    n = prepack_linears(model, rows)
    if n == 0:
        return "CPU weight prepacking: not available in this torch build; plain nn.Linear"
    return f"CPU weight prepacking: {n} Linear layers reordered once for oneDNN (same outputs, faster small batches)"
