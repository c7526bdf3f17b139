"""Calibrated label-shift correction on real images no one here wrote: scikit-learn's handwritten digits.

    8×8 digits (1,797 images, 10 classes; sklearn.datasets.load_digits, the UCI optical digits test set)
    ─► 32 px PNGs, half of each class to train (the stratified 20 % of it validates), half to test
    ─► train.py --method resnet18 (the study's scratch recipe: label smoothing 0.1), --epochs 6, 32 px
    ─► eval.py --prior-correction em, once with --calibration auto (the default for em) and once with
       --calibration none (the old behaviour), on the balanced test half and on a study-like skewed
       subset of it (39 %, 33 %, then a tail down to 0.5 %)

It prints accuracy raw / calibrated / prior-corrected, and the L1 distance of the estimated test priors
to the true ones (and uniform's, for scale). Needs scikit-learn (`pip install scikit-learn`, the
bench extra); about 10 minutes on 2 cores. Results: docs/CALIBRATION.md ("Measured").

    python bench/calibration_digits.py [--epochs 6] [--out /tmp/digits]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARES = [0.39, 0.33, 0.08, 0.06, 0.05, 0.04, 0.02, 0.015, 0.01, 0.005]  # the skewed subset, digit 0 first


def write_images(root: Path, skewed_n: int = 240) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == k))
        for split, part in (("train", idx[: len(idx) // 2]), ("test", idx[len(idx) // 2:])):
            folder = root / split / f"digit_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8))
                img.resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
        src = sorted((root / "test" / f"digit_{k}").iterdir())
        dst = root / "skewed" / f"digit_{k}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in src[: max(1, min(len(src), round(SHARES[k] * skewed_n)))]:
            shutil.copy(f, dst / f.name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", default="/tmp/nanopeft-digits")
    args = p.parse_args(argv)
    import eval as evaluate
    import train

    root = Path(args.out)
    if not (root / "skewed").is_dir():
        write_images(root)
    run = root / "run"
    if not (run / "summary.json").is_file():
        train.main(["--method", "resnet18", "--data", str(root / "train"), "--image-size", "32", "--epochs",
                    str(args.epochs), "--workers", "0", "--out", str(run), "--overwrite"])
    rows = [f"{'test set':<9} {'calibration':<12} {'raw':>7} {'calibr.':>7} {'EM':>7} {'L1(q̂,q)':>9} {'L1(unif,q)':>10}"]
    for test in ("test", "skewed"):
        for cal in ("auto", "none"):
            m = evaluate.main(["--run", str(run), "--data", str(root / test), "--prior-correction", "em",
                               "--calibration", cal, "--workers", "0", "--speed-reps", "0",
                               "--out", str(root / f"eval-{test}-{cal}/")])
            support = np.array([m["per_class"][c]["support"] for c in m["class_names"]], float)
            q = support / support.sum()
            est = np.array(list(m["prior_correction"]["priors"].values()))
            calibrated = m.get("calibrated", {}).get("accuracy", float("nan"))
            rows.append(f"{test:<9} {cal + (' → ' + m['calibration']['kind'] if cal == 'auto' else ''):<12} "
                  f"{m['accuracy']:>7.4f} {calibrated:>7.4f} {m['corrected']['accuracy']:>7.4f} "
                  f"{np.abs(est - q).sum():>9.3f} {np.abs(1 / len(q) - q).sum():>10.3f}")
    print("\n" + "\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
