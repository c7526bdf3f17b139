"""resume.pt: where the training loop is, and everything --resume needs to continue bit for bit.

The file holds only tensors, numbers, strings and containers of them (read back with weights_only=True, so a
crafted file cannot run code); its "state" entry is LoopState as a dict, the format every run so far wrote.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..files.checkpoint_format import atomic_write
from ..head import file_key
from .run_folder import RunError, write_failed


@dataclass
class LoopState:
    """The training loop's position and early-stopping record."""
    step: int = 0                   # optimizer steps taken
    epoch: int = 0                  # epochs finished
    batches_done: int = 0           # micro-batches of the current epoch already trained
    best_val: float = -1.0          # the kept epoch's validation accuracy (summary.json's best_val_accuracy)
    best_epoch: int = -1
    best_score: float | None = None  # the best value of --select-metric
    bad_epochs: int = 0             # epochs since the last improvement (early stopping)
    finished: bool = False
    metrics_bytes: int = 0          # metrics.jsonl's length at the resume point (cut back to it on --resume)
    skipped_steps: int = 0          # fp16 steps GradScaler skipped


def save_resume(out: Path, model: nn.Module, optimizer, scaler, state: LoopState) -> None:
    """Everything --resume needs to continue bit for bit: the trainable tensors (the frozen base is
    rebuilt from the weights), optimizer and GradScaler state, loop state, CPU and CUDA RNG. Only
    tensors, numbers, strings and containers of them, so it reads back with weights_only=True."""
    obj = {"trainable": {file_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad},
           "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": dataclasses.asdict(state),
           "rng": torch.get_rng_state(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    try:
        atomic_write(out / "resume.pt", lambda p: torch.save(obj, p))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise write_failed(out / "resume.pt", e) from None


def read_resume(out: Path) -> dict | None:
    """resume.pt as a dict (None if there is none yet), read with weights_only=True: a pickle that would
    build any object but tensors and plain containers is refused, never run (a run folder may be shared).
    Memory-mapped, so reading only the loop state of a 7B run's file is cheap."""
    path = out / "resume.pt"
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (refused globals), a torn zip, a foreign file ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "GLOBAL" in line), lines[0])  # torch's reason, in one line
        raise RunError(f"{path}: not a resume state train.py can read safely, refused ({why[:300]})") from None
    if not isinstance(ck, dict) or not {"trainable", "optimizer", "scaler", "state", "rng"} <= set(ck):
        raise RunError(f"{path}: not a train.py resume state (keys {sorted(ck) if isinstance(ck, dict) else type(ck)})")
    return ck


def load_resume(out: Path, model: nn.Module, optimizer, scaler, state: LoopState) -> bool:
    """Load resume.pt into the freshly built model, optimizer and scaler, and `state` (in place).
    False when the run has no resume point yet: it then starts from the beginning (the same seed gives
    the same run)."""
    ck = read_resume(out)
    if ck is None:
        return False
    want = {file_key(n) for n, p in model.named_parameters() if p.requires_grad}
    if set(ck["trainable"]) != want:  # load_state_dict(strict=False) below would skip them silently
        odd = sorted(set(ck["trainable"]) ^ want)
        raise RunError(f"{out / 'resume.pt'} does not fit this model: {len(odd)} trainable tensor(s) differ, "
                       f"e.g. {odd[0]!r}")
    try:
        model.load_state_dict(ck["trainable"], strict=False)
        optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(f"{out / 'resume.pt'} does not fit this model ({str(e).splitlines()[0][:200]})") from None
    scaler.load_state_dict(ck["scaler"])
    known = {f.name for f in dataclasses.fields(LoopState)}  # an older file may lack a newer field
    vars(state).update({k: v for k, v in ck["state"].items() if k in known}, finished=False)
    torch.set_rng_state(ck["rng"])
    if torch.cuda.is_available() and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    return True
