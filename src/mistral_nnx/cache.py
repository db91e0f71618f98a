"""KV cache: static, preallocated, batched; sliding-window layers keep a ring buffer of W slots.

Every slot remembers the absolute position it holds (-1 = empty), so the attention mask is built
from positions alone: ragged batches, padding, ring wrap-around and chunked prefill all follow.

Layout: keys [B, K, C, E] and values [B, K, E, C], each head's block contiguous, in the order the
two attention contractions read them (q.k over E, p.v over C). With the tokens' own order
[B, C, K, E], XLA:CPU copied the whole cache into these layouts in every layer at every decode
step: 5x the attention time at C = 1024 (benchmarks/RESULTS.md section 10).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    k: jax.Array  # [B, K, C, E]
    v: jax.Array  # [B, K, E, C]
    pos: jax.Array  # [B, C] int32, absolute position held by each slot, -1 = empty
    ring: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def can_write_before_read(self, num_new: int) -> bool:
        """Writing a chunk before attending is safe unless a ring buffer would overwrite keys
        that queries of the same chunk still need (only possible for chunks of 2+ tokens)."""
        return not self.ring or num_new == 1

    def slots(self, positions: jax.Array, valid: jax.Array) -> jax.Array:
        """Where each token of a chunk (positions, valid [B, T]) goes: position % C, or C (out
        of range: not written) for padding and, in a ring, for all but the newest C tokens. No
        two writes share a slot: duplicate scatter indices have no defined winner on GPU/TPU,
        and k, v and pos could each keep a different one."""
        c = self.capacity
        newest = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
        keep = valid & (positions > newest - c)
        if not self.ring:
            keep &= positions < c  # past the end: dropped, never wrapped onto older entries
        return jnp.where(keep, positions % c, c)

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> LayerKV:
        """Store the chunk's keys/values (k, v [B, T, K, E]) at `slots` (mode="drop" skips the
        out-of-range ones)."""
        b, t = positions.shape
        slot = self.slots(positions, valid)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        # Two index arrays around sliced axes: the indexed view is [B, T, K, E] for both.
        return LayerKV(
            k=self.k.at[rows, :, slot].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[rows, :, :, slot].set(v.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[rows, slot].set(positions.astype(jnp.int32), mode="drop"),
            ring=self.ring,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerKV, ...]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def layer_capacity(window: int | None, max_len: int) -> tuple[int, bool]:
    """(slots, is_ring). A window layer needs only W slots; full attention needs max_len."""
    if window is not None and window < max_len:
        return window, True
    return max_len, False


def init_cache(
    config: MistralConfig, batch: int, max_len: int, dtype: Any = jnp.float32, sharding: Any = None
) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions.

    `sharding`, if given, is a callable (shape, logical_axes) -> jax.sharding.Sharding.
    """
    if batch <= 0 or max_len <= 0:
        raise MistralNNXError(f"cache: batch ({batch}) and max_len ({max_len}) must be positive")
    layout = tuple(layer_capacity(window, max_len) for window in config.layer_windows)
    heads, e = config.num_kv_heads, config.head_dim
    if sharding is None:  # one program for all the layers' buffers, not three per layer
        return _empty_cache_jit(layout, batch, heads, e, jnp.dtype(dtype))
    return _empty_cache(layout, batch, heads, e, dtype, sharding)


def _empty_cache(
    layout: tuple[tuple[int, bool], ...],
    batch: int,
    heads: int,
    head_dim: int,
    dtype: Any,
    sharding: Any = None,
) -> KVCache:
    """The buffers of `init_cache`, each (with a sharding) made in place, per shard."""

    def filled(shape: tuple[int, ...], axes: tuple[str | None, ...], value: Any, kind: Any) -> Any:
        if sharding is None:
            return jnp.full(shape, value, kind)
        return jnp.full(shape, value, kind, device=sharding(shape, axes))

    layers = []
    for slots, ring in layout:
        k = filled(
            (batch, heads, slots, head_dim), ("batch", "kv_heads", None, "head_dim"), 0, dtype
        )
        v = filled(
            (batch, heads, head_dim, slots), ("batch", "kv_heads", "head_dim", None), 0, dtype
        )
        pos = filled((batch, slots), ("batch", None), -1, jnp.int32)
        layers.append(LayerKV(k, v, pos, ring))
    return KVCache(tuple(layers))


_empty_cache_jit = jax.jit(_empty_cache, static_argnums=(0, 1, 2, 3, 4))
