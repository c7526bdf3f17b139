"""Reproduce the study's table in one command: train and evaluate the 11 presets, write a markdown table.

    python scripts/paper_table.py --data data/train --test data/test [--out runs/paper] [--only qlora-q_proj-r8 ...]

Each row is `train.py --preset NAME` then `eval.py --run RUN --data TEST`, and two extra rows the study did
not run: the frozen backbone's linear probe and k-NN (`--method linear-probe | knn`, fitted in seconds on
cached features, nanopeft/probes.py); finished rows are skipped
when the script is run again (their run folder already has metrics.json), so it can be resumed.
Extra arguments after `--` go to train.py (e.g. `-- --weights weights/dinov3-vit7b16 --workers 8`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluate  # noqa: E402  (the repo's eval.py)
import train  # noqa: E402
from nanopeft.training.flags import split_train_flags  # noqa: E402
from nanopeft.cli import error_boundary  # noqa: E402
from nanopeft.config import ADAPTER_METHODS, PAPER_RUNS  # noqa: E402

# the study's published test accuracies (Yang et al. 2026, arXiv:2603.17782; docs/RECIPE.md
# ("The 11 configurations")) beside ours
PUBLISHED = {"resnet18-scratch": 0.7287, "vit-small-scratch": 0.6191, "dinov3-frozen": 0.7656,
             "qlora-q_proj-r8": 0.7717, "qlora-q_proj-r16": 0.7838, "qlora-all-linear-r16": 0.8040,
             "qlora-all-linear-r64": 0.8316, "dora-q_proj-r8": 0.8153, "dora-q_proj-r16": 0.8103,
             "dora-all-linear-r16": 0.8123, "dora-all-linear-r64": 0.8314}
EXTRA_ROWS = {"dinov3-linear-probe": ["--method", "linear-probe"], "dinov3-knn": ["--method", "knn"]}


def row_markdown(name: str, run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    t, s = cfg["train"], json.loads((run / "summary.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    adapted = t["method"] in ADAPTER_METHODS
    return (f"| {name} | {t['method']} | {t['targets'] if adapted else '-'} | {t['rank'] if adapted else '-'} | "
            f"{cfg['parameters']['trainable']:,} | {s['train_time_s'] / 60:.1f} | {m['accuracy']:.4f} | "
            f"{f'{PUBLISHED[name]:.4f}' if name in PUBLISHED else '—'} | {m['weighted_f1']:.4f} | {m['macro_f1']:.4f} | "
            f"{s['peak_memory_mb'] / 1024:.1f} |")


@error_boundary
def main(argv=None):
    argv, extra = split_train_flags(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training pool (image folder or CSV)")
    p.add_argument("--test", required=True, help="test set (image folder or CSV)")
    p.add_argument("--out", default="runs/paper", help="folder for the 11 runs and table.md")
    p.add_argument("--only", nargs="+", choices=sorted([*PAPER_RUNS, *EXTRA_ROWS]), help="a subset of the rows")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for name in args.only or [*PAPER_RUNS, *EXTRA_ROWS]:
        run = out / name
        if not (run / "metrics.json").is_file():
            if not (run / "summary.json").is_file():
                # a run folder with config.json resumes (from the beginning if no resume.pt was written yet)
                resume = ["--resume", str(run)] if (run / "config.json").is_file() else ["--out", str(run)]
                what = EXTRA_ROWS.get(name, ["--preset", name])
                train.main([*what, "--data", args.data, *resume, *extra])
            evaluate.main(["--run", str(run), "--data", args.test])
        rows.append(row_markdown(name, run))
    table = "\n".join([
        "| preset | method | targets | rank | trainable params | train min | test acc | published acc | "
        "weighted F1 | macro F1 | peak GB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
