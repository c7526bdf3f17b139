"""nanopeft/backbones/dinov3.py against transformers' DINOv3ViTModel."""

import pytest
import torch
import torch.nn as nn

from nanopeft import PRESETS, DINOv3ViT, ViTConfig
from nanopeft.backbones.dinov3 import block_linears, in_block, pooled_width


# parameter counts of every released size: transformers' DINOv3ViTModel built on meta (docs/DINOV3.md
# ("Released sizes"))
RELEASED = {"vits16": 21_596_544, "vits16plus": 28_692_864, "vitb16": 85_660_416,
            "vitl16": 303_129_600, "vith16plus": 840_592_640, "vit7b16": 6_716_035_072}


def ours_from(hf_model) -> DINOv3ViT:
    model = DINOv3ViT(ViTConfig.from_dict(hf_model.config.to_dict())).eval()
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    model.load_state_dict(sd, strict=True)  # names equal the hub keys: no renaming
    return model


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("registers", [4, 0, 2])
def test_forward_equals_transformers(hf_model, gated, registers):
    hf = hf_model(gated=gated, registers=registers)
    ours = ours_from(hf)
    x = torch.randn(2, 3, 64, 96)  # non-square: 4 × 6 patches
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(x)
        assert out.shape == (2, 1 + registers + 24, 64)
        assert (out - ref.last_hidden_state).abs().max() <= 1e-5
        assert (ours.features(x, "cls") - ref.pooler_output).abs().max() <= 1e-5


def test_non_multiple_of_patch_is_cropped_like_transformers(hf_model):
    hf = hf_model()
    ours = ours_from(hf)
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).last_hidden_state).abs().max() <= 1e-5


def test_pooling_variants(hf_model):
    ours = ours_from(hf_model())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens = ours(x)
        assert torch.equal(ours.features(x, "mean"), tokens[:, 5:].mean(1))  # registers excluded
        both = ours.features(x, "cls+mean")
    assert both.shape == (2, 128) and ours.feature_dim("cls+mean") == 128
    assert torch.equal(both[:, :64], tokens[:, 0])
    with pytest.raises(ValueError, match="pool"):
        ours.features(x, "max")


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_sizes_on_meta(name):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = DINOv3ViT(PRESETS[name])
        hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{
            k: v for k, v in PRESETS[name].to_dict().items() if k not in ("dtype", "architectures")}))
    assert sum(p.numel() for p in ours.parameters()) == RELEASED[name]
    ours_keys = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_keys = {k.removeprefix("model."): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours_keys == hf_keys


def test_7b_counts():
    with torch.device("meta"):
        model = DINOv3ViT(PRESETS["vit7b16"])
    assert sum(p.numel() for p in model.parameters()) == 6_716_035_072
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 280
    assert "layer.39.mlp.gate_proj" in linears and "layer.0.attention.q_proj" in linears
    assert list(block_linears(model)) == linears  # every Linear of the ViT lies inside a block


def test_in_block_is_the_one_definition_of_a_block_module():
    for name in ("layer.0.attention.q_proj", "layer.39.mlp.down_proj", "backbone.layer.3.mlp.up_proj",
                 "backbone.layer.3.attention.q_proj.base_layer"):
        assert in_block(name), name
    for name in ("layer", "layer.0", "embeddings.patch_embeddings", "norm", "head.0", "classifier.0",
                 "backbone.norm", "mylayer.0.x", "layer.x.q_proj"):
        assert not in_block(name), name
    model = nn.ModuleDict({"backbone": DINOv3ViT("tiny"), "head": nn.Linear(64, 3)})
    names = list(block_linears(model))
    assert len(names) == 14 and all(n.startswith("backbone.layer.") for n in names)


def test_pooled_width():
    model = DINOv3ViT("tiny")
    assert [model.feature_dim(p) for p in ("cls", "mean", "cls+mean")] == [64, 64, 128]
    assert pooled_width(4096, "cls+mean") == 8192
    with pytest.raises(ValueError, match="pool"):
        pooled_width(64, "max")
    assert model.layer[0].attention.q_proj.bias is None and model.layer[0].attention.o_proj.bias is not None


def test_rope_augmentation_train_only(hf_model):
    ours = ours_from(hf_model())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = ours.eval()(x)
        ours.train()
        torch.manual_seed(1)
        a = ours(x)
        torch.manual_seed(2)
        b = ours(x)
        assert not torch.allclose(a, b)  # rescale 2.0 from the hub config: random per call
        assert not torch.allclose(a, ref)
        ours.set_rope_augmentation(None, None, None)  # the explicit switch: train == eval
        assert torch.equal(ours(x), ref)
        ours.eval().set_rope_augmentation(rescale=2.0)
        assert torch.equal(ours(x), ref)  # eval mode never augments


def test_rope_augmentation_matches_transformers_rng(hf_model):
    """Same seed, same draw: our train-mode coordinates follow HF's order of random calls."""
    hf = hf_model(pos_embed_shift=0.1, pos_embed_jitter=1.2, pos_embed_rescale=2.0)
    ours = ours_from(hf)
    hf.train(), ours.train()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.manual_seed(3)
        ref = hf(pixel_values=x).last_hidden_state
        torch.manual_seed(3)
        out = ours(x)
    assert (out - ref).abs().max() <= 1e-5


def test_gradient_checkpointing_same_gradients(hf_model):
    ours = ours_from(hf_model()).train().set_rope_augmentation(None, None, None)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        ours(x).square().mean().backward()
        grads.append(ours.layer[0].attention.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(hidden_size=60, num_attention_heads=4)  # head_dim 15: RoPE needs a multiple of 4
    with pytest.raises(ValueError, match="unknown DINOv3 preset"):
        DINOv3ViT("vit-huge")
    with torch.device("meta"):
        model = DINOv3ViT("tiny")
    with pytest.raises(RuntimeError, match="meta"):
        model(torch.randn(1, 3, 32, 32))
    model = DINOv3ViT("tiny")
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="smaller than one"):
        model(torch.randn(1, 3, 8, 8))
