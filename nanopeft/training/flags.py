"""train.py's command line, resolved into one TrainConfig, and what --dry-run / --list-presets print.

    defaults (the paper's recipe) < --preset < the recorded run (--config or --resume) < flags given now
    --demo: its small settings for every flag not given

A flag value that cannot be used raises ValueError naming the flag; train.py's error boundary prints it as
one line (nanopeft/cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..config import (ADAPTER_METHODS, DINO_METHODS, FROZEN_METHODS, PAPER_RUNS, TrainConfig, add_config_args,
                      config_from_args, joined_negative_values)
from ..device import choose_precision, resolve_device
from .build import build_classifier, memory_estimate, plan_checkpointing
from .counts import count_params
from .resume import read_resume
from .run_folder import read_run_config


def split_train_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """`script.py ARGS -- TRAIN_FLAGS` (scripts/paper_table.py, scripts/data_efficiency.py): the script's
    own arguments, and the flags after `--` that go to every train.py run it starts."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_config_args(parser)
    groups["model"].add_argument("--list-presets", action="store_true", help="the paper's 11 runs with their counts")
    run = groups["run folder"]
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (only once the "
                     "new run has written its first resume point: a run that fails to start leaves the old one)")
    run.add_argument("--resume", metavar="RUN", help="continue the run in this folder where it stopped (its last "
                     "resume point; runtime flags such as --workers may be given again); a finished run: nothing to do")
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
    cfg = config_from_args(args).resolved()
    if args.list_presets:
        return cfg  # the listing needs nothing more
    if args.resume and args.config:
        raise ValueError("--resume continues a run with its own config.json: drop --config")
    if args.resume:
        if args.overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces one: pass only one of them")
        cfg = resumed_config(args)
    elif args.config:
        cfg = recorded_config(args)
    if args.demo:
        cfg = demo_config(args, cfg)
    return cfg.resolved()


# Flags --resume accepts with a new value: where and how fast the run computes, and when it ends. Any other
# flag would silently make the resumed run a different one than the resume point's (say a new --lr).
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


def completed(cfg: TrainConfig) -> str | None:
    """--resume on a finished run: the line saying so (train.py prints it and exits 0, touching nothing, so
    scripts may resume in a loop). Finished means the loop would end at once: every epoch done, or
    early-stopped (raise --epochs or --patience to train further)."""
    ck = read_resume(Path(cfg.out))
    s = ck["state"] if ck else None
    if s and s["finished"] and (s["epoch"] >= cfg.epochs or s["bad_epochs"] >= cfg.patience):
        return (f"--resume {cfg.out}: the run is complete ({s['epoch']} epochs, {s['step']} steps, best val accuracy "
                f"{s['best_val']:.4f} at epoch {s['best_epoch']}); nothing to do")
    return None


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
    from .demo import DEMO_NOTICE, prepare_demo

    paths = prepare_demo()
    multi = cfg.task == "multilabel"  # the same images, labelled with their shape and colour
    args.demo_test = str(paths["multilabel_test" if multi else "test"])
    print(DEMO_NOTICE)
    demo = dict(weights=str(paths["weights"]), data=str(paths["multilabel_data" if multi else "data"]), image_size=64, epochs=3,
                batch_size=8, grad_accum=1, lr=1e-3, workers=2, rank=8, alpha=16.0)
    explicit = {k for k in vars(args) if getattr(args, k) is not None}
    return dataclasses.replace(cfg, **{k: v for k, v in demo.items() if k not in explicit})


# ------------------------------------------------------------------------------- --dry-run, --list-presets
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
              "(nanopeft/training/features.py); the model below is of a training step through it, an upper bound here")
    if cfg.method in DINO_METHODS:
        print_memory_model(model, cfg)


GPU_16GB, CUDA_CONTEXT_GB = 16.0, 0.5  # the paper's GPU class; a CUDA context is outside torch's allocator


def print_memory_model(model, cfg: TrainConfig) -> None:
    """--dry-run: nanopeft/training/memory.py's model of one step, on this machine as the run would train, and
    on one CUDA GPU (bf16 unless --precision says otherwise) with the 16 GB verdict."""
    device = resolve_device(cfg.device)
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
