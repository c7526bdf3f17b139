"""eval.py on runs that train.py wrote: metrics files, the validation accuracy reproduced, ensembles."""

import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluate  # noqa: E402
import train  # noqa: E402
from nanopeft.data.folders import make_demo_dataset  # noqa: E402

FAST = ["--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--lr", "1e-3",
        "--rank", "4", "--epochs", "2", "--patience", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("eval")
    data = make_demo_dataset(root / "train", num_classes=3, per_class=12, size=(40, 32), seed=0)
    weights = tiny_ckpt(gated=True)[0]
    out = {}
    for method, extra in [("lora", ["--targets", "all-linear"]), ("dora", ["--targets", "q_proj"]),
                          ("resnet18", [])]:
        out[method] = root / method
        train.main(["--out", str(out[method]), "--method", method, "--weights", str(weights), "--data", str(data),
                    *FAST, *extra])
    test = make_demo_dataset(root / "test", num_classes=3, per_class=6, size=(40, 32), seed=1)
    return out, test


def best_val(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["val_accuracy"] for r in rows if "val_accuracy" in r)


@pytest.mark.parametrize("method", ["lora", "dora", "resnet18"])
@pytest.mark.parametrize("merge", ["no", "yes"])
def test_eval_reproduces_validation_accuracy(runs, method, merge, tmp_path):
    run = runs[0][method]
    m = evaluate.main(["--run", str(run), "--split", "val", "--merge", merge, "--workers", "0",
                       "--speed-reps", "0", "--out", str(tmp_path / "m.json")])
    assert m["accuracy"] == pytest.approx(best_val(run), abs=1e-9)


def test_val_split_of_a_skip_bad_run_leaves_the_bad_images_out(tmp_path, tiny_ckpt):
    data = make_demo_dataset(tmp_path / "data", num_classes=2, per_class=10, size=(40, 32), seed=0)
    for f in sorted(Path(data).rglob("*.*"))[::3]:  # every third image, so the val split gets some
        f.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = tmp_path / "run"
    train.main(["--out", str(run), "--method", "resnet18", "--data", str(data), *FAST, "--skip-bad"])
    m = evaluate.main(["--run", str(run), "--split", "val", "--workers", "0", "--speed-reps", "0",
                       "--out", str(tmp_path / "m.json")])
    assert m["accuracy"] == pytest.approx(best_val(run), abs=1e-9)


def test_metrics_json_and_predictions(runs, tmp_path):
    (run_dirs, test) = runs
    out = tmp_path / "metrics.json"
    m = evaluate.main(["--run", str(run_dirs["lora"]), "--data", str(test), "--out", str(out), "--workers", "0",
                       "--speed-reps", "3", "--batch-size", "4"])
    saved = json.loads(out.read_text())
    for key in ("accuracy", "weighted_f1", "macro_f1", "per_class", "confusion_matrix", "latency_ms",
                "throughput_img_s"):
        assert key in saved
    cm = saved["confusion_matrix"]
    assert sum(map(sum, cm)) == 18 and all(isinstance(v, int) for r in cm for v in r)
    assert saved["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 18)
    assert 0 <= saved["macro_f1"] <= 1 and saved["latency_ms"] > 0 and saved["throughput_img_s"] > 0
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 18 and {"path", "label", "prediction", "confidence"} <= set(rows[0])
    assert sum(r["label"] == r["prediction"] for r in rows) / 18 == pytest.approx(m["accuracy"])


def test_prepacked_eval_equals_the_plain_layers(runs, tmp_path):
    from nanopeft.inference.prepack import prepack_available

    run_dirs, test = runs
    got = {}
    for mode in ("no", "auto"):
        out = tmp_path / mode / "metrics.json"
        got[mode] = evaluate.main(["--run", str(run_dirs["lora"]), "--data", str(test), "--out", str(out),
                                   "--workers", "0", "--speed-reps", "0", "--prepack", mode, "--batch-size", "1"])
        got[mode]["rows"] = list(csv.DictReader(open(out.with_name("predictions.csv"))))
    assert got["no"]["inference_path"].endswith("CPU weight prepacking: off (--prepack no)")
    if prepack_available():
        assert "Linear layers reordered once for oneDNN" in got["auto"]["inference_path"]
    a, b = got["no"]["rows"], got["auto"]["rows"]
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert max(abs(float(r["confidence"]) - float(q["confidence"])) for r, q in zip(a, b)) < 1e-5


def test_ensemble_and_sources(runs, tmp_path):
    run_dirs, test = runs
    manifest = tmp_path / "test.csv"
    files = sorted(Path(test).rglob("*.*"))
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source"])
        for i, p in enumerate(files):
            w.writerow([str(p), p.parent.name, "farm_a" if i % 2 else "farm_b"])
    m = evaluate.main(["--ensemble", str(run_dirs["lora"]), str(run_dirs["dora"]), "--data", str(manifest),
                       "--out", str(tmp_path / "ens.json"), "--workers", "0", "--speed-reps", "0"])
    assert set(m["per_source"]) == {"farm_a", "farm_b"}
    assert sum(s["n"] for s in m["per_source"].values()) == len(files)


def test_eval_errors(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(tmp_path / "missing"), "--data", "x"])
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(runs[0]["lora"]), "--data", str(tmp_path / "none")])
    assert str(tmp_path / "none") in capsys.readouterr().err


# ---- deploy: pictures, balanced accuracy, prior correction, the data-efficiency sweep
def test_confusion_png_balanced_accuracy_and_prior_correction(runs, tmp_path):
    from PIL import Image

    run_dirs, test = runs
    priors = tmp_path / "priors.json"
    priors.write_text(json.dumps({"class_0": 0.8, "class_1": 0.1, "class_2": 0.1}))
    out = tmp_path / "metrics.json"
    m = evaluate.main(["--run", str(run_dirs["lora"]), "--data", str(test), "--out", str(out), "--workers", "0",
                       "--speed-reps", "0", "--prior-correction", str(priors)])
    saved = json.loads(out.read_text())
    assert saved["balanced_accuracy"] == pytest.approx(sum(saved["per_class_recall"].values()) / 3)
    assert saved["prior_correction"]["method"] == "file"
    assert saved["prior_correction"]["priors"] == pytest.approx({"class_0": 0.8, "class_1": 0.1, "class_2": 0.1})
    c = saved["corrected"]
    assert sum(map(sum, c["confusion_matrix"])) == 18 and "balanced_accuracy" in c
    # the correction moves predictions towards class_0 (x4 its odds against each other class)
    pred0 = lambda cm: sum(r[0] for r in cm)
    assert pred0(c["confusion_matrix"]) >= pred0(saved["confusion_matrix"])
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert sum(r["label"] == r["prediction_corrected"] for r in rows) / 18 == pytest.approx(c["accuracy"])
    img = Image.open(tmp_path / "confusion_matrix.png")
    assert img.size[0] > 300 and img.size[1] > 300
    assert m["accuracy"] == saved["accuracy"]
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(run_dirs["lora"]), "--data", str(test), "--prior-correction", "bogus"])


@pytest.mark.slow
def test_data_efficiency_sweep(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import data_efficiency
    from PIL import Image

    from nanopeft.data.folders import scan_dataset

    data = make_demo_dataset(tmp_path / "train", num_classes=2, per_class=10, size=(40, 32), seed=0)
    test = make_demo_dataset(tmp_path / "test", num_classes=2, per_class=4, size=(40, 32), seed=1)
    rows = data_efficiency.main(["--data", str(data), "--test", str(test), "--shots", "3,6", "--out",
                                 str(tmp_path / "sweep"), "--", "--method", "resnet18", "--image-size", "32",
                                 "--batch-size", "4", "--epochs", "1", "--workers", "0"])
    assert [r["shots"] for r in rows] == [3, 6] and [r["images"] for r in rows] == [6, 12]
    small, large = (scan_dataset(tmp_path / "sweep" / f"k{k}" / "train.csv")[0] for k in (3, 6))
    assert {s.path for s in small} < {s.path for s in large}  # nested subsets
    assert sorted(sum(s.label == c for s in small) for c in (0, 1)) == [3, 3]  # stratified
    assert "| 6 | 12 |" in (tmp_path / "sweep" / "results.md").read_text()
    assert Image.open(tmp_path / "sweep" / "data_efficiency.png").size == (900, 560)


# ---- evalrel: bad test images, unseen classes, non-UTF-8 names (docs/RELIABILITY.md "Evaluation (eval.py)")
def eval_tiny(run, data, out, *extra):
    return evaluate.main(["--run", str(run), "--data", str(data), "--out", str(out), "--workers", "0",
                          "--speed-reps", "0", "--batch-size", "4", *extra])


def damage(path: Path, kind: str) -> None:
    from PIL import Image

    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image\n")
    else:  # smaller than one 16 × 16 patch
        Image.new("RGB", (8, 8)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def test_eval_bad_test_image(tiny_run, tmp_path, capsys, reliability_case):
    kind = reliability_case["id"].removeprefix("eval-bad-image-")
    run = tiny_run()
    capsys.readouterr()  # not the training's output
    test = make_demo_dataset(tmp_path / "test", num_classes=3, per_class=4, size=(40, 32), seed=1)
    bad = test / "class_1" / "img_0001.jpg"
    damage(bad, kind)
    out = tmp_path / "m" / "metrics.json"
    with pytest.raises(SystemExit) as e:
        eval_tiny(run, test, out)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "\n" not in err, err  # one line, no traceback
    assert f"unreadable image {bad}" in err and "1 bad file(s)" in err and "--skip-bad" in err, err
    assert not out.parent.exists()  # stopped before evaluating anything
    m = eval_tiny(run, test, out, "--skip-bad")
    assert f"skipped {bad}: " in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [s["path"] for s in saved["skipped"]] == [str(bad)] and saved["skipped"][0]["reason"]
    assert sum(map(sum, saved["confusion_matrix"])) == 11 and m["skipped"] == saved["skipped"]
    rows = list(csv.DictReader(open(out.with_name("predictions.csv"), encoding="utf-8")))
    assert len(rows) == 11 and str(bad) not in {r["path"] for r in rows}


def test_eval_unseen_test_class(tiny_run, tmp_path, capsys, reliability_case):
    import shutil

    run = tiny_run()
    capsys.readouterr()
    test = make_demo_dataset(tmp_path / "test", num_classes=3, per_class=4, size=(40, 32), seed=1)
    (test / "class_9").mkdir()
    for f in sorted((test / "class_0").iterdir())[:3]:
        shutil.copy(f, test / "class_9" / f.name)
    out = tmp_path / "m" / "metrics.json"
    with pytest.raises(SystemExit) as e:
        eval_tiny(run, test, out)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "\n" not in err, err
    assert "'class_9' (3 images)" in err and "--skip-unseen" in err and str(test) in err, err
    assert not out.parent.exists()
    eval_tiny(run, test, out, "--skip-unseen")
    assert "3 image(s) of classes the run never saw" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["unseen_classes"] == {"class_9": 3} and sum(map(sum, saved["confusion_matrix"])) == 12
    rows = list(csv.DictReader(open(out.with_name("predictions.csv"), encoding="utf-8")))
    assert len(rows) == 12 and not any("class_9" in r["path"] for r in rows)


def test_eval_non_utf8_file_names(tiny_run, tmp_path, capsys, reliability_case):
    """A test image and a damaged one whose names are not UTF-8: printed, in metrics.json and predictions.csv
    with the bytes as \\xNN escapes; the good one is evaluated."""
    import os

    run = tiny_run()
    capsys.readouterr()
    test = make_demo_dataset(tmp_path / "test", num_classes=3, per_class=4, size=(40, 32), seed=1)
    good = test / "class_0" / os.fsdecode(b"vache_\xe9.png")
    (test / "class_0" / "img_0000.png").rename(good)
    bad = test / "class_2" / os.fsdecode(b"caf\xe9.jpg")
    (test / "class_2" / "img_0001.jpg").rename(bad)
    damage(bad, "truncated")
    out = tmp_path / "m" / "metrics.json"
    with pytest.raises(SystemExit):
        eval_tiny(run, test, out)
    err = capsys.readouterr().err
    assert f"unreadable image {test / 'class_2'}/caf\\xe9.jpg" in err, err
    eval_tiny(run, test, out, "--skip-bad")
    assert "caf\\xe9.jpg" in capsys.readouterr().out
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["skipped"][0]["path"] == f"{test / 'class_2'}/caf\\xe9.jpg"
    rows = list(csv.DictReader(open(out.with_name("predictions.csv"), encoding="utf-8")))
    assert len(rows) == 11 and f"{test / 'class_0'}/vache_\\xe9.png" in {r["path"] for r in rows}
