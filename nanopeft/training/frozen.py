"""Frozen-backbone runs in train.py: the feature cache in place of the images (--method frozen), or a probe
fitted on the cached features in place of the loop (--method linear-probe | knn).

The cache itself is nanopeft/training/features.py, the probes nanopeft/probes.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..calibration import save_val_logits
from ..config import FROZEN_METHODS, TrainConfig
from ..data.folders import ImageDataset
from ..files.save import file_identity
from ..probes import fit_probe, save_probe
from .distributed import MicroBatchSampler
from .features import FeatureDataset, HeadOnFeatures, cached_features
from .history import validation_scores
from .resume import LoopState
from .run import report_epoch
from .run_folder import RunLog
from .setup import Data, System, sampler_weights


def use_feature_cache(cfg: TrainConfig, system: System, data: Data, model, out: Path, log: RunLog, wrapped):
    """A frozen backbone (--cache-features yes): its features once per view (nanopeft/training/features.py), then the
    loop trains the head on (feature, label) batches: `data` gets feature loaders, and the returned module
    (DDP under torchrun) runs the head alone. Anything else: `wrapped` as it was."""

    if cfg.method not in FROZEN_METHODS or cfg.cache_features != "yes":
        return wrapped
    views = ImageDataset(data.train_ds.samples, image_size=cfg.image_size, multiplier=cfg.cache_views or cfg.multiplier,
                         strength=cfg.augment, seed=cfg.seed)
    train, train_y, val, val_y, line = cached_features(cfg, model, views, data.val_samples, out, system.device,
                                                       system.amp, system.rank, system.world)
    log.say(line)
    data.train_ds = FeatureDataset(train, train_y)
    data.sampler = MicroBatchSampler(len(data.train_ds), cfg.batch_size, cfg.seed, system.rank, system.world,
                                     weights=sampler_weights(cfg, data.train_ds))
    # a private generator, as build_loaders': the loader must not draw from the global RNG (dropout's)
    data.train_loader = torch.utils.data.DataLoader(data.train_ds, batch_sampler=data.sampler,
                                                    generator=torch.Generator().manual_seed(cfg.seed))
    data.val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(FeatureDataset(val, val_y), list(range(system.rank, len(val_y), system.world))),
        batch_size=cfg.eval_batch_size)
    head = HeadOnFeatures(model)
    return nn.parallel.DistributedDataParallel(head) if system.world > 1 else head


def probe_run(cfg: TrainConfig, system: System, data: Data, model, out: Path, state: LoopState,
              log: RunLog) -> float:
    """--method linear-probe | knn: fit on the cached clean features (nanopeft/probes.py) instead of the loop;
    write RUN/probe.safetensors and the validation logits, record the validation scores as epoch 1 in `state`; returns the seconds it took."""

    t0 = time.perf_counter()
    clean = ImageDataset(data.train_ds.samples, image_size=cfg.image_size)  # one view: the clean image
    tf, ty, vf, vy, line = cached_features(cfg, model, clean, data.val_samples, out, system.device, system.amp,
                                           system.rank, system.world)
    log.say(line)
    C = len(data.class_names)
    head, info = fit_probe(cfg, tf.float(), ty, vf.float(), vy, C)
    model.head = head.to(system.device)
    with torch.no_grad():
        val_logits = head(vf.float().to(system.device)).float().cpu()          # (Nv, C)
    cm = torch.bincount(vy * C + val_logits.argmax(1), minlength=C * C).double()
    val = validation_scores([float(F.cross_entropy(val_logits, vy, reduction="sum")), float(len(vy)), *cm.tolist()], C)
    log.say(f"{cfg.method}: fitted in {time.perf_counter() - t0:.1f} s on {len(ty)} images ("
            + ", ".join(f"{k} {v}" for k, v in info.items() if k != "grid") + ")")
    if system.master:
        probe = save_probe(out, head, cfg.method, info)
        save_val_logits(out, val_logits, vy.tolist(), [s.path for s in data.val_samples], file_identity(probe)[0])
    state.epoch, state.best_val, state.best_epoch, state.best_score = cfg.epochs, val["val_accuracy"], 1, val[cfg.select_metric]
    state.finished = True
    report_epoch(log, out, system, val, 1, time.perf_counter() - t0, True, cfg)
    return time.perf_counter() - t0
