"""Where a run computes and in which precision: the device, the autocast dtype, CPU threads, peak memory.

    --device auto ─► cuda if there is one, else cpu
    --precision auto ─► bf16 autocast on GPUs with bf16, fp16 (+ GradScaler, train.py) on older ones;
                        training on CPU: bf16 where it multiplies bf16 natively (AVX512-BF16 or AMX), else
                        fp32 (emulated bf16 matmuls are slower than fp32); the NF4 compute dtype follows;
                        inference on CPU: fp32 everywhere (one image, one answer on every machine)
    $NANOPEFT_CPU_BF16=0|1 ─► overrides the CPU probe (the tests force each branch with it)
"""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def threads_beside_workers(workers: int, processes: int = 1) -> int:
    """torch threads for one of `processes` processes on this CPU, leaving its DataLoader workers their
    cores: OpenMP threads that share a core with a busy worker spin-wait, and small matmuls then run
    many times slower than on one uncontended thread."""
    cores = os.cpu_count() or 1
    return max(1, cores // processes - min(workers, cores))


def host_reads_are_free(device: torch.device) -> bool:
    """Whether the host may read a value computed on `device` without waiting: on the CPU, yes; on an
    accelerator it waits for every queued kernel (a host sync), which the training step avoids (the
    skips dropout sampler and DoRA's cancelling-row search, which need one, run only where this holds)."""
    return torch.device(device).type == "cpu"


# The one override of the CPU probe, read at every call (so a module that imported fast_cpu_bf16 by name
# still sees it, and so do subprocesses): "1" treats this CPU as multiplying bf16 natively, "0" as not.
# The test suite sets "0" (tests/conftest.py) and forces "1" where it checks the other branch.
CPU_BF16_ENV = "NANOPEFT_CPU_BF16"


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """The probe: whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX, Arm's BF16 extension).
    Read from /proc/cpuinfo (x86 "flags", Arm "Features"); False where it is absent."""
    try:
        with open(cpuinfo) as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return False
    flags = set(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def fast_cpu_bf16() -> bool:
    """Whether bf16 is the fast path for training on this CPU: the probe, unless $NANOPEFT_CPU_BF16 says.
    Elsewhere bf16 matmuls are emulated and slower than fp32."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"${CPU_BF16_ENV}={forced!r}: set it to 1 (native bf16), 0 (none), or leave it unset")
    return cpu_has_native_bf16()


def choose_precision(device: torch.device, precision: str = "auto") -> tuple[torch.dtype | None, str]:
    """(autocast dtype, why): the one precision knob (nanoGPT style). None means plain fp32. The
    reason is what train.py / eval.py print, so a log says why a run computed in what it did."""
    if precision == "fp32":
        return None, "fp32 (--precision fp32)"
    if precision in ("bf16", "fp16"):
        return (torch.bfloat16 if precision == "bf16" else torch.float16), f"{precision} (--precision {precision})"
    if device.type == "cpu":
        if fast_cpu_bf16():
            return torch.bfloat16, "bf16 autocast (auto: this CPU has AVX512-BF16 / AMX)"
        return None, "fp32 (auto: this CPU has no AVX512-BF16 / AMX, so bf16 would be emulated and slower)"
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, f"bf16 autocast (auto: {torch.cuda.get_device_name(device)} supports bf16)"
    # V100-class GPUs: fp16 + GradScaler, as the paper trained
    return torch.float16, f"fp16 autocast + GradScaler (auto: {torch.cuda.get_device_name(device)} has no bf16)"


MERGE_PATHS = {  # eval.py / predict.py --merge: what each computes (docs/DORA.md ("Merging"))
    "yes": "adapters merged into dense Linears in the compute dtype (the fast path; exact up to rounding "
           "W0 + ΔW into that dtype)",
    "requantize": "adapters merged and rounded back to NF4 (4× smaller; outputs move by about one NF4 step)",
    "no": "adapters unmerged on the NF4 base (what training evaluated; slower)",
}


def inference_precision(device: torch.device, precision: str = "auto",
                        merge: str | None = "yes") -> tuple[torch.dtype | None, str]:
    """(autocast dtype, the line eval.py / predict.py print) for inference; `merge` names the path taken
    (None: a model exported as it is, nothing to merge).

    auto on a CPU is fp32 on every CPU, unlike training: bf16 is faster where the CPU multiplies it natively,
    but it moves probabilities by up to a few hundredths and flips near-tied labels, so the same image would
    get another answer on another machine (docs/BENCHMARKS.md, "Inference precision on CPU"). `--precision
    bf16` still asks for it. On a GPU, auto is training's choice (bf16, or fp16 without bf16)."""
    if precision == "auto" and device.type == "cpu":
        dtype, why = None, ("fp32 (auto: CPU inference is fp32 on every CPU, so an image gets the same answer "
                            "on any machine; --precision bf16 is faster where the CPU has AVX512-BF16 / AMX)")
    else:
        dtype, why = choose_precision(device, precision)
    return dtype, f"inference: {why}" + (f"; {MERGE_PATHS[merge]}" if merge else "")


def precision_name(dtype: torch.dtype | None) -> str:
    """What metrics.json, predict.py's log and the export's card record: fp32 | bf16 | fp16."""
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


BUDGET_HEADROOM = 0.9  # of the free memory: the allocator's fragmentation and the CUDA context's growth


def hugepage_cpu_allocator() -> bool:
    """Turn on torch's page-aligned CPU allocator (THP_MEM_ALLOC_ENABLE=1, huge pages for tensors of
    2 MB and more; https://github.com/pytorch/pytorch/pull/93888) unless the variable is already set,
    and return whether it is in effect. Call it before the first CPU tensor exists: torch reads the
    variable once, at its first CPU allocation.

    Why: with glibc's default placement, each checkpointed block's kept input lands above the freed
    temporaries of that block, and the small long-lived allocations of the autograd graph split those
    holes, so the heap grows by a block's temporaries per block while the live tensors grow by one
    activation. A QLoRA step's peak RSS was 1.2 GB for 0.47 GB of live heap on a ViT-B; page-aligned
    tensors keep it to 0.8 GB at the same speed (docs/BENCHMARKS.md "CPU memory: the allocator").
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # in effect, CPU tensors of 2 MiB and more are page-aligned (4 KiB); by default only to 64 bytes
    return all(torch.empty(2**19 + k).data_ptr() % 4096 == 0 for k in range(4))


def memory_budget_gb(device: torch.device) -> tuple[float, str]:
    """(GB, where it came from): what a training step may use here, for --grad-checkpointing auto without
    --memory-budget. GPU: its free memory plus what this process already holds there; CPU: the RAM
    the kernel reports available plus this process's resident set (the memory model counts the loaded
    weights and the runtime itself); 90% of either, for headroom."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        return BUDGET_HEADROOM * (free + held) / 1e9, f"90% of {torch.cuda.get_device_name(device)}'s free memory"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, StopIteration):
        raise ValueError("--grad-checkpointing auto: cannot read the available RAM (/proc/meminfo); "
                         "pass --memory-budget GB") from None
    return BUDGET_HEADROOM * (available + resident) / 1e9, "90% of the available RAM"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # CPU: the process's peak resident set (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
