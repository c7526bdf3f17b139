"""Export a trained run as a self-contained model folder (see nanopeft/inference/export.py for the format).

    python export.py --run runs/qlora-all-linear-r64-... --out exports/cows
    python export.py --run RUN --out DIR --dtype bfloat16              # half the size, same predictions nearly
    python export.py --run RUN --out DIR --quantize nf4                # 4-bit, as transformers + bitsandbytes store it

Load it back with `nanopeft.load_classifier(DIR)`, `predict.py --model DIR`, or (DINOv3 runs)
`transformers.DINOv3ViTModel.from_pretrained(DIR)` for the backbone. An existing non-empty DIR is
refused unless --overwrite; the folder appears complete or not at all.
"""

from __future__ import annotations

import argparse

from nanopeft.cli import error_boundary
from nanopeft.inference.export import EXPORT_DTYPES, export_run


@error_boundary
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by train.py")
    p.add_argument("--out", required=True, help="export folder to create")
    p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES, help="backbone weights (head stays fp32)")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="re-quantize the merged weights")
    p.add_argument("--weights", help="the run's backbone path, if not where the run recorded it")
    p.add_argument("--calibration", default="none", choices=["none", "ts", "bcts", "vs", "auto"],
                   help="fit a calibration on the run's validation logits and fold it into the head (the export "
                        "then predicts calibrated posteriors; config.json records it)")
    p.add_argument("--wise", type=float, default=1.0, metavar="A",
                   help="WiSE-FT: export (1-A)·pretrained + A·fine-tuned backbone (1: as trained; config.json records it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = p.parse_args(argv)
    out = export_run(args.run, args.out, dtype=args.dtype, quantize=args.quantize, overwrite=args.overwrite,
                     weights=args.weights, calibration=args.calibration, wise=args.wise)
    print(f"wrote {out}/ (config.json, model.safetensors, head.safetensors, README.md)")
    return out


if __name__ == "__main__":
    main()
