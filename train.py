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
              ─► resume point (resume.pt) ─► metrics.csv + curves.png
    (a resume point also every --ckpt-every steps; a NaN/inf loss stops the run before anything of it is saved)
Everything around it is a small named helper below: the config (flags, --resume, --demo), the system
(processes, device, precision), data, model, and the run folder (nanopeft/training/run_folder.py).

Killed at any moment, `python train.py --resume RUN` continues from the last resume point and ends with the
same adapter, bit for bit, as a run never interrupted (docs/RELIABILITY.md lists what was tried).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanopeft import cli
from nanopeft.config import PROBE_METHODS, TrainConfig
from nanopeft.device import autocast, hugepage_cpu_allocator
from nanopeft.training.counts import count_params
from nanopeft.training.distributed import all_sum
from nanopeft.training.flags import completed, dry_run, list_presets, parse_args, run_config
from nanopeft.training.frozen import probe_run, use_feature_cache
from nanopeft.training.history import keep_best, multilabel_scores, validation_scores
from nanopeft.training.run import (count_skipped_step, finish_run, finite_loss, log_setup, open_run, report_epoch,
                                   save_best, save_resume_point)
from nanopeft.training.run_folder import unlock_run_folders
from nanopeft.training.setup import (Data, System, build_loaders, build_model, check_inputs, make_criterion,
                                     make_optimizer, setup_system)


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


@torch.no_grad()
def evaluate(model, loader, device, amp, criterion: nn.CrossEntropyLoss,
             num_classes: int) -> tuple[list[float], torch.Tensor]:
    """This rank's share of the validation sums nanopeft/training/history.py turns into scores:
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
        if y.dim() == 2:  # multi-label: the BCE per image; scores come from all the logits (validate)
            loss_sum += criterion(logits.float(), y, reduction="none").sum().item()
            weight_sum += len(y)
            continue
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
    sums = all_sum(sums, system.device)
    if data.multilabel:  # mAP, macro F1 and exact match at ½ over the whole split
        return multilabel_scores(logits.float().cpu(), data.val_targets, sums[0] / max(sums[1], 1)), logits.float().cpu()
    return validation_scores(sums, C), logits.float().cpu()


@cli.error_boundary(cleanup=unlock_run_folders)  # library faults (RunError, CheckpointError, OSError...): one line
def main(argv=None) -> dict:
    hugepage_cpu_allocator()  # first: torch reads its CPU allocator setting at the first tensor
    args = parse_args(argv, __doc__)
    cfg = run_config(args)
    if args.resume and (line := completed(cfg)):  # --resume on a finished run: nothing to do
        print(line)
        sys.exit(0)
    if args.list_presets:
        return list_presets(cfg)
    if args.dry_run:
        return dry_run(cfg)
    system = setup_system(cfg)
    device, amp, world = system.device, system.amp, system.world
    check_inputs(cfg, args, system)
    data = build_loaders(cfg, system.rank, world)
    model, wrapped = build_model(cfg, system, len(data.class_names))
    counts = count_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, model)  # AdamW; the study's methods: no decay on scales, norms, prompts
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
    criterion = make_criterion(cfg, data, device)
    out, state, log = open_run(cfg, args, system, model, optimizer, scaler, data, counts)
    if cfg.method in PROBE_METHODS:  # a probe is fitted in seconds on cached features: no loop
        seconds = probe_run(cfg, system, data, model, out, state, log)
        out = save_resume_point(out, cfg, system, model, optimizer, scaler, state, log)
        return finish_run(out, cfg, args, system, state, counts, log, seconds)
    wrapped = use_feature_cache(cfg, system, data, model, out, log, wrapped)  # frozen backbone: features once
    micro_per_epoch = data.sampler.num_batches()
    total_steps = math.ceil(micro_per_epoch / cfg.grad_accum) * cfg.epochs
    log_setup(log, cfg, system, scaler, data, counts, total_steps)

    # ---------------------------------------------------------------- the loop
    stop = False
    t_start = time.perf_counter()
    for epoch in range(state.epoch, cfg.epochs):
        wrapped.train()
        data.train_ds.set_epoch(epoch)
        skip = state.batches_done
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
            lr = get_lr(state.step, total_steps, cfg)
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
            log.record(step=state.step, epoch=epoch, loss=loss_val, lr=lr, images_per_s=ips)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            state.step += 1
            state.batches_done = i + 1
            t0, seen, running = time.perf_counter(), 0, torch.zeros((), device=device)
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and i + 1 < micro_per_epoch:
                out = save_resume_point(out, cfg, system, model, optimizer, scaler, state, log)
            if cfg.max_steps and state.step >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if stop and state.batches_done < micro_per_epoch:
            out = save_resume_point(out, cfg, system, model, optimizer, scaler, state, log)  # mid-epoch: resumes here
            log.say(f"stopped after {state.step} steps (--max-steps); resume with --resume {out}")
            break
        # ------------------------------------------------------------ epoch end
        val, val_logits = validate(wrapped, data, system, criterion)
        state.epoch, state.batches_done = epoch + 1, 0
        best = keep_best(state, val, cfg.select_metric, cfg.min_delta, epoch + 1)
        if best:
            save_best(model, cfg, system, out, state, data, {"epoch": epoch + 1, **val}, val_logits)
        report_epoch(log, out, system, val, epoch + 1, time.perf_counter() - t_start, best, cfg)
        if state.bad_epochs >= cfg.patience:
            log.say(f"early stop: no improvement for {cfg.patience} epochs")
            stop = True
        state.finished = state.bad_epochs >= cfg.patience or epoch + 1 == cfg.epochs
        out = save_resume_point(out, cfg, system, model, optimizer, scaler, state, log)
        if stop:
            break
    return finish_run(out, cfg, args, system, state, counts, log, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
