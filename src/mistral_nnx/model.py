"""The Mistral network: pure math on arrays. No I/O, no sampling, no cache policy.

Shapes: B batch, T new tokens, S keys, D embed, H query heads, K kv heads, G = H // K,
E head_dim, M mlp, V vocab. Every parameter carries logical axis names (metadata
`logical_axes`) that sharding rules map onto a device mesh; head_dim is never sharded.

Projection weights are stored [out, in], the layout of HF, Mistral-native and GGUF files:
wq [H, E, D], wk / wv [K, E, D], wo [D, H, E], gate / up [M, D], down [D, M], lm_head [V, D]
(the mixture-of-experts stacks in moe.py keep [in, out]). Measured against [in, out] on an Intel
Xeon (benchmarks/layout.py, benchmarks/RESULTS.md section 7): a chain of the projections runs in
0.94-0.95x the time at batch 1 and ~0.85x at batch 8, and loading is a plain copy instead of a
transpose (0.32x the load time).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_nnx.attention import attend_self, attention_path, contiguous_rows
from mistral_nnx.cache import KVCache, LayerKV
from mistral_nnx.config import MistralConfig
from mistral_nnx.moe import MoE
from mistral_nnx.rope import apply_rope, llama4_query_scale, rope_parameters, rope_tables
from mistral_nnx.sharding import (
    Sharder,
    activation_sharding,
    active_sharder,
    constrain,
    sharded_activations,
)

__all__ = ["Mistral", "apply_rope", "attend", "attend_chunk", "rope_tables"]

Dtype = Any

# attend_filled reads prefixes of at least this many slots (smaller caches are read whole).
PREFIX_MIN = 256


def _param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Dtype, fan_in: int
) -> nnx.Param:
    if rngs is None:  # abstract: shapes only, filled in later by a checkpoint loader
        return nnx.Param(jax.ShapeDtypeStruct(shape, dtype), logical_axes=axes)
    value = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] times a weight w [out, in]: x @ w.T as one dot_general (which qwix's LoRA
    intercepts, like jnp.dot; a transposed view of the weight it could not trace back).

    x is flattened to 2-D first: the gradient of a weight (or of a LoRA B) then contracts one
    token dimension, not [batch, tokens]; with two, XLA:CPU transposed each [B, T, out]
    gradient in a strided copy fusion, 8 ms per MLP matrix (LoRA train step on SmolLM2, 2 x 128
    tokens: 2.6 -> 1.2 s)."""
    flat = x.reshape(-1, x.shape[-1])
    out = jax.lax.dot_general(flat, w, (((1,), (1,)), ((), ())))
    return out.reshape(*x.shape[:-1], w.shape[0])


def weight_times(w: jax.Array, x_t: jax.Array, out_dtype: Any = None) -> jax.Array:
    """w [out, in] @ x_t [in, rows]: linear() for rows laid out as columns, the weight the
    first operand (DecoderLayer: weight_first)."""
    return jax.lax.dot_general(w, x_t, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)


def few_rows(rows: int) -> bool:
    """Whether `rows` tokens in all are few enough for weight-first products (at 64 rows they
    gain little, at 128 they lose; RESULTS section 18); one row is XLA's GEMV either way."""
    return 2 <= rows <= 32


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: Dtype, rngs: nnx.Rngs | None) -> None:
        self.eps = eps
        value: Any = jax.ShapeDtypeStruct((dim,), param_dtype)
        if rngs is not None:
            # Ones + small noise: a random model must not be degenerate, and norms must matter.
            noise = 0.1 * jax.random.normal(rngs.params(), (dim,), jnp.float32)
            value = (1.0 + noise).astype(param_dtype)
        self.weight = nnx.Param(value, logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # the statistics always in float32, as in HF
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


class Attention(nnx.Module):
    def __init__(
        self,
        config: MistralConfig,
        window: int | None,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs | None,
    ) -> None:
        d, h, k, e = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.wq = _param(rngs, (h, e, d), ("q_heads", "head_dim", "embed"), param_dtype, d)
        self.wk = _param(rngs, (k, e, d), ("kv_heads", "head_dim", "embed"), param_dtype, d)
        self.wv = _param(rngs, (k, e, d), ("kv_heads", "head_dim", "embed"), param_dtype, d)
        self.wo = _param(rngs, (d, h, e), ("embed", "q_heads", "head_dim"), param_dtype, h * e)
        self.head_dim = e
        self.window = window
        self.dtype = dtype
        # Ministral 3: queries scaled after RoPE by their absolute position (None: no scaling).
        self.llama4: tuple[float, int] | None = None
        if config.llama4_scaling_beta is not None:
            assert config.llama4_scaling_original_max is not None  # checked by the config
            self.llama4 = (config.llama4_scaling_beta, config.llama4_scaling_original_max)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: LayerKV | None,
        empty_cache: bool = False,
        out_proj: bool = True,
    ) -> tuple[jax.Array, LayerKV | None]:
        """-> (output [B, T, D], cache); with out_proj=False the heads before the output
        projection, [B, T, H*E] (the caller projects them: DecoderLayer, weight_first)."""
        dt = self.dtype
        b, t, d = x.shape

        def project(w: jax.Array) -> jax.Array:  # [n, e, d] used as [n*e, d]
            return linear(x, w.astype(dt).reshape(-1, d)).reshape(b, t, -1, self.head_dim)

        # 2-D contractions: an einsum with the weight's (n, e) as output axes makes XLA:CPU
        # transpose the weight in every layer at every step.
        q, k, v = project(self.wq[...]), project(self.wk[...]), project(self.wv[...])
        q = apply_rope(q, cos, sin)
        if self.llama4 is not None:
            q = q * llama4_query_scale(positions, *self.llama4).astype(dt)
        q = constrain(q, ("batch", None, "q_heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", None, "kv_heads", "head_dim"))
        v = constrain(v, ("batch", None, "kv_heads", "head_dim"))

        new_pos = jnp.where(valid, positions, -1)  # padding is never a key
        window = self.window
        # `general` attends with the explicit mask over whatever keys this call sees. attend_chunk
        # may instead attend the chunk to itself alone (k_self, v_self) where that is the same:
        # always without a cache, and when the cache was empty (a first prefill chunk).
        general: Callable[[], jax.Array]
        k_self, v_self, alone = k, v, None
        if cache is None:
            general = functools.partial(attend, q, k, v, positions, new_pos, window)
        elif cache.can_write_before_read(x.shape[1]):
            # Decode (or a full-attention layer): writing first overwrites nothing still needed.
            alone = jnp.all(cache.pos < 0) & jnp.all(~valid | (positions < cache.capacity))
            k_self, v_self = (  # as attend_filled reads them back from the cache
                k.astype(cache.k.dtype).astype(dt),
                v.astype(cache.v.dtype).astype(dt),
            )
            cache = cache.write(k, v, positions, valid)
            general = functools.partial(attend_filled, q, cache, positions, window, dt)
        else:
            # A ring buffer taking a multi-token chunk: attend over the old entries plus the
            # chunk, then keep the newest entries.
            alone = jnp.all(cache.pos < 0)
            k_heads, v_heads = cache_layout(k, v)
            keys = jnp.concatenate([cache.k.astype(dt), k_heads], axis=2)
            values = jnp.concatenate([cache.v.astype(dt), v_heads], axis=3)
            key_pos = jnp.concatenate([cache.pos, new_pos], axis=1)
            cache = cache.write(k, v, positions, valid)
            general = functools.partial(attend_kv, q, keys, values, positions, key_pos, window)
        if cache is not None and empty_cache:
            # The caller knows the cache was empty (a first prefill chunk): the chunk's own keys
            # are all there is, so attend over those T instead of the S >= T cache slots.
            alone = jnp.bool_(True)
            general = functools.partial(attend, q, k_self, v_self, positions, new_pos, window)
        out = attend_chunk(q, k_self, v_self, positions, valid, window, general, alone)

        # Likewise one 2-D contraction over (heads x head_dim), wo [D, H, E] read as [D, H*E].
        h, e = out.shape[2:]
        out = out.reshape(b, t, h * e)
        if not out_proj:
            return out, cache
        return linear(out, self.wo[...].astype(dt).reshape(d, h * e)), cache

    def project_transposed(self, heads_t: jax.Array) -> jax.Array:
        """The output projection of heads laid out as columns: [H*E, rows] -> [D, rows]."""
        wo = self.wo[...].astype(self.dtype)
        return weight_times(wo.reshape(wo.shape[0], -1), heads_t)


def attend_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    window: int | None,
    general: Callable[[], jax.Array],
    alone: jax.Array | None = None,
) -> jax.Array:
    """Attention of a chunk: q [B,T,H,E] with its own keys k/v [B,T,K,E]. On the "cudnn" path
    (see attention.attention_path) a chunk that sees only itself (`alone`, default True) with
    contiguous rows goes through jax.nn.dot_product_attention (cuDNN flash attention), chosen on
    the device (lax.cond: nothing recompiles); everything else calls `general()`, the
    explicit-mask attention. A single token (decode) always takes `general`."""
    path = attention_path(q.dtype, q.shape[-1], sharded=sharded_activations())
    if path == "xla" or q.shape[1] == 1:
        return general()
    kernel: Literal["cudnn", "xla"] = "cudnn" if path == "cudnn" else "xla"
    ok, offset = contiguous_rows(positions, valid)
    if alone is not None:
        ok &= alone
    # Under autodiff a cond keeps the residuals of both branches (the one not taken filled with
    # zeros): the explicit mask's would be two [B, H, T, T] float32 arrays per layer, ~70 GB
    # for Mistral-7B at 8 x 1024. Checkpointed, that branch keeps only its inputs and is
    # recomputed in the backward pass on the rare steps that take it.
    return jax.lax.cond(
        ok, lambda: attend_self(q, k, v, valid, offset, window, kernel), jax.checkpoint(general)
    )


def attend_filled(
    q: jax.Array, cache: LayerKV, q_pos: jax.Array, window: int | None, dtype: Dtype
) -> jax.Array:
    """Attention over a cache the new keys are already in. A long full-attention buffer is read
    only up to a prefix covering every filled slot (slot = position < max query position + 1):
    the prefix size is chosen on the device among a few static sizes, so nothing recompiles as
    the sequence grows."""
    c = cache.capacity
    sizes = [n for n in (c // 8, c // 4, c // 2) if n >= PREFIX_MIN] + [c]

    def read(n: int) -> Callable[[], jax.Array]:
        def branch() -> jax.Array:
            # Sliced inside the branch: slices taken outside would be switch operands, every
            # size materialised as a copy of the cache in every layer at every step.
            k, v, pos = cache.k[:, :, :n], cache.v[..., :n], cache.pos[:, :n]
            return attend_kv(q, k.astype(dtype), v.astype(dtype), q_pos, pos, window)

        return branch

    if cache.ring or len(sizes) == 1:
        return read(c)()
    reach = jnp.max(q_pos) + 1
    branch = jnp.sum(reach > jnp.asarray(sizes[:-1]))  # the first size that holds `reach`
    return jax.lax.switch(branch, [read(n) for n in sizes])


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys/values [B,T,K,E] in the KV cache's layout: k [B,K,T,E], v [B,K,E,T]."""
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, window: int | None
) -> jax.Array:
    """Grouped-query attention. q [B,T,H,E], k/v [B,S,K,E], q_pos [B,T], k_pos [B,S] (-1 = empty).

    Query at position i sees key j when 0 <= j <= i and (no window or i - j < window).
    """
    return attend_kv(q, *cache_layout(k, v), q_pos, k_pos, window)


def attend_kv(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, window: int | None
) -> jax.Array:
    """`attend` with keys and values in the KV cache's layout: k [B,K,S,E], v [B,K,E,S]."""
    b, t, h, e = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    grouped = q.reshape(b, t, kv_heads, g, e)
    per_head = (((3,), (3,)), ((0, 1), (0, 1)))  # contract the last axes, batch over (B, K)
    if t == 1:
        scores = jnp.einsum("btkge,bkse->bkgts", grouped, k, preferred_element_type=jnp.float32)
    else:
        # Queries as [B, K, G*T, E] so the scores come out [B, K, G*T, S], the order the mask
        # and softmax read. From the einsum above XLA:CPU computes them as [S, G*T] and then
        # transposes them: 2-3x the attention time of a long prefill chunk (RESULTS section 10).
        rows = grouped.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, e)
        scores = jax.lax.dot_general(rows, k, per_head, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv_heads, g, t, -1)
    scores = scores / jnp.sqrt(jnp.float32(e))
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= qp - kp < window
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if t == 1:
        return jnp.einsum("bkgts,bkes->btkge", probs, v).reshape(b, t, h, e)
    out = jax.lax.dot_general(probs.reshape(b, kv_heads, g * t, -1), v, per_head)  # [B,K,G*T,E]
    return out.reshape(b, kv_heads, g, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


class MLP(nnx.Module):
    def __init__(
        self, config: MistralConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs | None
    ) -> None:
        d, m = config.hidden_size, config.intermediate_size
        self.gate = _param(rngs, (m, d), ("mlp", "embed"), param_dtype, d)
        self.up = _param(rngs, (m, d), ("mlp", "embed"), param_dtype, d)
        self.down = _param(rngs, (d, m), ("embed", "mlp"), param_dtype, m)
        self.dtype = dtype

    def transposed(self, x_t: jax.Array) -> jax.Array:
        """The MLP of a few rows laid out as columns: x_t [embed, rows] -> [embed, rows], each
        weight the first operand (see DecoderLayer: weight_first)."""
        dt = self.dtype
        gate_t = weight_times(self.gate[...].astype(dt), x_t)
        hidden_t = jax.nn.silu(gate_t) * weight_times(self.up[...].astype(dt), x_t)
        return weight_times(self.down[...].astype(dt), hidden_t)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = linear(x, self.gate[...].astype(dt))
        up = linear(x, self.up[...].astype(dt))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", None, "mlp"))
        return linear(hidden, self.down[...].astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(
        self,
        config: MistralConfig,
        window: int | None,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs | None,
    ) -> None:
        eps = config.rms_norm_eps
        self.attn_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(config, window, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp: MLP | MoE
        if config.is_moe:
            self.mlp = MoE(
                config.hidden_size,
                config.intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: LayerKV | None,
        empty_cache: bool = False,
        weight_first: bool = False,
    ) -> tuple[jax.Array, LayerKV | None]:
        """`weight_first` (static; the engine's unsharded CPU programs of a plain model): with a
        few rows (2-32 tokens in all) the attention's output projection and the MLP run on them
        as columns, each weight the first operand of its product. XLA:CPU's YNNPACK packs a
        dot's second operand on every call: the weight as x @ W.T, a few columns as W @ x.T.
        SmolLM2's projections at 8 rows: 0.49-0.70x the time; its decode step at batch 8:
        0.77x (RESULTS section 18). The residual is added with the columns still as columns: a
        transpose right after the dot is folded back into it by XLA. q, k and v keep x @ W.T
        (their outputs go on to RoPE and the cache as rows)."""
        normed = self.attn_norm(x)
        rows = math.prod(x.shape[:-1])
        if not (weight_first and few_rows(rows)):
            attn_out, cache = self.attn(normed, positions, valid, cos, sin, cache, empty_cache)
            x = x + attn_out
            x = x + self.mlp(self.mlp_norm(x))
            return constrain(x, ("batch", None, "embed")), cache
        heads, cache = self.attn(normed, positions, valid, cos, sin, cache, empty_cache, False)
        x_t = x.reshape(rows, -1).T + self.attn.project_transposed(heads.reshape(rows, -1).T)
        x = x_t.T.reshape(x.shape)
        if isinstance(self.mlp, MLP):
            x_t = x_t + self.mlp.transposed(self.mlp_norm(x).reshape(rows, -1).T)
            return x_t.T.reshape(x.shape), cache
        return x + self.mlp(self.mlp_norm(x)), cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "empty_cache", "sharder", "attention_path", "weight_first"),
)
def _layer_program(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    cache: LayerKV,
    empty_cache: bool,
    sharder: Sharder | None,
    attention_path: str,
    weight_first: bool = False,
) -> tuple[jax.Array, LayerKV | None]:
    """One decoder layer with a cache, as a function of its own inside the engine's programs.

    jax traces it once per distinct layer (same graphdef, shapes and static arguments) and
    lowers it once; XLA inlines the calls, so the compiled program is the same as with the
    layers written out. For SmolLM2's 30 layers that makes tracing + lowering the prefill
    1.2 -> 0.2 s and the decode loop 1.2 -> 0.4 s, in every process, cache hit or not
    (benchmarks/RESULTS.md section 13). Whatever else the trace reads is in the key: the
    sharder (also in the context) and the attention path the layer takes (an environment
    variable can force it), so a trace is never reused where it would differ. qwix's LoRA
    interception still sees every op: it is active while the layer is traced, and the adapters
    are in the layer's graphdef and state.
    """
    del attention_path  # only a key: attend_chunk chooses the same path again
    with activation_sharding(sharder):
        layer = nnx.merge(graphdef, state)
        return layer(x, positions, valid, cos, sin, cache, empty_cache, weight_first)


def _weight_first(variables: Iterable[nnx.Variable[Any]], sharder: Sharder | None) -> bool:
    """Whether products with these weights may be weight-first (DecoderLayer: weight_first):
    on CPU (a YNNPACK matter), unsharded, and only plain float weights. qwix's LoRA and QLoRA
    recognise a weight as a dot's second operand, so adapted or quantised ones keep x @ W.T."""
    if sharder is not None or jax.default_backend() != "cpu":
        return False
    return all(type(v) is nnx.Param and isinstance(v.get_value(), jax.Array) for v in variables)


@nnx.remat
def _remat_layer(
    layer: DecoderLayer,
    x: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
) -> tuple[jax.Array, LayerKV | None]:
    """A decoder layer whose activations are recomputed in the backward pass (training)."""
    return layer(x, positions, valid, cos, sin, None)


class Mistral(nnx.Module):
    """Decoder-only transformer. `model(tokens)` -> float32 logits [B, T, vocab]."""

    def __init__(
        self,
        config: MistralConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
        abstract: bool = False,
    ) -> None:
        """Random weights from `rngs` (default seed 0), or with `abstract=True` parameters that
        hold only shapes and dtypes (jax.ShapeDtypeStruct), for a loader to fill: instant, and
        no memory, even for a 24B model."""
        rngs = None if abstract else (rngs if rngs is not None else nnx.Rngs(0))
        self.config = config
        self.dtype = dtype
        self.sharder: Sharder | None = None  # set by load_model(mesh=...); used by the engine
        # "layer": recompute each decoder layer in the backward pass (nnx.remat); set by train.
        self.remat: str | None = None
        d = config.hidden_size
        self.embed = _param(rngs, (config.vocab_size, d), ("vocab", "embed"), param_dtype, 1)
        self.layers = nnx.List(
            [
                DecoderLayer(config, w, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for w in config.layer_windows
            ]
        )
        self.norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.vocab_size, d), ("vocab", "embed"), param_dtype, d)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, valid: jax.Array | None = None
    ) -> jax.Array:
        """tokens [B, T] int32; positions [B, T] (default 0..T-1); valid [B, T] bool padding mask
        (default all True). Returns float32 logits [B, T, vocab]."""
        logits, _ = self.forward(tokens, positions, valid)
        return logits

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        cache: KVCache | None = None,
        logit_index: jax.Array | None = None,
        empty_cache: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """The full call. With `cache`, keys/values of earlier tokens come from it and the new
        ones are written into it. With `logit_index` [B], only the logits of that position of
        each row are computed: [B, vocab]. `empty_cache` (static): the caller promises the
        cache holds nothing yet (a first prefill chunk), so attention reads only the new keys."""
        # float32 compute means float32 matmuls: GPUs otherwise use TF32 for them by default.
        exact = jnp.dtype(self.dtype) == jnp.float32
        with jax.default_matmul_precision("highest") if exact else contextlib.nullcontext():
            return self._forward(tokens, positions, valid, cache, logit_index, empty_cache)

    def _forward(
        self,
        tokens: jax.Array,
        positions: jax.Array | None,
        valid: jax.Array | None,
        cache: KVCache | None,
        logit_index: jax.Array | None,
        empty_cache: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if valid is None:
            valid = jnp.ones((b, t), dtype=bool)
        cos, sin = rope_tables(positions, *rope_parameters(self.config))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", None, "embed"))
        new_layers = []
        sharder = active_sharder()
        if cache is not None:
            sharded = sharder is not None
            attention = attention_path(self.dtype, self.config.head_dim, sharded=sharded)
        for i, layer in enumerate(self.layers):
            if self.remat == "layer" and cache is None:
                x, layer_cache = _remat_layer(layer, x, positions, valid, cos, sin)
            elif cache is not None:  # the engine's programs (see _layer_program)
                graphdef, state = nnx.split(layer)
                x, layer_cache = _layer_program(
                    graphdef,
                    state,
                    x,
                    positions,
                    valid,
                    cos,
                    sin,
                    cache.layers[i],
                    empty_cache=empty_cache,
                    sharder=sharder,
                    attention_path=attention,
                    weight_first=_weight_first((v for _, v in nnx.to_flat_state(state)), sharder),
                )
            else:
                x, layer_cache = layer(x, positions, valid, cos, sin, None, empty_cache)
            new_layers.append(layer_cache)
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        x = self.norm(x)
        # Either head is [vocab, embed]: contract over its last axis rather than matmul with its
        # transpose, which XLA:CPU turns into a loop fusion 1.5x slower at batch 1
        # (benchmarks/RESULTS.md section 10).
        head = self.embed if self.config.tie_word_embeddings else self.lm_head
        rows = math.prod(x.shape[:-1])
        if cache is not None and few_rows(rows) and _weight_first([head], sharder):
            # Weight-first as in DecoderLayer (SmolLM2's head at 8 rows: 0.62x the time). The
            # barrier keeps XLA from folding the transpose back into the product.
            x_t = x.reshape(rows, -1).T
            logits_t = weight_times(head[...].astype(self.dtype), x_t, jnp.float32)
            logits = jax.lax.optimization_barrier(logits_t).T.reshape(*x.shape[:-1], -1)
        else:
            logits = jnp.einsum(
                "...d,vd->...v", x, head[...].astype(self.dtype), preferred_element_type=jnp.float32
            )
        new_cache = None if cache is None else KVCache(tuple(new_layers))  # type: ignore[arg-type]
        return logits, new_cache
