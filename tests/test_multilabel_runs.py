"""--task multilabel through train.py and eval.py: a CSV manifest path,labels (the demo's multi-label variant:
each image's shape and colour), BCE, the kept epoch by validation mAP, per-class thresholds tuned on the
validation logits, and metrics.json against scikit-learn; the single-label settings without a multi-label
meaning refused in one line."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluate  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from nanopeft import load_classifier  # noqa: E402
from nanopeft.data.folders import make_demo_dataset, multilabel_manifest, scan_dataset  # noqa: E402

FLAGS = ["--task", "multilabel", "--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0",
         "--lr", "1e-3", "--rank", "4", "--epochs", "2"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    train_csv = multilabel_manifest(make_demo_dataset(root / "train", num_classes=6, per_class=8, size=(40, 32), seed=0))
    test_csv = multilabel_manifest(make_demo_dataset(root / "test", num_classes=6, per_class=4, size=(40, 32), seed=1))
    return train_csv, test_csv


def test_manifest_reads_label_sets(manifests):
    items, names = scan_dataset(manifests[0], multilabel=True)
    assert names == ["hue0", "hue1", "hue2", "hue3", "hue4", "hue5", "shape0", "shape1", "shape2"]
    assert any(s.label == () for s in items) and all(len(s.label) in (0, 2) for s in items)  # empty field: none
    with pytest.raises(ValueError, match="--task multilabel"):  # a labels column read as single-label
        scan_dataset(manifests[0])


def test_multilabel_run_end_to_end(manifests, tiny_ckpt, tmp_path):
    skm = pytest.importorskip("sklearn.metrics")
    run = tmp_path / "run"
    train.main(["--weights", str(tiny_ckpt()[0]), "--data", str(manifests[0]), "--out", str(run),
                "--class-weights", "balanced", *FLAGS])
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["task"] == "multilabel" and cfg["select_metric"] == "val_map"  # the default for multi-label
    epochs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"val_map"' in l]
    assert len(epochs) == 2 and all(0 <= e["val_map"] <= 1 for e in epochs)
    m = evaluate.main(["--run", str(run), "--data", str(manifests[1]), "--out", str(tmp_path / "e/"), "--workers", "0",
                       "--speed-reps", "0"])
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    names = list(m["per_class_ap"])
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    y = np.array([[n in r["labels"].split(";") for n in names] for r in rows], dtype=int)
    pred = np.array([[n in r["predicted"].split(";") for n in names] for r in rows], dtype=int)
    assert m["mAP"] == pytest.approx(skm.average_precision_score(y, probs, average="macro"), abs=1e-5)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)
    assert m["exact_match"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
    thresholds = np.array([m["thresholds"][n] for n in names])  # each class's own, from the validation split
    far = np.abs(probs - thresholds) > 1e-6  # (the CSV rounds probabilities to 6 decimals)
    assert np.array_equal(pred[far], (probs >= thresholds).astype(int)[far]) and len(set(thresholds.tolist())) > 1
    # predict.py (the run, and its export: the thresholds travel) writes each image's labels over the thresholds
    out = export.main(["--run", str(run), "--out", str(tmp_path / "x")])
    assert load_classifier(out).thresholds == pytest.approx(thresholds.tolist())
    got = {}
    for name, src in (("run", ["--run", str(run)]), ("export", ["--model", str(out)])):
        predict.main([*src, "--data", str(manifests[1]), "--out", str(tmp_path / f"{name}.csv"), "--workers", "0"])
        got[name] = {Path(r["path"]).parts[-2:]: r["labels"] for r in csv.DictReader(open(tmp_path / f"{name}.csv"))}
    assert got["run"] == got["export"] == {Path(r["path"]).parts[-2:]: r["predicted"] for r in rows}  # eval.py's
    with pytest.raises(SystemExit):
        predict.main(["--run", str(run), "--data", str(manifests[1]), "--out", str(tmp_path / "q.csv"),
                      "--prior-correction", "em"])


@pytest.mark.parametrize("flags,words", [(["--sampler", "balanced"], "--class-weights balanced"),
                                         (["--method", "linear-probe"], "single-label probe"),
                                         (["--method", "frozen"], "--cache-features no")])
def test_single_label_settings_refused(flags, words, manifests, tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--weights", str(tiny_ckpt()[0]), "--data", str(manifests[0]), "--out", str(tmp_path / "r"),
                    *FLAGS, *flags])
    assert words in capsys.readouterr().err


def test_val_map_and_folders_need_multilabel(tiny_ckpt, train_images, manifests, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--weights", str(tiny_ckpt()[0]), "--data", str(train_images), "--select-metric", "val_map",
                    "--out", str(tmp_path / "a")])
    assert "--task multilabel" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a folder of classes is single-label data
        train.main(["--weights", str(tiny_ckpt()[0]), "--data", str(train_images), "--out", str(tmp_path / "b"), *FLAGS])
    assert "CSV manifest path,labels" in capsys.readouterr().err
