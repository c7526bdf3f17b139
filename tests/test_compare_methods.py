"""scripts/compare_methods.py: one fresh train.py per method, eval.py, the table (Markdown + CSV) and the
bubble chart; finished rows are skipped on a re-run; a failed row is reported and the script goes on."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanopeft.reports import plots

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "scripts" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# the demo, made as small as it goes: one epoch, each image once, 2×2 patches, fp32 (the suite's CPU), no recompute
FAST = ["--epochs", "1", "--multiplier", "1", "--batch-size", "32", "--image-size", "32", "--augment", "none",
        "--eval-batch-size", "64", "--precision", "fp32", "--grad-checkpointing", "none"]


def test_demo_two_methods_table_chart_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOPEFT_CACHE", str(tmp_path / "cache"))  # prepare_demo writes here, not in ~/.cache
    cm = load_script()
    out = tmp_path / "cmp"
    argv = ["--demo", "--methods", "lora,frozen", "--out", str(out), "--", *FAST]
    rows = cm.main(argv)
    assert [r["method"] for r in rows] == ["lora", "frozen"] and all(r["status"] == "ok" for r in rows)

    table = read_csv(out / "methods.csv")
    assert [r["method"] for r in table] == ["lora", "frozen"]
    for r in table:
        assert r["status"] == "ok" and r["error"] == ""
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["macro_f1"]) <= 1.0
        assert int(r["trainable_parameters"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert float(r["time_per_epoch_s"]) > 0 and float(r["images_per_s"]) > 0
    lora, frozen = table
    assert int(lora["adapter_parameters"]) > 0 and int(frozen["adapter_parameters"]) == 0
    assert int(lora["trainable_parameters"]) > int(frozen["trainable_parameters"])  # LoRA adds to the head
    md = (out / "methods.md").read_text()
    assert "| method | accuracy | macro F1 | trainable parameters |" in md and "| lora | " in md
    assert "say nothing about the methods" in md and "compare_methods.py --demo" in md
    # each row trained in its own process: its peak is its own summary.json's, not this process's
    for r in table:
        summary = json.loads((out / r["method"] / "summary.json").read_text())
        assert float(r["peak_memory_mb"]) == summary["peak_memory_mb"]

    img = Image.open(out / "methods.png")
    img.load()
    assert img.format == "PNG" and img.size == (1120, 600)
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # not one colour

    # a re-run reads the finished rows and runs nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    summary_written = (out / "lora" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    again = cm.main(argv)
    assert "already finished, skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == stamps
    assert (out / "lora" / "summary.json").stat().st_mtime_ns == summary_written
    assert [(r["method"], r["accuracy"], r["peak_memory_mb"]) for r in again] == \
        [(r["method"], r["accuracy"], r["peak_memory_mb"]) for r in rows]


FAKE_TRAIN = r'''
import json, sys
from pathlib import Path
a = sys.argv[1:]
method = a[a.index("--method") + 1]
run = Path(a[a.index("--out") + 1] if "--out" in a else a[a.index("--resume") + 1])
if method == "dora":
    print("epoch 1/1: 10%|#  |", file=sys.stderr)
    print("error: --rank 0: the method needs a rank >= 1", file=sys.stderr)
    sys.exit(2)
run.mkdir(parents=True)
(run / "config.json").write_text(json.dumps({"parameters": {"adapter": 10, "head": 90, "trainable": 100}}))
rows = [{"step": s, "epoch": 0, "loss": 1.0, "images_per_s": v} for s, v in enumerate((1.0, 50.0, 70.0))]
rows += [{"epoch": 1, "val_accuracy": 0.5, "elapsed_s": 4.0}, {"epoch": 2, "val_accuracy": 0.6, "elapsed_s": 10.0}]
(run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(run / "summary.json").write_text(json.dumps({"trainable_parameters": 100, "peak_memory_mb": 321.0}))
'''
FAKE_EVAL = r'''
import json, sys
from pathlib import Path
a = sys.argv[1:]
(Path(a[a.index("--run") + 1]) / "metrics.json").write_text(json.dumps({"accuracy": 0.75, "macro_f1": 0.5}))
'''


def test_a_failed_row_is_reported_and_the_rest_goes_on(tmp_path, monkeypatch, capsys):
    cm = load_script()
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "eval.py").write_text(FAKE_EVAL)
    monkeypatch.setattr(cm, "TRAIN_PY", tmp_path / "train.py")
    monkeypatch.setattr(cm, "EVAL_PY", tmp_path / "eval.py")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as e:
        cm.main(["--methods", "dora,bitfit", "--data", "D", "--test", "T", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 of 2 method(s) failed: dora (train.py: --rank 0")
    dora, bitfit = read_csv(out / "methods.csv")
    assert dora["status"] == "failed" and dora["accuracy"] == "" and "needs a rank" in dora["error"]
    assert bitfit["status"] == "ok" and float(bitfit["accuracy"]) == 0.75 and int(bitfit["trainable_parameters"]) == 100
    assert float(bitfit["images_per_s"]) == 50.0  # median of the steps' throughput
    assert float(bitfit["time_per_epoch_s"]) == 5.0  # epochs of 4 s and 6 s (elapsed_s is cumulative)
    md = (out / "methods.md").read_text()
    assert "| dora | failed | — |" in md and "- dora: train.py: --rank 0" in md  # the line, without `error: `
    Image.open(out / "methods.png").load()  # the chart is drawn from the rows that finished


def test_forwarded_flags_and_the_error_line(tmp_path):
    cm = load_script()
    assert cm.forwarded(["--epochs", "3", "--device", "cuda:1", "--workers=2", "--lr", "1e-3"]) == \
        ["--device", "cuda:1", "--workers=2"]
    log = tmp_path / "x.log"
    log.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n")
    assert cm.last_error(log, 1) == "RuntimeError: boom"
    with pytest.raises(SystemExit):
        cm.main(["--methods", "lora,nope", "--data", "D", "--test", "T"])


def blended(c):
    """The fill a translucent bubble of colour c leaves on white."""
    over = Image.new("RGBA", (1, 1), (*c, plots.BUBBLE_ALPHA))
    return Image.alpha_composite(Image.new("RGBA", (1, 1), (255, 255, 255, 255)), over).getpixel((0, 0))[:3]


def test_bubble_area_follows_the_parameter_count(tmp_path):
    rows = [{"method": "small", "accuracy": 0.2, "peak_memory_mb": 100.0, "trainable_parameters": 20_000},
            {"method": "large", "accuracy": 0.5, "peak_memory_mb": 500.0, "trainable_parameters": 1_000_000},
            {"method": "mid", "accuracy": 0.8, "peak_memory_mb": 900.0, "trainable_parameters": 250_000},
            {"method": "broken", "accuracy": None, "peak_memory_mb": None, "trainable_parameters": None}]
    img = Image.open(plots.save_bubble_chart(rows, tmp_path / "b.png", "synthetic"))
    px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    area = {r["method"]: int((px == blended(plots.PALETTE[i])).all(1).sum()) for i, r in enumerate(rows[:3])}
    assert area["small"] < area["mid"] < area["large"]
    for name, params in (("small", 20_000), ("mid", 250_000), ("large", 1_000_000)):
        r = plots.bubble_radius(params, 1_000_000)
        assert area[name] == pytest.approx(math.pi * (r - 1) ** 2, rel=0.15), name  # that radius, less the 1 px outline
    assert area["large"] / area["mid"] == pytest.approx(4.0, rel=0.15)  # area ∝ parameters
    assert plots.bubble_radius(1_000_000, 1_000_000) == plots.BUBBLE_MAX_R
    assert plots.bubble_radius(1, 1_000_000) == plots.BUBBLE_MIN_R  # a tiny count stays visible
    assert plots.human_count(731_145) == "731k" and plots.human_count(1_422_473) == "1.42M"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
