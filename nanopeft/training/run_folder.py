"""The run folder train.py writes and eval.py reads: everything a run leaves behind, and reading it back
(the files; the run's life that writes them is nanopeft/training/run.py, resume.pt is resume.py).

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

Written by rank 0 only. Every file is replaced atomically (checkpoint_format.atomic_write: temporary +
fsync + rename), so a crash never leaves half a file where a good one was; metrics.jsonl, appended line
by line, is cut back on --resume to its length at the resume point (resume.pt records it), so a torn or
replayed line never survives. A folder that is not empty is never trained into, except by --resume or --overwrite (which trains
into a hidden sibling and swaps it in at the first resume point: a run that fails to start leaves the old one
whole). One train.py at a time per folder: an flock on the hidden sibling `.NAME.lock`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.nn as nn
from tqdm import tqdm

from ..files.checkpoint_format import atomic_write
from ..config import ADAPTER_METHODS, PROBE_METHODS, SCRATCH_METHODS, TrainConfig


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


def check_new_run_folder(out: Path, overwrite: bool = False) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if not overwrite and out.exists() and any(out.iterdir()):
        raise RunError(f"run folder {out} already exists and is not empty: pass --resume {out} to continue it, "
                       f"--overwrite to replace it, or choose another --out")


# ------------------------------------------------------------------------------------------ one writer
_held: dict[str, int] = {}  # lock file -> its open descriptor, while this process holds it


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def lock_run_folder(out: Path) -> None:
    """Hold an exclusive flock on `.NAME.lock` beside the run folder until unlock_run_folders() or the
    process ends (the kernel drops it even on SIGKILL, so a stale file never blocks). A second train.py on
    the same --out gets a RunError before it reads or writes anything. The file records the holder's pid."""
    import fcntl

    path = lock_path(out)
    if str(path) in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"--out {out}: another train.py (pid {pid}) is using this run folder "
                           f"(it holds {path}); wait for it to end or choose another --out") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # the file we locked is still the one under that name (a releaser may have unlinked it)
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[str(path)] = fd


def unlock_run_folders() -> None:
    """Release every lock this process holds (the file is removed first, then unlocked)."""
    for path, fd in list(_held.items()):
        Path(path).unlink(missing_ok=True)
        os.close(fd)
        del _held[path]


def clean_stale_files(out: Path) -> None:
    """Remove what a killed run left: atomic_write's temporaries (`.NAME.tmp-PID`) inside the folder and
    its adapter/, and a hidden `.NAME.new` sibling of an --overwrite that never reached its first
    resume point. Called with the folder's lock held, so no live writer owns them."""
    for folder in (out, out / "adapter"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
    staging = staging_path(out)
    if staging.is_dir() and not out.exists() and (staging / "resume.pt").is_file():
        os.replace(staging, out)  # killed between swap_in's two renames: finish the swap
    shutil.rmtree(staging, ignore_errors=True)


def staging_path(out: Path) -> Path:
    """Where --overwrite trains until its first resume point: a hidden sibling of the run folder."""
    return out.parent / f".{out.name}.new"


def swap_in(staging: Path, out: Path) -> None:
    """--overwrite, at the new run's first resume point: the old folder goes aside, the new one takes its name,
    then the old one is deleted. Open files (train.log, metrics.jsonl) follow the rename."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


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
        # a run recorded before the feature cache existed trained its frozen backbone uncached: it resumes so
        train = {"cache_features": "no", **saved["train"]}
        return TrainConfig(**train), saved
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a train.py config.json ({e})") from None


class RunLog:
    """train.log (what the run prints) and metrics.jsonl (one JSON object a line); rank 0 only writes.
    metrics_bytes: metrics.jsonl is cut to this length first (--resume: its length at the resume point, so
    the rows written after it, maybe a torn last one, go; they are written again as the run replays)."""

    def __init__(self, out: Path, enabled: bool, metrics_bytes: int = 0):
        self.enabled = enabled
        self.log = open(out / "train.log", "a") if enabled else None
        self.metrics = open(out / "metrics.jsonl", "a") if enabled else None
        if enabled and self.metrics.tell() > metrics_bytes:
            self.metrics.truncate(metrics_bytes)

    def metrics_bytes(self) -> int:
        """metrics.jsonl's length now, every row written (recorded in each resume point)."""
        if not self.enabled:
            return 0
        self.metrics.flush()
        os.fsync(self.metrics.fileno())  # the rows a resume point counts are on disk before it is
        return self.metrics.tell()

    def say(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)
            self._write(self.log, msg + "\n")

    def record(self, **row) -> None:
        if self.enabled:
            self._write(self.metrics, json.dumps(row) + "\n")

    @staticmethod
    def _write(f, text: str) -> None:
        try:
            f.write(text)
            f.flush()
        except OSError as e:  # disk full: a RunError naming the file (train.py prints it in one line)
            raise write_failed(Path(f.name), e) from None

    def close(self) -> None:
        if self.enabled:
            self.log.close()
            self.metrics.close()


def write_failed(path: Path, e: Exception) -> RunError:
    """A write that failed (disk full, quota, file size limit, I/O error) as a one-line error naming the file."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else \
        f"the write failed ({(str(e).strip().splitlines() or [type(e).__name__])[-1][:200]})"
    return RunError(f"cannot write {path}: {reason} (disk full?); the previous resume point is kept")


# ------------------------------------------------------------------------------------------ adapter/
def save_run_weights(model: nn.Module, cfg: TrainConfig, directory: Path, class_names: list[str] | None = None,
                     scores: dict | None = None) -> None:
    """Everything trained, in one PEFT-format folder: adapters + head (DINOv3 methods), or the whole
    scratch network as extra tensors `base_model.model.<name>`, with a model card README.md (classes,
    the validation scores, how to load it). Re-saving a run's best replaces it."""
    from ..files.save import base_model_id, save_adapter

    card = adapter_card(cfg, class_names or [], scores or {})
    epoch = (scores or {}).get("epoch")
    if cfg.method in SCRATCH_METHODS:
        save_adapter(model, directory, extra_state=model.state_dict(), overwrite=True, card=card,
                     library_name="pytorch", epoch=epoch)
    else:
        save_adapter(model.backbone, directory, head=model.head, base_model_name_or_path=base_model_id(cfg.weights),
                     overwrite=True, card=card, epoch=epoch)
    if cfg.method == "full":  # backbone/: model.safetensors + config.json, a hub folder transformers and load_dinov3 read
        c = model.backbone.config
        conf = {**getattr(c, "extra", {}), **c.to_dict()}
        atomic_write(directory / "backbone" / "config.json", lambda p: p.write_text(json.dumps(conf, indent=2) + "\n"))


def peft_snippet(weights, adapter, num_classes: int, dropout: float = 0.5, pool: str = "cls") -> list[str]:
    """The lines that load a run's adapter and head with transformers + PEFT alone (README.md shows the
    same; tests/test_save.py runs it): the head module is attached as `classifier` before PEFT loads."""
    width = "2 * base.config.hidden_size" if pool == "cls+mean" else "base.config.hidden_size"
    model_type = ""
    config = Path(str(weights)) / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type", "")
        except (OSError, ValueError):
            pass
    cls, registers = {"dinov2": ("Dinov2Model", "0"), "dinov2_with_registers": (
        "Dinov2WithRegistersModel", "base.config.num_register_tokens")}.get(
        model_type, ("DINOv3ViTModel", "base.config.num_register_tokens"))  # the family of --weights
    feats = {"cls": "h[:, 0]", "mean": f"h[:, 1 + {registers}:].mean(1)",
             "cls+mean": f"torch.cat([h[:, 0], h[:, 1 + {registers}:].mean(1)], -1)"}[pool]
    return ["```python", "import torch, transformers, peft",
            f'base = transformers.{cls}.from_pretrained("{weights}")',
            f"D, C = {width}, {num_classes}                  # pooling {pool}; C classes",
            "base.classifier = torch.nn.Sequential(          # the head's layout, so PEFT loads it too",
            f"    torch.nn.Linear(D, 1024), torch.nn.ReLU(), torch.nn.Dropout({dropout:g}),",
            f"    torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Dropout({dropout / 2:g}), torch.nn.Linear(512, C))",
            f'model = peft.PeftModel.from_pretrained(base, "{adapter}").eval()',
            "h = model(pixel_values=pixel_values).last_hidden_state   # (B, 1 + registers + patches, D)",
            f"logits = model.base_model.model.classifier({feats})   # (B, C)", "```"]


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
        lines += ["The adapter and the head also load in PEFT: give the backbone a `classifier` of the head's "
                  "layout first (nanopeft/head.py), which PEFT then fills (`modules_to_save`):", "",
                  *peft_snippet(cfg.weights, run / "adapter", len(class_names), cfg.head_dropout, cfg.pool), ""]
    return "\n".join(lines)


def load_run_weights(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    """The inverse of save_run_weights, into a model built with build_classifier(adapters=False)."""
    from ..probes import PROBE_FILE, load_probe
    from ..files.save import load_adapter

    if cfg.method in SCRATCH_METHODS:
        model.load_state_dict(load_adapter(model, directory), strict=True)
    elif cfg.method in PROBE_METHODS:  # RUN/probe.safetensors, beside adapter/
        model.head = load_probe(Path(directory).parent / PROBE_FILE, cfg).to(next(model.backbone.parameters()).device)
    else:
        load_adapter(model.backbone, directory, trainable=False, head=model.head)


# ------------------------------------------------------------------------------------------ summary.json
def write_summary(out: Path, summary: dict) -> str:
    """summary.json, and the same as an aligned text table (returned, for the log)."""
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    width = max(len(k) for k in summary)

    def row(k, v):
        return (f"{k:<{width}}  {v:,.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:,}" if isinstance(v, int)
                else f"{k:<{width}}  {v}")

    return "\n".join(["", "summary", "-" * 40] + [row(k, v) for k, v in summary.items()])
