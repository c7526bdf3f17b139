"""plots.py: the PNGs decode, have the documented sizes, and colour / draw what they say."""

import json

import numpy as np
import pytest
from PIL import Image

from nanopeft.reports import plots


def test_confusion_matrix_png(tmp_path):
    names = ["lying", "standing", "gallop"]
    cm = np.array([[90, 10, 0], [0, 50, 0], [1, 1, 0]])
    out = plots.save_confusion_matrix(cm, names, tmp_path / "cm.png")
    img = Image.open(out)
    img.load()
    probe = plots.ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(plots.text_size(probe, n, plots.font(14))[0] for n in names) + 12
    cell = 84  # 760 // 3 is capped at 84 px
    left, top = label_w + 40, 60
    assert img.size == (left + 3 * cell + 130, top + 3 * cell + label_w + 60) and img.mode == "RGB"
    # the colour is the row-normalised share: standing->standing is 100 %, the darkest; gallop row 50/50/0
    corner = lambda t, p: img.getpixel((left + p * cell + 3, top + t * cell + 3))
    assert corner(1, 1) == plots.colour(1.0) == (8, 48, 107)
    assert corner(1, 0) == plots.colour(0.0)
    assert corner(2, 0) == plots.colour(0.5) and corner(0, 0) == plots.colour(0.9)
    assert not (tmp_path / ".cm.png.tmp").exists()


def test_confusion_matrix_rejects_a_mismatch(tmp_path):
    with pytest.raises(ValueError, match="2 class names"):
        plots.save_confusion_matrix(np.eye(3, dtype=int), ["a", "b"], tmp_path / "x.png")


def test_curves_png_from_metrics_jsonl(tmp_path):
    rows = [{"step": s, "epoch": s // 5, "loss": 2.0 / s, "lr": 1e-4 * s / 10} for s in range(1, 11)]
    rows += [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75, "val_macro_f1": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    img = Image.open(plots.save_curves_from_jsonl(tmp_path / "metrics.jsonl", tmp_path / "curves.png"))
    assert img.size == (1280, 520)
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    for c in (plots.BLUE, plots.ORANGE, plots.GREEN):  # smoothed loss, lr, val accuracy are drawn
        assert (pixels == c).all(1).sum() > 20, c


def test_curves_with_one_point_and_no_lr(tmp_path):
    img = Image.open(plots.save_curves([{"step": 1, "loss": 1.0}], [{"epoch": 1, "val_accuracy": 0.3}],
                                       tmp_path / "c.png"))
    assert img.size == (1280, 520)


def test_shots_plot(tmp_path):
    rows = [{"shots": k, "accuracy": 0.1 * i + 0.3, "macro_f1": 0.1 * i + 0.2} for i, k in enumerate((5, 10, 20))]
    img = Image.open(plots.save_shots_plot(rows, tmp_path / "s.png"))
    assert img.size == (900, 560)


def test_nice_ticks_and_smoothing():
    assert plots.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots.nice_ticks(3, 97) == [0, 20, 40, 60, 80, 100]
    assert plots.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no pull to 0
