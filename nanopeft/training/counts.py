"""What a run trains: parameters by part, as the paper's table counts them (`train.py --dry-run`,
`--list-presets`). Works on a model built on the meta device, so a 7B is counted without its weights.
Its memory is nanopeft/training/memory.py's model (the one memory model: --dry-run and --grad-checkpointing auto).
"""

from __future__ import annotations

import torch.nn as nn

from ..nf4_linear import NF4Linear


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
