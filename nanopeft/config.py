"""Architecture config for DINOv3 ViTs, and the presets of every released size.

The field names are those of the hub's `config.json` (transformers' `DINOv3ViTConfig`), so a config
file reads straight into `ViTConfig.from_dict` and unknown keys (`architectures`, `stage_names`, ...)
are ignored. Values: `../shared/reference/dinov3.md` §2, cross-checked against the hub configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ViTConfig:
    hidden_size: int = 4096           # D
    num_hidden_layers: int = 40       # blocks
    num_attention_heads: int = 32     # H; head_dim = D / H must be divisible by 4 (2-D RoPE)
    intermediate_size: int = 8192     # I: MLP width (SwiGLU: gate/up are D->I)
    num_register_tokens: int = 4      # "storage tokens" between CLS and the patches (may be 0)
    patch_size: int = 16
    num_channels: int = 3
    image_size: int = 224             # only a default: RoPE is recomputed for every input size
    use_gated_mlp: bool = True        # SwiGLU (7B, S+, H+) vs GELU MLP (S, B, L)
    hidden_act: str = "silu"          # "silu" with the gated MLP, "gelu" (exact erf) without
    query_bias: bool = False          # per-projection biases: 7B has none on q/k/v ...
    key_bias: bool = False
    value_bias: bool = False
    proj_bias: bool = True            # ... and one on o_proj
    mlp_bias: bool = True
    layer_norm_eps: float = 1e-5
    layerscale_value: float = 1.0     # init only; every checkpoint overrides it
    rope_theta: float = 100.0         # RoPE periods 100^(4i/head_dim)
    # Train-time RoPE coordinate augmentation (DINOv3 pre-training). The hub configs ship
    # rescale=2.0, which makes every train-mode forward see randomly rescaled patch coordinates.
    # None switches a knob off; eval mode never applies any of them.
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    dtype: str | None = None          # dtype of the checkpoint's tensors ("float32", "bfloat16", ...)
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for saving

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for 2-D RoPE")
        if self.hidden_act not in ("silu", "gelu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu or gelu)")
        if self.num_register_tokens < 0:
            raise ValueError("num_register_tokens must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Build from a `config.json` dict; accepts `dtype` or the older `torch_dtype`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("dtype") is None and d.get("torch_dtype") is not None:
            kwargs["dtype"] = d["torch_dtype"]
        extra = {k: v for k, v in d.items() if k not in names and k != "torch_dtype"}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        """The `config.json` form (what transformers writes, minus bookkeeping keys)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"model_type": "dinov3_vit", "architectures": ["DINOv3ViTModel"], **d}

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


def _small(**kw) -> ViTConfig:
    # S/B/L/H+ share the pattern: q and v biases (all zeros in the release), no k bias.
    base = dict(query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True)
    return ViTConfig(**{**base, **kw})


# Every released DINOv3 ViT (facebook/dinov3-<name>-pretrain-lvd1689m), plus a tiny one for tests
# with the 7B's structure (SwiGLU, 4 registers, no q/k/v bias). Parameter counts in dinov3.md §2.
PRESETS: dict[str, ViTConfig] = {
    "vits16": _small(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                     intermediate_size=1536, use_gated_mlp=False, hidden_act="gelu"),
    "vits16plus": _small(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                         intermediate_size=1536, use_gated_mlp=True, hidden_act="silu"),
    "vitb16": _small(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, use_gated_mlp=False, hidden_act="gelu"),
    "vitl16": _small(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, use_gated_mlp=False, hidden_act="gelu"),
    "vith16plus": _small(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                         intermediate_size=5120, use_gated_mlp=True, hidden_act="silu"),
    "vit7b16": ViTConfig(),  # the dataclass defaults are the 7B
    "tiny": ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, image_size=64),
}


def resolve_config(config) -> ViTConfig:
    """A `ViTConfig`, a preset name, or a `config.json`-style dict -> `ViTConfig`."""
    if isinstance(config, ViTConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown DINOv3 preset {config!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[config])
    if isinstance(config, dict):
        return ViTConfig.from_dict(config)
    raise TypeError(f"config must be a ViTConfig, a preset name or a dict, not {type(config).__name__}")
