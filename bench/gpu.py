"""Everything a lent GPU should measure, in one command (< 8 minutes on one CUDA GPU).

    python bench/gpu.py                 # on a CUDA machine: writes bench/results/gpu-<device>.{json,md}
    python bench/gpu.py --smoke         # the same code path on CPU, a tiny model, seconds (CI runs it)

1. tests   `pytest -m cuda` (NF4 bit-exactness on CUDA, adapter parity, bf16 autocast, fp16 + GradScaler)
2. steps   the 7B-shaped model (random NF4 weights quantized on the device, no checkpoint needed):
           QLoRA and QDoRA r64 all-linear, batch 4 and 32, 224 px, bf16 autocast, gradient
           checkpointing: images/s, peak memory (max_memory_allocated), MFU = model FLOPs / s / peak
           bf16 FLOP/s, with model FLOPs = 4 · tokens · frozen weights (forward + input gradient;
           the frozen weights get no weight gradient; recomputation not counted) + attention
3. nf4     dequantize of a 4096×8192 weight to bf16: GB/s moved (0.5 + 1/64 B/weight read, 2 written)
           against the GPU's memory bandwidth; bench/nf4.py's cuda_report() where it exists
4. infer   merged inference (merge_adapters into bf16) images/s at batch 32
5. reference  transformers + bitsandbytes + PEFT where installed: one QLoRA r64 step of a ViT-L-shaped
           model next to nanopeft's (a hub checkpoint written on the fly)
Peak FLOP/s and bandwidth come from a table of known GPUs (dense bf16, no sparsity); unknown: no MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# name fragment: (dense bf16 FLOP/s, memory bandwidth B/s), vendor datasheets
GPUS = {"H200": (989e12, 4.8e12), "H100 NVL": (835e12, 3.9e12), "H100 PCIe": (756e12, 2.0e12),
        "H100": (989e12, 3.35e12), "A100-SXM4-80GB": (312e12, 2.039e12), "A100 80GB PCIe": (312e12, 1.935e12),
        "A100": (312e12, 1.555e12), "L40S": (362e12, 0.864e12), "L4": (121e12, 0.3e12),
        "A10G": (70e12, 0.6e12), "V100": (125e12, 0.9e12), "T4": (65e12, 0.32e12), "RTX 4090": (165e12, 1.008e12)}


def gpu_peaks(name: str):
    for k, v in GPUS.items():  # most specific first (dict order)
        if k in name:
            return v
    return (None, None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, n: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mem_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    from common import peak_rss_gb
    return peak_rss_gb()


def reset_mem(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- 1. the CUDA tests ---------------------------------------------------------------------------------

def run_tests(smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    cmd += ["tests/test_lora.py"] if smoke else []  # smoke: the selection path only, one file
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (p.stdout or p.stderr).strip().splitlines()[-1:] or [""]
    # exit 5 = nothing selected (no test carries the mark in that selection): not a failure
    return {"ok": p.returncode in (0, 5), "rc": p.returncode, "summary": tail[0], "s": time.perf_counter() - t0}


# ---- 2. the 7B-shaped model, built on the device with random NF4 weights ---------------------------------

def synthetic_model(preset: str, device, compute_dtype):
    """DINOv3ViT of `preset`'s shape: every block Linear an NF4Linear of random N(0, 0.02²) weights
    quantized on `device` one at a time (never a dense 7B in memory), everything else random."""
    from nanopeft import PRESETS, DINOv3ViT, NF4Linear
    from common import TINY

    cfg = PRESETS["vits16"].replace(**TINY) if preset == "tiny" else PRESETS[preset]
    with torch.device("meta"):
        model = DINOv3ViT(cfg)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.startswith("layer."):
            w = torch.randn(m.out_features, m.in_features, device=device, dtype=compute_dtype).mul_(0.02)
            b = torch.zeros(m.out_features, device=device, dtype=compute_dtype) if m.bias is not None else None
            model.set_submodule(name, NF4Linear.from_weight(w, b, compute_dtype=compute_dtype))
            del w
    for mod_name, mod in model.named_modules():  # what is still on meta: patch embedding, norms, tokens, ...
        for k, t in list(mod._parameters.items()):
            if t is not None and t.is_meta:
                v = torch.empty_like(t, device=device, dtype=torch.float32)
                v.fill_(1.0) if "norm" in mod_name and k == "weight" else \
                    v.fill_(0.1) if k == "lambda1" else v.normal_(0, 0.02)
                mod._parameters[k] = nn.Parameter(v, requires_grad=False)
        for k, t in list(mod._buffers.items()):
            if t is not None and t.is_meta:  # RoPE's inv_freq is computed, never stored
                mod._buffers[k] = mod.compute_inv_freq().to(device) if k == "inv_freq" else \
                    torch.zeros_like(t, device=device)
    return model.to(compute_dtype), cfg


def step_flops(cfg, batch: int, image_size: int, frozen: int) -> float:
    N = 1 + cfg.num_register_tokens + (image_size // cfg.patch_size) ** 2
    attn = 4 * batch * N * N * cfg.hidden_size * cfg.num_hidden_layers  # QKᵀ and PV, forward
    return 4 * batch * N * frozen + 2 * attn  # forward + input gradient of the frozen matmuls


def train_steps(preset: str, device, batches, methods, steps: int, image_size: int) -> list[dict]:
    rows = []
    for method in methods:  # one function call per method: its model is freed before the next is built
        rows += train_one_method(preset, device, batches, method, steps, image_size, merged=method == methods[0])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bf16_step(model, opt, x, y):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_one_method(preset, device, batches, method, steps, image_size, merged: bool) -> list[dict]:
    from nanopeft import Classifier, NF4Linear, add_adapters, make_head, merge_adapters

    model, cfg = synthetic_model(preset, device, torch.bfloat16)
    frozen = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    model.gradient_checkpointing = True
    add_adapters(model, method=method, rank=64, alpha=128, dropout=0.05, targets="all-linear")
    clf = Classifier(model, make_head(cfg.hidden_size, 9), pool="cls").to(device).train()
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    peak_flops, _ = gpu_peaks(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        y = torch.randint(0, 9, (batch,), device=device)
        reset_mem(device)
        try:
            t = timeit(lambda: bf16_step(clf, opt, x, y), device, steps)
        except torch.OutOfMemoryError:
            rows.append({"method": method, "batch": batch, "error": "out of memory"})
            continue
        flops = step_flops(cfg, batch, image_size, frozen)
        rows.append({"method": method, "batch": batch, "s_per_step": t, "images_per_s": batch / t,
                     "peak_gb": peak_mem_gb(device), "tflops": flops / t / 1e12,
                     "mfu": flops / t / peak_flops if peak_flops else None})
    if merged:
        clf.eval()
        merge_adapters(clf.backbone, dtype=torch.bfloat16)
        rows.append(infer(clf, device, batches[-1], image_size, steps))
    return rows


@torch.inference_mode()
def infer(clf, device, batch: int, image_size: int, steps: int) -> dict:
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def fwd():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            clf(x)

    t = timeit(fwd, device, steps)
    return {"method": "merged inference (bf16)", "batch": batch, "images_per_s": batch / t}


# ---- 3. NF4 dequantize bandwidth ---------------------------------------------------------------------

def dequantize_bandwidth(device, shape) -> dict:
    try:
        import nf4 as nf4_bench  # bench/nf4.py (the kernels helper's cuda_report, where present)
        if hasattr(nf4_bench, "cuda_report") and device.type == "cuda":
            return {"cuda_report": nf4_bench.cuda_report()}
    except Exception as e:  # a report that fails must not stop the rest of the run
        print(f"bench/nf4.py cuda_report failed: {e}", file=sys.stderr)
    from nanopeft.nf4 import quantize_nf4

    w = quantize_nf4(torch.randn(*shape, device=device).mul_(0.02))
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    t = timeit(lambda: w.dequantize(torch.bfloat16, out=out), device, 20)
    n = math.prod(shape)
    moved = n / 2 + n / 64 + 2 * n
    _, bw = gpu_peaks(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    return {"shape": list(shape), "us": t * 1e6, "gb_per_s": moved / t / 1e9,
            "of_bandwidth": moved / t / bw if bw else None}


# ---- 5. the reference stack ----------------------------------------------------------------------------

def reference_side_by_side(preset: str, batch: int, image_size: int, steps: int) -> dict:
    import importlib.util

    missing = [m for m in ("transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"reference stack not installed ({', '.join(missing)})"}
    from common import build_nanopeft, build_reference, synthetic_checkpoint

    folder = synthetic_checkpoint(preset)
    out = {side: one_step_side(build, folder, batch, image_size, steps)
           for side, build in (("reference", build_reference), ("nanopeft", build_nanopeft))}
    out["time_ratio"] = out["nanopeft"]["s_per_step"] / out["reference"]["s_per_step"]
    return out


def one_step_side(build, folder, batch, image_size, steps) -> dict:
    model = build(folder, "lora", 64, 128, 0.05, "all-linear", torch.bfloat16, True)
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 9, (batch,), device=device)
    reset_mem(device)
    t = timeit(lambda: bf16_step(model, opt, x, y), device, steps)
    return {"s_per_step": t, "peak_gb": peak_mem_gb(device)}


def markdown(r: dict) -> str:
    lines = [f"### {r['device']} ({r['torch']})", "", f"tests: {r['tests']['summary']} (rc {r['tests']['rc']})", "",
             "| run | batch | s/step | images/s | peak GB | TFLOP/s | MFU |", "|---|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "—" if v is None else format(v, f)
    for row in r["steps"]:
        lines.append(f"| {row['method']} | {row['batch']} | {fmt(row.get('s_per_step'), '.3f')} | "
                     f"{fmt(row.get('images_per_s'), '.1f')} | {fmt(row.get('peak_gb'), '.2f')} | "
                     f"{fmt(row.get('tflops'), '.0f')} | {fmt(row.get('mfu'), '.1%')} |")
    d = r["nf4"]
    if "gb_per_s" in d:
        lines += ["", f"NF4 dequantize {d['shape']} → bf16: {d['us']:.1f} µs, {d['gb_per_s']:.0f} GB/s"
                  + (f" ({d['of_bandwidth']:.0%} of the memory bandwidth)" if d.get("of_bandwidth") else "")]
    else:
        lines += ["", f"NF4: {json.dumps(d)[:400]}"]
    ref = r["reference"]
    if "time_ratio" in ref:
        lines += ["", f"reference ({r['reference_preset']} QLoRA r64): {ref['reference']['s_per_step']:.3f} s/step, "
                  f"nanopeft {ref['nanopeft']['s_per_step']:.3f} s/step ({ref['time_ratio']:.2f}×), peak "
                  f"{ref['reference']['peak_gb']:.2f} vs {ref['nanopeft']['peak_gb']:.2f} GB"]
    else:
        lines += ["", f"reference: {ref.get('skipped', ref)}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds: the same code path")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for gpu-<device>.json/.md")
    p.add_argument("--skip", default="", help="comma list of sections to skip: tests, steps, nf4, reference")
    a = p.parse_args(argv)
    skip = set(a.skip.split(","))
    if a.smoke:
        torch.set_num_threads(1)  # a shared CI machine: one thread is the robust choice
        device, preset, ref_preset, batches, steps, size, shape = torch.device("cpu"), "tiny", "tiny", [1, 2], 1, 64, (64, 128)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py: no CUDA GPU here (use --smoke for the CPU smoke run)")
        device, preset, ref_preset, batches, steps, size, shape = torch.device("cuda"), "vit7b16", "vitl16", [4, 32], 3, 224, (4096, 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
    r = {"device": name, "torch": torch.__version__, "smoke": a.smoke, "reference_preset": ref_preset}
    t0 = time.perf_counter()
    r["tests"] = run_tests(a.smoke) if "tests" not in skip else {"ok": True, "rc": None, "summary": "skipped"}
    print(f"[{time.perf_counter() - t0:.0f}s] tests: {r['tests']['summary']}", flush=True)
    r["steps"] = train_steps(preset, device, batches, ["lora", "dora"], steps, size) if "steps" not in skip else []
    print(f"[{time.perf_counter() - t0:.0f}s] steps done", flush=True)
    r["nf4"] = dequantize_bandwidth(device, shape) if "nf4" not in skip else {"skipped": True}
    r["reference"] = reference_side_by_side(ref_preset, batches[0], size, steps) if "reference" not in skip \
        else {"skipped": "--skip reference"}
    r["total_s"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    (a.out / f"gpu-{slug}.json").write_text(json.dumps(r, indent=2))
    md = markdown(r)
    (a.out / f"gpu-{slug}.md").write_text(md)
    print(md)
    return r


if __name__ == "__main__":
    main()
