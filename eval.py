"""Evaluate a trained run on a test set: accuracy, F1, confusion matrix, per-source scores, honest speed.

    python eval.py --run runs/qlora-all-linear-r64-... --data data/test [--out metrics.json]
    python eval.py --run RUN --split val                      # the run's own validation split
    python eval.py --ensemble RUN1 RUN2 RUN3 --data data/test  # average the logits of several runs

The adapters are merged into the base for inference by default (`--merge yes`), so a DoRA run costs
what the base model costs; the paper evaluated unmerged DoRA at half QLoRA's speed. Speed is measured
after warm-up with the device synchronised: latency at batch 1 and throughput at --batch-size, for the
model alone and with image decoding and preprocessing included.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from nanopeft.config import TrainConfig
from nanopeft.data import ImageDataset, check_images, load_image, scan_dataset, stratified_split
from nanopeft.augment import resize_normalize
from nanopeft.metrics import compute_metrics, format_report
from nanopeft.build import build_classifier
from nanopeft.config import ADAPTER_METHODS, SCRATCH_METHODS
from nanopeft.device import autocast, autocast_dtype, resolve_device, threads_beside_workers
from nanopeft.run import load_run_weights


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_run(run: str) -> tuple[TrainConfig, dict]:
    cfg_file = Path(run) / "config.json"
    if not cfg_file.is_file():
        fail(f"--run {run}: no config.json there (expected a folder written by train.py)")
    if not (Path(run) / "adapter" / "adapter_model.safetensors").is_file():
        fail(f"--run {run}: no adapter/adapter_model.safetensors (did the run finish an epoch?)")
    saved = json.loads(cfg_file.read_text())
    return TrainConfig(**saved["train"]), saved


def load_model(run: str, device, amp, weights: str | None, merge: str) -> tuple[nn.Module, dict]:
    """Rebuild the run's classifier, load what it trained, and (by default) merge the adapters."""
    from nanopeft.inject import merge_adapters

    cfg, saved = read_run(run)
    if weights:
        cfg.weights = weights
    if cfg.method not in SCRATCH_METHODS and not Path(cfg.weights).exists():
        fail(f"the run's backbone {cfg.weights} does not exist here; pass --weights PATH")
    model = build_classifier(cfg, saved["num_classes"], device, dtype=amp or torch.float32, adapters=False)
    load_run_weights(model, cfg, Path(run) / "adapter")
    if merge != "no" and cfg.method in ADAPTER_METHODS:
        merge_adapters(model.backbone, requantize=(merge == "requantize"))
    return model.eval(), saved


def test_items(args, cfg: TrainConfig, saved: dict):
    if args.split == "val":  # rebuild the run's validation split exactly (same data, fraction, seed)
        items, names = scan_dataset(cfg.data)
        val = stratified_split(items, val_fraction=cfg.val_fraction, seed=cfg.split_seed)[1]
        if cfg.skip_bad:  # the run left its unreadable images out (--skip-bad), so does its split
            bad = {str(p) for p, _ in check_images(val)}
            val = [s for s in val if str(s.path) not in bad]
        return val
    if args.data is None:
        fail("give --data TEST_DIR (image folder or CSV) or --split val")
    try:
        items, _ = scan_dataset(args.data, class_names=saved["class_names"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    return items


@torch.no_grad()
def predict(model, loader, device, amp, desc: str) -> tuple[torch.Tensor, float]:
    """Logits for the whole loader, and the wall time including data loading."""
    outs = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync()
    t0 = time.perf_counter()
    for x, _ in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
        with autocast(device, amp):
            outs.append(model(x.to(device, non_blocking=True)).float().cpu())
    sync()
    return torch.cat(outs), time.perf_counter() - t0


@torch.no_grad()
def measure_speed(model, items, image_size: int, batch_size: int, device, amp, reps: int = 20) -> dict:
    """Median latency (batch 1) and throughput (batch_size), after 3 warm-up calls, device synchronised;
    `_with_data` adds Pillow decoding and preprocessing of real test images."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)

    def timed(fn, n):
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def prep(k):
        return torch.stack([resize_normalize(load_image(items[j % len(items)].path).float() / 255, image_size)
                            for j in range(k)])

    run = lambda x: model(x.to(device)).float().cpu()
    one, batch = prep(1), prep(batch_size)
    with autocast(device, amp):
        lat = timed(lambda: run(one), reps)
        thr = timed(lambda: run(batch), max(3, reps // 4))
        lat_data = timed(lambda: run(prep(1)), reps)
        thr_data = timed(lambda: run(prep(batch_size)), max(3, reps // 4))
    return {"latency_ms": 1000 * lat, "throughput_img_s": batch_size / thr,
            "latency_ms_with_data": 1000 * lat_data, "throughput_img_s_with_data": batch_size / thr_data,
            "speed_batch_size": batch_size, "speed_device": str(device)}


def combine_speed(a: dict, b: dict) -> dict:
    """An ensemble runs every member on each image: latencies add, throughputs combine harmonically."""
    if not a:
        return b
    out = dict(b)
    for k in ("latency_ms", "latency_ms_with_data"):
        out[k] = a[k] + b[k]
    for k in ("throughput_img_s", "throughput_img_s_with_data"):
        out[k] = 1 / (1 / a[k] + 1 / b[k])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder written by train.py")
    p.add_argument("--ensemble", nargs="+", metavar="RUN", help="several runs: their logits are averaged")
    p.add_argument("--data", help="test image folder or CSV manifest (path,label[,source])")
    p.add_argument("--split", choices=["test", "val"], default="test", help="val: the run's validation split")
    p.add_argument("--out", help="metrics.json path (default: RUN/metrics.json); predictions.csv goes beside it")
    p.add_argument("--weights", help="backbone path, if not where the run recorded it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--merge", default="yes", choices=["yes", "requantize", "no"],
                   help="fold adapters into the base (yes: compute dtype; requantize: back to NF4; no)")
    p.add_argument("--speed-reps", type=int, default=20, help="timed calls per speed measurement (0: skip)")
    args = p.parse_args(argv)
    runs = args.ensemble or ([args.run] if args.run else None)
    if not runs:
        fail("give --run RUN or --ensemble RUN1 RUN2 ...")
    device = resolve_device(args.device)
    amp = autocast_dtype(device, args.precision)

    cfg0, saved0 = read_run(runs[0])
    items = test_items(args, cfg0, saved0)
    image_size = saved0["train"]["image_size"]
    ds = ImageDataset(items, image_size=image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    logits, wall, speed = 0, 0.0, {}
    for run in runs:
        model, saved = load_model(run, device, amp, args.weights, args.merge)
        if saved["class_names"] != saved0["class_names"]:
            fail(f"--ensemble: {run} was trained on classes {saved['class_names']}, {runs[0]} on "
                 f"{saved0['class_names']}")
        threads = torch.get_num_threads()
        if device.type == "cpu" and args.workers > 0:  # leave the workers their cores
            torch.set_num_threads(threads_beside_workers(args.workers))
        out, t = predict(model, loader, device, amp, desc=f"eval {Path(run).name}")
        torch.set_num_threads(threads)  # speed is measured without workers, on every thread
        logits, wall = logits + out, wall + t
        if args.speed_reps:
            speed = combine_speed(speed, measure_speed(model, items, image_size, args.batch_size, device, amp,
                                                       args.speed_reps))
        del model
    logits = logits / len(runs)
    preds = logits.argmax(-1)
    labels = torch.tensor([s.label for s in items])
    sources = [s.source for s in items] if any(s.source for s in items) else None
    metrics = compute_metrics(labels.numpy(), preds.numpy(), class_names=saved0["class_names"], sources=sources)
    metrics.update(speed)
    metrics.update(eval_wall_s=wall, eval_throughput_img_s=len(items) / wall, runs=runs,
                   data=args.data if args.split == "test" else "val split", merged=args.merge)

    out = Path(args.out) if args.out else Path(runs[0]) / ("metrics_val.json" if args.split == "val" else
                                                          "metrics.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    probs = logits.softmax(-1)
    names = saved0["class_names"]
    with open(out.with_name("predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "prediction", "confidence", "source"])
        for s, pr, pb in zip(items, preds.tolist(), probs.tolist()):
            w.writerow([s.path, names[s.label], names[pr], f"{pb[pr]:.6f}", s.source])
    print(format_report(metrics))
    if speed:
        print(f"\nspeed on {speed['speed_device']}: {speed['latency_ms']:.2f} ms/image at batch 1 "
              f"({speed['latency_ms_with_data']:.2f} with decoding), {speed['throughput_img_s']:.1f} img/s at batch "
              f"{args.batch_size} ({speed['throughput_img_s_with_data']:.1f} with decoding); whole loop incl. "
              f"data loading {metrics['eval_throughput_img_s']:.1f} img/s")
    print(f"wrote {out} and {out.with_name('predictions.csv')}")
    return metrics


if __name__ == "__main__":
    main()
