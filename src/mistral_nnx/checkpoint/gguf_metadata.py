"""A GGUF file's header: key-value metadata and tensor infos, read without reading the tensors.

gguf-py's `GGUFReader` wraps each string of a vocabulary in its own numpy view, which takes
seconds for a 50k-token vocabulary; this reader walks the header once with `struct` (about 0.15 s
for SmolLM2's 49k tokens), and keeps the last file's header so that the config, the tokenizer and
the weights of one load share a single parse.

Layout (little-endian, GGUF v2 and v3): magic `GGUF`, u32 version, u64 tensor count, u64 pair
count, then pairs of (string key, u32 value type, value). A string is a u64 byte length and UTF-8
bytes; an array is a u32 element type, a u64 count and the elements. Then one info per tensor:
name, u32 number of dims, u64 dims (fastest-varying first), u32 ggml type, u64 data offset
relative to the data section, which starts at the next multiple of `general.alignment` (32).
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral_nnx.errors import MistralNNXError

__all__ = ["GGUFHeader", "GGUFTensorInfo", "read_gguf_header", "read_gguf_metadata"]

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# value type -> (struct format, numpy dtype) for the fixed-size types
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),  # bool
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}


_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        end = self.pos + length
        if end > len(self.data):
            raise _Truncated
        raw = self.data[self.pos : end]
        self.pos = end
        return bytes(raw).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings: the vocabulary and merges, ~100k of them, so the loop is kept tight
        (half the time of `string()` per item)."""
        data, pos, size = self.data, self.pos, len(self.data)
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (length,) = unpack(data, pos)
                pos += 8
                append(data[pos : pos + length].decode("utf-8", errors="replace"))
                pos += length
        except struct.error:
            raise _Truncated from None
        if pos > size:
            raise _Truncated
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        if kind not in _SCALARS:
            raise ValueError(f"unknown value type {kind}")
        value = self.take(_SCALARS[kind][0])
        return bool(value) if kind == 7 else value

    def array(self) -> Any:
        kind = self.take("<I")
        count = self.take("<Q")
        if kind == _STRING:
            return self.strings(count)
        if kind == _ARRAY:
            return [self.array() for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown array element type {kind}")
        dtype = np.dtype(_SCALARS[kind][1])
        end = self.pos + count * dtype.itemsize
        if end > len(self.data):
            raise _Truncated
        values = np.frombuffer(self.data, dtype, count, self.pos).copy()
        self.pos = end
        return values.astype(bool).tolist() if kind == 7 else values.tolist()


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # as the file lists them: fastest-varying first
    type: int  # ggml type number (GGMLQuantizationType)
    start: int  # absolute byte offset of the data in the file


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    size: int  # file size in bytes


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (arrays as lists)."""
    return read_gguf_header(path).metadata


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata and tensor infos of a GGUF file (parsed once while the file is unchanged;
    callers must not modify the result)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise MistralNNXError(f"{path}: cannot read: {err.strerror or err}") from None
    return _read_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, path)


@functools.lru_cache(maxsize=1)
def _read_cached(key: str, size: int, mtime_ns: int, path: Path) -> GGUFHeader:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data, path)
    except OSError as err:
        raise MistralNNXError(f"{path}: cannot read: {err.strerror or err}") from None
    except ValueError as err:  # mmap of an empty file
        raise MistralNNXError(f"{path}: not a valid GGUF file ({err})") from None


def _parse(data: mmap.mmap, path: Path) -> GGUFHeader:
    cursor = _Cursor(data)
    try:
        if bytes(data[:4]) != _MAGIC:
            raise MistralNNXError(f"{path}: not a GGUF file (no GGUF magic)")
        cursor.pos = 4
        version = cursor.take("<I")
        if version not in (2, 3):
            raise MistralNNXError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are; a very large "
                "number means a big-endian file)"
            )
        count = cursor.take("<Q")
        pairs = cursor.take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(pairs):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.take("<I"))
        infos = []
        for _ in range(count):
            name = cursor.string()
            ndims = cursor.take("<I")
            dims = tuple(cursor.take("<Q") for _ in range(ndims))
            infos.append((name, dims, cursor.take("<I"), cursor.take("<Q")))
        align = metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"bad general.alignment {align!r}")
        base = -(-cursor.pos // align) * align
        tensors = {n: GGUFTensorInfo(n, d, t, base + o) for n, d, t, o in infos}
        return GGUFHeader(metadata, tensors, len(data))
    except _Truncated:
        raise MistralNNXError(f"{path}: not a valid GGUF file or truncated") from None
    except ValueError as err:
        raise MistralNNXError(f"{path}: not a valid GGUF file ({err})") from None
