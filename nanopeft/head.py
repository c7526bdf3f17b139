"""The classification head of the paper, and the backbone + head module that is trained.

    pixels ─► backbone.features(x, pool) ─► (B, D) ─► .float() ─► head ─► (B, C) logits
                (DINOv3ViT, frozen NF4 + adapters)               (fp32, trained)

    head = Linear(D, 1024) ─ ReLU ─ Dropout(p) ─ Linear(1024, 512) ─ ReLU ─ Dropout(p/2) ─ Linear(512, C)

The layout, init and the second dropout being half the first are the seed notebooks' (docs/RECIPE.md
("The recipe"));
with D = 4096, C = 9 it has 4,195,328 + 524,800 + 4,617 = 4,724,745 parameters: the "4.7M head".
The Sequential indices (0, 3, 6 hold the Linears) equal the notebooks' `best_classifier.pth` keys,
so their head loads with a plain `load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import POOLS
from .device import autocast

# The head's state-dict prefix in every file a run writes: `classifier.*` in resume.pt and
# `base_model.model.classifier.*` in adapter_model.safetensors (PEFT's modules_to_save naming). The
# attribute is `.head`; these hooks keep the keys, so old files load and new files equal old ones.
HEAD_KEY = "classifier"


def _head_keys_to_files(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "head.")]:    # head keys come last: order kept
        state_dict[prefix + HEAD_KEY + k[len(prefix) + len("head"):]] = state_dict.pop(k)


def _head_keys_from_files(module, state_dict, prefix, *args) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + HEAD_KEY + ".")]:
        state_dict[prefix + "head" + k[len(prefix) + len(HEAD_KEY):]] = state_dict.pop(k)


def file_key(name: str) -> str:
    """A name from `named_parameters()` of a Classifier -> its key in saved files (`head.0.weight` ->
    `classifier.0.weight`); other names are unchanged."""
    return HEAD_KEY + name[len("head"):] if name.startswith("head.") else name


def keep_head_file_keys(model: nn.Module) -> None:
    """Make `model.head.*` save and load as `classifier.*` (state_dict, load_state_dict)."""
    model.register_state_dict_post_hook(_head_keys_to_files)
    model.register_load_state_dict_pre_hook(_head_keys_from_files)


def make_head(in_dim: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """The paper's 3-layer MLP head, fp32, kaiming-normal(fan_out, relu) weights and zero biases.

    `dropout` is the first rate; the second is always half of it (notebook: 0.5 then 0.25; the class
    default there was 0.3 but training passed 0.5).
    """
    if num_classes < 1:
        raise ValueError(f"head.py: num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"head.py: dropout must be in [0, 1), got {dropout}")
    head = nn.Sequential(
        nn.Linear(in_dim, 1024),            # (B, D) -> (B, 1024)
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(1024, 512),               # (B, 1024) -> (B, 512)
        nn.ReLU(),
        nn.Dropout(dropout / 2),
        nn.Linear(512, num_classes),        # (B, 512) -> (B, C)
    )
    for m in head:
        if isinstance(m, nn.Linear):
            # He init with fan_out (the notebooks' choice; fan_in would be the textbook one). The
            # std is sqrt(2 / out_features), so the 9-way output layer starts with large logits
            # (std ~0.47 per weight): label smoothing 0.1 keeps the first steps tame.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return head.float()


class Classifier(nn.Module):
    """`backbone` (anything with `features(pixel_values, pool) -> (B, D)`) followed by `head`.

    Adapters are saved from `backbone.*`; the head's keys stay `classifier.*` in every file (HEAD_KEY).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pool: str = "cls"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"head.py: pool must be one of {POOLS}, got {pool!r}")
        self.backbone = backbone
        self.head = head
        self.pool = pool
        self.autocast_dtype = None  # load_classifier sets the inference precision here (None: the caller's)
        keep_head_file_keys(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with autocast(pixel_values.device, self.autocast_dtype):   # a no-op unless set (load_classifier)
            feats = self.backbone.features(pixel_values, self.pool)   # (B, D) or (B, 2D), compute dtype
            # The head's weights are fp32 (docs/RECIPE.md ("The recipe")); cast the feature up to match them.
            # Under autocast its matmuls still run in the autocast dtype, as they did in the notebooks
            # (pooler_output.float()).
            return self.head(feats.float())                           # (B, C)
