"""The paper's two from-scratch baselines: ResNet-18 and ViT-Small/16, in plain torch.

    pixels (B, 3, H, W) ─► backbone ─► (B, F) ─► head ─► (B, C) logits

    resnet18 : torchvision's `resnet18(weights=None)` minus `fc`           F = 512
               head = Dropout(p) ─ Linear(512, 256) ─ ReLU ─ Dropout(p/2) ─ Linear(256, C)
    vit-small: timm's `vit_small_patch16_224(num_classes=0)` (CLS after the final norm)   F = 384
               head = LayerNorm ─ Dropout(p) ─ Linear(384, 384) ─ GELU ─ Dropout(p/2) ─ Linear(384, C)

The heads are the ones in the seed notebook `TrainFromScatch_Preprocesing Pipeline Val = 1.ipynb`
(Module 8, `dropout_rate=0.5`; the second dropout is half the first, which the paper's text leaves
out: docs/RECIPE.md ("The 11 configurations")).
Its printed totals for C = 9, 11,310,153 (ResNet-18) and 21,817,737 (ViT-Small), are tested.
Module names equal torchvision's / timm's and the wrapper's state-dict keys are `backbone.*` /
`classifier.*` as in the notebook (the attribute is `.head`, head.HEAD_KEY keeps the keys), so state
dicts from either library (or the notebook's checkpoints) load without a remap.
No pretraining anywhere: these are the "what does a foundation model buy us" baselines.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SCRATCH_METHODS
from ..head import keep_head_file_keys
from ..device import autocast

# ---------------------------------------------------------------------------------------------
# ResNet-18 (He et al. 2016, "Deep Residual Learning", Table 1 "18-layer"), torchvision's layout
# ---------------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # no bias: BN follows


class BasicBlock(nn.Module):
    """y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), He et al. 2016 Eq. 1 / Fig. 2."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        # Projection shortcut (option B of the paper) only where the shape changes, with the same
        # stride as conv1; an identity shortcut there would not match (B, cout, H/s, W/s).
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, cout, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))                         # (B, cout, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """The ResNet-18 trunk; `forward` returns the global-average-pooled (B, 512) feature."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):        # layer1..layer4: two BasicBlocks each
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 512
        for m in self.modules():              # torchvision's init (zero_init_residual=False)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))   # (B, 64, H/4, W/4)
        x = self.layer1(x)                                     # (B, 64, H/4, W/4)
        x = self.layer2(x)                                     # (B, 128, H/8, W/8)
        x = self.layer3(x)                                     # (B, 256, H/16, W/16)
        x = self.layer4(x)                                     # (B, 512, H/32, W/32)
        return self.avgpool(x).flatten(1)                      # (B, 512)


# ---------------------------------------------------------------------------------------------
# ViT-Small/16 (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"; DeiT-S sizes), timm's layout
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)   # non-overlapping 16×16 patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)       # (B, 3, H, W) -> (B, h·w, D)


class Attention(nn.Module):
    """softmax(Q Kᵀ / √d_h) V per head (Vaswani et al. 2017 Eq. 1), fused qkv with bias as timm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                             # 3 × (B, H, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)                      # (B, H, N, hd); scale hd^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, D))             # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()                 # exact (erf) GELU, timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))                 # (B, N, D) -> (B, N, 4D) -> (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)) (ViT paper Eq. 2-3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)   # eps 1e-6 as timm (torch's default is 1e-5)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resample_pos_embed(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1, 1 + g·g, D) learned position table -> (1, 1 + h·w, D): bicubic on the patch grid, CLS kept.

    Same recipe as timm's `resample_abs_pos_embed` (bicubic, antialias, align_corners=False), so a
    model trained at one size runs at another; fine-tuning at the new size is still advisable.
    """
    cls, grid = pos[:, :1], pos[:, 1:]
    g = int(round(grid.shape[1] ** 0.5))
    if g * g != grid.shape[1]:
        raise ValueError(f"scratch.py: pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if (h, w) == (g, g):
        return pos
    D = grid.shape[-1]
    grid = grid.reshape(1, g, g, D).permute(0, 3, 1, 2).float()             # (1, D, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D).to(pos.dtype)       # (1, h·w, D)
    return torch.cat([cls, grid], dim=1)                                     # (1, 1 + h·w, D)


class ViTSmall(nn.Module):
    """ViT-S/16: D=384, 12 blocks, 6 heads, MLP 1536; `forward` returns the normed CLS token (B, D).

    `image_size` fixes the size of the learned position table (1 + (S/16)² rows); any other input
    whose sides are multiples of 16 is served by resampling the table (`resample_pos_embed`).
    """

    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12,
                 heads: int = 6):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"scratch.py: image_size {image_size} is not a multiple of patch {patch}")
        self.patch, self.out_dim = patch, dim
        g = image_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g * g, dim))   # CLS position included
        self.patch_embed = PatchEmbed(patch, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # timm's VisionTransformer.init_weights(mode=""): trunc-normal(.02) positions and Linears,
        # near-zero CLS, zero biases; the patch conv and LayerNorms keep torch's defaults.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch or W % self.patch:
            # Conv2d would silently drop the border pixels; make the caller resize instead.
            raise ValueError(f"scratch.py: ViTSmall input {H}×{W} is not a multiple of {self.patch}")
        x = self.patch_embed(x)                                          # (B, h·w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                  # (B, 1, D)
        pos = resample_pos_embed(self.pos_embed, H // self.patch, W // self.patch)
        x = torch.cat([cls, x], dim=1) + pos                             # (B, 1 + h·w, D)
        x = self.norm(self.blocks(x))
        return x[:, 0]                                                   # (B, D): CLS ("token" pool)


# ---------------------------------------------------------------------------------------------
# The baselines = trunk + the notebook's head
# ---------------------------------------------------------------------------------------------


class ScratchModel(nn.Module):
    """A trunk whose forward returns (B, F) features, then `head`. As in head.Classifier, the head's
    keys stay `classifier.*` in saved files (the whole network is saved: save.py's extra_state)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.autocast_dtype = None  # load_classifier sets the inference precision here (None: the caller's)
        keep_head_file_keys(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with autocast(pixel_values.device, self.autocast_dtype):         # a no-op unless set
            return self.head(self.backbone(pixel_values))              # (B, F) -> (B, C)


def resnet_head(in_dim: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, 256), nn.ReLU(inplace=True),
                         nn.Dropout(dropout / 2), nn.Linear(256, num_classes))
    for m in head:
        if isinstance(m, nn.Linear):           # notebook: He init (fan_out), zero bias
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return head


def vit_head(in_dim: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    head = nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, 384), nn.GELU(),
                         nn.Dropout(dropout / 2), nn.Linear(384, num_classes))
    for m in head:
        if isinstance(m, nn.Linear):           # notebook: trunc-normal(.02), zero bias
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def build_scratch(name: str, num_classes: int, dropout: float = 0.5, image_size: int = 224) -> ScratchModel:
    """A randomly initialised baseline whose `forward(pixel_values)` returns (B, num_classes) logits.

    `image_size` only sizes the ViT's position table (the ResNet is size-agnostic).
    """
    key = name.lower().replace("_", "-")       # the notebook spelled it "vit_small"
    if key == "resnet18":
        trunk = ResNet18()
        return ScratchModel(trunk, resnet_head(trunk.out_dim, num_classes, dropout))
    if key == "vit-small":
        trunk = ViTSmall(image_size=image_size)
        return ScratchModel(trunk, vit_head(trunk.out_dim, num_classes, dropout))
    raise ValueError(f"scratch.py: unknown baseline {name!r}; choose one of {SCRATCH_METHODS}")
