"""DINOv3 vision transformer, written by hand to compute exactly what transformers' DINOv3ViTModel computes.

    image (B,3,H,W) ─ patch conv 16×16 ─► (B, h·w, D) ─ prepend [CLS, R registers] ─► (B, N, D), N = 1 + R + h·w
        └─► L × [ x += λ1 · Attn(LN1(x))    (q,k,v,o projections; 2-D RoPE on the patch tokens only)
                  x += λ2 · MLP(LN2(x)) ]   (SwiGLU: down(silu(gate x) · up x), or GELU: down(gelu(up x)))
        └─► final LayerNorm on every token ─► last_hidden_state (B, N, D); CLS = token 0

Module and parameter names equal the hub checkpoint keys (`embeddings.patch_embeddings.weight`,
`layer.3.attention.q_proj.weight`, `layer.3.layer_scale1.lambda1`, `norm.bias`, ...), so a hub state dict
loads with no renaming and adapter names line up with PEFT's (docs/DINOV3.md ("Checkpoint keys (hub)")).
References: Siméoni et al. 2025, "DINOv3" (arXiv:2508.10104); RoPE: Su et al. 2021; SwiGLU: Shazeer 2020.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import POOLS, ViTConfig, resolve_config

BLOCK_MODULE = re.compile(r"(.*\.)?layer\.\d+\..+")  # `[prefix.]layer.<N>.<anything>`: inside block N
# The last Linear a block's forward runs (MLP.forward, both MLP kinds). Gradient checkpointing's early
# stop ends a block's recomputation at the last tensor it saved, so what is saved after this product
# decides whether it is recomputed: see FrozenScale below and DoRALinear.ends_block (nanopeft/methods/dora.py).
BLOCK_LAST_LINEAR = "mlp.down_proj"


def in_block(name: str) -> bool:
    """Whether a module name lies inside a transformer block (`layer.3.mlp.up_proj`, also under a prefix:
    `backbone.layer.3.mlp.up_proj`). The one definition of "inside a block": the Linears there are
    what load.py quantizes to NF4 and what inject.py's targets="all-linear" adapts; the patch
    embedding, the final norm and a head never are."""
    return BLOCK_MODULE.fullmatch(name) is not None


def block_linears(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """{name: module} of the Linears inside the transformer blocks, in module order (7 per SwiGLU
    block: q, k, v, o, gate, up, down; 6 per GELU block). `kinds`: which classes count as a Linear
    (inject.py adds NF4Linear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and in_block(n)}


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))  # pre-training only; kept so keys match
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D))  # (1, R, D), R may be 0
        self.patch_embeddings = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        # a stride-16 conv silently crops a remainder at the bottom/right, exactly as the hub model does
        x = self.patch_embeddings(pixel_values)            # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)                   # (B, h·w, D), row-major: y outer, x inner
        prefix = [self.cls_token.expand(B, -1, -1), self.register_tokens.expand(B, -1, -1)]
        return torch.cat([*prefix, x], dim=1)              # (B, 1 + R + h·w, D)


class RopePositionEmbedding(nn.Module):
    """2-D rotary position embedding over patch centres (DINOv3 §3; docs/DINOV3.md ("RoPE")).

    Each of the head_dim/4 frequencies is used once for y and once for x; the table is laid out
    [y-freqs, x-freqs] and tiled twice to pair dimension i with i + head_dim/2 (half-split rotate_half).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        self.shift, self.jitter, self.rescale = cfg.pos_embed_shift, cfg.pos_embed_jitter, cfg.pos_embed_rescale

    def compute_inv_freq(self) -> torch.Tensor:
        # period_i = θ^(4i/hd), i < hd/4: inv_freq = 1/period in fp32, computed, never stored in a checkpoint
        hd = self.head_dim
        return 1.0 / self.theta ** (torch.arange(hd // 4, dtype=torch.float32) * 4 / hd)

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        """Training-only coordinate augmentation, in HF's order: shift, jitter, rescale."""
        dev, dt = coords.device, coords.dtype
        if self.shift is not None:   # coords += U(-s, s), one draw per axis
            coords = coords + torch.empty(1, 2, device=dev, dtype=dt).uniform_(-self.shift, self.shift)
        if self.jitter is not None:  # coords *= exp(U(-ln j, ln j)), one draw per axis
            lj = math.log(self.jitter)
            coords = coords * torch.empty(1, 2, device=dev, dtype=dt).uniform_(-lj, lj).exp()
        if self.rescale is not None:  # coords *= exp(U(-ln r, ln r)), ONE scalar for both axes and the batch
            lr = math.log(self.rescale)
            coords = coords * torch.empty(1, device=dev, dtype=dt).uniform_(-lr, lr).exp()
        return coords

    def forward(self, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.inv_freq.device
        # patch centres in [-1, 1], each axis normalised by its own length ("separate")
        cy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h * 2 - 1
        cx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w * 2 - 1
        coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).flatten(0, 1)  # (h·w, 2)
        if self.training:
            coords = self.augment(coords)
        angles = 2 * math.pi * coords[:, :, None] * self.inv_freq[None, None, :]  # (h·w, 2, hd/4)
        angles = angles.flatten(1, 2).tile(2)                                     # (h·w, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """RoPE on the patch tokens only; CLS and registers pass through unrotated. t: (B, H, N, hd)."""
    prefix, patches = t[:, :, :num_prefix], t[:, :, num_prefix:]
    patches = patches * cos + rotate_half(patches) * sin  # RoFormer Eq. 34, half-split pairing
    return torch.cat([prefix, patches], dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.dropout = cfg.attention_dropout
        # four separate projections (Meta's fused qkv is split on load); biases are per projection
        self.q_proj = nn.Linear(D, D, bias=cfg.query_bias)
        self.k_proj = nn.Linear(D, D, bias=cfg.key_bias)
        self.v_proj = nn.Linear(D, D, bias=cfg.value_bias)
        self.o_proj = nn.Linear(D, D, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        split = lambda t: t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        prefix = N - cos.shape[-2]  # tokens before the h·w patches (CLS, registers, any prompts): not rotated
        q, k = apply_rope(q, cos, sin, prefix), apply_rope(k, cos, sin, prefix)
        # softmax(q kᵀ / √hd) v, no mask (Vaswani et al. 2017, Eq. 1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, N, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, D))    # (B, N, D)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gated = cfg.use_gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(D, I, bias=b)
        self.up_proj = nn.Linear(D, I, bias=b)
        self.down_proj = nn.Linear(I, D, bias=b)
        self.act = F.silu if cfg.hidden_act in ("silu", "swish") else F.gelu  # F.gelu = exact erf GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU (Shazeer 2020, Eq. 6): down(silu(x Wg) ⊙ x Wu)
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lambda1.requires_grad:
            return x * self.lambda1  # CaiT (Touvron et al. 2021) Eq. 3: diag(λ) per residual branch
        return FrozenScale.apply(x, self.lambda1)  # the same product, saving no tensor for backward


class FrozenScale(torch.autograd.Function):
    """y = x · λ for a frozen λ, and ∂L/∂x = ∂L/∂y · λ: `x * λ` with λ kept on ctx, not saved.

    Why: a block's last op is this scale, and autograd's `x * λ` saves λ. Non-reentrant gradient
    checkpointing (early stop) recomputes a block up to the last tensor the forward saved, so that
    save would drag the recomputation through the MLP's down projection, whose output backward never
    needs. With nothing saved here, the recomputation ends after the down projection's low-rank path.
    """

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam  # a frozen parameter (not an activation): holding it costs nothing
        return x * lam

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.lam, None


class DropPath(nn.Module):
    """Per-sample stochastic depth (Huang et al. 2016); identity at rate 0 and in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(D, cfg.layerscale_value)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_scale2 = LayerScale(D, cfg.layerscale_value)
        self.drop_path = DropPath(cfg.drop_path_rate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale1(self.attention(self.norm1(x), cos, sin)))  # pre-norm residual
        return x + self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class DINOv3ViT(nn.Module):
    """The DINOv3 backbone. `forward` returns transformers' `last_hidden_state`."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = resolve_config(config)
        self.embeddings = Embeddings(cfg)
        self.rope_embeddings = RopePositionEmbedding(cfg)
        self.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # which blocks recompute in backward (activations O(1 block) when all do): False / True (none /
        # all), k (the first k blocks: --grad-checkpointing auto's choice), or a set of block indices
        self.gradient_checkpointing: bool | int | set[int] = False

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def set_gradient_checkpointing(self, blocks: bool | int | set[int] = True) -> "DINOv3ViT":
        """True: every block recomputes in backward; False: none; k: the first k; a set: those indices.
        Which k blocks does not change the peak (every block keeps the same activations), only how many."""
        self.gradient_checkpointing = blocks
        self.checkpointed_blocks()  # validate now, not at the first training step
        return self

    def checkpointed_blocks(self) -> set[int]:
        """The indices of the blocks that recompute in backward, from `gradient_checkpointing`."""
        g, L = self.gradient_checkpointing, len(self.layer)
        if isinstance(g, bool) or g is None:
            return set(range(L)) if g else set()
        if isinstance(g, int):
            if not 0 <= g <= L:
                raise ValueError(f"gradient_checkpointing: {g} blocks asked, the model has {L}")
            return set(range(g))
        blocks = set(g)
        if not all(isinstance(i, int) and 0 <= i < L for i in blocks):
            raise ValueError(f"gradient_checkpointing: block indices must be in 0..{L - 1}, got {sorted(blocks)}")
        return blocks

    def set_rope_augmentation(self, shift=None, jitter=None, rescale=None) -> "DINOv3ViT":
        """Set the train-time RoPE coordinate augmentation (None = off). Eval mode never applies it."""
        r = self.rope_embeddings
        r.shift, r.jitter, r.rescale = shift, jitter, rescale
        self.config.pos_embed_shift, self.config.pos_embed_jitter, self.config.pos_embed_rescale = shift, jitter, rescale
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.embeddings.cls_token  # the model's dtype and device (the patch conv may be wrapped)
        if w.is_meta:
            raise RuntimeError("DINOv3ViT has no weights yet (built on the meta device): load a checkpoint "
                               "with nanopeft.load_dinov3 first")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, H, W), "
                             f"got {tuple(pixel_values.shape)}")
        P = self.config.patch_size
        h, w_ = pixel_values.shape[-2] // P, pixel_values.shape[-1] // P
        if h == 0 or w_ == 0:
            raise ValueError(f"image {tuple(pixel_values.shape[-2:])} is smaller than one {P}×{P} patch")
        x = self.embeddings(pixel_values.to(w.dtype))     # (B, N, D)
        cos, sin = self.rope_embeddings(h, w_, x.dtype)   # (h·w, hd) each
        recompute = self.checkpointed_blocks() if self.training and torch.is_grad_enabled() else ()
        for i, block in enumerate(self.layer):
            if i in recompute:
                # non-reentrant: works with frozen inputs and keeps the RNG (RoPE rescale) consistent
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm(x)                               # (B, N, D) = last_hidden_state

    def features(self, pixel_values: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """The image embedding a classification head reads: CLS (the paper), mean of the patch
        tokens (registers excluded), or both concatenated (Meta's linear-probe recipe, 2·D)."""
        self.feature_dim(pool)                            # validates `pool` before the forward
        x = self(pixel_values)                            # (B, N, D)
        cls, patches = x[:, 0], x[:, self.num_prefix_tokens:]
        if pool == "cls":
            return cls                                    # (B, D)
        if pool == "mean":
            return patches.mean(dim=1)                    # (B, D)
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)  # (B, 2D)

    def feature_dim(self, pool: str = "cls") -> int:
        """Width of `features(x, pool)`: D, or 2·D for "cls+mean" (the head's input width)."""
        return pooled_width(self.config.hidden_size, pool)


def pooled_width(hidden_size: int, pool: str = "cls") -> int:
    """The one definition of the pooled feature width: D, or 2·D when CLS and mean-patch are concatenated."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return 2 * hidden_size if pool == "cls+mean" else hidden_size
