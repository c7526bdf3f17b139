"""Quantize-on-load of DINOv3 ViT-7B/16: wall time, peak RSS and NF4 size, against reading the file.

    python bench/load_7b.py [--ckpt ~/.cache/nanopeft/synthetic-7b] [--reference] [--cold] [--repeat 1]

1. Writes (once, cached) a synthetic 7B-shaped checkpoint: bf16, ~5 GB shards + index.json, the hub's
   key names and shapes (6,716,035,072 parameters; random values: they change neither the I/O nor
   the quantization cost).
2. Each row in a fresh process:
   read      every byte of the shards, read as the loader reads (O_DIRECT where possible): the I/O floor;
   quantize  the 280 Linear weights' shapes, quantized from memory (bf16, random) and kept: the CPU floor;
   nanopeft  `load_dinov3(ckpt, quantize="nf4")`, with torch's page-aligned CPU allocator as train.py
             runs it; peak RSS is the kernel's high-water mark (VmHWM), RSS also sampled every 0.1 s.
   Targets: peak RSS ≤ 1.3 × the NF4 model's size; load time dominated by reading.
3. --reference: the same load with transformers + bitsandbytes
   (`DINOv3ViTModel.from_pretrained(..., BitsAndBytesConfig(nf4, double quant), device_map="cpu")`).
--cold drops the page cache before every row (root only), so each reads from the disk; without it
the read row runs twice and the second run is timed, so every row finds the file cached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# the peak is the kernel's high-water mark (VmHWM): no spike escapes it, where a 0.1 s sampler can miss one
from common import vmhwm_gb  # noqa: E402


def write_synthetic(folder: Path, shard_bytes: int = 5 * 10**9) -> None:
    from nanopeft import PRESETS, DINOv3ViT
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return  # already there (ours from an earlier run, or a real sharded checkpoint: measured as it is)
    if folder.is_dir() and any(folder.iterdir()):  # another checkpoint, say: never written over
        sys.exit(f"--ckpt {folder}: not empty and no model.safetensors.index.json in it; give a sharded "
                 f"checkpoint or a new folder for the synthetic 7B")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DINOv3ViT(PRESETS["vit7b16"]).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards, cur, size = [], {}, 0
    for k, s in shapes.items():  # hub order; a shard closes once it would pass 5 GB
        nbytes = math.prod(s) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = s
        size += nbytes
    shards.append(cur)
    weight_map, t0 = {}, time.perf_counter()
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k, s in keys.items():
            t = torch.randn(s, generator=g).mul_(0.02)
            if k.endswith("lambda1"):
                t = torch.full(s, 0.1)
            elif "norm" in k and k.endswith("weight"):
                t = t.add_(1.0)
            tensors[k] = t.to(torch.bfloat16)
            weight_map[k] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        print(f"  wrote {name} ({len(keys)} tensors) {time.perf_counter() - t0:.0f}s", flush=True)
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total, "total_parameters": total // 2}, "weight_map": weight_map}, indent=2))
    cfg = PRESETS["vit7b16"].replace(dtype="bfloat16").to_dict()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.running = True

    def run(self):
        while self.running:
            vals = {}
            for line in open("/proc/self/status"):
                k = line.split(":")[0]
                if k in self.peak:
                    vals[k] = int(line.split()[1]) * 1024
            for k, v in vals.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.1)


def child(ckpt: Path, which: str) -> dict:
    if which == "nanopeft":
        from nanopeft.device import hugepage_cpu_allocator

        hugepage_cpu_allocator()  # as train.py runs the load: before any tensor exists
    torch.set_num_threads(os.cpu_count() or 1)
    if which == "read":  # the I/O floor: every byte of every shard, read the way the loader reads
        from nanopeft.files.checkpoint import _aligned_buffer, _Reader

        t0, n, step = time.perf_counter(), 0, 64 << 20
        buf = _aligned_buffer(step)
        for f in sorted(ckpt.glob("*.safetensors")):
            size = f.stat().st_size
            with _Reader(f) as r:  # O_DIRECT where the filesystem allows it, like load_dinov3
                for off in range(0, size, step):
                    n += r.read(buf, off, min(step, size - off), "-").numel()
        return {"read_s": time.perf_counter() - t0, "bytes": n}
    if which == "quantize":  # the CPU floor: the same quantization, no file, outputs kept like a model's
        from nanopeft.files.checkpoint import open_checkpoint
        from nanopeft.nf4 import quantize_nf4

        source, _, _ = open_checkpoint(ckpt)
        shapes = [s for k, s in source.shapes.items() if k.startswith("layer.") and k.endswith("proj.weight")]
        g = torch.Generator().manual_seed(0)
        src = {s: torch.randn(s, generator=g).mul_(0.02).bfloat16() for s in set(shapes)}
        t0, kept = time.perf_counter(), []
        for s in shapes:
            kept.append(quantize_nf4(src[s]))
        return {"quantize_s": time.perf_counter() - t0, "linears": len(shapes),
                "values": sum(math.prod(s) for s in shapes)}
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    if which == "nanopeft":
        from nanopeft import load_dinov3
        from nanopeft.nf4_linear import NF4Linear

        model = load_dinov3(ckpt, quantize="nf4", progress=True)
        wall = time.perf_counter() - t0
        nf4 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                  for b in m.buffers())
        n_nf4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    else:
        from transformers import BitsAndBytesConfig, DINOv3ViTModel

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = DINOv3ViTModel.from_pretrained(ckpt, quantization_config=q, device_map="cpu", dtype=torch.bfloat16)
        wall = time.perf_counter() - t0
        nf4 = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dtype == torch.uint8)
        nf4 += sum(t.numel() * t.element_size() for m in model.modules() if hasattr(m, "weight")
                   and hasattr(m.weight, "quant_state") and m.weight.quant_state is not None
                   for t in [m.weight.quant_state.absmax, m.weight.quant_state.state2.absmax])
        n_nf4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    sampler.running = False
    sampler.join()
    other = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != torch.uint8)
    return {"load_s": wall, "peak_rss": vmhwm_gb() * 1e9, "sampled_rss": sampler.peak["VmRSS"],
            "peak_anon": sampler.peak["RssAnon"], "peak_file": sampler.peak["RssFile"],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "nf4_bytes": nf4, "other_bytes": other, "nf4_linears": n_nf4}


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches ({e})") from e


def run_child(ckpt: Path, which: str, cold: bool = False) -> dict:
    if cold:
        drop_page_cache()
    out = subprocess.run([sys.executable, __file__, "--ckpt", str(ckpt), "--child", which],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("NANOPEFT_CACHE", Path.home() / ".cache" / "nanopeft")) / "synthetic-7b"
    p.add_argument("--ckpt", type=Path, default=default)
    p.add_argument("--reference", action="store_true", help="also time transformers + bitsandbytes")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every row (root only)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every row; the table shows the median")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.ckpt, args.child)))
        return
    print(f"synthetic 7B checkpoint: {args.ckpt} ({'cold' if args.cold else 'warm'} page cache)")
    write_synthetic(args.ckpt)
    if not args.cold:
        run_child(args.ckpt, "read")  # fills the page cache
    names = ["read", "quantize", "nanopeft"] + (["reference"] if args.reference else [])
    runs = {n: [] for n in names}
    for i in range(args.repeat):  # rows interleaved, so slow drift of the machine hits all alike
        for n in names:
            runs[n].append(run_child(args.ckpt, n, args.cold))
            print(f"  run {i + 1}/{args.repeat} {n}: {json.dumps(runs[n][-1])}", flush=True)
    pick = {n: sorted(r, key=lambda d: next(v for k, v in d.items() if k.endswith("_s")))[len(r) // 2]
            for n, r in runs.items()}  # the median run of each row
    read, quant = pick["read"]["read_s"], pick["quantize"]["quantize_s"]
    GB = 1e9
    print(f"\nread every byte ({pick['read']['bytes'] / GB:.2f} GB): {read:.1f} s; quantize the "
          f"{pick['quantize']['linears']} Linears from memory ({pick['quantize']['values'] / 1e9:.2f} G values): "
          f"{quant:.1f} s. Medians of {args.repeat} run(s); all runs above.")
    print("\npeak RSS: the kernel's high-water mark (VmHWM); sampled: the largest 0.1 s sample, and its "
          "anonymous / file-backed parts")
    print(f"\n{'stack':<18} {'load s':>7} {'× read':>7} {'× quant':>8} {'peak RSS GB':>11} {'sampled':>8} "
          f"{'anon GB':>8} {'file GB':>8} {'NF4+rest GB':>11} {'peak/model':>10} {'NF4 layers':>10}")
    for name in names[2:]:
        r = pick[name]
        model_bytes = r["nf4_bytes"] + r["other_bytes"]
        print(f"{name:<18} {r['load_s']:>7.1f} {r['load_s'] / read:>7.2f} {r['load_s'] / quant:>8.2f} "
              f"{r['peak_rss'] / GB:>11.2f} {r['sampled_rss'] / GB:>8.2f} {r['peak_anon'] / GB:>8.2f} "
              f"{r['peak_file'] / GB:>8.2f} "
              f"{model_bytes / GB:>11.2f} {r['peak_rss'] / model_bytes:>10.2f} {r['nf4_linears']:>10}")
    if args.reference:
        a, b = pick["nanopeft"], pick["reference"]
        print(f"\nnanopeft / reference: load time {a['load_s'] / b['load_s']:.2f}×, peak RSS "
              f"{a['peak_rss'] / b['peak_rss']:.2f}×")


if __name__ == "__main__":
    main()
