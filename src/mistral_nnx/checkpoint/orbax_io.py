"""This project's own checkpoint format: orbax arrays + a JSON marker holding the config.

Layout of a checkpoint directory:
    mistral_nnx.json   {"format": "mistral_nnx", "version": 2, "config": {...}}  (written last)
    state/             orbax StandardCheckpointer tree of the parameters
    (tokenizer files copied from the source, if any)
The whole directory is built under a hidden temporary name and renamed into place, so a crash or
Ctrl-C mid-write leaves nothing a later load could mistake for a checkpoint.

Version 2 stores the dense projections [out, in] as the model holds them (model.py); version 1
held them [in..., out...] and is transposed on restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx import cleanup
from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sharding import Sharder

MARKER = "mistral_nnx.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Tokenizer files a checkpoint may carry beside its weights (copied from the source).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tekken.json",
    "tokenizer.model",
)


def save_model(
    model: Mistral,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    extra_files: Iterable[Path] = (),
    write_extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write `model` to `path` atomically; `extra_files` (tokenizer files) are copied beside, and
    `write_extra(directory)` may write more files into the checkpoint before it is complete.

    With `overwrite`, only a checkpoint of this format is replaced, and only once the new one is
    complete. Leftovers of an earlier write to the same path that was killed are removed first.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise MistralNNXError(f"{path}: already exists (pass overwrite=True to replace it)")
    if path.exists():
        check_replaceable(path)
    import orbax.checkpoint as ocp  # imported on use: it costs ~0.1 s and ~20 MB

    _remove_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cleanup.track(tmp)
    try:
        tmp.mkdir(parents=True)
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # Uncompressed (StandardCheckpointer writes zstd): restoring SmolLM2 took 0.67x the
        # time (1.16 -> 0.78 s, benchmarks/RESULTS.md section 7), for files 1.6x larger on its
        # dequantised weights; random-like bf16/f32 weights shrank only ~12% compressed.
        handler = ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False)
        with ocp.AsyncCheckpointer(handler) as ckptr:
            ckptr.save(tmp / "state", args=ocp.args.PyTreeSave(_str_keys(state)))
            ckptr.wait_until_finished()
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        if write_extra is not None:
            write_extra(tmp)
        marker = {
            "format": "mistral_nnx",
            "version": FORMAT_VERSION,
            "config": model.config.to_dict(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MistralNNXError(f"{path}: cannot write checkpoint ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        cleanup.untrack(tmp)
    return path


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a directory holding a checkpoint of this format (marker readable)."""
    try:
        read_marker(path)
    except MistralNNXError:
        return False
    return True


def check_replaceable(path: Path) -> None:
    """Refuse to replace anything but a checkpoint of ours holding only what save_model writes."""
    if not path.is_dir() or not is_checkpoint(path):
        raise MistralNNXError(
            f"{path}: exists and is not a mistral_nnx checkpoint; refusing to overwrite it"
        )
    foreign = [
        p.name for p in path.iterdir() if not (p.name in (MARKER, "state") or is_tokenizer_file(p))
    ]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
        raise MistralNNXError(
            f"{path}: holds files that are not part of a checkpoint ({shown}); "
            "refusing to overwrite it"
        )


def is_tokenizer_file(path: Path) -> bool:
    return path.is_file() and (
        path.name in TOKENIZER_FILES or path.name.startswith("tokenizer.model.v")
    )


def _remove_leftovers(path: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` left by a killed write whose process is gone; an
    `.old-*` whose replacement never arrived is put back instead."""
    for leftover in sorted(path.parent.glob(f".{path.name}.*-*")):
        kind, _, rest = leftover.name[len(path.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or _process_alive(rest.split("-")[0]):
            continue
        if kind == "old" and not path.exists():
            leftover.rename(path)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid_text: str) -> bool:
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_marker(path: Path) -> MistralConfig:
    return _read_marker(path)[1]


def _read_marker(path: Path) -> tuple[int, MistralConfig]:
    """(format version, config)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        if not isinstance(marker, dict):
            raise ValueError
        if marker.get("format") != "mistral_nnx":
            raise ValueError
        version = marker.get("version")
        if version not in READABLE_VERSIONS:
            raise MistralNNXError(
                f"{path / MARKER}: format version {version} is not supported (this build "
                f"reads {', '.join(map(str, READABLE_VERSIONS))})"
            )
        return version, MistralConfig.from_dict(marker["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise MistralNNXError(f"{path / MARKER}: corrupt mistral_nnx checkpoint marker") from None


def load_orbax(path: Path, *, dtype: Any, param_dtype: Any, sharder: Sharder | None) -> Mistral:
    import orbax.checkpoint as ocp

    from mistral_nnx.checkpoint.loader import abstract_model, check_shardable, param_sharding

    path = path.absolute()  # orbax refuses relative paths
    version, config = _read_marker(path)
    model = abstract_model(config, dtype, param_dtype)
    check_shardable(model, sharder)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    target: dict[str, Any] = {}
    orders: dict[tuple[Any, ...], tuple[int, ...]] = {}
    for key, var in flat:
        shape = var.get_value().shape
        sharding = param_sharding(var, sharder, ".".join(map(str, key)))
        order = _v1_order(key, len(shape)) if version == 1 else None
        if order is not None:  # restored in the old layout, transposed below
            orders[key] = order
            shape, sharding = _permuted(shape, sharding, order)
        node = target
        for part in key[:-1]:
            node = node.setdefault(str(part), {})
        node[str(key[-1])] = jax.ShapeDtypeStruct(shape, np.dtype(param_dtype), sharding=sharding)
    try:
        with _stderr_kept_on_success(), ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / "state", target)
    except Exception as e:  # orbax raises many types for missing / damaged files
        raise MistralNNXError(
            f"{path}: cannot restore orbax state, the checkpoint is damaged "
            f"({type(e).__name__}: {_short(str(e))})"
        ) from None
    for key, var in flat:
        node = restored
        for part in key:
            node = node[str(part)]
        if key in orders:
            sharding = param_sharding(var, sharder, ".".join(map(str, key)))
            node = jax.jit(jnp.transpose, static_argnums=1, out_shardings=sharding)(
                node, orders[key]
            )
        var.set_value(node)
    return nnx.merge(graphdef, state)


def _v1_order(key: tuple[Any, ...], ndim: int) -> tuple[int, ...] | None:
    """Version 1 held the dense projections [in..., out...]: the axes of such an array that give
    this layout (new = old.transpose(order)); None for arrays stored as they are (embedding,
    norms, the stacked experts)."""
    if key[-1] in ("wq", "wk", "wv"):
        return (1, 2, 0)  # [d, n, e] -> [n, e, d]
    if key[-1] == "wo":
        return (2, 0, 1)  # [h, e, d] -> [d, h, e]
    if ndim == 2 and key != ("embed",):
        return (1, 0)  # lm_head, gate, up, down, the MoE router
    return None


def _permuted(
    shape: tuple[int, ...], sharding: Any, order: tuple[int, ...]
) -> tuple[tuple[int, ...], Any]:
    """The shape and sharding of the version-1 array that `order` turns into `shape`."""
    old_shape = [0] * len(shape)
    for new_axis, old_axis in enumerate(order):
        old_shape[old_axis] = shape[new_axis]
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
        old_spec: list[Any] = [None] * len(shape)
        for new_axis, old_axis in enumerate(order):
            old_spec[old_axis] = spec[new_axis]
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*old_spec))
    return tuple(old_shape), sharding


@contextlib.contextmanager
def _stderr_kept_on_success() -> Iterator[None]:
    """Hold what is written to file descriptor 2 meanwhile; pass it on unless an exception ends
    the block. On a damaged checkpoint, orbax's reader threads post to an event loop that is
    already closed, and each prints a traceback from native code (no Python hook sees it):
    the one-line error raised instead says what happened."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            time.sleep(0.2)  # let the threads that race to print do it into `held`
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def _short(text: str, limit: int = 160) -> str:
    """The first line of an error, cut to `limit` characters (TensorStore's errors quote whole
    JSON specs)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree
