"""nanopeft/calibration.py: TS / BCTS / VS fitted as an independent SciPy fit of the same NLL finds them,
calibrated EM under known label shift (synthetic posteriors with a known answer), the calibration metrics,
the stratified bootstrap, and eval.py's use of the run's stored validation logits."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanopeft.calibration import (Calibrator, bootstrap_intervals, brier, calibrate, choose, ece, fit, nll,
                                  reliability_bins, with_interval, _scores)
from nanopeft.reports.metrics import compute_metrics
from nanopeft.prior import correct

MEANS = np.array([-3.0, -1.0, 1.0, 3.0])  # x | y=k ~ N(MEANS[k], 1): a strong 4-class classifier


def true_logits(x, priors):
    """The Bayes posterior's logits under `priors`: log N(x; m_k, 1) + log π_k (up to a constant)."""
    return MEANS[None] * x[:, None] - MEANS[None] ** 2 / 2 + np.log(priors)[None]


def sample(rng, n, priors):
    y = rng.choice(len(MEANS), size=n, p=priors)
    return rng.normal(MEANS[y], 1.0), y


T0, B0 = 3.0, np.array([0.8, -0.5, 0.3, -0.6])  # the "network": under-confident (like T = 0.30 fitted on real photos) and biased


def network(x):
    return true_logits(x, np.full(4, 0.25)) / T0 + B0


# ----------------------------------------------------------------------------- the fits
def scipy_fit(kind, z, y):
    """An independent float64 fit of the same NLL: SciPy's L-BFGS-B on numpy code written here."""
    optimize, special = pytest.importorskip("scipy.optimize"), pytest.importorskip("scipy.special")
    zc = z - z.mean(1, keepdims=True)
    K = z.shape[1]

    def loss(theta):
        a = theta[:K] if kind == "vs" else theta[0]
        b = theta[-K:] if kind != "ts" else 0.0
        g = zc * a + b
        return -(g[np.arange(len(y)), y] - special.logsumexp(g, axis=1)).mean()

    start = np.r_[np.ones(K if kind == "vs" else 1), np.zeros(0 if kind == "ts" else K)]
    res = optimize.minimize(loss, start, method="L-BFGS-B", options=dict(ftol=1e-15, gtol=1e-11, maxiter=5000))
    return res.x, res.fun


@pytest.mark.parametrize("kind", ["ts", "bcts", "vs"])
def test_each_fit_equals_an_independent_scipy_fit(kind):
    rng = np.random.default_rng(0)
    x, y = sample(rng, 1200, np.full(4, 0.25))
    z = network(x)
    ours = fit(kind, z, y)
    theta, best = scipy_fit(kind, z, y)
    assert ours.nll["after"] == pytest.approx(best, abs=1e-9) and ours.nll["after"] < ours.nll["before"]
    if kind in ("ts", "bcts"):
        assert ours.T == pytest.approx(1 / theta[0], rel=1e-4)
    if kind != "ts":
        b = theta[-4:] - theta[-4:].mean()
        np.testing.assert_allclose(ours.b, b, atol=1e-4)
    if kind == "vs":
        np.testing.assert_allclose(ours.w, theta[:4], rtol=1e-4)
    if kind == "bcts":  # the distortion undone: T ≈ 1/T0's inverse, b ≈ −B0·T (centred)
        assert ours.T == pytest.approx(1 / T0, rel=0.1)
        np.testing.assert_allclose(ours.b, -(B0 - B0.mean()) / ours.T, atol=0.3)


def test_a_free_bias_makes_the_mean_calibrated_posterior_the_class_frequencies():
    rng = np.random.default_rng(1)
    x, y = sample(rng, 800, np.array([0.4, 0.3, 0.2, 0.1]))
    z = torch.from_numpy(network(x))
    for kind in ("bcts", "vs"):
        p = fit(kind, z, y).apply(z).softmax(-1).mean(0).numpy()
        np.testing.assert_allclose(p, np.bincount(y, minlength=4) / len(y), atol=1e-6)


def test_auto_picks_the_lowest_cross_validated_nll_and_says_so():
    rng = np.random.default_rng(2)
    x, y = sample(rng, 1000, np.full(4, 0.25))
    c, why = choose(network(x), y)
    assert c.kind in ("bcts", "vs") and "cross-validated" in why and c.kind in why.split(":")[1].split("(")[0]
    cv = c.nll["cross_validated"]
    assert set(cv) == {"none", "ts", "bcts", "vs"} and cv[c.kind] == min(cv.values())
    assert Calibrator.from_dict(json.loads(json.dumps(c.to_dict()))).apply(torch.zeros(1, 4)).shape == (1, 4)


def test_a_class_without_validation_images_rules_out_its_bias():
    z, y = np.random.default_rng(3).normal(size=(40, 3)), np.array([0, 1] * 20)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no validation image"):
        calibrate("bcts", z, y)
    c, why = calibrate("auto", z, y)
    assert c.kind in ("none", "ts") and "bcts, vs left out: a class has no validation image" in why


# ----------------------------------------------------------------------------- label shift, known answer
SHIFTS = {"skewed": np.array([0.70, 0.20, 0.07, 0.03]), "study-like": np.array([0.39, 0.33, 0.27, 0.01]),
          "98:1": np.array([0.882, 0.05, 0.059, 0.009])}


def em_runs(seed, target, n_val=400, n_test=20000):
    """Raw, uncalibrated EM, and BCTS-calibrated EM (source priors = mean calibrated validation posterior)
    -> {name: (estimated priors or None, accuracy)}."""
    rng = np.random.default_rng(seed)
    xv, yv = sample(rng, n_val, np.full(4, 0.25))
    xt, yt = sample(rng, n_test, target)
    zv, zt = network(xv), network(xt)
    raw = torch.from_numpy(zt).softmax(-1).numpy()
    uncal, info_u = correct(raw, "em", np.full(4, 0.25), list("abcd"))
    c = fit("bcts", zv, yv)
    cal = c.apply(zt).softmax(-1).numpy()
    source = c.apply(zv).softmax(-1).mean(0).numpy()
    fixed, info_c = correct(cal, "em", source, list("abcd"))
    acc = lambda p: float((p.argmax(1) == yt).mean())  # noqa: E731
    pri = lambda info: np.array(list(info["priors"].values()))  # noqa: E731
    return {"raw": (None, acc(raw)), "em": (pri(info_u), acc(uncal)), "bcts+em": (pri(info_c), acc(fixed)),
            "bcts": (None, acc(cal))}


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_calibrated_em_recovers_the_priors_and_raises_accuracy_under_shift(shift):
    q = SHIFTS[shift]
    for seed in range(3):
        r = em_runs(seed, q)
        err_cal, err_uncal = np.abs(r["bcts+em"][0] - q).sum(), np.abs(r["em"][0] - q).sum()
        assert err_cal < err_uncal and err_cal < 0.05, (seed, err_cal, err_uncal)
        assert r["bcts+em"][1] > r["raw"][1] and r["bcts+em"][1] > r["em"][1], (seed, r)


def test_calibrated_em_on_a_balanced_test_set_costs_no_more_than_noise():
    for seed in range(3):
        r = em_runs(seed, np.full(4, 0.25))
        # within a point of the calibrated accuracy (the target), far above raw; the priors found stay
        # within the noise of 100 validation images a class
        assert r["bcts+em"][1] >= r["bcts"][1] - 0.01 and r["bcts+em"][1] > r["raw"][1], r
        assert np.abs(r["bcts+em"][0] - 0.25).sum() < 0.15 < np.abs(r["em"][0] - 0.25).sum(), r


# ----------------------------------------------------------------------------- metrics
def test_nll_brier_and_equal_mass_ece_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1])
    assert nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    assert brier(p, y) == pytest.approx(np.mean([0.02, 0.72, 0.18, 0.08]))
    bins = reliability_bins(p, y, bins=2)  # confidences 0.9, 0.6, 0.7, 0.8 -> {0.6, 0.7}, {0.8, 0.9}
    assert [b["n"] for b in bins] == [2, 2] and bins[0]["confidence"] == pytest.approx(0.65)
    assert bins[0]["accuracy"] == 0.5 and bins[1]["accuracy"] == 1.0
    assert ece(p, y, bins=2) == pytest.approx(0.5 * 0.15 + 0.5 * 0.15)


def test_bootstrap_intervals_are_stratified_and_score_as_metrics_py():
    rng = np.random.default_rng(4)
    y = rng.choice(3, size=3000, p=[0.7, 0.25, 0.05])
    pred = np.where(rng.random(3000) < 0.8, y, rng.integers(0, 3, 3000))
    m = compute_metrics(y, pred, num_classes=3)
    cm = np.array(m["confusion_matrix"])
    s = _scores(cm[None])
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert s[key][0] == pytest.approx(m[key])
    ci = bootstrap_intervals(y, pred, 3)
    assert ci == bootstrap_intervals(y, pred, 3)  # seeded
    for key, (lo, hi) in ci.items():
        assert lo < m[key] < hi
    se = np.sqrt(m["accuracy"] * (1 - m["accuracy"]) / 3000)  # the normal approximation, for scale
    assert 0.7 < (ci["accuracy"][1] - ci["accuracy"][0]) / (2 * 1.96 * se) < 1.3
    assert with_interval(0.83164, [0.83012, 0.83311]) == "0.8316 [0.8301, 0.8331]"


# ----------------------------------------------------------------------------- eval.py with a run
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def harder_copy(run0, tmp_path, name="harder"):
    """A copy of a tiny run whose six validation images the model gets all right, which leaves no
    calibration to fit (T -> 0): its stored logits twice over, the copies labelled one class on."""
    import shutil

    from nanopeft.calibration import read_val_logits, save_val_logits
    from nanopeft.files.save import adapter_identity

    run = tmp_path / name
    shutil.copytree(run0, run)
    z, y, paths, _ = read_val_logits(run)
    save_val_logits(run, torch.cat([z, z]), torch.cat([y, (y + 1) % 3]), paths + paths,
                    adapter_identity(run / "adapter")[0])
    return run


@pytest.mark.slow
def test_eval_calibrates_on_the_stored_validation_logits(tiny_run, tmp_path, capsys):
    import shutil

    import eval as evaluate
    from nanopeft.calibration import read_val_logits
    from nanopeft.data.folders import make_demo_dataset, training_pool
    from nanopeft.inference.predict import read_run, run_classifier

    run = tmp_path / "run"
    shutil.copytree(tiny_run("lora"), run)
    cfg, saved = read_run(run)
    z, y, paths, _ = read_val_logits(run)
    _, val, _ = training_pool(cfg.data, cfg.val_fraction, cfg.split_seed)
    assert paths == [s.path for s in val] and y.tolist() == [s.label for s in val]
    model, _ = run_classifier(run, torch.device("cpu"))  # the kept adapter, merged: the same logits
    from nanopeft.data.folders import ImageDataset

    x = torch.stack([ImageDataset(val, image_size=32)[i][0] for i in range(len(val))])
    with torch.no_grad():
        assert (model(x) - z).abs().max() < 1e-3
    from nanopeft.calibration import save_val_logits
    from nanopeft.files.save import adapter_identity

    # six validation images are easy to get all right, and then no calibration exists (T -> 0): the stored
    # logits twice over, the copies labelled one class on, give the fits a minimum to find
    save_val_logits(run, torch.cat([z, z]), torch.cat([y, (y + 1) % 3]), paths + paths,
                    adapter_identity(run / "adapter")[0])
    test = make_demo_dataset(tmp_path / "test", num_classes=3, per_class=4, size=(40, 32), seed=9)
    args = ["--run", str(run), "--data", str(test), "--workers", "0", "--speed-reps", "0"]
    m = evaluate.main([*args, "--calibration", "bcts", "--prior-correction", "em", "--out", str(tmp_path / "e/")])
    out = capsys.readouterr().out
    assert m["calibration"]["kind"] == "bcts" and len(m["calibration"]["b"]) == 3 and m["calibration"]["T"] > 0
    assert set(m["calibration_metrics"]) == {"uncalibrated", "calibrated", "prior-corrected"}
    assert set(m["calibration_metrics"]["calibrated"]) == {"nll", "brier", "ece"}
    assert m["prior_correction"]["posteriors"] == "bcts-calibrated" and "accuracy" in m["calibrated"]
    assert all(lo <= m[k] <= hi for k, (lo, hi) in m["intervals"].items())
    assert (tmp_path / "e" / "reliability_diagram.png").is_file() and "calibration bcts: T = " in out
    assert f"accuracy {with_interval(m['accuracy'], m['intervals']['accuracy'])}" in out
    # em alone: calibration auto, saying which and why
    m = evaluate.main([*args, "--prior-correction", "em", "--out", str(tmp_path / "a/")])
    assert "calibration auto: " in capsys.readouterr().out and m["calibration"]["kind"] in ("none", "ts", "bcts", "vs")
    # refused: a calibrator scoring its own fitting data; logits of another adapter
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(run), "--split", "val", "--calibration", "ts", "--workers", "0", "--speed-reps", "0"])
    assert "its own fitting data" in capsys.readouterr().err
    save_val_logits(run, z, y, paths, "another")
    with pytest.raises(SystemExit):
        evaluate.main([*args, "--calibration", "ts", "--out", str(tmp_path / "b/")])
    assert "written for other weights" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_and_export_use_the_same_calibration_as_eval(tiny_run, tmp_path, capsys):
    import csv

    import eval as evaluate
    import export
    import predict
    from nanopeft.calibration import fold_into_head
    from nanopeft.inference.predict import run_calibration
    from nanopeft.data.folders import make_demo_dataset
    from nanopeft.inference.export import load_classifier
    from nanopeft.inference.predict import run_classifier

    run = harder_copy(tiny_run("lora"), tmp_path)
    cal, _, source = run_calibration(run, "bcts")
    model, _ = run_classifier(run, torch.device("cpu"))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = cal.apply(model(x)).float()
        fold_into_head(model.head, cal)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-4)  # the affine map, folded into the last Linear
    data = make_demo_dataset(tmp_path / "imgs", num_classes=3, per_class=3, size=(40, 32), seed=7)
    m = evaluate.main(["--run", str(run), "--data", str(data), "--calibration", "bcts", "--workers", "0",
                       "--speed-reps", "0", "--out", str(tmp_path / "e/")])
    ev = {r["path"]: float(r["confidence_calibrated"]) for r in csv.DictReader(open(tmp_path / "e" / "predictions.csv"))}
    export.main(["--run", str(run), "--out", str(tmp_path / "x"), "--calibration", "bcts"])
    conf = json.loads((tmp_path / "x" / "config.json").read_text())["nanopeft"]
    assert conf["calibration"]["kind"] == "bcts" and conf["calibration"]["T"] == pytest.approx(m["calibration"]["T"])
    np.testing.assert_allclose(conf["train_priors"], source, atol=1e-9)
    assert load_classifier(tmp_path / "x").calibration["kind"] == "bcts"
    for name, src in (("run", ["--run", str(run), "--calibration", "bcts"]), ("export", ["--model", str(tmp_path / "x")])):
        predict.main([*src, "--data", str(data), "--out", str(tmp_path / f"{name}.csv"), "--workers", "0"])
        got = {r["path"]: float(r["prob"]) for r in csv.DictReader(open(tmp_path / f"{name}.csv"))}
        assert got.keys() == ev.keys() and max(abs(got[p] - ev[p]) for p in ev) < 1e-4, name
    with pytest.raises(SystemExit):  # resuming with another calibration would mix two models' answers
        predict.main(["--run", str(run), "--data", str(data), "--out", str(tmp_path / "run.csv"), "--workers", "0"])
    assert "calibration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--model", str(tmp_path / "x"), "--calibration", "ts", "--data", str(data), "--out",
                      str(tmp_path / "y.csv"), "--workers", "0"])
    assert "export.py --calibration" in capsys.readouterr().err


def test_separable_validation_logits_have_no_calibration_and_auto_says_so():
    z = torch.eye(3).repeat(10, 1) * 5.0  # every validation image right, by a margin
    y = torch.arange(3).repeat(10)
    with pytest.raises(ValueError, match="NLL has no minimum"):
        calibrate("ts", z, y)
    c, why = calibrate("auto", z, y)
    assert c.kind == "none" and "ts left out: the map classifies every fitting image correctly" in why


def test_folds_are_even_and_stratified_even_with_one_image_per_class():
    from nanopeft.calibration import cross_validated_nll, folds_of

    f = folds_of(np.repeat(np.arange(3), 7), 5)
    assert sorted(np.bincount(f).tolist()) == [4, 4, 4, 4, 5]
    f1 = folds_of(np.arange(6), 5)  # one image per class: still five folds, none empty
    assert set(f1.tolist()) == set(range(5))
    z = np.random.default_rng(0).normal(size=(6, 6))
    assert cross_validated_nll("none", z, np.arange(6)) > 0  # every item scored once, not 0 / n


@pytest.mark.slow
def test_an_ensemble_calibrates_its_averaged_logits(tiny_run, tmp_path):
    import eval as evaluate
    from nanopeft.calibration import read_val_logits
    from nanopeft.data.folders import make_demo_dataset

    a, b = harder_copy(tiny_run("lora"), tmp_path, "a"), harder_copy(tiny_run("dora"), tmp_path, "b")
    (za, y, _, _), (zb, _, _, _) = read_val_logits(a), read_val_logits(b)
    test = make_demo_dataset(tmp_path / "test", num_classes=3, per_class=2, size=(40, 32), seed=2)
    m = evaluate.main(["--ensemble", str(a), str(b), "--data", str(test), "--calibration", "ts", "--workers", "0",
                       "--speed-reps", "0", "--out", str(tmp_path / "e/")])
    assert m["calibration"]["T"] == pytest.approx(fit("ts", (za.double() + zb.double()) / 2, y).T, rel=1e-6)
