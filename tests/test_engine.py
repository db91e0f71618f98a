"""KV cache, chunked prefill, on-device decode loop and generate() against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_greedy
from flax import nnx

import mistral_nnx as mn
from mistral_nnx import engine
from mistral_nnx.cache import init_cache
from mistral_nnx.engine import EngineOptions, generate, stream
from mistral_nnx.errors import MistralNNXError


@pytest.fixture(scope="module")
def window16(hf_checkpoints):
    directory, hf_model = hf_checkpoints["gqa_window16"]
    return mn.load_model(directory, progress=False), hf_model


def _ids(n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).randint(3, 211, n).tolist()


def _hf_full_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("name", ["gqa_window16", "interleaved"])
def test_prefill_then_decode_equals_full_forward(hf_checkpoints, name):
    """4-token prefill, then 96 single-token steps: every step's logits match a full forward,
    far past the window (16 / 8), so the ring buffers wrap many times."""
    directory, hf_model = hf_checkpoints[name]
    model = mn.load_model(directory, progress=False)
    ids = _ids(100, 5)
    reference = _hf_full_logits(hf_model, ids)
    cache = init_cache(model.config, 1, 128)
    ring = [layer.ring for layer in cache.layers]
    windows = model.config.layer_windows
    assert [layer.capacity for layer in cache.layers] == [w or 128 for w in windows]
    assert ring == [w is not None for w in windows]
    step = jax.jit(lambda tok, pos, cache: model.forward(tok, pos, None, cache))
    tokens = jnp.asarray([ids[:4]], jnp.int32)
    logits, cache = step(tokens, jnp.arange(4, dtype=jnp.int32)[None], cache)
    got = [np.asarray(logits[0])]
    for i in range(4, 100):
        logits, cache = step(
            jnp.asarray([[ids[i]]], jnp.int32), jnp.asarray([[i]], jnp.int32), cache
        )
        got.append(np.asarray(logits[0]))
    assert np.abs(np.concatenate(got) - reference).max() < 1e-4


@pytest.mark.parametrize("chunk", [8, 16, 5])
def test_chunked_prefill_equals_one_shot(hf_checkpoints, chunk):
    directory, hf_model = hf_checkpoints["interleaved"]
    model = mn.load_model(directory, progress=False)
    ids = _ids(45, 6)
    reference = _hf_full_logits(hf_model, ids)
    cache = init_cache(model.config, 1, 64)
    got = []
    for start in range(0, 45, chunk):
        piece = ids[start : start + chunk]
        pos = jnp.arange(start, start + len(piece), dtype=jnp.int32)[None]
        logits, cache = model.forward(jnp.asarray([piece], jnp.int32), pos, None, cache)
        got.append(np.asarray(logits[0]))
    assert np.abs(np.concatenate(got) - reference).max() < 1e-4


@pytest.mark.parametrize("name", ["gqa_window16", "llama"])
def test_greedy_matches_transformers_generate(hf_checkpoints, name):
    """80 greedy tokens after a 24-token prompt: past the window (ring buffers wrap) and, on the
    full-attention model, across the live-prefix buckets of the cache (64 -> 128 slots)."""
    directory, hf_model = hf_checkpoints[name]
    model = mn.load_model(directory, progress=False)
    prompt = _ids(24, 1)
    ref = hf_greedy(hf_model, prompt, 80)
    for options in (EngineOptions(), EngineOptions(prefill_chunk=8, decode_steps=5)):
        out = generate(model, [prompt], max_new_tokens=80, options=options)[0]
        assert out.tokens == ref
        assert out.finish_reason == "length"


@pytest.mark.parametrize("lengths", [[1], [17], [17, 5], [16, 33]])
def test_prompts_one_past_a_chunk_match_transformers(window16, lengths):
    """A longest prompt one token into a new prefill chunk (16 tokens each here), a one-token
    prompt among them: the last chunk holds a single token and must still run."""
    model, hf_model = window16
    prompts = [_ids(n, 30 + n) for n in lengths]
    options = EngineOptions(prefill_chunk=16)
    outs = generate(model, prompts, max_new_tokens=8, options=options)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_greedy(hf_model, prompt, 8)
        assert out.tokens == ref, len(prompt)


def test_batch_invariance_ragged(window16):
    model, _ = window16
    prompts = [_ids(n, 10 + n) for n in (3, 17, 30, 9)]
    batched = generate(model, prompts, max_new_tokens=40)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = generate(model, [prompt], max_new_tokens=40)[0]
        assert alone.tokens == result.tokens


def test_same_bucket_compiles_nothing(window16):
    model, _ = window16
    generate(model, [_ids(20, 1)], max_new_tokens=4)
    prefill = engine._prefill_chunk._cache_size()
    decode = engine._decode._cache_size()
    generate(model, [_ids(25, 2)], max_new_tokens=4)
    generate(model, [_ids(31, 3)], max_new_tokens=4, temperature=0.7, top_k=5, seed=3)
    assert engine._prefill_chunk._cache_size() == prefill
    assert engine._decode._cache_size() == decode


def test_eos_and_stop_sequences_end_on_device(window16):
    model, _ = window16
    prompt = _ids(24, 1)
    free = generate(model, [prompt], max_new_tokens=30)[0].tokens
    eos = free[5]
    model.config = model.config.replace(eos_token_ids=(eos,))
    try:
        out = generate(model, [prompt], max_new_tokens=30)[0]
        # EOS as the last token allowed is still a stop (OpenAI and vLLM say "stop" too)
        last = generate(model, [prompt], max_new_tokens=free.index(eos) + 1)[0]
    finally:
        model.config = model.config.replace(eos_token_ids=(2,))
    assert out.tokens == last.tokens == free[: free.index(eos) + 1]
    assert out.finish_reason == last.finish_reason == "stop"
    stop_seq = free[10:12]
    out = generate(model, [prompt], max_new_tokens=30, stop=[stop_seq])[0]
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop_seq)
    assert out.tokens == free[: first + 2] and out.finish_reason == "stop"
    # stop sequences of different lengths in one list: the short one still fires
    never = [t for t in range(3, 200) if t not in free][:2]
    out = generate(model, [prompt], max_new_tokens=30, stop=[never, [free[5]]])[0]
    assert out.tokens == free[: free.index(free[5]) + 1] and out.finish_reason == "stop"


def test_sampling_through_generate(window16):
    model, _ = window16
    prompts = [_ids(12, 4), _ids(7, 5)]
    greedy = generate(model, prompts, max_new_tokens=20)
    top1 = generate(model, prompts, max_new_tokens=20, temperature=0.9, top_k=1, seed=7)
    assert [g.tokens for g in greedy] == [t.tokens for t in top1]
    a = generate(model, prompts, max_new_tokens=20, temperature=1.5, seed=11)
    b = generate(model, prompts, max_new_tokens=20, temperature=1.5, seed=11)
    c = generate(model, prompts, max_new_tokens=20, temperature=1.5, seed=12)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_logprobs_are_the_model_distribution(window16):
    model, hf_model = window16
    prompt = _ids(10, 8)
    out = generate(model, [prompt], max_new_tokens=6, logprobs=True, temperature=1.0, seed=1)[0]
    full = _hf_full_logits(hf_model, prompt + out.tokens)
    logp = torch.log_softmax(torch.tensor(full), -1).numpy()
    expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out.tokens)]
    assert out.logprobs is not None
    assert np.abs(np.asarray(out.logprobs) - expected).max() < 1e-4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_top_logprobs_are_the_model_distribution(window16, temperature):
    """Per step, the n most likely tokens of transformers' distribution, with their logprobs;
    across decode chunks (decode_steps=3) and for two rows of different lengths."""
    model, hf_model = window16
    prompts, n = [_ids(10, 8), _ids(4, 9)], 4
    options = EngineOptions(decode_steps=3)
    outs = generate(
        model, prompts, max_new_tokens=7, logprobs=True, top_logprobs=n, temperature=temperature,
        seed=3, options=options,
    )  # fmt: skip
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.tokens) == 7
        logp = torch.log_softmax(torch.tensor(_hf_full_logits(hf_model, prompt + out.tokens)), -1)
        for i, pairs in enumerate(out.top_logprobs):
            want_lp, want_ids = torch.topk(logp[len(prompt) - 1 + i], n)
            assert [t for t, _ in pairs] == want_ids.tolist()
            np.testing.assert_allclose([lp for _, lp in pairs], want_lp.numpy(), atol=1e-4)
        if temperature == 0.0:  # the greedy token is the most likely one, with the same logprob
            assert [p[0][0] for p in out.top_logprobs] == out.tokens
            assert [p[0][1] for p in out.top_logprobs] == out.logprobs


def test_top_logprobs_must_fit_the_vocabulary(window16):
    model, _ = window16
    for bad in (-1, model.config.vocab_size + 1, 2.5):
        with pytest.raises(MistralNNXError, match="top_logprobs must be an integer"):
            generate(model, [[1, 2]], max_new_tokens=2, top_logprobs=bad)


def test_stream_yields_increments(window16):
    """Chunks of decode_steps tokens per row, which join to transformers' greedy tokens."""
    model, hf_model = window16
    prompts = [_ids(5, 1), _ids(9, 2)]
    options = EngineOptions(decode_steps=4)
    pieces: dict[int, list[list[int]]] = {0: [], 1: []}
    for delta in stream(model, prompts, max_new_tokens=13, options=options):
        pieces[delta.index].append(delta.tokens)
    for row, prompt in enumerate(prompts):
        ref = hf_greedy(hf_model, prompt, 13)
        assert [len(p) for p in pieces[row]] == [1, 4, 4, 4]  # first token, then chunks of 4
        assert sum(pieces[row], []) == ref


def test_capacity_errors(window16):
    model, _ = window16
    with pytest.raises(MistralNNXError, match="exceeds the cache's max_seq_len 64"):
        generate(model, [_ids(40, 1)], max_new_tokens=30, options=EngineOptions(max_seq_len=64))
    with pytest.raises(MistralNNXError, match="max_new_tokens"):
        generate(model, [_ids(4, 1)], max_new_tokens=0)
    with pytest.raises(MistralNNXError, match="top_p"):
        generate(model, [_ids(4, 1)], max_new_tokens=3, top_p=1.5)
    with pytest.raises(MistralNNXError, match="prompts"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(MistralNNXError, match="tokenizer"):
        generate(model, ["hello"], max_new_tokens=3)


def test_ring_memory_stops_at_window(window16):
    model, _ = window16
    small = init_cache(model.config, 2, 256)
    large = init_cache(model.config, 2, 4096)
    assert small.nbytes() == large.nbytes()  # every layer is a window-16 ring
    assert small.layers[0].k.shape == (2, 2, 16, 16)


def test_cache_is_donated_to_the_step_functions(window16):
    """The decode step reuses the cache buffers in place: the caller's copy is consumed."""
    from flax import nnx

    model, _ = window16
    graphdef, params = nnx.split(model)
    cache = init_cache(model.config, 1, 64)
    before = cache.layers[0].k
    tokens = jnp.zeros((1, 16), jnp.int32)
    positions = jnp.arange(16, dtype=jnp.int32)[None]
    lengths = jnp.asarray([16], jnp.int32)
    logits = jnp.zeros((1, model.config.vocab_size), jnp.float32)
    new_cache, _ = engine._prefill_chunk(
        graphdef, params, cache, tokens, positions, lengths, logits, None
    )
    assert before.is_deleted()
    assert not new_cache.layers[0].k.is_deleted()


def test_short_lived_prefill_without_ynnpack(window16, monkeypatch):
    """EngineOptions(short_lived=True) (the CLI's): a one-chunk prompt goes through the prefill
    compiled without YNNPACK fusions, a longer one through the usual program; both give
    transformers' logits and the usual greedy tokens."""
    from flax import nnx

    model, hf_model = window16
    graphdef, params = nnx.split(model)
    vocab = model.config.vocab_size
    text = {}
    for name, step in (("plain", engine._prefill_chunk_plain), ("usual", engine._prefill_chunk)):
        cache = init_cache(model.config, 8, 64)
        args = (jnp.zeros((8, 32), jnp.int32), jnp.zeros((8, 32), jnp.int32))
        lowered = step.lower(
            graphdef, params, cache, *args, args[0][:, 0], jnp.zeros((8, vocab)), None
        )
        text[name] = lowered.compile().as_text()
    if jax.default_backend() == "cpu":
        assert "%ynn_fusion" in text["usual"] and "%ynn_fusion" not in text["plain"]

    ids = _ids(30, 4)
    reference = _hf_full_logits(hf_model, ids)[-1]
    used = []
    for name in ("_prefill_chunk", "_prefill_chunk_plain"):
        real = getattr(engine, name)
        spy = lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(engine, name, spy)
    cases = (
        (True, 32, "_prefill_chunk_plain"),
        (True, 16, "_prefill_chunk"),
        (False, 32, "_prefill_chunk"),
    )
    for short_lived, chunk, program in cases:
        used.clear()
        cache = init_cache(model.config, 1, 64)
        _, logits = engine.prefill(
            graphdef, params, cache, [ids], 32, chunk, vocab, None, short_lived
        )
        assert np.abs(np.asarray(logits[0]) - reference).max() < 1e-4
        assert set(used) == {program}, (short_lived, chunk, used)
    usual = generate(model, [ids], max_new_tokens=12)[0].tokens
    options = EngineOptions(short_lived=True)
    assert generate(model, [ids], max_new_tokens=12, options=options)[0].tokens == usual
    with pytest.raises(MistralNNXError, match="EngineOptions.short_lived must be True or False"):
        EngineOptions(short_lived=1)  # type: ignore[arg-type]


def test_engine_traces_each_distinct_layer_once(hf_checkpoints, monkeypatch):
    """Inside the engine's programs a decoder layer is a function of its own: traced once per
    distinct layer (the interleaved model: sliding and full) in each program, not once per layer,
    and it computes exactly what the layers written out compute."""
    from mistral_nnx import model as model_module
    from mistral_nnx.model import DecoderLayer

    directory, hf_model = hf_checkpoints["interleaved"]
    model = mn.load_model(directory, progress=False)
    assert len(set(model.config.layer_windows)) == 2 and len(model.config.layer_windows) == 4
    traced = []
    real_call = DecoderLayer.__call__
    monkeypatch.setattr(
        DecoderLayer, "__call__", lambda self, *a, **k: traced.append(1) or real_call(self, *a, **k)
    )
    ids = _ids(40, 8)
    # Three programs: the first prefill chunk, a later chunk (the cache is no longer empty), and
    # the decode loop.
    options = EngineOptions(prefill_chunk=32, decode_steps=8)
    results, counts = [], []
    for kind in ("layer programs", "written out"):
        if kind == "written out":
            monkeypatch.setattr(
                model_module,
                "_layer_program",
                lambda graphdef, state, *args, empty_cache, sharder, attention_path, weight_first: (
                    nnx.merge(graphdef, state)(*args, empty_cache, weight_first)
                ),
            )
        jax.clear_caches()  # every program traced afresh
        traced.clear()
        results.append(generate(model, [ids], max_new_tokens=20, logprobs=True, options=options)[0])
        counts.append(len(traced))
    assert counts == [3 * 2, 3 * 4]
    programs, written_out = results
    assert programs.tokens == written_out.tokens
    np.testing.assert_array_equal(programs.logprobs, written_out.logprobs)
    assert programs.tokens == hf_greedy(hf_model, ids, 20)  # both transformers' continuation


def test_out_of_vocab_prompt_and_bad_options(window16):
    model, _ = window16
    with pytest.raises(MistralNNXError, match=r"prompts\[0\] has token id 5000 outside"):
        generate(model, [[1, 2, 5000]], max_new_tokens=3)
    with pytest.raises(MistralNNXError, match="token id -1"):
        generate(model, [[-1]], max_new_tokens=3)
    for field in ("prefill_chunk", "decode_steps", "min_bucket", "max_seq_len"):
        with pytest.raises(MistralNNXError, match=f"EngineOptions.{field} must be a positive"):
            EngineOptions(**{field: 0})
    with pytest.raises(MistralNNXError, match="stop entries must be strings or token-id lists"):
        generate(model, [[1, 2]], max_new_tokens=3, stop=[[1], 2.5])


def test_cache_never_wraps_a_full_layer(hf_checkpoints):
    """A full-attention cache asked to hold a position past its end drops it (no overwrite)."""
    model = mn.load_model(hf_checkpoints["llama"][0], progress=False)
    cache = init_cache(model.config, 1, 8)
    _, cache = model.forward(jnp.arange(8, dtype=jnp.int32)[None], None, None, cache)
    before = np.asarray(cache.layers[0].k)
    _, cache = model.forward(
        jnp.asarray([[3]], jnp.int32), jnp.asarray([[8]], jnp.int32), None, cache
    )
    assert np.array_equal(np.asarray(cache.layers[0].k), before)
    assert np.asarray(cache.layers[0].pos).tolist() == [list(range(8))]


def test_long_full_cache_reads_growing_prefixes(hf_checkpoints):
    """A 1024-slot full-attention cache is read through prefixes of 256 / 512 / 1024 slots,
    picked on the device: decoding across the 256 boundary stays exact, in one compile."""
    from mistral_nnx.model import PREFIX_MIN

    directory, hf_model = hf_checkpoints["llama"]
    model = mn.load_model(directory, progress=False)
    ids = _ids(300, 9)
    reference = _hf_full_logits(hf_model, ids)
    cache = init_cache(model.config, 1, 1024)
    assert 1024 // 4 == PREFIX_MIN  # so the prefixes are 256, 512 and 1024 slots
    step = jax.jit(lambda tok, pos, cache: model.forward(tok, pos, None, cache))
    logits, cache = step(
        jnp.asarray([ids[:240]], jnp.int32), jnp.arange(240, dtype=jnp.int32)[None], cache
    )
    got = [np.asarray(logits[0])]
    for i in range(240, 300):
        logits, cache = step(
            jnp.asarray([[ids[i]]], jnp.int32), jnp.asarray([[i]], jnp.int32), cache
        )
        got.append(np.asarray(logits[0]))
    assert np.abs(np.concatenate(got) - reference).max() < 1e-4
    assert step._cache_size() == 2  # the prefill shape and the decode shape, nothing more


@pytest.mark.parametrize("ring", [True, False])
def test_a_chunk_writes_each_slot_at_most_once(ring):
    """Ragged starts and padding, chunks longer than the ring: each row writes its newest C
    valid tokens (ring; all of them in a full layer, which the engine never lets run past C) at
    position % C, never two to one slot (XLA:CPU applies duplicate scatter indices in order,
    GPUs in no defined order, so k, v and pos could each keep another token)."""
    from mistral_nnx.cache import LayerKV

    c, t = (16 if ring else 80), 40
    rng = np.random.default_rng(0)
    layer = LayerKV(jnp.zeros((6, 1, c, 2)), jnp.zeros((6, 1, 2, c)), jnp.full((6, c), -1), ring)
    positions = rng.integers(0, 30, 6)[:, None] + np.arange(t)[None]
    valid = np.arange(t)[None] < rng.integers(1, t + 1, 6)[:, None]  # right padding
    valid[0] = False  # an all-padding row writes nothing
    slots = np.asarray(layer.slots(jnp.asarray(positions), jnp.asarray(valid)))
    for row in range(6):
        mine = positions[row][valid[row]]
        want = mine[mine > mine.max() - c] if mine.size else mine
        written = slots[row] < c
        assert sorted(positions[row][written]) == sorted(want)
        assert np.array_equal(slots[row][written], positions[row][written] % c)
        assert len(set(slots[row][written])) == written.sum()
