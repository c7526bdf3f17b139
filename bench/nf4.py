"""NF4 dequantize / quantize throughput: nanopeft vs bitsandbytes' CPU kernels vs torchao's NF4Tensor.

    python bench/nf4.py [--threads 2] [--rounds 3] [--reps 7] [--compile] [--shape 4096 8192]
    python bench/nf4.py --device cuda [--shape 4096 8192] [--reps 7]   the CUDA kernels (cuda_report)

One process, one fp32 weight W ~ N(0, 0.02²) of --shape, NF4 with double quantization everywhere
(blocks of 64, absmax in 8 bits per 256). Every row is timed in each of --rounds rounds (--reps calls
after a warm-up call each time), so slow drift hits all rows alike; the table shows the median and
min of all calls, the ratio to bitsandbytes' row of the same kind, and GB/s of output written. The
torch memory-copy rows are the machine's limit for writing that many bytes, into a fresh tensor (what
a dequantize that returns a new tensor must pay: page faults) or into a reused one. Before each row
the script waits until other processes use < 0.2 cores; "others" is the most they used during one
round of the row (CPU seconds of other processes / wall seconds: 0 = undisturbed, 2 = both cores busy).
Outputs are checked bit for bit against bitsandbytes before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanopeft.kernels import nf4_cuda  # noqa: E402
from nanopeft.nf4 import quantize_nf4  # noqa: E402

_TCK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds all processes have spent busy (from /proc/stat)."""
    v = list(map(int, open("/proc/stat").readline().split()[1:8]))
    return (sum(v) - v[3] - v[4]) / _TCK  # everything but idle and iowait


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def others_cores(fn, *args) -> tuple[object, float]:
    """Run fn; return (its result, cores used by *other* processes meanwhile)."""
    w0, b0, o0 = time.perf_counter(), busy_seconds(), own_seconds()
    r = fn(*args)
    wall = time.perf_counter() - w0
    return r, max(0.0, busy_seconds() - b0 - (own_seconds() - o0)) / wall


def wait_idle(limit=0.2, timeout=300.0) -> float:
    """Wait (at most `timeout` s) until other processes use < `limit` cores over 1 s; return the wait."""
    t0 = time.time()
    while time.time() - t0 < timeout and others_cores(time.sleep, 1.0)[1] >= limit:
        pass
    if time.time() - t0 > 1.5:
        print(f"  waited {time.time() - t0:.0f} s for other processes to go quiet", flush=True)
    return time.time() - t0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="times every row is visited")
    ap.add_argument("--reps", type=int, default=7, help="timed dequantize calls per row and round")
    ap.add_argument("--qreps", type=int, default=2, help="timed quantize calls per row and round")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(nanopeft dequantize)")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 8192])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: time nanopeft/kernels/nf4.cu against bitsandbytes' CUDA kernels instead")
    return ap.parse_args()


def main():
    args = parse_args()
    if args.device == "cuda":
        print_cuda_report(cuda_report(tuple(args.shape), rounds=args.reps))
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    M, N = args.shape
    torch.manual_seed(0)
    W = torch.randn(M, N) * 0.02
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), bitsandbytes {bnb.__version__}", flush=True)
    print(f"# command: python {' '.join(sys.argv)}", flush=True)

    rows = {}  # name -> (kind, out bytes or None, fn); kind groups the rows a ratio compares
    rows.update(copy_rows(W))
    rows.update(dequantize_rows(BF, W, args.compile))
    if not args.no_torchao:
        rows.update(torchao_dequantize_rows(W))
    rows.update(quantize_rows(BF, W, torchao=not args.no_torchao))
    times, others = time_rows(rows, args.rounds, args.reps, args.qreps)
    print_table(rows, times, others, W, args.rounds)


def copy_rows(W: torch.Tensor) -> dict:
    """The machine's limit: writing the output bytes, into a fresh tensor or a reused one."""
    rows = {}
    for dt in (torch.float32, torch.bfloat16):
        src = W.to(dt)
        dst = torch.empty_like(src).copy_(src)
        name = str(dt)[6:]
        rows[f"torch copy -> {name}, fresh tensor (src.clone())"] = (f"dq {name} fresh", src.nbytes, src.clone)
        rows[f"torch copy -> {name}, reused tensor (dst.copy_)"] = (f"dq {name} reused", src.nbytes,
                                                                    lambda d=dst, s=src: d.copy_(s))
    return rows


def dequantize_rows(BF, W: torch.Tensor, with_compile: bool) -> dict:
    """bitsandbytes' and nanopeft's dequantize (optionally torch.compile'd), checked bit for bit first."""
    M, N = W.shape
    rows = {}
    q, st = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = quantize_nf4(W)
    assert torch.equal(w.packed, q) and torch.equal(w.absmax, st.absmax)
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt)[6:]
        st.dtype = dt  # bitsandbytes' output dtype is the quant state's dtype
        ref = BF.dequantize_4bit(q, st)
        buf = torch.empty(M, N, dtype=dt)
        assert torch.equal(w.dequantize(dt), ref) and torch.equal(w.dequantize(dt, out=buf), ref)
        nb = ref.nbytes
        del ref
        rows[f"bitsandbytes dequantize_4bit -> {name} (C++ kernel)"] = (
            f"dq {name} fresh", nb, lambda s=st.dtype: (setattr(st, "dtype", s), BF.dequantize_4bit(q, st)))
        rows[f"nanopeft dequantize -> {name}"] = (f"dq {name} fresh", nb, lambda d=dt: w.dequantize(d))
        rows[f"nanopeft dequantize -> {name}, out= reused buffer"] = (
            f"dq {name} reused", nb, lambda d=dt, b=buf: w.dequantize(d, out=b))
        if with_compile:
            rows.update(compiled_rows(w, dt, buf, nb))
    return rows


def compiled_rows(w, dt: torch.dtype, buf: torch.Tensor, nb: int) -> dict:
    """torch.compile of nanopeft's dequantize -> dt, into a fresh tensor and into `buf`."""
    name = str(dt)[6:]
    t0 = time.perf_counter()
    f = torch.compile(lambda d=dt: w.dequantize(d))
    assert torch.equal(f(), w.dequantize(dt))
    print(f"# torch.compile of nanopeft dequantize -> {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    g = torch.compile(lambda d=dt, b=buf: w.dequantize(d, out=b))
    assert torch.equal(g(), w.dequantize(dt))
    return {f"nanopeft dequantize -> {name}, torch.compile": (f"dq {name} fresh", nb, f),
            f"nanopeft dequantize -> {name}, torch.compile, out= reused buffer": (f"dq {name} reused", nb, g)}


def torchao_dequantize_rows(W: torch.Tensor) -> dict:
    """torchao's NF4Tensor (blocks of 64, scalers per 256): close to bitsandbytes, not bit-exact."""
    from torchao.quantization import to_nf4

    rows = {}
    for dt in (torch.float32, torch.bfloat16):
        t = to_nf4(W.to(dt), 64, 256)
        err = (t.get_original_weight().float() - W).abs().max().item()
        print(f"# torchao NF4Tensor {str(dt)[6:]}: max |Ŵ - W| = {err:.2e} (not bit-exact with bnb)")
        rows[f"torchao NF4Tensor.get_original_weight -> {str(dt)[6:]}"] = (
            f"dq {str(dt)[6:]} fresh", W.numel() * dt.itemsize, t.get_original_weight)
    return rows


def quantize_rows(BF, W: torch.Tensor, torchao: bool) -> dict:
    """Quantize from fp32 and bf16: bitsandbytes, nanopeft (checked bit for bit) and torchao."""
    if torchao:
        from torchao.quantization import to_nf4
    rows = {}
    for dt in (torch.float32, torch.bfloat16):
        Wd, name = W.to(dt), str(dt)[6:]
        wq, (qq, sq) = quantize_nf4(Wd), bnb_quant(BF, Wd)
        assert torch.equal(wq.packed, qq) and torch.equal(wq.absmax, sq.absmax) and torch.equal(wq.offset, sq.offset)
        rows[f"bitsandbytes quantize_4bit ({name} in)"] = (f"q {name}", None, lambda x=Wd: bnb_quant(BF, x))
        rows[f"nanopeft quantize_nf4 ({name} in)"] = (f"q {name}", None, lambda x=Wd: quantize_nf4(x))
        if torchao:
            rows[f"torchao to_nf4 ({name} in)"] = (f"q {name}", None, lambda x=Wd: to_nf4(x, 64, 256))
    return rows


def time_rows(rows: dict, rounds: int, reps: int, qreps: int) -> tuple[dict, dict]:
    """Visit every row in each of `rounds` rounds: wait for a quiet machine, warm up, time `reps` calls
    (`qreps` for quantize rows). Returns (seconds per call, others' cores per round), each by row name."""
    times = {k: [] for k in rows}
    others = {k: [] for k in rows}
    for r in range(rounds):
        print(f"# round {r + 1}/{rounds}", flush=True)
        for k, (kind, _, fn) in rows.items():
            n_reps = qreps if kind.startswith("q") else reps
            wait_idle()
            fn()  # warm-up
            _, other = others_cores(lambda: [times[k].append(timed(fn)) for _ in range(n_reps)])
            others[k].append(other)
    return times, others


def print_table(rows: dict, times: dict, others: dict, W: torch.Tensor, rounds: int) -> None:
    """The markdown table: median and min ms, ratio to bitsandbytes' row of the same kind, GB/s written."""
    (M, N), n = W.shape, W.numel()
    print(f"\nW: {M}x{N} fp32 ({n / 1e6:.1f} M values), NF4 + double quant, {torch.get_num_threads()} threads; "
          f"median of {rounds} rounds x reps after warm-up\n")
    print("| operation | implementation | median ms | min ms | vs bitsandbytes | GB/s written | others (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {rows[k][0]: statistics.median(times[k]) for k in rows if k.startswith("bitsandbytes")}
    for k, (kind, nbytes, _) in rows.items():
        med, mn = statistics.median(times[k]), min(times[k])
        ref = base.get(kind) or base.get(kind.replace("reused", "fresh"))
        ratio = f"{med / ref:.2f}x" if ref else "-"
        gbs = f"{nbytes / med / 1e9:.1f}" if nbytes else f"{n / med / 1e6:.0f} Mval/s"
        print(f"| {kind} | {k} | {med * 1e3:.1f} | {mn * 1e3:.1f} | {ratio} | {gbs} | "
              f"{max(others[k]):.2f} |")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- CUDA (issue: NF4 kernels)
def cuda_time(fn, rounds: int = 7, calls: int = 20) -> float:
    """Median over `rounds` of the mean seconds per call of `calls` back-to-back calls (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def cuda_report(shape: tuple[int, int] = (4096, 8192), rounds: int = 7) -> dict:
    """Dequantize of an NF4 (double-quantized, blocks of 64) weight of `shape` to bf16 on the current GPU:
    nanopeft's kernel (into a reused buffer), its torch-ops path, bitsandbytes' CUDA dequantize_4bit,
    and quantize. Outputs are checked bit for bit first. Returns plain numbers (keys below) for
    bench/gpu.py; times in microseconds, bandwidths in GB/s."""
    import bitsandbytes.functional as BF

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    torch.manual_seed(0)
    W = (torch.randn(*shape) * 0.02).to(dev, torch.bfloat16)
    n = W.numel()
    w = nf4_cuda.quantize_nf4(W)
    kernels = nf4_cuda.available(dev)
    q, st = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = torch.empty(shape, dtype=torch.bfloat16, device=dev)
    ours, ref = nf4_cuda.dequantize(w, torch.bfloat16, out=out), w.dequantize(torch.bfloat16)
    exact_torch = torch.equal(ours, ref) and torch.equal(w.packed, quantize_nf4(W).packed)
    w_bnb = nf4_cuda.quantize_nf4(W)  # bitsandbytes' own (CUDA) codes through our kernel
    w_bnb.packed, w_bnb.absmax, w_bnb.nested_absmax, w_bnb.offset = q, st.absmax, st.state2.absmax, st.offset
    exact_bnb = torch.equal(nf4_cuda.dequantize(w_bnb, torch.bfloat16), BF.dequantize_4bit(q, st))
    moved = w.packed.numel() + w.absmax.numel() + 4 * w.nested_absmax.numel() + 2 * n  # bytes read + written
    # the GPU's DRAM bandwidth: double data rate x bus width (kHz, bits), and what a device copy reaches
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8
    src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src), rounds)  # reads and writes moved/2 each: `moved` bytes in all
    t_ours = cuda_time(lambda: nf4_cuda.dequantize(w, torch.bfloat16, out=out), rounds)
    t_torch = cuda_time(lambda: w.dequantize(torch.bfloat16, out=out), rounds)
    out_bnb = torch.empty_like(out)  # bitsandbytes into a reused buffer too (its CUDA path takes out=)
    t_bnb = cuda_time(lambda: BF.dequantize_4bit(q, st, out=out_bnb), rounds)
    t_q = cuda_time(lambda: nf4_cuda.quantize_nf4(W), rounds, calls=3)
    t_q_torch = cuda_time(lambda: quantize_nf4(W), rounds, calls=3)
    t_q_bnb = cuda_time(lambda: BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4"),
                        rounds, calls=3)
    return {
        "gpu": props.name, "shape": list(shape), "kernels": kernels, "exact_vs_torch_ops": exact_torch,
        "exact_vs_bitsandbytes": exact_bnb, "bytes_moved": moved,
        "peak_gbs": peak / 1e9, "copy_gbs": moved / t_copy / 1e9,
        "dequantize_us": t_ours * 1e6, "dequantize_gbs": moved / t_ours / 1e9,
        "dequantize_pct_of_peak": 100 * moved / t_ours / peak if peak else None,
        "dequantize_pct_of_copy": 100 * t_copy / t_ours,
        "torch_ops_dequantize_us": t_torch * 1e6, "bnb_dequantize_us": t_bnb * 1e6,
        "vs_bitsandbytes": t_ours / t_bnb, "vs_torch_ops": t_ours / t_torch,
        "quantize_us": t_q * 1e6, "torch_ops_quantize_us": t_q_torch * 1e6, "bnb_quantize_us": t_q_bnb * 1e6,
    }


def print_cuda_report(r: dict) -> None:
    M, N = r["shape"]
    print(f"# {r['gpu']}, torch {torch.__version__}; command: python {' '.join(sys.argv)}")
    print(f"# NF4 kernels compiled: {r['kernels']}; bit-exact vs torch ops: {r['exact_vs_torch_ops']}, "
          f"vs bitsandbytes CUDA: {r['exact_vs_bitsandbytes']}")
    peak = f"{r['peak_gbs']:.0f} GB/s" if r["peak_gbs"] else "unknown"
    print(f"# dequantize {M}x{N} -> bf16 moves {r['bytes_moved'] / 1e6:.1f} MB; DRAM peak {peak}, "
          f"device copy {r['copy_gbs']:.0f} GB/s\n")
    print("| operation | implementation (all into reused buffers) | µs | GB/s | % of peak | vs bitsandbytes |")
    print("|---|---|---:|---:|---:|---:|")
    gbs = lambda us: r["bytes_moved"] / us / 1e3  # noqa: E731
    pct = lambda us: f"{100 * gbs(us) / r['peak_gbs']:.0f}%" if r["peak_gbs"] else "-"  # noqa: E731
    ref = r["bnb_dequantize_us"]
    for name, us in [("nanopeft kernel, out= reused buffer", r["dequantize_us"]),
                     ("nanopeft torch ops, out= reused buffer", r["torch_ops_dequantize_us"]),
                     ("bitsandbytes dequantize_4bit", ref)]:
        print(f"| dequantize bf16 | {name} | {us:.1f} | {gbs(us):.0f} | {pct(us)} | {us / ref:.2f}x |")
    for name, us in [("nanopeft kernel", r["quantize_us"]), ("nanopeft torch ops", r["torch_ops_quantize_us"]),
                     ("bitsandbytes quantize_4bit", r["bnb_quantize_us"])]:
        print(f"| quantize bf16 | {name} | {us:.1f} | - | - | {us / r['bnb_quantize_us']:.2f}x |")


def bnb_quant(BF, x):
    return BF.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")


if __name__ == "__main__":
    main()
