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


# ---- reliability helpers
# The fault table (docs/RELIABILITY.md) is data: tests/reliability_cases.json, one row per fault or bad
# input with the outcome promised. A test that takes the argument `reliability_case` runs once per row whose
# "test" names it ("test_file.py::test_name") and asserts that row's outcome; tests/test_reliability.py
# renders the rows to docs/RELIABILITY.md and checks that every row has such a test.
import json  # noqa: E402
from pathlib import Path  # noqa: E402

RELIABILITY_CASES = Path(__file__).parent / "reliability_cases.json"


def pytest_generate_tests(metafunc):
    if "reliability_case" in metafunc.fixturenames:
        me = f"{Path(str(metafunc.definition.fspath)).name}::{metafunc.definition.originalname}"
        rows = [r for r in json.loads(RELIABILITY_CASES.read_text()) if r["test"] == me]
        metafunc.parametrize("reliability_case", rows, ids=[r["id"] for r in rows])


@pytest.fixture(scope="session")
def own_tiny_ckpt(tmp_path_factory):
    """Factory: own_tiny_ckpt(sharded=False) -> folder with config.json + model.safetensors (or three
    shards and model.safetensors.index.json) of nanopeft's own tiny DINOv3 with seeded random weights.
    Needs no transformers: for the tests of what a damaged checkpoint does."""
    from safetensors.torch import save_file

    from nanopeft.config import PRESETS
    from nanopeft.model import DINOv3ViT

    cache = {}

    def build(sharded=False):
        if sharded not in cache:
            torch.manual_seed(0)
            cfg = PRESETS["tiny"]
            sd = {k: torch.randn(v.shape) * 0.05 for k, v in DINOv3ViT(cfg).state_dict().items()}
            out = tmp_path_factory.mktemp("own-tiny-sharded" if sharded else "own-tiny")
            (out / "config.json").write_text(json.dumps(cfg.to_dict()))
            if not sharded:
                save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
            else:
                keys, weight_map = sorted(sd), {}
                for i in range(3):
                    name = f"model-{i + 1:05d}-of-00003.safetensors"
                    part = {k: sd[k] for k in keys[i::3]}
                    save_file(part, out / name, metadata={"format": "pt"})
                    weight_map |= {k: name for k in part}
                (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            cache[sharded] = out
        return cache[sharded]

    return build
