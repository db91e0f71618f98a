"""The network against transformers (PyTorch float32) on tiny random checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS
from flax import nnx

import mistral_nnx as mn

SEQ = 64
# A small random model for the tests that need no reference checkpoint.
SMALL = mn.MistralConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    layer_windows=(8, None),
)


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 211, (batch, seq)).astype(np.int32)


def _reference(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_checkpoints, name):
    directory, hf_model = hf_checkpoints[name]
    model = mn.load_model(directory, progress=False)
    tokens = _tokens()
    ref = _reference(hf_model, tokens)
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-4
    # Not flat: the logits vary over the vocabulary and between positions.
    assert out.std(axis=-1).min() > 1e-2
    assert np.abs(np.diff(out, axis=1)).max() > 1e-2


def test_window_bites(hf_checkpoints):
    """Sequence 64 with window 16: the window must change logits vs full attention."""
    directory, hf_model = hf_checkpoints["gqa_window16"]
    model = mn.load_model(directory, progress=False)
    tokens = jnp.asarray(_tokens())
    windowed = np.asarray(model(tokens))
    model.config = model.config.replace(layer_windows=(None,) * model.config.num_layers)
    for layer in model.layers:
        layer.attn.window = None
    full = np.asarray(model(tokens))
    assert np.abs(windowed[:, :16] - full[:, :16]).max() < 1e-5
    # From position 16 on (the first where key 0 falls out of the window), every position
    # differs: measured min 0.028 (at 16) against 0 with the window one too wide.
    assert np.abs(windowed[:, 16:] - full[:, 16:]).max(axis=-1).min() > 5e-3


def test_bf16_params_within_bf16_tolerance(hf_checkpoints):
    """bfloat16 weights, against transformers float32 on the same bf16-rounded weights: float32
    compute must be exact (1e-4); bfloat16 compute gets what its activation rounding needs,
    measured on three token draws: max 3.9e-3 - 5.1e-3, mean 6.9e-4 - 7.2e-4 (a missing RMSNorm
    eps gives 8.9e-3 - 1.1e-2 and 1.6e-3 in bf16, 9e-3 in float32)."""
    directory, hf_model = hf_checkpoints["gqa_window16"]
    rounded = type(hf_model)(hf_model.config).eval()
    rounded.load_state_dict(
        {k: v.to(torch.bfloat16).float() for k, v in hf_model.state_dict().items()}
    )
    tokens = _tokens()
    ref = _reference(rounded, tokens)
    for dtype, max_err, mean_err in ((jnp.float32, 1e-4, 1e-5), (jnp.bfloat16, 8e-3, 1.1e-3)):
        model = mn.load_model(directory, dtype=dtype, param_dtype=jnp.bfloat16, progress=False)
        assert model.embed[...].dtype == jnp.bfloat16
        out = np.asarray(model(jnp.asarray(tokens)))
        assert out.dtype == np.float32
        err = np.abs(out - ref)
        assert err.max() < max_err and err.mean() < mean_err, (dtype, err.max(), err.mean())


def test_positions_and_padding_mask(hf_checkpoints):
    """Right padding and explicit positions: valid tokens see exactly what they see unpadded."""
    directory, hf_model = hf_checkpoints["gqa_window16"]
    model = mn.load_model(directory, progress=False)
    tokens = _tokens(1, 40)
    ref = _reference(hf_model, tokens)[0]
    padded = np.concatenate([tokens, np.full((1, 24), 7, np.int32)], axis=1)
    valid = np.arange(64)[None] < 40
    out = np.asarray(model(jnp.asarray(padded), valid=jnp.asarray(valid)))[0, :40]
    assert np.abs(out - ref).max() < 1e-4
    # Left padding with explicit positions gives the same logits too.
    left = np.concatenate([np.full((1, 24), 7, np.int32), tokens], axis=1)
    positions = np.clip(np.arange(64) - 24, 0, None)[None].astype(np.int32)
    out = model(
        jnp.asarray(left),
        positions=jnp.asarray(positions),
        valid=jnp.asarray(np.arange(64)[None] >= 24),
    )
    assert np.abs(np.asarray(out)[0, 24:] - ref).max() < 1e-4


def test_random_init_is_not_degenerate():
    config = SMALL
    model = mn.Mistral(config, rngs=nnx.Rngs(1))
    logits = np.asarray(model(jnp.asarray(_tokens(2, 16) % 101)))
    assert np.isfinite(logits).all()
    assert logits.std(axis=-1).min() > 1e-3
    assert len(set(logits[0].argmax(-1).tolist())) > 1


def test_every_parameter_has_logical_axes():
    config = SMALL
    model = mn.Mistral(config)
    known = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, path
        assert set(axes) <= known, path
    assert model.layers[0].attn.wq.get_metadata()["logical_axes"] == (
        "q_heads",
        "head_dim",
        "embed",
    )


def test_jit_over_split_state(hf_checkpoints):
    directory, _ = hf_checkpoints["llama"]
    model = mn.load_model(directory, progress=False)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    tokens = jnp.asarray(_tokens())
    assert np.abs(np.asarray(forward(state, tokens)) - np.asarray(model(tokens))).max() < 1e-5


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
)
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    from conftest import build_hf

    hf_model = build_hf("llama", tmp_path / "m", seed=3, rope_scaling=scaling, rope_theta=10000.0)
    model = mn.load_model(tmp_path / "m", progress=False)
    assert model.config.rope_scaling_dict["rope_type"] == scaling["rope_type"]
    tokens = _tokens(1, 96)
    out = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(out - _reference(hf_model, tokens)).max() < 1e-4
    model.config = model.config.replace(rope_scaling=None)  # the scaling must matter
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - out).max() > 1e-3


def test_bfloat16_rms_norm_is_transformers_bit_for_bit():
    """In bfloat16 the norm's statistics run in float32 and the result is rounded back before
    the weight multiplies it, as transformers' MistralRMSNorm does: equal to the bit."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from mistral_nnx.model import RMSNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * 3).astype(np.float32)
    weight = (1 + 0.1 * rng.standard_normal(512)).astype(np.float32)
    norm = RMSNorm(512, 1e-5, param_dtype=jnp.bfloat16, rngs=None)
    norm.weight = nnx.Param(jnp.asarray(weight, jnp.bfloat16))
    ours = np.asarray(norm(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
    reference = MistralRMSNorm(512, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(weight))
        theirs = reference(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(ours, theirs)
