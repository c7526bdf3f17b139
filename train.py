"""Fine-tune DINOv3 with QLoRA / QDoRA (or train the paper's baselines) on an image-folder data set.

    python train.py --method dora --rank 64 --targets all-linear      # the paper's recipe, NF4 7B base
    python train.py --preset qlora-all-linear-r64                      # one of the paper's 11 rows
    python train.py --demo                                             # whole pipeline on CPU, ~1 minute
    python train.py --dry-run --method lora --rank 16                  # counts + memory estimate, no weights
    torchrun --nproc_per_node 4 train.py ...                           # same global batch on 4 GPUs

The step, in the order it happens (nanoGPT style, all visible in main()):
    micro-batch ─► autocast forward ─► loss / group size ─► backward   (× grad_accum)
    ─► lr = get_lr(step) ─► unscale ─► clip ─► AdamW step ─► zero_grad
    epoch end ─► validation accuracy ─► keep the best adapter ─► early stop ─► resumable checkpoint
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
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from nanopeft.config import PAPER_RUNS, TrainConfig, add_config_args, config_from_args
from nanopeft.pipeline import (DINO_METHODS, autocast, autocast_dtype, build_classifier, count_params,
                               peak_memory_mb, resolve_device, save_run_weights, threads_beside_workers)
from nanopeft.save import atomic_write


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 to lr over warmup_ratio of the steps, then cosine to min_lr_ratio · lr.
    A pure function written into the optimizer at every step: the seed code computed its warmup
    but never applied it (paper.md §4)."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = cfg.min_lr_ratio * cfg.lr
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def estimate_gpu_memory(model: nn.Module, cfg: TrainConfig, counts: dict) -> dict[str, float]:
    """A rough peak-memory estimate in GB for --dry-run (weights + optimizer + activations)."""
    GB = 1e9
    nf4 = sum(m.in_features * m.out_features for n, m in model.named_modules()  # frozen: not lora_A/B
              if isinstance(m, nn.Linear) and ".layer." in f".{n}" and "classifier" not in n
              and not m.weight.requires_grad)
    rest = counts["total"] - counts["trainable"] - nf4
    base = (nf4 * 4.127 / 8 + rest * 2) if cfg.quant == "nf4" and cfg.method in DINO_METHODS \
        else (counts["total"] - counts["trainable"]) * 2
    train = counts["trainable"] * 16  # fp32 weight + grad + two AdamW moments
    acts = 0.0
    bb = getattr(model, "backbone", None)
    if bb is not None and hasattr(bb, "config"):
        c = bb.config
        N = 1 + c.num_register_tokens + (cfg.image_size // c.patch_size) ** 2
        per_block_io = cfg.batch_size * N * c.hidden_size * 2  # bf16 residual stream
        inside = cfg.batch_size * N * (6 * c.hidden_size + 3 * c.intermediate_size) * 2
        acts = per_block_io * c.num_hidden_layers + inside if cfg.grad_checkpointing \
            else (per_block_io + inside) * c.num_hidden_layers
    return {"weights_gb": base / GB, "trainable_state_gb": train / GB, "activations_gb": acts / GB,
            "total_gb": (base + train + acts) / GB * 1.1}  # +10 %: allocator, workspaces


def dry_run(cfg: TrainConfig) -> None:
    C = cfg.num_classes or 9
    model = build_classifier(cfg, C, torch.device("cpu"), meta=True)
    counts = count_params(model)
    mem = estimate_gpu_memory(model, cfg, counts)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(f"classes:              {C}")
    print(f"adapter parameters:   {counts['adapter']:,}")
    print(f"head parameters:      {counts['head']:,}")
    print(f"trainable parameters: {counts['trainable']:,}")
    print(f"total parameters:     {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f}% trainable)")
    print(f"estimated peak GPU memory: {mem['total_gb']:.1f} GB (weights {mem['weights_gb']:.2f}, "
          f"trainable+AdamW {mem['trainable_state_gb']:.2f}, activations {mem['activations_gb']:.2f})")


def list_presets(cfg: TrainConfig) -> None:
    print(f"{'preset':<22} {'method':<10} {'targets':<11} {'rank':>4} {'adapter params':>15} {'+ head':>13}")
    for name, row in PAPER_RUNS.items():
        c = dataclasses.replace(cfg, **row).resolved()
        counts = count_params(build_classifier(c, cfg.num_classes or 9, torch.device("cpu"), meta=True))
        dino = c.method in ("lora", "dora")
        print(f"{name:<22} {c.method:<10} {c.targets if dino else '-':<11} {c.rank if dino else '-':>4} "
              f"{counts['adapter']:>15,} {counts['trainable']:>13,}")


def make_loaders(cfg: TrainConfig, rank: int, world: int):
    from nanopeft.data import ImageDataset, check_images, scan_dataset, stratified_split
    from nanopeft.distributed import MicroBatchSampler

    items, class_names = scan_dataset(cfg.data)
    train_items, val_items = stratified_split(items, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    bad = check_images(train_items + val_items, progress=rank == 0)
    if bad and not cfg.skip_bad:
        path, reason = bad[0]
        fail(f"unreadable image {path} ({reason}); {len(bad)} bad file(s) in all. "
             f"Fix or remove them, or pass --skip-bad")
    if bad:
        skip = {str(p) for p, _ in bad}
        train_items = [s for s in train_items if str(s.path) not in skip]
        val_items = [s for s in val_items if str(s.path) not in skip]
        print(f"skipping {len(bad)} unreadable image(s) (--skip-bad)")
    train_ds = ImageDataset(train_items, image_size=cfg.image_size, multiplier=cfg.multiplier,
                            strength=cfg.augment, seed=cfg.seed)
    val_ds = ImageDataset(val_items, image_size=cfg.image_size)
    sampler = MicroBatchSampler(len(train_ds), cfg.batch_size, cfg.seed, rank, world)
    kw = dict(num_workers=min(cfg.workers, os.cpu_count() or 1), pin_memory=torch.cuda.is_available())
    # a private generator: worker seeds must not draw from the global RNG, or a resumed run's dropout
    # would see a shifted random stream (augmentations are seeded per (seed, epoch, index) anyway)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler,
                                               generator=torch.Generator().manual_seed(cfg.seed), **kw)
    val_idx = list(range(rank, len(val_ds), world))  # each rank a share; accuracy is summed over ranks
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, val_idx),
                                             batch_size=cfg.eval_batch_size, **kw)
    return train_ds, train_loader, sampler, val_loader, class_names, len(train_items), len(val_items)


@torch.no_grad()
def evaluate(model, loader, device, amp) -> tuple[int, int]:
    model.eval()
    correct = total = 0
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x.to(device, non_blocking=True))
        correct += (logits.argmax(-1).cpu() == y).sum().item()
        total += len(y)
    return correct, total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="print config, parameter counts and a "
                        "memory estimate, then exit (no weights or data needed)")
    parser.add_argument("--list-presets", action="store_true", help="the paper's 11 runs with their counts")
    parser.add_argument("--demo", action="store_true", help="generate a tiny random DINOv3 + image data "
                        "set and run the whole pipeline on CPU")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder where it stopped")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args).resolved()
    except ValueError as e:
        fail(str(e))
    if args.list_presets:
        return list_presets(cfg)
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            fail(f"--resume {args.resume}: no config.json there (is it a run folder?)")
        given = {k: v for k, v in vars(config_from_args(args)).items()
                 if getattr(args, k, None) is not None and k != "out"}
        cfg = dataclasses.replace(TrainConfig(**json.loads(saved.read_text())["train"]), **given)
        cfg.out = args.resume
    if args.demo:
        from nanopeft.demo import DEMO_NOTICE, prepare_demo

        paths = prepare_demo()
        args.demo_test = str(paths["test"])
        print(DEMO_NOTICE)
        demo = dict(weights=str(paths["weights"]), data=str(paths["data"]), image_size=64, epochs=3,
                    batch_size=8, grad_accum=1, lr=1e-3, workers=2, rank=8, alpha=16.0)
        explicit = {k for k in vars(args) if getattr(args, k) is not None}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in demo.items() if k not in explicit})
    if args.dry_run:
        return dry_run(cfg)

    # ---------------------------------------------------------------- system
    from nanopeft.distributed import all_sum, init_distributed

    rank, world, local = init_distributed()
    master = rank == 0
    device = resolve_device(cfg.device) if world == 1 or not torch.cuda.is_available() \
        else torch.device(f"cuda:{local}")
    amp = autocast_dtype(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.workers > 0:
        torch.set_num_threads(threads_beside_workers(cfg.workers, world))
    if cfg.method in DINO_METHODS and not Path(cfg.weights).exists():
        fail(f"no DINOv3 backbone at {cfg.weights}. Download it (gated: accept the licence first): "
             f"huggingface-cli download facebook/dinov3-vit7b16-pretrain-lvd1689m --local-dir {cfg.weights} "
             f"(see weights/README.md), or pass --weights PATH")
    if not Path(cfg.data).exists():
        fail(f"no training images at {cfg.data}. Put one sub-folder per class there "
             f"(data/Lying/*.jpg, data/Standing/*.jpg, ...) or a CSV manifest path,label[,source], "
             f"or pass --data PATH")

    # ---------------------------------------------------------------- data
    try:
        train_ds, train_loader, sampler, val_loader, class_names, n_train, n_val = make_loaders(cfg, rank, world)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    C = len(class_names)

    # ---------------------------------------------------------------- model
    # CPU: fp32 everywhere; GPU: the frozen base in the autocast dtype (NF4 compute dtype)
    from nanopeft.checkpoint import CheckpointError

    try:
        model = build_classifier(cfg, C, device, dtype=amp if amp is not None else torch.float32)
    except (FileNotFoundError, CheckpointError) as e:
        fail(f"cannot load the backbone from {cfg.weights}: {e}")
    counts = count_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if world > 1:  # broadcast_buffers=False: the NF4 codes are buffers, identical on every rank
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    raw = model.module if world > 1 else model

    micro_per_epoch = sampler.num_batches()
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs

    # ---------------------------------------------------------------- run folder
    name = cfg.preset or (cfg.method if cfg.method not in ("lora", "dora")
                          else f"{cfg.method}-{cfg.targets.replace(',', '+')}-r{cfg.rank}")
    out = Path(cfg.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(out)
    state = dict(step=0, epoch=0, batches_done=0, best_val=-1.0, best_epoch=-1, bad_epochs=0, finished=False)
    resume_file = out / "resume.pt"
    if args.resume:
        if not resume_file.is_file():
            fail(f"--resume {out}: no resume.pt there")
        ck = torch.load(resume_file, map_location="cpu", weights_only=False)
        if ck["state"]["finished"] and not given.get("epochs"):
            fail(f"--resume {out}: that run already finished (raise --epochs to train further)")
        raw.load_state_dict(ck["trainable"], strict=False)
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        state.update(ck["state"], finished=False)
        torch.set_rng_state(ck["rng"])
        if torch.cuda.is_available() and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
    elif master and out.exists() and any(out.iterdir()):
        fail(f"run folder {out} already exists and is not empty: choose another --out or --resume it")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({
            "train": dataclasses.asdict(cfg), "class_names": class_names, "num_classes": C,
            "parameters": counts, "world_size": world, "n_train": n_train, "n_val": n_val}, indent=2))
    log = open(out / "train.log", "a") if master else None
    metrics = open(out / "metrics.jsonl", "a") if master else None

    def say(msg: str):
        if master:
            tqdm.write(msg)
            log.write(msg + "\n")
            log.flush()

    def record(**row):
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    say(f"nanopeft train: {name} on {device} ({world} process{'es' if world > 1 else ''}), "
        f"precision {amp or 'fp32'}{' + GradScaler' if scaler.is_enabled() else ''}")
    say(f"data: {n_train} train / {n_val} val images, {C} classes, ×{cfg.multiplier} per epoch "
        f"→ {len(train_ds)} samples, {micro_per_epoch} micro-batches of {cfg.batch_size}")
    say(f"parameters: adapter {counts['adapter']:,} + head {counts['head']:,} = {counts['trainable']:,} "
        f"trainable of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.3f}%)")
    say(f"optimizer: AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, batch {cfg.batch_size}×{cfg.grad_accum}, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps max, warmup {math.ceil(cfg.warmup_ratio * total_steps)}")

    def save_resume():
        if master:
            obj = {"trainable": {n: p.detach() for n, p in raw.named_parameters() if p.requires_grad},
                   "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state,
                   "rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            atomic_write(resume_file, lambda p: torch.save(obj, p))

    # ---------------------------------------------------------------- the loop
    stop = False
    t_start = time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        train_ds.set_epoch(epoch)
        skip = state["batches_done"]
        sampler.set_epoch(epoch, skip=skip)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not master,
                   initial=skip, total=micro_per_epoch, dynamic_ncols=True)
        t0, seen, running = time.perf_counter(), 0, 0.0
        for i, (x, y) in enumerate(bar, start=skip):
            group = i // cfg.grad_accum  # micro-batches in this accumulation group (the last may be short)
            group_size = min(cfg.grad_accum, micro_per_epoch - group * cfg.grad_accum)
            last_in_group = (i + 1) % cfg.grad_accum == 0 or i + 1 == micro_per_epoch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = model.no_sync() if world > 1 and not last_in_group else contextlib.nullcontext()
            with sync:
                with autocast(device, amp):
                    logits = model(x)
                loss = criterion(logits.float(), y) / group_size  # mean over the whole group
                scaler.scale(loss).backward()
            running += loss.item()
            seen += len(y) * world
            if not last_in_group:
                continue
            lr = get_lr(state["step"], total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as we can
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ips = seen / (time.perf_counter() - t0)
            loss_val = all_sum([running], device)[0] / world
            record(step=state["step"], epoch=epoch, loss=loss_val, lr=lr, images_per_s=ips)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            state["step"] += 1
            state["batches_done"] = i + 1
            t0, seen, running = time.perf_counter(), 0, 0.0
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if stop and state["batches_done"] < micro_per_epoch:
            save_resume()  # mid-epoch: --resume continues from this exact micro-batch
            say(f"stopped after {state['step']} steps (--max-steps); resume with --resume {out}")
            break
        # ------------------------------------------------------------ epoch end
        correct, total = all_sum(list(evaluate(model, val_loader, device, amp)), device)
        val_acc = correct / max(total, 1)
        state.update(epoch=epoch + 1, batches_done=0)
        improved = val_acc > state["best_val"] + cfg.min_delta
        if improved:
            state.update(best_val=val_acc, best_epoch=epoch + 1, bad_epochs=0)
            if master:
                save_run_weights(raw, cfg, out / "adapter")
        else:
            state["bad_epochs"] += 1
        record(epoch=epoch + 1, val_accuracy=val_acc, peak_memory_mb=peak_memory_mb(device),
               elapsed_s=time.perf_counter() - t_start, best=improved)
        say(f"epoch {epoch + 1}: val accuracy {val_acc:.4f}{' (best, saved)' if improved else ''}, "
            f"peak memory {peak_memory_mb(device):,.0f} MB")
        if state["bad_epochs"] >= cfg.patience:
            say(f"early stop: no improvement for {cfg.patience} epochs")
            stop = True
        state["finished"] = state["bad_epochs"] >= cfg.patience or epoch + 1 == cfg.epochs
        save_resume()
        if stop:
            break

    elapsed = time.perf_counter() - t_start
    summary = {"run": str(out), "method": cfg.method, "best_val_accuracy": state["best_val"],
               "best_epoch": state["best_epoch"], "steps": state["step"], "train_time_s": elapsed,
               "trainable_parameters": counts["trainable"], "peak_memory_mb": peak_memory_mb(device)}
    if master:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        width = max(len(k) for k in summary)
        say("\n".join(["", "summary", "-" * 40] + [f"{k:<{width}}  {v:,.4f}" if isinstance(v, float) else
                                                    f"{k:<{width}}  {v:,}" if isinstance(v, int) else
                                                    f"{k:<{width}}  {v}" for k, v in summary.items()]))
        test_dir = getattr(args, "demo_test", None) or "TEST_DIR"
        say(f"evaluate: python eval.py --run {out} --data {test_dir}")
        log.close()
        metrics.close()
    if world > 1:  # leave together: rank 0 may still be writing files, and a rank that tears gloo
        torch.distributed.barrier()  # down while its peer is busy can abort ("terminate called ...")
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
