"""What train.py and eval.py share: device and precision, and building the classifier a run describes.

    TrainConfig ─► backbone: load_dinov3(weights, quantize="nf4")  (or on meta for --dry-run)
                   └─► add_adapters(method, rank, alpha, dropout, targets)   (lora | dora; frozen: none)
                ─► head: make_head(D, C)  ─►  Classifier(backbone, head, pool)
               or ─► build_scratch("resnet18" | "vit-small", C)          (the paper's baselines)

A run folder's `adapter/` holds everything trained, in PEFT's file format (save.py); eval.py rebuilds
the same classifier from the run's `config.json` and loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import guess_preset
from .config import TrainConfig, ViTConfig, resolve_config
from .head import Classifier, make_head
from .model import DINOv3ViT

DINO_METHODS = ("lora", "dora", "frozen")
SCRATCH_METHODS = ("resnet18", "vit-small")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def threads_beside_workers(workers: int, processes: int = 1) -> int:
    """torch threads for one of `processes` processes on this CPU, leaving its DataLoader workers their
    cores: OpenMP threads that share a core with a busy worker spin-wait, and small matmuls then run
    10-30x slower than on one uncontended thread."""
    cores = os.cpu_count() or 1
    return max(1, cores // processes - min(workers, cores))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The one precision knob (nanoGPT style): None means plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16  # V100-class GPUs: fp16 + GradScaler, as the paper trained


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def backbone_config(weights: str) -> ViTConfig:
    """The architecture without the weights: config.json if the folder has one, else the preset its
    name says (default: the paper's 7B). A copy: the model's RoPE switch writes to its config."""
    cfg_file = Path(weights) / "config.json"
    if cfg_file.is_file():
        return ViTConfig.from_dict(json.loads(cfg_file.read_text()))
    return resolve_config(guess_preset(Path(weights).name) or "vit7b16")


def _rope_value(text: str, from_config):
    if text == "config":
        return from_config
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--rope-* takes 'config', 'none' or a number, got {text!r}") from None


def build_backbone(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None, meta: bool = False):
    from .load import load_dinov3

    if meta:
        with torch.device("meta"):
            backbone = DINOv3ViT(backbone_config(cfg.weights))
    else:
        quantize = "nf4" if cfg.quant == "nf4" else None
        backbone = load_dinov3(cfg.weights, quantize=quantize, dtype=dtype, device=device)
    c = backbone.config
    backbone.set_rope_augmentation(shift=_rope_value(cfg.rope_shift, c.pos_embed_shift),
                                   jitter=_rope_value(cfg.rope_jitter, c.pos_embed_jitter),
                                   rescale=_rope_value(cfg.rope_rescale, c.pos_embed_rescale))
    backbone.requires_grad_(False)  # the base is frozen: only adapters and the head train
    backbone.gradient_checkpointing = cfg.grad_checkpointing
    return backbone


def build_classifier(cfg: TrainConfig, num_classes: int, device: torch.device,
                     dtype: torch.dtype | None = None, meta: bool = False, adapters: bool = True) -> nn.Module:
    """The model a run trains. `dtype` is the backbone's weight / NF4 compute dtype (None: the file's).
    adapters=False leaves them out (eval.py loads them from the run folder instead)."""
    from .scratch import build_scratch

    if cfg.method in SCRATCH_METHODS:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = build_scratch(cfg.method, num_classes, dropout=cfg.head_dropout, image_size=cfg.image_size)
        return model if meta else model.to(device)
    backbone = build_backbone(cfg, device, dtype, meta=meta)
    if cfg.method in ("lora", "dora") and adapters:
        from .inject import add_adapters

        add_adapters(backbone, method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                     targets=parse_targets(cfg.targets), use_rslora=cfg.use_rslora)
    with torch.device("meta") if meta else contextlib.nullcontext():
        head = make_head(backbone.feature_dim(cfg.pool), num_classes, dropout=cfg.head_dropout)
    model = Classifier(backbone, head, pool=cfg.pool)
    return model if meta else model.to(device)


def parse_targets(targets: str):
    if targets in ("q_proj", "all-linear"):
        return targets
    return [t.strip() for t in targets.split(",") if t.strip()]


def count_params(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by part (adapters, head) and the total, as the paper's table counts them.
    NF4 weights are counted as the number of weights they encode, not as packed bytes."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = sum(v for n, v in trainable.items() if n.startswith("classifier."))
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # NF4Linear stores its weight as buffers: count what they encode
        if type(m).__name__ == "NF4Linear":
            total += m.in_features * m.out_features
    return {"adapter": sum(trainable.values()) - head, "head": head, "trainable": sum(trainable.values()),
            "total": total}


def save_run_weights(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    """Everything trained, in one PEFT-format folder: adapters + head (DINOv3 methods), or the whole
    scratch network as extra tensors `base_model.model.<name>`. Re-saving a run's best replaces it."""
    from .save import save_adapter

    if cfg.method in SCRATCH_METHODS:
        save_adapter(model, directory, extra_state=model.state_dict(), overwrite=True)
    else:
        save_adapter(model.backbone, directory, head=model.classifier, base_model_name_or_path=cfg.weights,
                     overwrite=True)


def load_run_weights(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    from .save import load_adapter

    if cfg.method in SCRATCH_METHODS:
        model.load_state_dict(load_adapter(model, directory), strict=True)
    else:
        load_adapter(model.backbone, directory, trainable=False, head=model.classifier)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # CPU: the process's peak resident set (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
