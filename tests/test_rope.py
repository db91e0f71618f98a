"""RoPE tables and the llama_4 query scale against transformers' own functions."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

from mistral_nnx.config import MistralConfig
from mistral_nnx.model import Mistral
from mistral_nnx.rope import llama4_query_scale, rope_parameters, rope_tables

YARN_CASES: dict[str, dict[str, Any]] = {
    # Ministral 3 as published: mscale == mscale_all_dim, so the attention factor is 1.0.
    "ministral3": dict(factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0,
                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    "paper_scale": dict(factor=4.0, original_max_position_embeddings=16),
    "mscale_ratio": dict(factor=8.0, original_max_position_embeddings=64, mscale=1.0,
                         mscale_all_dim=0.5),
    "attention_factor": dict(factor=4.0, original_max_position_embeddings=32,
                             attention_factor=0.8, beta_fast=16.0, beta_slow=2.0),
    "no_truncate": dict(factor=4.0, original_max_position_embeddings=32, truncate=False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(YARN_CASES))
@pytest.mark.parametrize("theta, head_dim", [(1e6, 16), (10000.0, 128)])
def test_yarn_matches_transformers(case: str, theta: float, head_dim: int) -> None:
    params = {"rope_type": "yarn", "rope_theta": theta, **YARN_CASES[case]}
    hf = tf.MistralConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=dict(params),
    )
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours = MistralConfig.from_hf(
        {
            "model_type": "mistral",
            "vocab_size": 10,
            "hidden_size": 64,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "head_dim": head_dim,
            "max_position_embeddings": 512,
            "rope_parameters": params,
        }
    )
    inv_freq, factor = rope_parameters(ours)
    np.testing.assert_allclose(inv_freq, ref_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-9)


def test_yarn_factors_differ_between_cases() -> None:
    """The cases above exercise different attention factors (1.0, 0.1 ln 4 + 1, a ratio, 0.8)."""
    factors = set()
    for params in YARN_CASES.values():
        config = MistralConfig(
            vocab_size=10,
            hidden_size=64,
            intermediate_size=8,
            num_layers=1,
            num_heads=4,
            num_kv_heads=4,
            head_dim=16,
            layer_windows=(None,),
            rope_scaling=tuple(sorted({"rope_type": "yarn", **params}.items())),
        )
        factors.add(round(rope_parameters(config)[1], 6))
    assert len(factors) >= 4


def test_llama4_query_scale_matches_transformers() -> None:
    positions = np.arange(0, 200, dtype=np.int64)[None] + np.array([[0], [37]])
    ref = get_llama_4_attn_scale(torch.tensor(positions), 0.1, 16).numpy()  # [B, 1, T, 1]
    ours = np.asarray(llama4_query_scale(jnp.asarray(positions, jnp.int32), 0.1, 16))
    np.testing.assert_allclose(ours[:, :, 0, 0], ref[:, 0, :, 0], rtol=1e-6)
    assert ours[0, 15, 0, 0] == 1.0 and ours[0, 16, 0, 0] > 1.0  # starts at the first period


def test_rope_tables_are_exact_and_computed_once() -> None:
    """The tables are exactly cos and sin of the angles, and a forward pass evaluates them once,
    not once per layer, head and gradient (XLA:CPU fuses an elementwise producer into every
    consumer; see rope._computed_once)."""
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=8, layer_windows=(None,) * 4,
    )  # fmt: skip
    inv_freq, _ = rope_parameters(config)
    positions = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) * 37)
    cos, sin = jax.jit(lambda p: rope_tables(p, inv_freq))(positions)
    angles = np.asarray(positions, np.float32)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    expected_cos, expected_sin = jax.jit(lambda a: (jnp.cos(a), jnp.sin(a)))(angles)
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(expected_cos))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(expected_sin))

    model = Mistral(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state: Any, tokens: jax.Array) -> jax.Array:
        return jnp.sum(nnx.merge(graphdef, state)(tokens) ** 2)

    tokens = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12))
    hlo = jax.jit(jax.grad(loss)).lower(state, tokens).compile().as_text()
    assert len(re.findall(r"= f32\[[^\]]*\]\S* sine\(", hlo)) == 1, "sin evaluated more than once"
    assert len(re.findall(r"= f32\[[^\]]*\]\S* cosine\(", hlo)) == 1
