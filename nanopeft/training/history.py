"""A run's history, as people read it: validation scores per epoch, which epoch is kept, and the
per-epoch table and picture train.py refreshes after every epoch.

    metrics.jsonl ─► metrics.csv   one row per epoch: EPOCH_COLUMNS
                 └─► curves.png    training loss per step (smoothed) with lr | val accuracy / macro F1 per epoch

Both are rebuilt from metrics.jsonl (rank 0 writes it, flushed per row), so a resumed run's files cover
the whole run: rows logged twice (steps re-run after a crash, before the last resume.pt) count once,
the last one kept. Written atomically (checkpoint_format.atomic_write): a reader never sees half a file.

Validation scores come from sums, so that DDP adds them over ranks with one all_reduce:
    [Σ_i w_{y_i}·ℓ_i, Σ_i w_{y_i}, M[0,0], M[0,1], …, M[C-1,C-1]]   (M: the confusion matrix)
    val_loss = Σ w·ℓ / Σ w   (the training objective, label smoothing and class weights included:
                               torch's CrossEntropyLoss(reduction="mean") on the whole split)
    val_accuracy = trace M / Σ M,   val_macro_f1 = mean_c 2·M[c,c] / (support_c + predicted_c)
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..files.checkpoint_format import atomic_write
from ..reports.multilabel import multilabel_metrics
from ..reports.metrics import per_class_prf

EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "images_per_s",
                 "peak_memory_mb")
LOWER_IS_BETTER = ("val_loss",)


def validation_scores(sums, num_classes: int) -> dict:
    """{val_accuracy, val_loss, val_macro_f1} from [loss sum, weight sum, confusion matrix (C·C, row-major)]."""
    loss_sum, weight_sum = float(sums[0]), float(sums[1])
    cm = np.rint(np.asarray(sums[2:], dtype=np.float64)).astype(np.int64).reshape(num_classes, num_classes)
    _, _, f1, _ = per_class_prf(cm)
    n = int(cm.sum())
    return {"val_accuracy": float(np.trace(cm)) / max(n, 1),
            "val_loss": loss_sum / weight_sum if weight_sum > 0 else math.nan,
            "val_macro_f1": float(f1.mean()) if f1.size else 0.0}


def multilabel_scores(logits: torch.Tensor, targets: torch.Tensor, loss: float) -> dict:
    """--task multilabel: {val_map (scikit-learn's mean AP over classes with a positive), val_macro_f1 and
    val_accuracy (exact match) at threshold ½, val_loss (the mean BCE)}, from the split's (N, C) logits and
    0/1 targets. The kept epoch's per-class thresholds are tuned later, on its stored logits (eval.py)."""
    probs, y = torch.sigmoid(logits).numpy(), targets.numpy()
    m = multilabel_metrics(probs, y, np.full(y.shape[1], 0.5), [str(c) for c in range(y.shape[1])])
    return {"val_accuracy": m["exact_match"], "val_loss": loss, "val_macro_f1": m["macro_f1"],
            "val_map": m["mAP"] if m["mAP"] is not None else math.nan}


def improved(score: float, best: float | None, metric: str, min_delta: float) -> bool:
    """Is this epoch's `metric` better than the best so far by more than min_delta? The first epoch
    (best None) always is, so a run always leaves an adapter; a NaN best (a diverged epoch, an empty
    validation split) gives way to any finite score."""
    if best is None or not math.isfinite(best):
        return best is None or math.isfinite(score)
    if metric in LOWER_IS_BETTER:
        return score < best - min_delta
    return score > best + min_delta


def keep_best(state, val: dict, metric: str, min_delta: float, epoch: int) -> bool:
    """Update train.py's early-stopping record (a LoopState, nanopeft/training/resume.py) with this epoch's
    scores; True if the epoch is the new best by `metric` (--select-metric; its adapter is then saved).
    state.best_score holds the best value of the metric, state.best_val the kept epoch's accuracy."""
    score, best = val[metric], state.best_score
    if best is None and state.best_epoch > 0 and metric == "val_accuracy":
        best = state.best_val  # a resume.pt written before best_score was recorded
    if improved(score, best, metric, min_delta):
        state.best_val, state.best_score, state.best_epoch, state.bad_epochs = val["val_accuracy"], score, epoch, 0
        return True
    state.bad_epochs += 1
    return False


def read_history(metrics_jsonl) -> tuple[list[dict], list[dict]]:
    """(step rows, epoch rows) of metrics.jsonl, each in order, a step or epoch logged twice kept once (the last)."""
    steps, epochs = {}, {}
    path = Path(metrics_jsonl)
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            continue
        if "step" in row and "loss" in row:
            steps[row["step"]] = row
        elif "val_accuracy" in row:
            epochs[row["epoch"]] = row
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]


def epoch_table(steps: list[dict], epochs: list[dict]) -> list[dict]:
    """One row per epoch: EPOCH_COLUMNS. train_loss: the mean of the epoch's step losses; lr: its last
    step's; images_per_s: the harmonic mean of the steps' (= images / time for equal steps). Step rows
    count epochs from 0, epoch rows from 1 (the number of epochs done)."""
    by_epoch: dict[int, list[dict]] = {}
    for s in steps:
        by_epoch.setdefault(s["epoch"] + 1, []).append(s)
    rows = []
    for e in epochs:
        mine = by_epoch.get(e["epoch"], [])
        ips = [s["images_per_s"] for s in mine if s.get("images_per_s")]
        rows.append({"epoch": e["epoch"],
                     "train_loss": sum(s["loss"] for s in mine) / len(mine) if mine else None,
                     "val_loss": e.get("val_loss"), "val_accuracy": e.get("val_accuracy"),
                     "val_macro_f1": e.get("val_macro_f1"), "lr": mine[-1]["lr"] if mine else None,
                     "images_per_s": len(ips) / sum(1 / v for v in ips) if ips else None,
                     "peak_memory_mb": e.get("peak_memory_mb")})
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]
                        for k in EPOCH_COLUMNS})


def write_history(out, title: str | None = None) -> None:
    """metrics.csv and curves.png of the run folder `out`, from its metrics.jsonl."""
    from ..reports.plots import save_curves

    out = Path(out)
    steps, epochs = read_history(out / "metrics.jsonl")
    rows = epoch_table(steps, epochs)
    atomic_write(out / "metrics.csv", lambda p: _write_csv(rows, p))
    atomic_write(out / "curves.png", lambda p: save_curves(steps, epochs, p, title or f"Training: {out.name}"))
