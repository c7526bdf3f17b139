"""Fine-tune DINOv3 with QLoRA / QDoRA (or train the paper's baselines) on an image-folder data set.

    python train.py --method dora --rank 64 --targets all-linear      # the paper's recipe, NF4 7B base
    python train.py --preset qlora-all-linear-r64                      # one of the paper's 11 rows
    python train.py --demo                                             # whole pipeline on CPU, no download
    python train.py --dry-run --method lora --rank 16                  # counts + memory estimate, no weights
    python train.py --resume runs/RUN                                  # continue a stopped or killed run
    python train.py --config runs/X/config.json --seed 1               # re-run a recorded run, flags win
    torchrun --nproc_per_node 4 train.py ...                           # same global batch on 4 GPUs

The step, in the order it happens (nanoGPT style, all visible in main()):
    micro-batch ─► autocast forward ─► loss / group size ─► backward   (× grad_accum)
    ─► lr = get_lr(step) ─► unscale ─► clip ─► AdamW step ─► zero_grad
    epoch end ─► validation scores ─► keep the best adapter (--select-metric) ─► early stop
              ─► resumable checkpoint ─► metrics.csv + curves.png
    (a checkpoint also every --ckpt-every steps; a NaN/inf loss stops the run before anything of it is saved)
Everything around it is a small named helper below: the config (flags, --resume, --demo), the system
(processes, device, precision), data, model, and the run folder (nanopeft/run.py).

Killed at any moment, `python train.py --resume RUN` continues from the last checkpoint and ends with the
same adapter, bit for bit, as a run never interrupted (docs/RELIABILITY.md lists what was tried).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanopeft import cli
from nanopeft.budget import count_params
from nanopeft.calibration import save_val_logits
from nanopeft.save import adapter_identity
from nanopeft.build import build_classifier, memory_estimate, plan_checkpointing
from nanopeft.config import (ADAPTER_METHODS, DINO_METHODS, FROZEN_METHODS, PROBE_METHODS, PAPER_RUNS, TrainConfig, add_config_args, config_from_args,
                             joined_negative_values)
from nanopeft.device import (autocast, choose_precision, hugepage_cpu_allocator, peak_memory_mb, resolve_device,
                             threads_beside_workers)
from nanopeft.distributed import all_sum
from nanopeft.history import keep_best, validation_scores, write_history
from nanopeft.run import (RunError, RunLog, check_new_run_folder, clean_stale_files, load_resume, lock_run_folder,
                          new_state, read_resume, read_run_config, run_folder, run_name, save_resume,
                          save_run_weights, staging_path, swap_in, unlock_run_folders, write_failed,
                          write_run_config, write_summary)


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 to lr over warmup_ratio of the steps, then cosine to min_lr_ratio · lr.
    A pure function written into the optimizer at every step: the seed code computed its warmup
    but never applied it (docs/RECIPE.md ("Fixes to the recipe"))."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = cfg.min_lr_ratio * cfg.lr
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def fail(msg: str) -> None:
    """A one-line error and exit 2: no traceback for a fault the message explains (the run folder's lock
    is released first, so a test calling main() again in the same process is not refused)."""
    unlock_run_folders()
    cli.fail(msg)


# ---------------------------------------------------------------------------------------------- config
def split_train_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """`script.py ARGS -- TRAIN_FLAGS` (scripts/paper_table.py, scripts/data_efficiency.py): the script's
    own arguments, and the flags after `--` that go to every train.py run it starts."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_config_args(parser)
    groups["model"].add_argument("--list-presets", action="store_true", help="the paper's 11 runs with their counts")
    run = groups["run folder"]
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (only once the "
                     "new run has written its first checkpoint: a run that fails to start leaves the old one)")
    run.add_argument("--resume", metavar="RUN", help="continue the run in this folder where it stopped (its last "
                     "checkpoint; runtime flags such as --workers may be given again); a finished run: nothing to do")
    run.add_argument("--config", metavar="JSON", help="re-run a recorded run: its config.json (or its folder, "
                     "or the JSON --dry-run prints); flags given now win, the run folder is new unless --out")
    run.add_argument("--dry-run", action="store_true", help="print config, parameter counts and a "
                     "memory estimate, then exit (no weights or data needed)")
    run.add_argument("--demo", action="store_true", help="generate a tiny random DINOv3 + image data "
                     "set and run the whole pipeline on CPU")
    return parser.parse_args(joined_negative_values(sys.argv[1:] if argv is None else list(argv)))


def run_config(args) -> TrainConfig:
    """Defaults < --preset < flags; with --resume the run's saved config < flags given now; with --demo
    its small settings for every flag not given. Resolved: every value checked and typed once."""
    try:
        cfg = config_from_args(args).resolved()
        if args.list_presets:
            return cfg  # the listing needs nothing more
        if args.resume and args.config:
            raise ValueError("--resume continues a run with its own config.json: drop --config")
        if args.resume:
            if args.overwrite:
                raise ValueError("--resume continues a run and --overwrite replaces one: pass only one of them")
            cfg = resumed_config(args)
            exit_if_complete(cfg)
        elif args.config:
            cfg = recorded_config(args)
        if args.demo:
            cfg = demo_config(args, cfg)
        return cfg.resolved()
    except ValueError as e:  # RunError included
        fail(str(e))


# Flags --resume accepts with a new value: where and how fast the run computes, and when it ends. Any other
# flag would silently make the resumed run a different one than the checkpoint's (say a new --lr).
RESUME_FLAGS = ("workers", "device", "eval_batch_size", "data", "weights", "skip_bad", "ckpt_every", "epochs",
                "max_steps", "patience", "min_delta")


def resumed_config(args) -> TrainConfig:
    """--resume RUN: the config saved in RUN/config.json; the runtime flags given now win (e.g. --workers,
    a larger --epochs). Another flag whose value differs from the saved one is refused."""
    saved, _ = read_run_config(args.resume, flag="--resume")
    given = {k: v for k, v in vars(config_from_args(args)).items()
             if getattr(args, k, None) is not None and k != "out"}
    changed = [k for k, v in given.items() if k not in RESUME_FLAGS and
               dataclasses.replace(saved, **{k: v}).resolved() != saved.resolved()]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"--resume {args.resume}: {flags} differ(s) from the run's config.json; a resumed run keeps "
                         f"its settings (only {', '.join('--' + k.replace('_', '-') for k in RESUME_FLAGS)} may "
                         f"change): start a new run for other settings")
    return dataclasses.replace(saved, **given, out=args.resume)


def exit_if_complete(cfg: TrainConfig) -> None:
    """--resume on a finished run: say so and exit 0, touching nothing (so scripts may resume in a loop).
    Finished means the loop would end at once: every epoch done, or early-stopped (raise --epochs or
    --patience to train further)."""
    ck = read_resume(Path(cfg.out))
    s = ck["state"] if ck else None
    if s and s["finished"] and (s["epoch"] >= cfg.epochs or s["bad_epochs"] >= cfg.patience):
        print(f"--resume {cfg.out}: the run is complete ({s['epoch']} epochs, {s['step']} steps, best val accuracy "
              f"{s['best_val']:.4f} at epoch {s['best_epoch']}); nothing to do")
        sys.exit(0)
def recorded_config(args) -> TrainConfig:
    """--config FILE|RUN: a recorded run's TrainConfig (a run's config.json {"train": {...}} or the bare
    dict --dry-run prints) < --preset < flags given now; a new run folder unless --out is given."""
    path = Path(args.config)
    file = path / "config.json" if path.is_dir() else path
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {file}: cannot read it as JSON ({e})") from None
    fields = saved.get("train", saved) if isinstance(saved, dict) else None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(fields, dict) or not set(fields) <= known:
        bad = sorted(set(fields) - known) if isinstance(fields, dict) else "not a JSON object"
        raise ValueError(f"--config {file}: not a train.py config (unknown keys: {bad})")
    return config_from_args(args, recorded={**fields, "out": ""})


def demo_config(args, cfg: TrainConfig) -> TrainConfig:
    """--demo: a generated random DINOv3 and image folder, and settings that train them on CPU."""
    from nanopeft.demo import DEMO_NOTICE, prepare_demo

    paths = prepare_demo()
    args.demo_test = str(paths["test"])
    print(DEMO_NOTICE)
    demo = dict(weights=str(paths["weights"]), data=str(paths["data"]), image_size=64, epochs=3,
                batch_size=8, grad_accum=1, lr=1e-3, workers=2, rank=8, alpha=16.0)
    explicit = {k for k in vars(args) if getattr(args, k) is not None}
    return dataclasses.replace(cfg, **{k: v for k, v in demo.items() if k not in explicit})


def dry_run(cfg: TrainConfig) -> None:
    C = cfg.num_classes or 9
    model = build_classifier(cfg, C, torch.device("cpu"), meta=True)
    counts = count_params(model)
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f"classes:              {C}")
    print(f"adapter parameters:   {counts['adapter']:,}")
    print(f"head parameters:      {counts['head']:,}")
    print(f"trainable parameters: {counts['trainable']:,}")
    print(f"total parameters:     {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f}% trainable)")
    if cfg.method in FROZEN_METHODS and cfg.cache_features == "yes":
        print("memory: the backbone only runs forward, without gradients, to fill the feature cache "
              "(nanopeft/features.py); the model below is of a training step through it, an upper bound here")
    if cfg.method in DINO_METHODS:
        print_memory_model(model, cfg)


GPU_16GB, CUDA_CONTEXT_GB = 16.0, 0.5  # the paper's GPU class; a CUDA context is outside torch's allocator


def print_memory_model(model, cfg: TrainConfig) -> None:
    """--dry-run: nanopeft/memory.py's model of one step, on this machine as the run would train, and on
    one CUDA GPU (bf16 unless --precision says otherwise) with the 16 GB verdict."""
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        fail(str(e))
    amp, why = choose_precision(device, cfg.precision)
    print(f"precision:            {why}")
    print(plan_checkpointing(model, cfg, device, amp))
    k = model.backbone.gradient_checkpointing
    if device.type != "cuda":
        gpu_dtype = {"fp32": None, "fp16": torch.float16}.get(cfg.precision, torch.bfloat16)
        est = memory_estimate(model, cfg, torch.device("cuda"), gpu_dtype, checkpointed_blocks=k)
        print(f"on one CUDA GPU ({'fp32' if gpu_dtype is None else str(gpu_dtype)[6:]}): {est.summary()}")
    else:
        est = memory_estimate(model, cfg, device, amp, checkpointed_blocks=k)
    spare = GPU_16GB - CUDA_CONTEXT_GB - est.total
    print(f"a 16 GB GPU: {'fits' if spare >= 0 else 'does NOT fit'}, {abs(spare):.1f} GB "
          f"{'to spare' if spare >= 0 else 'short'} (after ~{CUDA_CONTEXT_GB} GB for the CUDA context)")


def list_presets(cfg: TrainConfig) -> None:
    print(f"{'preset':<22} {'method':<10} {'targets':<11} {'rank':>4} {'adapter params':>15} {'+ head':>13}")
    for name, row in PAPER_RUNS.items():
        c = dataclasses.replace(cfg, **row).resolved()
        counts = count_params(build_classifier(c, cfg.num_classes or 9, torch.device("cpu"), meta=True))
        adapted = c.method in ADAPTER_METHODS
        print(f"{name:<22} {c.method:<10} {c.targets if adapted else '-':<11} {c.rank if adapted else '-':>4} "
              f"{counts['adapter']:>15,} {counts['trainable']:>13,}")


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
    from nanopeft.distributed import init_distributed

    rank, world, local = init_distributed()
    try:
        device = resolve_device(cfg.device) if world == 1 or not torch.cuda.is_available() \
            else torch.device(f"cuda:{local}")
    except ValueError as e:
        fail(str(e))
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
        fail(f"no DINOv3 backbone at {cfg.weights}. Download it (gated: accept the licence first): "
             f"huggingface-cli download facebook/dinov3-vit7b16-pretrain-lvd1689m --local-dir {cfg.weights} "
             f"(see weights/README.md), or pass --weights PATH")
    if not Path(cfg.data).exists():
        fail(f"no training images at {cfg.data}. Put one sub-folder per class there "
             f"(data/Lying/*.jpg, data/Standing/*.jpg, ...) or a CSV manifest path,label[,source], "
             f"or pass --data PATH")
    check_model_flags(cfg)
    claim_run_folder(cfg, args, system)


def check_model_flags(cfg: TrainConfig) -> None:
    """The flags that need the backbone's config, checked before anything heavy: --weights is a DINOv3
    checkpoint (headers only), --image-size a multiple of its patch size, --targets matches layers of the
    model (built on the meta device: no weights)."""
    from nanopeft.checkpoint import CheckpointError, open_checkpoint

    patch = 16 if cfg.method == "vit-small" else None  # resnet18 takes any size
    if cfg.method in DINO_METHODS:
        try:
            patch = open_checkpoint(cfg.weights)[1].patch_size
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            fail(f"--weights {cfg.weights} is not a DINOv3 checkpoint: {str(e).splitlines()[0]}")
    if patch and cfg.image_size % patch:
        fail(f"--image-size {cfg.image_size} is not a multiple of the patch size {patch} "
             f"(try {max(patch, round(cfg.image_size / patch) * patch)})")
    if cfg.method in ADAPTER_METHODS:
        try:
            build_classifier(cfg, cfg.num_classes or 2, torch.device("cpu"), meta=True)
        except ValueError as e:
            fail(f"--targets {cfg.to_dict()['targets']}: {e}")


def claim_run_folder(cfg: TrainConfig, args, system: System) -> None:
    """Before any heavy work: --out named (cfg.out), this process its only writer (the lock: a second
    train.py on it stops here) and the folder usable as asked (a new run: empty, or --overwrite)."""
    out = run_folder(cfg)
    if not system.master:
        return
    try:
        lock_run_folder(out)
        clean_stale_files(out)
        if not args.resume:
            check_new_run_folder(out, overwrite=args.overwrite)
    except RunError as e:
        fail(str(e))


# ---------------------------------------------------------------------------------------------- data
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


def make_loaders(cfg: TrainConfig, rank: int, world: int) -> Data:
    """The training and validation loaders of cfg.data; a missing or malformed data set is a one-line error."""
    try:
        return build_loaders(cfg, rank, world)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def build_loaders(cfg: TrainConfig, rank: int, world: int) -> Data:
    from nanopeft.data import (MIN_SIDE, ImageDataset, check_images, describe_unreadable, shown, skip_unreadable,
                               training_pool)
    from nanopeft.distributed import MicroBatchSampler

    train_items, val_items, class_names = training_pool(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    upscaled = []
    bad = check_images(train_items + val_items, progress=rank == 0, upscaled=upscaled)
    if bad and not cfg.skip_bad:
        path, reason = bad[0]
        fail(f"unreadable image {shown(path)} ({reason}); {len(bad)} bad file(s) in all. "
             f"Fix or remove them, or pass --skip-bad")
    if bad:
        train_items, val_items = skip_unreadable(train_items, bad), skip_unreadable(val_items, bad)
    train_ds = ImageDataset(train_items, image_size=cfg.image_size, multiplier=cfg.multiplier,
                            strength=cfg.augment, seed=cfg.seed)
    val_ds = ImageDataset(val_items, image_size=cfg.image_size)
    train_counts = [sum(s.label == c for s in train_items) for c in range(len(class_names))]
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
    return Data(train_ds, train_loader, sampler, val_loader, class_names, len(train_items), len(val_items),
                train_counts, val_items, notes)


def sampler_weights(cfg: TrainConfig, train_ds) -> list[float] | None:
    """--sampler balanced: P(index) ∝ 1/n_c of its class (None: the uniform permutation)."""
    from nanopeft.balance import sampling_weights

    return sampling_weights([train_ds.sample(i).label for i in range(len(train_ds))]) \
        if cfg.sampler == "balanced" else None


def use_feature_cache(cfg: TrainConfig, system: System, data: Data, model, out: Path, log: RunLog, wrapped):
    """A frozen backbone (--cache-features yes): its features once per view (nanopeft/features.py), then the
    loop trains the head on (feature, label) batches: `data` gets feature loaders, and the returned module
    (DDP under torchrun) runs the head alone. Anything else: `wrapped` as it was."""
    from nanopeft.data import ImageDataset
    from nanopeft.distributed import MicroBatchSampler
    from nanopeft.features import FeatureDataset, HeadOnFeatures, cached_features

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


def probe_run(cfg: TrainConfig, system: System, data: Data, model, out: Path, state: dict,
              log: RunLog) -> tuple[dict, float]:
    """--method linear-probe | knn: fit on the cached clean features (nanopeft/probes.py) instead of the loop;
    write RUN/probe.safetensors and the validation logits, record the validation scores as epoch 1."""
    from nanopeft.data import ImageDataset
    from nanopeft.features import cached_features
    from nanopeft.probes import fit_probe, save_probe

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
        from nanopeft.save import file_identity

        probe = save_probe(out, head, cfg.method, info)
        save_val_logits(out, val_logits, vy.tolist(), [s.path for s in data.val_samples], file_identity(probe)[0])
    state.update(epoch=cfg.epochs, best_val=val["val_accuracy"], best_epoch=1, best_score=val[cfg.select_metric],
                 finished=True)
    report_epoch(log, out, system, val, 1, time.perf_counter() - t0, True, cfg)
    return state, time.perf_counter() - t0


def make_criterion(cfg: TrainConfig, data: Data, device: torch.device) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing, and with --class-weights balanced the weights
    of nanopeft/balance.py (n/(C·n_c), or 1 under --sampler balanced)."""
    from nanopeft.balance import class_weights

    weight = class_weights(data.train_counts, cfg.sampler).to(device) if cfg.class_weights == "balanced" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, system: System, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(model, wrapped): the classifier, which is saved and resumed, and the module the step runs
    forward and backward through (DDP around the model under torchrun, else the model itself).
    CPU: fp32 everywhere; GPU: the frozen base in the autocast dtype (NF4 compute dtype)."""
    from nanopeft.checkpoint import CheckpointError

    try:
        model = build_classifier(cfg, num_classes, system.device,
                                 dtype=system.amp if system.amp is not None else torch.float32)
    except (FileNotFoundError, CheckpointError) as e:
        fail(f"--weights {cfg.weights}: cannot load the backbone: {e}")
    except ValueError as e:  # what check_model_flags could not see (e.g. a scratch model's own checks)
        fail(str(e))
    try:
        system.notes.append(plan_checkpointing(model, cfg, system.device, system.amp))
    except ValueError as e:
        fail(str(e))
    head_only = cfg.method in PROBE_METHODS or (cfg.method in FROZEN_METHODS and cfg.cache_features == "yes")
    if system.world == 1 or head_only:
        return model, model  # (a cached frozen run wraps its head alone: use_feature_cache; a probe nothing)
    # broadcast_buffers=False: the NF4 codes are buffers, identical on every rank
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[system.local] if system.device.type == "cuda"
                                              else None, broadcast_buffers=False)
    return model, ddp


@torch.no_grad()
def evaluate(model, loader, device, amp, criterion: nn.CrossEntropyLoss,
             num_classes: int) -> tuple[list[float], torch.Tensor]:
    """This rank's share of the validation sums nanopeft/history.py turns into scores:
    [Σ w_y·loss, Σ w_y, confusion matrix (C·C)], w the class weights (1 without them); and its logits."""
    model.eval()
    loss_sum, weight_sum = 0.0, 0.0
    cm = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    kept = []
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x.to(device, non_blocking=True))
        kept.append(logits.float().cpu())
        y = y.to(device)
        w = criterion.weight
        loss = F.cross_entropy(logits.float(), y, weight=w, label_smoothing=criterion.label_smoothing,
                               reduction="none")  # w_y·ℓ per image: summed / Σ w_y = the "mean" reduction
        loss_sum += loss.sum().item()
        weight_sum += (w[y].sum() if w is not None else torch.tensor(float(len(y)))).item()
        cm += torch.bincount((y * num_classes + logits.argmax(-1)).cpu(), minlength=num_classes ** 2).double()
    return [loss_sum, weight_sum, *cm.tolist()], torch.cat(kept) if kept else torch.zeros(0, num_classes)


def validate(wrapped, data: Data, system: System, criterion) -> tuple[dict, torch.Tensor]:
    """{val_accuracy, val_loss, val_macro_f1} over the whole validation split (summed over ranks), and
    the split's (N, C) logits in its order (each rank holds rows rank, rank + world, ...: placed and summed)."""
    C = len(data.class_names)
    sums, mine = evaluate(wrapped, data.val_loader, system.device, system.amp, criterion, C)
    logits = torch.zeros(data.n_val, C, dtype=torch.float64)
    logits[system.rank::system.world] = mine.double()
    if system.world > 1:
        logits = logits.to(system.device)
        torch.distributed.all_reduce(logits)
    return validation_scores(all_sum(sums, system.device), C), logits.float().cpu()


def report_epoch(log: RunLog, out: Path, system: System, val: dict, epoch: int, elapsed: float, best: bool,
                 cfg: TrainConfig) -> None:
    """The epoch's row in metrics.jsonl and its line in train.log; metrics.csv and curves.png redrawn."""
    mem = peak_memory_mb(system.device)
    log.record(epoch=epoch, **val, peak_memory_mb=mem, elapsed_s=elapsed, best=best)
    log.say(f"epoch {epoch}: val accuracy {val['val_accuracy']:.4f}, macro F1 {val['val_macro_f1']:.4f}, "
            f"loss {val['val_loss']:.4f}{f' (best {cfg.select_metric}, saved)' if best else ''}, "
            f"peak memory {mem:,.0f} MB")
    if system.master:
        try:
            write_history(out, f"Training: {out.name}")
        except (OSError, ValueError) as e:  # a picture must never stop a run
            log.say(f"warning: could not write metrics.csv / curves.png: {e}")


# ---------------------------------------------------------------------------------------------- run folder
def open_run(cfg: TrainConfig, args, system: System, model, optimizer, scaler, data: Data,
             counts: dict) -> tuple[Path, dict, RunLog]:
    """The run folder (claimed by claim_run_folder; --resume's with its last checkpoint loaded into model,
    optimizer and scaler, or from the beginning if it has none yet; --overwrite's a hidden sibling until the
    first checkpoint), config.json written, and the log opened (metrics.jsonl cut back to the checkpoint).
    Returns (the folder written now, loop state, log)."""
    out, state, note = Path(cfg.out), new_state(), None
    try:
        if args.resume:
            note = (f"resuming {out} at step {state['step']} (epoch {state['epoch'] + 1}, micro-batch "
                    f"{state['batches_done']})" if load_resume(out, model, optimizer, scaler, state)
                    else f"--resume {out}: no checkpoint yet, starting from the beginning")
    except RunError as e:
        fail(str(e))
    if system.master and args.overwrite and out.is_dir() and any(out.iterdir()):
        out = staging_path(out)
        note = f"--overwrite: training in {out}, which replaces {cfg.out} at the first checkpoint"
    if system.master:
        try:
            write_run_config(out, cfg, class_names=data.class_names, parameters=counts, world_size=system.world,
                             n_train=data.n_train, n_val=data.n_val,
                             train_class_counts=dict(zip(data.class_names, data.train_counts)))
        except OSError as e:
            fail(f"cannot write {out / 'config.json'}: {e.strerror or e}")
    log = RunLog(out, system.master, metrics_bytes=state["metrics_bytes"])
    if note:
        log.say(note)
    for line in data.notes:
        log.say(line)
    return out, state, log


def checkpoint(out: Path, cfg: TrainConfig, system: System, model, optimizer, scaler, state: dict,
               log: RunLog) -> Path:
    """resume.pt now (rank 0), recording metrics.jsonl's length; never of non-finite weights (they would
    replace the last good checkpoint). Under --overwrite the first one swaps the new run into --out, so the
    old run is deleted only once the new one can resume. Returns the run folder (moved by that swap)."""
    check_finite_weights(model, state, out)  # every rank: DDP keeps the weights equal, so all stop together
    if not system.master:
        return out
    state["metrics_bytes"] = log.metrics_bytes()
    try:
        save_resume(out, model, optimizer, scaler, state)
    except RunError as e:
        log.say(f"error: {e}")
        fail(str(e))
    if out != Path(cfg.out):
        swap_in(out, Path(cfg.out))
        out = Path(cfg.out)
        log.say(f"--overwrite: the new run replaced {out}")
    return out


def save_best(model, cfg: TrainConfig, system: System, out: Path, state: dict, data: Data,
              scores: dict, val_logits: torch.Tensor) -> None:
    """The best epoch's adapter/ (rank 0; finite weights only); a failed write is a one-line error naming the file."""
    check_finite_weights(model, state, out)  # every rank, as in checkpoint(): none waits for a rank that stopped
    if not system.master:
        return
    from safetensors import SafetensorError

    try:
        save_run_weights(model, cfg, out / "adapter", data.class_names, scores)
        # the kept epoch's validation logits, tied to this adapter: what eval.py --calibration fits on
        save_val_logits(out, val_logits, [s.label for s in data.val_samples], [s.path for s in data.val_samples],
                        adapter_identity(out / "adapter")[0])
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        name = "adapter_config.json" if "config" in str(getattr(e, "filename", "")) else "adapter_model.safetensors"
        fail(str(write_failed(out / "adapter" / name, e)))


def count_skipped_step(scaler, scale_before: float, state: dict, log: RunLog) -> None:
    """fp16: GradScaler skipped this step when it lowered its scale (the gradients held an inf or NaN);
    counted in resume.pt's state and summary.json, and each one a line in train.log."""
    if scaler.get_scale() < scale_before:
        state["skipped_steps"] += 1
        log.say(f"step {state['step']}: fp16 overflow, step skipped ({state['skipped_steps']} so far)")


def finite_loss(loss: float, state: dict, out: Path) -> float:
    """The step's loss, or a stop naming the step if it is NaN or inf."""
    if not math.isfinite(loss):
        numerical_fault(state, f"the loss is {loss}", out)
    return loss


def check_finite_weights(model, state: dict, out: Path) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        numerical_fault(state, f"the weight {bad[0]} is not finite", out)


def numerical_fault(state: dict, what: str, out: Path) -> None:
    """A NaN/inf loss or weight: stop before anything of it is saved; the last checkpoint and the best adapter
    stay as they are (and still load)."""
    kept = [str(out / f) for f in ("resume.pt", "adapter") if (out / f).exists()]
    fail(f"step {state['step']}: {what}; training stopped (try a lower --lr). "
         f"{'Kept: ' + ', '.join(kept) if kept else 'No checkpoint was written yet'}")


def log_setup(log: RunLog, cfg: TrainConfig, system: System, scaler, data: Data, counts: dict,
              total_steps: int) -> None:
    w, n = system.world, data.sampler.num_batches()
    log.say(f"nanopeft train: {run_name(cfg)} on {system.device} ({w} process{'es' if w > 1 else ''}), "
            f"precision {system.amp or 'fp32'}{' + GradScaler' if scaler.is_enabled() else ''}")
    for note in system.notes:
        log.say(note)
    log.say(f"data: {data.n_train} train / {data.n_val} val images, {len(data.class_names)} classes, "
            f"×{len(data.train_ds) // max(1, data.n_train)} per epoch → {len(data.train_ds)} samples, "
            f"{n} micro-batches of {cfg.batch_size}")
    log.say(f"parameters: adapter {counts['adapter']:,} + head {counts['head']:,} = {counts['trainable']:,} "
            f"trainable of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.3f}%)")
    log.say(f"optimizer: AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, batch {cfg.batch_size}×{cfg.grad_accum}, "
            f"{math.ceil(n / cfg.grad_accum)} steps/epoch, {total_steps} steps max, "
            f"warmup {math.ceil(cfg.warmup_ratio * total_steps)}")


def finish_run(out: Path, cfg: TrainConfig, args, system: System, state: dict, counts: dict, log: RunLog,
               elapsed: float) -> dict:
    validated = state["best_epoch"] >= 1  # a --max-steps run can stop before its first validation
    summary = {"run": str(out), "method": cfg.method, "best_val_accuracy": state["best_val"] if validated else None,
               "best_epoch": state["best_epoch"] if validated else None, "steps": state["step"], "train_time_s": elapsed,
               "trainable_parameters": counts["trainable"], "peak_memory_mb": peak_memory_mb(system.device),
               "select_metric": cfg.select_metric, "best_score": state.get("best_score"),
               "skipped_steps": state["skipped_steps"]}
    if system.master:
        log.say(write_summary(out, summary))
        if validated:
            log.say(f"evaluate: python eval.py --run {out} --data {getattr(args, 'demo_test', None) or 'TEST_DIR'}")
        else:
            log.say(f"no validation ran: --max-steps {cfg.max_steps} stopped within the first epoch, so no adapter was "
                    f"kept and there is nothing to evaluate; raise --max-steps (or continue with --resume {out} "
                    f"--max-steps N)")
        log.close()
        unlock_run_folders()
    if system.world > 1:  # leave together: rank 0 may still be writing files, and a rank that tears gloo
        torch.distributed.barrier()  # down while its peer is busy can abort ("terminate called ...")
        torch.distributed.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------- main
@cli.error_boundary(cleanup=unlock_run_folders)  # library faults (RunError, CheckpointError, OSError...): one line
def main(argv=None) -> dict:
    hugepage_cpu_allocator()  # first: torch reads its CPU allocator setting at the first tensor
    args = parse_args(argv)
    cfg = run_config(args)
    if args.list_presets:
        return list_presets(cfg)
    if args.dry_run:
        return dry_run(cfg)
    system = setup_system(cfg)
    device, amp, world = system.device, system.amp, system.world
    check_inputs(cfg, args, system)
    data = make_loaders(cfg, system.rank, world)
    model, wrapped = build_model(cfg, system, len(data.class_names))
    counts = count_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # (a k-NN probe has no parameter: an empty one keeps resume.pt's optimizer entry for every method)
    optimizer = torch.optim.AdamW(trainable or [nn.Parameter(torch.zeros(0))], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
    criterion = make_criterion(cfg, data, device)
    out, state, log = open_run(cfg, args, system, model, optimizer, scaler, data, counts)
    if cfg.method in PROBE_METHODS:  # a probe is fitted in seconds on cached features: no loop
        state, seconds = probe_run(cfg, system, data, model, out, state, log)
        out = checkpoint(out, cfg, system, model, optimizer, scaler, state, log)
        return finish_run(out, cfg, args, system, state, counts, log, seconds)
    wrapped = use_feature_cache(cfg, system, data, model, out, log, wrapped)  # frozen backbone: features once
    micro_per_epoch = data.sampler.num_batches()
    total_steps = math.ceil(micro_per_epoch / cfg.grad_accum) * cfg.epochs
    log_setup(log, cfg, system, scaler, data, counts, total_steps)

    # ---------------------------------------------------------------- the loop
    stop = False
    t_start = time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        wrapped.train()
        data.train_ds.set_epoch(epoch)
        skip = state["batches_done"]
        data.sampler.set_epoch(epoch, skip=skip)
        bar = tqdm(data.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not system.master,
                   initial=skip, total=micro_per_epoch, dynamic_ncols=True)
        t0, seen, running = time.perf_counter(), 0, torch.zeros((), device=device)
        for i, (x, y) in enumerate(bar, start=skip):
            group = i // cfg.grad_accum  # micro-batches in this accumulation group (the last may be short)
            group_size = min(cfg.grad_accum, micro_per_epoch - group * cfg.grad_accum)
            last_in_group = (i + 1) % cfg.grad_accum == 0 or i + 1 == micro_per_epoch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = wrapped.no_sync() if world > 1 and not last_in_group else contextlib.nullcontext()
            with sync:
                with autocast(device, amp):
                    logits = wrapped(x)
                loss = criterion(logits.float(), y) / group_size  # mean over the whole group
                scaler.scale(loss).backward()
            running += loss.detach().float()  # on the device: no host sync until the log point below
            seen += len(y) * world
            if not last_in_group:
                continue
            lr = get_lr(state["step"], total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # fp16: skipped if the gradients overflowed (the scale is then halved)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as we can
            count_skipped_step(scaler, scale, state, log)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ips = seen / (time.perf_counter() - t0)
            loss_val = finite_loss(all_sum([running.item()], device)[0] / world, state, out)  # the step's one host sync
            log.record(step=state["step"], epoch=epoch, loss=loss_val, lr=lr, images_per_s=ips)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            state["step"] += 1
            state["batches_done"] = i + 1
            t0, seen, running = time.perf_counter(), 0, torch.zeros((), device=device)
            if cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0 and i + 1 < micro_per_epoch:
                out = checkpoint(out, cfg, system, model, optimizer, scaler, state, log)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if stop and state["batches_done"] < micro_per_epoch:
            out = checkpoint(out, cfg, system, model, optimizer, scaler, state, log)  # mid-epoch: resumes here
            log.say(f"stopped after {state['step']} steps (--max-steps); resume with --resume {out}")
            break
        # ------------------------------------------------------------ epoch end
        val, val_logits = validate(wrapped, data, system, criterion)
        state.update(epoch=epoch + 1, batches_done=0)
        best = keep_best(state, val, cfg.select_metric, cfg.min_delta, epoch + 1)
        if best:
            save_best(model, cfg, system, out, state, data, {"epoch": epoch + 1, **val}, val_logits)
        report_epoch(log, out, system, val, epoch + 1, time.perf_counter() - t_start, best, cfg)
        if state["bad_epochs"] >= cfg.patience:
            log.say(f"early stop: no improvement for {cfg.patience} epochs")
            stop = True
        state["finished"] = state["bad_epochs"] >= cfg.patience or epoch + 1 == cfg.epochs
        out = checkpoint(out, cfg, system, model, optimizer, scaler, state, log)
        if stop:
            break
    return finish_run(out, cfg, args, system, state, counts, log, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
