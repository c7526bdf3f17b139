"""One LoRA / DoRA training step on the ViT-7B MLP shape: nanopeft vs HF PEFT, in one run.

    layer : Linear(4096 → 8192) + bias (the 7B's gate/up projection), plain or NF4 (double quant)
    adapter: r = 64, α = 128 (the paper's recipe), dropout 0 or 0.05
    x     : (4, 201, 4096), requires_grad (as inside a network: 4 images of 224², 201 tokens)
    step  : y = layer(x); y.float().sum().backward(); grads cleared
    time  : median of --steps steps after 2 warm-up steps (torch.set_num_threads(--threads)); every
            row in --repeat rounds, each run started once other processes use < 0.2 cores; the lowest
            median is kept
    memory: CPU: peak RSS during 2 steps minus the RSS before them (after the warm-up, so buffers
            that persist across steps, like NF4's reused dequantize buffer, are not counted: they are
            paid once per process, not per layer), in a second process run with
            MALLOC_MMAP_THRESHOLD_=131072 so that glibc hands freed blocks back at once and RSS tracks
            live tensors (glibc mallopt(3), M_MMAP_THRESHOLD); the peak is reset with /proc/self/clear_refs.
            CUDA: max_memory_allocated minus memory_allocated, same window.

Every row runs in its own subprocess (a clean heap, one library's state). PEFT rows wrap torch's
nn.Linear, or bitsandbytes' Linear4bit for NF4, under `peft.get_peft_model` with its defaults
(fp32 adapters on a bf16 base: autocast_adapter_dtype). Results: docs/BENCHMARKS.md.

    python bench/adapters.py                      # every row, 3 rounds: ~15 min on 2 quiet CPU cores
    python bench/adapters.py --rows quick --small # a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch

IN, OUT, R, ALPHA, TOKENS = 4096, 8192, 64, 128, (4, 201)


def peak_mb() -> float:
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def busy_seconds() -> float:
    """CPU seconds every process on the machine has spent busy (/proc/stat: all but idle and iowait)."""
    v = list(map(int, open("/proc/stat").readline().split()[1:8]))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def others_cores(fn) -> tuple[object, float]:
    """Run fn(); return its result and the cores that *other* processes used meanwhile."""
    w0, b0, t0 = time.perf_counter(), busy_seconds(), os.times()
    out = fn()
    t1 = os.times()
    own = t1.user + t1.system - t0.user - t0.system
    return out, max(0.0, busy_seconds() - b0 - own) / (time.perf_counter() - w0)


def wait_idle(limit: float = 0.2, timeout: float = 300.0) -> None:
    """Wait (at most `timeout` s) until other processes use < `limit` cores over 1 s: the machine is shared."""
    t0 = time.time()
    while time.time() - t0 < timeout and others_cores(lambda: time.sleep(1.0))[1] >= limit:
        pass


def build(impl: str, method: str, base: str, dtype: torch.dtype, dropout: float, device: str, small: bool):
    n_in, n_out = (IN // 8, OUT // 8) if small else (IN, OUT)
    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out).to(device=device, dtype=dtype)
    if base == "nf4" and impl == "peft":
        import bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
        layer = layer.to(device)
        layer.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    elif base == "nf4":
        from nanopeft.nf4_linear import NF4Linear
        layer = NF4Linear.from_linear(lin, compute_dtype=dtype)
    else:
        layer = lin
    del lin
    layer.requires_grad_(False)
    if method == "base":
        return layer
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        class Wrap(torch.nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.lin = lin

            def forward(self, x):
                return self.lin(x)

        cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=method == "dora",
                         lora_dropout=dropout)
        return get_peft_model(Wrap(layer), cfg)
    from nanopeft.methods.dora import DoRALinear
    from nanopeft.methods.lora import LoRALinear
    return {"lora": LoRALinear, "dora": DoRALinear}[method](layer, R, ALPHA, dropout)


def run_row(row: str, steps: int, threads: int, device: str, small: bool, memory: bool) -> dict:
    impl, method, base, dtype_name, dropout = row.split(":")
    dtype, dropout = getattr(torch, dtype_name), float(dropout)
    torch.set_num_threads(threads)
    model = build(impl, method, base, dtype, dropout, device, small).train()
    n_in = IN // 8 if small else IN
    x = torch.randn(*TOKENS, n_in, dtype=dtype, device=device, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        model(x).float().sum().backward()
        for p in params:
            p.grad = None
        x.grad = None

    for _ in range(2):  # warm-up; also allocates what persists between steps (NF4's dequantize buffer)
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        mem0 = rss_mb()
    def timed_steps():
        times = []
        for _ in range(2 if memory else steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        return times

    times, others = others_cores(timed_steps)
    out = {"row": row, "trainable": sum(p.numel() for p in params), "others_cores": others}
    if memory:
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - mem0) / 2**20 if device == "cuda" else peak_mb() - mem0
    else:
        out["median_s"], out["min_s"] = statistics.median(times), min(times)
    return out


ROWS_ALL = (
    [f"{impl}:base:{b}:{d}:0" for b in ("linear", "nf4") for d in ("float32", "bfloat16")
     for impl in (("nanopeft",) if b == "linear" else ("nanopeft", "peft"))]
    + [f"{impl}:{m}:{b}:{d}:0" for b in ("linear", "nf4") for d in ("float32", "bfloat16")
       for m in ("lora", "dora") for impl in ("peft", "nanopeft")]
    + [f"{impl}:{m}:{b}:float32:0.05" for b in ("linear", "nf4") for m in ("lora", "dora")
       for impl in ("peft", "nanopeft")]
)
ROWS_QUICK = ["nanopeft:lora:nf4:float32:0", "nanopeft:dora:nf4:float32:0", "peft:dora:nf4:float32:0"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="all", help="all | quick | comma-separated impl:method:base:dtype:dropout")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3, help="timing rounds over all rows; each row keeps its lowest "
                    "median (other processes on a shared machine only ever make a run slower)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help="1/8 of the width in and out (smoke test)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--row", help=argparse.SUPPRESS)        # internal: run one row in this process
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def run_in_subprocess(row: str, memory: bool, args: argparse.Namespace) -> dict:
    """One row in a fresh process (a clean heap); memory rows run with glibc handing freed blocks back."""
    wait_idle()
    cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--threads", str(args.threads),
           "--device", args.device] + (["--small"] if args.small else [])
    env_mem = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd + ["--row", row] + (["--memory"] if memory else []), capture_output=True,
                       text=True, cwd=root, env=env_mem if memory else None)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"row {row} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row, args.steps, args.threads, args.device, args.small,
                                             args.memory)))
        return
    rows = ROWS_ALL if args.rows == "all" else ROWS_QUICK if args.rows == "quick" else args.rows.split(",")
    print(f"Linear({IN}→{OUT}){' /8' if args.small else ''}, r={R}, α={ALPHA}, x={TOKENS}+(in,), "
          f"{args.device}, {args.threads} threads, median of {args.steps}, best of {args.repeat} rounds; "
          f"torch {torch.__version__}", flush=True)
    # Rounds over all rows, not repeats of one row: a burst of load from other processes then hits one
    # round of many rows instead of every measurement of one row. Before each run we wait until other
    # processes use < 0.2 cores; "others" is what they used during the kept run.
    timed = [[run_in_subprocess(row, False, args) for row in rows] for _ in range(args.repeat)]
    results = []
    print("| impl | method | base | dtype | dropout | time (s) | peak Δ (MB) | all medians (s) | others (cores) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        runs = [t[i] for t in timed]
        res = {**min(runs, key=lambda r: r["median_s"]), "peak_mb": run_in_subprocess(row, True, args)["peak_mb"],
               "medians_s": [r["median_s"] for r in runs]}
        results.append(res)
        impl, method, base, dtype, dropout = row.split(":")
        print(f"| {impl} | {method} | {base} | {dtype} | {dropout} | {res['median_s']:.3f} | {res['peak_mb']:.0f} | "
              f"{' '.join(f'{t:.3f}' for t in res['medians_s'])} | {res['others_cores']:.2f} |", flush=True)
    print_ratios(rows, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def print_ratios(rows: list[str], results: list[dict]) -> None:
    """The targets: nanopeft DoRA <= 0.6x PEFT DoRA (time and memory), <= 1.3x nanopeft LoRA (time)."""
    by = {r["row"]: r for r in results}
    print("\n| base | dtype | dropout | DoRA time / PEFT DoRA | DoRA peak / PEFT DoRA | DoRA time / our LoRA |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        impl, method, base, dtype, dropout = row.split(":")
        if impl != "nanopeft" or method != "dora":
            continue
        ours, theirs = by[row], by.get(f"peft:dora:{base}:{dtype}:{dropout}")
        lora = by.get(f"nanopeft:lora:{base}:{dtype}:{dropout}")
        ratio = lambda a, b, k: f"{a[k] / b[k]:.2f}" if a and b else "-"  # noqa: E731
        print(f"| {base} | {dtype} | {dropout} | {ratio(ours, theirs, 'median_s')} | {ratio(ours, theirs, 'peak_mb')} "
              f"| {ratio(ours, lora, 'median_s')} |")

if __name__ == "__main__":
    main()
