"""Data: find the images, split them, decode them, and serve (pixel_values, label) to the training loop.

    image folder  root/<class>/**/*.jpg  ─┐
    or CSV        path,label[,source]    ─┴─> scan_dataset ──> [Sample(path, label, source)], class_names
    training pool ──> stratified_split(val_fraction=0.2, seed=42) ──> train, val    (docs/RECIPE.md "The recipe")
    ImageDataset(train, multiplier=3, strength="medium"):        (docs/RECIPE.md "The recipe")
        index i -> image i // 3, variant i % 3: variant 0 clean, variants 1, 2 augmented
        Pillow decode -> float [0, 1] -> augment (torch ops, one generator per sample) -> resize 224 + ImageNet norm

Class index = position in the sorted label strings (the paper's order: capitals first). Validation and test
datasets use multiplier=1 and are never augmented. `check_images` decodes everything once up front, so a corrupt
file stops a run before training starts instead of crashing a DataLoader worker hours later.

Bad input (tests/test_folders.py, docs/RELIABILITY.md): hidden files and non-images in class folders are ignored;
grayscale, RGBA, palette, 16-bit and CMYK images become 8-bit RGB; EXIF rotation is applied; an image smaller
than one patch, a decompression bomb (JPEGs are decoded downscaled instead), or a file Pillow cannot decode is an
OSError naming the file, which check_images collects so that `--skip-bad` can leave it out.
"""

import csv
import hashlib
from collections import Counter
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from .augment import STRENGTH_NAMES, augment, resize_normalize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # matched case-insensitively
# Decoded-size limits. MAX_PIXELS bounds the memory of one image (40 MP: 120 MB as uint8, 480 MB as the float
# tensor augmentation works on), far above any camera frame; a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale
# (Pillow's draft mode, no full-size decode), anything else larger is refused. Pillow's own decompression-bomb
# check at open (Image.MAX_IMAGE_PIXELS, left at its default) refuses still larger files before we see them.
MAX_PIXELS = 40_000_000
MIN_SIDE = 16  # one DINOv3 patch: a smaller image is upscaled to it on decode (the augmentations' filters need it)


@dataclass(frozen=True)
class Sample:
    path: str  # image file
    label: int | tuple[int, ...]  # index into class_names; multi-label (--task multilabel): the indices, sorted
    source: str = ""  # optional sub-dataset name (CSV column `source`), for per-source metrics


# ----------------------------------------------------------------------------- finding images
def scan_dataset(path, class_names=None, multilabel: bool = False):
    """Image folder or CSV manifest -> (samples, class_names).

    Folder: one sub-folder per class, images anywhere below it (hidden files and folders skipped).
    CSV: a header row with `path,label` and optionally `source`; relative paths are resolved against the CSV's folder.
    class_names: pass the training classes when scanning a test set, so indices match and unknown labels fail.
    multilabel: a CSV with a `labels` column instead, labels separated by ';' (empty: none); a label is then the
    sorted tuple of its class indices.
    """
    if multilabel:
        return _scan_multilabel(Path(path), class_names)
    rows = _rows(Path(path))
    names = sorted({label for _, label, _, _ in rows}) if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for file, label, source, where in rows:
        if label not in index:
            raise ValueError(f"{shown(where)}: label {label!r} is not one of the classes {names}")
        samples.append(Sample(file, index[label], source))
    return samples, names


def _scan_multilabel(path: Path, class_names=None):
    if path.is_dir() or path.suffix.lower() != ".csv":
        raise ValueError(f"{shown(path)}: --task multilabel reads a CSV manifest path,labels[,source] (labels "
                         f"separated by ';'), not a folder of classes")
    rows = _read_csv(path, label_column="labels")
    split = lambda text: sorted({t.strip() for t in text.split(";") if t.strip()})
    names = sorted({n for _, text, _, _ in rows for n in split(text)}) if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for file, text, source, where in rows:
        unknown = [n for n in split(text) if n not in index]
        if unknown:
            raise ValueError(f"{shown(where)}: label {unknown[0]!r} is not one of the classes {names}")
        samples.append(Sample(file, tuple(sorted(index[n] for n in split(text))), source))
    return samples, names


SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def split_folders(path) -> dict[str, Path | None] | None:
    """The ImageFolder split layout (timm, torchvision): root/{train,val[,test]}/<class>/<image>. Returns
    {"train": dir, "val": dir or None, "test": dir or None} when every visible sub-folder of `path` is a
    split name (val may be spelt valid or validation) and train/ is among them, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    subs = {d.name: d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")}
    known = {n for names in SPLIT_DIRS.values() for n in names}
    if "train" not in subs or not set(subs) <= known:
        return None
    vals = [subs[n] for n in SPLIT_DIRS["val"] if n in subs]
    if len(vals) > 1:
        raise ValueError(f"{shown(path)}: {' and '.join(shown(v.name) for v in vals)} are both validation "
                         f"folders; keep one")
    return {"train": subs["train"], "val": vals[0] if vals else None, "test": subs.get("test")}


def training_pool(path, val_fraction=0.2, seed=42, multilabel: bool = False):
    """--data -> (train samples, val samples, class_names). A folder (or CSV) of classes is split
    stratified (val_fraction, seed); a split layout (split_folders) trains on train/ and validates on val/
    (or a stratified split of train/ when it has no val/), and never reads test/. A single-label data set
    needs at least two classes."""
    if multilabel:  # one CSV; stratified by label set (each distinct set is a stratum), one class is enough
        items, names = scan_dataset(path, multilabel=True)
        train, val = stratified_split(items, val_fraction=val_fraction, seed=seed)
        return train, val, names
    splits = split_folders(path)
    if splits is None:
        items, names = scan_dataset(path)
        train, val = stratified_split(items, val_fraction=val_fraction, seed=seed)
    else:
        train, names = scan_dataset(splits["train"])
        if splits["val"] is not None:
            val, _ = scan_dataset(splits["val"], class_names=names)
        else:
            train, val = stratified_split(train, val_fraction=val_fraction, seed=seed)
    if len(names) < 2:
        where = splits["train"] if splits else path
        raise ValueError(f"{shown(where)}: {len(names)} class ({', '.join(map(repr, names)) or 'none'}); a "
                         f"single-label classifier needs at least two classes")
    return train, val, names


def scan_test_set(path, class_names):
    """A test set against the training classes -> (samples of those classes, {unseen label: image count}).

    For eval: scan_dataset(path, class_names) refuses a label training never saw; this lets the caller
    report the unseen classes (or evaluate the known ones and say how many images it left out)."""
    rows = _rows(Path(path))
    index = {name: i for i, name in enumerate(class_names)}
    unseen = Counter(label for _, label, _, _ in rows if label not in index)
    samples = [Sample(file, index[label], source) for file, label, source, _ in rows if label in index]
    return samples, dict(sorted(unseen.items()))


def shown(path) -> str:
    """A path for messages and logs: a file name that is not valid UTF-8 (Python keeps its bytes as lone
    surrogates, which print() and UTF-8 files refuse) gets those bytes written as \\xNN escapes."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _rows(path):
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {shown(path)}")
    if path.is_dir():
        return _scan_folder(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    raise ValueError(f"{shown(path)}: expected an image folder or a .csv manifest")


def _is_image(f, root):
    visible = not any(part.startswith(".") for part in f.relative_to(root).parts)
    return visible and f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()


def _scan_folder(root):
    """-> [(file, label, source, where)] for root/<class>/**/<image>, files sorted so the order is reproducible."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{shown(root)}: no class sub-folders (expected {shown(root)}/<class>/<image>)")
    rows = []
    for d in class_dirs:
        files = sorted(f for f in d.rglob("*") if _is_image(f, d))
        if not files:
            raise ValueError(f"{shown(d)}: class folder has no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        rows += [(str(f), d.name, "", str(d)) for f in files]
    return rows


def _read_csv(csv_path, label_column: str = "label"):
    """-> [(file, label, source, where)] from a `path,label[,source]` manifest; errors name the file and line."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: tolerate Excel's byte-order mark
            rows = _csv_rows(csv.DictReader(f), csv_path, label_column)
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown(csv_path)}: not UTF-8 text (byte {e.start}); save the manifest as UTF-8") from e
    except csv.Error as e:  # e.g. a NUL byte: not a text file
        raise ValueError(f"{shown(csv_path)}: not a readable CSV file ({e})") from e
    if not rows:
        raise ValueError(f"{shown(csv_path)}: no rows after the header")
    return rows


def _csv_rows(reader, csv_path, label_column: str = "label"):
    header = [(name or "").strip() for name in (reader.fieldnames or [])]
    missing = [c for c in ("path", label_column) if c not in header]
    if missing:
        hint = ("; a `labels` column is read with --task multilabel" if label_column == "label" and "labels" in header
                else "")
        raise ValueError(f"{shown(csv_path)}: missing column(s) {missing}; need a header row path,{label_column}"
                         f"[,source], got {header}{hint}")
    reader.fieldnames, rows = header, []
    for row in reader:
        where = f"{shown(csv_path)}:{reader.line_num}"
        file, label = (row.get("path") or "").strip(), (row.get(label_column) or "").strip()
        if not file or not (label or label_column == "labels"):  # multi-label: an empty field means no label
            raise ValueError(f"{where}: empty path or label")
        full = Path(file).expanduser()
        full = full if full.is_absolute() else csv_path.parent / full
        if not full.is_file():
            raise ValueError(f"{where}: image not found: {shown(full)}")
        rows.append((str(full), label, (row.get("source") or "").strip(), where))
    return rows


def stratified_split(samples, val_fraction=0.2, seed=42):
    """Split into (train, val) with round(n_c · val_fraction) images of each class c in val (half rounds up, and at
    least one image per class stays in train). Deterministic given the seed and the input order; both lists keep
    the input order. Same per-class counts as sklearn's train_test_split(stratify=...), not the same images."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    by_class = defaultdict(list)
    for i, s in enumerate(samples):
        by_class[s.label].append(i)
    in_val = set()
    for label in sorted(by_class):  # fixed class order, so each class always gets the same slice of the stream
        idx = by_class[label]
        n_val = min(math.floor(len(idx) * val_fraction + 0.5), len(idx) - 1)
        perm = torch.randperm(len(idx), generator=g).tolist()
        in_val.update(idx[j] for j in perm[:n_val])
    train = [s for i, s in enumerate(samples) if i not in in_val]
    val = [s for i, s in enumerate(samples) if i in in_val]
    return train, val


# ----------------------------------------------------------------------------- decoding
def load_image(path):
    """Decode with Pillow -> uint8 (3, H, W) RGB. EXIF orientation is applied (cv2.imread, which the seed code used,
    does so too); grayscale, RGBA (alpha dropped, as cv2 does), palette and CMYK images become RGB, 16-bit ones
    keep their high byte. Any failure is an OSError naming the file (its cause chained)."""
    try:
        with Image.open(path) as im:
            _fit_in_memory(im)
            im = ImageOps.exif_transpose(im)
            if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit gray: convert("RGB") would clip at 255
                im = Image.fromarray((np.asarray(im).clip(0, 65535).astype(np.uint32) >> 8).astype(np.uint8))
            rgb = im.convert("RGB")
            if min(rgb.size) < MIN_SIDE:  # a thumbnail is still an image: up to one patch, aspect kept
                k = MIN_SIDE / min(rgb.size)
                rgb = rgb.resize((max(MIN_SIDE, round(rgb.width * k)), max(MIN_SIDE, round(rgb.height * k))),
                                 Image.Resampling.BICUBIC)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise OSError(f"cannot read image {shown(path)}: {type(e).__name__}: {e}") from e
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _fit_in_memory(im):
    """Decode a JPEG over MAX_PIXELS at a reduced scale (draft mode: 1/2, 1/4 or 1/8, by the decoder, never
    full size), refuse anything else over it. Before any decoding."""
    w, h = im.size
    if w * h > MAX_PIXELS and im.format == "JPEG":
        scale = next((s for s in (2, 4, 8) if w * h <= MAX_PIXELS * s * s), 8)
        im.draft("RGB", (-(-w // scale), -(-h // scale)))
    if im.size[0] * im.size[1] > MAX_PIXELS:
        raise ValueError(f"{w}×{h} pixels is more than MAX_PIXELS={MAX_PIXELS:,} (a decompression bomb?); "
                         f"downscale it")


def skip_unreadable(samples, bad):
    """samples without the unreadable images check_images found (`--skip-bad`), input order kept."""
    skip = {str(p) for p, _ in bad}
    return [s for s in samples if str(s.path) not in skip]


def describe_unreadable(bad) -> list[str]:
    """One line per unreadable image, for train.log / eval's log: `skipped <path>: <reason>`."""
    return [f"skipped {shown(p)}: {reason}" for p, reason in bad]


def check_images(samples, workers=None, progress=True, upscaled: list | None = None):
    """Fully decode every image (Samples or paths) -> [(path, reason)] for the unreadable ones, in input order.

    Uses the training decoder itself, so what passes here loads in training. Threads suffice: Pillow releases the
    GIL while decoding. A progress bar appears for more than 1,000 images. `upscaled`, a list, receives the
    paths of the images smaller than one patch (load_image upscales them; train.log counts them).
    """
    paths = [s.path if isinstance(s, Sample) else str(s) for s in samples]
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    small = set()

    def reason(p):
        try:
            with Image.open(p) as im:  # the size before decoding: was it upscaled?
                if min(im.size) < MIN_SIDE:
                    small.add(p)
        except Exception:  # noqa: BLE001 - load_image below reports it
            pass
        try:
            load_image(p)
            return None
        except OSError as e:
            cause = e.__cause__ or e
            return f"{type(cause).__name__}: {cause}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(tqdm(pool.map(reason, paths), total=len(paths), desc="checking images", unit="img",
                            disable=not progress or len(paths) <= 1000))
    if upscaled is not None:
        upscaled += [p for p, r in zip(paths, reasons) if p in small and r is None]
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


# ----------------------------------------------------------------------------- the dataset
def sample_seed(seed, epoch, index):
    """One 64-bit seed per (run seed, epoch, dataset index): an image's augmentation depends on nothing else, not
    on the worker that loads it nor on global RNG state. (torch's CPU generator keeps the low 32 bits; a rare
    collision only repeats one augmentation.)"""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


class ImageDataset(torch.utils.data.Dataset):
    """samples -> (pixel_values float32 (3, S, S) normalised, label int), S = image_size.

    len = len(samples) · multiplier; index i is image i // multiplier, variant i % multiplier. Variant 0 is the clean
    image, the others are augmented at `strength` ("none" | "light" | "medium" | "heavy") with a generator seeded
    from (seed, epoch, i). Call set_epoch(e) before each epoch for fresh augmentations; DataLoader workers see it
    only if they are started after the call (the default; persistent_workers=True would freeze the epoch).
    """

    def __init__(self, samples, image_size=224, multiplier=1, strength="none", seed=0, num_classes=None):
        if strength not in STRENGTH_NAMES:
            raise ValueError(f"strength must be one of {STRENGTH_NAMES}, got {strength!r}")
        if multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {multiplier}")
        self.samples, self.image_size, self.multiplier = list(samples), image_size, multiplier
        self.strength, self.seed, self.epoch = strength, seed, 0
        self.num_classes = num_classes  # multi-label samples: their label tuple becomes a (C,) 0/1 vector

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples) * self.multiplier

    def sample(self, index):
        """The Sample (path, label, source) behind dataset index `index`, e.g. for eval's predictions.csv."""
        return self.samples[index // self.multiplier]

    def __getitem__(self, index):
        s = self.sample(index)
        x = load_image(s.path).float() / 255  # (3, H, W) in [0, 1]; augment at the original size, resize last
        if index % self.multiplier:  # variant 0 is always clean (docs/RECIPE.md "The recipe")
            x = augment(x, torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index)), self.strength)
        y = s.label
        if isinstance(y, tuple):  # multi-label: the indices -> a multi-hot target for BCE
            y = torch.zeros(self.num_classes).index_fill_(0, torch.tensor(y, dtype=torch.long), 1.0) if y else \
                torch.zeros(self.num_classes)
        return resize_normalize(x, self.image_size), y  # (3, S, S)


# ----------------------------------------------------------------------------- a toy dataset
def make_demo_dataset(root, num_classes=9, per_class=20, size=(64, 64), seed=0):
    """Write root/class_<k>/img_<i>.{png,jpg} (alternating formats): a small, learnable stand-in for the cow data,
    for `train.py --demo` and the tests. Class k is a shape (disc, square or bar, by k mod 3) in hue k / num_classes
    on a noisy gray background; position, size, brightness and noise vary per image. Returns root as a Path."""
    root, (h, w) = Path(root), size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    width = len(str(num_classes - 1))  # zero-pad so sorted names keep numeric order
    for k in range(num_classes):
        folder = root / f"class_{k:0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(_hue_to_rgb(k / num_classes))
        for i in range(per_class):
            img = rng.uniform(0.2, 0.5) + rng.normal(0, 0.06, (h, w, 1)) + np.zeros((1, 1, 3))  # (H, W, 3) gray
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            r = rng.uniform(0.2, 0.35) * min(h, w)
            mask = [(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2,  # disc
                    (abs(yy - cy) < r) & (abs(xx - cx) < r),  # square
                    abs(yy - cy) < r / 2][k % 3]  # horizontal bar
            img[mask] = colour * rng.uniform(0.7, 1.0) + rng.normal(0, 0.04, (int(mask.sum()), 3))
            pixels = Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))
            if i % 2:
                pixels.save(folder / f"img_{i:04d}.jpg", quality=90)
            else:
                pixels.save(folder / f"img_{i:04d}.png")
    return root


def _hue_to_rgb(hue):  # fully saturated colour at `hue` (fraction of a turn), as (r, g, b) in [0, 1]
    return tuple(float(np.clip(abs((hue * 6 + n) % 6 - 3) - 1, 0, 1)) for n in (0, 4, 2))


def multilabel_manifest(root) -> Path:
    """The multi-label variant of a make_demo_dataset folder: root.parent/<root name>_multilabel.csv with
    path,labels, each image labelled with its shape and its colour ("shape1;hue4"; class k of the demo is
    shape k mod 3 in hue k), every seventh image with no label at all (an empty field). Written once."""
    root = Path(root)
    out = root.parent / f"{root.name}_multilabel.csv"
    if out.is_file():
        return out
    items, names = scan_dataset(root)
    lines = ["path,labels"]
    for i, s in enumerate(items):
        k = int(names[s.label].rsplit("_", 1)[-1])
        lines.append(f"{os.path.relpath(s.path, out.parent)},{'' if i % 7 == 6 else f'shape{k % 3};hue{k}'}")
    from ..files.checkpoint_format import atomic_write

    atomic_write(out, lambda p: p.write_text("\n".join(lines) + "\n"))
    return out
