"""Classify images that have no labels: one CSV row per image with the top-k labels and probabilities.

    python predict.py --run runs/qlora-... --data frames/ --out predictions.csv      # a folder, flat or nested
    python predict.py --model exports/cows --data list.csv --top-k 3                 # a CSV with a `path` column
    python predict.py --run RUN --data "frames/2026-*/*.jpg"                          # a glob (quote it)
    torchrun --nproc_per_node 4 -- predict.py --run RUN --data frames/               # shard over 4 processes

Rows: path, label, prob, label_2, prob_2, ..., the CSV's other columns, error (set when an image does not
decode: the run goes on). Output is in input order and flushed after every batch; re-running with the same
--out skips what is already there. With torchrun, mind the `--` before predict.py: without it torch's launcher
takes --run for an abbreviation of its own --run-path. Adapters are merged into the backbone before
predicting; on a CPU in fp32 the Linear weights are then reordered once for oneDNN (`--prepack auto`,
nanopeft/inference/prepack.py: same outputs, faster small batches). --prior-correction re-weights the posteriors to
the test set's class priors (nanopeft/prior.py): `em` estimates them from these very images, FILE gives
them (JSON {class: share}).
"""

from __future__ import annotations

import argparse
import os

import torch

from nanopeft.calibration import KINDS, fold_into_head, refuse_knn
from nanopeft.cli import error_boundary
from nanopeft.training.distributed import init_distributed
from nanopeft.device import inference_precision, precision_name, resolve_device, threads_beside_workers
from nanopeft.inference.prepack import prepack_for_inference
from nanopeft.inference.predict import (check_resume, count_errors, export_identity, list_inputs, predict_to_csv, read_run,
                              remove_outputs, run_calibration, run_classifier, run_identity, run_thresholds,
                              run_train_priors, write_log)
from nanopeft.prior import check_method


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by train.py")
    src.add_argument("--model", help="export folder written by export.py")
    p.add_argument("--data", required=True, help="image folder (flat or nested), CSV with a `path` column, or glob")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (or to resume: the same model only; "
                                                            "OUT.log says which model wrote it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its .log, work files and priors) "
                                                            "instead of resuming it")
    p.add_argument("--top-k", type=int, default=3, help="labels per row, best first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--weights", help="--run: backbone path, if not where the run recorded it")
    p.add_argument("--prior-correction", default="none", metavar="none|em|FILE",
                   help="re-weight posteriors to the test priors: none, em (estimated), or a JSON {class: share}")
    p.add_argument("--wise", type=float, default=1.0, metavar="A",
                   help="with --run: WiSE-FT, (1-A)·pretrained + A·fine-tuned backbone (1: as trained)")
    p.add_argument("--calibration", choices=[*KINDS, "auto"], default=None,
                   help="--run: calibrate the logits on the run's validation logits (ts, bcts, vs, auto); default "
                        "none, auto with --prior-correction em. An export keeps the calibration it was written with")
    p.add_argument("--prepack", default="auto", choices=["auto", "no"],
                   help="CPU, fp32: reorder the Linear weights once for oneDNN (auto; same outputs)")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be >= 1")
    try:
        check_method(args.prior_correction)
    except ValueError as e:
        p.error(str(e))
    return args


def load(args, device, amp):
    """-> (model, class names, image size, training priors, the calibration line or "") from --run or --model."""
    if args.model:
        from nanopeft.inference.export import load_classifier

        model = load_classifier(args.model, device=device, precision=args.precision)
        return model, model.class_names, model.preprocessing["image_size"], model.train_priors, ""
    cfg, saved = read_run(args.run)
    cal, why = None, ""
    if args.calibration != "none":  # fitted first: its faults before the model is built
        cal, why, priors = run_calibration(args.run, args.calibration)
    model, saved = run_classifier(args.run, device, amp, weights=args.weights, merge="yes", wise=args.wise)
    if cal is not None:  # the calibrated logits come out of the head itself
        fold_into_head(model.head, cal)
    else:
        priors = run_train_priors(cfg, saved)
    return model, saved["class_names"], cfg.image_size, priors, why


def calibration_kind(args) -> str:
    """--calibration as asked; unset: auto with --prior-correction em for a run, else none. An export's
    calibration was chosen when it was written (export.py --calibration)."""
    if args.model:
        if args.calibration not in (None, "none"):
            raise ValueError(f"--calibration {args.calibration} with --model: an export predicts with the calibration "
                             f"it was written with (export.py --calibration); predict with --run to choose one")
        return "none"
    method = read_run(args.run)[0].method
    if read_run(args.run)[0].task == "multilabel":
        if args.calibration not in (None, "none") or args.prior_correction != "none":
            raise ValueError("--calibration and --prior-correction are single-label (softmax) tools; this is a "
                             "--task multilabel run")
        return "none"
    if args.calibration is not None:
        return refuse_knn([method], args.calibration)
    return refuse_knn([method], None) if method == "knn" else ("auto" if args.prior_correction == "em" else "none")


@error_boundary
def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, local = init_distributed()
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    amp, path = inference_precision(device, args.precision, "yes" if args.run else None)
    precision = precision_name(amp)
    if rank == 0:
        print(path)
    if device.type == "cpu" and args.workers > 0:  # leave the DataLoader workers their cores
        torch.set_num_threads(threads_beside_workers(args.workers, world))
    inputs = list_inputs(args.data)
    source = args.run or args.model
    if args.run:
        read_run(args.run)  # a folder that is no run: its one-line error before anything else
    if args.model and args.wise != 1.0:
        raise ValueError("--wise with --model: an export was interpolated when it was written (export.py --wise); "
                         "predict with --run to choose one")
    identity = run_identity(args.run) if args.run else export_identity(args.model)
    if args.wise != 1.0:  # another α is another model: OUT's rows must not mix them
        identity += f"+wise{args.wise:g}"
    args.calibration = calibration_kind(args)
    note = check_resume(args.out, identity, precision, args.calibration) if not args.overwrite else None
    model, names, size, priors, why = load(args, device, amp)  # before --overwrite removes anything
    if rank == 0 and why:
        print(why)
    if rank == 0 and args.overwrite:
        gone = remove_outputs(args.out)
        if gone:
            print(f"--overwrite: removed {', '.join(str(f) for f in gone)}")
    if args.overwrite and world > 1:
        torch.distributed.barrier()  # no rank reads the old CSV after rank 0 removed it
    packing = prepack_for_inference(model, device, amp, args.batch_size, size, args.prepack == "auto")
    if rank == 0 and args.prior_correction == "em" and args.calibration == "none" \
            and (getattr(model, "calibration", None) or {}).get("kind", "none") == "none":
        print("note: --prior-correction em on uncalibrated posteriors (not advised: EM's estimate is consistent "
              "only for calibrated posteriors; --calibration auto with --run, or export.py --calibration auto)")
    if rank == 0:
        print(packing)
        if note:
            print(note)
        fitted = ((getattr(model, "calibration", None) or {}).get("kind", "none") if args.model else  # the export's
                  why.partition(": ")[2].split(" ")[0] if args.calibration == "auto" else args.calibration)
        write_log(args.out, f"start identity={identity} precision={precision} calibration={args.calibration} "
                            f"calibration_fitted={fitted} model={source} data={args.data} "
                            f"prior_correction={args.prior_correction}")
    thresholds = run_thresholds(args.run, names) if args.run else getattr(model, "thresholds", None)  # multi-label
    summary = predict_to_csv(model, inputs, args.out, names, size, top_k=args.top_k, batch_size=args.batch_size,
                             workers=args.workers, device=device, amp=amp, prior=args.prior_correction,
                             train_priors=priors, thresholds=thresholds)
    summary["precision"] = precision
    if rank == 0:
        summary["errors"] = count_errors(args.out)
        line = (f"{summary['images']:,} images ({summary['skipped_done']:,} already there), "
                f"{summary['errors']:,} with an error (see the `error` column), precision {precision}")
        write_log(args.out, f"done images={summary['images']} already_there={summary['skipped_done']} "
                            f"errors={summary['errors']}")
        print(f"wrote {args.out}: {line}")
        if summary["prior_correction"]:
            pri = ", ".join(f"{k} {v:.3f}" for k, v in summary["prior_correction"]["priors"].items())
            print(f"estimated test priors (EM): {pri}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
