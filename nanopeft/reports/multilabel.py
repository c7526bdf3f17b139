"""Multi-label metrics: average precision, mAP, per-class F1 thresholds, and a JSON-ready summary, in numpy.

Inputs are `probs` (N, C) scores (sigmoid outputs, or any monotone score) and `y` (N, C) of 0/1. Each
column c is its own binary problem: image i is a positive of c iff y[i, c] = 1.

Average precision (one class), exactly as scikit-learn's `average_precision_score`:
sort the scores in decreasing order and take one operating point per DISTINCT score s_1 > s_2 > ... > s_K
(tied scores enter together, as in `precision_recall_curve`); at threshold s_n, predicting "score >= s_n",

    TP_n = #{positives with score >= s_n}     k_n = #{images with score >= s_n}     P = #positives
    P_n  = TP_n / k_n (precision)             R_n = TP_n / P (recall)               R_0 = 0
    AP   = Σ_n (R_n − R_{n−1}) · P_n

the step-wise area under the precision-recall curve, with no interpolation (the 11-point / "max precision
to the right" interpolation of PASCAL VOC 2007, Everingham et al., IJCV 2010, is NOT applied). See
Manning, Raghavan & Schütze, "Introduction to Information Retrieval", 2008, §8.4, and the scikit-learn
user guide, "Precision, recall and F-measures". mAP = the mean of AP over the classes, the headline
number of multi-label image classification on MS-COCO / NUS-WIDE (e.g. Ridnik et al., "Asymmetric Loss
For Multi-Label Classification", ICCV 2021).

A class with no positives has P = 0, so every R_n is 0/0: AP is undefined. Here it is float("nan"), and
mAP averages only the classes with at least one positive. scikit-learn 1.9 instead warns ("No positive
class found in y_true, recall is set to one for all thresholds") and returns 0.0 for that class, which
`average="macro"` then averages in; so mAP here equals sklearn's macro AP whenever every class has a
positive, and is larger (a mean over fewer classes, none of them a forced 0) otherwise.

Thresholds: per class, the t maximising F1 of (probs[:, c] >= t) on validation data,
F1 = 2·TP / (k + P) (= 2PR / (P + R)). Candidates are the midpoints between consecutive distinct sorted
scores, plus s_min − 1 (everything positive) and s_max + 1 (nothing positive). Tie rule: among
candidates with equal F1 (exactly equal floats) the HIGHEST threshold wins, i.e. the fewest predicted
positives. A class without positives (F1 undefined) gets `fallback`.

The summary F1s follow sklearn's `f1_score(..., zero_division=0)`: a 0/0 is 0.0. micro F1 pools the
counts of all classes, macro F1 is the plain mean over all C classes, and exact match is sklearn's
multilabel `accuracy_score` (subset accuracy: the fraction of images whose whole label row is right).
"""

from __future__ import annotations

import numpy as np


def _matrix(a, what: str, ndim: int = 2) -> np.ndarray:
    if hasattr(a, "detach"):                 # a torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"multilabel.py: {what} must be {ndim}-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"multilabel.py: {what} holds NaN or inf")
    return a


def _pair(probs, y) -> tuple[np.ndarray, np.ndarray]:
    s, t = _matrix(probs, "probs"), _matrix(y, "y")
    if s.shape != t.shape:
        raise ValueError(f"multilabel.py: probs has shape {s.shape} but y has {t.shape}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("multilabel.py: y must hold only 0 and 1")
    return s, t.astype(bool)


def _ranked(scores: np.ndarray, positive: np.ndarray):
    """Per distinct score, decreasing: (the score, k_n = #images >= it, TP_n = #positives >= it)."""
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]   # last index of each tied group
    return s[last], last + 1, np.cumsum(pos)[last]


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class, = sklearn's average_precision_score; nan when `positive` has no 1 (see module doc)."""
    s, pos = _pair(np.reshape(scores, (-1, 1)), np.reshape(positive, (-1, 1)))
    s, pos = s[:, 0], pos[:, 0]
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    _, k, tp = _ranked(s, pos)
    precision, recall = tp / k, tp / n_pos                   # P_n = TP_n / k_n,  R_n = TP_n / P
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))   # Σ (R_n − R_{n−1}) P_n


def mean_average_precision(probs: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(mAP over the classes with a positive — nan if none, per-class AP of shape (C,) — nan if no positive)."""
    s, t = _pair(probs, y)
    ap = np.array([average_precision(s[:, c], t[:, c]) for c in range(s.shape[1])], dtype=np.float64)
    ok = ~np.isnan(ap)
    return (float(ap[ok].mean()) if ok.any() else float("nan")), ap


def tune_thresholds(probs: np.ndarray, y: np.ndarray, fallback: float = 0.5) -> np.ndarray:
    """(C,) thresholds, each maximising F1 of probs[:, c] >= t on (probs, y); ties -> highest t."""
    s, t = _pair(probs, y)
    out = np.full(s.shape[1], float(fallback), dtype=np.float64)
    for c in range(s.shape[1]):
        n_pos = int(t[:, c].sum())
        if n_pos == 0:
            continue                                         # F1 is 0/0 at every t: keep the fallback
        v, k, tp = _ranked(s[:, c], t[:, c])                 # cut n: predict the top k_n (scores >= v_n)
        hi, lo = v[:-1], v[1:]                               # consecutive distinct scores, hi > lo
        mid = lo + (hi - lo) / 2                             # between them; if rounding leaves (lo, hi], use hi
        mid = np.where((mid > lo) & (mid <= hi), mid, hi)
        cand = np.r_[v[0] + 1.0, mid, v[-1] - 1.0]           # decreasing: none, ..., all predicted
        k, tp = np.r_[0, k], np.r_[0, tp]
        f1 = 2.0 * tp / (k + n_pos)                          # F1 = 2TP / (#predicted + #positives)
        out[c] = cand[int(np.argmax(f1))]                    # first maximum = highest threshold
    return out


def _f1(tp, fp, fn):
    den = 2 * tp + fp + fn                                   # F1 = 2TP / (2TP + FP + FN), 0/0 -> 0
    return np.divide(2.0 * tp, den, out=np.zeros(np.shape(den)), where=den != 0)


def _json(x: float):
    return None if np.isnan(x) else float(x)


def multilabel_metrics(probs: np.ndarray, y: np.ndarray, thresholds: np.ndarray, class_names: list[str]) -> dict:
    """mAP, per-class AP, micro/macro F1, exact match and per-class P/R/F1 at `thresholds`; JSON-safe."""
    s, t = _pair(probs, y)
    th = _matrix(thresholds, "thresholds", ndim=1)
    names = [str(n) for n in class_names]
    if th.shape != (s.shape[1],) or len(names) != s.shape[1]:
        raise ValueError(f"multilabel.py: {s.shape[1]} classes, but {th.size} thresholds and "
                         f"{len(names)} class_names")
    pred = s >= th[None, :]                                  # ŷ[i, c] = 1  iff  probs[i, c] >= t_c
    tp = (pred & t).sum(0).astype(np.float64)
    fp = (pred & ~t).sum(0).astype(np.float64)
    fn = (~pred & t).sum(0).astype(np.float64)
    prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    rec = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f1 = _f1(tp, fp, fn)
    m_ap, ap = mean_average_precision(s, t)
    return {
        "mAP": _json(m_ap),
        "per_class_ap": {n: _json(ap[c]) for c, n in enumerate(names)},
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),     # pooled counts
        "macro_f1": float(f1.mean()) if f1.size else 0.0,        # mean over all C classes
        "exact_match": float((pred == t).all(1).mean()) if s.shape[0] else 0.0,
        "per_class": {n: {"precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
                          "support": int(tp[c] + fn[c]), "threshold": float(th[c])}
                      for c, n in enumerate(names)},
        "num_images": int(s.shape[0]),
    }
