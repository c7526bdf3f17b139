"""Tests for nanopeft/data.py: scanning folders and CSVs, the stratified split, decoding, the 3x multiplier, worker
independence of the augmentations, check_images and the demo dataset. Images are tiny so the file runs in seconds."""

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from nanopeft.augment import resize_normalize
from nanopeft.data import (ImageDataset, Sample, check_images, load_image, make_demo_dataset, scan_dataset,
                           stratified_split)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=3, per_class=4, size=(24, 32), seed=0)


def pool(counts):
    """Fake samples: counts[c] images of class c (paths need not exist for the split)."""
    return [Sample(f"{c}/{i}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


# ----------------------------------------------------------------------------- split
def test_split_paper_counts():
    train, val = stratified_split(pool([300] * 9), val_fraction=0.2, seed=42)  # paper.md §1: 240 / 60 per class
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
    Image.new("L", (8, 6), 100).save(tmp_path / "a" / "gray.PNG")
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(tmp_path / "a" / "nested" / "rgba.png")
    Image.new("P", (8, 6), 0).save(tmp_path / "b" / "pal.bmp")
    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "b" / "x.WebP", lossless=True)
    Image.new("RGB", (8, 6)).save(tmp_path / ".cache" / "ignored.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "b" / ".hidden.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    samples, names = scan_dataset(tmp_path)
    assert names == ["a", "b"]
    assert [s.path.rsplit("/", 1)[1] for s in samples] == ["gray.PNG", "rgba.png", "pal.bmp", "x.WebP"]
    images = [load_image(s.path) for s in samples]
    assert all(im.shape == (3, 6, 8) and im.dtype == torch.uint8 for im in images)
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
