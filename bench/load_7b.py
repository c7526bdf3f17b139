"""Quantize-on-load of DINOv3 ViT-7B/16: wall time, peak RSS and NF4 size, against reading the file.

    python bench/load_7b.py [--ckpt ~/.cache/nanopeft/synthetic-7b] [--reference]

1. Writes (once, cached) a synthetic 7B-shaped checkpoint: bf16, ~5 GB shards + index.json, the hub's
   key names and shapes (6,716,035,072 parameters; random values: they change neither the I/O nor
   the quantization cost).
2. In a fresh process: reads every byte of the shards (the I/O floor), then
   `load_dinov3(ckpt, quantize="nf4")`, sampling RSS every 0.1 s. Targets (issue "NF4"): peak RSS
   ≤ 1.3 × the NF4 model's size; load time dominated by reading the file.
3. --reference: the same in a fresh process with transformers + bitsandbytes
   (`DINOv3ViTModel.from_pretrained(..., BitsAndBytesConfig(nf4, double quant), device_map="cpu")`).
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


def write_synthetic(folder: Path, shard_bytes: int = 5 * 10**9) -> None:
    from nanopeft import PRESETS, DINOv3ViT
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return
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
    torch.set_num_threads(os.cpu_count() or 1)
    if which == "read":  # the I/O floor: every byte of every shard, plain reads
        t0, n = time.perf_counter(), 0
        buf = bytearray(64 << 20)
        for f in sorted(ckpt.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while r := fh.readinto(buf):
                    n += r
        return {"read_s": time.perf_counter() - t0, "bytes": n}
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    if which == "nanopeft":
        from nanopeft import load_dinov3
        from nanopeft.nf4 import NF4Linear

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
    return {"load_s": wall, "peak_rss": sampler.peak["VmRSS"], "peak_anon": sampler.peak["RssAnon"],
            "peak_file": sampler.peak["RssFile"],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "nf4_bytes": nf4, "other_bytes": other, "nf4_linears": n_nf4}


def run_child(ckpt: Path, which: str) -> dict:
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
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.ckpt, args.child)))
        return
    print(f"synthetic 7B checkpoint: {args.ckpt}")
    write_synthetic(args.ckpt)
    GB = 1e9
    read = run_child(args.ckpt, "read")
    print(f"read every byte ({read['bytes'] / GB:.2f} GB): {read['read_s']:.1f} s "
          f"({read['bytes'] / GB / read['read_s']:.2f} GB/s)")
    rows = [("nanopeft", run_child(args.ckpt, "nanopeft"))]
    if args.reference:
        rows.append(("transformers+bnb", run_child(args.ckpt, "reference")))
    print(f"\n{'stack':<18} {'load s':>7} {'× read':>7} {'peak RSS GB':>11} {'anon GB':>8} {'file GB':>8} "
          f"{'NF4+rest GB':>11} {'peak/model':>10} {'NF4 layers':>10}")
    for name, r in rows:
        model_bytes = r["nf4_bytes"] + r["other_bytes"]
        print(f"{name:<18} {r['load_s']:>7.1f} {r['load_s'] / read['read_s']:>7.2f} {r['peak_rss'] / GB:>11.2f} "
              f"{r['peak_anon'] / GB:>8.2f} {r['peak_file'] / GB:>8.2f} {model_bytes / GB:>11.2f} "
              f"{r['peak_rss'] / model_bytes:>10.2f} {r['nf4_linears']:>10}")
    if len(rows) == 2:
        a, b = rows[0][1], rows[1][1]
        print(f"\nnanopeft / reference: load time {a['load_s'] / b['load_s']:.2f}×, peak RSS "
              f"{a['peak_rss'] / b['peak_rss']:.2f}×")


if __name__ == "__main__":
    main()
