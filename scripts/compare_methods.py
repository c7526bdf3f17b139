"""Compare PEFT methods on one data set: a table and a bubble chart, as the OTX report shows them.

    python scripts/compare_methods.py --methods lora,dora,bitfit,layernorm,ssf,vpt,adaptformer,frozen \
        --data data/train --test data/test [--out runs/compare] [-- extra train.py flags]
    python scripts/compare_methods.py --demo [--out runs/compare-demo]    # generated data, CPU, no download

Each method is `train.py --method M --out OUT/M` in a FRESH PROCESS, so its peak memory is its own (on a GPU
torch.cuda.max_memory_allocated, on a CPU the process's peak resident set, PyTorch itself included), then
`eval.py --run OUT/M --data TEST` (also a subprocess). Their output goes to OUT/logs/M.{train,eval}.log; the
screen gets one line as each row starts and one as it ends. The table

    method | accuracy | macro F1 | trainable parameters | adapter parameters | peak memory (MB) |
    time per epoch (s) | images/s

is written after every row as OUT/methods.md and OUT/methods.csv, with the bubble chart OUT/methods.png (test
accuracy against peak memory, bubble area ∝ trainable parameters). accuracy and macro F1 are eval.py's on
TEST; trainable parameters and peak memory are summary.json's (adapter parameters: without the head);
time per epoch is the mean wall time of an epoch (training + validation) from metrics.jsonl's elapsed_s;
images/s is the median of metrics.jsonl's per-step training throughput (for frozen, the head on cached
features: the backbone ran once, before the first step).

Resumable: a row whose run folder has summary.json and metrics.json is read, not run again; a run folder
with config.json but no summary.json is continued with train.py --resume. A finished row keeps the settings
it ran with: give a new --out to compare other settings. A row that fails (train or eval exits non-zero) is
reported as failed in the table with its one-line error and the script goes on; it exits with status 2 at
the end, naming the failed methods. Extra arguments after `--` go to every train.py run (they come after
--demo's settings, so they win: e.g. `-- --epochs 1 --precision fp32 --grad-checkpointing none`).

--demo: prepare_demo()'s random tiny DINOv3 and generated data (train.py --demo's settings: image size 64,
3 epochs, batch 8 × 1, lr 1e-3, rank 8, alpha 16; workers 0). The backbone is random: the accuracies say
nothing about the methods, only that every part of the comparison runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanopeft.cli import error_boundary  # noqa: E402
from nanopeft.config import METHODS  # noqa: E402
from nanopeft.files.checkpoint_format import atomic_write  # noqa: E402
from nanopeft.reports.plots import save_bubble_chart  # noqa: E402
from nanopeft.training.flags import split_train_flags  # noqa: E402

TRAIN_PY, EVAL_PY = ROOT / "train.py", ROOT / "eval.py"  # module-level so a test can stand in for them
DEFAULT_METHODS = "lora,dora,bitfit,layernorm,ssf,vpt,adaptformer,frozen"
# train.py --demo's settings (nanopeft/training/flags.py demo_config), with workers 0: one process per row
DEMO_FLAGS = ["--image-size", "64", "--epochs", "3", "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3",
              "--rank", "8", "--alpha", "16", "--workers", "0"]
EVAL_FORWARDED = ("--device", "--workers")  # train.py flags, given after `--`, that eval.py also takes
COLUMNS = [  # (CSV name, Markdown header, format)
    ("method", "method", str),
    ("accuracy", "accuracy", "{:.4f}".format),
    ("macro_f1", "macro F1", "{:.4f}".format),
    ("trainable_parameters", "trainable parameters", "{:,}".format),
    ("adapter_parameters", "adapter parameters", "{:,}".format),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}".format),
    ("time_per_epoch_s", "time per epoch (s)", "{:.1f}".format),
    ("images_per_s", "images/s", "{:.1f}".format),
]


class RowsFailed(ValueError):
    """Some rows failed: the error boundary prints it as one line and exits 2."""


def parse_methods(text: str) -> list[str]:
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(f"--methods {text!r}: unknown {unknown}; choose from {', '.join(METHODS)}")
    return methods


def forwarded(extra: list[str], names=EVAL_FORWARDED) -> list[str]:
    """The flags among `extra` (train.py's, after `--`) that eval.py also takes, in either form (--x v, --x=v)."""
    out, i = [], 0
    while i < len(extra):
        flag = extra[i].split("=", 1)[0]
        if flag in names:
            if "=" in extra[i]:
                out.append(extra[i])
            elif i + 1 < len(extra):
                out += [extra[i], extra[i + 1]]
                i += 1
        i += 1
    return out


def last_error(log: Path, rc: int) -> str:
    """The failure in one line: the last `error: ...` a script printed, else a traceback's last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    text = errors[-1] if errors else (lines[-1] if lines else f"exit status {rc}")
    return text if len(text) <= 300 else text[:297] + "..."


def run_logged(cmd: list[str], log: Path) -> str | None:
    """Run cmd with its stdout and stderr in `log`; None if it succeeded, else its one-line error."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    return None if rc == 0 else last_error(log, rc)


def train_command(method: str, run: Path, data: str, train_flags: list[str]) -> list[str]:
    """train.py for one row: a new run, the run continued (config.json, no summary.json yet), or a new run
    over a folder a failed start left without config.json."""
    if (run / "config.json").is_file():
        where = ["--resume", str(run)]
    else:
        where = ["--out", str(run)] + (["--overwrite"] if run.is_dir() and any(run.iterdir()) else [])
    return [sys.executable, str(TRAIN_PY), "--method", method, "--data", data, *where, *train_flags]


def epoch_stats(metrics_jsonl: Path) -> tuple[float | None, float | None]:
    """(mean seconds per epoch, median training images/s) from train.py's metrics.jsonl. elapsed_s counts
    from the start of the process's loop, so an epoch's time is the difference to the epoch before (a
    resumed run starts counting again)."""
    rows = [json.loads(ln) for ln in metrics_jsonl.read_text().splitlines() if ln.strip()] \
        if metrics_jsonl.is_file() else []
    ips = [r["images_per_s"] for r in rows if "step" in r and isinstance(r.get("images_per_s"), (int, float))]
    elapsed = [r["elapsed_s"] for r in rows if "val_accuracy" in r and isinstance(r.get("elapsed_s"), (int, float))]
    epochs = [e - prev if e > prev else e for prev, e in zip([0.0, *elapsed], elapsed)]
    return (statistics.fmean(epochs) if epochs else None), (statistics.median(ips) if ips else None)


def read_row(method: str, run: Path) -> dict:
    """One finished row's numbers from its run folder (summary.json, config.json, metrics.json, metrics.jsonl)."""
    s = json.loads((run / "summary.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    per_epoch, ips = epoch_stats(run / "metrics.jsonl")
    return {"method": method, "status": "ok", "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "trainable_parameters": s["trainable_parameters"],
            "adapter_parameters": cfg.get("parameters", {}).get("adapter"),
            "peak_memory_mb": s["peak_memory_mb"], "time_per_epoch_s": per_epoch, "images_per_s": ips,
            "error": "", "run": str(run)}


def failed_row(method: str, run: Path, error: str) -> dict:
    return {"method": method, "status": "failed", **{k: None for k, _, _ in COLUMNS[1:]}, "error": error,
            "run": str(run)}


def run_row(method: str, out: Path, args, train_flags: list[str], eval_flags: list[str]) -> tuple[dict, bool]:
    """Train (unless finished) and evaluate (unless done) one method; (its row, whether it was skipped)."""
    run = out / method
    done = (run / "summary.json").is_file() and (run / "metrics.json").is_file()
    if not done:
        if not (run / "summary.json").is_file():
            err = run_logged(train_command(method, run, args.data, train_flags), out / "logs" / f"{method}.train.log")
            if err:
                return failed_row(method, run, f"train.py: {err}"), False
        if not (run / "summary.json").is_file():  # exit 0 without a summary (e.g. a finished run's --resume)
            return failed_row(method, run, f"train.py wrote no {run / 'summary.json'}"), False
        cmd = [sys.executable, str(EVAL_PY), "--run", str(run), "--data", args.test, *eval_flags]
        err = run_logged(cmd, out / "logs" / f"{method}.eval.log")
        if err:
            return failed_row(method, run, f"eval.py: {err}"), False
    try:
        return read_row(method, run), done
    except (OSError, ValueError, KeyError) as e:
        return failed_row(method, run, f"cannot read the run folder: {type(e).__name__}: {e}"), done


def cell(row: dict, key: str, fmt) -> str:
    v = row.get(key)
    if key == "method":
        return str(v)
    if row["status"] != "ok":
        return "failed" if key == "accuracy" else "—"
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt(v)


def markdown(rows: list[dict], command: str, notice: str = "") -> str:
    lines = ["# Method comparison", "", f"Made by `{command}`.", ""]
    if notice:
        lines += [notice, ""]
    lines += ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
              "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {r['method']}: {r['error']}" for r in failed]
    lines += ["", "accuracy and macro F1: eval.py on the test set. Trainable parameters include the classification "
              "head; adapter parameters are those without it. Peak memory: the training process's own "
              "(torch.cuda.max_memory_allocated on a GPU; on a CPU the peak resident set, PyTorch itself included). "
              "Time per epoch: training + validation, mean over epochs. images/s: median training throughput "
              "per optimizer step (frozen: the head on cached features). Bubble chart: methods.png."]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [k for k, _, _ in COLUMNS] + ["status", "error", "run"]
    w.writerow(keys)
    for r in rows:
        w.writerow(["" if r.get(k) is None else r[k] for k in keys])
    return buf.getvalue()


def write_outputs(out: Path, rows: list[dict], command: str, title: str, notice: str = "") -> None:
    """methods.md, methods.csv and methods.png, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "methods.md", lambda p: p.write_text(markdown(rows, command, notice)))
    atomic_write(out / "methods.csv", lambda p: p.write_text(csv_text(rows)))
    save_bubble_chart(rows, out / "methods.png", title=title)


@error_boundary
def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = split_train_flags(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=parse_methods, default=parse_methods(DEFAULT_METHODS),
                   help=f"comma-separated train.py --method values (default: {DEFAULT_METHODS})")
    p.add_argument("--data", help="training pool (image folder or CSV); train.py splits validation from it")
    p.add_argument("--test", help="test set (image folder or CSV) for eval.py")
    p.add_argument("--weights", help="backbone for every run (train.py --weights; default: train.py's)")
    p.add_argument("--out", default="runs/compare", help="folder for the runs, logs/, methods.md/.csv/.png")
    p.add_argument("--demo", action="store_true", help="the generated random DINOv3 and data of train.py --demo")
    args = p.parse_args(own)
    train_flags, eval_flags, notice = [], ["--speed-reps", "0"], ""
    if args.demo:
        from nanopeft.training.demo import DEMO_NOTICE, prepare_demo

        paths = prepare_demo()
        args.data = args.data or str(paths["data"])
        args.test = args.test or str(paths["test"])
        args.weights = args.weights or str(paths["weights"])
        train_flags += DEMO_FLAGS
        eval_flags += ["--workers", "0"]
        notice = DEMO_NOTICE + " The demo backbone is random, so these accuracies say nothing about the methods."
    if not args.data or not args.test:
        p.error("give --data TRAIN and --test TEST (or --demo)")
    if args.weights:
        train_flags += ["--weights", args.weights]
    train_flags += extra  # last: flags after `--` win over --demo's
    eval_flags += forwarded(extra)
    out = Path(args.out)
    command = shlex.join(["python", "scripts/compare_methods.py", *argv])
    title = "Test accuracy against training peak memory" + (" (demo: random backbone)" if args.demo else "")
    rows = []
    for i, method in enumerate(args.methods, 1):
        print(f"[{i}/{len(args.methods)}] {method}: start ({out / method})", flush=True)
        t0 = time.perf_counter()
        row, skipped = run_row(method, out, args, train_flags, eval_flags)
        rows.append(row)
        if row["status"] == "ok":
            print(f"[{i}/{len(args.methods)}] {method}: {'already finished, skipped' if skipped else 'done'} in "
                  f"{time.perf_counter() - t0:.0f} s: accuracy {row['accuracy']:.4f}, macro F1 {row['macro_f1']:.4f}, "
                  f"{row['trainable_parameters']:,} trainable, peak {row['peak_memory_mb']:,.0f} MB", flush=True)
        else:
            print(f"[{i}/{len(args.methods)}] {method}: FAILED ({row['error']}); log in {out / 'logs'}", flush=True)
        write_outputs(out, rows, command, title, notice)
    print(markdown(rows, command, notice))
    print(f"wrote {out / 'methods.md'}, {out / 'methods.csv'} and {out / 'methods.png'}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RowsFailed(f"{len(failed)} of {len(rows)} method(s) failed: " +
                         "; ".join(f"{r['method']} ({r['error']})" for r in failed) + f"; logs in {out / 'logs'}")
    return rows


if __name__ == "__main__":
    main()
