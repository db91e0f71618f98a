"""Self-attention of a chunk through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

The model's general attention (`model.attend`) builds its mask from arbitrary query/key
positions, which fits every call (ring caches, chunked prefill, decode) but always
materialises [B, H, T, S] float32 scores. A chunk that attends only to itself (a cache-less
forward, or the first prefill chunk into an empty cache) whose valid tokens form one run with
consecutive positions can say the same mask in the form cuDNN takes: `is_causal`, a left
window and per-row sequence lengths. Rows are rotated so the run starts at index 0 (left
padding becomes right padding); this is what makes both paths give the same result.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Literal

import jax
import jax.extend
import jax.numpy as jnp

from mistral_nnx.errors import MistralNNXError

__all__ = ["Path", "attend_self", "attention_path", "contiguous_rows"]

# Which attention a prefill chunk takes (decode and chunks after the first always take "xla"):
#   "cudnn":   jax.nn.dot_product_attention(implementation="cudnn") where the layout allows;
#   "dpa-xla": the same calls and masks with implementation="xla" (what the GPU computes, on any
#              backend: tests, A/B runs);
#   "xla":     the explicit-mask `model.attend` everywhere. On CPU it is as fast as "dpa-xla"
#              and compiles in about 60% of the time (no second branch per layer).
Path = Literal["cudnn", "dpa-xla", "xla"]
PATHS: tuple[Path, ...] = ("cudnn", "dpa-xla", "xla")

# Set to one of PATHS to override the choice (jax raises where "cudnn" cannot run).
ENV = "MISTRAL_NNX_ATTENTION"

# cuDNN flash attention takes fp16/bf16 only, head_dim a multiple of 8 up to 128 (256 on Hopper
# and later; 128 keeps every CUDA GPU on the same path).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


def attention_path(
    dtype: Any, head_dim: int, backend: str | None = None, *, sharded: bool = False
) -> Path:
    """The attention path of prefill chunks for compute `dtype` on `backend` (default: JAX's):
    "cudnn" on a CUDA GPU for fp16/bf16 with head_dim % 8 == 0 and <= 128, without a device
    mesh; else "xla" (float32 stays on the exact explicit mask; cuDNN's partitioner rejects q
    and kv heads sharded differently). The environment variable MISTRAL_NNX_ATTENTION
    overrides it."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise MistralNNXError(f"{ENV}={forced!r}: expected one of {', '.join(PATHS)}")
        return forced  # type: ignore[return-value]
    if (backend or jax.default_backend()) != "gpu" or sharded:
        return "xla"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return "xla"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return "xla"
    if "cuda" not in jax.extend.backend.get_backend("gpu").platform_version.lower():
        return "xla"  # ROCm: no cuDNN
    return "cudnn" if _cudnn_compiles(jnp.dtype(dtype).name, head_dim) else "xla"


@functools.cache
def _cudnn_compiles(dtype: str, head_dim: int) -> bool:
    """Whether this GPU's cuDNN builds the attention `attend_self` asks for (GQA, padding,
    causal, window), compiled once on tiny shapes: an old cuDNN then costs speed, not a crash."""
    q = jax.ShapeDtypeStruct((2, 16, 4, head_dim), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((2, 16, 2, head_dim), jnp.dtype(dtype))
    valid = jax.ShapeDtypeStruct((2, 16), jnp.bool_)
    offset = jax.ShapeDtypeStruct((2,), jnp.int32)
    probe = functools.partial(attend_self, window=4, implementation="cudnn")
    try:
        jax.jit(probe).lower(q, kv, kv, valid, offset).compile()
    except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
        warnings.warn(f"cuDNN attention unavailable, using XLA: {e}", stacklevel=2)
        return False
    return True


def contiguous_rows(positions: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ok, offset) for positions/valid [B, T]. ok (a scalar) is True when in every row the
    valid tokens form one run starting at index offset[b], with positions p0, p0 + 1, ... and
    p0 >= 0: then "key j visible from query i" depends only on the indices i - j, which is
    what `attend_self` assumes. Right and left padding both qualify; empty rows too."""
    t = valid.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    length = jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None]
    offset = jnp.argmax(valid, axis=1).astype(jnp.int32)[:, None]  # 0 for an empty row
    one_run = valid == ((idx >= offset) & (idx < offset + length))
    start = jnp.take_along_axis(positions, offset, axis=1)
    steady = ~valid | (positions == start + idx - offset)
    ok = jnp.all(one_run) & jnp.all(steady) & jnp.all((start >= 0) | (length == 0))
    return ok, offset[:, 0]


def attend_self(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    offset: jax.Array,
    window: int | None,
    implementation: Literal["cudnn", "xla"],
) -> jax.Array:
    """Causal (windowed) grouped-query self-attention of a chunk: q [B,T,H,E], k/v [B,T,K,E],
    valid [B,T], offset [B] from `contiguous_rows` (whose ok must hold). Equals
    `model.attend(q, k, v, pos, where(valid, pos, -1), window)` on the valid queries; padded
    queries give 0."""
    b, t = valid.shape
    if t % 2:
        # cuDNN's backward pass (training) takes even lengths only (jax checks T % 2 with a
        # bias, and it always passes a placeholder bias): one padded token more, cut off below.
        pad = lambda x: jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        out = attend_self(pad(q), pad(k), pad(v), pad(valid), offset, window, implementation)
        return out[:, :t]
    # Rotate each row left by its offset: the valid run then starts at index 0, the form
    # cuDNN's padding mask (index < length) takes.
    idx = (jnp.arange(t, dtype=jnp.int32)[None, :] + offset[:, None]) % t
    take = lambda x, i: jnp.take_along_axis(x, i[:, :, None, None], axis=1)  # noqa: E731
    length = jnp.sum(valid, axis=1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        take(q, idx),
        take(k, idx),
        take(v, idx),
        is_causal=True,
        # Query i sees key j when i - j < window, i.e. j >= i - (window - 1); no right window.
        local_window_size=None if window is None or window >= t else (window - 1, 0),
        # An empty row gets length 1 (a zero length is untested ground for cuDNN); its
        # output is discarded below with every other padded query's.
        query_seq_lengths=jnp.maximum(length, 1),
        key_value_seq_lengths=jnp.maximum(length, 1),
        implementation=implementation,
    )
    back = (jnp.arange(t, dtype=jnp.int32)[None, :] - offset[:, None]) % t
    return jnp.where(valid[:, :, None, None], take(out, back), 0).astype(q.dtype)
