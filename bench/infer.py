"""Inference throughput of the trained classifier: nanopeft merged and unmerged vs the reference stack.

    nanopeft unmerged   NF4 base + LoRA/DoRA wrappers (what a training run evaluates)
    nanopeft merged     merge_adapters(model, dtype=...): dense Linears in the compute dtype
    reference unmerged  transformers + bitsandbytes Linear4bit + PEFT adapters (as the study evaluated)
    reference merged    PEFT merge_and_unload(): Linear4bit again (eval mode: bitsandbytes' 4-bit kernel)

Eval mode, torch.inference_mode(), 224 px, r16 all-linear, B ≠ 0 (a trained-looking adapter); each
(variant, batch) in a fresh process; images/s = batch / median forward time over --iters calls after
one warm-up; also images per process-CPU second (with --threads 1 on a shared machine: the work done,
without the waits for a core; --cpu-time prints that instead). --dtype bf16 loads every weight in bf16 and runs under bf16 autocast, on both sides.
Results and commands: docs/BENCHMARKS.md ("Whole step and inference").

    python bench/infer.py --method lora,dora --batch 1,32 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_nanopeft, build_reference, run_child, synthetic_checkpoint, timed  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("reference-unmerged", "reference-merged", "nanopeft-unmerged", "nanopeft-merged")


@torch.no_grad()
def trained_looking(model: torch.nn.Module) -> None:
    """B = 0 would make LoRA's extra work skippable in principle: give every B small random values."""
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.01)


def child(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    folder = synthetic_checkpoint(a.model)
    kw = dict(method=a.method, rank=16, alpha=32, dropout=0.05, targets="all-linear", dtype=dtype,
              checkpointing=False)
    side, how = a.variant.split("-")
    model = build_nanopeft(folder, **kw) if side == "nanopeft" else build_reference(folder, **kw)
    trained_looking(model)
    model.eval()
    if how == "merged":
        if side == "nanopeft":
            from nanopeft import merge_adapters
            merge_adapters(model.backbone, dtype=dtype)
        else:
            model.backbone = model.backbone.merge_and_unload()
    device = next(model.parameters()).device
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward():
        with torch.inference_mode(), amp:
            model(x)

    forward()
    cpu = []
    t = statistics.median(timed(forward, a.iters, cpu))
    c = statistics.median(cpu)
    return {"images_per_s": a.batch / t, "s_per_batch": t, "images_per_cpu_s": a.batch / c}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vitb16")
    p.add_argument("--method", default="lora,dora", help="comma list: lora, dora")
    p.add_argument("--batch", default="1,32", help="comma list of batch sizes")
    p.add_argument("--dtype", default="fp32", help="comma list: fp32, bf16")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cpu-time", action="store_true", help="print images per CPU second (use with --threads 1)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.batch = int(a.batch)
        print(json.dumps(child(a)))
        return None
    variants = [v for v in a.variants.split(",") if v]
    results = []
    print(f"{'method':<6} {'dtype':<5} {'B':>3} | " + " ".join(f"{v:>19}" for v in variants) +
          " | merged ×ref-merged | merged ×ref-unmerged")
    for method in a.method.split(","):
        for dtype in a.dtype.split(","):
            for batch in a.batch.split(","):
                row = {"method": method, "dtype": dtype, "batch": int(batch)}
                for v in variants:
                    r = run_child(Path(__file__), [f"--model={a.model}", f"--method={method}", f"--dtype={dtype}",
                                                   f"--batch={batch}", f"--variant={v}", f"--iters={a.iters}",
                                                   f"--image-size={a.image_size}", f"--threads={a.threads}"])
                    if "error" in r:
                        print(f"  {v}: {r['error']}", file=sys.stderr)
                    row[v] = r.get("images_per_cpu_s" if a.cpu_time else "images_per_s", float("nan"))
                    row[v + " (wall)"] = r.get("images_per_s", float("nan"))
                ours = row.get("nanopeft-merged", float("nan"))
                row["merged_vs_ref_merged"] = ours / row.get("reference-merged", float("nan"))
                row["merged_vs_ref_unmerged"] = ours / row.get("reference-unmerged", float("nan"))
                print(f"{method:<6} {dtype:<5} {batch:>3} | " + " ".join(f"{row[v]:>19.2f}" for v in variants) +
                      f" | {row['merged_vs_ref_merged']:>17.2f}× | {row['merged_vs_ref_unmerged']:>19.2f}×",
                      flush=True)
                results.append(row)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
