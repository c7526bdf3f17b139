"""nanopeft.backbones.baselines: the from-scratch ResNet-18 and ViT-Small baselines.

Reference numbers (torchvision / timm are not runtime or test dependencies; the parity tests at the
end run only where they are installed):
- torchvision `resnet18(weights=None)`: 11,689,512 parameters (torchvision's ResNet18_Weights
  `num_params`), of which `fc` = 512·1000 + 1000 = 513,000, so the trunk has 11,176,512;
  its state_dict has 122 entries (120 without fc).
- timm `vit_small_patch16_224`: 22,050,664 parameters with the 1000-class head, 21,665,664 with
  `num_classes=0` (timm 1.0.31).
- The seed notebook (`TrainFromScatch_Preprocesing Pipeline Val = 1.ipynb`, Module 8) printed
  11,310,153 (ResNet-18) and 21,817,737 (ViT-Small) for its 9-class models.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopeft.backbones.baselines import ResNet18, ViTSmall, build_scratch, resample_pos_embed

count = lambda m: sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_scratch("resnet18", 9, dropout=0.0)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_scratch("vit-small", 9, dropout=0.0, image_size=32)


def test_resnet18_parameter_counts(resnet):
    trunk = resnet.backbone
    assert count(trunk) == 11_689_512 - 513_000 == 11_176_512
    with torch.device("meta"):
        assert count(build_scratch("resnet18", 9)) == 11_310_153             # notebook printout
    keys = list(trunk.state_dict())
    assert len(keys) == 120                                                  # torchvision 122 - fc
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
              "layer4.1.bn2.num_batches_tracked", "layer4.0.downsample.1.bias"):
        assert k in keys, k
    assert "layer1.0.downsample.0.weight" not in keys                        # no projection in stage 1
    # the notebook's wrapper keys (and our saved files) stay backbone.* / classifier.*; attribute `.head`
    full = list(resnet.state_dict())
    assert full[-4:] == ["classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias"]
    fresh = build_scratch("resnet18", 9)
    fresh.load_state_dict(resnet.state_dict(), strict=True)
    assert torch.equal(fresh.head[4].weight, resnet.head[4].weight)


def test_vit_small_parameter_counts():
    with torch.device("meta"):                                               # shapes only: no init cost
        trunk = ViTSmall()                                                   # 224 px: 1 + 14·14 positions
        model = build_scratch("vit_small", 9)                                # the notebook's spelling
    assert trunk.pos_embed.shape == (1, 197, 384)
    assert count(trunk) == 21_665_664                                        # timm, num_classes=0
    assert count(trunk) + count(nn.Linear(384, 1000)) == 22_050_664          # timm, 1000-class head
    assert count(model) == 21_817_737                                        # notebook printout
    assert model.backbone.blocks[0].attn.qkv.bias is not None
    assert model.backbone.norm.eps == 1e-6 and model.backbone.blocks[11].norm2.eps == 1e-6


def test_output_shapes_and_resnet_stage_shapes(resnet, vit):
    x = torch.randn(2, 3, 64, 64)
    shapes = {}
    hooks = [getattr(resnet.backbone, n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n in ("maxpool", "layer1", "layer2", "layer3", "layer4")]
    resnet.eval()
    with torch.no_grad():
        assert resnet(x).shape == (2, 9)
        assert resnet(torch.randn(2, 3, 32, 48)).shape == (2, 9)
    for h in hooks:
        h.remove()
    # the last (32×48) forward: /4 after the stem, then /1, /2, /2, /2
    assert shapes == {"maxpool": (2, 64, 8, 12), "layer1": (2, 64, 8, 12), "layer2": (2, 128, 4, 6),
                      "layer3": (2, 256, 2, 3), "layer4": (2, 512, 1, 2)}
    vit.eval()
    with torch.no_grad():
        assert vit(x).shape == (2, 9)                                        # table resampled 2×2 -> 4×4
        assert vit(torch.randn(1, 3, 32, 48)).shape == (1, 9)
        assert vit.backbone(torch.randn(1, 3, 32, 32)).shape == (1, 384)


def test_init(resnet):
    trunk = resnet.backbone
    conv = trunk.layer4[1].conv2                                             # 512·512·9 weights
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)   # fan_out
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in trunk.modules() if isinstance(m, nn.BatchNorm2d))
    head = resnet.head[1]
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.02)
    torch.manual_seed(0)
    v = ViTSmall(image_size=32)
    fc1 = v.blocks[3].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.01) and torch.all(fc1.bias == 0)
    assert v.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert v.cls_token.abs().max().item() < 1e-5                             # normal(std=1e-6)


def test_sgd_steps_reduce_loss(resnet, vit):
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 8])
    # Fresh ResNet logits are large (He-init head on un-normalised pooled features: loss ~14), so
    # its step is small; plain SGD at 1e-2 overshoots on the first step.
    for base, lr in ((resnet, 1e-3), (vit, 5e-2)):
        model = copy.deepcopy(base).train()                                 # dropout=0: a deterministic loss
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
        name = type(model.backbone).__name__
        assert all(b < a for a, b in zip(losses, losses[1:])), (name, losses)   # every step helps
        assert losses[-1] < 0.5 * losses[0], (name, losses)


def test_resnet_eval_is_deterministic_and_per_sample(resnet):
    resnet.eval()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = resnet(x), resnet(x)
        single = resnet(x[1:2])
    assert torch.equal(a, b)
    # eval-mode BN uses running statistics, so a sample's logits do not depend on its batch
    torch.testing.assert_close(single, a[1:2], rtol=1e-5, atol=1e-5)
    # ... whereas train-mode BN normalises with batch statistics (a copy: this updates running stats)
    m = copy.deepcopy(resnet).train()
    with torch.no_grad():
        assert not torch.allclose(m(x[1:2].expand(2, -1, -1, -1))[0], m(x)[1], atol=1e-3)


def test_vit_attention_and_block_against_manual_math(vit):
    torch.manual_seed(0)
    blk = vit.backbone.blocks[0]
    with torch.no_grad():                                                    # non-trivial biases
        for p in blk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 5, 384)
    attn, H, hd = blk.attn, 6, 64
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(384, dim=-1)    # 3 × (B, N, D)
    heads = lambda t: t.reshape(2, 5, H, hd).transpose(1, 2)                 # (B, H, N, hd)
    q, k, v = heads(q), heads(k), heads(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)       # (B, H, N, N), rows sum to 1
    o = (w @ v).transpose(1, 2).reshape(2, 5, 384) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), o, rtol=1e-5, atol=1e-5)
    # pre-norm residual block with exact-erf GELU
    ln = lambda t, m: F.layer_norm(t, (384,), m.weight, m.bias, 1e-6)
    h = x + attn(ln(x, blk.norm1))
    mlp = blk.mlp
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
    ref = h + gelu(ln(h, blk.norm2) @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_pos_embed_resampling():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resample_pos_embed(pos, 14, 14) is pos                            # native grid: untouched
    out = resample_pos_embed(pos, 3, 5)
    assert out.shape == (1, 1 + 15, 8) and torch.equal(out[:, 0], pos[:, 0])  # CLS position kept
    # bicubic weights sum to one: a constant table stays constant at any size (up- or downsampled)
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 196, 8), 0.7)], dim=1)
    for hw in ((3, 5), (20, 16)):
        torch.testing.assert_close(resample_pos_embed(const, *hw)[:, 1:], torch.full((1, hw[0] * hw[1], 8), 0.7))
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.zeros(1, 1 + 12, 8), 2, 2)


def test_errors_name_the_culprit(vit):
    with pytest.raises(ValueError, match="not a multiple of 16"):
        vit(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="image_size 200"):
        ViTSmall(image_size=200)
    with pytest.raises(ValueError, match="unknown baseline 'vit-base'"):
        build_scratch("vit-base", 9)


# ---- parity with the libraries the notebook used (skipped unless installed) ----


def test_resnet18_matches_torchvision():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    ours = ResNet18().eval()
    ref = tvm.resnet18(weights=None)
    ref.fc = nn.Identity()                                                   # as the notebook did
    ref.load_state_dict(ours.state_dict())                                   # strict: same names/shapes
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_vit_small_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = ViTSmall().eval()                                                 # 224 table
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                            dynamic_img_size=True).eval()
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for hw in ((32, 32), (48, 64)):                                      # resampled tables
            x = torch.randn(2, 3, *hw)
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
