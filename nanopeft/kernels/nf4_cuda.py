"""NF4 on CUDA: the kernels of nanopeft/kernels/nf4.cu, compiled at first use and called as torch ops.

    nf4.py         the format and its torch-ops implementation: the reference, and the CPU path
    nf4_cuda.py    dequantize(w, dtype, out) / quantize_nf4(x): on a CUDA tensor, one custom op each
        torch.ops.nanopeft.nf4_dequantize(packed, absmax, …, out)    Ŵ written into `out`
        torch.ops.nanopeft.nf4_quantize(x, mid, packed, absmax)      4-bit codes + fp32 absmax
      ├─► NVRTC (torch.cuda._compile_kernel; no nvcc, no Triton): nf4.cu → kernels, per device, once
      └─► NVRTC unavailable: the torch-ops path of nf4.py, after one warning
    nf4_linear.py  NF4Linear's forward and backward call dequantize() here

Both paths give the same bits (tests/test_nf4_cuda.py: on the host through an emulation of the CUDA
execution model, on a GPU against bitsandbytes' CUDA kernels). The ops have fake implementations, so
autograd and torch.compile see one opaque op. Double quantization of the absmax (8 bits per block,
n/64 values) stays in torch: nf4.weight_from_codes.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from .. import nf4
from ..nf4 import NF4Weight

KERNEL_SOURCE = Path(__file__).with_name("nf4.cu")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
KERNELS = tuple(f"nf4_{op}_{s}" for op in ("dequantize", "quantize") for s in _SUFFIX.values())
DEQUANTIZE_THREADS = 256  # threads per CUDA block (DQ_THREADS in nf4.cu); each dequantizes 32 values
DEQUANTIZE_VALUES = 32 * DEQUANTIZE_THREADS  # values per CUDA block: a multiple of the blocksize
QUANTIZE_THREADS = 128    # each thread quantizes one block of `blocksize` values
_MAX_NUMEL = 2 ** 31 - 64  # kernel indices are int (torch passes Python ints as C int)


# ---------------------------------------------------------------------------- launch arguments
# Shared by the GPU launch below and the host emulation in the tests, so both check the same grid.
def dequantize_launch(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, out,
                      blocksize: int, nested_blocksize: int) -> tuple[str, tuple, tuple, list]:
    """(kernel name, grid, block, args) that write Ŵ into `out` (contiguous, 16-byte aligned)."""
    n, dq = out.numel(), nested_absmax is not None
    unused = quant_map  # any pointer: the kernel reads the nested tensors only when double-quantized
    args = [packed, absmax, quant_map, nested_absmax if dq else unused, nested_quant_map if dq else unused,
            offset if dq else unused, out, n, blocksize, nested_blocksize, int(dq)]
    return (f"nf4_dequantize_{_SUFFIX[out.dtype]}", (-(-n // DEQUANTIZE_VALUES), 1, 1),
            (DEQUANTIZE_THREADS, 1, 1), args)


def quantize_launch(x, mid, packed, absmax, blocksize: int) -> tuple[str, tuple, tuple, list]:
    """(kernel name, grid, block, args) that write x's packed codes and fp32 absmax."""
    nblocks = absmax.numel()
    return (f"nf4_quantize_{_SUFFIX[x.dtype]}", (-(-nblocks // QUANTIZE_THREADS), 1, 1), (QUANTIZE_THREADS, 1, 1),
            [x, mid, packed, absmax, x.numel(), blocksize])


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0  # the kernels' 16-byte loads and stores (nf4.cu, Bytes16)


# ---------------------------------------------------------------------------- compilation
_KERNELS: dict[tuple[int, str], object] = {}
_FAILED: dict[int, str] = {}  # device index -> why NVRTC failed there
_LOCK = threading.Lock()


def _compile(name: str):
    """One kernel of nf4.cu for the current device, through NVRTC."""
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    try:
        if home is None:  # torch adds CUDA_HOME/include to NVRTC's path; nf4.cu includes nothing, so any folder does
            cpp_extension.CUDA_HOME = str(KERNEL_SOURCE.parent)
        return torch.cuda._compile_kernel(KERNEL_SOURCE.read_text(), name)
    finally:
        cpp_extension.CUDA_HOME = home


def kernel(name: str, device: torch.device):
    """The compiled kernel `name` on `device`, or None (after one warning) where NVRTC cannot build it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, name)
    if key in _KERNELS:
        return _KERNELS[key]
    if index in _FAILED:
        return None
    with _LOCK, torch.cuda.device(index):
        if key not in _KERNELS and index not in _FAILED:
            try:
                _KERNELS[key] = _compile(name)
            except Exception as e:  # no libnvrtc, an NVRTC too old for this GPU, a driver error...
                _FAILED[index] = " ".join(f"{type(e).__name__}: {e}".split())[:400]  # NVRTC's log, on one line
                warnings.warn(f"nanopeft: NVRTC could not compile {KERNEL_SOURCE.name} for cuda:{index} "
                              f"({_FAILED[index]}); NF4 there uses the slower torch-ops path of nf4.py",
                              stacklevel=3)
    return _KERNELS.get(key)


def available(device: torch.device | str) -> bool:
    """True if the NF4 kernels run on `device` (a CUDA device; compiles them at the first call)."""
    device = torch.device(device)
    return device.type == "cuda" and all(kernel(k, device) is not None for k in KERNELS)


# ---------------------------------------------------------------------------- the torch ops
def _launch(name: str, grid: tuple, block: tuple, args: list, device: torch.device) -> bool:
    """Run kernel `name` on `device`; False if NVRTC could not build it there."""
    k = kernel(name, device)
    if k is None:
        return False
    with torch.cuda.device(device):
        k(grid=grid, block=block, args=args)
    return True


def dequantize_into(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, out, blocksize: int,
                    nested_blocksize: int, launch=_launch) -> None:
    """The body of the dequantize op: the kernel into `out` (through an aligned copy where a pointer is
    not 16-byte aligned), or the torch-ops reference where the kernel is unavailable."""
    name, grid, block, args = dequantize_launch(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset,
                                                out, blocksize, nested_blocksize)
    args[0] = packed if _aligned(packed) else packed.clone()  # a fresh allocation is aligned (512 B on CUDA)
    args[6] = dst = out if _aligned(out) else torch.empty_like(out)
    if not launch(name, grid, block, args, out.device):
        w = NF4Weight(packed.view(-1, 1), absmax, quant_map, torch.Size([out.numel()]), out.dtype, blocksize,
                      offset, nested_absmax, nested_quant_map, nested_blocksize)
        w.dequantize(out.dtype, out=out.view(-1))
    elif dst is not out:
        out.copy_(dst)


def quantize_into(x, mid, packed, absmax, blocksize: int, launch=_launch) -> None:
    """The body of the quantize op: x's 4-bit codes and fp32 absmax, by the kernel or the reference."""
    name, grid, block, args = quantize_launch(x, mid, packed, absmax, blocksize)
    args[0] = x if _aligned(x) else x.clone()
    args[2] = dst = packed if _aligned(packed) else torch.empty_like(packed)
    if not launch(name, grid, block, args, x.device):
        w = nf4.quantize_nf4(x, blocksize, double_quant=False)
        packed.copy_(w.packed.view_as(packed))
        absmax.copy_(w.absmax)
    elif dst is not packed:
        packed.copy_(dst)


@torch.library.custom_op("nanopeft::nf4_dequantize", mutates_args=("out",), device_types="cuda")
def _dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                   nested_absmax: torch.Tensor | None, nested_quant_map: torch.Tensor | None,
                   offset: torch.Tensor | None, out: torch.Tensor, blocksize: int, nested_blocksize: int) -> None:
    dequantize_into(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, out, blocksize,
                    nested_blocksize)


@_dequantize_op.register_fake
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, out, blocksize, nested_blocksize):
    return None


@torch.library.custom_op("nanopeft::nf4_quantize", mutates_args=("packed", "absmax"), device_types="cuda")
def _quantize_op(x: torch.Tensor, mid: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                 blocksize: int) -> None:
    quantize_into(x, mid, packed, absmax, blocksize)


@_quantize_op.register_fake
def _(x, mid, packed, absmax, blocksize):
    return None


# ---------------------------------------------------------------------------- the API
def _kernel_fits(w: NF4Weight, dtype: torch.dtype) -> bool:
    """The layouts nf4.cu handles: a CUDA weight, blocks of 32 to 8192 values dividing 8192, int-sized."""
    return (w.packed.device.type == "cuda" and dtype in _SUFFIX and 32 <= w.blocksize
            and DEQUANTIZE_VALUES % w.blocksize == 0
            and w.numel <= _MAX_NUMEL and w.quant_map.dtype == torch.float32
            and w.absmax.dtype == (torch.uint8 if w.double_quant else torch.float32))


@torch.no_grad()
def dequantize(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ like `w.dequantize(dtype, out)` (same bits), through the CUDA kernel when `w` is on a GPU."""
    dtype = dtype or w.dtype
    if not _kernel_fits(w, dtype):
        return w.dequantize(dtype, out=out)
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    elif out.numel() != w.numel or not out.is_contiguous() or out.dtype != dtype:
        return w.dequantize(dtype, out=out)  # raises its one-line error
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    torch.ops.nanopeft.nf4_dequantize(c(w.packed), c(w.absmax), c(w.quant_map), c(w.nested_absmax),
                                      c(w.nested_quant_map), w.offset, out, w.blocksize, w.nested_blocksize)
    return out.view(w.shape)


@torch.no_grad()
def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 name: str | None = None) -> NF4Weight:
    """`nf4.quantize_nf4` (same bits, same errors), through the CUDA kernel when `tensor` is on a GPU."""
    what = nf4.check_quantize_args(tensor, blocksize, name)
    x = tensor.detach().reshape(-1).contiguous()
    if (x.device.type != "cuda" or x.numel() > _MAX_NUMEL
            or kernel(f"nf4_quantize_{_SUFFIX[x.dtype]}", x.device) is None):
        return nf4.quantize_nf4(tensor, blocksize, double_quant, name)
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    c = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    torch.ops.nanopeft.nf4_quantize(x, nf4.lookup_tables(x.device).mid, packed, c, blocksize)
    return nf4.weight_from_codes(packed, c, tensor, blocksize, double_quant, what)
