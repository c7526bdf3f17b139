"""Read DINOv3 checkpoints: find the files and the config, check keys and shapes, yield tensors one by one.

    folder/config.json                                   ─► ViTConfig
    folder/model.safetensors | shards + index.json       ─► SafetensorsSource  (header validated, no data read)
    Meta's original .pth                                 ─► PthSource          (keys mapped to the hub's)
    source.shapes  : {key: shape}, checked by load.py before any weight is read
    source.stream(): (key, tensor) one at a time, each valid until the next

Key layouts and the Meta → hub mapping: docs/DINOV3.md ("Checkpoint keys (hub)", "Checkpoint keys (Meta .pth)").

Files downloaded from the internet are untrusted input. Every safetensors header is validated by
checkpoint_format.py before safetensors or our reader touches the data, so a damaged file ends in a
CheckpointError naming the file and, for a tensor problem, the tensor; NaN/inf values are refused as each
tensor streams by. A `.pth` is unpickled only with weights_only=True: it cannot run code.

Two safetensors readers yield the same tensors (tests/test_checkpoint.py proves it): the plain one,
`SafetensorsSource.stream_simple` (safetensors' own safe_open), to read first; and `FastDirectReader`
(O_DIRECT reads by a thread into three reused buffers), fenced below it, which the loader uses.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_format import (ST_DTYPES, CheckpointError, Header, MissingFileError, check_finite, read_json,
                                read_safetensors_header)
from ..config import PRESETS, ViTConfig, resolve_config

__all__ = ["CheckpointError", "MissingFileError", "SafetensorsSource", "FastDirectReader", "PthSource",
           "open_checkpoint", "read_safetensors_header", "parse_dtype", "meta_to_hub", "guess_preset", "NF4_SUFFIX"]

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
NF4_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"  # marks a Linear saved pre-quantized by bitsandbytes


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------- Meta's original .pth → hub names
def meta_to_hub(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One Meta key → zero or more hub (key, tensor) pairs (docs/DINOV3.md, "Checkpoint keys (Meta .pth)"). The fused qkv is split in
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


# ---------------------------------------------------------------- the simple reader
class SafetensorsSource:
    """One or many safetensors files; keys lose an optional leading `model.` (transformers 5 in memory).

    stream() uses FastDirectReader (below) unless fast=False; stream_simple() is the plain version."""

    def __init__(self, files: list[Path], fast: bool = True):
        self.files, self.fast, self.where, self.shapes, self.headers = list(files), fast, {}, {}, {}
        for f in self.files:
            if not f.is_file():
                raise MissingFileError(f"checkpoint shard {f} is missing")
            self.headers[f] = header = read_safetensors_header(f)
            for k, info in header.tensors.items():
                key = k.removeprefix("model.")
                if key in self.where:
                    raise CheckpointError(f"{f}: key {k!r} also appears in {self.where[key][0]}")
                self.where[key] = (f, k)
                self.shapes[key] = tuple(info["shape"])

    def file_of(self, key: str) -> str:
        return str(self.where[key][0])

    def stream(self):
        """(key, tensor) in file order, each valid until the next one is asked for (copy what you keep)."""
        return FastDirectReader(self.files, self.headers).stream() if self.fast else self.stream_simple()

    def stream_simple(self):
        """safetensors' safe_open: the file is memory-mapped and each tensor copied out of the mapping.
        Simple, but the mapped pages of a 5 GB shard count in the process's memory until the shard is
        closed, which would double the peak of an NF4 load: hence the fast reader."""
        for f in self.files:
            try:
                with safe_open(f, "pt") as st:  # the header was validated: safetensors will agree
                    for k in self.headers[f].tensors:
                        yield k.removeprefix("model."), check_finite(st.get_tensor(k), k, f)
            except CheckpointError:
                raise
            except Exception as e:  # e.g. the file changed since its header was read
                raise CheckpointError(f"{f}: safetensors could not read it ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- the fast reader (fenced): O_DIRECT + a thread
class FastDirectReader:
    """The loader's reader: the same (key, tensor) stream as stream_simple, faster and lighter.

    Tensors are read with plain reads into three reused buffers, not through an mmap (mapped pages would
    count in RSS until the whole shard is unmapped), by a thread that reads the next two tensors while
    the caller works on this one. Reads go around the page cache (O_DIRECT) where the OS and filesystem
    allow it: the disk DMAs straight into our buffer, so reading costs almost no CPU and overlaps
    quantization fully, instead of competing with it for the cores as page-cache copies do. Reused
    buffers also save a page fault per 4 KiB of checkpoint. Measured in docs/BENCHMARKS.md.

    Each tensor is borrowed: it lives in one of the buffers and is valid only until the next one is
    asked for (copy what you keep)."""

    def __init__(self, files: list[Path], headers: dict[Path, Header]):
        self.files, self.headers = files, headers

    def stream(self):
        sizes = [_span(h.start + i["data_offsets"][0], i["data_offsets"][1] - i["data_offsets"][0])[1]
                 for h in self.headers.values() for i in h.tensors.values()]
        # three buffers: one with the caller, two being read ahead (with one read ahead the caller
        # of a 7B load kept waiting for reads)
        slots: queue.Queue = queue.Queue()
        for _ in range(3):
            slots.put(_aligned_buffer(max(sizes, default=0)))
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        thread = threading.Thread(target=self._read_ahead, args=(slots, ready, stop), daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item  # the reader's error, with its message
                key, t, slot, f = item
                yield key.removeprefix("model."), check_finite(t, key, f)
                del t
                slots.put(slot)  # the caller is back: the buffer may be read over
        finally:
            stop.set()
            thread.join()

    def _read_ahead(self, slots: queue.Queue, ready: queue.Queue, stop: threading.Event):
        """The reader thread: every tensor in file order into a free slot, then None (or the error)."""
        try:
            for f in self.files:
                header = self.headers[f]
                with _Reader(f) as r:
                    for k, info in header.tensors.items():  # file order: sequential reads
                        slot = _get(slots, stop)
                        if stop.is_set():
                            return
                        begin, end = info["data_offsets"]
                        t = r.read(slot, header.start + begin, end - begin, k)
                        if (t.data_ptr() % ST_DTYPES[info["dtype"]].itemsize) != 0:
                            t = t.clone()  # an odd offset: a dtype view needs aligned memory
                        ready.put((k, t.view(ST_DTYPES[info["dtype"]]).reshape(info["shape"]), slot, f))
            ready.put(None)
        except BaseException as e:  # surfaced in the consumer
            ready.put(e)


ALIGN = 4096  # O_DIRECT wants file offsets, lengths and memory addresses aligned to the block size
DIRECT_IO = hasattr(os, "O_DIRECT")  # set False to read through the page cache


def _span(offset: int, size: int) -> tuple[int, int]:
    """The aligned file range [a0, a0 + length) that covers [offset, offset + size)."""
    a0 = offset // ALIGN * ALIGN
    return a0, -(-(offset + size - a0) // ALIGN) * ALIGN


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    backing = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = -backing.data_ptr() % ALIGN
    return backing[skip: skip + nbytes]


class _Reader:
    """Reads aligned ranges of one file: direct where possible, else (or after EINVAL) buffered."""

    def __init__(self, f: Path):
        self.f, self.fd, self.direct = f, None, DIRECT_IO

    def __enter__(self):
        self._open()
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)

    def _open(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self.fd = os.open(self.f, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        except OSError:
            if not self.direct:
                raise
            self.direct = False  # e.g. tmpfs: no O_DIRECT
            self._open()

    def read(self, buf: torch.Tensor, offset: int, size: int, key: str) -> torch.Tensor:
        """Bytes [offset, offset + size) of the file, as a view into `buf`."""
        a0, length = _span(offset, size)
        view, got, need = memoryview(buf.numpy())[:length], 0, offset + size - a0
        while got < need:
            try:
                os.lseek(self.fd, a0 + got, os.SEEK_SET)
                r = os.readv(self.fd, [view[got:]])
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = False  # the filesystem refuses direct reads after all
                self._open()
                continue
            if r == 0:  # the header said the file is longer: it shrank since it was validated
                raise CheckpointError(f"{self.f}: unexpected end of file in tensor {key!r}")
            got += r
        return buf[offset - a0: offset - a0 + size]


def _get(q: queue.Queue, stop: threading.Event):
    """q.get(), giving up once `stop` is set (the consumer stopped early, e.g. on an error)."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            pass
    return None


# ---------------------------------------------------------------- Meta's .pth
class PthSource:
    """Meta's original `.pth`: loaded lazily with mmap (no copy), keys mapped to hub names. Unpickled
    with weights_only=True: only tensors and plain containers, a crafted pickle cannot run code."""

    def __init__(self, file: Path):
        try:
            sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # includes the UnpicklingError of a pickle that wants to call something
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
            why = next((line for line in lines if "GLOBAL" in line), lines[0])  # torch's reason, in one line
            raise CheckpointError(f"{file} is not a readable torch checkpoint, loaded with weights_only=True "
                                  f"({type(e).__name__}: {why})") from e
        for wrapper in ("model", "teacher", "state_dict"):  # some Meta files nest the weights
            if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{file} holds a {type(sd).__name__}, not a state dict")
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
        self.file, self.sd = file, sd
        self.shapes = {k: tuple(v.shape) for mk, mt in sd.items() for k, v in meta_to_hub(mk, mt)}

    def file_of(self, key: str) -> str:
        return str(self.file)

    def stream(self):
        """(key, tensor) as views into the mmap, with SafetensorsSource.stream's contract: the caller
        copies what it keeps, so no view outlives the load. pop: drop our reference as we go."""
        for mk in list(self.sd):
            yield from meta_to_hub(mk, check_finite(self.sd.pop(mk), mk, self.file))


# ---------------------------------------------------------------- resolving a path
def guess_preset(name: str) -> str | None:
    for preset in sorted(PRESETS, key=len, reverse=True):  # "vits16plus" before "vits16"
        if preset != "tiny" and preset in name.replace("_", ""):
            return preset
    return None


def open_sharded(index: Path) -> SafetensorsSource:
    """model.safetensors.index.json -> its shards, checked against it key by key."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' of key -> shard file name")
    for key, name in weight_map.items():  # shards live beside the index: no paths, nothing outside
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{index}: key {key!r} points at {name!r}, not a shard file in the folder")
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.is_file():
            key = next(k for k, v in weight_map.items() if v == f.name)
            raise MissingFileError(f"{index} lists shard {f.name} (e.g. for key {key!r}), which is missing: {f}")
    source = SafetensorsSource(files)
    listed = {k.removeprefix("model."): index.parent / name for k, name in weight_map.items()}
    for key in sorted(set(listed) | set(source.where)):
        if key not in source.where:
            raise CheckpointError(f"{index} lists key {key!r} in {listed[key].name}, which does not hold it")
        if listed.get(key) != source.where[key][0]:
            raise CheckpointError(f"{source.where[key][0]}: key {key!r} is not where {index} says "
                                  f"({listed[key].name if key in listed else 'not listed'})")
    return source


def _open_weights(path: Path):
    """A folder, .safetensors or .pth path -> its SafetensorsSource or PthSource."""
    if path.is_dir():
        if (path / "model.safetensors.index.json").is_file():
            return open_sharded(path / "model.safetensors.index.json")
        if (path / "model.safetensors").is_file():
            return SafetensorsSource([path / "model.safetensors"])
        pths = sorted(path.glob("*.pth"))
        if len(pths) != 1:
            raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json "
                                    f"or single .pth file")
        return PthSource(pths[0])
    if path.suffix == ".safetensors":
        return SafetensorsSource([path])
    if path.suffix in (".pth", ".pt", ".bin"):
        return PthSource(path)
    raise CheckpointError(f"{path}: expected a checkpoint folder, a .safetensors or a .pth file")


def _config_of(config, config_file: Path, source) -> tuple[ViTConfig, dict]:
    """The model config: `config` if given (preset, dict or ViTConfig), else the folder's config.json,
    else a preset guessed from a Meta .pth's file name. -> (ViTConfig, its config.json-style dict)."""
    if config is None and not config_file.is_file() and isinstance(source, PthSource):
        config = guess_preset(source.file.name)
        if config is None:
            raise ValueError(f"{source.file}: a Meta .pth carries no config; pass config=<preset name> "
                             f"(one of {sorted(PRESETS)}) or a config.json-style dict")
    if config is not None:
        return resolve_config(config), (config if isinstance(config, dict) else resolve_config(config).to_dict())
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; pass config=<preset or dict>")
    config_dict = read_json(config_file)
    if config_dict.get("model_type", "dinov3_vit") != "dinov3_vit":
        raise CheckpointError(f"{config_file}: model_type {config_dict['model_type']!r} is not dinov3_vit")
    try:
        return ViTConfig.from_dict(config_dict), config_dict
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not a DINOv3 ViT config ({e})") from e


def open_checkpoint(path, config=None):
    """Find the weights and the config for `path`. Returns (source, ViTConfig, config.json-style dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no DINOv3 checkpoint at {path}. Download one (the repos are gated: accept the licence on "
            f"the hub first), e.g. `huggingface-cli download facebook/dinov3-vit7b16-pretrain-lvd1689m "
            f"--local-dir {path}`; see weights/README.md")
    folder = path if path.is_dir() else path.parent
    source = _open_weights(path)
    cfg, config_dict = _config_of(config, folder / "config.json", source)
    return source, cfg, config_dict
