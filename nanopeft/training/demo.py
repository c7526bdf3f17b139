"""`train.py --demo`: the whole pipeline on CPU, with nothing downloaded.

It writes, once, into a cache folder:
  - a small DINOv3-architecture checkpoint in the hub's format (config.json + model.safetensors, the
    same keys as facebook/dinov3-*), RANDOMLY INITIALISED: it is not pretrained, so its accuracy says
    nothing about DINOv3; it only proves the pipeline runs end to end;
  - a generated 9-class image-folder data set (and a held-out test folder for eval.py), and its multi-label
    variant (`--demo --task multilabel`): CSV manifests path,labels over the same images, each labelled with
    its shape and its colour (data/folders.py multilabel_manifest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files.checkpoint_format import atomic_write
from ..config import ViTConfig
from ..backbones.dinov3 import DINOv3ViT

# the 7B's structure (SwiGLU, 4 registers, no q/k/v bias) at a size any CPU trains
DEMO_CONFIG = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                        image_size=64, dtype="float32")
DEMO_NOTICE = ("DEMO: the backbone is a small randomly initialised DINOv3-architecture model, NOT the "
               "pretrained DINOv3; the data are generated images. Accuracy here says nothing about the paper.")


def default_cache() -> Path:
    return Path(os.environ.get("NANOPEFT_CACHE", Path.home() / ".cache" / "nanopeft")) / "demo"


def write_hub_checkpoint(model: DINOv3ViT, folder: Path) -> None:
    """config.json + model.safetensors exactly as transformers' save_pretrained lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def random_dinov3(config: ViTConfig = DEMO_CONFIG, seed: int = 0) -> DINOv3ViT:
    torch.manual_seed(seed)
    model = DINOv3ViT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.fill_(0.1)  # LayerScale: let the residual branches speak (pretrained 7B values are O(0.1))
            elif "token" in name:
                p.normal_(0.0, 0.02)
    return model


def prepare_demo(cache: Path | None = None, per_class: int = 24, test_per_class: int = 12) -> dict[str, Path]:
    """Create (once) the demo checkpoint and data; returns their paths."""
    from ..data.folders import make_demo_dataset

    cache = Path(cache) if cache is not None else default_cache()
    paths = {"weights": cache / "dinov3-demo", "data": cache / "data" / "train", "test": cache / "data" / "test"}
    if not (paths["weights"] / "model.safetensors").is_file():
        write_hub_checkpoint(random_dinov3(), paths["weights"])
    if not paths["data"].is_dir():
        make_demo_dataset(paths["data"], num_classes=9, per_class=per_class, size=(80, 64), seed=0)
    if not paths["test"].is_dir():
        make_demo_dataset(paths["test"], num_classes=9, per_class=test_per_class, size=(80, 64), seed=1)
    from ..data.folders import multilabel_manifest

    for split in ("data", "test"):  # the multi-label variant: manifests over the same images
        paths[f"multilabel_{split}"] = multilabel_manifest(paths[split])
    return paths
