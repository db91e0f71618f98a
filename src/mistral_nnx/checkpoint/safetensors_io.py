"""A streaming safetensors reader (one tensor mapped at a time) and a writer for zero-copy loads.

Each tensor comes as a read-only view of its own memory map of the file. A tensor the model can
use as it is (no layout change, no cast, 64-byte aligned: see `owned`) is kept as that view:
JAX's CPU backend adopts the page-cache pages without a copy, and the map lives as long as the
model's array. Any other tensor is copied (with the cast) straight from the page cache into the
model's buffer, and its map is released when the copy is done, so those pages leave this
process's resident set tensor by tensor. The header is validated up front, so a truncated or
corrupt file fails before anything is placed.

`save_safetensors` writes files laid out so that every tensor can be adopted: the data starts at
a 64-byte file offset, and the tensors whose sizes are multiples of 64 bytes come first.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
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
_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
# JAX's CPU backend adopts a numpy buffer without a copy only when its address is a multiple of
# this; a file map starts on a page boundary, so a mapped tensor's address mod 64 is its file
# offset mod 64.
ALIGN = 64


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


# Buffers this large get an anonymous map of their own instead of numpy's allocator. numpy opts
# every array of 4 MB and up into transparent huge pages; on VMs that hand free memory back to
# the host (virtio-balloon free page reporting, as on this project's CI machines) each fresh
# 2 MB page is then faulted in from the host on first touch, and copying a 705 MB checkpoint
# out of its file took 0.58-0.97 s against 0.26-0.30 s in 4 KB pages (2-core AMD EPYC VM,
# fresh processes after an idle pause). The system's own THP policy still applies.
_OWN_MAP_BYTES = 1 << 20


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = ALIGN) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary: JAX's CPU backend then
    adopts it without a copy (device_put / make_array_from_callback share its memory)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes >= _OWN_MAP_BYTES and align <= mmap.PAGESIZE:  # a map starts on a page
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return np.frombuffer(pages, np.uint8).view(dtype).reshape(shape)
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


_WORKERS = min(2, os.cpu_count() or 1)
_SPLIT_BYTES = 2 << 20  # smaller copies stay on one thread (a hand-off costs more)
_POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="mistral-nnx-relayout")


def in_halves(total: int, fn: Callable[[int, int], None], step: int = 128) -> None:
    """fn(start, stop) over [0, total) split in two (at a multiple of `step`), the halves run on
    two threads: numpy's copies and ufuncs release the GIL, and one core re-laying out a tensor
    is the loader's bottleneck on CPU."""
    half = (total // 2 + step - 1) // step * step
    if _WORKERS < 2 or total < 2 * step:
        fn(0, total)
        return
    other = _POOL.submit(fn, half, total)
    fn(0, half)
    other.result()


def owned(w: np.ndarray, dtype: np.dtype | None = None, mapped: bool = False) -> np.ndarray:
    """`w` in `dtype` as an array the model may keep: `w` itself, or an aligned copy (cast fused).

    `w` itself is kept when it is C-contiguous, 64-byte aligned and already in `dtype` (JAX then
    adopts it without a copy), and either writable (a buffer a reader filled) or, with `mapped`,
    a read-only view of a file map: the model then shares the file's page-cache pages (zero-copy
    loading). Without `mapped` a file map is always copied out, so the file may change later."""
    dtype = w.dtype if dtype is None else np.dtype(dtype)
    keepable = w.flags.writeable or mapped
    if keepable and w.flags.c_contiguous and w.dtype == dtype and is_aligned(w):
        return w
    out = aligned_empty(w.shape, dtype)
    if out.nbytes < _SPLIT_BYTES:  # also every 0-d array
        out[...] = w
    else:  # on two threads: a fresh buffer's page faults and the copy are the load's cost

        def rows(start: int, stop: int) -> None:
            out[start:stop] = w[start:stop]

        in_halves(w.shape[0], rows, step=1)
    return out


def is_aligned(w: np.ndarray, align: int = ALIGN) -> bool:
    return w.ctypes.data % align == 0


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in once, in the kernel


def map_bytes(path: Path, start: int, end: int) -> np.ndarray:
    """Bytes [start, end) of a file as a read-only uint8 view of a memory map of just that range
    (unmapped when the view and everything derived from it are gone)."""
    if end <= start:
        return np.zeros(0, np.uint8)
    page = mmap.ALLOCATIONGRANULARITY
    first = start - start % page
    with open(path, "rb") as f:
        data = mmap.mmap(
            f.fileno(),
            end - first,
            flags=mmap.MAP_SHARED | _POPULATE,
            prot=mmap.PROT_READ,
            offset=first,
        )
    return np.frombuffer(data, np.uint8, end - start, start - first)


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor as a read-only view of a memory map of its bytes."""
    try:
        raw = map_bytes(path, info.start, info.end)
    except (OSError, ValueError) as e:
        raise MistralNNXError(f"{path}: cannot read tensor '{info.name}' ({e})") from None
    return raw.view(info.dtype).reshape(info.shape)


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


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `tensors` as one .safetensors file that load_model can map without copying.

    The format's usual layout (8-byte little-endian header length, JSON header, the data with no
    holes), arranged for 64-byte alignment: the JSON is padded with trailing spaces (which the
    format allows) so that the data starts at a 64-byte file offset, and the tensors whose byte
    sizes are multiples of 64 come first, so that all of those start 64-byte aligned (the others
    follow, in the order given). The file is written under a temporary name in the same
    directory and renamed over `path` (atomic): a process that has the old file mapped keeps its
    pages, and an error midway leaves the old file as it was. Arrays need not be contiguous."""
    path = Path(path)
    arrays: dict[str, tuple[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise MistralNNXError(f"{path}: bad tensor name {name!r}")
        array = np.asarray(value)
        little = array.dtype.newbyteorder("<")  # the format is little-endian
        code = _CODES.get(little)
        if code is None:
            raise MistralNNXError(
                f"{path}: tensor '{name}' has dtype {array.dtype}, which safetensors cannot store "
                f"(supported: {', '.join(str(d) for d in _DTYPES.values())})"
            )
        # np.asarray, not np.ascontiguousarray: that one turns a 0-d array into shape [1]
        arrays[name] = (code, np.asarray(array, dtype=little, order="C"))
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MistralNNXError(f"{path}: safetensors metadata must map strings to strings")

    order = [n for n, (_, a) in arrays.items() if a.nbytes % ALIGN == 0]
    order += [n for n, (_, a) in arrays.items() if a.nbytes % ALIGN != 0]
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        code, array = arrays[name]
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data starts at a multiple of ALIGN

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # created as open() creates files (umask), unlike mkstemp
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in order:
                f.write(arrays[name][1].reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MistralNNXError(f"{path}: cannot write ({e.strerror or e})") from None
        raise
    return path
