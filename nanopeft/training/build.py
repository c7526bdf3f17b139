"""Build the classifier a run describes: the frozen backbone, its adapters and the head (or a baseline).

    TrainConfig ─► backbone: load_dinov3(weights, quantize="nf4")  (or on meta for --dry-run)
                   └─► add_adapters(method, rank, alpha, dropout, targets)   (lora | dora; frozen: none)
                ─► head: make_head(D, C)  ─►  Classifier(backbone, head, pool)
               or ─► build_scratch("resnet18" | "vit-small", C)          (the paper's baselines)

train.py builds it with fresh adapters; eval.py rebuilds it without them (adapters=False) and loads
the run folder's `adapter/` (run.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..files.checkpoint import guess_preset
from ..config import ROPE_FROM_CONFIG, SCRATCH_METHODS, TUNED_METHODS, TrainConfig, ViTConfig, resolve_config
from ..head import Classifier, make_head
from ..backbones.dinov2 import DINOv2Config, DINOv2ViT, resolve_dinov2_config
from ..backbones.dinov3 import DINOv3ViT
from ..files.backbone import backbone_family
from ..probes import LinearProbe


def dinov2_config(weights: str) -> DINOv2Config:
    """A DINOv2's architecture without its weights: its config.json, or the preset it names."""
    cfg_file = Path(weights) / "config.json"
    if cfg_file.is_file():
        return resolve_dinov2_config(json.loads(cfg_file.read_text()))
    return resolve_dinov2_config(str(weights))


def backbone_config(weights: str) -> ViTConfig:
    """The architecture without the weights: config.json if the folder has one, else the preset its
    name says (default: the paper's 7B). A copy: the model's RoPE switch writes to its config."""
    cfg_file = Path(weights) / "config.json"
    if cfg_file.is_file():
        return ViTConfig.from_dict(json.loads(cfg_file.read_text()))
    return resolve_config(guess_preset(Path(weights).name) or "vit7b16")


def build_backbone(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None, meta: bool = False):
    """The frozen backbone of a resolved config (DINOv3 or DINOv2, as --weights says): NF4 or full precision;
    DINOv3's RoPE augmentation set."""
    from ..files.backbone import load_backbone

    dinov2 = backbone_family(cfg.weights) == "dinov2"
    if meta:
        with torch.device("meta"):
            backbone = DINOv2ViT(dinov2_config(cfg.weights)) if dinov2 else DINOv3ViT(backbone_config(cfg.weights))
    else:
        quantize = "nf4" if cfg.quant == "nf4" else None
        backbone = load_backbone(cfg.weights, quantize=quantize, dtype=dtype, device=device)
    if dinov2:  # learned position embeddings: no RoPE to augment
        backbone.requires_grad_(False)
        backbone.gradient_checkpointing = cfg.grad_checkpointing != "none"
        return backbone
    c = backbone.config

    def rope(value, own):  # --rope-* "config": the backbone config.json's own value (the hub's rescale: 2.0)
        return own if value == ROPE_FROM_CONFIG else value

    backbone.set_rope_augmentation(shift=rope(cfg.rope_shift, c.pos_embed_shift),
                                   jitter=rope(cfg.rope_jitter, c.pos_embed_jitter),
                                   rescale=rope(cfg.rope_rescale, c.pos_embed_rescale))
    backbone.requires_grad_(False)  # the base is frozen: only adapters and the head train
    backbone.gradient_checkpointing = cfg.grad_checkpointing != "none"  # auto: plan_checkpointing decides
    return backbone


def build_classifier(cfg: TrainConfig, num_classes: int, device: torch.device,
                     dtype: torch.dtype | None = None, meta: bool = False, adapters: bool = True) -> nn.Module:
    """The model a run trains. `dtype` is the backbone's weight / NF4 compute dtype (None: the file's).
    adapters=False leaves them out (eval.py loads them from the run folder instead). `cfg` may be
    unresolved (read straight from a config.json): it is resolved here."""
    from ..backbones.baselines import build_scratch

    cfg = cfg.resolved()
    if cfg.method in SCRATCH_METHODS:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = build_scratch(cfg.method, num_classes, dropout=cfg.head_dropout, image_size=cfg.image_size)
        return model if meta else model.to(device)
    backbone = build_backbone(cfg, device, dtype, meta=meta)
    if cfg.method in TUNED_METHODS and adapters:
        from ..methods.inject import add_adapters

        add_adapters(backbone, method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                     targets=cfg.targets, use_rslora=cfg.use_rslora, dora_dropout=cfg.dora_dropout,
                     dropout_sampler=cfg.dropout_sampler, prompts=cfg.prompts, adapter_scale=cfg.adapter_scale)
    with torch.device("meta") if meta else contextlib.nullcontext():
        if cfg.method == "linear-probe":  # fitted on cached features (probes.py); this is its shape
            head = LinearProbe(backbone.feature_dim(cfg.pool), num_classes)
        elif cfg.method == "knn":         # no parameters: the training features vote (probes.py)
            head = nn.Identity()
        else:
            head = make_head(backbone.feature_dim(cfg.pool), num_classes, dropout=cfg.head_dropout)
    model = Classifier(backbone, head, pool=cfg.pool)
    return model if meta else model.to(device)


def memory_estimate(model: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
                    checkpointed_blocks: int | None = None):
    """nanopeft/training/memory.py's model of one training step of `model` as `cfg` runs it (meta is fine)."""
    from .memory import estimate_training_memory

    L = model.backbone.config.num_hidden_layers
    k = {"all": L, "none": 0}.get(cfg.grad_checkpointing, L) if checkpointed_blocks is None else checkpointed_blocks
    return estimate_training_memory(model, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    compute_dtype=dtype or torch.float32, quantized=cfg.quant == "nf4",
                                    checkpointed_blocks=k, device=device.type)


def plan_checkpointing(model: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
                       budget_gb: float | None = None) -> str:
    """Set which blocks of the backbone recompute in backward, from --grad-checkpointing all | none | auto,
    and return the log line saying what was chosen and why. auto: the fewest blocks whose step fits the
    budget by nanopeft/training/memory.py (--memory-budget, else device.memory_budget_gb: the free memory), since
    each recomputed block costs a third of its matmuls again. `budget_gb` overrides both (tests)."""
    from ..device import memory_budget_gb
    from .memory import fewest_checkpointed_blocks

    bb = getattr(model, "backbone", None)
    if not isinstance(bb, DINOv3ViT):
        return f"gradient checkpointing: not used by {cfg.method}"
    L = bb.config.num_hidden_layers
    if cfg.grad_checkpointing != "auto":
        k = L if cfg.grad_checkpointing == "all" else 0
        why = f"--grad-checkpointing {cfg.grad_checkpointing}"
    else:
        budget, source = (budget_gb, "given") if budget_gb is not None else \
            (cfg.memory_budget, "--memory-budget") if cfg.memory_budget > 0 else memory_budget_gb(device)
        found = fewest_checkpointed_blocks(model, budget, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                           compute_dtype=dtype or torch.float32, quantized=cfg.quant == "nf4",
                                           device=device.type)
        k = L if found is None else found
        why = (f"auto: the fewest that fit {budget:.1f} GB ({source})" if found is not None else
               f"auto: even all {L} do not fit {budget:.1f} GB ({source}); expect out-of-memory")
    bb.gradient_checkpointing = k
    est = memory_estimate(model, cfg, device, dtype, checkpointed_blocks=k)
    return f"gradient checkpointing: {k} of {L} blocks ({why})\nmemory model of one step: {est.summary()}"
