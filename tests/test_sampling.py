"""Tests for mistral_nnx.sampling: greedy, temperature, top-k, top-p, min-p and validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.sampling import BatchSampling, SamplingParams, sample

# A small fixed distribution for the frequency tests.
LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
TEMPERATURE = 0.7
N = 20000

sample_jit = jax.jit(sample)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _draw(params: SamplingParams, n: int = N, seed: int = 0) -> np.ndarray:
    """n independent tokens for LOGITS (one batch row per draw)."""
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    tokens, _ = sample_jit(logits, jax.random.key(seed), BatchSampling.from_params(params, n))
    return np.asarray(tokens)


def _check_frequencies(tokens: np.ndarray, expected: np.ndarray) -> None:
    freq = np.bincount(tokens, minlength=expected.size) / tokens.size
    for p, f in zip(expected, freq, strict=True):
        if p == 0.0:
            assert f == 0.0
        else:
            stderr = np.sqrt(p * (1 - p) / tokens.size)
            assert abs(f - p) <= 5 * stderr, (freq, expected)


def _truncated(keep: np.ndarray) -> np.ndarray:
    """softmax(LOGITS / TEMPERATURE) restricted to `keep` and renormalised."""
    probs = np.where(keep, _softmax(LOGITS / TEMPERATURE), 0.0)
    return probs / probs.sum()


def test_temperature_frequencies() -> None:
    tokens = _draw(SamplingParams(temperature=TEMPERATURE))
    _check_frequencies(tokens, _softmax(LOGITS / TEMPERATURE))


def test_top_k_frequencies() -> None:
    tokens = _draw(SamplingParams(temperature=TEMPERATURE, top_k=3))
    _check_frequencies(tokens, _truncated(np.array([1, 1, 1, 0, 0], bool)))


def test_top_p_frequencies() -> None:
    probs = _softmax(LOGITS / TEMPERATURE)  # ~[0.70, 0.17, 0.08, 0.04, 0.01]: sorted already
    cumulative = np.cumsum(probs)  # ~[0.70, 0.87, 0.95, 0.99, 1.0]
    top_p = 0.9  # the nucleus is the first 3 tokens: cum[1] < 0.9 <= cum[2]
    assert cumulative[1] < top_p <= cumulative[2]
    tokens = _draw(SamplingParams(temperature=TEMPERATURE, top_p=top_p))
    _check_frequencies(tokens, _truncated(np.array([1, 1, 1, 0, 0], bool)))


def test_min_p_frequencies() -> None:
    probs = _softmax(LOGITS / TEMPERATURE)
    min_p = 0.1  # keeps tokens 0..2: p[2] / p[0] ~ 0.12, p[3] / p[0] ~ 0.057
    keep = probs >= min_p * probs.max()
    assert keep.tolist() == [True, True, True, False, False]
    tokens = _draw(SamplingParams(temperature=TEMPERATURE, min_p=min_p))
    _check_frequencies(tokens, _truncated(keep))


def test_filters_off_values_match_plain_temperature() -> None:
    off = SamplingParams(temperature=TEMPERATURE, top_k=0, top_p=1.0, min_p=0.0)
    _check_frequencies(_draw(off), _softmax(LOGITS / TEMPERATURE))


def test_top_k_1_is_greedy() -> None:
    logits = jax.random.normal(jax.random.key(1), (256, 1000)) * 3.0
    for temperature in (0.3, 1.0, 5.0):
        params = SamplingParams(temperature=temperature, top_k=1)
        tokens, _ = sample_jit(logits, jax.random.key(2), BatchSampling.from_params(params, 256))
        np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))


@pytest.mark.parametrize("greedy_only", [False, True])
def test_greedy_is_argmax(greedy_only: bool) -> None:
    logits = jax.random.normal(jax.random.key(3), (64, 500))
    sampling = BatchSampling.from_params(SamplingParams(), 64)
    run = jax.jit(sample, static_argnums=3)
    tokens, logprobs = run(logits, jax.random.key(4), sampling, greedy_only)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))
    assert tokens.dtype == jnp.int32
    expected = jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6, atol=1e-6)


def test_masked_logits_never_sampled() -> None:
    """-inf logits (e.g. a padded vocabulary) are never chosen, with or without filters."""
    logits = jnp.where(jnp.arange(40) % 2 == 0, 0.0, -jnp.inf)
    rows = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=30),
        SamplingParams(temperature=1.0, top_p=0.99, min_p=0.01),
    ]
    batch_logits = jnp.broadcast_to(logits, (len(rows), 40))
    sampling = BatchSampling.from_params(rows, len(rows))
    keys = jax.random.split(jax.random.key(14), 500)
    tokens, logprobs = jax.vmap(lambda k: sample_jit(batch_logits, k, sampling))(keys)
    assert np.all(np.asarray(tokens) % 2 == 0)
    np.testing.assert_allclose(logprobs, np.log(1 / 20), rtol=1e-5)


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = jnp.zeros((64, 1000))  # flat: every token equally likely
    sampling = BatchSampling.from_params(SamplingParams(temperature=1.0, top_p=0.9), 64)
    a, _ = sample_jit(logits, jax.random.key(7), sampling)
    b, _ = sample_jit(logits, jax.random.key(7), sampling)
    c, _ = sample_jit(logits, jax.random.key(8), sampling)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unfiltered_row_is_independent_of_other_rows_filters() -> None:
    """The lax.cond fast path and the filtering path give the same tokens for unfiltered rows."""
    logits = jax.random.normal(jax.random.key(5), (4, 300))
    key = jax.random.key(6)
    plain = SamplingParams(temperature=0.8)
    fast, _ = sample_jit(logits, key, BatchSampling.from_params(plain, 4))
    mixed = [plain, plain, plain, SamplingParams(temperature=0.8, top_k=5, top_p=0.5)]
    slow, _ = sample_jit(logits, key, BatchSampling.from_params(mixed, 4))
    np.testing.assert_array_equal(fast[:3], slow[:3])
    np.testing.assert_array_equal(fast, jax.random.categorical(key, logits / 0.8, axis=-1))


def test_mixed_batch_rows_follow_their_own_params() -> None:
    logits = jnp.asarray(np.linspace(1.0, 0.0, 50, dtype=np.float32))  # token 0 most likely
    rows = [
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.0),  # anything
        SamplingParams(temperature=1.0, top_k=2),  # tokens {0, 1}
        SamplingParams(temperature=2.0, top_p=0.05),  # top token and a few after it
        SamplingParams(temperature=1.0, min_p=0.9),  # logit >= 1 + log(0.9): tokens 0..5
    ]
    sampling = BatchSampling.from_params(rows, len(rows))
    batch_logits = jnp.broadcast_to(logits, (len(rows), logits.size))
    keys = jax.random.split(jax.random.key(9), 2000)
    tokens, _ = jax.vmap(lambda k: sample_jit(batch_logits, k, sampling))(keys)
    tokens = np.asarray(tokens)  # [2000, 5]

    assert set(tokens[:, 0]) == {0}
    assert len(set(tokens[:, 1])) > 20
    assert set(tokens[:, 2]) == {0, 1}

    probs = _softmax(np.asarray(logits) / 2.0)
    nucleus = int(np.searchsorted(np.cumsum(probs), 0.05) + 1)
    assert set(tokens[:, 3]) == set(range(nucleus))

    allowed = set(np.flatnonzero(np.asarray(logits) >= 1.0 + np.log(0.9)).tolist())
    assert set(tokens[:, 4]) == allowed


def test_logprobs_are_model_log_softmax() -> None:
    logits = jax.random.normal(jax.random.key(10), (6, 200)) * 2.0
    rows = [
        SamplingParams(),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
    ]
    tokens, logprobs = sample_jit(logits, jax.random.key(11), BatchSampling.from_params(rows, 6))
    expected = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(6), tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6, atol=1e-6)
    assert logprobs.dtype == jnp.float32


def test_bfloat16_logits() -> None:
    """bfloat16 logits are sampled from their float32 values: the token is among the 3 kept,
    logprobs are float32 log_softmax of the same values, greedy rows take their argmax."""
    logits = (jax.random.normal(jax.random.key(12), (64, 100)) * 3.0).astype(jnp.bfloat16)
    as_f32 = np.asarray(logits.astype(jnp.float32))
    top3 = np.argsort(-as_f32, axis=-1)[:, :3]
    rows = [SamplingParams(temperature=1.0, top_k=3)] * 32 + [SamplingParams()] * 32
    tokens, logprobs = sample_jit(logits, jax.random.key(13), BatchSampling.from_params(rows, 64))
    assert tokens.dtype == jnp.int32 and logprobs.dtype == jnp.float32
    tokens = np.asarray(tokens)
    assert all(t in top3[i] for i, t in enumerate(tokens[:32]))
    assert len(set(tokens[:32].tolist()) - set(top3[:32, 0].tolist())) > 0  # not all greedy
    np.testing.assert_array_equal(tokens[32:], as_f32[32:].argmax(-1))
    shifted = as_f32 - as_f32.max(-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprobs, expected[np.arange(64), tokens], rtol=0, atol=2e-6)


# ---- kept token sets against transformers' logits warpers ---------------------------------------
def _hf_kept(logits: np.ndarray, temperature: float, top_k=None, top_p=None, min_p=None):
    """transformers' generate order: temperature, top-k, top-p, min-p (its warpers)."""
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(logits)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return np.isfinite(scores.numpy()), torch.softmax(scores, -1).numpy()


FILTERS = [
    dict(top_k=1),
    dict(top_k=7),
    dict(top_k=60),
    dict(top_p=0.3),
    dict(top_p=0.8),
    dict(top_p=0.97),
    dict(min_p=0.02),
    dict(min_p=0.3),
    dict(top_k=40, top_p=0.6),
    dict(top_k=8, min_p=0.1),
    dict(top_p=0.9, min_p=0.05),
    dict(top_k=30, top_p=0.85, min_p=0.02),
]


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_kept_sets_match_transformers_warpers(temperature: float) -> None:
    from mistral_nnx.sampling import _filter

    rng = np.random.default_rng(int(temperature * 10))
    logits = (rng.standard_normal((len(FILTERS) * 16, 500)) * 2.5).astype(np.float32)
    rows = [SamplingParams(temperature=temperature, **f) for f in FILTERS for _ in range(16)]
    sampling = BatchSampling.from_params(rows, len(rows))
    ours = np.isfinite(np.asarray(jax.jit(_filter)(jnp.asarray(logits / temperature), sampling)))
    for i, f in enumerate(FILTERS):
        block = slice(16 * i, 16 * i + 16)
        kept, _ = _hf_kept(logits[block], temperature, **f)
        assert 1 <= kept.sum(-1).min() and kept.sum(-1).max() < 500, f  # the filter acts
        np.testing.assert_array_equal(ours[block], kept, err_msg=str(f))
    # And `sample` draws only kept tokens.
    keys = jax.random.split(jax.random.key(3), 16)
    drawn = np.asarray(jax.vmap(lambda k: sample_jit(jnp.asarray(logits), k, sampling)[0])(keys))
    assert ours[np.arange(len(rows))[None], drawn].all()


@pytest.mark.parametrize(
    "params",
    [
        # Exact ties: with probabilities 1/2, 1/4, 1/8, 1/16, 1/16 the mass before a token equals
        # top_p exactly (float32 holds these sums exactly); transformers keeps 1, 2, 3 tokens.
        dict(top_p=0.5),
        dict(top_p=0.75),
        dict(top_p=0.875),
        # top_k at or above the vocabulary keeps everything (as TopKLogitsWarper clamps it).
        dict(top_k=5),
        dict(top_k=6),
        dict(top_k=10**9),
        dict(top_k=6, top_p=0.75),
    ],
)
def test_kept_sets_at_the_edges_match_transformers(params: dict) -> None:
    from mistral_nnx.sampling import _filter

    logits = np.log(np.asarray([[0.5, 0.25, 0.125, 0.0625, 0.0625]], np.float32))
    sampling = BatchSampling.from_params(SamplingParams(temperature=1.0, **params), 1)
    ours = np.isfinite(np.asarray(jax.jit(_filter)(jnp.asarray(logits), sampling)))
    kept, probs = _hf_kept(logits, 1.0, **params)
    np.testing.assert_array_equal(ours, kept)
    # and the draws follow transformers' filtered distribution
    rows = BatchSampling.from_params(SamplingParams(temperature=1.0, **params), N)
    tokens, _ = sample_jit(jnp.broadcast_to(jnp.asarray(logits), (N, 5)), jax.random.key(1), rows)
    _check_frequencies(np.asarray(tokens), probs[0])


def test_jit_does_not_retrace_for_new_values() -> None:
    traces = 0

    def counted(logits: jax.Array, key: jax.Array, sampling: BatchSampling):
        nonlocal traces
        traces += 1
        return sample(logits, key, sampling)

    jitted = jax.jit(counted)
    logits = jnp.zeros((2, 10))
    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_k=3, top_p=0.5)):
        jitted(logits, jax.random.key(0), BatchSampling.from_params(params, 2))
    assert traces == 1


def test_from_params_fills_off_values() -> None:
    sampling = BatchSampling.from_params(
        [SamplingParams(), SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.1)], 2
    )
    np.testing.assert_allclose(sampling.temperature, [0.0, 0.5])
    np.testing.assert_array_equal(sampling.top_k, [0, 4])
    np.testing.assert_allclose(sampling.top_p, [1.0, 0.9])
    np.testing.assert_allclose(sampling.min_p, [0.0, 0.1])
    assert sampling.top_k.dtype == jnp.int32 and sampling.top_p.dtype == jnp.float32


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1.0"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": "0.9"}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": float("inf")}, "min_p"),
        ({"min_p": None, "top_p": -1.0}, "top_p"),
    ],
)
def test_invalid_params_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(MistralNNXError, match=name):
        SamplingParams(**kwargs)


def test_valid_edge_params() -> None:
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.0)
    numpy_scalars: dict = {"top_k": np.int64(5), "top_p": np.float32(0.5)}
    SamplingParams(temperature=1, min_p=0.99, **numpy_scalars)


def test_top_p_message() -> None:
    with pytest.raises(MistralNNXError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)


def test_from_params_errors() -> None:
    with pytest.raises(MistralNNXError, match="batch"):
        BatchSampling.from_params([SamplingParams()] * 2, 3)
    with pytest.raises(MistralNNXError, match="batch"):
        BatchSampling.from_params(SamplingParams(), 0)
    with pytest.raises(MistralNNXError, match=r"params\[1\]"):
        BatchSampling.from_params([SamplingParams(), {"temperature": 1.0}], 2)  # type: ignore[list-item]


def test_sample_shape_errors() -> None:
    sampling = BatchSampling.from_params(SamplingParams(), 2)
    with pytest.raises(MistralNNXError, match="logits"):
        sample(jnp.zeros((2, 3, 4)), jax.random.key(0), sampling)
    with pytest.raises(MistralNNXError, match="sampling.temperature"):
        sample(jnp.zeros((3, 4)), jax.random.key(0), sampling)
