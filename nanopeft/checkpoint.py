"""Read DINOv3 checkpoints: find the files and the config, check keys and shapes, yield tensors one by one.

    folder/config.json                                   ─► ViTConfig
    folder/model.safetensors | shards + index.json       ─► SafetensorsSource  (header parsed, no data read)
    Meta's original .pth                                 ─► PthSource          (keys mapped to the hub's)
    source.shapes  : {key: shape}, checked by load.py before any weight is read
    source.stream(): (key, tensor) one at a time (borrow=True: in one reused buffer)

Key layouts and the Meta → hub mapping: dinov3.md §3. Errors name the file and the key at fault.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .config import PRESETS, ViTConfig, resolve_config

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
NF4_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"  # marks a Linear saved pre-quantized by bitsandbytes


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file and the key."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------- Meta's original .pth → hub names
def meta_to_hub(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One Meta key → zero or more hub (key, tensor) pairs (dinov3.md §3b). The fused qkv is split in
    three along the output rows; the K bias (always masked to 0 by Meta) and training-only keys drop."""
    if key == "rope_embed.periods":
        return []  # RoPE periods are recomputed in fp32 (HF parity; Meta's are bf16-rounded)
    if key.startswith("local_cls_norm.") or key.endswith(".bias_mask"):
        return []  # training-only (local crops) and the K-bias mask buffer
    simple = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
              "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
              "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    if key == "mask_token":
        return [("embeddings.mask_token", t.reshape(1, 1, -1))]  # Meta (1, D) → hub (1, 1, D)
    if key in simple:
        return [(simple[key], t)]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m is None:
        return [(key, t)]  # unknown: reported as unexpected by the key check
    i, rest = m.groups()
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        q, k, v = t.chunk(3, dim=0)  # rows are [q | k | v]
        kind = rest.rsplit(".", 1)[1]
        out = [(f"layer.{i}.attention.q_proj.{kind}", q), (f"layer.{i}.attention.v_proj.{kind}", v)]
        if kind == "weight":
            out.insert(1, (f"layer.{i}.attention.k_proj.weight", k))
        return out
    table = {"attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1", "norm1": "norm1", "norm2": "norm2",
             "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj",
             "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return [(f"layer.{i}.{dst}{rest[len(src):]}", t)]
    return [(key, t)]


# ---------------------------------------------------------------- readers: (key, shape) first, data later
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors_header(f: Path) -> tuple[dict, int]:
    """A safetensors file is: 8 bytes (little-endian u64) header length, a JSON header
    {key: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes. Returns (header, data start)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{f} is not a readable safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file (header: {e})") from e
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        if info.get("dtype") not in ST_DTYPES:
            raise CheckpointError(f"{f}: key {key!r} has unsupported dtype {info.get('dtype')!r}")
        begin, stop = info["data_offsets"]
        numel = math.prod(info["shape"])
        if stop - begin != numel * ST_DTYPES[info["dtype"]].itemsize:
            raise CheckpointError(f"{f}: key {key!r} has {stop - begin} bytes for shape {info['shape']}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{f} is truncated: the header needs {8 + n + end:,} bytes, the file has {size:,}")
    return header, 8 + n


class SafetensorsSource:
    """One or many safetensors files; keys lose an optional leading `model.` (transformers 5 in memory).

    Tensors are read with plain file reads, one at a time, rather than through an mmap: pages of a
    mapped 5 GB shard count in the process's RSS until the whole shard is unmapped, which would
    double the peak of an NF4 load (the page cache still keeps the file warm)."""

    def __init__(self, files: list[Path]):
        self.files, self.where, self.shapes = files, {}, {}
        self.headers = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"checkpoint shard {f} is missing")
            header, start = read_safetensors_header(f)
            self.headers[f] = (header, start)
            for k, info in header.items():
                key = k.removeprefix("model.")
                if key in self.where:
                    raise CheckpointError(f"{f}: key {k!r} also appears in {self.where[key][0]}")
                self.where[key] = (f, k)
                self.shapes[key] = tuple(info["shape"])

    def file_of(self, key: str) -> str:
        return str(self.where[key][0])

    def stream(self, borrow: bool = False):
        """(key, tensor) in file order, read with plain file reads in the caller's thread. The kernel's
        readahead already streams a sequential file; a reader thread (tried) only made 3 threads
        contend for 2 cores, and on a small VM reading is CPU work too (copies, page-cache inserts).

        borrow=True: every tensor lives in one reused buffer, valid only until the caller asks for the
        next (copy what you keep). That saves a page fault per 4 KiB of checkpoint: on a small VM,
        faulting 13 GB of fresh memory in costs seconds of CPU. Without borrow, each tensor is fresh memory."""
        nbytes = max((math.prod(i["shape"]) * ST_DTYPES[i["dtype"]].itemsize
                      for h, _ in self.headers.values() for i in h.values()), default=0)
        reused = torch.empty(nbytes, dtype=torch.uint8) if borrow else None
        for f in self.files:
            header, start = self.headers[f]
            with open(f, "rb", buffering=0) as fh:
                for k, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    begin, end = info["data_offsets"]
                    dtype, shape, size = ST_DTYPES[info["dtype"]], info["shape"], end - begin
                    # torch.empty, not bytearray(size): that would zero-fill 13 GB before reading over it
                    buf = reused[:size] if borrow else torch.empty(size, dtype=torch.uint8)
                    fh.seek(start + begin)
                    view, got = memoryview(buf.numpy()), 0
                    while got < size:  # readinto may return short reads
                        r = fh.readinto(view[got:])
                        if not r:
                            raise CheckpointError(f"{f}: unexpected end of file in key {k!r}")
                        got += r
                    yield k.removeprefix("model."), buf.view(dtype).reshape(shape)


class PthSource:
    """Meta's original `.pth`: loaded lazily with mmap (no copy), keys mapped to hub names."""

    def __init__(self, file: Path):
        try:
            sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable torch checkpoint ({e})") from e
        for wrapper in ("model", "teacher", "state_dict"):  # some Meta files nest the weights
            if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
        self.file, self.sd = file, sd
        self.shapes = {k: tuple(v.shape) for mk, mt in sd.items() for k, v in meta_to_hub(mk, mt)}

    def file_of(self, key: str) -> str:
        return str(self.file)

    def stream(self, borrow: bool = False):  # always fresh tensors: `borrow` only matches SafetensorsSource
        for mk in list(self.sd):  # pop: drop our reference as we go; clone: no view into the mmap
            yield from ((k, t.clone()) for k, t in meta_to_hub(mk, self.sd.pop(mk)))


# ---------------------------------------------------------------- resolving a path
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _guess_preset(name: str) -> str | None:
    for preset in sorted(PRESETS, key=len, reverse=True):  # "vits16plus" before "vits16"
        if preset != "tiny" and preset in name.replace("_", ""):
            return preset
    return None


def open_checkpoint(path, config=None):
    """Find the weights and the config for `path`. Returns (source, ViTConfig, raw config dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no DINOv3 checkpoint at {path}. Download one (the repos are gated: accept the licence on "
            f"the hub first), e.g. `huggingface-cli download facebook/dinov3-vit7b16-pretrain-lvd1689m "
            f"--local-dir {path}`; see weights/README.md")
    folder = path if path.is_dir() else path.parent
    raw = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            source = SafetensorsSource([path / f for f in dict.fromkeys(weight_map.values())])
            listed = {k.removeprefix("model.") for k in weight_map}
            if listed != set(source.where):
                diff = sorted(listed ^ set(source.where))[:5]
                raise CheckpointError(f"{index} and its shards disagree on keys, e.g. {diff}")
        elif (path / "model.safetensors").is_file():
            source = SafetensorsSource([path / "model.safetensors"])
        else:
            pths = sorted(path.glob("*.pth"))
            if len(pths) != 1:
                raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json "
                                        f"or single .pth file")
            return open_checkpoint(pths[0], config)
    elif path.suffix == ".safetensors":
        source = SafetensorsSource([path])
    elif path.suffix in (".pth", ".pt", ".bin"):
        source = PthSource(path)
        if config is None and raw is None:
            config = _guess_preset(path.name)
            if config is None:
                raise ValueError(f"{path}: a Meta .pth carries no config; pass config=<preset name> "
                                 f"(one of {sorted(PRESETS)}) or a config.json-style dict")
    else:
        raise CheckpointError(f"{path}: expected a checkpoint folder, a .safetensors or a .pth file")
    if config is not None:
        cfg = resolve_config(config)
        raw = cfg.to_dict() if not isinstance(config, dict) else config
    elif raw is not None:
        try:
            cfg = ViTConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: not a DINOv3 ViT config ({e})") from e
        if raw.get("model_type", "dinov3_vit") != "dinov3_vit":
            raise CheckpointError(f"{folder / 'config.json'}: model_type {raw['model_type']!r} is not dinov3_vit")
    else:
        raise FileNotFoundError(f"{folder / 'config.json'} is missing; pass config=<preset or dict>")
    return source, cfg, raw
