"""Training checkpoints with orbax: the trained variables (adapters, or every weight for full
fine-tuning), the optimizer state (moments, step, accumulated gradients), random state, and a
JSON record of the step and data position.

Each checkpoint is written under a temporary name and renamed into place (`step_00000100`), so
an interrupted run leaves the last complete checkpoint intact; the `keep` newest are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from mistral_nnx.errors import MistralNNXError

_NAME = re.compile(r"step_(\d{8})")
META = "meta.json"
# 2: weights [out, in] (LoRA B of q/k/v as (r, H*E)). Checkpoints written before the layout
# switch carry no format and cannot be resumed: orbax refuses their shapes.
FORMAT = 2


def _saved_vars(state: Any, wrt: Any) -> dict[str, nnx.Variable[Any]]:
    """The variables of the (model, optimizer) state a checkpoint holds, by flat name."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        if path[0] == 1 or isinstance(var, wrt | nnx.RngState):
            out[".".join(map(str, path))] = var
    return out


def list_checkpoints(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and (p / META).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def save_checkpoint(
    directory: Path, step: int, state: Any, wrt: Any, meta: dict[str, Any], keep: int = 2
) -> Path:
    import orbax.checkpoint as ocp

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    arrays = {k: _to_array(v.get_value()) for k, v in _saved_vars(state, wrt).items()}
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "state", arrays)
            ckptr.wait_until_finished()
        (tmp / META).write_text(json.dumps({**meta, "step": step, "format": FORMAT}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        raise MistralNNXError(f"{final}: cannot write checkpoint ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(directory / f"step_{old:08d}", ignore_errors=True)
    return final


def restore_checkpoint(directory: Path, state: Any, wrt: Any) -> dict[str, Any]:
    """Load the newest checkpoint of `directory` into `state` (in place); returns its meta."""
    import orbax.checkpoint as ocp

    steps = list_checkpoints(directory)
    if not steps:
        raise MistralNNXError(f"{directory}: no checkpoint to resume from")
    path = directory / f"step_{steps[-1]:08d}"
    targets = _saved_vars(state, wrt)
    abstract = {k: _abstract(v.get_value()) for k, v in targets.items()}
    version = None
    try:
        meta: dict[str, Any] = json.loads((path / META).read_text())
        version = meta.get("format")
        if isinstance(version, int) and version > FORMAT:
            raise MistralNNXError(
                f"{path}: written by a newer mistral_nnx (checkpoint format {version}; this "
                f"version reads up to {FORMAT})"
            )
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / "state", abstract)
    except (OSError, ValueError, KeyError) as e:
        older = " or by mistral_nnx before checkpoint format 2" if version is None else ""
        raise MistralNNXError(
            f"{path}: cannot restore (written by a different setup{older}?): {str(e)[:200]}"
        ) from None
    for k, var in targets.items():
        old, value = var.get_value(), restored[k]
        if _is_key(old):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(old))
        var.set_value(value)
    return meta


def _is_key(x: Any) -> bool:
    return bool(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _to_array(x: Any) -> Any:
    """Random keys are saved as their raw uint32 data."""
    return jax.random.key_data(x) if _is_key(x) else x


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    raw = _to_array(x)
    return jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=getattr(raw, "sharding", None))
