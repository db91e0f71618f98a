"""Ragged batches against transformers, at forward (KV cache) and generate() level.

Batches of 4 right-padded prompts whose lengths straddle prefill chunks and sliding windows,
with prefill chunks smaller and larger than the window (window 16 at both levels; the interleaved
window-8 / full model at forward level). Each row is compared with transformers
run on that row alone, unpadded (float32, 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral_nnx as mn
from mistral_nnx.cache import init_cache
from mistral_nnx.engine import EngineOptions, generate

# Window 16 (every layer) and window 8 (three of four layers); lengths past one and two windows,
# and lengths whose last token opens a chunk (25 for chunks 8 and 24, 11 for 5, 13 for 12).
LENGTHS = {"gqa_window16": (5, 17, 37, 25), "interleaved": (3, 11, 30, 13)}
CHUNKS = {"gqa_window16": (8, 24), "interleaved": (5, 12)}  # one below, one above the window
DECODE = 6
NEW = 16


def _prompts(name: str) -> list[list[int]]:
    rng = np.random.RandomState(21)
    return [rng.randint(3, 211, n).tolist() for n in LENGTHS[name]]


def _hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def models(hf_checkpoints):
    return {name: mn.load_model(hf_checkpoints[name][0], progress=False) for name in LENGTHS}


@pytest.mark.parametrize(
    ("name", "chunk"), [(name, chunk) for name in LENGTHS for chunk in CHUNKS[name]]
)
def test_ragged_forward_with_cache_matches_transformers(hf_checkpoints, models, name, chunk):
    """Chunked prefill of a right-padded batch, then DECODE steps where each row is at its own
    position: every valid position's logits match transformers on the row alone."""
    hf_model, model = hf_checkpoints[name][1], models[name]
    prompts = _prompts(name)
    rng = np.random.RandomState(22)
    continuations = [rng.randint(3, 211, DECODE).tolist() for _ in prompts]
    b, lengths = len(prompts), np.array([len(p) for p in prompts])
    padded_len = -(-lengths.max() // chunk) * chunk
    tokens = np.full((b, padded_len), 7, np.int32)  # padding with a real token id
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    step = jax.jit(lambda t, p, v, c: model.forward(t, p, v, c))
    cache = init_cache(model.config, b, 64)
    prefill = []
    for start in range(0, padded_len, chunk):
        pos = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (b, chunk))
        logits, cache = step(
            jnp.asarray(tokens[:, start : start + chunk]),
            jnp.asarray(pos),
            jnp.asarray(pos < lengths[:, None]),
            cache,
        )
        prefill.append(np.asarray(logits))
    prefill_logits = np.concatenate(prefill, axis=1)
    decoded = []
    for i in range(DECODE):
        tok = np.array([[c[i]] for c in continuations], np.int32)
        pos = (lengths + i)[:, None].astype(np.int32)
        logits, cache = step(jnp.asarray(tok), jnp.asarray(pos), jnp.ones((b, 1), bool), cache)
        decoded.append(np.asarray(logits)[:, 0])
    for row, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        ref = _hf_logits(hf_model, prompt + cont)
        got = np.concatenate(
            [prefill_logits[row, : len(prompt)], np.stack([d[row] for d in decoded])]
        )
        assert np.abs(got - ref).max() < 1e-4, (row, np.abs(got - ref).max(axis=-1))


@pytest.fixture(scope="module")
def hf_greedy(hf_checkpoints):
    """per prompt, (transformers' NEW greedy tokens, their log-probabilities)."""
    out = {}
    for name in ["gqa_window16"]:
        hf_model = hf_checkpoints[name][1]
        rows = []
        for prompt in _prompts(name):
            with torch.no_grad():
                ids = hf_model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=NEW,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )[0].tolist()
            logp = torch.log_softmax(torch.tensor(_hf_logits(hf_model, ids)), -1).numpy()
            new = ids[len(prompt) :]
            rows.append((new, [logp[len(prompt) - 1 + i, t] for i, t in enumerate(new)]))
        out[name] = rows
    return out


@pytest.mark.parametrize("chunk", CHUNKS["gqa_window16"])
def test_ragged_generate_matches_transformers(models, hf_greedy, chunk):
    name = "gqa_window16"
    model = models[name]
    options = EngineOptions(prefill_chunk=chunk, decode_steps=7, min_bucket=4)
    out = generate(model, _prompts(name), max_new_tokens=NEW, logprobs=True, options=options)
    for row, (completion, (tokens, logprobs)) in enumerate(zip(out, hf_greedy[name], strict=True)):
        assert completion.tokens == tokens, row
        assert completion.logprobs is not None
        assert np.abs(np.asarray(completion.logprobs) - logprobs).max() < 1e-4, row
