"""A streaming safetensors reader: one tensor in host memory at a time, no mmap.

Reading with pread instead of mmap keeps the file's pages out of this process's resident set,
so peak host memory is the placed model plus one tensor. The header is validated up front, so a
truncated or corrupt file fails before anything is placed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from mistral_nnx.errors import MistralNNXError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> list[TensorInfo]:
    """Parse and check the header of one .safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise MistralNNXError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise MistralNNXError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MistralNNXError(f"{path}: corrupt safetensors header (not JSON)") from None
    except OSError as e:
        raise MistralNNXError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise MistralNNXError(f"{path}: corrupt safetensors header")
    base = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if isinstance(entry, dict) and entry.get("dtype") not in _DTYPES and "dtype" in entry:
            raise MistralNNXError(
                f"{path}: tensor '{name}' has dtype {entry['dtype']}, which is not supported "
                f"(supported: {', '.join(_DTYPES)})"
            )
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MistralNNXError(f"{path}: corrupt header entry for tensor '{name}'") from None
        if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or start < 0:
            raise MistralNNXError(
                f"{path}: tensor '{name}' has a size that disagrees with its shape and dtype"
            )
        if base + end > size:
            raise MistralNNXError(
                f"{path}: truncated file: tensor '{name}' ends at byte "
                f"{base + end} but the file has {size} bytes"
            )
        infos.append(TensorInfo(name, dtype, shape, base + start, base + end))
    return infos


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary: JAX's CPU backend then
    adopts it without a copy (device_put / make_array_from_callback share its memory)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """Read one tensor's bytes with pread into a fresh array."""
    out = aligned_empty(info.shape, info.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    try:
        done, total = 0, info.end - info.start
        while done < total:
            n = os.preadv(fd, [view[done:]], info.start + done)
            if n <= 0:
                raise MistralNNXError(f"{path}: truncated file while reading tensor '{info.name}'")
            done += n
    finally:
        os.close(fd)
    return out


def iter_safetensors(paths: list[Path]) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array, file) for every tensor of every file, one at a time; headers checked first."""
    headers = [(path, read_header(path)) for path in paths]
    for path, infos in headers:
        for info in infos:
            yield info.name, read_tensor(path, info), path


def shard_files(directory: Path, index_name: str, single_name: str) -> list[Path]:
    """The files of a checkpoint: a single file, or the shards listed in its index JSON."""
    index = directory / index_name
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise MistralNNXError(f"{index}: corrupt index (no 'weight_map')") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
        ):
            raise MistralNNXError(
                f"{index}: corrupt index ('weight_map' must map tensor names to shard file names)"
            )
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise MistralNNXError(f"{index}: lists shard '{f.name}' which is missing")
        return files
    return [directory / single_name]
