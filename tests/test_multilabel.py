"""nanopeft/reports/multilabel.py against scikit-learn as the oracle: average precision (ties, all-equal
scores, no positives, perfect ranking), mAP, tuned F1 thresholds (a brute-force grid), and the summary's
micro / macro F1, per-class P/R/F1 and exact match. Each sklearn test skips on its own when sklearn is absent."""

import json
import warnings
from fractions import Fraction

import numpy as np
import pytest

from nanopeft.reports.multilabel import (average_precision, mean_average_precision, multilabel_metrics,
                                         tune_thresholds)


def skm():
    return pytest.importorskip("sklearn.metrics")


def random_case(seed, n=60, c=5, decimals=None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < rng.uniform(0.1, 0.6, c)).astype(int)
    probs = np.clip(0.35 * y + rng.random((n, c)) * 0.7, 0, 1)   # informative, not perfect
    if decimals is not None:
        probs = np.round(probs, decimals)                          # many ties
    return probs, y


# ----------------------------------------------------------------------------- average precision
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_ap_matches_sklearn_random(seed, decimals):
    sk = skm()
    probs, y = random_case(seed, n=40 + 7 * seed, c=3, decimals=decimals)
    for c in range(3):
        if y[:, c].any():
            assert average_precision(probs[:, c], y[:, c]) == pytest.approx(
                sk.average_precision_score(y[:, c], probs[:, c]), abs=1e-12)


@pytest.mark.parametrize("scores, positive, expected", [
    ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 0.5 * 1 + 0.5 * 2 / 3),                # no ties
    ([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1], 0.5 * 1 / 3 + 0.5 * 2 / 4),            # a tied pair: one point
    ([0.5, 0.5, 0.5, 0.5, 0.5], [1, 0, 0, 1, 0], 2 / 5),                        # all equal: prevalence
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),                                  # perfect ranking
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.5 * 1 / 3 + 0.5 * 2 / 4),            # reversed ranking
    ([0.7, 0.7, 0.3, 0.3, 0.3], [1, 0, 1, 0, 1], 1 / 3 * 1 / 2 + 2 / 3 * 3 / 5),  # two tied groups
])
def test_ap_hand_cases(scores, positive, expected):
    got = average_precision(np.array(scores), np.array(positive))
    assert got == pytest.approx(expected, abs=1e-12)
    sk = skm()
    assert got == pytest.approx(sk.average_precision_score(positive, scores), abs=1e-12)


def test_ap_no_positive_is_nan_while_sklearn_warns_and_returns_a_number():
    assert np.isnan(average_precision(np.array([0.1, 0.5, 0.3]), np.array([0, 0, 0])))
    sk = skm()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        v = sk.average_precision_score([0, 0, 0], [0.1, 0.5, 0.3])
    assert np.isfinite(v) and w                       # the module docstring's stated difference (0.0 in 1.9)


# ----------------------------------------------------------------------------- mAP
@pytest.mark.parametrize("seed", range(8))
def test_map_equals_sklearn_macro_when_every_class_has_a_positive(seed):
    sk = skm()
    probs, y = random_case(100 + seed, decimals=[None, 1, 2][seed % 3])
    y[0] = 1                                           # every class has a positive
    m, ap = mean_average_precision(probs, y)
    assert m == pytest.approx(sk.average_precision_score(y, probs, average="macro"), abs=1e-12)
    np.testing.assert_allclose(ap, sk.average_precision_score(y, probs, average=None), atol=1e-12)


def test_map_skips_a_class_without_positives():
    sk = skm()
    probs, y = random_case(7, c=4)
    y[0, :] = 1
    y[:, 2] = 0
    m, ap = mean_average_precision(probs, y)
    assert np.isnan(ap[2]) and not np.isnan(ap[[0, 1, 3]]).any()
    keep = [0, 1, 3]
    assert m == pytest.approx(sk.average_precision_score(y[:, keep], probs[:, keep], average="macro"), abs=1e-12)
    m_none, ap_none = mean_average_precision(probs, np.zeros_like(y))
    assert np.isnan(m_none) and np.isnan(ap_none).all()


# ----------------------------------------------------------------------------- thresholds
def candidates(col):
    u = np.unique(col)
    return np.r_[u.min() - 1.0, (u[:-1] + u[1:]) / 2, u.max() + 1.0]


def exact_f1(pred, pos):
    tp, k, p = int((pred & pos).sum()), int(pred.sum()), int(pos.sum())
    return Fraction(2 * tp, k + p)


@pytest.mark.parametrize("seed", range(10))
def test_tuned_threshold_attains_the_grid_maximum(seed):
    probs, y = random_case(200 + seed, n=50, c=4, decimals=[None, 1, 2][seed % 3])
    y[:, 3] = 0                                        # a class without positives
    th = tune_thresholds(probs, y, fallback=0.37)
    assert th.shape == (4,) and th[3] == 0.37
    for c in range(3):
        pos = y[:, c].astype(bool)
        grid = candidates(probs[:, c])
        f1s = [exact_f1(probs[:, c] >= t, pos) for t in grid]          # exact fractions: ties are ties
        best = max(f1s)
        assert exact_f1(probs[:, c] >= th[c], pos) == best
        # tie rule: the highest candidate threshold among the maximisers
        assert th[c] == pytest.approx(max(t for t, f in zip(grid, f1s) if f == best), abs=1e-12)
    sk = skm()                                         # the same maximum by sklearn's f1_score
    for c in range(3):
        pos, grid = y[:, c].astype(bool), candidates(probs[:, c])
        sk_best = max(sk.f1_score(pos, probs[:, c] >= t, zero_division=0) for t in grid)
        assert sk.f1_score(pos, probs[:, c] >= th[c], zero_division=0) == pytest.approx(sk_best, abs=1e-12)


def test_threshold_hand_cases():
    # perfect separation: the midpoint between the best negative (0.4) and the worst positive (0.6)
    probs = np.array([[0.1, 0.5], [0.4, 0.5], [0.6, 0.5], [0.9, 0.5]])
    y = np.array([[0, 1], [0, 0], [1, 1], [1, 0]])
    th = tune_thresholds(probs, y)
    assert th[0] == pytest.approx(0.5)
    # all-equal scores: "everything positive" (F1 = 2·2/(4+2)) beats "nothing" (0): below the minimum
    assert th[1] < 0.5 and ((probs[:, 1] >= th[1]) == 1).all()
    # F1 of the top k: 2/3, 2/4, 4/5, 4/6 -> top 3, cut between 0.7 and 0.6
    s = np.array([0.9, 0.8, 0.7, 0.6])
    pos = np.array([1, 0, 1, 0])
    assert tune_thresholds(s[:, None], pos[:, None])[0] == pytest.approx(0.65)
    # a tie: top 1 and top 4 both have F1 = 2/3 -> the higher threshold (fewer positives) wins
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    pos = np.array([1, 0, 0, 1, 0, 0])
    assert tune_thresholds(s[:, None], pos[:, None])[0] == pytest.approx(0.85)


# ----------------------------------------------------------------------------- the summary
@pytest.mark.parametrize("seed", range(8))
def test_multilabel_metrics_match_sklearn(seed):
    sk = skm()
    probs, y = random_case(300 + seed, n=45, c=5, decimals=[None, 1][seed % 2])
    y[:, 4] = 0                                        # no positives ...
    probs[:, 4] = np.minimum(probs[:, 4], 0.2)         # ... and (with th 0.5) no predictions: 0/0 F1 = 0
    th = np.r_[tune_thresholds(probs[:, :4], y[:, :4]), 0.5]
    names = [f"c{i}" for i in range(5)]
    out = multilabel_metrics(probs, y, th, names)
    pred = (probs >= th).astype(int)

    assert out["micro_f1"] == pytest.approx(sk.f1_score(y, pred, average="micro", zero_division=0), abs=1e-12)
    assert out["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert out["exact_match"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-12)
    p, r, f, n = sk.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for c, name in enumerate(names):
        pc = out["per_class"][name]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[c], r[c], f[c]), abs=1e-12)
        assert pc["support"] == n[c] and pc["threshold"] == th[c]
    keep = list(range(4))
    assert out["mAP"] == pytest.approx(sk.average_precision_score(y[:, keep], probs[:, keep]), abs=1e-12)
    assert out["per_class_ap"]["c4"] is None
    assert out["per_class_ap"]["c0"] == pytest.approx(sk.average_precision_score(y[:, 0], probs[:, 0]), abs=1e-12)
    assert out["num_images"] == 45


def test_multilabel_metrics_hand_case_score_on_the_threshold_is_positive():
    probs = np.array([[0.5, 0.3], [0.2, 0.3], [0.7, 0.1]])
    y = np.array([[1, 0], [0, 1], [1, 0]])
    out = multilabel_metrics(probs, y, np.array([0.5, 0.3]), ["a", "b"])   # ŷ = [[1, 1], [0, 1], [1, 0]]
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert out["per_class"]["a"]["f1"] == 1.0 and out["per_class"]["b"]["precision"] == 0.5
    assert out["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))
    sk = skm()
    pred = (probs >= [0.5, 0.3]).astype(int)
    assert out["micro_f1"] == pytest.approx(sk.f1_score(y, pred, average="micro", zero_division=0))
    assert out["exact_match"] == pytest.approx(sk.accuracy_score(y, pred))


def test_multilabel_metrics_is_json_safe():
    probs, y = random_case(5, c=3)
    y[:, 1] = 0
    out = multilabel_metrics(np.float32(probs), y, np.array([0.5, 0.5, 0.5], dtype=np.float32), ["a", "b", "c"])
    json.dumps(out, allow_nan=False)                   # raises on nan / numpy scalars

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        else:
            assert v is None or type(v) in (float, int), type(v)
    walk(out)


def test_bad_inputs_raise():
    probs, y = random_case(0, c=3)
    with pytest.raises(ValueError):
        multilabel_metrics(probs, y[:, :2], np.full(3, 0.5), ["a", "b", "c"])
    with pytest.raises(ValueError):
        multilabel_metrics(probs, y, np.full(2, 0.5), ["a", "b", "c"])
    with pytest.raises(ValueError):
        mean_average_precision(probs, y * 2)
