"""Classification metrics of the paper's evaluation (Module 11), from the confusion matrix, in numpy.

Everything derives from one matrix M (rows = true class, columns = predicted, class-index order):

    TP_c = M[c, c]     support_c = Σ_j M[c, j]     predicted_c = Σ_i M[i, c]
    precision_c = TP_c / predicted_c        recall_c = TP_c / support_c
    F1_c = 2·TP_c / (support_c + predicted_c)          (= 2PR / (P + R), without the 0/0 detour)
    macro = mean over the C classes         weighted = Σ_c support_c · metric_c / Σ_c support_c
    balanced accuracy = mean of recall_c over the classes with support_c > 0

Balanced accuracy is what survives a prior shift: the study's test set is 39 % lying, 33 % standing,
0.3 % gallop, so accuracy mostly measures two classes; balanced accuracy weighs each class equally.
It averages only the classes present in y_true, as sklearn's `balanced_accuracy_score` does (a class
that never occurs has no recall to average), so it can differ from macro recall, which counts them as 0.

A 0/0 anywhere is 0.0, silently: sklearn's `zero_division="warn"` value without the warning. The
averages run over all `num_classes` classes (sklearn with `labels=range(C)`, as in
`classification_report(labels=...)`); sklearn's bare `f1_score(average="macro")` instead averages
only the labels that occur in y_true ∪ y_pred, which differs when a class never shows up at all.
"""

from __future__ import annotations

import numpy as np


def _as_int_array(y, what: str) -> np.ndarray:
    if hasattr(y, "detach"):                  # a torch tensor, without importing torch here
        y = y.detach().cpu().numpy()
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"metrics.py: {what} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"metrics.py: {what} must hold integer class indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, M[t, p] = #{i : y_true[i] = t and y_pred[i] = p}."""
    t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"metrics.py: y_true has {t.size} labels but y_pred has {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"metrics.py: {name} holds labels outside [0, {num_classes}): "
                             f"min {a.min()}, max {a.max()}")
    # bincount over the flattened (t, p) index is one pass, fast for the 211,800-image test set
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, with 0/0 (and x/0) = 0.0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1, support), each of shape (C,), from a confusion matrix."""
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    return _div(tp, predicted), _div(tp, support), _div(2 * tp, support + predicted), support


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Row-normalised matrix: M[t, p] / support_t, the fraction of class t predicted as p (0 rows stay 0)."""
    return _div(cm, cm.sum(axis=1, keepdims=True))


def top_confusions(cm: np.ndarray, class_names: list[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells, by count (ties: by true then predicted index); zeros skipped."""
    frac = normalize_rows(cm)
    off = [(int(cm[t, p]), t, p) for t in range(len(cm)) for p in range(len(cm)) if t != p and cm[t, p]]
    off.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": class_names[t], "pred": class_names[p], "count": n, "fraction": float(frac[t, p])}
            for n, t, p in off[:k]]


def _summary(cm: np.ndarray) -> dict:
    """accuracy and the macro / weighted P, R, F1 of one confusion matrix."""
    prec, rec, f1, support = per_class_prf(cm)
    n = int(support.sum())
    out = {"accuracy": float(_div(np.trace(cm), n)),
           "balanced_accuracy": float(rec[support > 0].mean()) if (support > 0).any() else 0.0}
    for name, v in (("precision", prec), ("recall", rec), ("f1", f1)):
        out[f"macro_{name}"] = float(v.mean()) if v.size else 0.0
        out[f"weighted_{name}"] = float(_div((v * support).sum(), n))
    return out


def compute_metrics(y_true, y_pred, num_classes: int | None = None, class_names: list[str] | None = None,
                    sources=None, top_k: int = 10) -> dict:
    """Everything eval.py writes to metrics.json, as plain Python numbers (JSON-ready).

    Keys: num_samples, class_names, accuracy, balanced_accuracy, {macro,weighted}_{precision,recall,f1},
    per_class (name -> precision, recall, f1, support), per_class_recall (name -> recall),
    confusion_matrix (ints), confusion_matrix_normalized,
    top_confusions, and per_source (source -> n, accuracy, weighted_f1) when `sources`
    (one string per sample, e.g. "mmcows" / "playbehavior") is given.
    """
    if class_names is None:
        if num_classes is None:
            raise ValueError("metrics.py: give num_classes or class_names")
        class_names = [str(i) for i in range(num_classes)]
    class_names = list(class_names)
    if num_classes is None:
        num_classes = len(class_names)
    if len(class_names) != num_classes:
        raise ValueError(f"metrics.py: {len(class_names)} class_names for num_classes={num_classes}")

    cm = confusion_matrix(y_true, y_pred, num_classes)
    prec, rec, f1, support = per_class_prf(cm)
    out = {"num_samples": int(cm.sum()), "class_names": class_names, **_summary(cm)}
    out["per_class"] = {name: {"precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
                               "support": int(support[c])} for c, name in enumerate(class_names)}
    out["per_class_recall"] = {name: float(rec[c]) for c, name in enumerate(class_names)}
    out["confusion_matrix"] = cm.tolist()
    out["confusion_matrix_normalized"] = normalize_rows(cm).tolist()
    out["top_confusions"] = top_confusions(cm, class_names, top_k)

    if sources is not None:
        src = np.asarray(sources).astype(str)
        t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
        if src.shape != t.shape:
            raise ValueError(f"metrics.py: {src.size} sources for {t.size} labels")
        out["per_source"] = {}
        for s in sorted(set(src.tolist())):
            m = _summary(confusion_matrix(t[src == s], p[src == s], num_classes))
            # no per-source macro: a source lacks most classes, and their 0/0 F1s would dilute it
            out["per_source"][s] = {"n": int((src == s).sum()), "accuracy": m["accuracy"],
                                    "weighted_f1": m["weighted_f1"]}
    return out


def format_report(metrics: dict, digits: int = 4) -> str:
    """A classification_report-like table, then the confusion matrix, top confusions and sources."""
    names = metrics["class_names"]
    w = max(len("weighted avg"), *(len(n) for n in names))
    head = f"{'':>{w}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"
    row = lambda name, p, r, f, n: f"{name:>{w}}  {p:>9.{digits}f}  {r:>9.{digits}f}  {f:>9.{digits}f}  {n:>9d}"
    n = metrics["num_samples"]
    lines = [head, ""]
    lines += [row(c, m["precision"], m["recall"], m["f1"], m["support"]) for c, m in metrics["per_class"].items()]
    lines += ["", f"{'accuracy':>{w}}  {'':>9}  {'':>9}  {metrics['accuracy']:>9.{digits}f}  {n:>9d}"]
    if "balanced_accuracy" in metrics:  # = mean recall of the classes present
        lines.append(f"{'balanced acc':>{w}}  {'':>9}  {metrics['balanced_accuracy']:>9.{digits}f}  {'':>9}  {n:>9d}")
    for avg in ("macro", "weighted"):
        lines.append(row(f"{avg} avg", metrics[f"{avg}_precision"], metrics[f"{avg}_recall"],
                         metrics[f"{avg}_f1"], n))

    cm = metrics["confusion_matrix"]
    cw = max(5, len(str(max((max(r) for r in cm), default=0))) + 1)
    lines += ["", "confusion matrix (rows = true, columns = predicted):",
              f"{'':>{w}} " + "".join(f"{j:>{cw}d}" for j in range(len(names)))]
    lines += [f"{name:>{w}} " + "".join(f"{v:>{cw}d}" for v in r) + f"   [{j}]"
              for j, (name, r) in enumerate(zip(names, cm))]
    if metrics.get("top_confusions"):
        lines += ["", "top confusions (true -> predicted: count, share of the true class):"]
        lines += [f"  {c['true']} -> {c['pred']}: {c['count']:,} ({100 * c['fraction']:.1f}%)"
                  for c in metrics["top_confusions"]]
    if metrics.get("per_source"):
        lines += ["", "per source:"]
        lines += [f"  {s}: n={m['n']:,}  accuracy={m['accuracy']:.{digits}f}  weighted_f1={m['weighted_f1']:.{digits}f}"
                  for s, m in metrics["per_source"].items()]
    return "\n".join(lines)
