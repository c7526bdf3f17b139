"""Which backbone family a checkpoint holds, and loading either: `load_backbone` beside `load_dinov3` and
`load_dinov2`.

    config.json model_type "dinov3_vit"                          -> DINOv3 (nanopeft/backbones/dinov3.py)
    config.json model_type "dinov2" | "dinov2_with_registers"    -> DINOv2 (nanopeft/backbones/dinov2.py)
    a preset name (vit7b16, dinov2-base, ...)                    -> its family, built from the preset
    a Meta .pth without config.json                              -> by its file name ("dinov2" in it)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..backbones.dinov2 import PRESETS as DINOV2_PRESETS
from .checkpoint_format import CheckpointError
from .load import load_dinov3
from .load_dinov2 import load_dinov2

DINOV2_TYPES = ("dinov2", "dinov2_with_registers")


def backbone_family(path) -> str:
    """"dinov2" or "dinov3" for a checkpoint path or preset name (see the module docstring)."""
    name = str(path)
    if name in DINOV2_PRESETS:
        return "dinov2"
    p = Path(name)
    config = p / "config.json" if p.is_dir() else p.with_name("config.json")
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config}: not readable as JSON ({e})") from None
        return "dinov2" if model_type in DINOV2_TYPES else "dinov3"
    return "dinov2" if p.suffix == ".pth" and "dinov2" in p.name.lower() else "dinov3"


def load_backbone(path, *, quantize=None, dtype=None, device="cpu", progress=None):
    """load_dinov2 or load_dinov3, as the checkpoint's family says (its config.json's model_type)."""
    load = load_dinov2 if backbone_family(path) == "dinov2" else load_dinov3
    return load(path, quantize=quantize, dtype=dtype, device=device, progress=progress)
