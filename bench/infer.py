"""Inference throughput of the trained classifier: nanopeft merged and unmerged vs the reference stack.

    nanopeft unmerged   NF4 base + LoRA/DoRA wrappers (what a training run evaluates)
    nanopeft merged     merge_adapters(model, dtype=...): dense Linears in the compute dtype
    nanopeft packed     merged, then prepack_for_inference: on a CPU in fp32 the Linear weights reordered
                        once for oneDNN (what eval.py / predict.py run there by default); elsewhere = merged
    reference unmerged  transformers + bitsandbytes Linear4bit + PEFT adapters (as the study evaluated)
    reference merged    PEFT merge_and_unload(): Linear4bit again (eval mode: bitsandbytes' 4-bit kernel)

Eval mode, torch.inference_mode(), 224 px, r16 all-linear, B ≠ 0 (a trained-looking adapter); each
(variant, batch) in a fresh process, or with --interleave all variants of a batch in one process, called
in turn (a same-run ratio: on a shared machine a fresh process per cell moved 1.8–3.2 images/s for one
model); --rounds repeats and takes the median per cell; images/s = batch / median forward time over --iters calls after
one warm-up; also images per process-CPU second (with --threads 1 on a shared machine: the work done,
without the waits for a core; --cpu-time prints that instead). --dtype bf16 loads every weight in bf16
and runs under bf16 autocast, on both sides.
Results and commands: docs/BENCHMARKS.md ("Whole step and inference").

    python bench/infer.py --method lora,dora --batch 1,32 --dtype fp32
    python bench/infer.py --method lora --batch 1,16,32 --interleave --iters 8 \
        --variants reference-merged,nanopeft-merged,nanopeft-packed
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
VARIANTS = ("reference-unmerged", "reference-merged", "nanopeft-unmerged", "nanopeft-merged", "nanopeft-packed")


@torch.no_grad()
def trained_looking(model: torch.nn.Module) -> None:
    """B = 0 would make LoRA's extra work skippable in principle: give every B small random values."""
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.01)


def build_variant(a, variant: str, dtype: torch.dtype) -> torch.nn.Module:
    """The classifier of one variant, in eval mode, with trained-looking adapters."""
    folder = synthetic_checkpoint(a.model)
    kw = dict(method=a.method, rank=16, alpha=32, dropout=0.05, targets="all-linear", dtype=dtype,
              checkpointing=False)
    side, how = variant.split("-")
    model = build_nanopeft(folder, **kw) if side == "nanopeft" else build_reference(folder, **kw)
    trained_looking(model)
    model.eval()
    device = next(model.parameters()).device
    if how in ("merged", "packed"):
        if side == "nanopeft":
            from nanopeft import merge_adapters
            merge_adapters(model.backbone, dtype=dtype)
        else:
            model.backbone = model.backbone.merge_and_unload()
    if how == "packed":
        from nanopeft.inference.prepack import prepack_for_inference
        amp_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
        packing = prepack_for_inference(model, device, amp_dtype, a.batch, a.image_size)
        if "reordered" not in packing and device.type == "cpu" and amp_dtype is None:
            raise RuntimeError(packing)  # a "packed" cell that is not packed would be a second merged cell
    return model


def child(a) -> dict:
    """One process: the variants of a.variant (comma list). One variant: --iters timed calls after a
    warm-up. Several (--interleave): built side by side, then called in turn --iters times, so a slow
    spell of a shared machine slows every variant alike; the medians per variant."""
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    models = {v: build_variant(a, v, dtype) for v in a.variant.split(",")}
    device = next(next(iter(models.values())).parameters()).device
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward(model):
        with torch.inference_mode(), amp:
            model(x)

    for model in models.values():
        forward(model)  # warm-up
    wall, cpu = {v: [] for v in models}, {v: [] for v in models}
    for _ in range(a.iters):
        for v, model in models.items():
            wall[v] += timed(lambda: forward(model), 1, cpu[v])
    out = {}
    for v in models:
        t, c = statistics.median(wall[v]), statistics.median(cpu[v])
        out[v] = {"images_per_s": a.batch / t, "s_per_batch": t, "images_per_cpu_s": a.batch / c}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vitb16")
    p.add_argument("--method", default="lora,dora", help="comma list: lora, dora")
    p.add_argument("--batch", default="1,32", help="comma list of batch sizes")
    p.add_argument("--dtype", default="fp32", help="comma list: fp32, bf16")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="repeat every variant in turn; the median per cell")
    p.add_argument("--interleave", action="store_true", help="all variants in one process, called in turn "
                   "(a same-run ratio on a noisy machine; the default is one fresh process per variant)")
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
                row = {"method": method, "dtype": dtype, "batch": int(batch), "rounds": []}
                for _ in range(a.rounds):  # variants in turn, so a slow spell of the machine hits them all
                    got = {}
                    for group in ([",".join(variants)] if a.interleave else variants):
                        r = run_child(Path(__file__), [f"--model={a.model}", f"--method={method}",
                                                       f"--dtype={dtype}", f"--batch={batch}", f"--variant={group}",
                                                       f"--iters={a.iters}", f"--image-size={a.image_size}",
                                                       f"--threads={a.threads}"])
                        if "error" in r:
                            print(f"  {group}: {r['error']}", file=sys.stderr)
                        for v in group.split(","):
                            got[v] = r.get(v, {}).get("images_per_cpu_s" if a.cpu_time else "images_per_s",
                                                      float("nan"))
                            got[v + " (wall)"] = r.get(v, {}).get("images_per_s", float("nan"))
                    row["rounds"].append(got)
                    if a.rounds > 1:
                        print("  round: " + ", ".join(f"{v} {got[v]:.2f}" for v in variants), flush=True)
                for key in row["rounds"][0]:
                    row[key] = statistics.median(g[key] for g in row["rounds"])
                # nanopeft's merged figure: the path eval.py / predict.py take (packed where it applies)
                ours = row.get("nanopeft-packed", row.get("nanopeft-merged", float("nan")))
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
