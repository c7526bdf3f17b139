"""The feature cache: a frozen backbone's pooled features, computed once and reused every epoch.

A frozen DINOv3 maps an image to the same feature at every epoch (in eval mode, without train-time RoPE
augmentation), so training a head on it needs one backbone forward per view, not one per view per epoch:

    train images × K views ─► backbone.features(x, pool), eval mode, once ─► RUN/features.safetensors
    epoch after epoch:        (feature, label) batches ─► head ─► loss        (no backbone in the loop)

The views are the multiplier's (docs/RECIPE.md): view 0 is the clean image, views 1..K−1 augmented as
train.py's first epoch draws them (seeded by --seed), then kept. Without a cache a frozen run draws fresh
augmentations each epoch and (with the hub config's RoPE augmentation) different features; with
`--augment none` and `--rope-* none` the two are the same run (tests/test_features.py).

The file holds `train` (N·K, D), `train_labels`, `val` (Nv, D), `val_labels`, in fp32 (or fp16 by
--cache-dtype), and in its metadata the cache key, K, and the image paths. The key hashes everything that
changes a feature (the backbone's files, quantization, compute dtype, pooling, image size, RoPE settings,
preprocessing, augmentation, views and seed, and each image's path, size and time), so a stale file is
recomputed, never reused. Under torchrun each process computes every world-th view and one all-reduce
joins them; rank 0 writes the file (atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from tqdm import tqdm

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..device import autocast

CACHE_FILE = "features.safetensors"


def cache_key(cfg, train_samples, val_samples, views: int, amp) -> str:
    """sha256 of everything that changes a cached feature (see the module docstring)."""
    weights = Path(cfg.weights)
    files = sorted(weights.iterdir()) if weights.is_dir() else [weights]

    def stamp(p):
        st = os.stat(p)
        return [str(p), st.st_size, st.st_mtime_ns]

    what = {"backbone": [stamp(f) for f in files if f.is_file()], "quant": cfg.quant, "dtype": str(amp),
            "pool": cfg.pool, "image_size": cfg.image_size,
            "rope": [str(cfg.rope_rescale), str(cfg.rope_shift), str(cfg.rope_jitter)],
            "preprocessing": ["squash bilinear antialias", list(IMAGENET_MEAN), list(IMAGENET_STD)],
            "augment": cfg.augment, "views": views, "seed": cfg.seed, "cache_dtype": cfg.cache_dtype,
            "train": [stamp(s.path) + [s.label] for s in train_samples],
            "val": [stamp(s.path) + [s.label] for s in val_samples]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def compute_features(backbone: nn.Module, dataset, pool: str, device, amp, rank: int = 0, world: int = 1,
                     batch_size: int = 16, desc: str = "features", workers: int = 0) -> torch.Tensor:
    """(len(dataset), D) float32 features of every item, in eval mode; each rank computes items
    rank, rank + world, ... and an all-reduce (a sum of disjoint rows) gives every rank all of them."""
    was_training = backbone.training
    backbone.eval()
    mine = list(range(rank, len(dataset), world))
    # a private generator: iterating a DataLoader otherwise draws its seed from the global RNG, and the
    # head's dropout masks after the cache would then differ from an uncached run's
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=min(workers, os.cpu_count() or 1),
                                         generator=torch.Generator().manual_seed(0))
    rows = []
    for x, _ in tqdm(loader, desc=desc, unit="batch", disable=rank != 0, dynamic_ncols=True):
        with autocast(device, amp):
            rows.append(backbone.features(x.to(device), pool).float().cpu())   # (b, D)
    backbone.train(was_training)
    D = rows[0].shape[1] if rows else backbone.feature_dim(pool)
    out = torch.zeros(len(dataset), D, dtype=torch.float64)
    if rows:
        out[rank::world] = torch.cat(rows).double()
    if world > 1:
        out = out.to(device)
        torch.distributed.all_reduce(out)
    return out.float().cpu()


def read_cache(path: Path, key: str) -> dict | None:
    """The cached tensors if `path` holds features made under `key`, else None (missing, stale or damaged)."""
    from safetensors import safe_open

    from ..files.checkpoint_format import CheckpointError, read_safetensors_header

    if not path.is_file():
        return None
    try:
        header = read_safetensors_header(path)
    except CheckpointError:
        return None
    if header.metadata.get("key") != key or set(header.tensors) != {"train", "train_labels", "val", "val_labels"}:
        return None
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in header.tensors}


def write_cache(path: Path, tensors: dict, key: str, views: int, train_paths, val_paths) -> None:
    from safetensors.torch import save_file

    from ..files.checkpoint_format import atomic_write

    meta = {"format": "pt", "key": key, "views": str(views), "train_paths": json.dumps([str(p) for p in train_paths]),
            "val_paths": json.dumps([str(p) for p in val_paths]),
            "layout": "train row i = image i // views, view i % views (0: clean); val: clean images"}
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))


def _from_rank0(found: dict | None, device) -> dict | None:
    """Every rank gets rank 0's cached tensors (or None when rank 0 found none): one decision for all."""
    import torch.distributed as dist

    names = ("train", "train_labels", "val", "val_labels")
    shapes = [list(found[k].shape) for k in names] if found is not None else None
    box = [shapes, [str(found[k].dtype) for k in names] if found is not None else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    out = {}
    for name, shape, dt in zip(names, box[0], box[1]):
        t = found[name] if found is not None else torch.empty(shape, dtype=getattr(torch, dt.removeprefix("torch.")))
        t = t.to(device)
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out


class FeatureDataset(torch.utils.data.Dataset):
    """(feature, label) rows standing in for ImageDataset's (pixels, label): the same length and index
    meaning, so the samplers and the training step are unchanged."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def set_epoch(self, epoch):  # the views are fixed: nothing to redraw
        pass

    def sample(self, i):  # what --sampler balanced reads of an index (ImageDataset.sample's .label)
        return SimpleNamespace(label=int(self.labels[i]))

    def __getitem__(self, i):
        return self.features[i].float(), int(self.labels[i])


class HeadOnFeatures(nn.Module):
    """The classifier's forward after the backbone: head(feature.float()), as head.Classifier does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.head

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.float())                       # (B, D) -> (B, C)


def cached_features(cfg, model, train_ds, val_samples, out: Path, device, amp, rank: int = 0, world: int = 1):
    """-> (train features (N·K, D), train labels, val features, val labels, the line for train.log).
    Reads RUN/features.safetensors when its key matches, else computes and writes it (rank 0)."""
    from ..data.folders import ImageDataset

    views = train_ds.multiplier
    samples = train_ds.samples
    key = cache_key(cfg, samples, val_samples, views, amp)
    path = Path(out) / CACHE_FILE
    found = read_cache(path, key) if rank == 0 else None
    if world > 1:  # rank 0's folder decides (under --overwrite it is a staging folder the others do not see)
        found = _from_rank0(found, device)
    dtype = torch.float16 if cfg.cache_dtype == "fp16" else torch.float32
    if found is None:
        train_ds.set_epoch(0)  # the views of the first epoch, kept
        kw = dict(rank=rank, world=world, batch_size=cfg.eval_batch_size, workers=cfg.workers)
        if cfg.augment == "none":  # every view is the clean image: compute it once
            clean = compute_features(model.backbone, ImageDataset(samples, image_size=cfg.image_size), cfg.pool,
                                     device, amp, desc="features (clean)", **kw)
            train = clean.repeat_interleave(views, dim=0)
        else:
            train = compute_features(model.backbone, train_ds, cfg.pool, device, amp,
                                     desc=f"features ({views} views)", **kw)
        val = compute_features(model.backbone, ImageDataset(val_samples, image_size=cfg.image_size), cfg.pool,
                               device, amp, desc="features (val)", **kw)
        found = {"train": train.to(dtype), "val": val.to(dtype),
                 "train_labels": torch.tensor([s.label for s in samples], dtype=torch.int64).repeat_interleave(views),
                 "val_labels": torch.tensor([s.label for s in val_samples], dtype=torch.int64)}
        if rank == 0:
            write_cache(path, found, key, views, [s.path for s in samples], [s.path for s in val_samples])
        how = "computed"
    else:
        how = "reused"
    line = (f"feature cache: {how} {path.name} ({len(samples)} images × {views} view(s): the clean one"
            + (f" + {views - 1} augmented, drawn once (seed {cfg.seed}) and reused every epoch" if views > 1 and
               cfg.augment != "none" else "") + f"; {len(val_samples)} val; {cfg.cache_dtype}); eval-mode features, "
            f"no train-time RoPE augmentation")
    return found["train"], found["train_labels"], found["val"], found["val_labels"], line
