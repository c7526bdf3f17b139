"""Tests for nanopeft/data/folders.py: scanning folders and CSVs, the stratified split, decoding, the 3x multiplier, worker
independence of the augmentations, check_images and the demo dataset. Images are tiny so the file runs in seconds."""

import os
import pickle
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from nanopeft.data.augment import resize_normalize
from nanopeft.data import folders as data
from nanopeft.data.folders import (ImageDataset, Sample, check_images, describe_unreadable, load_image, make_demo_dataset,
                           scan_dataset, scan_test_set, shown, skip_unreadable, stratified_split)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=3, per_class=4, size=(24, 32), seed=0)


def pool(counts):
    """Fake samples: counts[c] images of class c (paths need not exist for the split)."""
    return [Sample(f"{c}/{i}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


# ----------------------------------------------------------------------------- split
def test_split_paper_counts():
    train, val = stratified_split(pool([300] * 9), val_fraction=0.2, seed=42)  # docs/RECIPE.md "The recipe": 240 / 60 per class
    assert Counter(s.label for s in train) == {c: 240 for c in range(9)}
    assert Counter(s.label for s in val) == {c: 60 for c in range(9)}
    assert set(train).isdisjoint(val) and len(set(train) | set(val)) == 2700


def test_split_rounding_and_edge_cases():
    _, val = stratified_split(pool([7, 13, 5, 1, 2]), val_fraction=0.5, seed=0)
    # round half up (3.5 -> 4, 6.5 -> 7, 2.5 -> 3); a class of one stays in train; 2 -> 1
    assert Counter(s.label for s in val) == {0: 4, 1: 7, 2: 3, 4: 1}
    _, val = stratified_split(pool([7, 13]), val_fraction=0.2, seed=0)
    assert Counter(s.label for s in val) == {0: 1, 1: 3}  # 1.4 -> 1, 2.6 -> 3
    train, val = stratified_split(pool([4, 4]), val_fraction=0.0)
    assert val == [] and train == pool([4, 4])
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(pool([4]), val_fraction=1.0)


def test_split_reproducible_and_seed_sensitive():
    items = pool([50, 30, 20])
    a, b, c = (stratified_split(items, seed=s)[1] for s in (42, 42, 43))
    assert a == b and a != c
    assert a == sorted(a, key=items.index)  # input order kept


# ----------------------------------------------------------------------------- scanning
def test_scan_folder(demo):
    samples, names = scan_dataset(demo)
    assert names == ["class_0", "class_1", "class_2"]
    assert len(samples) == 12 and Counter(s.label for s in samples) == {0: 4, 1: 4, 2: 4}
    for s in samples:
        assert f"class_{s.label}" in s.path and s.source == ""
    assert {p[-4:] for p in (s.path for s in samples)} == {".png", ".jpg"}


def test_scan_folder_extensions_and_modes(tmp_path):
    """Upper-case extensions count, non-images and hidden files are skipped, grayscale/RGBA/palette load as RGB."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "nested").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    Image.new("L", (20, 16), 100).save(tmp_path / "a" / "gray.PNG")
    Image.new("RGBA", (20, 16), (10, 20, 30, 0)).save(tmp_path / "a" / "nested" / "rgba.png")
    Image.new("P", (20, 16), 0).save(tmp_path / "b" / "pal.bmp")
    Image.new("RGB", (20, 16), (1, 2, 3)).save(tmp_path / "b" / "x.WebP", lossless=True)
    Image.new("RGB", (20, 16)).save(tmp_path / ".cache" / "ignored.png")
    Image.new("RGB", (20, 16)).save(tmp_path / "b" / ".hidden.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    samples, names = scan_dataset(tmp_path)
    assert names == ["a", "b"]
    assert [s.path.rsplit("/", 1)[1] for s in samples] == ["gray.PNG", "rgba.png", "pal.bmp", "x.WebP"]
    images = [load_image(s.path) for s in samples]
    assert all(im.shape == (3, 16, 20) and im.dtype == torch.uint8 for im in images)
    assert images[0].unique().tolist() == [100]  # gray -> all three channels equal
    assert images[1][:, 0, 0].tolist() == [10, 20, 30]  # alpha dropped, colour kept
    assert images[3][:, 0, 0].tolist() == [1, 2, 3]


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_dataset(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="cat: class folder has no images"):
        scan_dataset(tmp_path)
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="folder or a .csv"):
        scan_dataset(tmp_path / "list.txt")


def test_scan_csv(demo, tmp_path):
    samples, _ = scan_dataset(demo)
    rel = [s.path.split(str(demo) + "/")[1] for s in samples]
    csv_path = demo / "manifest.csv"  # relative paths are resolved against the CSV's folder, not the cwd
    lines = ["path,label,source"] + [f"{p},{p.split('/')[0].replace('class_', 'c')},src{i % 2}"
                                     for i, p in enumerate(rel)]
    csv_path.write_text("\n".join(lines) + "\n")
    got, names = scan_dataset(csv_path)
    assert names == ["c0", "c1", "c2"]
    assert [(s.path, s.label) for s in got] == [(s.path, s.label) for s in samples]
    assert [s.source for s in got] == [f"src{i % 2}" for i in range(12)]
    # a test set is indexed with the training classes, and a label outside them is an error naming the row
    got, _ = scan_dataset(csv_path, class_names=["c2", "c1", "c0"])
    assert [s.label for s in got] == [2 - s.label for s in samples]
    with pytest.raises(ValueError, match=r"manifest.csv:2: label 'c0' is not one of"):
        scan_dataset(csv_path, class_names=["c1", "c2"])


def test_csv_errors(demo, tmp_path):
    good = next(demo.glob("class_0/*.png"))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['path'\]"):
        scan_dataset(bad)
    bad.write_text(f"path,label\n{good},a\nmissing.png,b\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: image not found: .*missing.png"):
        scan_dataset(bad)
    bad.write_text(f"path,label\n{good},\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: empty path or label"):
        scan_dataset(bad)
    bad.write_text("path,label\n")
    with pytest.raises(ValueError, match="no rows"):
        scan_dataset(bad)


# ----------------------------------------------------------------------------- dataset
def test_dataset_clean_path_is_the_formula(demo):
    samples, _ = scan_dataset(demo)
    ds = ImageDataset(samples, image_size=16)
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == samples[5].label
    torch.testing.assert_close(x, resize_normalize(load_image(samples[5].path).float() / 255, 16), atol=0, rtol=0)
    # no randomness anywhere on the clean path: other seeds, epochs and global RNG states give the same tensor
    other = ImageDataset(samples, image_size=16, strength="heavy", seed=9)  # multiplier 1: clean only
    other.set_epoch(3)
    torch.manual_seed(1234)
    assert torch.equal(other[5][0], x)


def test_multiplier_index_mapping(demo):
    samples, _ = scan_dataset(demo)
    clean = ImageDataset(samples, image_size=16)
    ds = ImageDataset(samples, image_size=16, multiplier=3, strength="medium", seed=0)
    assert len(ds) == 36
    for i in (0, 1, 2, 7, 35):
        assert ds.sample(i) == samples[i // 3]
        assert ds[i][1] == samples[i // 3].label
    assert torch.equal(ds[6][0], clean[2][0])  # variant 0 is clean
    v1, v2 = ds[7][0], ds[8][0]
    assert not torch.equal(v1, clean[2][0]) and not torch.equal(v1, v2)  # variants 1, 2 augmented, differently
    assert torch.equal(ds[7][0], v1)  # reproducible
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], v1)  # a new epoch, new augmentations
    plain = ImageDataset(samples, image_size=16, multiplier=3, strength="none")
    assert torch.equal(plain[7][0], clean[2][0])
    with pytest.raises(ValueError, match="strength"):
        ImageDataset(samples, strength="strong")
    with pytest.raises(ValueError, match="multiplier"):
        ImageDataset(samples, multiplier=0)


def test_same_items_for_any_worker_count(demo):
    samples, _ = scan_dataset(demo)
    ds = ImageDataset(samples, image_size=16, multiplier=3, strength="medium", seed=5)
    ds.set_epoch(2)
    ds = pickle.loads(pickle.dumps(ds))  # workers receive a pickled copy
    assert ds.epoch == 2

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, num_workers=workers)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    (x0, y0), (x2, y2) = batches(0), batches(2)
    assert torch.equal(y0, y2)
    assert torch.equal(x0, x2)


# ----------------------------------------------------------------------------- checking and demo data
def test_check_images_finds_truncated_and_non_images(demo, tmp_path):
    good = sorted(demo.glob("class_1/*.jpg"))
    data = good[0].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    items = [Sample(str(good[0]), 1), truncated, Sample(str(good[1]), 1), str(fake)]
    bad = check_images(items, workers=2)
    assert [p for p, _ in bad] == [str(truncated), str(fake)]
    assert "truncated" in bad[0][1].lower() and "UnidentifiedImageError" in bad[1][1]
    assert check_images(good) == []
    with pytest.raises(OSError, match="truncated.jpg"):  # loading it in training names the file too
        load_image(truncated)


def test_demo_dataset_is_learnable(tmp_path):
    """Nearest class-mean on the mean colour of the central region already separates the classes."""
    root = make_demo_dataset(tmp_path, num_classes=9, per_class=6, size=(32, 32), seed=1)
    samples, names = scan_dataset(root)
    assert len(names) == 9 and len(samples) == 54
    feats = torch.stack([load_image(s.path)[:, 12:20, 12:20].float().mean((1, 2)) for s in samples]) / 255
    labels = torch.tensor([s.label for s in samples])
    means = torch.stack([feats[labels == c].mean(0) for c in range(9)])
    pred = torch.cdist(feats, means).argmin(1)
    assert (pred == labels).float().mean() > 0.9
    again = make_demo_dataset(tmp_path / "again", num_classes=9, per_class=6, size=(32, 32), seed=1)
    assert np.array_equal(np.asarray(Image.open(again / "class_3" / "img_0002.png")),
                          np.asarray(Image.open(root / "class_3" / "img_0002.png")))  # seeded


# ----------------------------------------------------------------------------- bad images (docs/RELIABILITY.md)
def write_png(path, width, height, bit_depth=8, colour_type=0, rows=None):
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor a header that lies about the size).
    rows: the raw scanlines (without filter bytes); None writes a few garbage bytes of image data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    body = zlib.compress(b"".join(b"\0" + r for r in rows)) if rows is not None else b"\x78\x9c\x03\x00"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth,
                                                                           colour_type, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def half(path, source):
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rgb_photo(w=32, h=20):
    """Left half red, right half blue: orientation and colour are both visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 220
    a[:, w // 2:, 2] = 220
    return Image.fromarray(a)


def make_bad_image(case, d):
    """-> (path, check) where check(tensor) asserts a good decode, or check is a string the error must hold."""
    ok = d / "ok.jpg"
    rgb_photo().save(ok, quality=95)
    rgb_photo().save(d / "ok.png")
    if case == "img-truncated-jpeg":
        half(d / "t.jpg", ok)
        return d / "t.jpg", "truncated"
    if case == "img-truncated-png":
        half(d / "t.png", d / "ok.png")
        return d / "t.png", "t.png"
    if case == "img-zero-bytes":
        (d / "z.jpg").write_bytes(b"")
        return d / "z.jpg", "UnidentifiedImageError"
    if case == "img-text":
        (d / "notes.png").write_text("not an image\n")
        return d / "notes.png", "UnidentifiedImageError"
    if case == "img-bomb-header":
        write_png(d / "bomb.png", 100_000, 100_000)
        return d / "bomb.png", "DecompressionBomb"
    if case == "img-over-max-pixels":
        write_png(d / "big.png", 8000, 6000)  # 48 MP > MAX_PIXELS, below Pillow's own limit
        return d / "big.png", "MAX_PIXELS"
    if case == "img-non-utf8-name":
        bad = d / os.fsdecode(b"caf\xe9.jpg")
        half(bad, ok)
        return bad, "caf\\xe9.jpg"
    return make_good_image(case, d)


def make_good_image(case, d):
    p = d / "x.png"
    if case == "img-smaller-than-patch":  # upscaled to one patch on the shorter side, aspect kept
        Image.new("RGB", (8, 4), (200, 100, 50)).save(p)
        return p, lambda x: x.shape == (3, 16, 32) and (x[:, 8, 16].int() - torch.tensor([200, 100, 50])).abs().max() <= 2
    if case == "img-grayscale":
        Image.new("L", (20, 16), 100).save(p)
        return p, lambda x: x.unique().tolist() == [100]
    if case == "img-gray-alpha":
        Image.new("LA", (20, 16), (100, 0)).save(p)
        return p, lambda x: x.unique().tolist() == [100]
    if case == "img-rgba":
        Image.new("RGBA", (20, 16), (10, 20, 30, 0)).save(p)
        return p, lambda x: x[:, 0, 0].tolist() == [10, 20, 30]
    if case == "img-16bit-gray":
        Image.fromarray(np.full((16, 20), 40_000, np.uint16)).save(p)
        return p, lambda x: x.unique().tolist() == [40_000 >> 8]
    if case == "img-16bit-rgb":
        px = np.array([1000, 30_000, 65_535], ">u2")
        write_png(p, 20, 16, bit_depth=16, colour_type=2, rows=[np.tile(px, 20).tobytes()] * 16)
        return p, lambda x: x[:, 5, 5].tolist() == [1000 >> 8, 30_000 >> 8, 255]
    if case in ("img-palette", "img-palette-transparency"):
        im = Image.new("P", (20, 16), 1)
        im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        im.save(p, **({"transparency": 1} if case == "img-palette-transparency" else {}))
        return p, lambda x: x[:, 3, 3].tolist() == [200, 100, 50]
    if case == "img-cmyk-jpeg":
        Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(d / "c.jpg")
        return d / "c.jpg", lambda x: (x[:, 8, 10].int() - torch.tensor([255, 0, 0])).abs().max() <= 8
    if case == "img-large-jpeg":  # over MAX_PIXELS (lowered by the test): decoded at half size
        rgb_photo(64, 48).save(d / "l.jpg", quality=95)
        return d / "l.jpg", lambda x: x.shape == (3, 24, 32)
    if case == "img-exif-rotated":  # orientation 6: shown turned 90° clockwise, so the red left half on top
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb_photo().save(d / "r.jpg", exif=exif, quality=95)
        return d / "r.jpg", lambda x: x.shape == (3, 32, 20) and x[0, 2, 10] > 150 > x[2, 2, 10]
    raise KeyError(case)


def test_bad_image(tmp_path, monkeypatch, reliability_case):
    """Each image a user's folder may hold decodes correctly or fails with an OSError naming the file, and
    check_images (what --skip-bad relies on) finds exactly the failures."""
    case = reliability_case["id"]
    if case == "img-large-jpeg":
        monkeypatch.setattr(data, "MAX_PIXELS", 2000)  # 64 × 48 = 3072 pixels
    path, check = make_bad_image(case, tmp_path)
    if isinstance(check, str):
        with pytest.raises(OSError) as err:
            load_image(path)
        message = str(err.value)
        assert shown(path) in message and check in message and "\n" not in message, message
        message.encode("utf-8")  # printable to a UTF-8 terminal or log, even for a non-UTF-8 name
        assert [p for p, _ in check_images([path], workers=1)] == [str(path)]
    else:
        x = load_image(path)
        assert x.dtype == torch.uint8 and x.shape[0] == 3 and check(x), x[:, :2, :2]
        upscaled = []
        assert check_images([path], workers=1, upscaled=upscaled) == []
        assert upscaled == ([str(path)] if case == "img-smaller-than-patch" else [])


# ----------------------------------------------------------------------------- folder layouts
def good(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 30)).save(path)
    return path


def test_dataset_layout(tmp_path, reliability_case):
    case, root = reliability_case["id"], tmp_path / "data"
    if case == "ds-hidden-and-non-images":
        keep = good(root / "a" / "img.png")
        for hidden in (root / "a" / ".hidden.png", root / "a" / ".cache" / "x.png", root / ".git" / "y.png"):
            good(hidden)
        (root / "a" / "notes.txt").write_text("x")
        (root / "a" / "Thumbs.db").write_bytes(b"\0")
        (root / "a" / "x.jpg").mkdir()
        os.mkfifo(root / "a" / "y.png")  # opening it would block forever
        samples, names = scan_dataset(root)
        assert names == ["a"] and [s.path for s in samples] == [str(keep)]
    elif case == "ds-empty-class":
        good(root / "a" / "1.png")
        (root / "b").mkdir()
        with pytest.raises(ValueError, match=f"{root / 'b'}: class folder has no images"):
            scan_dataset(root)
    elif case == "ds-no-classes":
        root.mkdir()
        good(root / "loose.png")
        with pytest.raises(ValueError, match=f"{root}: no class sub-folders"):
            scan_dataset(root)
    elif case == "ds-single-image-class":
        for i in range(5):
            good(root / "a" / f"{i}.png")
        good(root / "b" / "only.png")
        train, val = stratified_split(scan_dataset(root)[0], val_fraction=0.5, seed=0)
        assert [s.label for s in train].count(1) == 1 and [s.label for s in val].count(1) == 0
        assert ImageDataset(train, image_size=16)[len(train) - 1][1] == 1
    elif case == "ds-non-utf8-names":
        name = os.fsdecode(b"caf\xe9.png")
        p = good(root / "a" / name)
        samples, _ = scan_dataset(root)
        assert [s.path for s in samples] == [str(p)] and load_image(p).shape == (3, 16, 20)
        assert shown(p).endswith("caf\\xe9.png") and shown(p).encode("utf-8")
    elif case == "ds-unseen-test-class":
        for c in "abc":
            for i in (1, 2):
                good(root / c / f"{i}.png")
        with pytest.raises(ValueError, match="label 'c' is not one of the classes"):
            scan_dataset(root, class_names=["a", "b"])
        samples, unseen = scan_test_set(root, ["b", "a"])
        assert [s.label for s in samples] == [1, 1, 0, 0] and unseen == {"c": 2}
    elif case in ("ds-skip-bad", "ds-csv-not-utf8", "ds-csv-utf16"):
        unreadable_or_csv(case, root, tmp_path)
    else:
        raise KeyError(case)


def unreadable_or_csv(case, root, tmp_path):
    if case == "ds-skip-bad":
        files = [good(root / "a" / f"{i}.png") for i in range(3)]
        (root / "a" / "9.png").write_bytes(b"")
        half(root / "a" / "8.png", files[0])
        samples, _ = scan_dataset(root)
        bad = check_images(samples, workers=2)
        assert sorted(p for p, _ in bad) == [str(root / "a" / "8.png"), str(root / "a" / "9.png")]
        assert [s.path for s in skip_unreadable(samples, bad)] == [str(f) for f in files]
        lines = describe_unreadable(bad)
        assert len(lines) == 2 and all(line.startswith(f"skipped {root}") for line in lines)
    elif case in ("ds-csv-not-utf8", "ds-csv-utf16"):
        p = good(root / "a" / "1.png")
        csv_path = tmp_path / "m.csv"
        csv_path.write_bytes(f"path,label\n{p},café\n".encode("latin-1" if case == "ds-csv-not-utf8" else "utf-16"))
        with pytest.raises(ValueError, match=f"{csv_path}: not UTF-8 text \\(byte \\d+\\)"):
            scan_dataset(csv_path)


# ----------------------------------------------------------------------------- split layouts
def test_split_layout_trains_on_train_validates_on_val_and_never_reads_test(tmp_path):
    from nanopeft.data.folders import split_folders, training_pool

    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 2), ("test", 4)):
        for c in ("cat", "dog"):
            for i in range(n):
                good(root / split / c / f"{i}.png")
    (root / "test" / "bird").mkdir()  # test/ is never read: a class only there (or a broken file) changes nothing
    (root / "test" / "cat" / "broken.png").write_text("not an image")
    train, val, names = training_pool(root, val_fraction=0.5, seed=0)
    assert names == ["cat", "dog"] and len(train) == 6 and len(val) == 4
    assert all("/train/" in s.path for s in train) and all("/val/" in s.path for s in val)
    assert split_folders(root)["test"] == root / "test"
    # train/ and test/ only: validation is a stratified split of train/
    (root / "val").rename(tmp_path / "elsewhere")
    train, val, names = training_pool(root, val_fraction=0.5, seed=0)
    assert len(train) + len(val) == 6 and all("/train/" in s.path for s in train + val) and len(val) == 4
    # a class folder that happens to be called "train" beside real classes is no split layout
    good(root / "cat" / "0.png")
    assert split_folders(root) is None


def test_split_layout_refuses_a_val_class_training_never_saw_and_two_val_folders(tmp_path):
    from nanopeft.data.folders import training_pool

    root = tmp_path / "data"
    for c in ("cat", "dog"):
        good(root / "train" / c / "0.png")
    good(root / "val" / "cow" / "0.png")
    with pytest.raises(ValueError, match="'cow' is not one of the classes"):
        training_pool(root)
    good(root / "valid" / "cat" / "0.png")
    with pytest.raises(ValueError, match="both validation folders"):
        training_pool(root)


@pytest.mark.parametrize("layout", ["folder", "split"])
def test_fewer_than_two_classes_is_refused_in_one_line(tmp_path, layout):
    from nanopeft.data.folders import training_pool

    root = tmp_path / "data"
    base = root / "train" if layout == "split" else root
    for i in range(4):
        good(base / "only" / f"{i}.png")
    with pytest.raises(ValueError) as e:
        training_pool(root)
    assert "at least two classes" in str(e.value) and "'only'" in str(e.value) and "\n" not in str(e.value)
