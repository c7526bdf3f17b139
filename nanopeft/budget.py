"""What a run costs before it runs: trainable parameters by part, as the paper's table counts them, and
a rough peak-memory estimate (`train.py --dry-run`, `--list-presets`). Works on a model built on the
meta device, so a 7B is counted without its weights.
"""

from __future__ import annotations

import torch.nn as nn

from .config import DINO_METHODS, TrainConfig
from .model import block_linears
from .nf4_linear import NF4Linear

GB = 1e9
NF4_BITS_PER_WEIGHT = 4.127  # 4-bit codes + double-quantized absmax (docs/NF4.md ("Double quantization"))


def count_params(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by part (adapters, head) and the total, as the paper's table counts them.
    NF4 weights are counted as the number of weights they encode, not as packed bytes."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = sum(v for n, v in trainable.items() if n.startswith("head."))
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # NF4Linear stores its weight as buffers: count what they encode
        if isinstance(m, NF4Linear):
            total += m.in_features * m.out_features
    return {"adapter": sum(trainable.values()) - head, "head": head, "trainable": sum(trainable.values()),
            "total": total}


def estimate_gpu_memory(model: nn.Module, cfg: TrainConfig, counts: dict) -> dict[str, float]:
    """A rough peak-memory estimate in GB (weights + optimizer + activations) for --dry-run."""
    frozen = counts["total"] - counts["trainable"]
    # the frozen Linears inside the blocks are what NF4 stores (not the adapters' lora_A / lora_B)
    nf4 = sum(m.in_features * m.out_features for m in block_linears(model).values() if not m.weight.requires_grad)
    base = (nf4 * NF4_BITS_PER_WEIGHT / 8 + (frozen - nf4) * 2) if cfg.quant == "nf4" and cfg.method in DINO_METHODS \
        else frozen * 2
    train = counts["trainable"] * 16  # fp32 weight + grad + two AdamW moments
    acts = 0.0
    bb = getattr(model, "backbone", None)
    if bb is not None and hasattr(bb, "config"):
        c = bb.config
        N = 1 + c.num_register_tokens + (cfg.image_size // c.patch_size) ** 2
        per_block_io = cfg.batch_size * N * c.hidden_size * 2  # bf16 residual stream
        inside = cfg.batch_size * N * (6 * c.hidden_size + 3 * c.intermediate_size) * 2
        acts = per_block_io * c.num_hidden_layers + inside if cfg.grad_checkpointing \
            else (per_block_io + inside) * c.num_hidden_layers
    return {"weights_gb": base / GB, "trainable_state_gb": train / GB, "activations_gb": acts / GB,
            "total_gb": (base + train + acts) / GB * 1.1}  # +10 %: allocator, workspaces
