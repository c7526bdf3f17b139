"""One optimizer step of the DINOv3 classifier: nanopeft vs transformers + bitsandbytes + PEFT.

    step : logits = model(x); cross_entropy(logits, y).backward(); AdamW.step(); zero_grad
           x (batch, 3, 224, 224), NF4 base (double quant, blocks of 64), α = 2r, dropout 0.05,
           gradient checkpointing on (both sides), fp32 or bf16 (weights + autocast) compute
    time : median s/step of --steps steps after 1 warm-up step; each (row, side) in a fresh process,
           the two sides alternating, --rounds times; the lowest median of the rounds is kept. Also the
           median process CPU s/step ("cpu ×"): with --threads 1 on a shared machine it is the work
           the step did, while wall time also counts the waits for a core
    peak : ru_maxrss of the process (load included) and the step's own peak (VmHWM reset after the
           warm-up step), GB. nanopeft's side runs with torch's page-aligned CPU allocator, which
           train.py turns on (nanopeft.device.hugepage_cpu_allocator); --thp both gives it to the
           reference too, --thp none to neither

Rows are the product of the flags (comma lists). Sweeps: --sweep rank (8, 16, 64) or --sweep batch
(1, 4, 16) on the first row. Results and commands: docs/BENCHMARKS.md ("Whole step and inference").

    python bench/step.py --method lora --dtype fp32,bf16 --steps 3        # ViT-B QLoRA r16 all-linear
    python bench/step.py --method lora,dora --targets all-linear,q_proj --rank 16,64 --model vitb16,vitl16
    python bench/step.py --sweep rank --steps 3
    python bench/step.py --our-checkpointing budget --rounds 3   # our recomputation at the reference's peak
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (build_nanopeft, build_reference, peak_rss_gb, reset_peak, rss_gb, run_child,  # noqa: E402
                    synthetic_checkpoint, timed, vmhwm_gb)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def child(a) -> dict:
    thp = a.side == "nanopeft" and a.thp in ("ours", "both") or a.side == "reference" and a.thp == "both"
    # set, not inherited (a parent that ran train.py has it in its environment): torch reads it at the
    # first CPU allocation, which is still ahead; on our side this is what train.py does first
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if thp else "0"
    torch.set_num_threads(a.threads) if a.threads else None
    dtype = DTYPES[a.dtype]
    folder = synthetic_checkpoint(a.model)
    kw = dict(method=a.method, rank=a.rank, alpha=2 * a.rank, dropout=a.dropout, targets=a.targets, dtype=dtype,
              checkpointing=True)
    if a.side == "nanopeft":
        kw["checkpointing"] = a.our_checkpointing == "all"  # none: what --grad-checkpointing auto picks with room
        model = build_nanopeft(folder, dora_dropout=a.dora_dropout, dropout_sampler=a.sampler, **kw)
        if a.our_checkpointing == "budget":  # --grad-checkpointing auto --memory-budget GB, as train.py plans it
            from nanopeft.training.memory import fewest_checkpointed_blocks

            k = fewest_checkpointed_blocks(model, a.budget, batch_size=a.batch, image_size=a.image_size,
                                           compute_dtype=dtype, device="cpu")
            model.backbone.gradient_checkpointing = model.backbone.config.num_hidden_layers if k is None else k
    else:
        model = build_reference(folder, **kw)
    device = next(model.parameters()).device
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g).to(device)
    y = torch.randint(0, 9, (a.batch,), generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else None

    def step():
        if amp is not None:
            with amp:
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW state, NF4 scratch buffers, the DoRA ‖W0‖² cache
    before = rss_gb()
    reset_peak()
    cpu = []
    times = timed(step, a.steps, cpu)
    blocks = getattr(getattr(model, "backbone", None), "gradient_checkpointing", None)
    return {"s_per_step": statistics.median(times), "times": times, "cpu_s_per_step": statistics.median(cpu),
            "checkpointed_blocks": blocks if isinstance(blocks, int) and not isinstance(blocks, bool) else str(blocks),
            "peak_gb": peak_rss_gb(),
            "step_peak_gb": vmhwm_gb() - before, "trainable": sum(p.numel() for p in params),
            "thp_allocator": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}


def rows(a) -> list[dict]:
    split = lambda s: [t for t in s.split(",") if t]
    combos = itertools.product(split(a.model), split(a.method), split(a.targets), [int(r) for r in split(a.rank)],
                               split(a.dtype), [int(b) for b in split(a.batch)])
    out = [dict(model=m, method=me, targets=t, rank=r, dtype=d, batch=b) for m, me, t, r, d, b in combos]
    if a.sweep == "rank":
        out = [{**out[0], "rank": r} for r in (8, 16, 64)]
    elif a.sweep == "batch":
        out = [{**out[0], "batch": b} for b in (1, 4, 16)]
    return out


def child_args(row: dict, side: str, a, budget: float = 0.0) -> list[str]:
    args = [f"--{k}={v}" for k, v in row.items()] + [f"--side={side}", f"--steps={a.steps}", f"--budget={budget}",
                                                      f"--dropout={a.dropout}", f"--image-size={a.image_size}",
                                                      f"--dora-dropout={a.dora_dropout}", f"--sampler={a.sampler}",
                                                      f"--our-checkpointing={a.our_checkpointing}", f"--thp={a.thp}"]
    return args + ([f"--threads={a.threads}"] if a.threads else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vitb16", help="comma list of presets: vitb16, vitl16, tiny, ...")
    p.add_argument("--method", default="lora", help="comma list: lora (QLoRA), dora (QDoRA), and with --sides "
                   "nanopeft the unifying study's bitfit, layernorm, ssf, vpt, adaptformer (--rank), full")
    p.add_argument("--targets", default="all-linear", help="comma list: all-linear, q_proj")
    p.add_argument("--rank", default="16", help="comma list of ranks (α = 2r)")
    p.add_argument("--dtype", default="fp32", help="comma list: fp32, bf16")
    p.add_argument("--batch", default="4", help="comma list of batch sizes")
    p.add_argument("--sweep", choices=["rank", "batch"], help="sweep rank 8/16/64 or batch 1/4/16 on the first row")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dora-dropout", default="peft", choices=["peft", "lora"], help="nanopeft's DoRA dropout mode")
    p.add_argument("--sampler", default="torch", choices=["torch", "bits"], help="nanopeft's dropout sampler")
    p.add_argument("--our-checkpointing", default="all", choices=["all", "none", "budget"],
                   help="nanopeft's gradient checkpointing: all blocks, none (--grad-checkpointing auto's pick when "
                        "memory allows), or budget: the fewest blocks whose step fits --memory-budget by the memory "
                        "model (train.py --grad-checkpointing auto --memory-budget GB)")
    p.add_argument("--memory-budget", type=float, default=0.0,
                   help="GB for --our-checkpointing budget; 0: the reference's peak RSS in the same round")
    p.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--thp", default="ours", choices=["ours", "both", "none"],
                   help="torch's page-aligned CPU allocator (THP_MEM_ALLOC_ENABLE=1): nanopeft's side only, as "
                        "train.py sets it (ours), both sides, or neither")
    p.add_argument("--sides", default="reference,nanopeft", help="comma list: reference, nanopeft")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.rank, a.batch = int(a.rank), int(a.batch)
        print(json.dumps(child(a)))
        return None
    sides = [s for s in a.sides.split(",") if s]
    results = []
    print(f"{'model':<7} {'method':<5} {'targets':<10} {'r':>3} {'dtype':<5} {'B':>3} | "
          f"{'ref s/step':>10} {'ours s/step':>11} {'time ×':>7} {'cpu ×':>6} | {'ref peak':>8} {'our peak':>8} {'peak ×':>7} | "
          f"our recomputed blocks")
    for row in rows(a):
        best, every = {}, {"reference": [], "nanopeft": []}
        for _ in range(a.rounds):
            ref_peak = 0.0
            for side in sides:  # alternating: both sides see the same machine load
                r = run_child(Path(__file__), child_args(row, side, a, a.memory_budget or ref_peak))
                ref_peak = r.get("peak_gb", 0.0) if side == "reference" else ref_peak
                every.setdefault(side, []).append({k: r.get(k) for k in ("s_per_step", "cpu_s_per_step", "peak_gb")})
                if "error" in r:
                    print(f"  {side} {row}: {r['error']}", file=sys.stderr)
                    continue
                if side not in best or r["s_per_step"] < best[side]["s_per_step"]:
                    best[side] = r
        ref, ours = best.get("reference", {}), best.get("nanopeft", {})
        ratio = lambda k: ours[k] / ref[k] if k in ours and k in ref else float("nan")
        method = {"lora": "QLoRA", "dora": "QDoRA"}.get(row["method"], row["method"])
        print(f"{row['model']:<7} {method:<5} {row['targets']:<10} {row['rank']:>3} {row['dtype']:<5} {row['batch']:>3} | "
              f"{ref.get('s_per_step', float('nan')):>10.2f} {ours.get('s_per_step', float('nan')):>11.2f} "
              f"{ratio('s_per_step'):>6.2f}× {ratio('cpu_s_per_step'):>5.2f}× | {ref.get('peak_gb', float('nan')):>8.2f} "
              f"{ours.get('peak_gb', float('nan')):>8.2f} {ratio('peak_gb'):>6.2f}× | "
              f"{ours.get('checkpointed_blocks', '-')}", flush=True)
        if a.rounds > 1:  # every round, so the spread is on record beside the kept (lowest) median
            print("    rounds, s/step: " + "; ".join(f"{k} " + ", ".join(f"{r['s_per_step']:.2f}" for r in v)
                                                for k, v in every.items() if v), flush=True)
        results.append({**row, "rounds": every, "reference": ref, "nanopeft": ours, "time_ratio": ratio("s_per_step"),
                        "cpu_ratio": ratio("cpu_s_per_step"), "peak_ratio": ratio("peak_gb")})
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
