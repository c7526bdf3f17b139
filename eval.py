"""Evaluate a trained run on a test set: accuracy, balanced accuracy, F1, confusion matrix, per-source scores,
honest speed, and metrics after a correction for the test set's class priors.

    python eval.py --run runs/qlora-all-linear-r64-... --data data/test [--out metrics.json]
    python eval.py --run RUN --split val                      # the run's own validation split
    python eval.py --ensemble RUN1 RUN2 RUN3 --data data/test  # average the logits of several runs
    python eval.py --run RUN --data data/test --prior-correction em        # or a JSON {class: share}

Writes metrics.json, predictions.csv and confusion_matrix.png side by side. The adapters are merged into
the base for inference by default (`--merge yes`), so a DoRA run costs what the base model costs; the
paper evaluated unmerged DoRA at half QLoRA's speed. Speed is measured after warm-up with the device
synchronised: latency at batch 1 and throughput at --batch-size, for the model alone and with image
decoding and preprocessing included.

Bad input: every test image is decoded once before evaluating; an unreadable one (truncated, empty, not an
image, smaller than a patch) stops eval with its name unless `--skip-bad` leaves it out (metrics.json
`skipped` lists each with its reason). A test class the run never saw stops eval unless `--skip-unseen`
evaluates the known classes (metrics.json `unseen_classes`: {label: images left out}).

Prior shift: a model trained on balanced classes and tested where 39 % of the images are one class is
miscalibrated by the ratio of the priors. `--prior-correction` re-weights its posteriors to the test
priors (nanopeft/prior.py: known ones, or estimated on the test images themselves by EM, Saerens et al.
2002) and metrics.json then holds both: the raw metrics at the top level, the corrected ones under
`corrected`, and the priors under `prior_correction`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanopeft.data.augment import resize_normalize
from nanopeft.calibration import (KINDS, bootstrap_intervals, calibration_metrics, read_val_logits, refuse_knn,
                                  reliability_bins, with_interval)
from nanopeft.cli import error_boundary
from nanopeft.files.checkpoint_format import atomic_write
from nanopeft.config import TrainConfig
from nanopeft.data.folders import (ImageDataset, check_images, describe_unreadable, load_image, scan_dataset,
                                   scan_test_set, shown, skip_unreadable, training_pool)
from nanopeft.reports.metrics import compute_metrics, format_report
from nanopeft.reports.multilabel import multilabel_metrics, tune_thresholds
from nanopeft.device import autocast, inference_precision, precision_name, resolve_device, threads_beside_workers
from nanopeft.reports.plots import save_confusion_matrix, save_reliability_diagram
from nanopeft.inference.prepack import prepack_for_inference
from nanopeft.inference.predict import adapter_provenance, read_run, run_calibration, run_classifier, run_train_priors
from nanopeft.prior import check_method, correct


def load_model(run: str, device, amp, weights: str | None, merge: str, wise: float = 1.0, backbones=None):
    """Rebuild the run's classifier, load what it trained, and (by default) merge the adapters."""
    read_run(run)  # its errors first
    return run_classifier(run, device, amp, weights=weights, merge=merge, wise=wise, backbones=backbones)


def test_items(args, cfg: TrainConfig, saved: dict) -> tuple[list, dict[str, int]]:
    """(test samples, {label training never saw: image count}); the second is empty unless --skip-unseen."""
    if args.split == "val":  # rebuild the run's validation split exactly (same data, fraction, seed)
        return training_pool(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.split_seed)[1], {}
    if args.data is None:
        raise ValueError("give --data TEST_DIR (image folder or CSV) or --split val")
    items, unseen = scan_test_set(args.data, saved["class_names"])
    if unseen and not args.skip_unseen:
        counts = ", ".join(f"{label!r} ({n} image{'s' * (n != 1)})" for label, n in unseen.items())
        raise ValueError(f"{shown(args.data)}: class(es) training never saw: {counts}; the run knows {saved['class_names']}. "
             f"Remove them, or pass --skip-unseen to evaluate the known classes only")
    if not items:
        raise ValueError(f"{shown(args.data)}: no images of the classes the run knows ({saved['class_names']})")
    return items, unseen


def readable(items, skip_bad: bool) -> tuple[list, list[dict]]:
    """Decode every test image once up front (check_images, as train.py does), so a bad file is a one-line
    error instead of a DataLoader worker's traceback; --skip-bad leaves them out and lists them."""
    bad = check_images(items)
    if bad and not skip_bad:
        path, reason = bad[0]
        raise ValueError(f"unreadable image {shown(path)} ({shown(reason)}); {len(bad)} bad file(s) in all. "
             f"Fix or remove them, or pass --skip-bad")
    for line in describe_unreadable(bad):
        print(shown(line))
    items = skip_unreadable(items, bad)
    if not items:
        raise ValueError(f"no readable test images: all {len(bad)} are unreadable")
    return items, [{"path": shown(p), "reason": shown(r)} for p, r in bad]


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


def median_time(fn, n: int, sync) -> float:
    """Median wall time of n calls of fn, after 3 warm-up calls, the device synchronised around each."""
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


@torch.no_grad()
def measure_speed(model, items, image_size: int, batch_size: int, device, amp, reps: int = 20) -> dict:
    """Median latency (batch 1) and throughput (batch_size), device synchronised; `_with_data` adds
    Pillow decoding and preprocessing of real test images."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)

    def prep(k):
        return torch.stack([resize_normalize(load_image(items[j % len(items)].path).float() / 255, image_size)
                            for j in range(k)])

    run = lambda x: model(x.to(device)).float().cpu()
    one, batch = prep(1), prep(batch_size)
    with autocast(device, amp):
        lat = median_time(lambda: run(one), reps, sync)
        thr = median_time(lambda: run(batch), max(3, reps // 4), sync)
        lat_data = median_time(lambda: run(prep(1)), reps, sync)
        thr_data = median_time(lambda: run(prep(batch_size)), max(3, reps // 4), sync)
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder written by train.py")
    p.add_argument("--ensemble", nargs="+", metavar="RUN", help="several runs, of any methods: their logits are "
                   "averaged; metrics.json `ensemble` has each member's accuracy, their disagreement, the oracle")
    p.add_argument("--data", help="test image folder or CSV manifest (path,label[,source])")
    p.add_argument("--split", choices=["test", "val"], default="test", help="val: the run's validation split")
    p.add_argument("--out", help="metrics.json path, or a folder to hold it (default: RUN/metrics.json); "
                                 "predictions.csv and confusion_matrix.png go beside it")
    p.add_argument("--weights", help="backbone path, if not where the run recorded it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--merge", default="yes", choices=["yes", "requantize", "no"],
                   help="fold adapters into the base (yes: compute dtype; requantize: back to NF4; no)")
    p.add_argument("--wise", type=float, default=1.0, metavar="A",
                   help="WiSE-FT: interpolate the fine-tuned backbone with the pretrained one, (1-A)·θ0 + A·θ1 "
                        "(1: the run as trained; 0: the pretrained backbone with the fine-tuned head)")
    p.add_argument("--prepack", default="auto", choices=["auto", "no"],
                   help="CPU, fp32: reorder the merged Linear weights once for oneDNN (auto; same outputs)")
    p.add_argument("--speed-reps", type=int, default=20, help="timed calls per speed measurement (0: skip)")
    p.add_argument("--prior-correction", default="none", metavar="none|em|FILE",
                   help="re-weight posteriors to the test priors: none, em (estimated on the test images), "
                        "or a JSON file {class: share}")
    p.add_argument("--calibration", choices=[*KINDS, "auto"], default=None,
                   help="fit a calibration on the run's validation logits: ts, bcts, vs, auto (lowest "
                        "cross-validated NLL) or none (default; auto with --prior-correction em)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable test images out (listed in "
                                                           "metrics.json `skipped`) instead of stopping")
    p.add_argument("--skip-unseen", action="store_true", help="evaluate the classes the run knows when the test "
                   "set has others (counted in metrics.json `unseen_classes`) instead of stopping")
    args = p.parse_args(argv)
    try:
        check_method(args.prior_correction)
    except ValueError as e:
        p.error(str(e))
    args.runs = args.ensemble or ([args.run] if args.run else None)
    if not args.runs:
        raise ValueError("give --run RUN or --ensemble RUN1 RUN2 ...")
    return args


def ensemble_logits(args, items, names: list[str], device, amp):
    """Each member's (N, C) logits, (M, N, C), the loop's wall time, the (combined) speed measurement, and the
    line saying whether the Linears were prepacked. Each member runs with its own settings (its image size
    here; its pooling and method live in its model); the pretrained backbone is read from disk once and each
    member gets a copy (run_classifier's cache), merged into that copy, then freed."""
    per, wall, speed, backbones = [], 0.0, {}, {} if len(args.runs) > 1 else None
    for i, run in enumerate(args.runs):
        cfg, _ = read_run(run)
        model, saved = load_model(run, device, amp, args.weights, args.merge, args.wise, backbones)
        packing = prepack_for_inference(model, device, amp, args.batch_size, cfg.image_size, args.prepack == "auto")
        if i == 0:
            print(packing)
        if saved["class_names"] != names:
            raise ValueError(f"--ensemble: {shown(run)} was trained on classes {saved['class_names']}, {shown(args.runs[0])} "
                 f"on {names}")
        loader = torch.utils.data.DataLoader(ImageDataset(items, image_size=cfg.image_size), batch_size=args.batch_size,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        threads = torch.get_num_threads()
        if device.type == "cpu" and args.workers > 0:  # leave the workers their cores
            torch.set_num_threads(threads_beside_workers(args.workers))
        out, t = predict(model, loader, device, amp, desc=f"eval {Path(run).name}")
        torch.set_num_threads(threads)  # speed is measured without workers, on every thread
        per.append(out)
        wall += t
        if args.speed_reps:
            speed = combine_speed(speed, measure_speed(model, items, cfg.image_size, args.batch_size, device, amp,
                                                       args.speed_reps))
        del model
    return torch.stack(per), wall, speed, packing


def members_report(per: torch.Tensor, labels: list[int], runs: list[str]) -> dict:
    """How an ensemble's members differ (the unifying study's complementary mistakes, Mai et al. 2025): each
    member's accuracy, the fraction of images each pair labels differently, and the oracle accuracy (the
    fraction that at least one member gets right: what a perfect chooser among them would score)."""
    pred, y = per.argmax(-1), torch.tensor(labels)           # (M, N), (N,)
    right = pred == y                                       # (M, N)
    names = [shown(Path(r).name) for r in runs]
    disagree = {f"{names[i]} vs {names[j]}": float((pred[i] != pred[j]).float().mean())
                for i in range(len(runs)) for j in range(i + 1, len(runs))}
    return {"members": [{"run": shown(r), "accuracy": float(right[i].float().mean())} for i, r in enumerate(runs)],
            "pairwise_disagreement": disagree, "oracle_accuracy": float(right.any(0).float().mean()),
            "combination": "mean of the members' logits"}


def score(items, probs: torch.Tensor, names: list[str]) -> dict:
    labels = [s.label for s in items]
    sources = [s.source for s in items] if any(s.source for s in items) else None
    return compute_metrics(labels, probs.argmax(-1).numpy(), class_names=names, sources=sources)


def calibration_kind(args) -> str:
    """--calibration as asked; unset: auto for --prior-correction em (EM needs calibrated posteriors), else
    none. A calibrator fitted on the validation split never scores that split."""
    if args.calibration not in (None, "none") and args.split == "val":
        raise ValueError(f"--calibration {args.calibration} with --split val: the calibrator is fitted on the "
                         f"validation split, so it would score its own fitting data; evaluate a test set (--data)")
    methods = [read_run(r)[0].method for r in args.runs]
    if args.calibration is not None or "knn" in methods:
        return refuse_knn(methods, args.calibration)
    return "auto" if args.prior_correction == "em" and args.split != "val" else "none"


def calibrated(args):
    """(Calibrator or None, the mean calibrated validation posterior or None): the runs' (or ensemble's)
    calibration, fitted on the validation logits they stored."""
    kind = calibration_kind(args)
    if kind == "none":
        return None, None
    cal, why, source = run_calibration(args.runs, kind)
    cal.nll["why"] = why
    print(why)
    return cal, source


def prior_corrected(args, probs: torch.Tensor, cal, source, cfg0, saved0, names):
    """(corrected posteriors, info) for --prior-correction, or (None, None) for none. Calibrated: the source
    priors are the mean calibrated validation posterior (Alexandari et al. 2020); else the training priors."""
    if args.prior_correction == "none":
        return None, None
    if cal is not None:
        what = "the mean calibrated validation posterior"
    else:
        source = np.mean([run_train_priors(*read_run(r)) for r in args.runs], axis=0)  # each member's own
        what = "the training class shares (uncalibrated: not advised)"
    fixed, info = correct(probs, args.prior_correction, source, names)
    info.update(posteriors=f"{cal.kind}-calibrated" if cal is not None else "uncalibrated", source_priors=what)
    if info["method"] == "em":
        print(f"prior correction em on the {info['posteriors']} posteriors, source priors {what}: estimated test "
              f"priors " + ", ".join(f"{k} {v:.3f}" for k, v in info["priors"].items())
              + f" ({info['iterations']} iterations)")
    return torch.from_numpy(fixed), info


def scored(items, probs, names) -> dict:
    """score() plus the 95 % stratified bootstrap intervals of its headline numbers."""
    m = score(items, probs, names)
    m["intervals"] = bootstrap_intervals([s.label for s in items], probs.argmax(-1).numpy(), len(names))
    return m


def write_predictions(path: Path, items, names, probs, fixed=None, calibrated=None) -> None:
    """predictions.csv: path, label, prediction, confidence, source (+ the calibrated and the prior-corrected
    pairs)."""
    extra = [(kind, p, p.argmax(-1).tolist()) for kind, p in (("calibrated", calibrated), ("corrected", fixed))
             if p is not None]
    preds = probs.argmax(-1).tolist()

    def rows(w):
        w.writerow(["path", "label", "prediction", "confidence", "source",
                    *[c for kind, _, _ in extra for c in (f"prediction_{kind}", f"confidence_{kind}")]])
        for i, (s, pr) in enumerate(zip(items, preds)):
            row = [shown(s.path), names[s.label], names[pr], f"{probs[i, pr]:.6f}", s.source]
            for _, p, top in extra:
                row += [names[top[i]], f"{p[i, top[i]]:.6f}"]
            w.writerow(row)

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            rows(csv.writer(f))

    atomic_write(path, write)


def out_path(args) -> Path:
    """--out FILE.json, or a folder (existing, ending in '/', or without a suffix) that gets metrics.json."""
    if args.out:
        out = Path(args.out)
        if out.is_dir() or args.out.endswith(("/", os.sep)) or not out.suffix:
            return out / ("metrics_val.json" if args.split == "val" else "metrics.json")
        return out
    return Path(args.runs[0]) / ("metrics_val.json" if args.split == "val" else "metrics.json")


def headline(m: dict) -> str:
    """accuracy 0.8316 [0.8301, 0.8331], balanced accuracy ..., macro F1 ..."""
    return ", ".join(f"{label} {with_interval(m[key], m['intervals'][key])}" for key, label in
                     (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1")))


def print_summary(metrics: dict, speed: dict, batch_size: int, out: Path) -> None:
    print(format_report(metrics))
    print(f"\n{headline(metrics)}  (95 % intervals: stratified bootstrap, 1,000 resamples)")
    cm = metrics["calibration_metrics"]
    for name, c in cm.items():
        print(f"{name} posteriors on the test set: NLL {c['nll']:.4f}, Brier {c['brier']:.4f}, ECE {c['ece']:.4f}")
    if metrics.get("calibrated"):
        print(f"calibrated ({metrics['calibration']['kind']}), not prior-corrected: {headline(metrics['calibrated'])}")
    if metrics.get("corrected"):
        c, pri = metrics["corrected"], metrics["prior_correction"]
        print(f"prior-corrected ({pri['method']}, {pri['posteriors']} posteriors): {headline(c)}; test priors "
              + ", ".join(f"{k} {v:.3f}" for k, v in pri["priors"].items()))
    if speed:
        print(f"\nspeed on {speed['speed_device']}: {speed['latency_ms']:.2f} ms/image at batch 1 "
              f"({speed['latency_ms_with_data']:.2f} with decoding), {speed['throughput_img_s']:.1f} img/s at batch "
              f"{batch_size} ({speed['throughput_img_s_with_data']:.1f} with decoding); whole loop incl. "
              f"data loading {metrics['eval_throughput_img_s']:.1f} img/s")
    if metrics.get("skipped"):
        print(f"left out {len(metrics['skipped'])} unreadable image(s) (--skip-bad; listed in metrics.json)")
    if metrics.get("unseen_classes"):
        print(f"left out {sum(metrics['unseen_classes'].values())} image(s) of classes the run never saw "
              f"(--skip-unseen): " + ", ".join(f"{shown(k)} {v}" for k, v in metrics["unseen_classes"].items()))
    print(f"wrote {shown(out)}, {shown(out.with_name('predictions.csv'))}, "
          f"{shown(out.with_name('confusion_matrix.png'))} and {shown(out.with_name('reliability_diagram.png'))}")


def multilabel_eval(args, device, amp, path: str) -> dict:
    """--task multilabel runs: sigmoid posteriors, each class's label at its own threshold (F1-optimal on the
    run's stored validation logits, nanopeft/reports/multilabel.py), and mAP, per-class AP, micro / macro F1
    and exact match in metrics.json; predictions.csv lists each image's labels over their thresholds."""
    if len(args.runs) > 1 or args.calibration not in (None, "none") or args.prior_correction != "none":
        raise ValueError("a --task multilabel run is scored alone: --ensemble, --calibration and --prior-correction "
                         "are single-label (softmax) tools")
    run = args.runs[0]
    cfg, saved = read_run(run)
    names = saved["class_names"]
    if args.split == "val":
        items = training_pool(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.split_seed, multilabel=True)[1]
    elif args.data:
        items, _ = scan_dataset(args.data, class_names=names, multilabel=True)
    else:
        raise ValueError("give --data TEST.csv (path,labels) or --split val")
    model, _ = load_model(run, device, amp, args.weights, args.merge, args.wise)
    print(prepack_for_inference(model, device, amp, args.batch_size, cfg.image_size, args.prepack == "auto"))
    loader = torch.utils.data.DataLoader(ImageDataset(items, image_size=cfg.image_size, num_classes=len(names)),
                                         batch_size=args.batch_size, num_workers=args.workers)
    logits, wall = predict(model, loader, device, amp, desc=f"eval {Path(run).name}")
    probs = torch.sigmoid(logits).numpy()                                   # (N, C): one posterior per class
    val_logits, val_y, _, _ = read_val_logits(run)
    thresholds = tune_thresholds(torch.sigmoid(val_logits).numpy(), val_y.numpy())  # (C,), on the validation split
    y = np.zeros(probs.shape)
    for i, s in enumerate(items):
        y[i, list(s.label)] = 1
    metrics = multilabel_metrics(probs, y, thresholds, names)
    metrics.update(task="multilabel", runs=args.runs, data=shown(args.data) if args.split == "test" else "val split",
                   thresholds={n: float(t) for n, t in zip(names, thresholds)}, inference_path=path,
                   precision=precision_name(amp), eval_wall_s=wall, wise=args.wise)
    out = out_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text(json.dumps(metrics, indent=2)))
    pred = probs >= thresholds

    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "labels", "predicted", *[f"prob_{n}" for n in names]])
            for i, s in enumerate(items):
                w.writerow([s.path, ";".join(names[c] for c in s.label), ";".join(n for n, k in zip(names, pred[i]) if k),
                            *(f"{v:.6f}" for v in probs[i])])
    atomic_write(out.with_name("predictions.csv"), write)
    print(f"mAP {metrics['mAP']:.4f}, micro F1 {metrics['micro_f1']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
          f"exact match {metrics['exact_match']:.4f} ({len(items)} images, per-class thresholds from the validation "
          f"split)\nwrote {shown(out)} and {shown(out.with_name('predictions.csv'))}")
    return metrics


@error_boundary
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    amp, path = inference_precision(device, args.precision, args.merge)
    print(path)
    cfg0, saved0 = read_run(args.runs[0])
    if getattr(cfg0, "task", "single") == "multilabel":
        return multilabel_eval(args, device, amp, path)
    for run in args.runs:
        read_run(run)
    adapters = [adapter_provenance(run) for run in args.runs]
    for a in adapters:
        if a["note"]:
            print(a["note"])
    names = saved0["class_names"]
    items, unseen = test_items(args, cfg0, saved0)
    # a --skip-bad run left its unreadable images out of its validation split, so does the rebuilt split
    items, skipped = readable(items, args.skip_bad or (args.split == "val" and cfg0.skip_bad))
    cal, source = calibrated(args)  # before the test pass: its faults are one line, not hours later
    per, wall, speed, packing = ensemble_logits(args, items, names, device, amp)
    logits = per.mean(0)                                   # (N, C): the members' logits averaged
    probs = logits.softmax(-1)
    cprobs = cal.apply(logits).softmax(-1).float() if cal is not None else None  # calibrated posteriors
    fixed, info = prior_corrected(args, cprobs if cal is not None else probs, cal, source, cfg0, saved0, names)

    labels = [s.label for s in items]
    metrics = scored(items, probs, names)
    metrics["calibration"] = cal.to_dict() if cal is not None else {"kind": "none"}
    metrics["calibration_metrics"] = {"uncalibrated": calibration_metrics(probs, labels)}
    if cal is not None:
        metrics["calibration_metrics"]["calibrated"] = calibration_metrics(cprobs, labels)
        metrics["calibrated"] = scored(items, cprobs, names)
    metrics.update(speed)
    metrics.update(eval_wall_s=wall, eval_throughput_img_s=len(items) / wall, runs=args.runs,
                   data=shown(args.data) if args.split == "test" else "val split", merged=args.merge,
                   inference_path=f"{path}; {packing}", precision=precision_name(amp),
                   adapter_id=adapters[0]["adapter_id"] if len(adapters) == 1 else [a["adapter_id"] for a in adapters],
                   adapter_epoch=adapters[0]["adapter_epoch"] if len(adapters) == 1 else [a["adapter_epoch"] for a in adapters],
                   skipped=skipped, unseen_classes={shown(k): n for k, n in unseen.items()}, wise=args.wise)
    if len(args.runs) > 1:
        metrics["ensemble"] = members_report(per, labels, args.runs)
        print("ensemble: " + ", ".join(f"{m['run']} {m['accuracy']:.4f}" for m in metrics["ensemble"]["members"])
              + f"; together {metrics['accuracy']:.4f}, oracle {metrics['ensemble']['oracle_accuracy']:.4f}")
    if fixed is not None:
        metrics.update(corrected=scored(items, fixed, names), prior_correction=info)
        metrics["calibration_metrics"]["prior-corrected"] = calibration_metrics(fixed, labels)
    out = out_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text(json.dumps(metrics, indent=2)))
    write_predictions(out.with_name("predictions.csv"), items, names, probs, fixed, cprobs)
    title = f"{shown(Path(args.runs[0]).name)} on {shown(Path(args.data).name) if args.data else 'its val split'}"
    save_confusion_matrix(metrics["confusion_matrix"], names, out.with_name("confusion_matrix.png"), title=title)
    if fixed is not None:
        save_confusion_matrix(metrics["corrected"]["confusion_matrix"], names,
                              out.with_name("confusion_matrix_corrected.png"), title=f"{title}, prior-corrected")
    curves = [(name, reliability_bins(p, labels), metrics["calibration_metrics"][name]["ece"])
              for name, p in (("uncalibrated", probs), ("calibrated", cprobs), ("prior-corrected", fixed))
              if p is not None]
    save_reliability_diagram(curves, out.with_name("reliability_diagram.png"))
    print_summary(metrics, speed, args.batch_size, out)
    return metrics


if __name__ == "__main__":
    main()
