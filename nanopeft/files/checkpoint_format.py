"""What a valid checkpoint file is, checked before anything reads it: the safetensors header, strict JSON,
finite values. checkpoint.py (weights) and save.py (adapters) open untrusted downloads through these;
and every file nanopeft writes (adapters, run state, logs) is written through atomic_write, so that no
reader, ours or anyone's, ever opens half of one.

    8 bytes   little-endian u64 n: the header length
    n bytes   UTF-8 JSON {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
    the rest  the tensors' bytes, tiled exactly: sorted by offset, each begins where the previous ended

Every rule safetensors' own validation applies is applied here first, in Python, with the file and the
tensor named: a damaged file never reaches a reader, so it ends in one CheckpointError, never in a crash,
a KeyError or half a model. Safetensors has no checksum: flipped bytes inside tensor data cannot be seen,
but NaN/inf values can (check_finite).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch


class CheckpointError(ValueError):
    """A checkpoint that is damaged or does not fit the model: the message names the file and the key."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (a shard an index lists) is not there. Also a FileNotFoundError."""


# ---------------------------------------------------------------- JSON we did not write
def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # json.loads would keep the last one silently
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, where, allow_nan: bool = True):
    """Strict JSON: UTF-8, no duplicate keys (and no NaN/Infinity unless allow_nan). Errors name `where`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from e
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested beyond the parser's stack
        raise CheckpointError(f"{where} is not valid JSON ({type(e).__name__}: {e})") from e


def read_json(path: Path, allow_nan: bool = True) -> dict:
    """A JSON object from a file, strictly (see parse_json)."""
    value = parse_json(Path(path).read_bytes(), path, allow_nan)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- safetensors headers, validated
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit: a larger "header" is a damaged length field
TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


class Header(NamedTuple):
    """A validated safetensors header: {key: {dtype, shape, data_offsets}} in file order, where the data
    begins (offsets count from there), and the optional string metadata."""
    tensors: dict
    start: int
    metadata: dict


def read_safetensors_header(f: Path) -> Header:
    """A safetensors file is: 8 bytes (little-endian u64) header length n, n bytes of UTF-8 JSON
    {key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensor bytes.
    Checks everything safetensors' own validation does, so no damaged file reaches a reader."""
    f = Path(f)
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else None
        if n is None or n == 0:
            raise CheckpointError(f"{f} is not a safetensors file ({size} bytes, no header)")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{f} is not a readable safetensors file (header length {n:,} but the file "
                                  f"has {size:,} bytes: truncated or damaged)")
        header = parse_json(fh.read(n), f"{f} (safetensors header)", allow_nan=False)
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{f}: __metadata__ must map strings to strings")
    for key, info in header.items():
        _check_tensor_entry(f, key, info)
    tensors = dict(sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])))
    data = size - 8 - n
    end, misplaced = 0, None  # the tensors must tile the data exactly: each begins where the previous ended
    for key, info in tensors.items():
        begin, stop = info["data_offsets"]
        if begin != end and misplaced is None:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            misplaced = f"{f}: tensor {key!r} at data offsets {[begin, stop]} {what}"
        end = max(end, stop)
    beyond = [k for k, i in tensors.items() if i["data_offsets"][1] > data]
    if beyond and misplaced is None:  # a good header, a short file: name the first tensor that is cut
        raise CheckpointError(f"{f} is truncated: the header needs {8 + n + end:,} bytes, the file has "
                              f"{size:,} (tensor {beyond[0]!r} is cut)")
    if beyond:
        raise CheckpointError(f"{f}: tensor {beyond[-1]!r} has data offsets "
                              f"{tensors[beyond[-1]]['data_offsets']} past the end of the data ({data:,} bytes)")
    if misplaced:
        raise CheckpointError(misplaced)
    if end < data:
        raise CheckpointError(f"{f} is damaged: {data - end:,} bytes after the last tensor")
    return Header(tensors, 8 + n, metadata)


def _check_tensor_entry(f: Path, key: str, info) -> None:
    """One header entry: exactly dtype, shape, data_offsets, each of the right type, sizes consistent."""
    if not isinstance(info, dict) or set(info) != TENSOR_FIELDS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{f}: tensor {key!r} has header fields {got}, expected {sorted(TENSOR_FIELDS)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise CheckpointError(f"{f}: tensor {key!r} has unsupported dtype {dtype!r} (one of {sorted(ST_DTYPES)})")

    def naturals(v):
        return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # type(): True is no int here

    if not naturals(shape):
        raise CheckpointError(f"{f}: tensor {key!r} has an invalid shape {shape!r}")
    if not naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"{f}: tensor {key!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{f}: tensor {key!r} has {offsets[1] - offsets[0]} bytes of data for "
                              f"{dtype} shape {shape} ({nbytes} bytes)")


def check_finite(t: torch.Tensor, key: str, file) -> torch.Tensor:
    """Refuse NaN/inf. One cheap pass (a sum, bandwidth-bound) for every tensor; a NaN or inf makes it
    non-finite. A sum of finite values can overflow too, so only then is the exact (slower) test run."""
    if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum()):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(f"{file}: tensor {key!r} holds {bad} NaN/inf value(s) of {t.numel()}")
    return t


def default_mode(path: Path) -> None:
    """Give a file we wrote the mode any new file gets here (0666 & ~umask): some writers (safetensors)
    create theirs 0600, which hides a run's weights from the group a shared folder is meant for."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(path: Path, write) -> None:
    """write(tmp), fsync, rename onto path, fsync the folder: a crash or power cut at any moment leaves
    the old file or the new one, never half of one (without the fsyncs the rename can reach the disk
    before the data does, and a power cut leaves an empty file under the good name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        default_mode(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic on POSIX: a reader sees the old file or the new one, never half
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is on disk
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
