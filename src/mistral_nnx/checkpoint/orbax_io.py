"""This project's own checkpoint format: orbax arrays + a JSON marker holding the config.

Layout of a checkpoint directory:
    mistral_nnx.json   {"format": "mistral_nnx", "version": 1, "config": {...}}  (written last)
    state/             orbax StandardCheckpointer tree of the parameters
    (tokenizer files copied from the source, if any)
The whole directory is built under a hidden temporary name and renamed into place, so a crash or
Ctrl-C mid-write leaves nothing a later load could mistake for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sharding import Sharder

MARKER = "mistral_nnx.json"
FORMAT_VERSION = 1


def save_model(
    model: Mistral,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    extra_files: Iterable[Path] = (),
) -> Path:
    """Write `model` to `path` atomically; `extra_files` (tokenizer files) are copied beside."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise MistralNNXError(f"{path}: already exists (pass overwrite=True to replace it)")
    import orbax.checkpoint as ocp  # imported on use: it costs ~0.1 s and ~20 MB

    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "state", _str_keys(state))
            ckptr.wait_until_finished()
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        marker = {
            "format": "mistral_nnx",
            "version": FORMAT_VERSION,
            "config": model.config.to_dict(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
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
    return path


def read_marker(path: Path) -> MistralConfig:
    try:
        marker = json.loads((path / MARKER).read_text())
        if marker.get("format") != "mistral_nnx":
            raise ValueError
        if marker.get("version") != FORMAT_VERSION:
            raise MistralNNXError(
                f"{path / MARKER}: format version {marker.get('version')} is "
                f"not supported (this build reads {FORMAT_VERSION})"
            )
        return MistralConfig.from_dict(marker["config"])
    except (ValueError, KeyError, TypeError):
        raise MistralNNXError(f"{path / MARKER}: corrupt mistral_nnx checkpoint marker") from None


def load_orbax(path: Path, *, dtype: Any, param_dtype: Any, sharder: Sharder | None) -> Mistral:
    import orbax.checkpoint as ocp

    from mistral_nnx.checkpoint.loader import abstract_model, check_shardable, param_sharding

    config = read_marker(path)
    model = abstract_model(config, dtype, param_dtype)
    check_shardable(model, sharder)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    target: dict[str, Any] = {}
    for key, var in flat:
        sds = var.get_value()
        sharding = param_sharding(var, sharder, ".".join(map(str, key)))
        node = target
        for part in key[:-1]:
            node = node.setdefault(str(part), {})
        node[str(key[-1])] = jax.ShapeDtypeStruct(
            sds.shape, np.dtype(param_dtype), sharding=sharding
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / "state", target)
    except Exception as e:  # orbax raises many types for missing / damaged files
        raise MistralNNXError(
            f"{path}: cannot restore orbax state ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    for key, var in flat:
        node = restored
        for part in key:
            node = node[str(part)]
        var.set_value(node)
    return nnx.merge(graphdef, state)


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree
