"""nanopeft.reports.metrics against numbers worked out by hand, and against sklearn where it is installed."""

import json
import warnings

import numpy as np
import pytest
import torch

from nanopeft.reports.metrics import compute_metrics, confusion_matrix, format_report, top_confusions

NAMES = ["A", "B", "C"]
# The hand-worked example. Confusion matrix (rows = true, columns = predicted):
#          A  B  C   support
#     A    5  2  1     8
#     B    1  3  0     4
#     C    2  1  4     7
#   pred   8  6  5    19
CM = np.array([[5, 2, 1], [1, 3, 0], [2, 1, 4]])


def _labels_from_cm(cm):
    """y_true / y_pred with exactly the counts of `cm`, shuffled (order must not matter)."""
    pairs = [(t, p) for t in range(len(cm)) for p in range(len(cm)) for _ in range(cm[t, p])]
    pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]
    return np.array([t for t, _ in pairs]), np.array([p for _, p in pairs])


def test_hand_computed_three_classes():
    y_true, y_pred = _labels_from_cm(CM)
    m = compute_metrics(y_true, y_pred, class_names=NAMES)
    assert m["num_samples"] == 19
    assert m["confusion_matrix"] == CM.tolist()
    assert m["accuracy"] == pytest.approx(12 / 19)                      # (5 + 3 + 4) / 19
    # per class: P = TP / column sum, R = TP / row sum, F1 = 2TP / (row + column)
    expected = {"A": (5 / 8, 5 / 8, 10 / 16, 8), "B": (3 / 6, 3 / 4, 6 / 10, 4), "C": (4 / 5, 4 / 7, 8 / 12, 7)}
    for name, (p, r, f, n) in expected.items():
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
        assert got["support"] == n
    assert m["macro_precision"] == pytest.approx((0.625 + 0.5 + 0.8) / 3)             # 0.641667
    assert m["macro_recall"] == pytest.approx((0.625 + 0.75 + 4 / 7) / 3)             # 0.648810
    assert m["macro_f1"] == pytest.approx((0.625 + 0.6 + 2 / 3) / 3)                  # 0.630556
    assert m["weighted_precision"] == pytest.approx((8 * 0.625 + 4 * 0.5 + 7 * 0.8) / 19)   # 0.663158
    assert m["weighted_recall"] == pytest.approx(12 / 19)              # weighted recall == accuracy
    assert m["balanced_accuracy"] == pytest.approx((5 / 8 + 3 / 4 + 4 / 7) / 3)   # mean recall, 0.648810
    assert m["per_class_recall"] == pytest.approx({"A": 5 / 8, "B": 3 / 4, "C": 4 / 7})
    assert m["weighted_f1"] == pytest.approx((8 * 0.625 + 4 * 0.6 + 7 * 2 / 3) / 19)       # 0.635088
    np.testing.assert_allclose(m["confusion_matrix_normalized"],
                               [[5 / 8, 2 / 8, 1 / 8], [1 / 4, 3 / 4, 0], [2 / 7, 1 / 7, 4 / 7]])
    # off-diagonal cells by count, ties by (true, pred) index
    assert [(c["true"], c["pred"], c["count"]) for c in m["top_confusions"]] == [
        ("A", "B", 2), ("C", "A", 2), ("A", "C", 1), ("B", "A", 1), ("C", "B", 1)]
    assert [c["fraction"] for c in m["top_confusions"]] == pytest.approx([2 / 8, 2 / 7, 1 / 8, 1 / 4, 1 / 7])
    assert [c["pred"] for c in top_confusions(CM, NAMES, k=2)] == ["B", "A"]


def test_json_ready_plain_python_types():
    y_true, y_pred = _labels_from_cm(CM)
    m = compute_metrics(torch.from_numpy(y_true), torch.from_numpy(y_pred), class_names=NAMES,
                        sources=["s"] * 19)
    assert json.loads(json.dumps(m)) == m                       # no numpy scalars anywhere
    assert type(m["accuracy"]) is float and type(m["per_class"]["A"]["support"]) is int
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    for k in ("accuracy", "weighted_f1", "macro_f1"):
        assert 0.0 <= m[k] <= 1.0


def test_zero_division_is_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # a RuntimeWarning would fail the test
        # class 2 never true and never predicted; class 1 predicted once too often
        m = compute_metrics([0, 0, 1], [0, 1, 1], num_classes=3)
        assert m["per_class"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        assert m["per_class"]["0"]["f1"] == pytest.approx(2 / 3)   # P 1, R 1/2
        assert m["per_class"]["1"]["f1"] == pytest.approx(2 / 3)   # P 1/2, R 1
        assert m["macro_f1"] == pytest.approx(4 / 9)               # the empty class counts as 0
        assert m["weighted_f1"] == pytest.approx(2 / 3)            # ... but has weight 0 here
        # predicted but never true: precision TP/pred = 0/1, recall 0/0 = 0
        m = compute_metrics([0, 0], [0, 1], num_classes=2)
        assert m["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        # nothing at all
        m = compute_metrics([], [], class_names=NAMES)
        assert m["accuracy"] == 0.0 and m["weighted_f1"] == 0.0 and m["macro_f1"] == 0.0
        assert m["confusion_matrix"] == [[0] * 3] * 3 and m["top_confusions"] == []
        assert m["confusion_matrix_normalized"] == [[0.0] * 3] * 3


def test_per_source():
    #            mmcows: 4 samples, 3 right        play: 3 samples, 1 right
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 0, 2, 1, 1]
    src = ["mm", "mm", "mm", "mm", "play", "play", "play"]
    m = compute_metrics(y_true, y_pred, class_names=NAMES, sources=src)
    assert set(m["per_source"]) == {"mm", "play"}
    mm, play = m["per_source"]["mm"], m["per_source"]["play"]
    assert (mm["n"], play["n"]) == (4, 3)
    assert mm["accuracy"] == pytest.approx(3 / 4) and play["accuracy"] == pytest.approx(1 / 3)
    # mm: A has P 2/3 R 1 -> F1 4/5; B has P 1 R 1/2 -> F1 2/3; weighted (2·4/5 + 2·2/3) / 4
    assert mm["weighted_f1"] == pytest.approx((2 * 0.8 + 2 * 2 / 3) / 4)
    # play: C has P 1 R 1/3 -> F1 1/2, the only true class; B's wrong predictions have no weight
    assert play["weighted_f1"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(4 / 7)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="y_pred holds labels outside"):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 3"):
        confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_matrix(np.array([0.0, 1.0]), [0, 1], 3)
    with pytest.raises(ValueError, match="class_names"):
        compute_metrics([0], [0], num_classes=2, class_names=NAMES)
    with pytest.raises(ValueError, match="sources"):
        compute_metrics([0, 1], [0, 1], class_names=NAMES, sources=["a"])


def test_format_report():
    y_true, y_pred = _labels_from_cm(CM)
    src = np.where(y_true == 1, "play", "mm")
    text = format_report(compute_metrics(y_true, y_pred, class_names=NAMES, sources=src))
    lines = text.splitlines()
    row = lambda label: next(l.split() for l in lines if l.strip().startswith(label + " "))
    assert row("A") == ["A", "0.6250", "0.6250", "0.6250", "8"]
    assert row("C") == ["C", "0.8000", "0.5714", "0.6667", "7"]
    assert row("accuracy") == ["accuracy", "0.6316", "19"]
    assert row("balanced acc") == ["balanced", "acc", "0.6488", "19"]
    assert row("macro avg") == ["macro", "avg", "0.6417", "0.6488", "0.6306", "19"]
    assert row("weighted avg") == ["weighted", "avg", "0.6632", "0.6316", "0.6351", "19"]
    assert "A -> B: 2 (25.0%)" in text and "C -> A: 2 (28.6%)" in text
    assert any(l.split()[:4] == ["C", "2", "1", "4"] for l in lines)   # a confusion-matrix row
    assert "play: n=4  accuracy=0.7500" in text


def test_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    C = 6
    y_true = rng.integers(0, C - 1, size=500)                    # class 5 is never true ...
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, C, size=500))
    y_pred[y_pred == 3] = 2                                      # ... and class 3 never predicted
    src = rng.choice(["mmcows", "playbehavior"], size=500)
    labels = list(range(C))
    m = compute_metrics(y_true, y_pred, num_classes=C, sources=src)

    assert m["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    # class 5 never occurs: sklearn averages the recall of the 5 present classes, as we do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    assert list(m["per_class_recall"].values()) == pytest.approx(
        sk.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0))
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for c in range(C):
        got = m["per_class"][str(c)]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[c], r[c], f[c]))
        assert got["support"] == s[c]
    for avg in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                        zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((p, r, f))
    np.testing.assert_allclose(m["confusion_matrix_normalized"],
                               np.nan_to_num(sk.confusion_matrix(y_true, y_pred, labels=labels, normalize="true")))
    for s_name, got in m["per_source"].items():
        sel = src == s_name
        assert got["accuracy"] == pytest.approx(sk.accuracy_score(y_true[sel], y_pred[sel]))
        assert got["weighted_f1"] == pytest.approx(
            sk.f1_score(y_true[sel], y_pred[sel], average="weighted", zero_division=0))


def test_balanced_accuracy_under_imbalance():
    """95 % of one class, always predicted: accuracy 0.95, balanced accuracy 0.5 (the rare class's recall is 0)."""
    y_true = np.array([0] * 95 + [1] * 5)
    m = compute_metrics(y_true, np.zeros(100, dtype=int), class_names=["lying", "gallop"])
    assert m["accuracy"] == pytest.approx(0.95)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class_recall"] == {"lying": 1.0, "gallop": 0.0}
    # a class absent from y_true is left out of the balanced mean, kept at 0 in the macro recall
    m = compute_metrics([0, 0, 1], [0, 1, 1], class_names=["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_balanced_accuracy_matches_sklearn_with_a_missing_class():
    sk = pytest.importorskip("sklearn.metrics")
    y_true, y_pred = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 2])
    m = compute_metrics(y_true, y_pred, num_classes=4)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
