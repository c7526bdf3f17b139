"""nanopeft: QLoRA and DoRA fine-tuning of DINOv3 ViTs in plain PyTorch."""

from .config import PRESETS, ViTConfig

__version__ = "0.1.0"
