"""DINOv2 vision transformer (with or without registers), written by hand to compute exactly what transformers'
Dinov2Model and Dinov2WithRegistersModel compute.

    image (B,3,H,W) ─ patch conv 14×14 ─► (B, h·w, D) ─ prepend CLS, add the learned position table
        (resized to h×w when needed, see `Embeddings.position_table`) ─ insert R registers after CLS
        ─► (B, N, D), N = 1 + R + h·w
        └─► L × [ x += λ1 · Attn(LN1(x))    (q,k,v,o projections; no RoPE, no mask)
                  x += λ2 · FFN(LN2(x)) ]   (S/B/L: fc2(gelu(fc1 x)); giant: down(silu(gate x) · up x))
        └─► final LayerNorm on every token ─► last_hidden_state (B, N, D); CLS = token 0 = pooler_output

Module and parameter names equal transformers' in-memory names (release 5.18 and later), so a
`Dinov2Model.state_dict()` loads with no renaming, PEFT targets the same module names
(`encoder.layer.3.attention.q_proj`), and files/load_dinov2.py's key map is transformers' own
conversion (the hub files keep the older names `attention.attention.query`, `mlp.weights_in`, ...).

What differs from DINOv3 (backbones/dinov3.py, whose LayerScale and DropPath are reused): patch 14, a
learned absolute position table instead of RoPE, every LayerNorm eps 1e-6, biases on q, k and v, the
blocks under `encoder.layer`, the final norm named `layernorm`, and a (1, D) mask token.

References: Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"
(arXiv:2304.07193); Darcet et al. 2024, "Vision Transformers Need Registers" (arXiv:2309.16588);
LayerScale: Touvron et al. 2021 (CaiT); SwiGLU: Shazeer 2020. Code read for the semantics:
github.com/huggingface/transformers src/transformers/models/dinov2{,_with_registers}/modeling_*.py and
github.com/facebookresearch/dinov2 dinov2/models/vision_transformer.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import resolve_config
from .dinov3 import DINOv3ViT, DropPath, LayerScale

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# transformers' two config classes differ in their defaults, and older hub config.json files leave default
# values out. A with-registers config without `patch_size` means 16, not 14 (the class default), and
# the with-registers class always has a mask token and resizes its position table with antialiasing.
CLASS_DEFAULTS = {
    "dinov2": dict(patch_size=14, num_register_tokens=0, interpolate_antialias=False),
    "dinov2_with_registers": dict(patch_size=16, num_register_tokens=4, use_mask_token=True,
                                  interpolate_antialias=True),
}
ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
               "silu": F.silu, "swish": F.silu, "relu": F.relu}  # F.gelu = exact erf GELU = HF's "gelu"


@dataclass
class DINOv2Config:
    """The fields of transformers' Dinov2Config / Dinov2WithRegistersConfig (config.json names), plus how the
    position table is resized (nanopeft's own fields, set from `model_type` by `from_dict`)."""
    model_type: str = "dinov2"         # "dinov2" | "dinov2_with_registers"
    hidden_size: int = 768             # D
    num_hidden_layers: int = 12        # L
    num_attention_heads: int = 12      # head_dim = D / heads (64 in every released size)
    mlp_ratio: float = 4               # MLP hidden = int(D · mlp_ratio); SwiGLU derives its own from it
    hidden_act: str = "gelu"           # MLP only: the SwiGLU FFN always uses SiLU, whatever this says
    use_swiglu_ffn: bool = False       # the giant
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6       # not torch's 1e-5
    layerscale_value: float = 1.0      # init only; every checkpoint overrides it
    image_size: int = 224              # the position table covers (image_size / patch)² patches (hub: 518)
    patch_size: int = 14
    num_channels: int = 3
    num_register_tokens: int = 0       # with-registers: 4
    use_mask_token: bool = True        # pre-training only, kept so that the checkpoint keys match
    drop_path_rate: float = 0.0
    hidden_dropout_prob: float = 0.0   # on the embeddings
    attention_probs_dropout_prob: float = 0.0
    interpolate_antialias: bool = False  # True for dinov2_with_registers (transformers and Meta's _reg models)
    interpolate_offset: float = 0.0    # 0.1: Meta's torch.hub rule for models without registers (see Embeddings)
    dtype: str | None = None           # dtype of the checkpoint's tensors ("float32", "bfloat16", ...)
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # unknown config.json keys

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        """FFN hidden width: int(D·ratio) for the MLP; SwiGLU keeps 2/3 of it rounded up to a multiple of 8
        (4096 for the giant's D=1536) so that its three matrices cost about what the MLP's two do."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a DINOv2 ({' or '.join(MODEL_TYPES)})")
        for name in ("image_size", "patch_size"):  # transformers allows [a, a]; the table must be square
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise ValueError(f"{name} {v} is not square: the position table is a square grid")
                setattr(self, name, int(v[0]))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported ({sorted(ACTIVATIONS)})")
        if self.model_type == "dinov2" and self.num_register_tokens:
            raise ValueError("registers exist only in model_type 'dinov2_with_registers'")
        if self.num_register_tokens < 0:
            raise ValueError("num_register_tokens must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "DINOv2Config":
        """From a config.json dict, with the defaults of the transformers class its `model_type` names."""
        model_type = d.get("model_type", "dinov2")
        if model_type not in CLASS_DEFAULTS:
            raise ValueError(f"model_type {model_type!r} is not a DINOv2 ({' or '.join(MODEL_TYPES)})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {**CLASS_DEFAULTS[model_type], **{k: v for k, v in d.items() if k in names}}
        if model_type == "dinov2_with_registers":
            kwargs["use_mask_token"] = True  # the class has no such switch: the token always exists
        if kwargs.get("dtype") is None and d.get("torch_dtype") is not None:
            kwargs["dtype"] = d["torch_dtype"]
        extra = {k: v for k, v in d.items() if k not in names and k != "torch_dtype"}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        """The config.json form transformers reads (nanopeft's resize fields only where they depart from the class)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        rule = CLASS_DEFAULTS[self.model_type]
        for k in ("interpolate_antialias", "interpolate_offset"):
            if d[k] == rule.get(k, 0.0):
                del d[k]
        del d["num_register_tokens" if self.model_type == "dinov2" else "use_mask_token"]
        arch = "Dinov2Model" if self.model_type == "dinov2" else "Dinov2WithRegistersModel"
        return {**d, "architectures": [arch]}

    def replace(self, **changes) -> "DINOv2Config":
        return dataclasses.replace(self, **changes)


def _released(D: int, L: int, registers: bool, swiglu: bool = False) -> DINOv2Config:
    # the hub configs: image 518 (a 37×37 table), patch 14, 64-wide heads (facebook/dinov2-*/config.json)
    kind = "dinov2_with_registers" if registers else "dinov2"
    return DINOv2Config.from_dict(dict(model_type=kind, hidden_size=D, num_hidden_layers=L,
                                       num_attention_heads=D // 64, use_swiglu_ffn=swiglu,
                                       image_size=518, patch_size=14))


# Every released DINOv2, named as on the hub (facebook/<name>); Meta's torch.hub names: dinov2_vit{s,b,l,g}14[_reg].
SIZES = {"small": (384, 12), "base": (768, 12), "large": (1024, 24), "giant": (1536, 40)}  # (D, L); giant: SwiGLU
PRESETS: dict[str, DINOv2Config] = {
    f"dinov2-{'with-registers-' * reg}{size}": _released(D, L, reg, size == "giant")
    for size, (D, L) in SIZES.items() for reg in (False, True)}


def resolve_dinov2_config(config) -> DINOv2Config:
    """A `DINOv2Config`, a preset name or a config.json-style dict -> `DINOv2Config` (a copy for presets)."""
    return resolve_config(config, DINOv2Config, PRESETS, "DINOv2")


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # a stride-14 conv silently crops a remainder at the bottom/right, as transformers does (Meta asserts)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, h·w, D), y outer, x inner


class Embeddings(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        D, g = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.config = cfg  # the resize rule is read at call time: it can be switched after loading
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if cfg.use_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, D))  # (1, D), unlike DINOv3's (1, 1, D); never used here
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + g * g, D))  # CLS row + a g×g grid
        if cfg.model_type == "dinov2_with_registers":
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def position_table(self, H: int, W: int) -> torch.Tensor:
        """The (1, 1 + h·w, D) position table for an H×W image: the stored one, or its patch grid resized.

        transformers, per class (and what this computes):
          Dinov2Model               bicubic to size (h, w), antialias off, in fp32      (since 4.45, PR #33226)
          Dinov2WithRegistersModel  bicubic to size (h, w), antialias on, in fp32       (= Meta's _reg models)
        Meta's torch.hub models without registers resize by scale_factor (h + 0.1)/g, the "+0.1" of DINO v1
        (as transformers did up to 4.44): the output size is the same, but interpolate samples at 1/scale
        = g/(h + 0.1) instead of g/h, so every resized value differs (by up to ~0.1 on a unit-amplitude
        table at 224²). Set config.interpolate_offset = 0.1 to reproduce torch.hub's outputs instead.
        At the native size (h·w = g² and a square image) no version resizes.
        """
        cfg, table = self.config, self.position_embeddings
        h, w, D = H // cfg.patch_size, W // cfg.patch_size, table.shape[-1]
        g = math.isqrt(table.shape[1] - 1)
        # the test is on the pixel sizes, as transformers': a 518×530 image (37×37 patches) is still resized.
        # Under jit tracing always resize, so that a traced model works at every size (transformers does too).
        if h * w == g * g and H == W and not torch.jit.is_tracing():
            return table
        grid = table[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2).float()  # (1, D, g, g): bicubic in fp32
        if cfg.interpolate_offset:
            size = dict(scale_factor=((h + cfg.interpolate_offset) / g, (w + cfg.interpolate_offset) / g))
        else:
            size = dict(size=(h, w))
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=cfg.interpolate_antialias, **size)
        grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h·w, D), row-major
        return torch.cat([table[:, :1], grid], dim=1)  # the CLS row is never resized

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        x = self.patch_embeddings(pixel_values)                              # (B, h·w, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)          # (B, 1 + h·w, D)
        x = x + self.position_table(H, W)
        if hasattr(self, "register_tokens"):  # after the position add: registers have no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return self.dropout(x)                                               # (B, 1 + R + h·w, D)


class Attention(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.dropout = cfg.attention_probs_dropout_prob
        # Meta's fused qkv (3D, D) is split in three along the rows on load, [q | k | v], no per-head permutation
        self.q_proj = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(D, D, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        split = lambda t: t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # softmax(q kᵀ / √hd) v, no mask (Vaswani et al. 2017, Eq. 1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class MLP(nn.Module):
    """S/B/L: fc2(act(fc1 x)), act = exact-erf GELU in every release."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """The giant's FFN (Shazeer 2020, Eq. 6): down(silu(x Wg) ⊙ x Wu), SiLU whatever hidden_act says.

    Checkpoints fuse gate and up as one (2I, D) matrix (Meta `w12`, hub `weights_in`): the FIRST half of the
    rows is the gate (through SiLU), the second the linear up projection. Swapping them still runs, wrongly."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, I)
        self.up_proj = nn.Linear(D, I)
        self.down_proj = nn.Linear(I, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(D, cfg.layerscale_value)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg) if cfg.use_swiglu_ffn else MLP(cfg)
        self.layer_scale2 = LayerScale(D, cfg.layerscale_value)
        # one rate for every block and both residuals, as transformers (Meta's training ramps it per block);
        # the same law as transformers' drop path, drawn differently: train-mode masks differ under one seed
        self.drop_path = DropPath(cfg.drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale1(self.attention(self.norm1(x))))  # pre-norm residual
        return x + self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class DINOv2ViT(nn.Module):
    """The DINOv2 backbone (with or without registers). `forward` returns transformers' `last_hidden_state`."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = resolve_dinov2_config(config)
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))})
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing: bool | int | set[int] = False  # as DINOv3ViT's

    @property
    def layer(self) -> nn.ModuleList:
        """The blocks (`encoder.layer`), under the name DINOv3ViT uses for them."""
        return self.encoder.layer

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    # The same on both backbones (they need only `layer`, `num_prefix_tokens`, `config` and forward):
    # which blocks recompute in backward, and the pooled image embedding a head reads.
    set_gradient_checkpointing = DINOv3ViT.set_gradient_checkpointing
    checkpointed_blocks = DINOv3ViT.checkpointed_blocks
    features = DINOv3ViT.features          # "cls" (= pooler_output) | "mean" (registers excluded) | "cls+mean"
    feature_dim = DINOv3ViT.feature_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.embeddings.cls_token  # the model's dtype and device (the patch conv may be wrapped)
        if w.is_meta:
            raise RuntimeError("DINOv2ViT has no weights yet (built on the meta device): load a checkpoint "
                               "with nanopeft.load_dinov2 first")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, H, W), "
                             f"got {tuple(pixel_values.shape)}")
        P = self.config.patch_size
        if pixel_values.shape[-2] < P or pixel_values.shape[-1] < P:
            raise ValueError(f"image {tuple(pixel_values.shape[-2:])} is smaller than one {P}×{P} patch")
        x = self.embeddings(pixel_values.to(w.dtype))     # (B, N, D)
        recompute = self.checkpointed_blocks() if self.training and torch.is_grad_enabled() else ()
        for i, block in enumerate(self.layer):
            x = checkpoint(block, x, use_reentrant=False) if i in recompute else block(x)
        return self.layernorm(x)                          # (B, N, D) = last_hidden_state
