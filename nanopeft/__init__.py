"""nanopeft: QLoRA and DoRA fine-tuning of DINOv3 ViTs in plain PyTorch.

    checkpoint → model → nf4 → lora/dora → inject → train → eval → predict/export

Each stage is one file: a module here, or the top-level scripts train.py and eval.py (predict and export
are both: nanopeft/inference/predict.py, nanopeft/inference/export.py and their scripts). Which file owns what and which
imports which: docs/ARCHITECTURE.md.
"""

from .config import PAPER_RUNS, PRESETS, TrainConfig, ViTConfig
from .backbones.dinov3 import DINOv3ViT
from .files.checkpoint import CheckpointError
from .files.load import load_dinov3
from .files.load_dinov2 import load_dinov2
from .files.backbone import load_backbone
from .nf4 import NF4Weight, quantize_nf4
from .nf4_linear import NF4Linear
from .methods.lora import LoRALinear
from .methods.dora import DoRALinear
from .methods.inject import add_adapters, init_dora_magnitudes, merge_adapters
from .files.save import load_adapter, save_adapter
from .head import Classifier, make_head
from .inference.export import load_classifier

__version__ = "0.1.0"
__all__ = ["PAPER_RUNS", "PRESETS", "TrainConfig", "ViTConfig", "DINOv3ViT", "CheckpointError", "load_dinov3", "load_dinov2", "load_backbone",
           "NF4Linear", "NF4Weight", "quantize_nf4", "LoRALinear", "DoRALinear", "add_adapters",
           "init_dora_magnitudes", "merge_adapters", "load_adapter", "save_adapter", "Classifier", "make_head",
           "load_classifier"]
