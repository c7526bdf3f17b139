"""Stream a DINOv3 checkpoint into a `DINOv3ViT`, tensor by tensor, optionally quantizing to NF4 on the way.

    config.json ─► ViTConfig ─► DINOv3ViT on the meta device (no memory)
    checkpoint.py source ─► check every key and shape against the model (headers only; nothing loaded yet)
        ─► for each tensor: read ─► cast ─► [quantize to NF4] ─► move to device ─► assign
            (peak memory ≈ the final model + one tensor, never two copies of the model)

Bad input fails before any weight is read, with the file and key at fault in the message.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import NF4_SUFFIX, CheckpointError, open_checkpoint, parse_dtype
from ..backbones.dinov3 import DINOv3ViT, block_linears
from ..nf4_linear import NF4Linear


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor):
    prefix, _, name = key.rpartition(".")
    mod = model.get_submodule(prefix)
    if name in mod._parameters:
        old = mod._parameters[name]
        mod._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        mod._buffers[name] = value


def load_dinov3(path, *, config=None, quantize=None, dtype=None, device="cpu", progress=None) -> DINOv3ViT:
    """Load a DINOv3 ViT from a hub folder (single file or shards), a .safetensors file or Meta's `.pth`.

    dtype: of every weight (default: the checkpoint's). quantize="nf4": each Linear inside the blocks
    becomes an `NF4Linear` as its tensor streams in (double quantization, blocks of 64); `dtype` is then
    its compute dtype and the dtype of everything else (patch embedding, norms, LayerScale, tokens, biases).
    A checkpoint saved pre-quantized by transformers + bitsandbytes loads as NF4 without re-quantizing.
    The RoPE train-time augmentation follows config.json (`pos_embed_*`, null = off).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    source, cfg, config_dict = open_checkpoint(path, config)
    model, device = stream_into(DINOv3ViT, cfg, path, source, config_dict, quantize, dtype, device, progress)
    # the RoPE table is computed, not loaded; then make sure nothing stayed on meta
    model.rope_embeddings.register_buffer("inv_freq", model.rope_embeddings.compute_inv_freq().to(device),
                                          persistent=False)
    return check_loaded(model, path)


def stream_into(model_cls, cfg, path, source, config_dict, quantize, dtype, device, progress):
    """The steps every backbone loader shares (load_dinov3, load_dinov2): `model_cls(cfg)` built on meta, the
    Linears that become NF4 swapped in, every key and shape checked from the headers, then the tensors
    streamed in one at a time (cast, [quantized], moved). Returns (model, device)."""
    dtype, device = parse_dtype(dtype), torch.device(device)
    qcfg, prequant = _prequantized(path, source, config_dict)
    if dtype is None:
        dtype = parse_dtype(qcfg.get("bnb_4bit_compute_dtype") or cfg.dtype)
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # what a full-precision file holds
    linears = block_linears(model)  # the Linears QLoRA quantizes (7 per SwiGLU block)

    # 1. swap the Linears that become NF4 (still on meta)
    quantized = set(prequant) if prequant else (set(linears) if quantize == "nf4" else set())
    _swap_in_nf4(model, source, linears, quantized, dtype)
    # a pre-quantized Linear stores `weight` + `weight.<statistic>` keys; NF4Linear checks those itself
    nf4_keys = {k for k in source.shapes if k.partition(".weight")[0] in quantized and ".weight" in k} \
        if prequant else set()
    for name in quantized if prequant else ():
        del expected[name + ".weight"]

    # 2. check keys and shapes from the headers before reading a single weight
    _check_keys(path, cfg, source, expected, skip=nf4_keys)

    # 3. stream: one tensor in memory at a time
    pending_nf4 = _stream_tensors(model, path, source, quantized, nf4_keys, device, dtype, progress)
    _load_prequantized(model, source, pending_nf4, device, dtype)
    return model, device


def check_loaded(model: nn.Module, path) -> nn.Module:
    """The loaded model in eval mode, after checking that no tensor stayed on the meta device."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: {left[:5]} were never loaded")
    return model.eval()


def _swap_in_nf4(model: nn.Module, source, linears: dict[str, nn.Linear], quantized: set[str], dtype) -> None:
    """Replace each Linear named in `quantized` by an empty NF4Linear on the meta device."""
    for name in quantized:
        if name not in linears:
            raise CheckpointError(f"{source.file_of(name + NF4_SUFFIX)}: NF4 weights for {name!r}, "
                                  f"which is not a Linear of the model")
        lin = linears[name]
        model.set_submodule(name, NF4Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                                device="meta", compute_dtype=dtype or torch.float32))


def _stream_tensors(model: nn.Module, path, source, quantized: set[str], nf4_keys: set[str], device, dtype,
                    progress) -> dict[str, dict[str, torch.Tensor]]:
    """Read, cast, [quantize], move and assign every tensor of `source`, one in memory at a time.

    Returns the pre-quantized bitsandbytes state collected per Linear (for `_load_prequantized`)."""
    pending_nf4: dict[str, dict[str, torch.Tensor]] = {}
    bar = tqdm(total=len(source.shapes), desc=f"loading {Path(path).name}", unit="tensor",
               disable=(not progress) if progress is not None else len(source.shapes) < 200)
    for key, t in source.stream():  # t is valid until the next one: copy what we keep
        bar.update(1)
        module_name, _, leaf = key.rpartition(".")
        if key in nf4_keys:  # pre-quantized bnb state: small, kept until its module is complete
            name = key.partition(".weight")[0]
            pending_nf4.setdefault(name, {})[key[len(name) + 1:]] = t.clone()
            continue
        if module_name in quantized and leaf == "weight":
            layer = model.get_submodule(module_name)
            q = NF4Linear.from_weight(t.to(device=device, dtype=dtype or t.dtype), None, blocksize=layer.blocksize,
                                          double_quant=layer.double_quant,
                                          compute_dtype=dtype or t.dtype, name=key)
            q.bias = layer.bias  # the bias (meta until its own key arrives) stays in higher precision
            model.set_submodule(module_name, q)
            continue
        target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        _set_tensor(model, key, t.to(device=device, dtype=target, copy=True))
    bar.close()
    return pending_nf4


def _prequantized(path, source, config_dict: dict | None) -> tuple[dict, list[str]]:
    """(quantization_config, names of the Linears stored in NF4) of a checkpoint; both empty if none."""
    qcfg = (config_dict or {}).get("quantization_config") or {}
    prequant = sorted(k[: -len(NF4_SUFFIX)] for k in source.shapes if k.endswith(NF4_SUFFIX))
    if qcfg and not prequant:
        raise CheckpointError(f"{path}: config.json has a quantization_config but the weights hold no NF4 state")
    return qcfg, prequant


def _check_keys(path, cfg, source, expected: dict[str, tuple], skip: set[str]) -> None:
    """Every key the model expects, none it does not, each with its shape (from the headers alone)."""
    got = {k: s for k, s in source.shapes.items() if k not in skip}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all) for a {cfg.num_hidden_layers}-layer D={cfg.hidden_size} model")
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{source.file_of(k)}: unexpected key(s) {unexpected[:8]} ({len(unexpected)} in all)")
    for k, s in got.items():
        if s != expected[k]:
            raise CheckpointError(f"{source.file_of(k)}: key {k!r} has shape {list(s)}, "
                                  f"the model expects {list(expected[k])}")


def _load_prequantized(model: nn.Module, source, pending: dict[str, dict], device, dtype) -> None:
    """Load the collected bitsandbytes NF4 state of each pre-quantized Linear into its NF4Linear."""
    for name, sd in pending.items():
        layer = model.get_submodule(name)
        if layer.bias is not None:
            sd["bias"] = layer.bias.detach()
        try:
            layer.load_state_dict(sd, strict=True, assign=True)
        except Exception as e:
            raise CheckpointError(f"{source.file_of(name + NF4_SUFFIX)}: NF4 state of {name!r} "
                                  f"does not load ({e})") from e
        layer.to(device)
        if dtype is not None:
            layer.compute_dtype = dtype
