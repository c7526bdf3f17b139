"""Prior-shift correction: the adjustment formula, Saerens et al.'s EM on synthetic posteriors, prior files."""

import json

import numpy as np
import pytest

from nanopeft.prior import adjust_posteriors, check_method, correct, em_priors, read_priors


def synthetic_posteriors(test_priors, n=20000, seed=0, sep=1.5):
    """Exact Bayes posteriors of 1-D Gaussian classes (means 0, sep, 2·sep, ...; unit variance) under
    uniform training priors, for samples drawn with `test_priors`: the setting EM is derived for."""
    rng = np.random.default_rng(seed)
    C = len(test_priors)
    mu = sep * np.arange(C)
    y = rng.choice(C, size=n, p=test_priors)
    x = rng.normal(mu[y], 1.0)
    loglik = -0.5 * (x[:, None] - mu[None, :]) ** 2          # (N, C), + a constant
    p = np.exp(loglik - loglik.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def test_adjust_is_bayes_rule():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    out = adjust_posteriors(p, [0.5, 0.5], [0.2, 0.8])
    # row 0: 0.5·0.4 : 0.5·1.6 = 0.2 : 0.8; row 1: 0.9·0.4 : 0.1·1.6 = 0.36 : 0.16
    np.testing.assert_allclose(out, [[0.2, 0.8], [0.36 / 0.52, 0.16 / 0.52]])
    np.testing.assert_allclose(adjust_posteriors(p, [0.3, 0.7], [0.3, 0.7]), p)  # no shift: unchanged


@pytest.mark.parametrize("priors", [[0.39, 0.33, 0.2, 0.077, 0.003], [0.05, 0.05, 0.1, 0.2, 0.6]])
def test_em_recovers_a_known_shift(priors):
    p, y = synthetic_posteriors(np.array(priors))
    est, iters = em_priors(p, np.full(5, 0.2))
    empirical = np.bincount(y, minlength=5) / len(y)
    assert np.abs(est - empirical).max() < 0.02, (est, empirical)
    assert np.abs(est - np.array(priors)).max() < 0.02
    assert 1 < iters < 1000
    # the raw posteriors' mean (EM's first M-step) is several times further off: EM did the work
    assert np.abs(p.mean(0) - empirical).max() > 3 * np.abs(est - empirical).max()


def test_correction_raises_accuracy_under_shift():
    priors = np.array([0.7, 0.2, 0.07, 0.03])
    p, y = synthetic_posteriors(priors, n=5000, seed=1)
    corrected, info = correct(p, "em", np.full(4, 0.25), ["a", "b", "c", "d"])
    assert info["method"] == "em" and set(info["priors"]) == {"a", "b", "c", "d"}
    assert (corrected.argmax(1) == y).mean() > (p.argmax(1) == y).mean() + 0.05
    same, none = correct(p, "none", np.full(4, 0.25), ["a", "b", "c", "d"])
    assert none is None and np.array_equal(same, p)


def test_prior_file(tmp_path):
    f = tmp_path / "priors.json"
    f.write_text(json.dumps({"b": 30, "a": 10}))
    np.testing.assert_allclose(read_priors(f, ["a", "b"]), [0.25, 0.75])
    p = np.array([[0.5, 0.5]])
    out, info = correct(p, str(f), [0.5, 0.5], ["a", "b"])
    np.testing.assert_allclose(out, [[0.25, 0.75]])
    assert info["method"] == "file" and info["priors"] == {"a": 0.25, "b": 0.75}


@pytest.mark.parametrize("content, match", [
    ('{"a": 1}', "no share for class"), ('{"a": 1, "b": 1, "z": 1}', "unknown class"),
    ('{"a": -1, "b": 1}', "non-negative"), ('{"a": "x", "b": 1}', "non-negative"),
    ('{"a": 0, "b": 0}', "all 0"), ("[1, 2]", "JSON object"), ("{oops", "not valid JSON")])
def test_bad_prior_files_are_named(tmp_path, content, match):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        read_priors(f, ["a", "b"])
    assert str(f) in str(e.value)


def test_check_method(tmp_path):
    assert check_method("em") == "em" and check_method("none") == "none"
    with pytest.raises(ValueError, match="'none', 'em' or a JSON file"):
        check_method(str(tmp_path / "missing.json"))
