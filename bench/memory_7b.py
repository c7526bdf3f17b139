"""Peak memory of one QLoRA r64 all-linear training step of the DINOv3 ViT-7B on CPU, by part, against
the memory model (nanopeft/training/memory.py, what `train.py --dry-run` prints).

    python bench/memory_7b.py                       # the 7B (synthetic checkpoint, ~13.4 GB written once)
    python bench/memory_7b.py --preset vitb16       # the same breakdown on a ViT-B in seconds

One fresh process: RSS after `import torch` (runtime), after the NF4 load (weights), after
add_adapters + head (adapters), after a warm-up step (+ AdamW state, gradients freed by
zero_grad(set_to_none), NF4's reused dequantize buffer), then the step's own peak (VmHWM reset
before it: activations and gradients). Batch 1, 224 px, α = 128, dropout 0.05, gradient checkpointing
on, AdamW. The synthetic 7B is the one bench/load_7b.py writes (hub keys and shapes, random values).
Each part is a difference of RSS readings taken after malloc_trim (so freed heap pages are not
counted); the step peak is the kernel's high-water mark. The model's parts are computed from shapes. Target (issue "Performance end to end"): the model within 10% of the peak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, build_nanopeft, peak_rss_gb, reset_peak, rss_gb, synthetic_checkpoint, vmhwm_gb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, struct mallinfo2 (all size_t)
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap_in_use_gb() -> float | None:
    """Bytes malloc has handed out and not had back (heap in use + mmapped chunks): the live tensors
    and the runtime's own small objects, without the free holes RSS also counts. None without glibc."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    m = f()
    return (m.uordblks + m.hblkhd) / 1e9


def track_heap(model: torch.nn.Module) -> dict:
    """Record the largest heap_in_use_gb() seen after any module's forward or backward."""
    peak = {"gb": 0.0}

    def probe(*_):
        peak["gb"] = max(peak["gb"], heap_in_use_gb() or 0.0)

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # modules fed by frozen inputs
    for m in model.modules():
        m.register_forward_hook(probe)
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            m.register_full_backward_hook(probe)
    return peak


def live_gb() -> float:
    """RSS after glibc hands its free heap pages back (malloc_trim): closer to the live tensors."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_gb()


def checkpoint_folder(preset: str) -> Path:
    if preset == "vit7b16":
        from load_7b import write_synthetic  # bf16 shards, written once and cached

        folder = CACHE / "synthetic-7b"
        write_synthetic(folder)
        return folder
    return synthetic_checkpoint(preset)


def measure(a) -> dict:
    from nanopeft.training.memory import estimate_training_memory
    from nanopeft.nf4_linear import nf4_nbytes

    from nanopeft.device import hugepage_cpu_allocator

    if a.allocator == "default":  # set, not inherited: torch reads it at the first CPU allocation
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
    thp = hugepage_cpu_allocator()  # what train.py does first; False when the variable says 0
    folder = checkpoint_folder(a.preset)
    dtype = DTYPES[a.dtype]
    r0 = live_gb()  # after importing nanopeft (the package imports every stage): the runtime
    model = build_nanopeft(folder, "lora", a.rank, 2 * a.rank, 0.05, "all-linear", dtype, True, adapters=False)
    r1 = live_gb()
    from nanopeft import add_adapters

    add_adapters(model.backbone, method="lora", rank=a.rank, alpha=2 * a.rank, dropout=0.05, targets="all-linear")
    model.train()
    r2 = live_gb()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    y = torch.zeros(a.batch, dtype=torch.long)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    r3 = live_gb()
    h3, heap = heap_in_use_gb(), track_heap(model)
    reset_peak()
    step()
    r4 = vmhwm_gb()
    est = estimate_training_memory(model, batch_size=a.batch, image_size=a.image_size, compute_dtype=dtype,
                                   device="cpu")
    measured = {"runtime": r0, "weights": r1 - r0, "adapters": r2 - r1, "optimizer+workspace": r3 - r2,
                "activations": r4 - r3, "step_peak": r4, "ru_maxrss": peak_rss_gb(),
                "nf4_bytes_exact": nf4_nbytes(model) / 1e9,
                "heap_growth_in_step": heap["gb"] - h3 if h3 is not None else None}
    return {"preset": a.preset, "thp_allocator": thp, "measured_gb": measured, "model_gb": est.as_dict(),
            "model_vs_step_peak": est.total / r4}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit7b16")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="NF4 compute dtype (CPU: fp32)")
    p.add_argument("--allocator", default="train", choices=["train", "default"],
                   help="train: torch's page-aligned CPU allocator, as train.py sets it; default: torch's default")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    r = measure(a)
    m, e = r["measured_gb"], r["model_gb"]
    print(f"{a.preset} QLoRA r{a.rank} all-linear, batch {a.batch}, {a.image_size} px, {a.dtype}, checkpointing on, "
          f"CPU allocator: {'page-aligned (THP_MEM_ALLOC_ENABLE=1)' if r['thp_allocator'] else 'default'}")
    print(f"  {'part':<22} {'measured GB':>11} {'model GB':>9}")
    rows = [("runtime", m["runtime"], e["runtime"]),
            ("weights (NF4 + other)", m["weights"], e["nf4_weights"] + e["other_weights"]),
            ("  of which NF4 (exact)", m["nf4_bytes_exact"], e["nf4_weights"]),
            ("adapters", m["adapters"], e["adapters"]),
            ("AdamW + workspace", m["optimizer+workspace"], e["optimizer"] + e["workspace"]),
            ("activations + grads", m["activations"], e["activations"] + e["gradients"]),
            ("step peak (VmHWM)", m["step_peak"], e["total"])]
    for name, meas, mod in rows:
        print(f"  {name:<22} {meas:>11.3f} {mod:>9.3f}")
    if m["heap_growth_in_step"] is not None:  # what the tensors took; the rest of the RSS growth is free holes
        print(f"  {'  of which live heap':<22} {m['heap_growth_in_step']:>11.3f} {e['activations'] + e['gradients']:>9.3f}")
    print(f"  model / measured step peak: {r['model_vs_step_peak']:.3f}   (ru_maxrss incl. load: {m['ru_maxrss']:.2f} GB)")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
