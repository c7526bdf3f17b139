"""nanopeft/probes.py: the linear probe is the regularised logistic regression it claims, the k-NN votes as
DINO's evaluation does, and probe runs go through eval.py, predict.py, export.py and load_classifier."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanopeft.probes import KNNProbe, fit_linear_probe, fit_logistic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

FAST = ["--image-size", "32", "--workers", "0", "--eval-batch-size", "16", "--device", "cpu"]


def blobs(n, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    return centres[y] + torch.randn(n, d, generator=g), y


def test_logistic_fit_is_the_regularised_optimum():
    f, y = blobs(90)
    f = f.double()
    for lam in (1e-3, 1.0):
        W, c = fit_logistic(f, y, 3, lam)
        W, c = W.clone().requires_grad_(), c.clone().requires_grad_()
        loss = F.cross_entropy(f @ W.T + c, y) + 0.5 * lam * (W * W).sum()
        gW, gc = torch.autograd.grad(loss, (W, c))
        assert gW.abs().max() < 1e-6 and gc.abs().max() < 1e-6  # stationary: the unique optimum (convex)


def test_linear_probe_folds_the_standardisation_and_picks_lambda_on_val():
    f, y = blobs(120)
    fv, yv = blobs(60, seed=1)
    probe, info = fit_linear_probe(f, y, fv, yv, 3)
    mu, sd = f.double().mean(0), f.double().std(0)
    W, c = fit_logistic((f.double() - mu) / sd, y, 3, info["lambda"])
    want = ((fv.double() - mu) / sd) @ W.T + c
    assert (probe(fv).double() - want).abs().max() < 1e-4
    best = info["grid"][f"{info['lambda']:g}"]["val_accuracy"]
    assert best == max(g["val_accuracy"] for g in info["grid"].values()) and len(info["grid"]) == 8


def test_knn_votes_as_dino_weights_them():
    bank, labels = blobs(40, seed=2)
    q, _ = blobs(5, seed=3)
    knn = KNNProbe(bank, labels, 3, k=7, t=0.07)
    got = knn(q).exp()
    for i in range(5):  # by hand: the 7 most similar bank rows vote exp(cos / T) for their class
        cos = F.cosine_similarity(q[i][None], bank)
        top = cos.argsort(descending=True)[:7]
        scores = torch.zeros(3)
        for j in top:
            scores[labels[j]] += torch.exp(cos[j] / 0.07)
        assert torch.allclose(got[i], scores / scores.sum(), atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(5))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear-probe", "knn"])
def test_probe_runs_go_through_every_script(tmp_path, train_images, tiny_ckpt, method, capsys):
    import eval as evaluate
    import export
    import predict
    from nanopeft.inference.export import load_classifier

    weights = tiny_ckpt(gated=True)[0]
    out = tmp_path / "run"
    s = train.main(["--out", str(out), "--method", method, "--weights", str(weights), "--data", str(train_images),
                    *FAST, "--knn-k", "5"])
    assert (out / "probe.safetensors").is_file() and (out / "val_logits.safetensors").is_file()
    assert s["best_epoch"] == 1 and 0 <= s["best_val_accuracy"] <= 1 and "fitted in" in (out / "train.log").read_text()
    with pytest.raises(SystemExit) as done:  # a finished probe: --resume says so and exits 0
        train.main(["--resume", str(out)])
    assert done.value.code == 0
    test = train_images
    m = evaluate.main(["--run", str(out), "--data", str(test), "--workers", "0", "--speed-reps", "0", "--out",
                       str(tmp_path / "e/")])
    ev = {r["path"]: (r["prediction"], float(r["confidence"])) for r in csv.DictReader(open(tmp_path / "e" / "predictions.csv"))}
    export.main(["--run", str(out), "--out", str(tmp_path / "x")])
    for name, src in (("run", ["--run", str(out)]), ("export", ["--model", str(tmp_path / "x")])):
        predict.main([*src, "--data", str(test), "--out", str(tmp_path / f"{name}.csv"), "--workers", "0"])
        got = {r["path"]: (r["label"], float(r["prob"])) for r in csv.DictReader(open(tmp_path / f"{name}.csv"))}
        assert all(got[p][0] == ev[p][0] and abs(got[p][1] - ev[p][1]) < 1e-4 for p in ev), name
    model = load_classifier(tmp_path / "x")
    assert model.class_names == json.loads((out / "config.json").read_text())["class_names"]
    assert m["adapter_epoch"] == 1
    if method == "knn":  # vote shares are no logits: calibration is refused in one line
        capsys.readouterr()
        with pytest.raises(SystemExit):
            evaluate.main(["--run", str(out), "--data", str(test), "--workers", "0", "--speed-reps", "0",
                           "--calibration", "ts", "--out", str(tmp_path / "c/")])
        assert "k-NN" in capsys.readouterr().err
    else:  # (a tiny validation split the probe gets all right has no calibration: make it harder)
        from nanopeft.calibration import read_val_logits, save_val_logits

        z, y, paths, ident = read_val_logits(out)
        save_val_logits(out, torch.cat([z, z]), torch.cat([y, (y + 1) % 3]), paths + paths, ident)
        m = evaluate.main(["--run", str(out), "--data", str(test), "--workers", "0", "--speed-reps", "0",
                           "--calibration", "ts", "--out", str(tmp_path / "c/")])
        assert m["calibration"]["kind"] == "ts"


@pytest.mark.slow
def test_knn_bank_gathered_from_two_processes_equals_one(tmp_path, train_images, tiny_ckpt):
    from safetensors.torch import load_file

    weights = tiny_ckpt(gated=True)[0]
    common = ["--method", "knn", "--weights", str(weights), "--data", str(train_images), *FAST, "--quant", "none"]
    train.main(["--out", str(tmp_path / "one"), *common])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train.py"), "--out", str(tmp_path / "two"), *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "probe.safetensors"), load_file(tmp_path / "two" / "probe.safetensors")
    assert torch.equal(a["labels"], b["labels"]) and (a["bank"] - b["bank"]).abs().max() < 1e-5


def test_knn_votes_in_fp32_under_autocast():
    bank, labels = blobs(30, seed=4)
    knn = KNNProbe(bank, labels, 3, k=5)
    q, _ = blobs(4, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = knn(q)
    assert got.dtype == torch.float32 and torch.allclose(got, knn(q))


def test_probes_refuse_what_they_cannot_honour():
    from nanopeft.config import TrainConfig

    for field, value in (("class_weights", "balanced"), ("sampler", "balanced"), ("cache_features", "no")):
        with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} {value}: --method knn"):
            TrainConfig(method="knn", **{field: value}).resolved()
