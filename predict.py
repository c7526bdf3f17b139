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
nanopeft/prepack.py: same outputs, faster small batches). --prior-correction re-weights the posteriors to
the test set's class priors (nanopeft/prior.py): `em` estimates them from these very images, FILE gives
them (JSON {class: share}).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from nanopeft.distributed import init_distributed
from nanopeft.device import inference_precision, resolve_device, threads_beside_workers
from nanopeft.prepack import prepack_for_inference
from nanopeft.predict import list_inputs, predict_to_csv, run_classifier, run_train_priors, read_run
from nanopeft.prior import check_method


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by train.py")
    src.add_argument("--model", help="export folder written by export.py")
    p.add_argument("--data", required=True, help="image folder (flat or nested), CSV with a `path` column, or glob")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (or to resume)")
    p.add_argument("--top-k", type=int, default=3, help="labels per row, best first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--weights", help="--run: backbone path, if not where the run recorded it")
    p.add_argument("--prior-correction", default="none", metavar="none|em|FILE",
                   help="re-weight posteriors to the test priors: none, em (estimated), or a JSON {class: share}")
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
    """-> (model, class names, image size, training priors) from --run or --model."""
    if args.model:
        from nanopeft.export import load_classifier

        model = load_classifier(args.model, device=device, dtype=amp)
        return model, model.class_names, model.preprocessing["image_size"], model.train_priors
    cfg, saved = read_run(args.run)
    model, saved = run_classifier(args.run, device, amp, weights=args.weights, merge="yes")
    return model, saved["class_names"], cfg.image_size, run_train_priors(cfg, saved)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, local = init_distributed()
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    amp, path = inference_precision(device, args.precision, "yes" if args.run else None)
    if rank == 0:
        print(path)
    if device.type == "cpu" and args.workers > 0:  # leave the DataLoader workers their cores
        torch.set_num_threads(threads_beside_workers(args.workers, world))
    try:
        inputs = list_inputs(args.data)
        model, names, size, priors = load(args, device, amp)
        packing = prepack_for_inference(model, device, amp, args.batch_size, size, args.prepack == "auto")
        if rank == 0:
            print(packing)
        summary = predict_to_csv(model, inputs, args.out, names, size, top_k=args.top_k, batch_size=args.batch_size,
                                 workers=args.workers, device=device, amp=amp, prior=args.prior_correction,
                                 train_priors=priors)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        fail(str(e))
    if rank == 0:
        print(f"wrote {args.out}: {summary['images']:,} images ({summary['skipped_done']:,} already there)")
        if summary["prior_correction"]:
            pri = ", ".join(f"{k} {v:.3f}" for k, v in summary["prior_correction"]["priors"].items())
            print(f"estimated test priors (EM): {pri}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
