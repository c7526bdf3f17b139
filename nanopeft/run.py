"""The run folder train.py writes and eval.py reads: everything a run leaves behind, and reading it back.

    runs/<name>-<time>/
        config.json      the TrainConfig (command-line form), class names, parameter counts, data sizes,
                         training images per class (train_class_counts); train.py --config re-runs it
        train.log        what the run printed
        metrics.jsonl    one JSON object per optimizer step {step, epoch, loss, lr, images_per_s} and per
                         epoch {epoch, val_accuracy, val_loss, val_macro_f1, peak_memory_mb, elapsed_s, best}
        metrics.csv      one row per epoch, and curves.png: redrawn from metrics.jsonl each epoch (history.py)
        adapter/         the best epoch's (--select-metric) trained weights in PEFT's format (save.py) and
                         a model card README.md
        resume.pt        trainable tensors, optimizer, GradScaler, loop state, RNG: --resume continues here
        summary.json     best validation accuracy, steps, time, trainable parameters, peak memory

Written by rank 0 only; resume.pt and the adapter are replaced atomically, so a crash never leaves half
a file. A folder that is not empty is never trained into, except by --resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .config import ADAPTER_METHODS, SCRATCH_METHODS, TrainConfig
from .head import file_key
from .save import atomic_write


class RunError(ValueError):
    """A run folder that cannot be used as asked (the message names the folder and file)."""


def run_name(cfg: TrainConfig) -> str:
    """The preset's name, the method's, or e.g. `dora-q_proj+v_proj-r16` for an adapter method."""
    if cfg.preset:
        return cfg.preset
    if cfg.method not in ADAPTER_METHODS:
        return cfg.method
    targets = cfg.targets if isinstance(cfg.targets, str) else "+".join(cfg.targets)
    return f"{cfg.method}-{targets}-r{cfg.rank}"


def run_folder(cfg: TrainConfig) -> Path:
    """--out, or runs/<run_name>-<time>; written back into cfg.out (config.json records it)."""
    out = Path(cfg.out or f"runs/{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(out)
    return out


def check_new_run_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise RunError(f"run folder {out} already exists and is not empty: choose another --out or --resume it")


def write_run_config(out: Path, cfg: TrainConfig, *, class_names: list[str], parameters: dict,
                     world_size: int, n_train: int, n_val: int, train_class_counts: dict | None = None) -> None:
    """train_class_counts: {class: training images}, the prior predict/eval's --prior-correction reads."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"train": cfg.to_dict(), "class_names": class_names, "num_classes": len(class_names),
                       "parameters": parameters, "world_size": world_size, "n_train": n_train, "n_val": n_val,
                       **({"train_class_counts": train_class_counts} if train_class_counts else {})},
                      indent=2)
    atomic_write(out / "config.json", lambda p: p.write_text(text))


def read_run_config(run, flag: str = "--run") -> tuple[TrainConfig, dict]:
    """A run folder's config.json: (its TrainConfig, unresolved; the whole saved dict)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise RunError(f"{flag} {run}: no config.json there (is it a run folder?)")
    try:
        saved = json.loads(path.read_text())
        return TrainConfig(**saved["train"]), saved
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a train.py config.json ({e})") from None


class RunLog:
    """train.log (what the run prints) and metrics.jsonl (one JSON object a line); rank 0 only writes."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.log = open(out / "train.log", "a") if enabled else None
        self.metrics = open(out / "metrics.jsonl", "a") if enabled else None

    def say(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)
            self.log.write(msg + "\n")
            self.log.flush()

    def record(self, **row) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.enabled:
            self.log.close()
            self.metrics.close()


# ------------------------------------------------------------------------------------------ resume.pt
def new_state() -> dict:
    """The training loop's position and early-stopping record (saved in resume.pt)."""
    return dict(step=0, epoch=0, batches_done=0, best_val=-1.0, best_epoch=-1, bad_epochs=0, finished=False)


def save_resume(out: Path, model: nn.Module, optimizer, scaler, state: dict) -> None:
    """Everything --resume needs to continue bit for bit: the trainable tensors (the frozen base is
    rebuilt from the weights), optimizer and GradScaler state, loop state, CPU and CUDA RNG."""
    obj = {"trainable": {file_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad},
           "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state,
           "rng": torch.get_rng_state(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    atomic_write(out / "resume.pt", lambda p: torch.save(obj, p))


def load_resume(out: Path, model: nn.Module, optimizer, scaler, state: dict, more_epochs: bool) -> None:
    """Load resume.pt into the freshly built model, optimizer and scaler, and `state` (in place).
    A finished run continues only when the epochs were raised (more_epochs)."""
    path = out / "resume.pt"
    if not path.is_file():
        raise RunError(f"--resume {out}: no resume.pt there")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["state"]["finished"] and not more_epochs:
        raise RunError(f"--resume {out}: that run already finished (raise --epochs to train further)")
    model.load_state_dict(ck["trainable"], strict=False)
    optimizer.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    state.update(ck["state"], finished=False)
    torch.set_rng_state(ck["rng"])
    if torch.cuda.is_available() and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(ck["cuda_rng"])


# ------------------------------------------------------------------------------------------ adapter/
def save_run_weights(model: nn.Module, cfg: TrainConfig, directory: Path, class_names: list[str] | None = None,
                     scores: dict | None = None) -> None:
    """Everything trained, in one PEFT-format folder: adapters + head (DINOv3 methods), or the whole
    scratch network as extra tensors `base_model.model.<name>`, with a model card README.md (classes,
    the validation scores, how to load it). Re-saving a run's best replaces it."""
    from .save import base_model_id, save_adapter

    card = adapter_card(cfg, class_names or [], scores or {})
    if cfg.method in SCRATCH_METHODS:
        save_adapter(model, directory, extra_state=model.state_dict(), overwrite=True, card=card,
                     library_name="pytorch")
    else:
        save_adapter(model.backbone, directory, head=model.head, base_model_name_or_path=base_model_id(cfg.weights),
                     overwrite=True, card=card)


def adapter_card(cfg: TrainConfig, class_names: list[str], scores: dict) -> str:
    """The body of adapter/README.md (save.py writes the front matter)."""
    run = Path(cfg.out or ".")
    scratch = cfg.method in SCRATCH_METHODS
    what = (f"the whole {cfg.method} network trained from scratch (not a PEFT adapter: nanopeft loads it)"
            if scratch else f"{cfg.method} adapters (rank {cfg.rank}, targets {cfg.to_dict()['targets']}) and "
            f"the classification head")
    lines = [f"# {run.name or run_name(cfg)}: {len(class_names)}-class image classifier", "",
             f"Trained with nanopeft `train.py` (`--method {cfg.method}`): {what}.", ""]
    if scores:
        lines += ["## Validation (the epoch kept)", "", *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
                                                          for k, v in scores.items()], ""]
    if class_names:
        lines += ["## Classes", "", ", ".join(f"{i}: {n}" for i, n in enumerate(class_names)), ""]
    lines += ["## How to use", "", "```bash", f"python eval.py --run {run} --data TEST_DIR",
              f"python predict.py --run {run} --data IMAGES --out predictions.csv",
              f"python export.py --run {run} --out model/", "```", ""]
    if not scratch:
        lines += ["The backbone adapter also loads in PEFT (the head under `classifier.*` is ignored there):", "",
                  "```python", "import transformers, peft",
                  f'base = transformers.DINOv3ViTModel.from_pretrained("{cfg.weights}")',
                  f'model = peft.PeftModel.from_pretrained(base, "{run / "adapter"}")', "```", ""]
    return "\n".join(lines)


def load_run_weights(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    """The inverse of save_run_weights, into a model built with build_classifier(adapters=False)."""
    from .save import load_adapter

    if cfg.method in SCRATCH_METHODS:
        model.load_state_dict(load_adapter(model, directory), strict=True)
    else:
        load_adapter(model.backbone, directory, trainable=False, head=model.head)


# ------------------------------------------------------------------------------------------ summary.json
def write_summary(out: Path, summary: dict) -> str:
    """summary.json, and the same as an aligned text table (returned, for the log)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(k) for k in summary)

    def row(k, v):
        return (f"{k:<{width}}  {v:,.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:,}" if isinstance(v, int)
                else f"{k:<{width}}  {v}")

    return "\n".join(["", "summary", "-" * 40] + [row(k, v) for k, v in summary.items()])
