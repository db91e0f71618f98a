"""The cuDNN-form attention (jax.nn.dot_product_attention with is_causal, a left window and per-row
lengths, rows rotated so left padding becomes right padding) equals the explicit-mask `attend`.

On CPU the kernel is forced to implementation="xla": the same calls and masks a GPU runs through
cuDNN. float32 within 1e-5; bfloat16 within bf16 rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_nnx as mn
from mistral_nnx import attention
from mistral_nnx.attention import attend_self, attention_path, contiguous_rows
from mistral_nnx.cache import init_cache
from mistral_nnx.model import attend

T = 16


def _layout() -> tuple[np.ndarray, np.ndarray]:
    """positions, valid [6, T]: full; right padded; left padded (positions from 0); left padded
    with positions 0..T-1 (HF without position_ids); a chunk starting at position 100; a
    single valid token."""
    idx = np.arange(T)
    lengths = [T, 11, 9, 5, T, 1]
    valid = np.zeros((6, T), bool)
    positions = np.tile(idx, (6, 1))
    valid[0] = True
    valid[1, :11] = True
    valid[2, T - 9 :] = True
    positions[2] = idx - (T - 9)
    valid[3, T - 5 :] = True
    valid[4] = True
    positions[4] = idx + 100
    valid[5, 7] = True
    positions[5] = idx - 7
    assert [int(v.sum()) for v in valid] == lengths
    return positions.astype(np.int32), valid


def _qkv(h: int, k: int, dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    # Scaled up so attention is sharp: a wrong mask moves the output a lot.
    q = 3.0 * rng.standard_normal((6, T, h, 32))
    kk = 3.0 * rng.standard_normal((6, T, k, 32))
    v = rng.standard_normal((6, T, k, 32))
    return tuple(jnp.asarray(a, dtype) for a in (q, kk, v))


def _both(q, k, v, positions, valid, window):  # type: ignore[no-untyped-def]
    pos, val = jnp.asarray(positions), jnp.asarray(valid)
    ok, offset = contiguous_rows(pos, val)
    assert bool(ok)
    new = jax.jit(attend_self, static_argnums=(5, 6))(q, k, v, val, offset, window, "xla")
    old = jax.jit(attend, static_argnums=5)(q, k, v, pos, jnp.where(val, pos, -1), window)
    mask = valid[:, :, None, None]
    return np.where(mask, np.asarray(new, np.float32), 0), np.where(
        mask, np.asarray(old, np.float32), 0
    )


@pytest.mark.parametrize("window", [None, 1, 3, 8, T - 1, T, T + 5])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)], ids=["gqa", "mha", "mqa"])
def test_float32_equals_explicit_mask(window: int | None, heads: tuple[int, int]) -> None:
    positions, valid = _layout()
    new, old = _both(*_qkv(*heads, jnp.float32), positions, valid, window)
    np.testing.assert_allclose(new, old, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_odd_length_values_and_gradients(window: int | None) -> None:
    """An odd chunk (training feeds T - 1 tokens) is padded by one for cuDNN, whose backward
    pass takes even lengths only: values and the gradients of q, k, v still equal the
    explicit mask's on the valid queries."""
    positions, valid = (a[:, : T - 1] for a in _layout())
    valid[0, -1] = True  # row 0 stays full after the cut
    q, k, v = (x[:, : T - 1] for x in _qkv(6, 2, jnp.float32))
    pos, val = jnp.asarray(positions), jnp.asarray(valid)
    ok, offset = contiguous_rows(pos, val)
    assert bool(ok)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((6, T - 1, 6, 32)))
    weights = jnp.where(val[:, :, None, None], weights, 0)  # padded queries' outputs ignored

    def new(q, k, v):  # type: ignore[no-untyped-def]
        return jnp.sum(weights * attend_self(q, k, v, val, offset, window, "xla"))

    def old(q, k, v):  # type: ignore[no-untyped-def]
        return jnp.sum(weights * attend(q, k, v, pos, jnp.where(val, pos, -1), window))

    (a, grads_a), (b, grads_b) = (jax.value_and_grad(f, (0, 1, 2))(q, k, v) for f in (new, old))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [None, 4])
def test_bfloat16_equals_explicit_mask(window: int | None) -> None:
    positions, valid = _layout()
    q, k, v = _qkv(6, 2, jnp.bfloat16, seed=1)
    new, old = _both(q, k, v, positions, valid, window)
    # Same bf16 inputs, float32 scores and softmax, bf16 probabilities: rounding apart only.
    np.testing.assert_allclose(new, old, atol=2e-2, rtol=0)
    ref, _ = _both(*(a.astype(jnp.float32) for a in (q, k, v)), positions, valid, window)
    assert np.max(np.abs(new - ref)) <= 1.5 * np.max(np.abs(old - ref)) + 1e-3


def test_window_changes_the_result() -> None:
    """The window cases above are not vacuous: window 3 differs from full attention."""
    positions, valid = _layout()
    q, k, v = _qkv(6, 2, jnp.float32)
    full, _ = _both(q, k, v, positions, valid, None)
    windowed, _ = _both(q, k, v, positions, valid, 3)
    assert np.max(np.abs(full - windowed)) > 0.1


def test_contiguous_rows() -> None:
    positions, valid = _layout()
    ok, offset = contiguous_rows(jnp.asarray(positions), jnp.asarray(valid))
    assert bool(ok)
    assert offset.tolist() == [0, 0, T - 9, T - 5, 0, 7]
    empty = valid.copy()
    empty[5] = False
    assert bool(contiguous_rows(jnp.asarray(positions), jnp.asarray(empty))[0])

    def bad(pos: np.ndarray, val: np.ndarray) -> bool:
        return not bool(contiguous_rows(jnp.asarray(pos), jnp.asarray(val))[0])

    hole = valid.copy()
    hole[0, 5] = False  # two runs in one row
    assert bad(positions, hole)
    jump = positions.copy()
    jump[1, 6:] += 3  # positions skip
    assert bad(jump, valid)
    negative = positions.copy()
    negative[4] -= 101  # first valid position -1: attend masks it as a key
    assert bad(negative, valid)


def test_attention_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(attention.ENV, raising=False)
    assert attention_path(jnp.bfloat16, 128, "cpu") == "xla"
    assert attention_path(jnp.float32, 128, "gpu") == "xla"  # cuDNN takes no float32
    assert attention_path(jnp.bfloat16, 256, "gpu") == "xla"
    assert attention_path(jnp.bfloat16, 60, "gpu") == "xla"
    assert attention_path(jnp.bfloat16, 128, "gpu", sharded=True) == "xla"
    monkeypatch.setenv(attention.ENV, "dpa-xla")
    assert attention_path(jnp.float32, 64) == "dpa-xla"
    monkeypatch.setenv(attention.ENV, "flash")
    with pytest.raises(mn.MistralNNXError, match=attention.ENV):
        attention_path(jnp.float32, 64)


# ---- the whole model: the GPU's path (forced to the XLA kernel) against today's ---------------

CONFIG = mn.MistralConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    layer_windows=(5, None),
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
)


def _forward(monkeypatch: pytest.MonkeyPatch, path: str, model: mn.Mistral) -> Any:
    """A fresh jitted model.forward(*args) on `path`; the path is read when it traces, so call
    it before switching to another path."""
    monkeypatch.setenv(attention.ENV, path)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, *args: nnx.merge(graphdef, state).forward(*args))
    return lambda *args: run(state, *args)


def test_model_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache-less forward, rows right and left padded: "dpa-xla" equals "xla" on every valid
    position. Padded positions tell which branch ran: the self-attention zeroes padded queries
    (so they differ), the fallback for a row with a hole in it does not (all agree)."""
    model = mn.Mistral(CONFIG, rngs=nnx.Rngs(3))
    _, valid = _layout()
    valid = np.concatenate([valid[1:2], valid[1:2, ::-1], valid[5:6]])  # right, left, one token
    holed = valid.copy()
    holed[0, 4] = False
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, valid.shape), jnp.int32)
    out: dict[str, list[np.ndarray]] = {}
    for path in ("dpa-xla", "xla"):
        forward = _forward(monkeypatch, path, model)
        out[path] = []
        for v in (valid, holed):
            positions = np.maximum(np.cumsum(v, axis=1) - 1, 0).astype(np.int32)
            out[path].append(np.asarray(forward(tokens, positions, v)[0]))
    pairs = zip(out["dpa-xla"], out["xla"], (valid, holed), (False, True), strict=True)
    for new, old, v, hole in pairs:
        mask = v[:, :, None]
        np.testing.assert_allclose(
            np.where(mask, new, 0), np.where(mask, old, 0), atol=1e-5, rtol=0
        )
        gap = float(np.max(np.abs(new - old)))
        assert gap < 1e-5 if hole else gap > 0.01


def test_prefill_into_cache_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first chunk into an empty cache (a ring buffer for window 5, a plain buffer for full
    attention) takes the self-attention (padded positions differ); the second chunk falls
    back (all agree). Logits of valid positions and the caches written agree."""
    model = mn.Mistral(CONFIG, rngs=nnx.Rngs(4))
    lengths = np.array([T, 11, 1])
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 3, T)), jnp.int32)
    results: dict[str, tuple[list[np.ndarray], list[np.ndarray], Any]] = {}
    for path in ("dpa-xla", "xla"):
        forward = _forward(monkeypatch, path, model)
        cache = init_cache(CONFIG, 3, 40)
        logits, valids = [], []
        for chunk, start in enumerate((0, T)):
            positions = np.tile(np.arange(start, start + T, dtype=np.int32), (3, 1))
            valid = positions < (lengths + start)[:, None]
            out, cache = forward(tokens[chunk], positions, valid, cache)
            logits.append(np.asarray(out))
            valids.append(valid[:, :, None])
        results[path] = (logits, valids, cache)
    (new, valids, new_cache), (old, _, old_cache) = results["dpa-xla"], results["xla"]
    for a, b, valid in zip(new, old, valids, strict=True):
        np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), atol=1e-5, rtol=0)
    gaps = [float(np.max(np.abs(a - b))) for a, b in zip(new, old, strict=True)]
    assert gaps[0] > 0.01 and gaps[1] < 1e-5
    for a, b in zip(jax.tree.leaves(new_cache), jax.tree.leaves(old_cache), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_backward_keeps_one_attention_branchs_residuals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training through the "cudnn"-style path (a lax.cond between dot_product_attention and the
    explicit mask): a cond's backward keeps both branches' residuals, so the explicit mask's
    [B, H, T, T] arrays would add themselves to those of dot_product_attention's branch. That
    branch is checkpointed. Measured here: the compiled gradient's temporaries are 1.50x the
    explicit-mask path's alone (the XLA form of dot_product_attention keeps its own, larger
    residuals; cuDNN's are small), and 2.02x without the checkpoint."""
    model = mn.Mistral(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 128)), jnp.int32)

    def temp_bytes(path: str) -> int:
        monkeypatch.setenv(attention.ENV, path)

        def loss(state: nnx.State) -> jax.Array:
            return jnp.sum(nnx.merge(graphdef, state)(tokens) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(state).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    explicit, both = temp_bytes("xla"), temp_bytes("dpa-xla")
    assert both < 1.75 * explicit, (both, explicit)
