"""NF4: frozen weights in 4.127 bits per value (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, §3).

    W (out, in) ─flatten─► blocks of 64 ─┬─► c_b = max|W_block|            fp32, one per block  (Eq. 1)
                                         └─► q_i = nearest NF4 code to W_i / c_b      4 bits per value
    c ─► c − mean(c) ─► blocks of 256 ─┬─► k_b = 8-bit dynamic code                   8 bits per block
                                       └─► c2 = max|block|                            fp32 per 256 blocks
    Ŵ_i = NF4[q_i] · (DYN[k_b] · c2_{b//256} + mean(c))                      doubleDequant (Eq. 5-6)

NF4 ("4-bit NormalFloat", Eq. 4): the 16 codes are quantiles of N(0, 1) rescaled to [-1, 1] with an
exact 0, so each code is about equally likely for normally distributed weights. Double quantization:
an fp32 absmax per 64 values costs 32/64 = 0.5 bit per value; quantizing the absmaxes to 8 bits in
blocks of 256 cuts that to 8/64 + 32/(64·256):

    bits per value = 4 + 8/64 + 32/(64·256) = 4.127            (4 + 32/64 = 4.5 without)

The storage is byte for byte what bitsandbytes' CPU `quantize_4bit(w, 64, quant_type="nf4",
compress_statistics=True)` produces, and what transformers saves for a bnb 4-bit Linear:
    weight                       uint8 [(n+1)//2, 1]   two codes per byte, value 2i in the HIGH nibble
    weight.absmax                uint8 [ceil(n/64)]    k (fp32 c without double quantization)
    weight.quant_map             fp32 [16]             NF4
    weight.nested_absmax         fp32 [ceil(n/64/256)] c2
    weight.nested_quant_map      fp32 [256]            DYN
    weight.quant_state.bitsandbytes__nf4  uint8 UTF-8 JSON: quant_type, blocksize, dtype, shape, nested_*
Rules that make it bit-exact: blocks run over the flattened tensor (a block may span two rows);
W_i / c_b is a multiply by the fp32 reciprocal of c_b (a division in a ragged last block); a value
exactly halfway between two codes takes the lower one; the 8-bit code of c is bitsandbytes' CPU rule
(a 65 536-entry table, not an exact nearest search); Ŵ is an fp32 product rounded once to its dtype
(docs/NF4.md ("Rounding rules that make it bit-exact")).

The first section below writes the format out in plain torch (quantize_plain, dequantize_plain,
quantize_8bit_plain); the fenced fast path after it computes the same bytes and is what runs on the CPU;
it imports no layer.
On a GPU, nf4_cuda.py runs the same arithmetic as CUDA kernels (nanopeft/kernels/nf4.cu), and a
test proves the two equal bit for bit.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# The 16 NF4 codes (QLoRA Eq. 4, normalised by the largest), as the exact fp32 values bitsandbytes uses.
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # QLoRA §3: "blocksize of 256 for the second quantization"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2016, 8-bit approximations), 256 sorted fp32:
    exponent 10^(i-6), i = 0..6, carries 2^i fraction levels (midpoints of linspace(0.1, 1, 2^i + 1)),
    with both signs; plus 0 and 1. Fine near 0, coarse near ±1."""
    vals = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        levels = 10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2.0)  # fp32, as bitsandbytes computes it
        vals += levels.tolist() + (-levels).tolist()
    return torch.tensor(sorted(vals), dtype=torch.float32)


# ============================================================================ NF4 in plain torch (read this)
# The whole format in four short functions: what the fast path below computes, byte for byte
# (tests/test_nf4.py::test_plain_and_fast_paths_are_byte_identical). quantize_nf4 runs the fast one.

def nf4_thresholds() -> torch.Tensor:
    """The 15 decision thresholds: the midpoints between neighbouring NF4 codes."""
    codes = torch.tensor(NF4_CODES, dtype=torch.float32)
    return (codes[:-1] + codes[1:]) / 2


def quantize_plain(tensor: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed codes uint8 [(n+1)//2, 1], absmax c fp32 [nblocks]): QLoRA Eq. 1 and 4, blockwise."""
    x = tensor.detach().reshape(-1).float()                       # blocks run over the flattened tensor
    n, nb = x.numel(), -(-x.numel() // blocksize)
    xb = F.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)    # (nblocks, blocksize), zero-padded
    c = xb.abs().amax(1)                                          # c_b = max |W_block|            (Eq. 1)
    scaled = xb * (1.0 / c.clamp(min=1e-38))[:, None]             # W_i / c_b: bnb multiplies by 1/c_b ...
    if n % blocksize:                                             # ... and divides in a ragged last block,
        c[-1] = c[-1].clamp(min=1e-38)                            # whose stored absmax it clamps (an all-0 tail)
        scaled[-1] = xb[-1] / c[-1]
    q = torch.bucketize(scaled, nf4_thresholds()).view(-1)[:n]    # nearest code; a tie takes the lower one
    q = F.pad(q, (0, n % 2), value=7)                             # an odd count: pad with the code of 0
    return (q[0::2] * 16 + q[1::2]).to(torch.uint8).view(-1, 1), c   # two codes a byte, first one high


def dequantize_plain(packed: torch.Tensor, c: torch.Tensor, shape, blocksize: int = 64,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ_i = NF4[q_i] · c_{i // blocksize}: unpack, look up, scale (an fp32 product rounded once)."""
    n = math.prod(shape)
    q = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[:n].long()   # (n,) codes
    w = torch.tensor(NF4_CODES, dtype=torch.float32)[q] * c.repeat_interleave(blocksize)[:n]
    return w.to(dtype).view(shape)


def quantize_8bit_plain(a: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization's inner step, the same two moves with bitsandbytes' 8-bit dynamic code (DYN):
    absmax per block of 256, then the code of each scaled value. bitsandbytes' CPU rule snaps the value to
    a grid of 65,536 points in [-1, 1] first and takes the nearest code of the grid point."""
    nb = -(-a.numel() // blocksize)
    blk = F.pad(a, (0, nb * blocksize - a.numel())).view(nb, blocksize)
    c2 = blk.abs().amax(1)                                         # (nb,)
    v = (blk * torch.where(c2 > 0, 1.0 / c2, 0.0)[:, None]).clamp(-1, 1)
    g = ((v + 1.0) * 0.5 * 65535.0 + 0.5).long()                   # the grid point's index
    grid = -1.0 + (2.0 * g.float()) / 65535.0
    dyn = dynamic_map()
    k = torch.bucketize(grid, (dyn[:-1] + dyn[1:]) / 2).to(torch.uint8)   # nearest DYN code of the grid point
    k[c2 == 0] = 0                                                 # an all-zero block gets code 0
    return k.view(-1)[: a.numel()], c2


def quantize_nf4_plain(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
    """quantize_nf4 written out: NF4 codes, then (QLoRA §3) c − mean(c) quantized again in 8 bits."""
    packed, c = quantize_plain(tensor, blocksize)
    w = NF4Weight(packed, c, torch.tensor(NF4_CODES, dtype=torch.float32), tensor.shape, tensor.dtype, blocksize)
    if double_quant:
        w.offset = c.mean()
        w.absmax, w.nested_absmax = quantize_8bit_plain(c - w.offset)
        w.nested_quant_map = dynamic_map()
    return w


# ============================================================================ the fast path (what runs)
# The same bytes as above from lookup tables and chunked, reused workspaces: no bucketize (a binary
# search per value), no (n,)-sized temporaries. Measured in docs/BENCHMARKS.md ("NF4 quantize / dequantize").

_TINY = 2.0 ** -115     # c_b below this: 4096/c_b overflows fp32, so those blocks take an exact slow path
_CELL = 4096            # quantize looks codes up in cells of width 1/4096 (see LookupTables)


class LookupTables:
    """The small tables behind the fast loops, built once per device (see `lookup_tables`)."""

    def __init__(self, device):
        nf4 = torch.tensor(NF4_CODES, dtype=torch.float32)
        self.nf4, self.dyn = nf4, dynamic_map()
        self.mid = nf4_thresholds()  # decision thresholds: q = #{mid < x}, so a tie goes down
        # dequantize: byte → (NF4[hi], NF4[lo]) as one 8-byte item, so one gather yields two values
        b = torch.arange(256)
        self.lut2 = torch.stack([nf4[b >> 4], nf4[b & 15]], 1).contiguous().view(torch.int64).view(256)
        # quantize: t = 4096·x/c is exact (x·(4096/c) is a power-of-two rescale of bnb's x·(1/c)), and
        # each cell j = trunc(t) holds at most one threshold τ. One fp32 per cell then gives the code
        #     q = trunc(A[j] + t/4)      A[j] = b + 1 − τ⁺/4       cell with τ  (τ⁺: next float above τ)
        #                                A[j] = b + ½ − centre/4   cell without (v stays in [b+¼, b+¾])
        # b = #thresholds below the cell. With τ: t > τ ⇔ t ≥ τ⁺ ⇔ v ≥ b + 1, so a tie t = τ goes down;
        # no rounding happens there, as |t| > 128 makes t − τ⁺ a multiple of 2^-16 and |v| < 32.
        j = torch.arange(-_CELL, _CELL + 1, dtype=torch.float64)[:, None]      # (8193, 1)
        tau = self.mid * _CELL                                                  # (15,) fp32, exact
        t = tau.double()[None, :]                                               # (1, 15)
        pos = j > 0                              # cell j holds [j, j+1) if j > 0, (j-1, j] if j < 0, (-1, 1) if 0
        lo, hi = torch.where(pos, j, j - 1), torch.where(pos, j + 1, torch.where(j < 0, j, 1.0))
        below = torch.where(pos, t < lo, t <= lo).sum(1).double()              # (8193,)
        inside = torch.where(pos, (lo <= t) & (t < hi), (lo < t) & (t < hi))   # (8193, 15), ≤ 1 per row
        assert int(inside.sum(1).max()) <= 1 and float(tau.abs().min()) >= 128
        tau_up = torch.nextafter(tau, torch.tensor(math.inf)).double()[None, :]
        a = torch.where(inside.any(1), below + 1 - (inside * tau_up).sum(1) / 4, below + 0.5 - (lo + hi)[:, 0] / 8)
        self.qcell = a.float()                                                  # (8193,) fp32
        assert torch.equal(self.qcell[inside.any(1)].double(), a[inside.any(1)])  # exact where it matters
        # bnb's CPU 8-bit quantizer: code = LUT[round((v + 1)/2 · 65535)], LUT[i] = #{mid < -1 + 2i/65535}
        grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
        self.dyn_lut = torch.searchsorted(0.5 * (self.dyn[:-1] + self.dyn[1:]), grid).to(torch.uint8)
        for k, v in vars(self).items():
            setattr(self, k, v.to(device))


_TABLES: dict[torch.device, LookupTables] = {}


def lookup_tables(device: torch.device) -> LookupTables:
    """The LookupTables on `device` (built at first use, then cached)."""
    return _TABLES[device] if device in _TABLES else _TABLES.setdefault(device, LookupTables(device))


def _chunk(device: torch.device, cpu_log2: int) -> int:
    """Values per step of the blockwise loops. CPU: 2^cpu_log2, big enough to amortise each step's
    ~20 op dispatches and the threads' fork/join, small enough that the step's temporaries stay in
    cache (the measured optimum, docs/BENCHMARKS.md: 2^17 for dequantize, 2^19 for quantize).
    Elsewhere: few launches."""
    return 1 << cpu_log2 if device.type == "cpu" else 1 << 24


@dataclass
class NF4Weight:
    """One NF4-quantized tensor. Names follow bitsandbytes' state dict (see the module docstring)."""

    packed: torch.Tensor            # uint8 [(n+1)//2, 1]
    absmax: torch.Tensor            # uint8 [nblocks] codes of c − offset (double quant) or fp32 c
    quant_map: torch.Tensor         # fp32 [16] NF4
    shape: torch.Size               # original shape
    dtype: torch.dtype              # original dtype: the default dequantize dtype
    blocksize: int = 64
    offset: torch.Tensor | None = None            # fp32 0-d mean(c)            (double quant only)
    nested_absmax: torch.Tensor | None = None     # fp32 [ceil(nblocks/256)] c2 (double quant only)
    nested_quant_map: torch.Tensor | None = None  # fp32 [256] DYN              (double quant only)
    nested_blocksize: int = NESTED_BLOCKSIZE

    TENSORS = ("packed", "absmax", "quant_map", "offset", "nested_absmax", "nested_quant_map")

    double_quant = property(lambda self: self.nested_absmax is not None)
    numel = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: sum(t.numel() * t.element_size() for t in self.tensors().values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def to(self, device, copy: bool = False) -> NF4Weight:
        return replace(self, **{k: t.to(device, copy=copy) for k, t in self.tensors().items()})

    def absmax_fp32(self) -> torch.Tensor:
        """c, fp32 [nblocks]: stored, or rebuilt as DYN[k] · c2 + offset (the inner dequant of Eq. 6)."""
        if not self.double_quant:
            return self.absmax
        nb, bs2 = self.absmax.numel(), self.nested_blocksize
        c = self.nested_quant_map[self.absmax.long()]                             # (nb,)
        c = F.pad(c, (0, -nb % bs2)).view(-1, bs2) * self.nested_absmax[:, None]  # (nb/256, 256)
        return c.view(-1)[:nb] + self.offset

    def rows(self, idx: torch.Tensor) -> NF4Weight:
        """Rows `idx` (k,) of a 2-D weight as their own NF4Weight, its absmax stored as fp32 c: its
        dequantize() is dequantize()[idx] at the cost of k rows. Needs whole blocks in every row."""
        if len(self.shape) != 2 or self.shape[1] % self.blocksize:
            raise ValueError(f"NF4Weight.rows: needs a 2-D weight whose rows hold whole blocks of "
                             f"{self.blocksize}, got shape {tuple(self.shape)}")
        out_f, in_f = self.shape
        packed = self.packed.view(out_f, in_f // 2)[idx]                 # (k, in/2): two codes per byte
        c = self.absmax_fp32().view(out_f, in_f // self.blocksize)[idx]  # (k, in/blocksize)
        return NF4Weight(packed.view(-1, 1), c.view(-1), self.quant_map, torch.Size((idx.numel(), in_f)),
                         self.dtype, self.blocksize)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Ŵ in `dtype` (default: the original dtype), shape `shape`; written into `out` if given
        (a reused buffer skips the page faults of a fresh allocation, the main CPU cost)."""
        dtype = dtype or self.dtype
        n, bs = self.numel, self.blocksize
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        elif out.numel() != n or not out.is_contiguous() or out.dtype != dtype:
            raise ValueError(f"dequantize: out must be a contiguous {dtype} tensor of {n} elements, "
                             f"got {out.dtype} {tuple(out.shape)}")
        c, codes, flat = self.absmax_fp32(), self.packed.view(-1), out.view(-1)
        full = n // bs * bs
        if full:
            _dequantize_blocks(codes[: full // 2], c[: n // bs], flat[:full], bs)
        if full < n:  # ragged last block
            tail = codes[full // 2:]
            q = torch.stack([tail >> 4, tail & 15], 1).view(-1)[: n - full].long()
            flat[full:] = self.quant_map[q] * c[-1]
        return out.view(self.shape)


def _dequantize_blocks(codes: torch.Tensor, c: torch.Tensor, out: torch.Tensor, bs: int) -> None:
    """out[i] = NF4[q_i] · c[i // bs] for whole blocks: one gather per byte, one multiply per value."""
    lut2 = lookup_tables(codes.device).lut2
    if torch.compiler.is_compiling():  # torch.compile fuses the plain formula into one loop
        out.view(-1, bs).copy_(lut2.view(torch.float32).view(256, 2)[codes.long()].view(-1, bs) * c[:, None])
        return
    per = max(1, _chunk(codes.device, 17) // bs)                     # blocks per step
    idx = torch.empty(min(per, c.numel()) * bs // 2, dtype=torch.int32, device=codes.device)
    pairs = torch.empty_like(idx, dtype=torch.int64)
    for q, cb, o in zip(codes.split(per * bs // 2), c.view(-1, 1).split(per), out.view(-1, bs).split(per)):
        i, p = (idx, pairs) if q.numel() == idx.numel() else (idx[: q.numel()], pairs[: q.numel()])
        i.copy_(q)                                               # gather needs int indices
        torch.index_select(lut2, 0, i, out=p)                    # (k,) int64 = (k, 2) fp32 codes
        v = p.view(torch.float32).view(-1, bs)                   # (blocks, bs)
        torch.mul(v, cb, out=o)  # Ŵ = NF4[q]·c (Eq. 6), an fp32 product rounded once to o's dtype


@torch.no_grad()
def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 name: str | None = None) -> NF4Weight:
    """Quantize `tensor` (fp32/bf16/fp16, any shape) to NF4, bit-identical to bitsandbytes on CPU.
    `name` labels errors, e.g. the checkpoint key; NaN or inf anywhere raises a ValueError."""
    what = check_quantize_args(tensor, blocksize, name)
    x = tensor.detach().reshape(-1)
    n, dev, tables = x.numel(), x.device, lookup_tables(x.device)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    c = torch.empty(-(-n // blocksize), dtype=torch.float32, device=dev)
    full, flat = n // blocksize * blocksize, packed.view(-1)
    if full:
        _quantize_blocks(x[:full], blocksize, flat[: full // 2], c[: n // blocksize], what, x)
    if full < n:  # ragged last block: bnb divides by the (clamped) absmax instead
        xt = x[full:].float()
        c[-1] = xt.abs().max().clamp(min=1e-38)
        _check_finite(c[-1:], x, what)
        q = F.pad(torch.bucketize(xt / c[-1], tables.mid), (0, (n - full) % 2), value=7)  # pad: value 0 → code 7
        flat[full // 2:] = (q[0::2] * 16 + q[1::2]).to(torch.uint8)
    return weight_from_codes(packed, c, tensor, blocksize, double_quant, what)


def check_quantize_args(tensor: torch.Tensor, blocksize: int, name: str | None) -> str:
    """What quantize_nf4 accepts (a non-empty float tensor, a bitsandbytes block size); returns the
    label for its errors: `name`, or the tensor's shape."""
    what = name or f"tensor{tuple(tensor.shape)}"
    if tensor.dtype not in _FLOATS:
        raise TypeError(f"{what}: NF4 quantizes float32/bfloat16/float16, got {tensor.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{what}: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if tensor.numel() == 0:
        raise ValueError(f"{what}: cannot quantize an empty tensor")
    return what


def weight_from_codes(packed: torch.Tensor, c: torch.Tensor, tensor: torch.Tensor, blocksize: int,
                      double_quant: bool, what: str) -> NF4Weight:
    """The NF4Weight of `tensor` from its packed 4-bit codes and fp32 absmax c (as quantize_nf4 or the
    CUDA kernel, nf4_cuda.py, computed them): c checked finite, then double-quantized if asked."""
    _check_finite(c, tensor.reshape(-1), what)
    tables = lookup_tables(c.device)
    w = NF4Weight(packed, c, tables.nf4.clone(), tensor.shape, tensor.dtype, blocksize)
    if double_quant:  # QLoRA §3 Double Quantization: c − mean(c) in 8 bits, blocks of 256
        w.offset = c.mean()
        if not torch.isfinite(w.offset):  # bitsandbytes silently returns NaNs here
            raise ValueError(f"{what}: mean absmax overflows float32; use double_quant=False")
        k, c2 = _quantize_dynamic8(c - w.offset, tables)
        # clones made once the temporaries are freed: they fill a hole in the heap instead of pinning
        # one between temporaries (the 7B's load kept such holes, docs/BENCHMARKS.md)
        w.absmax, w.nested_absmax, w.nested_quant_map = k.clone(), c2.clone(), tables.dyn.clone()
    return w


def _check_finite(c: torch.Tensor, x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(c).all():  # a block's absmax is NaN/inf iff the block holds a NaN/inf
        raise ValueError(f"{what}: {int((~torch.isfinite(x)).sum())} of {x.numel()} values are NaN or inf; "
                         f"NF4 cannot quantize them")


_BUFS = threading.local()  # per thread: {(name, dtype, device): buffer}, see reused_buffer


def reused_buffer(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat per-thread buffer of n elements, kept between calls and grown when too small. On CPU,
    fresh temporaries cost page faults (above glibc's mmap threshold) or heap holes (below it, pinned
    by the small long-lived NF4 tensors of each layer, which grew the 7B's load, docs/BENCHMARKS.md ("Numbers behind the NF4 code's choices (moved here from its comments)"))."""
    bufs, key = _BUFS.__dict__.setdefault("bufs", {}), (name, dtype, device)
    if key not in bufs or bufs[key].numel() < n:
        bufs[key] = None  # free the old one before allocating the bigger one
        bufs[key] = torch.empty(n, dtype=dtype, device=device)
    return bufs[key][:n]


def _workspace(dev: torch.device, m: int) -> tuple[torch.Tensor, ...]:
    """The step temporaries of _quantize_blocks, m values each (17 bytes per value: 8.5 MiB at 2^19);
    kept between calls on CPU (CUDA's caching allocator already reuses blocks)."""
    dtypes = {"s": torch.float32, "xf": torch.float32, "cell": torch.int32, "v": torch.float32, "q": torch.uint8}
    if dev.type != "cpu":
        return tuple(torch.empty(m, dtype=d, device=dev) for d in dtypes.values())
    return tuple(reused_buffer(f"quantize.{k}", m, d, dev) for k, d in dtypes.items())


def _quantize_blocks(x: torch.Tensor, bs: int, packed: torch.Tensor, c: torch.Tensor, what: str,
                     whole: torch.Tensor) -> None:
    """Whole blocks: c_b = max|x| and q_i = #{mid < x_i/c_b}, two codes per byte, high nibble first."""
    tables, dev = lookup_tables(x.device), x.device
    per = max(1, _chunk(dev, 19) // bs)
    m = min(per, c.numel()) * bs
    s, xf, cell, v, q = _workspace(dev, m)
    for xs, cs, ps in zip(x.split(per * bs), c.split(per), packed.split(per * bs // 2)):
        k = xs.numel()
        xb = (xs if xs.dtype == torch.float32 else xf[:k].copy_(xs)).view(-1, bs)  # (blocks, bs) fp32
        torch.amax(torch.abs(xb, out=s[:k].view(-1, bs)), 1, out=cs)  # c_b = absmax (Eq. 1)
        _check_finite(cs, whole, what)
        r = 1.0 / cs.clamp(min=1e-38)                             # bnb scales by the fp32 reciprocal
        r = torch.where(cs >= _TINY, r * _CELL, 0.0)              # tiny (or zero) blocks: fixed below
        t = torch.mul(xb, r[:, None], out=s[:k].view(-1, bs)).view(-1)  # 4096·x/c, exactly
        j = cell[:k].copy_(t).add_(_CELL)                          # cell index trunc(t) + 4096
        vk = torch.index_select(tables.qcell, 0, j, out=v[:k]).add_(t, alpha=0.25)  # A[j] + t/4, exactly
        qk = q[:k].copy_(vk).view(-1, 2)                           # q = trunc(A[j] + t/4) (see LookupTables)
        torch.add(qk[:, 1], qk[:, 0], alpha=16, out=ps)           # byte = 16·q_2i + q_2i+1
    tiny = ((c > 0) & (c < _TINY)).nonzero().view(-1)            # denormal-scale blocks: rare
    if tiny.numel():
        xb = x.view(-1, bs)[tiny].float()
        qt = torch.bucketize(xb * (1.0 / c[tiny].clamp(min=1e-38))[:, None], tables.mid)
        packed.view(-1, bs // 2)[tiny] = (qt[:, 0::2] * 16 + qt[:, 1::2]).to(torch.uint8)


def _quantize_dynamic8(a: torch.Tensor, tables: LookupTables, bs: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization of `a` with the dynamic map, as bitsandbytes' CPU kernel does it."""
    nb = -(-a.numel() // bs)
    blk = F.pad(a, (0, nb * bs - a.numel())).view(nb, bs)        # (nb, 256)
    c2 = blk.abs().amax(1)
    v = (blk * torch.where(c2 > 0, 1.0 / c2, 0.0)[:, None]).clamp(-1, 1)
    k = tables.dyn_lut[((v + 1.0) * 0.5 * 65535.0 + 0.5).long()]     # table rule, not an exact nearest search
    k[c2 == 0] = 0                                               # an all-zero block gets code 0
    return k.view(-1)[: a.numel()], c2


# ---------------------------------------------------------------------------- state dict (bnb format)
QS_KEY = "weight.quant_state.bitsandbytes__nf4"
NESTED_KEYS = ("weight.nested_absmax", "weight.nested_quant_map")


def quant_state_meta(t: torch.Tensor) -> dict:
    """The `weight.quant_state.bitsandbytes__nf4` entry decoded: UTF-8 JSON stored as a uint8 tensor."""
    return json.loads(bytes(t.tolist()))


def nf4_state_dict(w: NF4Weight) -> dict[str, torch.Tensor]:
    """The `weight*` entries transformers + bitsandbytes write for a 4-bit Linear (same order, same JSON)."""
    d = {"weight": w.packed, "weight.absmax": w.absmax, "weight.quant_map": w.quant_map}
    meta = {"quant_type": "nf4", "blocksize": w.blocksize, "dtype": str(w.dtype).removeprefix("torch."),
            "shape": list(w.shape)}
    if w.double_quant:
        d |= {"weight.nested_absmax": w.nested_absmax, "weight.nested_quant_map": w.nested_quant_map}
        meta |= {"nested_blocksize": w.nested_blocksize, "nested_dtype": "float32",
                 "nested_offset": float(w.offset)}
    d[QS_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return d


def nf4_from_state_dict(d: dict[str, torch.Tensor], what: str = "weight") -> NF4Weight:
    """Inverse of `nf4_state_dict`: an NF4Weight from the `weight*` entries (e.g. a bnb checkpoint)."""
    meta = quant_state_meta(d[QS_KEY])
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{what}: quant_type {meta.get('quant_type')!r} is not supported (only nf4)")
    shape, bs = torch.Size(meta["shape"]), int(meta["blocksize"])
    n, nested = math.prod(shape), "nested_offset" in meta
    w = NF4Weight(d["weight"].reshape(-1).view(torch.uint8).view(-1, 1), d["weight.absmax"],
                  d["weight.quant_map"], shape, getattr(torch, meta["dtype"]), bs)
    if nested:
        w.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=w.absmax.device)
        w.nested_absmax, w.nested_quant_map = d["weight.nested_absmax"], d["weight.nested_quant_map"]
        w.nested_blocksize = int(meta["nested_blocksize"])
    nb = -(-n // bs)
    for k, t, size in [("", w.packed, (n + 1) // 2), (".absmax", w.absmax, nb), (".quant_map", w.quant_map, 16),
                       (".nested_absmax", w.nested_absmax, -(-nb // w.nested_blocksize))]:
        if t is not None and t.numel() != size:
            raise ValueError(f"{what}{k} has {t.numel()} elements; shape {list(shape)}, blocksize {bs} need {size}")
    if not torch.equal(w.quant_map.cpu(), torch.tensor(NF4_CODES)):  # the dequantize tables assume it
        raise ValueError(f"{what}.quant_map is not the NF4 code table")
    if w.absmax.dtype != (torch.uint8 if nested else torch.float32):
        raise ValueError(f"{what}: weight.absmax is {w.absmax.dtype}: uint8 codes with nested_* keys, else float32")
    return w


__all__ = ["NF4Weight", "quantize_nf4", "check_quantize_args", "weight_from_codes", "nf4_state_dict",
           "nf4_from_state_dict", "quant_state_meta", "dynamic_map", "lookup_tables", "reused_buffer", "NF4_CODES",
           "BLOCKSIZES", "NESTED_BLOCKSIZE", "QS_KEY", "NESTED_KEYS"]
