"""The pictures people read after a run, drawn with Pillow alone (a runtime dependency: a fresh install has them).

    save_confusion_matrix(cm, class_names, "confusion_matrix.png")   row-normalised colours, counts in cells
    save_curves(steps, epochs, "curves.png")          training loss per step (smoothed) + lr | val acc / macro F1
    save_curves_from_jsonl("metrics.jsonl", "curves.png")            the same from train.py's log
    save_shots_plot(rows, "data_efficiency.png")      test accuracy / macro F1 against images per class

A Panel maps data coordinates to pixels inside a box and draws axes with "nice" ticks (1, 2, 5 × 10^k),
lines, markers and a legend: a few dozen lines instead of a plotting library.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLUE, ORANGE, GREEN, GREY, INK = (31, 119, 180), (255, 127, 14), (44, 160, 44), (190, 190, 190), (30, 30, 30)
# white -> dark blue, the colour stops of matplotlib's "Blues" at 0, 0.25, 0.5, 0.75, 1
BLUES = np.array([(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)], dtype=float)


def font(size: int = 14):
    """PIL's bundled font at `size` (Pillow >= 10.1); older Pillow: its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return x1 - x0, y1 - y0


def centered(draw, xy, text: str, f, fill=INK) -> None:
    """Text centred on the point xy."""
    w, h = text_size(draw, text, f)
    x0, y0, _, _ = draw.textbbox((0, 0), text, font=f)
    draw.text((xy[0] - w / 2 - x0, xy[1] - h / 2 - y0), text, font=f, fill=fill)


def vertical_text(img: Image.Image, xy, text: str, f, fill=INK) -> None:
    """Text rotated 90° (reading upwards), centred on xy: y-axis titles and long column labels."""
    d = ImageDraw.Draw(img)
    w, h = text_size(d, text, f)
    tile = Image.new("RGBA", (w + 4, h + 8), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((2, 2), text, font=f, fill=fill)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (int(xy[0] - tile.width / 2), int(xy[1] - tile.height / 2)), tile)


def colour(v: float) -> tuple[int, int, int]:
    """v in [0, 1] -> an RGB colour of the BLUES ramp (linear between its stops)."""
    t = min(max(float(v), 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(t), len(BLUES) - 2)
    return tuple(int(round(c)) for c in BLUES[i] + (t - i) * (BLUES[i + 1] - BLUES[i]))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]
    return [round(t, 12) for t in ticks]


def int_ticks(lo: float, hi: float) -> list[float]:
    """Whole-number ticks (epochs, counts) inside [lo, hi]."""
    ticks = [t for t in nice_ticks(lo, hi) if lo - 1e-9 <= t <= hi + 1e-9 and float(t).is_integer()]
    return ticks if len(ticks) >= 2 else [float(t) for t in range(math.ceil(lo), math.floor(hi) + 1)] or [lo, hi]


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


class Panel:
    """A plotting box: data -> pixel transform, axes, lines, legend. y2 is an optional right-hand axis."""

    def __init__(self, img: Image.Image, box, x_range, y_range, y2_range=None, xlog: bool = False):
        self.img, self.draw, self.box = img, ImageDraw.Draw(img), box  # box = (left, top, right, bottom)
        self.xlog = xlog
        self.x_ticks = self._ticks(x_range, log=xlog)
        self.y_ticks = nice_ticks(*y_range)
        self.y2_ticks = nice_ticks(*y2_range) if y2_range else None
        self.x_range = (self.x_ticks[0], self.x_ticks[-1]) if not xlog else x_range
        self.y_range, self.f = (self.y_ticks[0], self.y_ticks[-1]), font(13)
        self.y2_range = (self.y2_ticks[0], self.y2_ticks[-1]) if self.y2_ticks else None

    @staticmethod
    def _ticks(r, log):
        return list(r) if log else nice_ticks(*r)

    def px(self, x: float, y: float, axis: int = 1) -> tuple[float, float]:
        l, t, r, b = self.box
        x0, x1 = self.x_range
        if self.xlog:
            x, x0, x1 = math.log(x), math.log(x0), math.log(x1)
        y0, y1 = self.y_range if axis == 1 else self.y2_range
        fx = (x - x0) / (x1 - x0) if x1 != x0 else 0.5
        fy = (y - y0) / (y1 - y0) if y1 != y0 else 0.5
        return l + fx * (r - l), b - fy * (b - t)

    def axes(self, xlabel: str, ylabel: str, title: str = "", y2label: str | None = None, y2_colour=ORANGE):
        d, (l, t, r, b), f = self.draw, self.box, self.f
        for y in self.y_ticks:  # horizontal grid + left tick labels
            _, py = self.px(self.x_range[0], y)
            d.line([(l, py), (r, py)], fill=(232, 232, 232))
            w, h = text_size(d, tick_label(y), f)
            d.text((l - 8 - w, py - h / 2 - 2), tick_label(y), font=f, fill=INK)
        for x in self.x_ticks:
            px, _ = self.px(x, self.y_range[0])
            d.line([(px, b), (px, b + 5)], fill=INK)
            centered(d, (px, b + 16), tick_label(x), f)
        d.rectangle(self.box, outline=INK)
        centered(d, ((l + r) / 2, b + 40), xlabel, font(14))
        vertical_text(self.img, (l - 62, (t + b) / 2), ylabel, font(14))
        if title:
            centered(d, ((l + r) / 2, t - 16), title, font(15))
        if self.y2_ticks:
            for y in self.y2_ticks:
                _, py = self.px(self.x_range[0], y, axis=2)
                d.line([(r, py), (r + 5, py)], fill=y2_colour)
                d.text((r + 8, py - 9), tick_label(y), font=f, fill=y2_colour)
            vertical_text(self.img, (r + 62, (t + b) / 2), y2label or "", font(14), fill=y2_colour)

    def line(self, xs, ys, fill, width: int = 2, axis: int = 1, markers: bool = False) -> None:
        pts = [self.px(x, y, axis) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            self.draw.line(pts, fill=fill, width=width, joint="curve")
        if markers or len(pts) == 1:
            for x, y in pts:
                self.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=fill)

    def legend(self, entries: list[tuple[str, tuple]], corner: str = "upper right") -> None:
        """entries: (label, colour); a white box with a colour swatch per line, inside the panel."""
        d, (l, t, r, b), f = self.draw, self.box, self.f
        w = max(text_size(d, s, f)[0] for s, _ in entries) + 40
        h = 20 * len(entries) + 10
        x0 = r - w - 10 if "right" in corner else l + 10
        y0 = t + 10 if "upper" in corner else b - h - 10
        d.rectangle([x0, y0, x0 + w, y0 + h], fill="white", outline=(160, 160, 160))
        for i, (label, c) in enumerate(entries):
            y = y0 + 15 + 20 * i
            d.line([(x0 + 8, y), (x0 + 28, y)], fill=c, width=3)
            d.text((x0 + 34, y - 8), label, font=f, fill=INK)


def _finish(img: Image.Image, path) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- confusion matrix
def save_confusion_matrix(cm, class_names: list[str], path, title: str = "Confusion matrix") -> Path:
    """Rows = true class, columns = predicted; colour = share of the true class (row-normalised), each
    cell shows its count and that share. A colour bar on the right is the legend."""
    cm = np.asarray(cm, dtype=np.int64)
    C = len(class_names)
    if cm.shape != (C, C):
        raise ValueError(f"plots.py: confusion matrix of shape {cm.shape} for {C} class names")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_f, cell_f = font(14), font(13 if C <= 12 else 10)
    label_w = max(text_size(probe, n, label_f)[0] for n in class_names) + 12
    cell = max(44, min(84, 760 // max(C, 1)))
    left, top = label_w + 40, 60
    right_pad, bottom = 130, label_w + 60
    W, H = left + C * cell + right_pad, top + C * cell + bottom
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    centered(d, (left + C * cell / 2, 26), f"{title} (rows: true class, normalised; cells: count and share)",
             font(16))
    for t in range(C):
        for p in range(C):
            x, y = left + p * cell, top + t * cell
            d.rectangle([x, y, x + cell, y + cell], fill=colour(frac[t, p]), outline=(255, 255, 255))
            if cm[t, p] == 0:  # empty cells stay quiet, so the errors stand out
                centered(d, (x + cell / 2, y + cell / 2), "0", cell_f, fill=(170, 170, 170))
                continue
            ink = "white" if frac[t, p] > 0.55 else INK
            centered(d, (x + cell / 2, y + cell / 2 - 8), f"{cm[t, p]:,}", cell_f, fill=ink)
            share = "<1%" if frac[t, p] < 0.005 else f"{100 * frac[t, p]:.0f}%"
            centered(d, (x + cell / 2, y + cell / 2 + 9), share, cell_f, fill=ink)
    for i, name in enumerate(class_names):  # class names on both axes
        w, h = text_size(d, name, label_f)
        d.text((left - 8 - w, top + i * cell + cell / 2 - h / 2 - 3), name, font=label_f, fill=INK)
        vertical_text(img, (left + i * cell + cell / 2, top + C * cell + 8 + w / 2), name, label_f)
    vertical_text(img, (16, top + C * cell / 2), "true class", font(15))
    centered(d, (left + C * cell / 2, H - 20), "predicted class", font(15))
    _colour_bar(img, (left + C * cell + 30, top, left + C * cell + 50, top + C * cell))
    return _finish(img, path)


def _colour_bar(img: Image.Image, box) -> None:
    d, (l, t, r, b) = ImageDraw.Draw(img), box
    for y in range(int(t), int(b) + 1):
        d.line([(l, y), (r, y)], fill=colour(1 - (y - t) / max(b - t, 1)))
    d.rectangle(box, outline=INK)
    for v in (0, 0.25, 0.5, 0.75, 1):
        y = b - v * (b - t)
        d.line([(r, y), (r + 4, y)], fill=INK)
        d.text((r + 7, y - 8), f"{int(v * 100)}%", font=font(12), fill=INK)
    vertical_text(img, (r + 60, (t + b) / 2), "share of the true class", font(13))


# ----------------------------------------------------------------------------- training curves
def smooth(values, weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first points are
    not dragged towards 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _span(values, pad: float = 0.05) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return 0.0, 1.0
    lo, hi = min(v), max(v)
    if hi == lo:
        extra = abs(hi) * 0.1 or 1.0
    else:
        extra = (hi - lo) * pad
    return lo - extra, hi + extra


def save_curves(steps: list[dict], epochs: list[dict], path, title: str = "Training") -> Path:
    """Left: training loss per optimizer step (faint: raw, bold: smoothed), lr on the right axis.
    Right: validation accuracy and macro F1 per epoch. steps: {step, loss, lr}; epochs: {epoch,
    val_accuracy[, val_macro_f1]} (train.py's metrics.jsonl rows); a missing key is left out."""
    img = Image.new("RGB", (1280, 520), "white")
    centered(ImageDraw.Draw(img), (640, 20), title, font(18))
    xs = [s["step"] for s in steps]
    loss = [s.get("loss") for s in steps]
    lr = [s.get("lr") for s in steps]
    have_lr = any(v is not None for v in lr)
    lr_top = _span(lr, 0)[1]
    left = Panel(img, (100, 70, 560, 440), _span(xs or [0, 1], 0), (0.0, _span(loss)[1]),
                 (0.0, lr_top) if have_lr else None)
    left.axes("optimizer step", "training loss", "loss per step", "learning rate" if have_lr else None)
    finite = [v for v in loss if v is not None]
    left.line(xs, loss, GREY, width=1)
    left.line([x for x, v in zip(xs, loss) if v is not None], smooth(finite), BLUE, width=3)
    entries = [("loss", GREY), ("loss (smoothed)", BLUE)]
    if have_lr:
        left.line(xs, lr, ORANGE, width=2, axis=2)
        entries.append(("learning rate", ORANGE))
    left.legend(entries)

    ep = [e["epoch"] for e in epochs]
    acc, f1 = [e.get("val_accuracy") for e in epochs], [e.get("val_macro_f1") for e in epochs]
    lo = min([v for v in acc + f1 if v is not None] or [0.0])
    right = Panel(img, (780, 70, 1240, 440), (min(ep or [0]) - 0.5 if len(ep) < 2 else min(ep), max(ep or [1])),
                  (min(0.0, lo), 1.0))
    right.x_ticks = int_ticks(*right.x_range) if ep else right.x_ticks
    right.axes("epoch", "validation score", "validation per epoch")
    right.line(ep, acc, GREEN, width=3, markers=True)
    entries = [("accuracy", GREEN)]
    if any(v is not None for v in f1):
        right.line(ep, f1, BLUE, width=3, markers=True)
        entries.append(("macro F1", BLUE))
    right.legend(entries, corner="lower right")
    return _finish(img, path)


def save_curves_from_jsonl(metrics_jsonl, path, title: str | None = None) -> Path:
    """curves.png from train.py's metrics.jsonl: rows with `step` are steps, rows with `val_accuracy` epochs."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r and "loss" in r]
    epochs = [r for r in rows if "val_accuracy" in r]
    return save_curves(steps, epochs, path, title or f"Training: {Path(metrics_jsonl).parent.name}")


# ----------------------------------------------------------------------------- data efficiency
def save_shots_plot(rows: list[dict], path, title: str = "Data efficiency") -> Path:
    """Test accuracy and macro F1 against k images per class (log-scaled k axis, ticks at the ks run).
    rows: {shots, accuracy, macro_f1[, balanced_accuracy]}."""
    rows = sorted(rows, key=lambda r: r["shots"])
    ks = [r["shots"] for r in rows]
    img = Image.new("RGB", (900, 560), "white")
    xr = (ks[0] / 1.3, ks[-1] * 1.3) if ks else (1, 10)
    panel = Panel(img, (110, 60, 860, 460), xr, (0.0, 1.0), xlog=True)
    panel.x_ticks = ks or [1, 10]
    panel.axes("images per class (k, log scale)", "test score", title)
    entries = []
    for key, label, c in (("accuracy", "accuracy", GREEN), ("macro_f1", "macro F1", BLUE),
                          ("balanced_accuracy", "balanced accuracy", ORANGE)):
        if any(key in r for r in rows):
            panel.line(ks, [r.get(key) for r in rows], c, width=3, markers=True)
            entries.append((label, c))
    if entries:
        panel.legend(entries, corner="lower right")
    return _finish(img, path)


# ----------------------------------------------------------------------------- reliability diagram
def save_reliability_diagram(curves: list[tuple[str, list[dict], float]], path,
                             title: str = "Reliability (top label, 15 equal-mass bins)") -> Path:
    """Accuracy against mean confidence per bin (nanopeft/calibration.py reliability_bins), one line per
    set of posteriors (label, bins, ECE): on the diagonal a posterior means what it says; below it the
    classifier is over-confident, above it under-confident. Markers are the bins (equal counts)."""
    img = Image.new("RGB", (760, 640), "white")
    panel = Panel(img, (110, 60, 720, 540), (0.0, 1.0), (0.0, 1.0))
    panel.axes("mean confidence in the bin", "accuracy in the bin", title)
    panel.line([0, 1], [0, 1], GREY, width=1)
    entries = []
    for (label, bins, err), c in zip(curves, (BLUE, ORANGE, GREEN)):
        panel.line([b["confidence"] for b in bins], [b["accuracy"] for b in bins], c, width=2, markers=True)
        entries.append((f"{label} (ECE {err:.3f})", c))
    if entries:
        panel.legend(entries, corner="upper left")
    return _finish(img, path)


# ----------------------------------------------------------------------------- method comparison
# matplotlib's "tab10" order: one colour per method, in the order the rows are given
PALETTE = [BLUE, ORANGE, GREEN, (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
           (188, 189, 34), (23, 190, 207)]
BUBBLE_MAX_R, BUBBLE_MIN_R, BUBBLE_ALPHA = 40, 4, 150  # pixels; fill opacity (0-255): overlaps stay readable


def bubble_radius(params: float, largest: float, r_max: float = BUBBLE_MAX_R) -> float:
    """Radius (pixels) of a bubble whose AREA is proportional to params: the largest count gets r_max, half
    of it r_max/√2. Never below BUBBLE_MIN_R, so a method with a few thousand parameters stays visible."""
    if largest <= 0:
        return float(BUBBLE_MIN_R)
    return max(float(BUBBLE_MIN_R), r_max * math.sqrt(max(float(params), 0.0) / largest))


def human_count(n: float) -> str:
    """731145 -> '731k', 1422473 -> '1.42M', 950 -> '950': parameter counts in a label."""
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}"
    return f"{n:.0f}"


def save_bubble_chart(rows: list[dict], path, title: str = "Methods") -> Path:
    """Test accuracy against peak memory, one bubble per method, its AREA proportional to the trainable
    parameters (bubble_radius), its name beside it; a legend on the right names each method's colour and
    parameter count. rows: {method, accuracy, peak_memory_mb, trainable_parameters}, in the order their
    colours are given (PALETTE); a row without a number (a failed method) is listed in the legend as failed.
    Bubbles are translucent and clipped to the plotting box; the smaller ones are drawn on top."""
    keys = ("accuracy", "peak_memory_mb", "trainable_parameters")
    ok = lambda r: all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in keys)
    colours = {r["method"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    drawn = [r for r in rows if ok(r)]
    img = Image.new("RGB", (1120, 600), "white")
    box = (110, 60, 790, 500)
    xs, ys = [r["peak_memory_mb"] for r in drawn], [r["accuracy"] for r in drawn]
    x_lo, x_hi = _span(xs or [0.0, 1.0], pad=0.12)
    y_lo, y_hi = _span(ys or [0.0, 1.0], pad=0.15)
    panel = Panel(img, box, (max(0.0, x_lo), x_hi), (max(0.0, y_lo), min(1.0, y_hi)))  # memory >= 0, 0 <= accuracy <= 1
    panel.axes("peak memory (MB)", "test accuracy", title)

    largest = max([r["trainable_parameters"] for r in drawn] or [0])
    bubbles = []
    for r in drawn:
        cx, cy = panel.px(r["peak_memory_mb"], r["accuracy"])
        bubbles.append((bubble_radius(r["trainable_parameters"], largest), cx, cy, r))
    bubbles.sort(key=lambda b: -b[0])  # big ones first: a small bubble is never hidden under a big one
    layer = Image.new("RGBA", img.size, (255, 255, 255, 0))
    ld = ImageDraw.Draw(layer)
    for rad, cx, cy, r in bubbles:
        c = colours[r["method"]]
        ld.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=(*c, BUBBLE_ALPHA), outline=(*c, 255))
    clip = Image.new("L", img.size, 0)
    ImageDraw.Draw(clip).rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], fill=255)
    layer.putalpha(Image.composite(layer.getchannel("A"), clip, clip))  # nothing spills over the axes
    img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    d, f = ImageDraw.Draw(img), font(13)
    for rad, cx, cy, r in bubbles:  # names beside the bubbles, right of them unless that leaves the box
        label = str(r["method"])
        w, h = text_size(d, label, f)
        x = cx + rad + 4 if cx + rad + 4 + w <= box[2] - 4 else cx - rad - 4 - w
        d.text((x, cy - h / 2 - 3), label, font=f, fill=INK, stroke_width=2, stroke_fill="white")  # legible on a bubble

    x0, y = box[2] + 30, box[1]  # legend: colour, method, parameter count
    d.text((x0, y), "trainable parameters", font=font(14), fill=INK)
    d.text((x0, y + 18), "(bubble area)", font=f, fill=(110, 110, 110))
    y += 48
    for r in rows:
        c = colours[r["method"]]
        if ok(r):
            d.ellipse([x0, y - 7, x0 + 14, y + 7], fill=c)
            d.text((x0 + 22, y - 9), f"{r['method']}  {human_count(r['trainable_parameters'])}", font=f, fill=INK)
        else:
            d.ellipse([x0, y - 7, x0 + 14, y + 7], outline=GREY)
            d.text((x0 + 22, y - 9), f"{r['method']}  failed", font=f, fill=(150, 150, 150))
        y += 24
    return _finish(img, path)
