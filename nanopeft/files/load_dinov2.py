"""Stream a DINOv2 checkpoint (hub folder or Meta's torch.hub `.pth`) into a `DINOv2ViT`, optionally to NF4.

    config.json (or the .pth's shapes) ─► DINOv2Config ─► DINOv2ViT on the meta device (no memory)
    checkpoint.py source ─► RenamedSource: every key mapped to DINOv2ViT's names (tables below)
        ─► load.py's machinery, unchanged: check keys and shapes from the headers, then for each tensor
           read ─► cast ─► [quantize the block Linears to NF4] ─► move to device ─► assign

Key maps (all other keys are already DINOv2ViT's names; N = block index):

    hub file (what save_pretrained writes,           DINOv2ViT = transformers >= 5.18 in memory
    also in transformers 5.x)
    encoder.layer.N.attention.attention.query        encoder.layer.N.attention.q_proj    (key, value: k_, v_proj)
    encoder.layer.N.attention.output.dense           encoder.layer.N.attention.o_proj
    encoder.layer.N.mlp.weights_in (2I, D)           rows [0:I] ─► mlp.gate_proj, [I:2I] ─► mlp.up_proj
    encoder.layer.N.mlp.weights_out                  encoder.layer.N.mlp.down_proj
    dinov2. / dinov2_with_registers. prefix          dropped, and the classifier.* head skipped
                                                     (a *ForImageClassification checkpoint)

    Meta .pth (github.com/facebookresearch/dinov2)   DINOv2ViT
    cls_token, mask_token (1, D), register_tokens    embeddings.cls_token, .mask_token, .register_tokens
    pos_embed                                        embeddings.position_embeddings
    patch_embed.proj.{weight,bias}                   embeddings.patch_embeddings.projection.*
    blocks.N.attn.qkv (3D, D)                        rows [q | k | v] ─► attention.{q,k,v}_proj (bias too)
    blocks.N.attn.proj                               attention.o_proj
    blocks.N.ls1.gamma, ls2.gamma                    layer_scale1.lambda1, layer_scale2.lambda1
    blocks.N.norm1, norm2, mlp.fc1, mlp.fc2          encoder.layer.N.<same>
    blocks.N.mlp.w12 (2I, D)                         rows [0:I] ─► mlp.gate_proj, [I:2I] ─► mlp.up_proj
    blocks.N.mlp.w3                                  mlp.down_proj
    norm                                             layernorm
    (blocks.C.N.* of a block-chunked training checkpoint reads as blocks.N.*)

A .pth carries no config: it is read off the tensor shapes (width, depth, registers, SwiGLU, table size),
with 64-wide heads as in every released size; pass config= otherwise. Its position table is resized as
transformers resizes the same weights (so a .pth and the hub folder give the same outputs); Meta's own
torch.hub code without registers resizes differently: see Embeddings.position_table.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, PthSource, _open_weights
from .checkpoint_format import check_finite, read_json
from .load import check_loaded, stream_into
from ..backbones.dinov2 import DINOv2Config, DINOv2ViT, resolve_dinov2_config

HUB_RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
               "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj.",
               "mlp.weights_out.": "mlp.down_proj."}
META_RENAMES = {"attn.proj.": "attention.o_proj.", "ls1.gamma": "layer_scale1.lambda1",
                "ls2.gamma": "layer_scale2.lambda1", "mlp.w3.": "mlp.down_proj."}
META_GLOBALS = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
                "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
                "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
BLOCK = re.compile(r"blocks\.(?:\d+\.)?(\d+)\.(.+)")  # blocks.N.rest, or blocks.C.N.rest (block chunks)


def _split_rows(prefix: str, names: tuple[str, ...], leaf: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A fused (k·out, in) weight or (k·out,) bias -> k tensors, one per name, cut along the rows (views)."""
    return [(f"{prefix}{n}.{leaf}", part) for n, part in zip(names, t.chunk(len(names), dim=0))]


def hub_to_ours(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One hub key -> DINOv2ViT (key, tensor) pairs; keys already in our names pass unchanged."""
    for prefix in ("dinov2.", "dinov2_with_registers."):
        key = key.removeprefix(prefix)
    if key.startswith("classifier."):
        return []  # the head of a *ForImageClassification checkpoint: not part of the backbone
    m = re.fullmatch(r"(.*\.)mlp\.weights_in\.(weight|bias)", key)
    if m:
        return _split_rows(m[1] + "mlp.", ("gate_proj", "up_proj"), m[2], t)
    if ".mlp.weights_in." in key:
        raise CheckpointError(f"{key!r}: a pre-quantized fused SwiGLU weight cannot be split into gate and up; "
                              f"load the full-precision checkpoint with quantize='nf4' instead")
    for old, new in HUB_RENAMES.items():
        key = key.replace(old, new)
    return [(key, t)]


def meta_to_ours(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One key of Meta's .pth -> DINOv2ViT (key, tensor) pairs (the table in the module docstring)."""
    if key in META_GLOBALS:
        return [(META_GLOBALS[key], t)]
    m = BLOCK.fullmatch(key)
    if m is None:
        return [(key, t)]  # unknown: reported as unexpected by the key check
    prefix, rest = f"encoder.layer.{m[1]}.", m[2]
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        return _split_rows(prefix + "attention.", ("q_proj", "k_proj", "v_proj"), rest.rsplit(".")[-1], t)
    if rest in ("mlp.w12.weight", "mlp.w12.bias"):
        return _split_rows(prefix + "mlp.", ("gate_proj", "up_proj"), rest.rsplit(".")[-1], t)
    for old, new in META_RENAMES.items():
        if rest.startswith(old):
            return [(prefix + new + rest[len(old):], t)]
    return [(prefix + rest, t)]  # norm1, norm2, mlp.fc1, mlp.fc2: the same names


class RenamedSource:
    """A checkpoint.py source seen through a key map: the keys (and shapes) are DINOv2ViT's. It has what load.py's
    helpers use: `shapes`, `stream()` (tensors valid until the next one) and `file_of(key)`."""

    def __init__(self, shapes: dict, stream, file_of, rename):
        self._stream, self._file_of, self.rename = stream, file_of, rename
        self.shapes, self.raw_key = {}, {}
        for k, shape in shapes.items():  # the map run on shape-only meta tensors: no data read
            try:
                pairs = rename(k, torch.empty(shape, device="meta"))
            except CheckpointError as e:
                raise CheckpointError(f"{file_of(k)}: {e}") from e
            for new, t in pairs:
                if new in self.shapes:
                    raise CheckpointError(f"{file_of(k)}: keys {self.raw_key[new]!r} and {k!r} both give {new!r}")
                self.shapes[new], self.raw_key[new] = tuple(t.shape), k

    def file_of(self, key: str) -> str:
        return self._file_of(self.raw_key.get(key, key))

    def stream(self):
        for k, t in self._stream():
            yield from self.rename(k, t)  # row splits are views of t: load.py copies what it keeps


def open_dinov2(path: Path) -> tuple[RenamedSource, dict | None]:
    """The weights at `path` (folder, .safetensors or Meta .pth) with DINOv2ViT's key names, and for a .pth
    its own {key: shape} (to read its config off)."""
    source = _open_weights(path)
    if not isinstance(source, PthSource):
        return RenamedSource(source.shapes, source.stream, source.file_of, hub_to_ours), None
    # PthSource unpickles safely (weights_only=True, mmap) and unwraps; its key map is DINOv3's, so read its raw dict
    sd, file = source.sd, source.file

    def stream():
        for k in list(sd):
            yield k, check_finite(sd.pop(k), k, file)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return RenamedSource(shapes, stream, lambda k: str(file), meta_to_ours), shapes


def config_from_meta_shapes(shapes: dict[str, tuple], where) -> DINOv2Config:
    """A Meta .pth's config from its tensor shapes (heads: D / 64, as in every released DINOv2)."""
    try:
        D, patch = shapes["cls_token"][-1], shapes["patch_embed.proj.weight"][-1]
        g = round((shapes["pos_embed"][1] - 1) ** 0.5)
        layers = 1 + max(int(m[1]) for k in shapes if (m := BLOCK.fullmatch(k)))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: not a DINOv2 .pth (no cls_token, patch_embed, pos_embed or blocks: {e}); "
                              f"pass config=") from e
    registers = shapes.get("register_tokens", (1, 0))[1]
    swiglu = any(k.endswith("mlp.w12.weight") for k in shapes)
    mlp_ratio = 4 if swiglu else shapes.get("blocks.0.mlp.fc1.weight", (4 * D,))[0] / D
    return DINOv2Config.from_dict(dict(
        model_type="dinov2_with_registers" if registers else "dinov2", hidden_size=D, num_hidden_layers=layers,
        num_attention_heads=max(1, D // 64), mlp_ratio=mlp_ratio if mlp_ratio % 1 else int(mlp_ratio),
        use_swiglu_ffn=swiglu, image_size=g * patch, patch_size=patch,
        num_channels=shapes["patch_embed.proj.weight"][1],
        num_register_tokens=registers, qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        use_mask_token="mask_token" in shapes))


def _config_of(path: Path, config, meta_shapes: dict | None) -> tuple[DINOv2Config, dict]:
    """`config` if given, else the folder's config.json, else a .pth's shapes. -> (config, config.json dict)."""
    if config is not None:
        cfg = resolve_dinov2_config(config)
        return cfg, (config if isinstance(config, dict) else cfg.to_dict())
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if config_file.is_file():
        d = read_json(config_file)
        if d.get("model_type") not in ("dinov2", "dinov2_with_registers"):
            hint = " (use load_dinov3)" if d.get("model_type") == "dinov3_vit" else ""
            raise CheckpointError(f"{config_file}: model_type {d.get('model_type')!r} is not dinov2 or "
                                  f"dinov2_with_registers{hint}")
        try:
            return DINOv2Config.from_dict(d), d
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file}: not a DINOv2 config ({e})") from e
    if meta_shapes is not None:
        cfg = config_from_meta_shapes(meta_shapes, path)
        return cfg, cfg.to_dict()
    raise FileNotFoundError(f"{config_file} is missing; pass config=<preset or dict>")


def load_dinov2(path, *, config=None, quantize=None, dtype=None, device="cpu", progress=None) -> DINOv2ViT:
    """Load a DINOv2 ViT (with or without registers) from a hub folder (single file or shards), a
    .safetensors file or Meta's torch.hub `.pth`.

    config: a DINOv2Config, a preset name (`dinov2-base`, `dinov2-with-registers-giant`, ...) or a
    config.json-style dict; default: the folder's config.json, or a .pth's shapes. dtype: of every weight
    (default: the checkpoint's). quantize="nf4": each Linear inside the blocks becomes an `NF4Linear` as its
    tensor streams in (double quantization, blocks of 64); `dtype` is then its compute dtype and the
    dtype of everything else. A checkpoint saved pre-quantized by transformers + bitsandbytes loads as NF4
    (except the giant's fused SwiGLU weight, which cannot be split once quantized).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no DINOv2 checkpoint at {path}. Download one, e.g. `huggingface-cli download "
                                f"facebook/dinov2-base --local-dir {path}`")
    source, meta_shapes = open_dinov2(path)
    cfg, config_dict = _config_of(path, config, meta_shapes)
    model, _ = stream_into(DINOv2ViT, cfg, path, source, config_dict, quantize, dtype, device, progress)
    return check_loaded(model, path)  # (the same steps as load_dinov3: files/load.py stream_into)


__all__ = ["load_dinov2", "open_dinov2", "hub_to_ours", "meta_to_ours", "config_from_meta_shapes"]
