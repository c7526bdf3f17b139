"""nanopeft/kernels/nf4.cu and nanopeft/kernels/nf4_cuda.py: the NF4 CUDA kernels, bit for bit.

Three ways, so that a machine without a GPU still checks the source that a GPU compiles:
- nvcc compiles nf4.cu for sm_75, sm_80 and sm_90, any warning (or register spill) an error;
- the host C++ compiler builds the same nf4.cu under tests/cuda_emulation.h (CUDA threads as host
  threads), and the kernels run on CPU tensors' memory with the launch arguments nf4_cuda.py passes:
  their output must equal nanopeft's torch-ops path and bitsandbytes on the case list of test_nf4.py;
- `python -m pytest -m cuda`: on a GPU, the real kernels against the torch-ops path and bitsandbytes'
  CUDA kernels (skipped without one).
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nanopeft import nf4
from nanopeft.kernels import nf4_cuda
from nanopeft.nf4 import quantize_nf4
from nanopeft.nf4_linear import NF4Linear

from conftest import NF4_DTYPES, NF4_EDGE_CASES, NF4_SHAPES, nf4_edge_case

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "nanopeft" / "kernels" / "nf4.cu"
CASES = [(f"shape{s}", dt) for s in NF4_SHAPES for dt in NF4_DTYPES] + \
        [(c, dt) for c in NF4_EDGE_CASES for dt in NF4_DTYPES]


def case_tensor(case: str, dtype: torch.dtype) -> torch.Tensor:
    if case.startswith("shape"):
        shape = eval(case[5:])  # the repr of a tuple from NF4_SHAPES
        torch.manual_seed(sum(shape))
        return torch.randn(*shape, dtype=dtype) * 0.02
    return nf4_edge_case(case, dtype)


def bnb_functional():
    return pytest.importorskip("bitsandbytes").functional


# ---------------------------------------------------------------------------- nvcc
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_nvcc_compiles_without_warnings(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    ptxas = "--warning-as-error,-warn-spills,-warn-lmem-usage"  # a spill or any local memory fails too
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-Werror", "all-warnings", "-Xptxas", ptxas,
           "-o", str(tmp_path / "nf4.cubin"), str(SOURCE)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "nf4.cubin").stat().st_size > 0


def find_nvrtc():
    """libnvrtc: from the pip package torch's CUDA wheels depend on (nvidia-cuda-nvrtc), or the system."""
    import ctypes.util
    import glob
    import importlib.util
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc") if importlib.util.find_spec("nvidia") else None
    paths = sorted(glob.glob(str(Path(list(spec.submodule_search_locations)[0]) / "lib" / "libnvrtc.so.*"))) \
        if spec else []
    for path in paths + [ctypes.util.find_library("nvrtc")]:
        if path and "builtins" not in path and ".alt." not in path:
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
    return None


@pytest.mark.parametrize("arch", ["sm_70", "sm_75", "sm_80", "sm_90"])
def test_nvrtc_compiles_with_torchs_options(arch):
    """What torch.cuda._compile_kernel does at run time, without a GPU: NVRTC alone, no header, the
    options torch passes (sm_70: NVRTC from CUDA 12, as on a V100)."""
    lib = find_nvrtc()
    if lib is None:
        pytest.skip("no libnvrtc (pip install nvidia-cuda-nvrtc-cu12)")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    opts = [f"--gpu-architecture={arch}"] + [f for f in COMMON_NVCC_FLAGS if f != "--expt-relaxed-constexpr"]
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"nf4.cu", 0, None, None) == 0
    for name in nf4_cuda.KERNELS:  # torch compiles one at a time; all at once here, to be quick
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    found = []
    if rc == 0:
        for name in nf4_cuda.KERNELS:
            lowered = ctypes.c_char_p()
            lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered))
            found.append(lowered.value.decode())  # a copy, before the program (which owns it) is destroyed
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode()
    assert rc == 0, text
    assert found == list(nf4_cuda.KERNELS) and size.value > 0  # extern "C": the names torch looks up
    ours = [line for line in text.splitlines() if "warning" in line.lower() and "are deprecated" not in line]
    assert not ours, text  # (NVRTC 12 warns that sm_70 is deprecated: not about this source)


# ---------------------------------------------------------------------------- host emulation
@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """nf4.cu built for the host under tests/cuda_emulation.h, once per session: {kernel name: launch}."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("nf4_emulated")
    src = d / "nf4_emulated.cpp"
    src.write_text(f'#include "{Path(__file__).with_name("cuda_emulation.h")}"\n#include "{SOURCE}"\n'
                   + "".join(f"EMULATE_KERNEL({k})\n" for k in nf4_cuda.KERNELS))
    lib = d / "nf4_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra",
           "-Werror", "-Wno-unknown-pragmas", "-o", str(lib), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    so = ctypes.CDLL(str(lib))

    def launcher(name):
        fn = getattr(so, f"launch_{name}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]

        def launch(grid, block, args):
            # like cuLaunchKernel's kernelParams (and torch's _CudaKernel): a pointer to each argument,
            # tensors as their data pointer, Python ints as C int
            vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
            ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
            assert grid[1:] == block[1:] == (1, 1)
            fn(grid[0], block[0], ptrs)
        return launch

    return {k: launcher(k) for k in nf4_cuda.KERNELS}


def emulated_dequantize(emulated, w: nf4.NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full(w.shape, 7.0, dtype=dtype)  # junk: every value must be written
    name, grid, block, args = nf4_cuda.dequantize_launch(w.packed, w.absmax, w.quant_map, w.nested_absmax,
                                                         w.nested_quant_map, w.offset, out, w.blocksize,
                                                         w.nested_blocksize)
    emulated[name](grid, block, args)
    return out


def emulated_quantize(emulated, t: torch.Tensor, blocksize=64, double_quant=True) -> nf4.NF4Weight:
    x = t.reshape(-1).contiguous()
    packed = torch.full(((x.numel() + 1) // 2, 1), 0xAB, dtype=torch.uint8)
    c = torch.full((-(-x.numel() // blocksize),), -1.0)
    name, grid, block, args = nf4_cuda.quantize_launch(x, nf4.lookup_tables(x.device).mid, packed, c, blocksize)
    emulated[name](grid, block, args)
    return nf4.weight_from_codes(packed, c, t, blocksize, double_quant, "t")


def assert_same_weight(a: nf4.NF4Weight, b: nf4.NF4Weight):
    assert a.tensors().keys() == b.tensors().keys()
    for k, t in a.tensors().items():
        assert t.dtype == getattr(b, k).dtype and torch.equal(t, getattr(b, k)), k


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CASES])
def test_emulated_kernels_equal_torch_ops_and_bitsandbytes(emulated, case, dtype, double_quant):
    t = case_tensor(case, dtype)
    ref = quantize_nf4(t, 64, double_quant)
    got = emulated_quantize(emulated, t, 64, double_quant)
    assert_same_weight(got, ref)                                        # quantize
    for out_dtype in NF4_DTYPES:
        assert torch.equal(emulated_dequantize(emulated, ref, out_dtype), ref.dequantize(out_dtype))  # dequantize
    BF = bnb_functional()
    q, st = BF.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(got.packed, q) and torch.equal(got.absmax, st.absmax)
    if double_quant:
        assert torch.equal(got.offset, st.offset) and torch.equal(got.nested_absmax, st.state2.absmax)
    if t.dim() >= 2 and t.shape[-1] % 16 == 0 and t.shape[-1] % 64 or t.shape[-1] % 2:
        return  # bnb's CPU dequantize is wrong (or a slow torch.compile fallback) there: test_nf4.py
    assert torch.equal(emulated_dequantize(emulated, ref, dtype), BF.dequantize_4bit(q, st).reshape(t.shape))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_emulated_other_blocksizes_and_several_cuda_blocks(emulated, blocksize):
    torch.manual_seed(blocksize)
    t = torch.randn(300, 140, dtype=torch.bfloat16)  # 42000 values: several CUDA blocks, a ragged end
    ref = quantize_nf4(t, blocksize)
    assert_same_weight(emulated_quantize(emulated, t, blocksize), ref)
    for dtype in NF4_DTYPES:
        assert torch.equal(emulated_dequantize(emulated, ref, dtype), ref.dequantize(dtype))


def ragged_division_case() -> torch.Tensor:
    """45 values (one ragged block) whose codes differ between x / c (bitsandbytes' rule for the last
    block) and x · (1/c) (its rule for whole blocks): values a few ulps around a threshold times c."""
    mid, c = nf4.lookup_tables(torch.device("cpu")).mid, torch.tensor(1.1643749475479126)  # c with 8 such x
    near = []
    for direction in (10.0, -10.0):
        x = mid * c
        for _ in range(3):
            x = torch.nextafter(x, torch.tensor(direction))
            near.append(x[(x / c > mid) != (x * (1.0 / c) > mid)])
    x = torch.cat(near)
    assert 8 <= x.numel() <= 22
    return torch.cat([c.view(1), x, -x, torch.zeros(44 - 2 * x.numel())])


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_emulated_ragged_block_divides(emulated, dtype):
    t = ragged_division_case()
    ref = quantize_nf4(t, 64)
    assert_same_weight(emulated_quantize(emulated, t, 64), ref)
    q, st = bnb_functional().quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ref.packed, q)


def test_emulated_rounding_of_every_bf16_and_fp16_result(emulated):
    """The kernel's own fp32 -> bf16 / fp16 rounding against torch's casts on values chosen to hit
    every rounding case: ties to even, fp16 subnormals and underflow, overflow to inf."""
    codes = torch.tensor(nf4.NF4_CODES)
    bits = torch.randint(0, 2 ** 31 - 2 ** 23, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    c = bits.to(torch.int32).view(torch.float32).abs()        # absmax values of every exponent
    c = c[torch.isfinite(c) & (c < 1e30)]
    c = torch.cat([c, torch.tensor([65504.0, 65520.0, 65519.99, 6.1e-5, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 1.0])])
    nb = c.numel()
    packed = (torch.arange(nb * 32) % 256).to(torch.uint8).view(-1, 1)  # every byte: all 16 codes, all pairs
    w = nf4.NF4Weight(packed, c.contiguous(), codes, torch.Size([nb * 64]), torch.float32, 64)
    for dtype in (torch.bfloat16, torch.float16):
        ref = w.dequantize(torch.float32).to(dtype)  # the fp32 product, then torch's cast
        assert torch.equal(emulated_dequantize(emulated, w, dtype), ref), dtype


def test_emulated_op_bodies_handle_unaligned_pointers_and_missing_kernels(emulated):
    """nf4_cuda.dequantize_into / quantize_into, the bodies of the torch ops, with the emulated kernels
    as the launcher: views that start 1 byte or 2 elements in still give the reference's bits, and
    with no kernel they fall back to the torch-ops path."""
    t = torch.randn(40, 96, dtype=torch.bfloat16)
    ref = quantize_nf4(t)
    run = lambda name, grid, block, args, device: emulated[name](grid, block, args) or True  # noqa: E731
    none = lambda *a: False  # noqa: E731
    for launch in (run, none):
        packed = torch.empty(ref.packed.numel() + 1, dtype=torch.uint8)[1:].copy_(ref.packed.view(-1))
        out = torch.zeros(ref.numel + 2, dtype=torch.float16)[2:]  # 4 bytes in: not 16-byte aligned
        assert packed.data_ptr() % 16 and out.data_ptr() % 16
        nf4_cuda.dequantize_into(packed, ref.absmax, ref.quant_map, ref.nested_absmax, ref.nested_quant_map,
                                 ref.offset, out, 64, 256, launch=launch)
        assert torch.equal(out.view(40, 96), ref.dequantize(torch.float16))
        x = torch.empty(t.numel() + 1, dtype=torch.bfloat16)[1:].copy_(t.view(-1))
        p = torch.empty(ref.packed.numel() + 3, dtype=torch.uint8)[3:].view(-1, 1)
        c = torch.empty(ref.absmax.numel())
        nf4_cuda.quantize_into(x, nf4.lookup_tables(x.device).mid, p, c, 64, launch=launch)
        assert torch.equal(p, ref.packed) and torch.equal(c, quantize_nf4(t, double_quant=False).absmax)


# ---------------------------------------------------------------------------- the Python module on CPU
def test_cpu_tensors_take_the_torch_ops_path():
    t = torch.randn(33, 70)
    w = nf4_cuda.quantize_nf4(t, name="k")
    assert_same_weight(w, quantize_nf4(t))
    assert torch.equal(nf4_cuda.dequantize(w, torch.bfloat16), w.dequantize(torch.bfloat16))
    out = torch.empty(33, 70, dtype=torch.float16)
    assert nf4_cuda.dequantize(w, torch.float16, out=out).data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="k: 1 of 64 values are NaN"):
        nf4_cuda.quantize_nf4(torch.tensor([float("nan")] + [1.0] * 63), name="k")
    assert not nf4_cuda.available("cpu")


def test_ops_are_registered_with_fake_implementations():
    w = quantize_nf4(torch.randn(4, 64)).to("meta")
    out = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")
    torch.ops.nanopeft.nf4_dequantize(w.packed, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map,
                                      w.offset, out, 64, 256)  # the fake impl: shapes only, no error
    x = torch.empty(256, device="meta")
    torch.ops.nanopeft.nf4_quantize(x, torch.empty(15, device="meta"), torch.empty(128, 1, dtype=torch.uint8,
                                    device="meta"), torch.empty(4, device="meta"), 64)
    torch.library.opcheck(torch.ops.nanopeft.nf4_dequantize.default,
                          (w.packed, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset, out,
                           64, 256), test_utils=("test_schema",))


# ---------------------------------------------------------------------------- on a GPU: pytest -m cuda
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_kernels_compile():
    assert nf4_cuda.available("cuda"), "NVRTC could not compile nanopeft/kernels/nf4.cu (see the warning)"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CASES])
def test_cuda_kernels_equal_torch_ops(case, dtype, double_quant):
    t = case_tensor(case, dtype).cuda()
    ref = quantize_nf4(t, 64, double_quant)  # the torch-ops path, on the GPU
    assert_same_weight(nf4_cuda.quantize_nf4(t, 64, double_quant), ref)
    if not double_quant:  # (mean(c), the offset, is summed in another order on the GPU than on the CPU)
        assert_same_weight(nf4_cuda.quantize_nf4(t, 64, False).to("cpu"), quantize_nf4(t.cpu(), 64, False))
    for out_dtype in NF4_DTYPES:
        assert torch.equal(nf4_cuda.dequantize(ref, out_dtype), ref.dequantize(out_dtype))
        assert torch.equal(nf4_cuda.dequantize(ref, out_dtype).cpu(), ref.to("cpu").dequantize(out_dtype))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", NF4_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096), (300, 257), (7, 33), (1, 65), (128, 64)], ids=str)
def test_cuda_dequantize_equals_bitsandbytes_cuda(shape, dtype):
    """bitsandbytes' CUDA quantize_4bit output fed to both dequantizers: the same bits."""
    BF = bnb_functional()
    torch.manual_seed(0)
    t = (torch.randn(*shape, dtype=dtype) * 0.02).cuda()
    try:
        q, st = BF.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes has no CUDA backend here: {e}")
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": str(dtype)[6:], "shape": list(shape),
            "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(st.offset)}
    import json
    w = nf4.nf4_from_state_dict({"weight": q, "weight.absmax": st.absmax, "weight.quant_map": st.code,
                                 "weight.nested_absmax": st.state2.absmax, "weight.nested_quant_map": st.state2.code,
                                 nf4.QS_KEY: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)})
    w.offset = st.offset.reshape(())  # the exact fp32 offset, not its JSON round trip
    assert torch.equal(nf4_cuda.dequantize(w, dtype), BF.dequantize_4bit(q, st).reshape(shape))
    # bitsandbytes' CUDA quantizer: the same fp32 absmax of whole blocks, and the same codes but where
    # its reciprocal may differ from the CPU rule we follow (bit-exact with bnb on CPU: test_nf4.py)
    ours = nf4_cuda.quantize_nf4(t, 64, double_quant=False)
    q2, st2 = BF.quantize_4bit(t, blocksize=64, compress_statistics=False, quant_type="nf4")
    nb = t.numel() // 64
    assert torch.equal(ours.absmax[:nb], st2.absmax[:nb])
    same = (ours.packed.view(-1)[: nb * 32] == q2.view(-1)[: nb * 32]).float().mean().item()
    assert same > 0.999, same


@pytest.mark.cuda
@cuda
def test_cuda_nf4linear_forward_backward_use_the_kernel(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192).cuda()
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    assert_same_weight(layer.nf4_weight(), quantize_nf4(lin.weight))  # quantized by the kernel, same bits
    launched = []
    real = nf4_cuda.kernel
    monkeypatch.setattr(nf4_cuda, "kernel", lambda name, dev: (launched.append(name), real(name, dev))[1])
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert launched == ["nf4_dequantize_bf16"] * 2  # forward, then backward: one kernel each
    W = layer.nf4_weight().dequantize(torch.bfloat16)  # the torch-ops reference
    xb = x.detach().bfloat16().requires_grad_(True)
    ref = torch.nn.functional.linear(xb, W, lin.bias.detach().bfloat16())
    ref.backward(g)
    assert torch.equal(y, ref) and torch.equal(x.grad, xb.grad.float())


@pytest.mark.cuda
@cuda
def test_cuda_report_of_the_benchmark():
    """bench/nf4.py --device cuda (and bench/gpu.py through cuda_report) on a small weight."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_nf4", ROOT / "bench" / "nf4.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pytest.importorskip("bitsandbytes")
    r = bench.cuda_report((512, 1024), rounds=1)
    assert r["kernels"] and r["exact_vs_torch_ops"] and r["exact_vs_bitsandbytes"]
    assert r["bytes_moved"] == 512 * 1024 // 2 + 512 * 1024 // 64 + 4 * 32 + 2 * 512 * 1024
    assert r["dequantize_us"] > 0 and r["vs_bitsandbytes"] > 0
