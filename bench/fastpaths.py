"""Does each CPU fast path pay on a whole training step or a whole inference? Alternating pairs, one process.

    step      : logits = model(x); cross_entropy(logits, y).backward(); AdamW.step(); zero_grad (as
                bench/step.py): nanopeft's side only, NF4 base (double quant), all-linear r16, α 32,
                dropout 0.05, batch 4, 224 px, fp32, every block checkpointed (train.py's default).
                ViT-S/16 shape and 1 thread by default: on 2 cores train.py itself runs 1 thread beside
                its 4 loader workers (device.threads_beside_workers), one thread is not wrecked by a
                neighbour on the other core as 2 spinning OpenMP threads are, and a ViT-S step (~1.8 s)
                gets every path's 20 pairs into ~15 min; same tokens per image, so per-weight and
                per-token work keep ViT-B's balance except attention's share (N/d twice ViT-B's)
    inference : the merged LoRA classifier, eval mode, inference_mode, fp32 (as bench/infer.py)
    pair      : each path toggled by monkeypatching a nanopeft attribute from here (nothing in nanopeft/
                changes), one call with the fast path and one with the plain one, in A B / B A order
                pair after pair, after one warm-up call of each; the page-aligned allocator is read once
                per process, so that path runs in two warm worker processes driven in the same A B / B A
                lockstep (only one computes at a time)
    ratio     : plain s / fast s per pair (> 1: the fast path is faster); the median over the pairs and
                its 95 % distribution-free interval: order statistics x_(k), x_(n+1-k) with the exact
                binomial coverage (Hollander & Wolfe, "Nonparametric Statistical Methods", §3.6)
    verdict   : keep when the interval's lower end is at least 1.03, else remove
    also      : cpu ×, the same median and interval of the per-pair ratios of process CPU s (with one
                thread: the work done, without the waits for a core a neighbour causes); others, the
                cores other processes kept busy during the pairs (/proc/stat's busy time less the timed
                calls' own): how shared the machine was

The paths (fast vs plain):
    folded    LoRALinear.lowrank_folded vs the written s·B(A(dropout(x))), both with BitsDropout
    skips     BitsDropout's skips sampler (CPU, p ≤ 0.1) vs its bits sampler (keep_mask)
    bits      the bits sampler (BitsDropout, train.py's default: skips and folded included) vs nn.Dropout
    (dora-norm, DoRA's exact CPU cancelling-row search vs the fixed-size top-k, was measured at commit
     1cf30a7 and removed: it did not pay; docs/BENCHMARKS.md)
    dora-fast DoRALinear.forward_fast vs forward_textbook
    nf4-lut   NF4 dequantize in cached chunks through the byte-pair table vs the one-shot formula
              (_dequantize_blocks' own torch.compile branch)
    nf4-buf   NF4Matmul's reused Ŵ buffer (_scratch) vs a fresh Ŵ per call
    prepack   PackedLinear (oneDNN-reordered weights) vs the merged nn.Linear, inference at --infer-batch
    thp       torch's page-aligned CPU allocator (hugepage_cpu_allocator, train.py's) vs glibc's default

    python bench/fastpaths.py                          # every path, ViT-S shape, 1 thread, 20 pairs: ~15 min
    python bench/fastpaths.py --model vitb16 --threads 2   # the ViT-B shape (2.7 s a step on 2 quiet cores)
    python bench/fastpaths.py --paths folded,skips --pairs 30
    python bench/fastpaths.py --model tiny --pairs 4   # a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_nanopeft, synthetic_checkpoint, timed  # noqa: E402

PATHS = ("folded", "skips", "bits", "nf4-lut", "nf4-buf", "dora-fast", "prepack", "thp")
P = 0.05


# ---- the numbers -----------------------------------------------------------------------------------

def median_interval(r: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage): [x_(k), x_(n+1-k)] with k the largest rank whose two tails each
    hold at most (1 − level)/2 of Binomial(n, ½); its coverage is exact, distribution-free."""
    n, s = len(r), sorted(r)
    tail = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(Bin(n, ½) ≤ k − 1)
    ks = [k for k in range(1, n // 2 + 1) if tail(k) <= (1 - level) / 2]
    if not ks:  # too few pairs for this level: the whole range
        return statistics.median(r), s[0], s[-1], 1 - 2 * tail(1)
    k = ks[-1]
    return statistics.median(r), s[k - 1], s[n - k], 1 - 2 * tail(k)


def pairs(run, n: int, cpu: dict) -> dict[str, list[float]]:
    """n pairs of run(fast) and run(plain), in order fast, plain / plain, fast / ...; wall s of each call."""
    out = {True: [], False: []}
    for i in range(n):
        print(f"pair {i + 1}/{n}", file=sys.stderr, flush=True)  # progress, off the results
        for fast in ((True, False) if i % 2 == 0 else (False, True)):
            out[fast].append(run(fast, cpu))
    return {"fast": out[True], "plain": out[False]}


def busy_seconds() -> float:
    """CPU seconds every process on the machine has spent busy (/proc/stat: all but idle and iowait)."""
    v = list(map(int, open("/proc/stat").readline().split()[1:8]))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


# ---- the step and its toggles -----------------------------------------------------------------------

def train_step(model: nn.Module, batch: int, image_size: int):
    """One optimizer step as bench/step.py times it; returns a function of no arguments."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 9, (batch,), generator=g)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def adapters(model: nn.Module) -> list[nn.Module]:
    from nanopeft.methods.lora import LoRALinear
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def toggles(model: nn.Module, path: str):
    """set(fast: bool): puts `path` on (True, nanopeft as it ships) or off (the plain alternative)."""
    import nanopeft.methods.dropout as dropout
    import nanopeft.nf4 as nf4
    import nanopeft.nf4_linear as nf4_linear
    from nanopeft.methods.lora import LoRALinear

    def written(self, xa):  # LoRALinear.lowrank's own else-branch, whatever the dropout module
        return self.scaling * self.lora_B(self.lora_A(self.lora_dropout(xa)))

    def one_shot(codes, c, out, bs):  # _dequantize_blocks' torch.compile branch: the formula in one go
        lut2 = nf4.lookup_tables(codes.device).lut2
        out.view(-1, bs).copy_(lut2.view(torch.float32).view(256, 2)[codes.long()].view(-1, bs) * c[:, None])

    layers = adapters(model)
    bits = [m.lora_dropout for m in layers]
    torch_dropout = [nn.Dropout(P).train() for _ in layers]
    fn = {"folded": (LoRALinear, "lowrank", LoRALinear.lowrank, written),
          "skips": (dropout, "host_reads_are_free", dropout.host_reads_are_free, lambda d: False),
          "nf4-lut": (nf4, "_dequantize_blocks", nf4._dequantize_blocks, one_shot),
          "nf4-buf": (nf4_linear, "_scratch", nf4_linear._scratch, lambda w, dtype: None)}

    def set_fast(fast: bool):
        if path in fn:
            owner, name, on, off = fn[path]
            setattr(owner, name, on if fast else off)
        elif path == "bits":
            for m, b, t in zip(layers, bits, torch_dropout):
                m.lora_dropout = b if fast else t
        elif path == "dora-fast":
            for m in layers:
                m.fast = fast
    return set_fast


def measure_step(a, model: nn.Module, path: str) -> dict:
    step, set_fast = train_step(model, a.batch, a.image_size), toggles(model, path)

    def run(fast, cpu):
        set_fast(fast)
        try:
            return timed(step, 1, cpu.setdefault(fast, []))[0]
        finally:
            set_fast(True)
    return measure(a, run, path, "step")


def measure(a, run, path: str, what: str) -> dict:
    cpu = {}
    run(True, {}), run(False, {})  # warm-up of both sides
    w0, b0 = time.perf_counter(), busy_seconds()
    got = pairs(run, a.pairs, cpu)
    # the cores other processes kept busy meanwhile: the machine's busy CPU s less the timed calls' own
    others = (busy_seconds() - b0 - sum(cpu[True]) - sum(cpu[False])) / (time.perf_counter() - w0)
    ratios = [p / f for p, f in zip(got["plain"], got["fast"])]
    med, lo, hi, cov = median_interval(ratios)
    cmed, clo, chi, _ = median_interval([p / f for p, f in zip(cpu[False], cpu[True])])
    row = {"path": path, "what": what, "pairs": a.pairs, "plain_s": statistics.median(got["plain"]),
           "fast_s": statistics.median(got["fast"]), "ratio": med, "low": lo, "high": hi, "coverage": cov,
           "cpu_ratio": cmed, "cpu_low": clo, "cpu_high": chi, "verdict": "keep" if lo >= 1.03 else "remove",
           "other_cores": others, "plain": got["plain"], "fast": got["fast"], "plain_cpu": cpu[False],
           "fast_cpu": cpu[True]}
    print(f"{path:<9} {what:<16} {a.pairs:>5} {row['plain_s']:>8.3f} {row['fast_s']:>8.3f} {med:>6.3f} "
          f"[{lo:.3f}, {hi:.3f}] {cov:>5.3f} {cmed:>6.3f} [{clo:.3f}, {chi:.3f}]  {row['verdict']:<6} "
          f"{others:>6.2f}", flush=True)
    for side in ("plain", "fast"):  # every call: wall s, then process CPU s
        print(f"    {side + ' s:':<14}" + " ".join(f"{t:.3f}" for t in got[side]), flush=True)
        print(f"    {side + ' cpu s:':<14}" + " ".join(f"{t:.3f}" for t in row[side + "_cpu"]), flush=True)
    return row


# ---- inference: merged nn.Linear vs PackedLinear -----------------------------------------------------

def measure_prepack(a, batch: int) -> dict:
    from infer import build_variant  # bench/infer.py's variants, built as it builds them

    va = argparse.Namespace(model=a.model, method="lora", batch=batch, image_size=a.image_size)
    models = {fast: build_variant(va, v, torch.float32) for fast, v in ((False, "nanopeft-merged"),
                                                                        (True, "nanopeft-packed"))}
    x = torch.randn(batch, 3, a.image_size, a.image_size)

    def run(fast, cpu):
        def forward():
            with torch.inference_mode():
                models[fast](x)
        return timed(forward, 1, cpu.setdefault(fast, []))[0]
    return measure(a, run, "prepack", f"inference B{batch}")


# ---- the allocator: read once per process, so two warm workers in lockstep ---------------------------

def worker(a):
    """--worker: build, warm up, then one step per line read from stdin; its wall and CPU s on stdout."""
    from nanopeft.device import hugepage_cpu_allocator
    if a.worker == "none":
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"  # before any tensor: torch reads it at the first allocation
    on = hugepage_cpu_allocator()
    torch.set_num_threads(a.threads)
    step = train_step(lora_model(a), a.batch, a.image_size)
    step()
    print(json.dumps({"ready": on}), flush=True)
    for _ in sys.stdin:
        cpu = []
        print(json.dumps({"s": timed(step, 1, cpu)[0], "cpu": cpu[0]}), flush=True)


def measure_thp(a) -> dict:
    base = [sys.executable, __file__, f"--model={a.model}", f"--batch={a.batch}", f"--image-size={a.image_size}",
            f"--threads={a.threads}"]
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    procs = {fast: subprocess.Popen(base + [f"--worker={'ours' if fast else 'none'}"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
             for fast in (True, False)}
    try:
        for fast, p in procs.items():  # ready: built and warmed up; the flag says the allocator is (not) on
            ready = json.loads(p.stdout.readline())["ready"]
            assert ready == fast, f"worker {'ours' if fast else 'none'}: page-aligned allocator on = {ready}"

        def run(fast, cpu):
            procs[fast].stdin.write("step\n")
            procs[fast].stdin.flush()
            r = json.loads(procs[fast].stdout.readline())
            cpu.setdefault(fast, []).append(r["cpu"])
            return r["s"]
        return measure(a, run, "thp", "step (2 workers)")
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()


# ---- the models --------------------------------------------------------------------------------------

def lora_model(a, method: str = "lora") -> nn.Module:
    """The step's model, as train.py builds it by default (bits sampler, every block checkpointed)."""
    folder = synthetic_checkpoint(a.model)
    model = build_nanopeft(folder, method, a.rank, 2 * a.rank, P, "all-linear", torch.float32, True,
                           dora_dropout="peft", dropout_sampler="bits")
    return model.train()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {PATHS}")
    p.add_argument("--model", default="vits16", help="a preset (vitb16, vits16, tiny, ...)")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--infer-batch", default="1,16", help="comma list of inference batch sizes (prepack)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, fixed for every call (and the workers)")
    p.add_argument("--json", type=Path, help="also write every row, with each call's time, here")
    p.add_argument("--worker", choices=["ours", "none"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    from nanopeft.device import hugepage_cpu_allocator
    thp = hugepage_cpu_allocator()  # as train.py: first, before any tensor
    torch.set_num_threads(a.threads)
    paths = [s for s in a.paths.split(",") if s]
    print(f"# {a.model}, batch {a.batch}, {a.image_size} px, r{a.rank} all-linear, p {P}, fp32, every block "
          f"checkpointed, {torch.get_num_threads()} threads, page-aligned allocator {'on' if thp else 'off'}, "
          f"torch {torch.__version__}, {a.pairs} pairs; ratio = plain/fast, 95 % order-statistic interval")
    print(f"{'path':<9} {'what':<16} {'pairs':>5} {'plain s':>8} {'fast s':>8} {'ratio':>6} {'interval':<16} "
          f"{'cover':>5} {'cpu ×':>6} {'cpu interval':<16}  verdict others", flush=True)
    rows, t0 = [], time.time()
    for method, group in (("lora", ("folded", "skips", "bits", "nf4-lut", "nf4-buf")),
                          ("dora", ("dora-fast",))):
        todo = [q for q in group if q in paths]
        if todo:
            model = lora_model(a, method)
            rows += [measure_step(a, model, q) for q in todo]
            del model
    if "prepack" in paths:
        rows += [measure_prepack(a, int(b)) for b in a.infer_batch.split(",") if b]
    if "thp" in paths:
        rows.append(measure_thp(a))
    print(f"# {time.time() - t0:.0f} s", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
