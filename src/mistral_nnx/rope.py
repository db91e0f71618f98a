"""Rotary position embeddings (HF's half-rotation layout) and position-dependent query scaling.

RoPE variants: default, linear, llama3 and yarn, each exactly as transformers'
modeling_rope_utils computes them. YaRN also returns an attention factor that scales cos and sin.
The llama_4 query scaling of Ministral 3 multiplies queries, after RoPE, by
1 + beta * log(1 + floor(position / original_max_position_embeddings)).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_nnx.config import MistralConfig


def rope_parameters(config: MistralConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32, attention factor applied to cos and sin)."""
    dim = config.head_dim
    base = config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = 1.0 / (np.float32(base) ** exponents)
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn(config, scaling, exponents)
    return np.asarray(inv_freq, dtype=np.float32), float(attention_factor)


def _llama3(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(
        wavelen > old_ctx / low,
        inv_freq / factor,
        np.where(wavelen < old_ctx / high, inv_freq, blended),
    )


def _yarn(
    config: MistralConfig, scaling: dict[str, Any], exponents: np.ndarray
) -> tuple[np.ndarray, float]:
    """transformers' _compute_yarn_parameters, step for step (float32 tables)."""
    dim, base = config.head_dim, config.rope_theta
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(base) ** exponents
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(
    positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, E] for integer positions [B, T] (scaled by attention_factor)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    if positions.shape[-1] == 1:  # decode: one position per row, nothing worth sharing
        return cos, sin
    return _computed_once(cos, sin)


def _computed_once(cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin, unchanged, as the output of a dot. XLA:CPU fuses elementwise producers
    into every consumer: left alone, cos and sin are evaluated again in each layer's q and k
    fusions (and their gradients), for every head, which cost 12% of a 512-token prefill's
    kernel time (benchmarks/RESULTS.md section 17). A dot is never duplicated (XLA:CPU removes
    optimization barriers before fusing, so those cannot say it). The product with the identity
    is exact: one term times 1, the rest exact zeros, at float32 precision (HIGHEST: no TF32)."""
    both = jnp.stack([cos, sin])
    eye = jnp.eye(both.shape[-1], dtype=both.dtype)
    both = jnp.einsum("...e,ef->...f", both, eye, precision=jax.lax.Precision.HIGHEST)
    return both[0], both[1]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, E]; rotates the two halves of the head dim (HF's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def llama4_query_scale(positions: jax.Array, beta: float, original_max: int) -> jax.Array:
    """[B, T, 1, 1] float32: 1 + beta * log(1 + floor(position / original_max)). Positions are
    absolute per token, so the scale is the same in a full pass, a cache or a ragged batch."""
    steps = jnp.floor(positions.astype(jnp.float32) / jnp.float32(original_max))
    return (1.0 + beta * jnp.log(1.0 + steps))[:, :, None, None]
