"""How many labelled images per class does a recipe need? Train on k images per class, test, plot.

    python scripts/data_efficiency.py --data data/train --test data/test --shots 5,10,20,60,240 \
        --preset qlora-all-linear-r64 [--out runs/shots] [--seed 0] [-- extra train.py flags]

For each k the training pool is cut to k images per class (a class with fewer keeps all it has),
stratified and seeded: each class's images are shuffled once with --seed and the first k taken, so the
subsets are nested (the 10-shot set holds the 5-shot one) and a larger k only adds images. The subset is
written as a CSV manifest (`k<K>/train.csv`) and given to train.py as --data, so train.py's own
validation split (20 % by default) comes out of those k images, as in the study (240 per class, 2,160
images, train + validation). Each run is evaluated on --test with eval.py; `results.md` holds the table
and `data_efficiency.png` the plot of test accuracy / macro F1 / balanced accuracy against k. Finished
rows are skipped when the script is run again. Extra arguments after `--` go to train.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluate  # noqa: E402  (the repo's eval.py)
import train  # noqa: E402
from nanopeft.training.flags import split_train_flags  # noqa: E402
from nanopeft.cli import error_boundary  # noqa: E402
from nanopeft.data.folders import scan_dataset, split_folders  # noqa: E402
from nanopeft.reports.plots import save_shots_plot  # noqa: E402


def parse_shots(text: str) -> list[int]:
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots {text!r}: expected comma-separated integers, e.g. 5,10,20") from None
    if not shots or shots[0] < 1:
        raise argparse.ArgumentTypeError(f"--shots {text!r}: every k must be >= 1")
    return shots


def class_orders(items, num_classes: int, seed: int) -> list[list]:
    """Per class, its samples in one seeded random order: the k-shot subset is the first k of each."""
    by_class = defaultdict(list)
    for s in items:
        by_class[s.label].append(s)
    rng = np.random.default_rng(seed)
    return [[by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in range(num_classes)]


def write_manifest(path: Path, orders: list[list], names: list[str], k: int) -> int:
    """The k-per-class subset as a path,label,source CSV, in class then shuffled order; returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(str(Path(s.path).resolve()), names[s.label], s.source) for order in orders for s in order[:k]]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source"])
        w.writerows(rows)
    return len(rows)


def run_one(k: int, out: Path, manifest: Path, args, extra: list[str]) -> dict:
    """Train (unless finished) and evaluate one k; returns its row of the table."""
    run = out / f"k{k}" / "run"
    if not (run / "summary.json").is_file():
        # a run folder with config.json resumes (from the beginning if no resume.pt was written yet)
        resume = ["--resume", str(run)] if (run / "config.json").is_file() else ["--out", str(run)]
        preset = ["--preset", args.preset] if args.preset else []
        train.main([*preset, "--data", str(manifest), *resume, *extra])
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        evaluate.main(["--run", str(run), "--data", args.test, "--speed-reps", "0"])
    m = json.loads(metrics_file.read_text())
    s = json.loads((run / "summary.json").read_text())
    return {"shots": k, "images": sum(1 for _ in open(manifest)) - 1, "val_accuracy": s["best_val_accuracy"],
            "accuracy": m["accuracy"], "balanced_accuracy": m.get("balanced_accuracy"), "macro_f1": m["macro_f1"],
            "train_time_s": s["train_time_s"], "run": str(run)}


def table(rows: list[dict], preset: str | None) -> str:
    lines = [f"# Data efficiency: {preset or 'train.py defaults'}", "",
             "| k / class | images | val accuracy | test accuracy | balanced accuracy | macro F1 | train min |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bal = f"{r['balanced_accuracy']:.4f}" if r["balanced_accuracy"] is not None else "-"
        lines.append(f"| {r['shots']} | {r['images']:,} | {r['val_accuracy']:.4f} | {r['accuracy']:.4f} | {bal} | "
                     f"{r['macro_f1']:.4f} | {r['train_time_s'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


@error_boundary
def main(argv=None) -> list[dict]:
    argv, extra = split_train_flags(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training pool (image folder or CSV)")
    p.add_argument("--test", required=True, help="test set (image folder or CSV)")
    p.add_argument("--shots", type=parse_shots, default=parse_shots("5,10,20,60,240"), help="k values, e.g. 5,10,20")
    p.add_argument("--preset", help="train.py --preset for every run (default: train.py's defaults)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class shuffles")
    p.add_argument("--out", default="runs/data-efficiency", help="folder for the runs, results.md and the plot")
    args = p.parse_args(argv)
    try:
        splits = split_folders(args.data)  # a train/ val/ test/ layout: the shots come from train/
        items, names = scan_dataset(splits["train"] if splits else args.data)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    orders = class_orders(items, len(names), args.seed)
    smallest = min(len(o) for o in orders)
    if args.shots[-1] > smallest:
        print(f"note: the smallest class has {smallest} images; larger k keep all of it", file=sys.stderr)
    out = Path(args.out)
    rows = []
    for k in args.shots:
        manifest = out / f"k{k}" / "train.csv"
        if not manifest.is_file():
            write_manifest(manifest, orders, names, k)
        rows.append(run_one(k, out, manifest, args, extra))
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        (out / "results.md").write_text(table(rows, args.preset))
        save_shots_plot(rows, out / "data_efficiency.png", title=f"Data efficiency: {args.preset or 'defaults'}")
    print(table(rows, args.preset))
    print(f"wrote {out / 'results.md'} and {out / 'data_efficiency.png'}")
    return rows


if __name__ == "__main__":
    main()
