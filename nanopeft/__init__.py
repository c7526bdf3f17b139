"""nanopeft: QLoRA and DoRA fine-tuning of DINOv3 ViTs in plain PyTorch."""

from .config import PRESETS, ViTConfig
from .model import DINOv3ViT
from .checkpoint import load_dinov3

__version__ = "0.1.0"
