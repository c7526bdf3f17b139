"""A run's life in its folder: open it (or reopen it for --resume), save a resume point, keep the best
epoch's weights, report each epoch, stop on a numerical fault, finish with summary.json.

The files themselves (naming, lock, config.json, logs, adapter/, summary) are nanopeft/training/run_folder.py;
resume.pt is nanopeft/training/resume.py. Everything here writes on rank 0 only; a fault raises RunError
naming the file or step, which train.py's error boundary prints as one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..calibration import save_val_logits
from ..config import TrainConfig
from ..device import peak_memory_mb
from ..files.save import adapter_identity
from .history import write_history
from .resume import LoopState, load_resume, save_resume
from .setup import Data, System
from .run_folder import (RunError, RunLog, run_name, save_run_weights, staging_path, swap_in, unlock_run_folders,
                         write_failed, write_run_config, write_summary)


def report_epoch(log: RunLog, out: Path, system: System, val: dict, epoch: int, elapsed: float, best: bool,
                 cfg: TrainConfig) -> None:
    """The epoch's row in metrics.jsonl and its line in train.log; metrics.csv and curves.png redrawn."""
    mem = peak_memory_mb(system.device)
    log.record(epoch=epoch, **val, peak_memory_mb=mem, elapsed_s=elapsed, best=best)
    first = f"mAP {val['val_map']:.4f}, exact match" if "val_map" in val else "val accuracy"  # --task multilabel
    log.say(f"epoch {epoch}: {first} {val['val_accuracy']:.4f}, macro F1 {val['val_macro_f1']:.4f}, "
            f"loss {val['val_loss']:.4f}{f' (best {cfg.select_metric}, saved)' if best else ''}, "
            f"peak memory {mem:,.0f} MB")
    if system.master:
        try:
            write_history(out, f"Training: {out.name}")
        except (OSError, ValueError) as e:  # a picture must never stop a run
            log.say(f"warning: could not write metrics.csv / curves.png: {e}")


# ---------------------------------------------------------------------------------------------- run folder
def open_run(cfg: TrainConfig, args, system: System, model, optimizer, scaler, data: Data,
             counts: dict) -> tuple[Path, LoopState, RunLog]:
    """The run folder (claimed by setup.claim_run_folder; --resume's with its last resume point loaded into model,
    optimizer and scaler, or from the beginning if it has none yet; --overwrite's a hidden sibling until the
    first resume point), config.json written, and the log opened (metrics.jsonl cut back to the resume point).
    Returns (the folder written now, loop state, log)."""
    out, state, note = Path(cfg.out), LoopState(), None
    if args.resume:
        note = (f"resuming {out} at step {state.step} (epoch {state.epoch + 1}, micro-batch "
                f"{state.batches_done})" if load_resume(out, model, optimizer, scaler, state)
                else f"--resume {out}: no resume point yet, starting from the beginning")
    if system.master and args.overwrite and out.is_dir() and any(out.iterdir()):
        out = staging_path(out)
        note = f"--overwrite: training in {out}, which replaces {cfg.out} at the first resume point"
    if system.master:
        try:
            write_run_config(out, cfg, class_names=data.class_names, parameters=counts, world_size=system.world,
                             n_train=data.n_train, n_val=data.n_val,
                             train_class_counts=dict(zip(data.class_names, data.train_counts)))
        except OSError as e:
            raise RunError(f"cannot write {out / 'config.json'}: {e.strerror or e}") from None
    log = RunLog(out, system.master, metrics_bytes=state.metrics_bytes)
    if note:
        log.say(note)
    for line in data.notes:
        log.say(line)
    return out, state, log


def save_resume_point(out: Path, cfg: TrainConfig, system: System, model, optimizer, scaler, state: LoopState,
               log: RunLog) -> Path:
    """resume.pt now (rank 0), recording metrics.jsonl's length; never of non-finite weights (they would
    replace the last good resume point). Under --overwrite the first one swaps the new run into --out, so the
    old run is deleted only once the new one can resume. Returns the run folder (moved by that swap)."""
    check_finite_weights(model, state, out)  # every rank: DDP keeps the weights equal, so all stop together
    if not system.master:
        return out
    state.metrics_bytes = log.metrics_bytes()
    try:
        save_resume(out, model, optimizer, scaler, state)
    except RunError as e:
        log.say(f"error: {e}")
        raise
    if out != Path(cfg.out):
        swap_in(out, Path(cfg.out))
        out = Path(cfg.out)
        log.say(f"--overwrite: the new run replaced {out}")
    return out


def save_best(model, cfg: TrainConfig, system: System, out: Path, state: LoopState, data: Data,
              scores: dict, val_logits: torch.Tensor) -> None:
    """The best epoch's adapter/ (rank 0; finite weights only); a failed write is a one-line error naming the file."""
    check_finite_weights(model, state, out)  # every rank, as in save_resume_point(): none waits for a rank that stopped
    if not system.master:
        return
    try:
        save_run_weights(model, cfg, out / "adapter", data.class_names, scores)
        # the kept epoch's validation logits, tied to this adapter: what eval.py --calibration fits on
        labels = data.val_targets.long() if data.multilabel else [s.label for s in data.val_samples]  # (N, C) 0/1 or (N,)
        save_val_logits(out, val_logits, labels, [s.path for s in data.val_samples],
                        adapter_identity(out / "adapter")[0])
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        name = "adapter_config.json" if "config" in str(getattr(e, "filename", "")) else "adapter_model.safetensors"
        raise write_failed(out / "adapter" / name, e) from None


def count_skipped_step(scaler, scale_before: float, state: LoopState, log: RunLog) -> None:
    """fp16: GradScaler skipped this step when it lowered its scale (the gradients held an inf or NaN);
    counted in resume.pt's state and summary.json, and each one a line in train.log."""
    if scaler.get_scale() < scale_before:
        state.skipped_steps += 1
        log.say(f"step {state.step}: fp16 overflow, step skipped ({state.skipped_steps} so far)")


def finite_loss(loss: float, state: LoopState, out: Path) -> float:
    """The step's loss, or a stop naming the step if it is NaN or inf."""
    if not math.isfinite(loss):
        numerical_fault(state, f"the loss is {loss}", out)
    return loss


def check_finite_weights(model, state: LoopState, out: Path) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        numerical_fault(state, f"the weight {bad[0]} is not finite", out)


def numerical_fault(state: LoopState, what: str, out: Path) -> None:
    """A NaN/inf loss or weight: stop before anything of it is saved; the last resume point and the best adapter
    stay as they are (and still load)."""
    kept = [str(out / f) for f in ("resume.pt", "adapter") if (out / f).exists()]
    raise RunError(f"step {state.step}: {what}; training stopped (try a lower --lr). "
         f"{'Kept: ' + ', '.join(kept) if kept else 'No resume point was written yet'}")


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


def finish_run(out: Path, cfg: TrainConfig, args, system: System, state: LoopState, counts: dict, log: RunLog,
               elapsed: float) -> dict:
    validated = state.best_epoch >= 1  # a --max-steps run can stop before its first validation
    summary = {"run": str(out), "method": cfg.method, "best_val_accuracy": state.best_val if validated else None,
               "best_epoch": state.best_epoch if validated else None, "steps": state.step, "train_time_s": elapsed,
               "trainable_parameters": counts["trainable"], "peak_memory_mb": peak_memory_mb(system.device),
               "select_metric": cfg.select_metric, "best_score": state.best_score,
               "skipped_steps": state.skipped_steps}
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
