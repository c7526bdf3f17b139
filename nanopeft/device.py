"""Where a run computes and in which precision: the device, the autocast dtype, CPU threads, peak memory.

    --device auto ─► cuda if there is one, else cpu
    --precision auto ─► bf16 autocast on GPUs with bf16, fp16 (+ GradScaler, train.py) on older ones,
                        plain fp32 on CPU
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


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The one precision knob (nanoGPT style): None means plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16  # V100-class GPUs: fp16 + GradScaler, as the paper trained


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # CPU: the process's peak resident set (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
