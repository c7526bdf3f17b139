"""The frozen row with and without the feature cache, and the probes' fit time.

    frozen, --cache-features no   the study's frozen row: the backbone runs on every view of every image
                                  in every epoch (E · (N·K + Nv) forwards)
    frozen, --cache-features yes  each view once (N·K + Nv forwards), then E epochs of the head alone
    linear-probe, knn             the clean view once (N + Nv forwards), then the fit

Each row is train.py in a fresh process on a ViT-B/16-shaped checkpoint (random values: the cost does
not depend on them) and a generated image folder, 224 px, fp32, timed from start to exit (loading,
caching, every epoch and validation). The ratio is the uncached wall time over the cached one; the
target is at least 0.7 × the ratio of backbone forwards saved.

    python bench/frozen_cache.py                      # 10 epochs, 9 classes × 5 images, ViT-B/16
    python bench/frozen_cache.py --epochs 3 --model tiny --per-class 2      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, synthetic_checkpoint  # noqa: E402


def run(args, out: Path, data: Path, weights: Path, *flags) -> tuple[float, dict]:
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--weights", str(weights), "--data", str(data),
           "--epochs", str(args.epochs), "--patience", str(args.epochs), "--image-size", str(args.image_size),
           "--precision", "fp32", "--workers", "1", "--device", "cpu", "--batch-size", "4", "--grad-accum", "1",
           "--eval-batch-size", "8", *flags]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"train.py failed ({' '.join(flags)}):\n{r.stderr[-2000:]}")
    return wall, json.loads((out / "summary.json").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vitb16")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=5, help="images per class (9 classes)")
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    from nanopeft.data.folders import make_demo_dataset, training_pool

    weights = synthetic_checkpoint(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_demo_dataset(tmp / "data", num_classes=9, per_class=args.per_class, size=(256, 256), seed=0)
        train, val, _ = training_pool(data)
        n, nv, k, e = len(train), len(val), 3, args.epochs
        rows = [("frozen, no cache", ["--method", "frozen", "--cache-features", "no"], e * (n * k + nv)),
                ("frozen, cache", ["--method", "frozen"], n * k + nv),
                ("linear-probe", ["--method", "linear-probe"], n + nv),
                ("knn", ["--method", "knn"], n + nv)]
        print(f"{args.model}, {args.image_size} px, fp32, {n} train + {nv} val images, {k} views, {e} epochs\n")
        print(f"{'row':<18} {'forwards':>9} {'wall s':>8} {'val acc':>8}")
        walls = {}
        for name, flags, forwards in rows:
            wall, summary = run(args, tmp / name.replace(" ", "-").replace(",", ""), data, weights, *flags)
            walls[name] = wall
            print(f"{name:<18} {forwards:>9,} {wall:>8.1f} {summary['best_val_accuracy']:>8.4f}")
        saved = rows[0][2] / rows[1][2]
        ratio = walls["frozen, no cache"] / walls["frozen, cache"]
        print(f"\nforwards saved {saved:.1f}×, wall time {ratio:.2f}× (target ≥ {0.7 * saved:.1f}×: "
              f"{'met' if ratio >= 0.7 * saved else 'not met'})")
        big = 80 * (2160 * 3 + 540)
        print(f"the study's frozen row: 80 × (2,160 × 3 + 540) = {big:,} forwards uncached, "
              f"{2160 * 3 + 540:,} cached ({big / (2160 * 3 + 540):.0f}×)")
        return {"walls": walls, "forwards_saved": saved, "ratio": ratio, "ok": math.isfinite(ratio)}


if __name__ == "__main__":
    main()
