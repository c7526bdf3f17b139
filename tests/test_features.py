"""nanopeft/training/features.py: the frozen backbone's features cached once per view; the cached run is the uncached
one when nothing random touches the backbone, and a stale cache is never reused."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

FAST = ["--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--lr", "1e-3",
        "--eval-batch-size", "16", "--device", "cpu"]
EXACT = ["--augment", "none", "--rope-rescale", "none", "--rope-shift", "none", "--rope-jitter", "none"]


def frozen(tmp_path, name, train_images, weights, *extra):
    out = tmp_path / name
    train.main(["--out", str(out), "--method", "frozen", "--weights", str(weights), "--data", str(train_images),
                *FAST, *extra])
    return out


def epochs(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("val_accuracy", "val_loss", "val_macro_f1")} for r in rows if "val_accuracy" in r]


@pytest.mark.slow
def test_cached_frozen_run_equals_the_uncached_one(tmp_path, train_images, tiny_ckpt):
    weights = tiny_ckpt(gated=True)[0]
    a = frozen(tmp_path, "cached", train_images, weights, *EXACT, "--epochs", "2")
    b = frozen(tmp_path, "uncached", train_images, weights, *EXACT, "--epochs", "2", "--cache-features", "no")
    assert (a / "features.safetensors").is_file() and not (b / "features.safetensors").exists()
    ea, eb = epochs(a), epochs(b)
    assert len(ea) == 2 and all(x == pytest.approx(y, abs=1e-6) for x, y in zip(ea, eb))
    ha, hb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert ha.keys() == hb.keys() and all(torch.allclose(ha[k], hb[k], atol=1e-6, rtol=1e-5) for k in ha)
    za, zb = load_file(a / "val_logits.safetensors"), load_file(b / "val_logits.safetensors")
    assert torch.equal(za["labels"], zb["labels"]) and (za["logits"] - zb["logits"]).abs().max() < 1e-4
    log = (a / "train.log").read_text()
    assert "feature cache: computed features.safetensors" in log and "eval-mode features" in log


@pytest.mark.slow
def test_the_cache_holds_every_view_is_reused_and_never_stale(tmp_path, train_images, tiny_ckpt):
    weights = tiny_ckpt(gated=True)[0]
    out = frozen(tmp_path, "views", train_images, weights, "--epochs", "1", "--cache-views", "2",
                 "--cache-dtype", "fp16", "--max-steps", "2")
    f = out / "features.safetensors"
    with safe_open(f, "pt") as h:
        meta, train_f = h.metadata(), h.get_tensor("train")
    paths = json.loads(meta["train_paths"])
    assert meta["views"] == "2" and train_f.shape[0] == 2 * len(paths) and train_f.dtype == torch.float16
    assert not torch.equal(train_f[0], train_f[1])  # view 1 is augmented
    key, mtime = meta["key"], f.stat().st_mtime_ns
    train.main(["--resume", str(out), "--max-steps", "4"])  # the resumed run reads the same file
    log = (out / "train.log").read_text()
    assert f.stat().st_mtime_ns == mtime and "feature cache: reused" in log
    assert "×2 per epoch" in log and "×3 per epoch" not in log  # the cache's views, not --multiplier
    from nanopeft.config import TrainConfig
    from nanopeft.data.folders import training_pool
    from nanopeft.training.features import cache_key

    cfg = TrainConfig(**json.loads((out / "config.json").read_text())["train"]).resolved()
    tr, val, _ = training_pool(cfg.data, cfg.val_fraction, cfg.split_seed)
    assert cache_key(cfg, tr, val, 2, None) == key
    for change in ({"pool": "mean"}, {"image_size": 48}, {"quant": "none"}, {"seed": 1}, {"augment": "light"}):
        assert cache_key(cfg.__class__(**{**cfg.__dict__, **change}), tr, val, 2, None) != key, change
    assert cache_key(cfg, tr, val, 3, None) != key and cache_key(cfg, tr, val, 2, torch.bfloat16) != key
    Path(tr[0].path).touch()  # an image changed on disk
    assert cache_key(cfg, tr, val, 2, None) != key
