"""predict.py on folders, CSVs and globs: equal to eval.py's predictions, resumable, sharded, robust to bad files."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluate  # noqa: E402
import predict  # noqa: E402
from nanopeft.data.folders import make_demo_dataset  # noqa: E402
from nanopeft.inference.predict import list_inputs  # noqa: E402
from nanopeft.prior import em_priors  # noqa: E402

pytestmark = pytest.mark.slow
COMMON = ["--workers", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def setup(tiny_run, tmp_path_factory):
    """A run, a labelled nested test folder (4/2/1 images: imbalanced) and eval.py's predictions on it."""
    run = tiny_run("lora")
    root = tmp_path_factory.mktemp("predict")
    test = make_demo_dataset(root / "test", num_classes=3, per_class=4, size=(40, 32), seed=1)
    for f in sorted((test / "class_1").iterdir())[2:] + sorted((test / "class_2").iterdir())[1:]:
        f.unlink()
    (test / "class_0" / "deeper").mkdir()
    shutil.move(test / "class_0" / "img_0003.jpg", test / "class_0" / "deeper" / "img_0003.jpg")
    evaluate.main(["--run", str(run), "--data", str(test), "--out", str(root / "eval" / "metrics.json"),
                   "--speed-reps", "0", "--prior-correction", "em", *COMMON])
    rows = list(csv.DictReader(open(root / "eval" / "predictions.csv")))
    return run, root, test, rows


def read(path):
    return list(csv.DictReader(open(path, newline="")))


def test_nested_folder_equals_eval(setup, tmp_path):
    run, _, test, ev = setup
    out = tmp_path / "p.csv"
    predict.main(["--run", str(run), "--data", str(test), "--out", str(out), "--top-k", "2", *COMMON])
    rows = read(out)
    assert list(rows[0]) == ["path", "label", "prob", "label_2", "prob_2", "error"]
    assert {r["path"]: r["label"] for r in rows} == {r["path"]: r["prediction"] for r in ev}
    assert [r["path"] for r in rows] == [str(p) for p in list_inputs(test).files]  # input order
    for r in rows:
        assert float(r["prob"]) >= float(r["prob_2"]) and r["label"] != r["label_2"] and not r["error"]
    conf = {r["path"]: float(r["confidence"]) for r in ev}
    assert all(abs(float(r["prob"]) - conf[r["path"]]) < 1e-5 for r in rows)


def test_flat_folder_glob_and_csv_keep_columns(setup, tmp_path):
    run, _, test, ev = setup
    flat = tmp_path / "flat"
    flat.mkdir()
    by_name = {}
    for r in ev:  # the same images in one folder, under new names
        dst = flat / f"{Path(r['path']).parent.name}_{Path(r['path']).name}"
        shutil.copy(r["path"], dst)
        by_name[dst.name] = r["prediction"]
    predict.main(["--run", str(run), "--data", str(flat), "--out", str(tmp_path / "flat.csv"), *COMMON])
    assert {Path(r["path"]).name: r["label"] for r in read(tmp_path / "flat.csv")} == by_name
    predict.main(["--run", str(run), "--data", str(flat / "*.png"), "--out", str(tmp_path / "glob.csv"), *COMMON])
    got = read(tmp_path / "glob.csv")
    assert got and all(r["path"].endswith(".png") and by_name[Path(r["path"]).name] == r["label"] for r in got)

    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["camera", "path", "label"])
        for i, name in enumerate(reversed(sorted(by_name))):
            w.writerow([f"cam{i % 2}", f"flat/{name}", "whatever"])  # relative to the CSV's folder
    predict.main(["--run", str(run), "--data", str(manifest), "--out", str(tmp_path / "m.csv"), *COMMON])
    rows = read(tmp_path / "m.csv")
    assert list(rows[0])[-3:] == ["camera", "input_label", "error"]
    assert [r["path"] for r in rows] == [f"flat/{n}" for n in reversed(sorted(by_name))]  # CSV order, as written
    assert all(by_name[Path(r["path"]).name] == r["label"] for r in rows)
    assert rows[1]["camera"] == "cam1" and rows[0]["input_label"] == "whatever"


def test_resume_after_a_kill_and_unreadable_images(setup, tmp_path):
    run, _, test, _ = setup
    data = tmp_path / "data"
    shutil.copytree(test, data)
    (data / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    full = tmp_path / "full.csv"
    predict.main(["--run", str(run), "--data", str(data), "--out", str(full), *COMMON])
    rows = read(full)
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.jpg") and bad[0]["label"] == ""
    assert "cannot read image" in bad[0]["error"] or "Error" in bad[0]["error"]

    part = tmp_path / "part.csv"  # what a run killed while writing its 2nd batch leaves behind
    lines = full.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:5]) + lines[5][:17])
    s = predict.main(["--run", str(run), "--data", str(data), "--out", str(part), *COMMON])
    assert s["skipped_done"] == 4 and s["predicted"] == len(rows) - 4
    assert part.read_bytes() == full.read_bytes()
    s = predict.main(["--run", str(run), "--data", str(data), "--out", str(part), *COMMON])  # all done
    assert s["predicted"] == 0 and part.read_bytes() == full.read_bytes()
    with pytest.raises(SystemExit):  # a resume must write the same columns
        predict.main(["--run", str(run), "--data", str(data), "--out", str(part), "--top-k", "1", *COMMON])


def test_prior_correction_em_equals_eval(setup, tmp_path):
    run, root, test, ev = setup
    out = tmp_path / "em.csv"
    s = predict.main(["--run", str(run), "--data", str(test), "--out", str(out), "--prior-correction", "em",
                      *COMMON])
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    pri = metrics["prior_correction"]
    assert pri["method"] == "em" and sum(pri["priors"].values()) == pytest.approx(1.0)
    assert "corrected" in metrics and "balanced_accuracy" in metrics["corrected"]
    assert s["prior_correction"]["priors"] == pytest.approx(pri["priors"], abs=1e-4)
    assert {r["path"]: r["label"] for r in read(out)} == {r["path"]: r["prediction_corrected"] for r in ev}
    post = read(out.with_name("em.csv.posteriors.csv"))  # the posteriors before the correction (calibrated), kept
    P = np.array([[float(r[f"prob_class_{c}"]) for c in range(3)] for r in post])
    assert pri["posteriors"] != "uncalibrated" and "calibrated validation" in pri["source_priors"]
    est, _ = em_priors(P, list(pri["train_priors"].values()))  # the source priors: mean calibrated val posterior
    assert list(est) == pytest.approx(list(pri["priors"].values()), abs=1e-4)


def test_prior_file(setup, tmp_path):
    run, _, test, _ = setup
    pri = tmp_path / "p.json"
    pri.write_text(json.dumps({"class_0": 0.98, "class_1": 0.01, "class_2": 0.01}))
    predict.main(["--run", str(run), "--data", str(test), "--out", str(tmp_path / "f.csv"),
                  "--prior-correction", str(pri), *COMMON])
    assert sum(r["label"] == "class_0" for r in read(tmp_path / "f.csv")) >= 6
    with pytest.raises(SystemExit):
        predict.main(["--run", str(run), "--data", str(test), "--prior-correction", str(tmp_path / "no.json")])


def test_two_gloo_processes_write_the_single_process_csv(setup, tmp_path):
    run, _, test, _ = setup
    one = tmp_path / "one.csv"
    predict.main(["--run", str(run), "--data", str(test), "--out", str(one), *COMMON])
    two = tmp_path / "two.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
           str(ROOT / "predict.py"), "--run", str(run), "--data", str(test), "--out", str(two), *COMMON]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read(one), read(two)
    assert [x["path"] for x in a] == [x["path"] for x in b]  # same rows, same order, none repeated
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert all(abs(float(x["prob"]) - float(y["prob"])) < 1e-5 for x, y in zip(a, b))
    assert not list(tmp_path.glob("two.csv.part*"))
