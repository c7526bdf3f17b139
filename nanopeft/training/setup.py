"""What train.py sets up before its loop: the system (processes, device, precision), the checks that refuse
a run before any slow work, the data loaders, the loss, and the model with its DDP wrapper.

Each raises ValueError (or OSError) naming the flag or file at fault; train.py's error boundary prints it
as one line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ADAPTER_METHODS, DINO_METHODS, FROZEN_METHODS, PROBE_METHODS, STUDY_METHODS, TrainConfig
from ..device import (choose_precision, hugepage_cpu_allocator, memory_budget_gb, resolve_device,
                      threads_beside_workers)
from ..data.balance import class_weights, sampling_weights
from ..data.folders import (MIN_SIDE, ImageDataset, check_images, describe_unreadable, shown, skip_unreadable,
                            training_pool)
from ..files.checkpoint import CheckpointError, open_checkpoint
from ..files.backbone import backbone_family
from .build import build_classifier, dinov2_config, memory_estimate, plan_checkpointing
from .distributed import MicroBatchSampler, init_distributed
from .run_folder import check_new_run_folder, clean_stale_files, lock_run_folder, run_folder


# ---------------------------------------------------------------------------------------------- system
@dataclass
class System:
    """Where this process trains: its rank among `world` processes (torchrun), device and autocast dtype."""
    rank: int
    world: int
    local: int
    device: torch.device
    amp: torch.dtype | None  # None: plain fp32
    notes: list[str] = dataclasses.field(default_factory=list)  # machine-dependent choices and why, logged

    @property
    def master(self) -> bool:  # rank 0 writes the run folder and prints
        return self.rank == 0


def setup_system(cfg: TrainConfig) -> System:
    """This process's rank (torchrun), device, seed, threads and precision; the choices made, for train.log."""
    rank, world, local = init_distributed()
    device = resolve_device(cfg.device) if world == 1 or not torch.cuda.is_available() \
        else torch.device(f"cuda:{local}")
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.workers > 0:
        torch.set_num_threads(threads_beside_workers(cfg.workers, world))
    amp, why = choose_precision(device, cfg.precision)
    log = [f"precision: {why}"]
    if device.type == "cpu":
        log.append("CPU allocator: page-aligned tensors (THP_MEM_ALLOC_ENABLE=1)" if hugepage_cpu_allocator() else
                   "CPU allocator: torch's default; THP_MEM_ALLOC_ENABLE=1 before the first tensor lowers the peak")
    return System(rank, world, local, device, amp, log)


def check_inputs(cfg: TrainConfig, args, system: System) -> None:
    """Everything that can be refused before the slow work (reading the images, loading the backbone):
    the data and weights exist, the flags that need the backbone fit it, the run folder is free."""
    if cfg.method in DINO_METHODS and not Path(cfg.weights).exists():
        raise ValueError(f"no DINOv3 backbone at {cfg.weights}. Download it (gated: accept the licence first): "
             f"huggingface-cli download facebook/dinov3-vit7b16-pretrain-lvd1689m --local-dir {cfg.weights} "
             f"(see weights/README.md), or pass --weights PATH (a DINOv3 or DINOv2 checkpoint)")
    if not Path(cfg.data).exists():
        raise ValueError(f"no training images at {cfg.data}. Put one sub-folder per class there "
             f"(data/Lying/*.jpg, data/Standing/*.jpg, ...) or a CSV manifest path,label[,source], "
             f"or pass --data PATH")
    check_model_flags(cfg)
    claim_run_folder(cfg, args, system)


def check_model_flags(cfg: TrainConfig) -> None:
    """The flags that need the backbone's config, checked before anything heavy: --weights is a DINOv3
    checkpoint (headers only), --image-size a multiple of its patch size, --targets matches layers of the
    model (built on the meta device: no weights)."""

    patch = 16 if cfg.method == "vit-small" else None  # resnet18 takes any size
    if cfg.method in DINO_METHODS:
        try:
            patch = (dinov2_config(cfg.weights) if backbone_family(cfg.weights) == "dinov2"
                     else open_checkpoint(cfg.weights)[1]).patch_size
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            raise ValueError(f"--weights {cfg.weights} is not a DINOv3 or DINOv2 checkpoint: "
                             f"{str(e).splitlines()[0]}") from None
    if cfg.method in ("ssf", "vpt", "adaptformer") and backbone_family(cfg.weights) == "dinov2":
        raise ValueError(f"--method {cfg.method} is placed on DINOv3's blocks and not supported on DINOv2 yet "
                         f"(lora, dora, bitfit, layernorm and full are)")
    if patch and cfg.image_size % patch:
        raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the patch size {patch} "
             f"(try {max(patch, round(cfg.image_size / patch) * patch)})")
    if cfg.method in ADAPTER_METHODS:
        try:
            build_classifier(cfg, cfg.num_classes or 2, torch.device("cpu"), meta=True)
        except ValueError as e:
            raise ValueError(f"--targets {cfg.to_dict()['targets']}: {e}") from None
    if cfg.method == "full":
        check_full_fits(cfg)


def check_full_fits(cfg: TrainConfig) -> None:
    """--method full: weights, gradients and AdamW's two moments of every backbone weight, fp32 — a 7B needs
    over 100 GB. Refused before loading when the memory model's step does not fit this device (multi-device
    sharding is out of scope: README)."""
    device = resolve_device(cfg.device)
    amp, _ = choose_precision(device, cfg.precision)
    model = build_classifier(cfg, cfg.num_classes or 2, torch.device("cpu"), meta=True)
    est = memory_estimate(model, cfg, device, amp)
    have = cfg.memory_budget or memory_budget_gb(device)[0]
    if est.total > have:
        raise ValueError(f"--method full: one training step needs about {est.total:.1f} GB ({est.summary()}), "
                         f"and {device} has {have:.1f} GB; use a PEFT method, a smaller backbone, or a larger "
                         f"device (sharding a backbone over several devices is not supported)")


def claim_run_folder(cfg: TrainConfig, args, system: System) -> None:
    """Before any heavy work: --out named (cfg.out), this process its only writer (the lock: a second
    train.py on it stops here) and the folder usable as asked (a new run: empty, or --overwrite)."""
    out = run_folder(cfg)
    if not system.master:
        return
    lock_run_folder(out)
    clean_stale_files(out)
    if not args.resume:
        check_new_run_folder(out, overwrite=args.overwrite)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Data:
    train_ds: torch.utils.data.Dataset
    train_loader: torch.utils.data.DataLoader
    sampler: torch.utils.data.Sampler          # MicroBatchSampler: the global micro-batch order
    val_loader: torch.utils.data.DataLoader    # this rank's share of the validation split
    class_names: list[str]
    n_train: int
    n_val: int
    train_counts: list[int]                    # training images per class (before the multiplier)
    val_samples: list = dataclasses.field(default_factory=list)  # the whole validation split, in order
    notes: list[str] = dataclasses.field(default_factory=list)  # for train.log: skipped and upscaled images
    multilabel: bool = False                   # --task multilabel
    val_targets: torch.Tensor | None = None    # multi-label: the validation split's (N, C) 0/1 targets, in order


def build_loaders(cfg: TrainConfig, rank: int, world: int) -> Data:
    """The training and validation loaders of cfg.data (a missing or malformed data set raises, naming it)."""

    multi = cfg.task == "multilabel"
    train_items, val_items, class_names = training_pool(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                                                        multilabel=multi)
    upscaled = []
    bad = check_images(train_items + val_items, progress=rank == 0, upscaled=upscaled)
    if bad and not cfg.skip_bad:
        path, reason = bad[0]
        raise ValueError(f"unreadable image {shown(path)} ({reason}); {len(bad)} bad file(s) in all. "
             f"Fix or remove them, or pass --skip-bad")
    if bad:
        train_items, val_items = skip_unreadable(train_items, bad), skip_unreadable(val_items, bad)
    C = len(class_names)
    train_ds = ImageDataset(train_items, image_size=cfg.image_size, multiplier=cfg.multiplier,
                            strength=cfg.augment, seed=cfg.seed, num_classes=C)
    val_ds = ImageDataset(val_items, image_size=cfg.image_size, num_classes=C)
    # training images per class (multi-label: the images where the class is present)
    train_counts = [sum((c in s.label) if multi else (s.label == c) for s in train_items) for c in range(C)]
    sampler = MicroBatchSampler(len(train_ds), cfg.batch_size, cfg.seed, rank, world,
                                weights=sampler_weights(cfg, train_ds))
    kw = dict(num_workers=min(cfg.workers, os.cpu_count() or 1), pin_memory=torch.cuda.is_available())
    # a private generator: worker seeds must not draw from the global RNG, or a resumed run's dropout
    # would see a shifted random stream (augmentations are seeded per (seed, epoch, index) anyway)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler,
                                               generator=torch.Generator().manual_seed(cfg.seed), **kw)
    val_idx = list(range(rank, len(val_ds), world))  # each rank a share; accuracy is summed over ranks
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, val_idx),
                                             batch_size=cfg.eval_batch_size, **kw)
    notes = describe_unreadable(bad)
    if upscaled:
        notes.append(f"upscaled {len(upscaled)} image(s) smaller than one {MIN_SIDE}×{MIN_SIDE} patch to {MIN_SIDE} px "
                     f"on the shorter side before augmentation (first: {shown(upscaled[0])})")
    targets = None
    if multi:
        targets = torch.zeros(len(val_items), C)
        for i, s in enumerate(val_items):
            targets[i, list(s.label)] = 1.0
    return Data(train_ds, train_loader, sampler, val_loader, class_names, len(train_items), len(val_items),
                train_counts, val_items, notes, multilabel=multi, val_targets=targets)


def sampler_weights(cfg: TrainConfig, train_ds) -> list[float] | None:
    """--sampler balanced: P(index) ∝ 1/n_c of its class (None: the uniform permutation)."""

    return sampling_weights([train_ds.sample(i).label for i in range(len(train_ds))]) \
        if cfg.sampler == "balanced" else None


def make_criterion(cfg: TrainConfig, data: Data, device: torch.device) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing, and with --class-weights balanced the weights
    of nanopeft/data/balance.py (n/(C·n_c), or 1 under --sampler balanced)."""

    if cfg.task == "multilabel":
        pos = torch.tensor(data.train_counts, dtype=torch.float32)
        pos_weight = None
        if cfg.class_weights == "balanced":  # BCE's positive weight n_neg / n_pos; 1 for a class with no positive
            pos_weight = torch.where(pos > 0, (data.n_train - pos) / pos.clamp_min(1), torch.ones_like(pos)).to(device)
        return MultiLabelLoss(pos_weight, cfg.label_smoothing)
    weight = class_weights(data.train_counts, cfg.sampler).to(device) if cfg.class_weights == "balanced" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


class MultiLabelLoss(nn.Module):
    """--task multilabel: BCE on each class's logit, Σ_c over classes / C (BCEWithLogitsLoss's mean), the
    targets smoothed towards ½ by --label-smoothing ε (y' = y·(1 − ε) + ε/2: the two-class form of label
    smoothing, Szegedy et al. 2016 §7), positive weights from --class-weights balanced."""

    def __init__(self, pos_weight: torch.Tensor | None, smoothing: float):
        super().__init__()
        self.pos_weight, self.smoothing = pos_weight, smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        y = y.float() * (1 - self.smoothing) + self.smoothing / 2            # (N, C)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight, reduction="none")
        return loss.mean() if reduction == "mean" else loss.mean(1)          # per image: (N,)


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, system: System, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(model, wrapped): the classifier, which is saved and resumed, and the module the step runs
    forward and backward through (DDP around the model under torchrun, else the model itself).
    CPU: fp32 everywhere; GPU: the frozen base in the autocast dtype (NF4 compute dtype)."""

    try:
        model = build_classifier(cfg, num_classes, system.device,
                                 dtype=system.amp if system.amp is not None else torch.float32)
    except (FileNotFoundError, CheckpointError) as e:
        raise ValueError(f"--weights {cfg.weights}: cannot load the backbone: {e}") from None
    system.notes.append(plan_checkpointing(model, cfg, system.device, system.amp))
    head_only = cfg.method in PROBE_METHODS or (cfg.method in FROZEN_METHODS and cfg.cache_features == "yes")
    if system.world == 1 or head_only:
        return model, model  # (a cached frozen run wraps its head alone: use_feature_cache; a probe nothing)
    # broadcast_buffers=False: the NF4 codes are buffers, identical on every rank
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[system.local] if system.device.type == "cuda"
                                              else None, broadcast_buffers=False)
    return model, ddp


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. LoRA, DoRA, the frozen backbone and the baselines: one group,
    weight decay on everything (the paper's recipe, kept for its numbers). The unifying study's methods and
    full fine-tuning: weight decay only on weight matrices; scales, shifts, norms, biases and prompts get
    none (decay would pull a scale towards 0 and a prompt towards nothing). A k-NN probe has no parameter:
    an empty one keeps resume.pt's optimizer entry for every method."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.method not in (*STUDY_METHODS, "full"):
        params = [p for _, p in named] or [nn.Parameter(torch.zeros(0))]
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    matrix = lambda n, p: p.ndim >= 2 and not n.endswith(".prompts")
    groups = [{"params": [p for n, p in named if matrix(n, p)]},
              {"params": [p for n, p in named if not matrix(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
