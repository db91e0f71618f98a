"""Mixtral's sparse mixture of experts: a router and E SwiGLU experts with stacked weights.

Router exactly as transformers' Mixtral: logits in float32, softmax over all experts, top-k,
the k weights renormalised to sum to 1, output = sum of the chosen experts' outputs times their
weights. No capacity limit and no token dropping: a token's output never depends on the other
tokens of the batch.

Two compute paths, chosen by the number of tokens N (measured: benchmarks/moe.py, RESULTS.md):
- few tokens (N * k at most E / 2, e.g. a batch-1 or batch-2 decode step): gather the chosen
  experts' weights and multiply, so a batch-1 step reads k/E of the expert bytes (1.56x faster
  than dense at N=1, 1.10x at N=2; at N=4 the gathered copies cost more than they save: 0.60x);
- more tokens (prefill, batched decode): every expert over every token, in chunks of tokens,
  then the weighted combine: 1.78x faster on CPU than sorting the tokens by expert for
  `jax.lax.ragged_dot`, which XLA lowers to masked dense compute off TPU (and by default on GPU).

LoRA (train/lora.py `apply_lora`) adds per-expert adapters here with `add_lora`: for a stacked
weight W [E, in, out], A [E, in, r] and B [E, r, out], expert e computing x @ (W_e + s * A_e @ B_e).
They are written by hand rather than left to qwix, which adapts the attention projections: qwix's
einsum LoRA over W [E, in, out] would make one A [in, r] shared by all experts (not per-expert
adapters as PEFT's), and it refuses the dense path's three-operand combine einsum. Without
adapters both paths trace to the same program as before adapters existed (same jaxpr).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_nnx.sharding import constrain

Dtype = Any
# Tokens per chunk of the dense path: bounds the [chunk, E, M] intermediate.
DENSE_CHUNK = 256
LORA_KINDS = ("gate", "up", "down")


def _param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Dtype, fan_in: int
) -> nnx.Param:
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, dtype), logical_axes=axes)
    value = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class MoE(nnx.Module):
    """router [E, D] ([out, in], as the dense projections); gate, up [E, D, M]; down [E, M, D]
    (stacked experts kept [in, out]: their einsums are laid out for it)."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs | None,
    ) -> None:
        d, m, e = hidden, intermediate, num_experts
        self.router = _param(rngs, (e, d), ("expert", "embed"), param_dtype, d)
        self.gate = _param(rngs, (e, d, m), ("expert", "embed", "mlp"), param_dtype, d)
        self.up = _param(rngs, (e, d, m), ("expert", "embed", "mlp"), param_dtype, d)
        self.down = _param(rngs, (e, m, d), ("expert", "mlp", "embed"), param_dtype, m)
        self.num_experts, self.top_k = e, top_k
        self.dtype = dtype
        # LoRA (add_lora): the adapted weights, alpha / r, dropout rate on the adapters' input
        self.lora_kinds: tuple[str, ...] = ()
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0

    def add_lora(self, kind: str, a: Any, b: Any, scaling: float, dropout: float) -> None:
        """Per-expert adapters on the stacked weight `kind` (gate, up or down): `a` [E, in, r],
        `b` [E, r, out] (float32 arrays, or jax.ShapeDtypeStruct for an abstract model). Dropout
        applies to the adapters' input only while the model holds dropout random state
        (`qwix_rngs`, which train/lora.py sets on every module of a LoRA model)."""
        setattr(self, f"{kind}_lora_a", nnx.LoRAParam(a))
        setattr(self, f"{kind}_lora_b", nnx.LoRAParam(b))
        self.lora_kinds = (*self.lora_kinds, kind)
        self.lora_scaling, self.lora_dropout = scaling, dropout

    def _dropout_key(self) -> jax.Array | None:
        rngs = getattr(self, "qwix_rngs", None)
        if self.lora_kinds and self.lora_dropout > 0 and isinstance(rngs, nnx.Rngs):
            return rngs.dropout()
        return None

    def _project(
        self,
        kind: str,
        spec: str,
        x: jax.Array,
        w: jax.Array,
        index: jax.Array | None,
        key: jax.Array | None,
    ) -> jax.Array:
        """x times the (gathered or all) expert weights `w` of `kind`, plus its adapter term
        when `kind` has adapters (the sum cast to the compute dtype, as the dense adapters')."""
        out = jnp.einsum(spec, x, w)
        if kind in self.lora_kinds:
            out = (out + self._delta(kind, x, index, key)).astype(self.dtype)
        return out

    def _delta(
        self, kind: str, x: jax.Array, index: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        """The adapter term scaling * x @ A_e @ B_e (float32) for the experts of `index` [N, k]
        (gathered), or of every expert (index None): x [N, in] or [N, k | E, in] (one row per
        expert) -> [N, k | E, out]."""
        a, b = getattr(self, f"{kind}_lora_a")[...], getattr(self, f"{kind}_lora_b")[...]
        if key is not None:
            rate, key = self.lora_dropout, jax.random.fold_in(key, LORA_KINDS.index(kind))
            keep = jax.random.bernoulli(key, 1 - rate, x.shape)
            x = jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)
        lhs = "nd" if x.ndim == 2 else "ned"
        if index is None:
            t = jnp.einsum(f"{lhs},edr->ner", x, a)
            return jnp.einsum("ner,ero->neo", t, b) * self.lora_scaling
        # the chosen experts' adapters: [N, k, in, r], [N, k, r, out]
        a, b = jnp.take(a, index, axis=0), jnp.take(b, index, axis=0)
        t = jnp.einsum(f"{lhs},nedr->ner", x, a)
        return jnp.einsum("ner,nero->neo", t, b) * self.lora_scaling

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, D] -> (weights [N, k] float32 summing to 1, expert indices [N, k])."""
        logits = jnp.einsum(
            "nd,ed->ne",
            x.astype(jnp.float32),
            self.router[...].astype(jnp.float32),
            preferred_element_type=jnp.float32,
        )
        probs = jax.nn.softmax(logits, axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        return top / jnp.sum(top, axis=-1, keepdims=True), index

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        weights, index = self.route(flat)
        if 2 * b * t * self.top_k <= self.num_experts:
            out = self._gathered(flat, weights, index)
        else:
            out = self._dense(flat, weights, index)
        return out.reshape(b, t, d)

    def _gathered(self, x: jax.Array, weights: jax.Array, index: jax.Array) -> jax.Array:
        """Read only the chosen experts: [N, k] weight slices gathered, then multiplied."""
        dt = self.dtype
        gate = jnp.take(self.gate[...], index, axis=0).astype(dt)  # [N, k, D, M]
        up = jnp.take(self.up[...], index, axis=0).astype(dt)
        down = jnp.take(self.down[...], index, axis=0).astype(dt)  # [N, k, M, D]
        key = self._dropout_key()
        g = self._project("gate", "nd,nkdm->nkm", x, gate, index, key)
        h = jax.nn.silu(g) * self._project("up", "nd,nkdm->nkm", x, up, index, key)
        y = self._project("down", "nkm,nkmd->nkd", h, down, index, key)
        return jnp.einsum("nkd,nk->nd", y, weights.astype(dt))

    def _dense(self, x: jax.Array, weights: jax.Array, index: jax.Array) -> jax.Array:
        """Every expert over every token (chunks of DENSE_CHUNK tokens), weighted combine with
        zero weight for the experts not chosen."""
        dt = self.dtype
        n = x.shape[0]
        combine = jnp.zeros((n, self.num_experts), jnp.float32)
        combine = combine.at[jnp.arange(n)[:, None], index].set(weights).astype(dt)
        gate, up, down = (w[...].astype(dt) for w in (self.gate, self.up, self.down))
        key = self._dropout_key()  # drawn here: random state cannot change inside lax.map

        def chunk(xc: jax.Array, cc: jax.Array, k: jax.Array | None = key) -> jax.Array:
            g = self._project("gate", "nd,edm->nem", xc, gate, None, k)
            u = self._project("up", "nd,edm->nem", xc, up, None, k)
            h = constrain(jax.nn.silu(g) * u, (None, "expert", "mlp"))
            out = jnp.einsum("nem,emd,ne->nd", h, down, cc)
            if "down" in self.lora_kinds:
                delta = jnp.einsum("ned,ne->nd", self._delta("down", h, None, k), cc)
                out = (out + delta).astype(dt)
            return out

        if n <= DENSE_CHUNK:
            return chunk(x, combine)
        pad = -n % DENSE_CHUNK
        xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, DENSE_CHUNK, x.shape[1])
        cs = jnp.pad(combine, ((0, pad), (0, 0))).reshape(-1, DENSE_CHUNK, self.num_experts)
        keys = () if key is None else (jax.random.split(key, xs.shape[0]),)  # a mask per chunk
        out = jax.lax.map(lambda args: chunk(*args), (xs, cs, *keys))
        return out.reshape(-1, x.shape[1])[:n]
