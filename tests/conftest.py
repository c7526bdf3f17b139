"""Shared fixtures: tiny DINOv3 checkpoints written by transformers itself (nothing comes from a hub)."""

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_hf_model(gated: bool = True, registers: int = 4, seed: int = 0, **overrides):
    """A random tiny transformers DINOv3ViTModel with every tensor non-trivial (dinov3.md §6).

    gated=True has the 7B's structure (SwiGLU, no q/k/v bias); gated=False the S/B/L one (GELU MLP,
    q and v biases). in_features are multiples of 64, so bitsandbytes' CPU kernels are valid oracles.
    """
    transformers = pytest.importorskip("transformers")
    kw = dict(patch_size=16, image_size=64, num_channels=3, hidden_size=64, num_attention_heads=4,
              intermediate_size=128, num_hidden_layers=2, num_register_tokens=registers,
              layerscale_value=1e-5, layer_norm_eps=1e-5, rope_theta=100.0)
    if gated:
        kw.update(use_gated_mlp=True, hidden_act="silu", query_bias=False, key_bias=False,
                  value_bias=False, proj_bias=True, mlp_bias=True)
    else:
        kw.update(use_gated_mlp=False, hidden_act="gelu", query_bias=True, value_bias=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**kw)).eval()
    with torch.no_grad():  # LayerScale 1e-5 and zero biases would hide bugs
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "lambda1" in name else 0.05)
            if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.add_(1.0)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: tiny_ckpt(gated=True, sharded=False, dtype=torch.float32, registers=4) -> (dir, hf_model)."""
    cache = {}

    def build(gated=True, sharded=False, dtype=torch.float32, registers=4):
        key = (gated, sharded, dtype, registers)
        if key not in cache:
            model = make_hf_model(gated=gated, registers=registers)
            out = tmp_path_factory.mktemp(f"tiny-{'swiglu' if gated else 'gelu'}-{registers}r")
            kw = {"max_shard_size": "40KB"} if sharded else {}
            model.to(dtype).save_pretrained(out, **kw)
            cache[key] = (out, model)
        return cache[key]

    return build


# ---- deploy helpers
TINY_TRAIN = ["--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--lr", "1e-3",
              "--rank", "4", "--epochs", "1", "--patience", "5"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_ckpt):
    """Factory: tiny_run(method="lora") -> a run folder train.py wrote on a generated 3-class folder (one
    epoch, 32 px, the tiny SwiGLU checkpoint), shared by the eval / predict / export tests."""
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("deploy")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train
    from nanopeft.data import make_demo_dataset

    data = make_demo_dataset(root / "train", num_classes=3, per_class=8, size=(40, 32), seed=0)
    cache = {}

    def build(method="lora"):
        if method not in cache:
            extra = ["--targets", "all-linear"] if method in ("lora", "dora") else []
            train.main(["--out", str(root / method), "--method", method, "--weights", str(tiny_ckpt()[0]),
                        "--data", str(data), *TINY_TRAIN, *extra])
            cache[method] = root / method
        return cache[method]

    return build
