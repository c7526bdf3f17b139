"""nanopeft/backbones/dinov2.py and nanopeft/files/load_dinov2.py against transformers' Dinov2Model and
Dinov2WithRegistersModel (tiny random checkpoints written by save_pretrained), Meta's .pth layout,
bitsandbytes' NF4 and PEFT's LoRA / DoRA. Each test that needs transformers, PEFT or bitsandbytes skips alone."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn

from conftest import close
from nanopeft.backbones.dinov2 import PRESETS, DINOv2Config, DINOv2ViT
from nanopeft.backbones.dinov3 import block_linears
from nanopeft.files.checkpoint import CheckpointError
from nanopeft.files.load_dinov2 import load_dinov2
from nanopeft.methods.inject import adapter_layers, add_adapters
from nanopeft.nf4_linear import NF4Linear

# The tiny models: head_dim 64 as in every release (so a .pth's config reads off its shapes); widths that are
# multiples of 64 (bitsandbytes' CPU dequantize is only right for those).
# SwiGLU hidden: (int(4·192·2/3) + 7) // 8 · 8 = 512.
KINDS = {"dinov2": dict(registers=False, hidden_size=128, num_attention_heads=2),
         "dinov2-swiglu": dict(registers=False, hidden_size=192, num_attention_heads=3, use_swiglu_ffn=True),
         "registers": dict(registers=True, hidden_size=128, num_attention_heads=2),
         "registers-swiglu": dict(registers=True, hidden_size=192, num_attention_heads=3, use_swiglu_ffn=True)}
NATIVE, OTHER = (70, 70), (42, 84)  # the config's 5×5 grid; 3×6 patches (shrunk in h, grown in w)
SIZES = [NATIVE, OTHER, (84, 56)]


def make_hf(kind: str, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    kw = dict(KINDS[kind])
    registers = kw.pop("registers")
    Config, Model = ((transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel) if registers
                     else (transformers.Dinov2Config, transformers.Dinov2Model))
    torch.manual_seed(seed)  # patch 14 stated: the registers class defaults to 16
    model = Model(Config(num_hidden_layers=2, image_size=70, patch_size=14, **kw)).eval()
    with torch.no_grad():  # every tensor non-trivial: LayerScale 1 and zero biases would hide bugs
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "position_embeddings" in name else 0.5 if "lambda1" in name else 0.05)
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")):
                p.add_(1.0)
    return model


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """Factory: ckpt(kind, sharded=False) -> (folder written by save_pretrained, the transformers model)."""
    cache = {}

    def build(kind="dinov2", sharded=False):
        if (kind, sharded) not in cache:
            hf = make_hf(kind)
            out = tmp_path_factory.mktemp(f"dinov2-{kind}")
            hf.save_pretrained(out, **({"max_shard_size": "100KB"} if sharded else {}))
            cache[kind, sharded] = (out, hf)
        return cache[kind, sharded]

    return build


def pixels(size, seed=0):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    with torch.no_grad():
        return model(x) if isinstance(model, DINOv2ViT) else model(pixel_values=x).last_hidden_state


# ---------------------------------------------------------------- forward parity, position-table resizing
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forward_equals_transformers(ckpt, kind, size):
    folder, hf = ckpt(kind)
    ours = load_dinov2(folder)
    x = pixels(size)
    out, ref = outputs(ours, x), hf(pixel_values=x)
    R = 4 if "registers" in kind else 0
    assert out.shape == (2, 1 + R + (size[0] // 14) * (size[1] // 14), KINDS[kind]["hidden_size"])
    assert (out - ref.last_hidden_state).abs().max() <= 1e-5
    assert (ours.features(x, "cls") - ref.pooler_output).abs().max() <= 1e-5
    torch.testing.assert_close(ours.features(x, "mean"), out[:, 1 + R:].mean(1))  # registers left out


@pytest.mark.parametrize("kind", ["dinov2", "registers"])
def test_each_class_has_its_own_resize_rule(ckpt, kind):
    """Flip the antialias switch, or use Meta's +0.1 rule: transformers' output at the native size, not elsewhere."""
    folder, hf = ckpt(kind)
    ours = load_dinov2(folder)
    assert ours.config.interpolate_antialias == (kind == "registers")
    for change in (dict(interpolate_antialias=kind != "registers"), dict(interpolate_offset=0.1)):
        ours.config.interpolate_antialias, ours.config.interpolate_offset = (kind == "registers"), 0.0
        for k, v in change.items():
            setattr(ours.config, k, v)
        assert (outputs(ours, pixels(NATIVE)) - outputs(hf, pixels(NATIVE))).abs().max() <= 1e-5
        assert (outputs(ours, pixels(OTHER)) - outputs(hf, pixels(OTHER))).abs().max() > 1e-3


def test_meta_offset_rule_is_torch_hubs():
    """interpolate_offset=0.1 resizes as Meta's DinoVisionTransformer.interpolate_pos_encoding (hub default,
    no registers): scale_factor (h+0.1)/g on the grid, as facebookresearch/dinov2 writes it."""
    model = DINOv2ViT(DINOv2Config(hidden_size=8, num_attention_heads=1, num_hidden_layers=0, image_size=70))
    with torch.no_grad():
        model.embeddings.position_embeddings.normal_()
    model.config.interpolate_offset = 0.1
    table = model.embeddings.position_embeddings
    H, W = 126, 42  # 9 × 3 patches from a 5 × 5 grid
    grid = table[:, 1:].reshape(1, 5, 5, 8).permute(0, 3, 1, 2)
    meta = nn.functional.interpolate(grid, scale_factor=((9 + 0.1) / 5, (3 + 0.1) / 5), mode="bicubic")
    meta = torch.cat([table[:, :1], meta.permute(0, 2, 3, 1).reshape(1, 27, 8)], dim=1)
    torch.testing.assert_close(model.embeddings.position_table(H, W), meta, rtol=0, atol=1e-6)
    model.config.interpolate_offset = 0.0
    assert (model.embeddings.position_table(H, W) - meta).abs().max() > 1e-3


# ---------------------------------------------------------------- configs and released sizes
@pytest.mark.parametrize("model_type", ["dinov2", "dinov2_with_registers"])
def test_config_defaults_are_the_transformers_classes(model_type):
    """Older hub config.json files omit default values: ours must be the class's (patch 16 with registers!)."""
    transformers = pytest.importorskip("transformers")
    hf = (transformers.Dinov2Config if model_type == "dinov2" else transformers.Dinov2WithRegistersConfig)()
    ours = DINOv2Config.from_dict({"model_type": model_type})
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "hidden_act", "qkv_bias",
                 "layer_norm_eps", "layerscale_value", "image_size", "patch_size", "num_channels",
                 "use_swiglu_ffn", "drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.num_register_tokens == getattr(hf, "num_register_tokens", 0)
    assert ours.patch_size == (14 if model_type == "dinov2" else 16)
    assert DINOv2Config.from_dict(ours.to_dict()) == ours


# parameter counts of the released models (transformers' classes and Meta's builders agree)
RELEASED = {"small": 22_056_576, "base": 86_580_480, "large": 304_368_640, "giant": 1_136_480_768}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_released_sizes_on_meta(name):
    transformers = pytest.importorskip("transformers")
    cfg = PRESETS[name]
    Model = transformers.Dinov2Model if cfg.model_type == "dinov2" else transformers.Dinov2WithRegistersModel
    Config = transformers.Dinov2Config if cfg.model_type == "dinov2" else transformers.Dinov2WithRegistersConfig
    with torch.device("meta"):
        ours = DINOv2ViT(name)
        hf = Model(Config(**{k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "architectures")}))
    R = 4 if "registers" in name else 0
    assert sum(p.numel() for p in ours.parameters()) == RELEASED[name.rsplit("-", 1)[1]] + R * cfg.hidden_size
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    per_block = 7 if cfg.use_swiglu_ffn else 6
    assert len(block_linears(ours)) == per_block * cfg.num_hidden_layers == \
        sum(isinstance(m, nn.Linear) for m in ours.modules())  # every Linear lies inside a block


# ---------------------------------------------------------------- files: shards, dtype, Meta .pth, errors
def test_sharded_and_bf16(ckpt, tmp_path):
    folder, hf = ckpt("dinov2-swiglu", sharded=True)
    assert len(list(folder.glob("*.safetensors"))) > 1
    x = pixels(OTHER)
    assert (outputs(load_dinov2(folder), x) - outputs(hf, x)).abs().max() <= 1e-5
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_dinov2(tmp_path)
    assert model.layer[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert (outputs(model, x).float() - outputs(hf, x)).abs().max() < 0.1  # bf16 rounding of the weights


def test_classification_checkpoint_loads_its_backbone(ckpt, tmp_path):
    """Dinov2WithRegistersForImageClassification: keys under `dinov2_with_registers.`, a `classifier` head."""
    transformers = pytest.importorskip("transformers")
    _, hf = ckpt("registers-swiglu")
    clf = transformers.Dinov2WithRegistersForImageClassification(hf.config)
    clf.dinov2_with_registers.load_state_dict(hf.state_dict())
    clf.save_pretrained(tmp_path)
    x = pixels(OTHER)
    assert (outputs(load_dinov2(tmp_path), x) - outputs(hf, x)).abs().max() <= 1e-5


def to_meta_layout(sd: dict, layers: int) -> dict:
    """transformers' in-memory state dict -> the key layout of Meta's torch.hub .pth (fused qkv and w12)."""
    out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
           "pos_embed": sd["embeddings.position_embeddings"], "norm.weight": sd["layernorm.weight"],
           "norm.bias": sd["layernorm.bias"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"]}
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(layers):
        L, B = f"encoder.layer.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[B + f"attn.qkv.{leaf}"] = torch.cat([sd[L + f"attention.{p}_proj.{leaf}"] for p in "qkv"])
            out[B + f"attn.proj.{leaf}"] = sd[L + f"attention.o_proj.{leaf}"]
            for n in ("norm1", "norm2"):
                out[B + f"{n}.{leaf}"] = sd[L + f"{n}.{leaf}"]
            if L + "mlp.gate_proj.weight" in sd:  # SwiGLU: w12 = [gate; up]
                out[B + f"mlp.w12.{leaf}"] = torch.cat([sd[L + f"mlp.gate_proj.{leaf}"], sd[L + f"mlp.up_proj.{leaf}"]])
                out[B + f"mlp.w3.{leaf}"] = sd[L + f"mlp.down_proj.{leaf}"]
            else:
                for n in ("fc1", "fc2"):
                    out[B + f"mlp.{n}.{leaf}"] = sd[L + f"mlp.{n}.{leaf}"]
        out[B + "ls1.gamma"] = sd[L + "layer_scale1.lambda1"]
        out[B + "ls2.gamma"] = sd[L + "layer_scale2.lambda1"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_meta_pth(ckpt, tmp_path, kind):
    """A .pth in Meta's layout, with no config.json: the config is read off the shapes, the output is the hub's."""
    _, hf = ckpt(kind)
    torch.save(to_meta_layout(hf.state_dict(), 2), tmp_path / "dinov2_tiny.pth")
    model = load_dinov2(tmp_path / "dinov2_tiny.pth")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.image_size, cfg.use_swiglu_ffn, cfg.num_register_tokens) == \
        (hf.config.hidden_size, hf.config.num_attention_heads, 70, hf.config.use_swiglu_ffn, 4 * ("registers" in kind))
    for size in (NATIVE, OTHER):
        assert (outputs(model, pixels(size)) - outputs(hf, pixels(size))).abs().max() <= 1e-5


def test_bad_checkpoints(ckpt, tmp_path):
    folder, hf = ckpt("dinov2")
    bad = shutil.copytree(folder, tmp_path / "dinov3")
    conf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**conf, "model_type": "dinov3_vit"}))
    with pytest.raises(CheckpointError, match="load_dinov3"):
        load_dinov2(bad)
    with pytest.raises(CheckpointError, match="missing key"):  # base preset vs tiny weights, from the headers
        load_dinov2(folder, config="dinov2-base")
    sd = to_meta_layout(hf.state_dict(), 2)
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="encoder.layer.1.layer_scale2.lambda1"):
        load_dinov2(tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="unknown DINOv2 preset"):
        DINOv2ViT("dinov2-huge")
    with pytest.raises(ValueError, match="square"):
        DINOv2Config(image_size=[518, 364])
    with pytest.raises(ValueError, match="registers"):
        DINOv2Config(num_register_tokens=4)  # model_type dinov2 has none


# ---------------------------------------------------------------- NF4
def bnb_dinov2(folder, registers):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from conftest import make_bnb_config
    Model = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    hf = Model.from_pretrained(folder, quantization_config=make_bnb_config(), device_map="cpu")
    return hf.train()  # bnb repacks its CPU weights in eval mode (docs/NF4.md); dropout is 0: train == eval


@pytest.mark.parametrize("kind", ["dinov2", "registers-swiglu"])
def test_nf4_quantize_on_load_equals_bitsandbytes(ckpt, kind):
    folder, hf = ckpt(kind)
    q = load_dinov2(folder, quantize="nf4")
    nf4 = [n for n, m in q.named_modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 2 * (7 if "swiglu" in kind else 6) and not block_linears(q)  # every block Linear, nothing else
    x = pixels(OTHER)
    out, full = outputs(q, x), outputs(hf, x)
    assert 1e-3 < (out - full).norm() / full.norm() < 0.15  # quantized (4 bits: a few % off), and close
    ref = bnb_dinov2(folder, "registers" in kind)
    for name, module in ref.named_modules():
        if type(module).__name__ == "Linear4bit":  # the same names: bytes and outputs equal bnb's, layer by layer
            assert name in nf4
            h = torch.randn(3, module.in_features)
            with torch.no_grad():
                torch.testing.assert_close(q.get_submodule(name)(h), module(h))
    with torch.no_grad():
        assert (out - ref(pixel_values=x).last_hidden_state).abs().max() <= 1e-4


def test_prequantized_bitsandbytes_checkpoint(ckpt, tmp_path):
    folder, _ = ckpt("dinov2")
    bnb_dinov2(folder, False).save_pretrained(tmp_path / "mlp")
    ours = load_dinov2(tmp_path / "mlp")  # stored NF4 read as is, no re-quantization
    assert isinstance(ours.layer[1].mlp.fc2, NF4Linear)
    assert torch.equal(outputs(ours, pixels(OTHER)), outputs(load_dinov2(folder, quantize="nf4"), pixels(OTHER)))
    folder, _ = ckpt("dinov2-swiglu")
    bnb_dinov2(folder, False).save_pretrained(tmp_path / "swiglu")
    with pytest.raises(CheckpointError, match="weights_in.*cannot be split"):
        load_dinov2(tmp_path / "swiglu")


# ---------------------------------------------------------------- LoRA / DoRA against PEFT on Dinov2Model
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all-linear", "q,v"])
@pytest.mark.parametrize("kind", ["dinov2", "dinov2-swiglu"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_equal_peft(ckpt, method, kind, targets):
    """PEFT wraps transformers' modules by name; ours have the same names, so A, B and m copy over unrenamed.
    Outputs in eval and train mode (dropout 0.1, one seed: the same masks) and every adapter gradient."""
    peft = pytest.importorskip("peft")
    folder, hf = ckpt(kind)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora",
                          lora_dropout=0.1, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
    ours = load_dinov2(folder)
    add_adapters(ours, method=method, rank=4, alpha=8, dropout=0.1, targets=targets)
    theirs = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert [n for n, _ in adapter_layers(ours)] == list(theirs)
    assert len(theirs) == 2 * (len(targets) if isinstance(targets, list) else 7 if "swiglu" in kind else 6)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, w in adapter_layers(ours):
            t = theirs[name]
            if method == "dora":
                t.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn_like(w.lora_magnitude_vector))
                w.lora_magnitude_vector.copy_(t.lora_magnitude_vector["default"].weight)
            w.lora_A.weight.copy_(t.lora_A["default"].weight)
            w.lora_B.weight.copy_(t.lora_B["default"].weight)
    x = pixels(OTHER)
    with torch.no_grad():
        with pm.disable_adapter():
            plain = pm(pixel_values=x).last_hidden_state
        ref = pm.eval()(pixel_values=x).last_hidden_state
    assert (ref - plain).abs().max() > 1e-2  # the adapters change the output ...
    assert (outputs(ours.eval(), x) - ref).abs().max() <= 1e-5  # ... exactly as PEFT's do
    pm.train(), ours.train()
    torch.manual_seed(3)
    ref = pm(pixel_values=x).last_hidden_state
    torch.manual_seed(3)
    out = ours(x)
    assert (out - ref).abs().max() <= 1e-5
    ref.square().mean().backward()
    out.square().mean().backward()
    for name, w in adapter_layers(ours):
        t = theirs[name]
        pairs = [(w.lora_A.weight, t.lora_A["default"].weight), (w.lora_B.weight, t.lora_B["default"].weight)]
        if method == "dora":
            pairs.append((w.lora_magnitude_vector, t.lora_magnitude_vector["default"].weight))
        for a, b in pairs:
            assert a.grad is not None and close(a.grad, b.grad), (name, (a.grad - b.grad).abs().max())


# ---------------------------------------------------------------- training-side behaviour
def test_gradient_checkpointing_same_gradients(ckpt):
    folder, _ = ckpt("registers-swiglu")
    ours = load_dinov2(folder).train()
    x = pixels(OTHER)
    grads = []
    for blocks in (False, True):
        ours.zero_grad()
        ours.set_gradient_checkpointing(blocks)
        ours(x).square().mean().backward()
        grads.append(ours.layer[0].mlp.gate_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert ours.feature_dim("cls+mean") == 384 and ours.num_prefix_tokens == 5
    with torch.device("meta"):
        empty = DINOv2ViT("dinov2-small")
    with pytest.raises(RuntimeError, match="load_dinov2"):
        empty(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="smaller than one"):
        ours(torch.randn(1, 3, 10, 28))
