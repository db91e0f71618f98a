"""Prefill / decode step functions, the on-device decode loop, generate() and stream().

The hot path is `jax.jit` over `nnx.split` state (graphdef static, cache donated). Prompts are
padded to length buckets and fed in fixed-size chunks, so a new prompt length in the same bucket
compiles nothing. Decoding runs `decode_steps` tokens per host round trip in a `lax.while_loop`
that checks EOS ids, stop token sequences and max_new_tokens on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.cache import KVCache, init_cache
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sampling import BatchSampling, SamplingParams, sample
from mistral_nnx.sharding import Sharder, activation_sharding, host_local_array, replicate
from mistral_nnx.tokenizer import StreamDetokenizer, Tokenizer

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
_FINISH_NAMES = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


@dataclasses.dataclass
class Completion:
    """One prompt's result: the new token ids (EOS included when generated), the text (with a
    tokenizer; stop strings cut off), why it ended, the chosen tokens' logprobs if asked, and per
    token the `top_logprobs` most likely (token id, logprob) pairs if asked."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class Delta:
    """An increment of one sequence, yielded by stream()."""

    index: int
    tokens: list[int]
    text: str | None
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, most likely first


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    max_seq_len: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk: int = 512  # prompt tokens per prefill call (chunked prefill)
    decode_steps: int = 32  # decode steps per host round trip
    min_bucket: int = 16  # smallest prompt-length bucket
    # The process runs its prefill program once (`mistral-nnx generate`). On CPU a prompt that
    # fits in one chunk is then prefilled without XLA's YNNPACK dot library: YNNPACK sets up each
    # of its fused ops on a program's first run in a process (~4 ms each, 1.5 s for SmolLM2's
    # 389), which costs more than its faster products save on one run (T=64: 0.31 s plain against
    # 1.6 s, T=512: 1.6 s against 3.0 s; benchmarks/RESULTS.md section 12). Repeated runs (chat,
    # servers, benchmarks, the Python API by default) keep it: 2.2x faster at T=64 once set up.
    short_lived: bool = False

    def __post_init__(self) -> None:
        for name in ("prefill_chunk", "decode_steps", "min_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MistralNNXError(
                    f"EngineOptions.{name} must be a positive integer, got {value!r}"
                )
        if not isinstance(self.short_lived, bool):
            raise MistralNNXError(
                f"EngineOptions.short_lived must be True or False, got {self.short_lived!r}"
            )
        if self.max_seq_len is not None and (
            not isinstance(self.max_seq_len, int) or self.max_seq_len < 1
        ):
            raise MistralNNXError(
                f"EngineOptions.max_seq_len must be a positive integer, got {self.max_seq_len!r}"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    token: jax.Array  # [B] last emitted token, fed at the next step
    position: jax.Array  # [B] position of `token`
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] FINISH_*
    count: jax.Array  # [B] tokens emitted so far
    history: jax.Array  # [B, L] the last L emitted tokens (for stop sequences), -1 = none
    key: jax.Array  # [B] one PRNG key per row (or one key for all rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopRules:
    eos_ids: jax.Array  # [E], or [B, E] per row (-3 = none)
    sequences: jax.Array  # [S, L] or [B, S, L] right-aligned token sequences, -2 = wildcard
    max_new: jax.Array  # [B]


# ---- jitted step functions (module level: one compile cache shared by every call) -----------


def _prefill_body(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    last_logits: jax.Array,
    sharder: Sharder | None,
    fresh: bool = False,
) -> tuple[KVCache, jax.Array]:
    """Feed one chunk of the (right-padded) prompts; keep the logits of each last prompt token.
    `fresh`: the cache is empty (the first chunk); attention then reads only the chunk's keys."""
    with activation_sharding(sharder):
        model = nnx.merge(graphdef, state)
        valid = positions < lengths[:, None]
        last = lengths - 1
        index = jnp.clip(last - positions[:, 0], 0, tokens.shape[1] - 1)
        logits, new_cache = model.forward(
            tokens, positions, valid, cache, logit_index=index, empty_cache=fresh
        )
        here = (last >= positions[:, 0]) & (last <= positions[:, -1])
        assert new_cache is not None
        return new_cache, jnp.where(here[:, None], logits, last_logits)


_jit_prefill = functools.partial(
    jax.jit, static_argnames=("graphdef", "sharder", "fresh"), donate_argnames=("cache",)
)
_prefill_chunk = _jit_prefill(_prefill_body)
# XLA:CPU's own dot emitter instead of YNNPACK's (see EngineOptions.short_lived).
_prefill_chunk_plain = _jit_prefill(
    _prefill_body, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}
)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    prompts: Sequence[Sequence[int]],
    padded_len: int,
    chunk: int,
    vocab_size: int,
    sharder: Sharder | None,
    short_lived: bool = False,
) -> tuple[KVCache, jax.Array]:
    """Prompts (right-padded to `padded_len`) through `cache` in chunks of `chunk` tokens;
    returns the cache and each prompt's last-token logits [B, vocab]. Chunks past the longest
    prompt are pure padding and skipped. Shared by `stream` and the batching engine.
    `short_lived`: see EngineOptions."""
    b, longest = len(prompts), max(len(p) for p in prompts)
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    # Host arrays go in by device_put: a jnp constructor would trace and dispatch a small
    # program of its own, a few ms each in a fresh process (cold start).
    lengths = jax.device_put(np.asarray([len(p) for p in prompts], np.int32))
    logits = jax.device_put(np.zeros((b, vocab_size), np.float32))
    one_run = short_lived and longest <= chunk and jax.default_backend() == "cpu"
    step = _prefill_chunk_plain if one_run else _prefill_chunk
    for start in range(0, longest, chunk):  # padded_len >= longest: the rest is padding
        positions = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (b, chunk))
        cache, logits = step(
            graphdef,
            params,
            cache,
            jax.device_put(tokens[:, start : start + chunk]),
            jax.device_put(positions),
            lengths,
            logits,
            sharder,
            fresh=start == 0,
        )
    return cache, logits


def _finish_check(state: DecodeState, new: jax.Array, rules: StopRules) -> DecodeState:
    """Update history/count/done after emitting `new` [B] for the rows not yet done."""
    active = ~state.done
    history = jnp.where(
        active[:, None],
        jnp.concatenate([state.history[:, 1:], new[:, None]], axis=1),
        state.history,
    )
    count = state.count + active
    eos = rules.eos_ids if rules.eos_ids.ndim == 2 else rules.eos_ids[None, :]
    is_eos = jnp.any(new[:, None] == eos, axis=1)
    seqs = rules.sequences if rules.sequences.ndim == 3 else rules.sequences[None]
    matches = (seqs == history[:, None]) | (seqs == -2)
    is_stop_seq = jnp.any(jnp.all(matches, axis=-1), axis=-1) if seqs.shape[1] else False
    stop = active & (is_eos | is_stop_seq)
    length = active & ~stop & (count >= rules.max_new)
    finish = jnp.where(stop, FINISH_STOP, jnp.where(length, FINISH_LENGTH, state.finish))
    return dataclasses.replace(
        state,
        token=jnp.where(active, new, state.token),
        done=state.done | stop | length,
        finish=finish,
        count=count,
        history=history,
    )


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next key, key to use now), for one key or one key per row."""
    if key.ndim == 0:
        key, sub = jax.random.split(key)
        return key, sub
    pairs = jax.vmap(jax.random.split)(key)
    return pairs[:, 0], pairs[:, 1]


def row_keys(seed: int | Sequence[int], batch: int) -> jax.Array:
    """One PRNG key per row, so that a row's samples never depend on the other rows.

    One seed for the batch: row i draws from (seed, i). A list: row i draws from (seed[i], 0), so
    a request keeps its output whatever else is batched with it. Seeds are integers in
    [0, 2**64); those below 2**32 give the same stream as `jax.random.key(seed)` folded with i.
    """
    if _is_int(seed):
        seeds, indices = [int(seed)] * batch, list(range(batch))  # type: ignore[arg-type]
    elif isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != batch or not all(_is_int(x) for x in seed):
            raise MistralNNXError(
                f"seed must be an integer or a list of {batch} integers (one per prompt), "
                f"got {seed!r}"
            )
        seeds, indices = [int(x) for x in seed], [0] * batch
    else:
        raise MistralNNXError(f"seed must be an integer or a list of integers, got {seed!r}")
    return _keys(seeds, indices)


def row_key(seed: int, index: int) -> jax.Array:
    """The key [1] of row `index` of `row_keys(seed, batch)` for any batch > index (the serving
    engine's n-th choice of a seeded request), from one [1]-shaped program for every index."""
    return _keys([seed], [index])


def _keys(seeds: list[int], indices: list[int]) -> jax.Array:
    bad = [x for x in seeds if not 0 <= x < 2**64]
    if bad:
        raise MistralNNXError(f"seed must be in [0, 2**64), got {bad[0]}")
    words = np.array([[x >> 32, x & 0xFFFFFFFF] for x in seeds], np.uint32)
    return _fold_keys(words, np.asarray(indices, np.uint32))


@jax.jit
def _fold_keys(words: jax.Array, indices: jax.Array) -> jax.Array:
    """Key data [B, 2] folded with [B] indices; one program rather than one per op."""
    keys = jax.vmap(jax.random.wrap_key_data)(words)
    return jax.vmap(jax.random.fold_in)(keys, indices)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _top(logits: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The n most likely tokens of each row and their logprobs ([B, n] each), computed as
    sample() computes the chosen token's: logit - logsumexp(logits), so the two agree exactly."""
    logits = logits.astype(jnp.float32)
    if n == 0:
        b = logits.shape[0]
        return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
    values, ids = jax.lax.top_k(logits, n)
    return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("top_n", "greedy"), donate_argnames=("state",))
def _start(
    logits: jax.Array,
    state: DecodeState,
    sampling: BatchSampling,
    rules: StopRules,
    top_n: int,
    greedy: bool = False,
) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sample the first new token from the prefill logits (and the `top_n` most likely).
    `greedy`: every row is greedy (see `sample`'s greedy_only)."""
    key, sub = _split(state.key)
    token, logprob = sample(logits, sub, sampling, greedy)
    state = _finish_check(dataclasses.replace(state, key=key), token, rules)
    top_ids, top_lp = _top(logits, top_n)
    return state, token[:, None], logprob[:, None], top_ids[:, None], top_lp[:, None]


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "steps", "sharder", "top_n"),
    donate_argnames=("cache", "state"),
)
def _decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    state: DecodeState,
    sampling: BatchSampling,
    rules: StopRules,
    steps: int,
    sharder: Sharder | None,
    top_n: int = 0,
) -> tuple[KVCache, DecodeState, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Up to `steps` decode steps on the device; stops early once every row is done. Returns
    the tokens [B, steps] (-1 past a row's end), their logprobs, and the ids and logprobs of the
    `top_n` most likely tokens at each step [B, steps, top_n]."""
    b = state.token.shape[0]
    with activation_sharding(sharder):
        model = nnx.merge(graphdef, params)

        def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
            i, cache, st, out_tok, out_lp, top_ids, top_lp = carry
            position = st.position + 1
            logits, cache = model.forward(
                st.token[:, None],
                position[:, None],
                ~st.done[:, None],
                cache,
                logit_index=jnp.zeros((b,), jnp.int32),
            )
            key, sub = _split(st.key)
            token, logprob = sample(logits, sub, sampling)
            was_active = ~st.done
            st = _finish_check(
                dataclasses.replace(
                    st, key=key, position=jnp.where(was_active, position, st.position)
                ),
                token,
                rules,
            )
            out_tok = out_tok.at[:, i].set(jnp.where(was_active, token, -1))
            out_lp = out_lp.at[:, i].set(logprob)
            step_ids, step_lp = _top(logits, top_n)
            top_ids, top_lp = top_ids.at[:, i].set(step_ids), top_lp.at[:, i].set(step_lp)
            return i + 1, cache, st, out_tok, out_lp, top_ids, top_lp

        def cond(carry: tuple[Any, ...]) -> jax.Array:
            return (carry[0] < steps) & ~jnp.all(carry[2].done)

        out_tok = jnp.full((b, steps), -1, jnp.int32)
        out_lp = jnp.zeros((b, steps), jnp.float32)
        top_ids = jnp.zeros((b, steps, top_n), jnp.int32)
        top_lp = jnp.zeros((b, steps, top_n), jnp.float32)
        _, cache, state, out_tok, out_lp, top_ids, top_lp = jax.lax.while_loop(
            cond, body, (jnp.int32(0), cache, state, out_tok, out_lp, top_ids, top_lp)
        )
        # What the host reads comes back replicated: every process can read it (multi-host).
        out_tok, out_lp = replicate(out_tok), replicate(out_lp)
        top_ids, top_lp = replicate(top_ids), replicate(top_lp)
        state = dataclasses.replace(
            state, done=replicate(state.done), finish=replicate(state.finish)
        )
    return cache, state, out_tok, out_lp, top_ids, top_lp


# ---- host side ------------------------------------------------------------------------------


def _bucket(n: int, minimum: int, chunk: int) -> int:
    """Prompt-length bucket: powers of two up to the chunk size, then multiples of it."""
    if n > chunk:
        return -(-n // chunk) * chunk
    size = minimum
    while size < n:
        size *= 2
    return min(size, chunk)


def _prepare_prompts(
    prompts: Sequence[str | Sequence[int]], tokenizer: Tokenizer | None, vocab_size: int
) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise MistralNNXError("prompts must be a non-empty list of strings or token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise MistralNNXError(f"prompts[{i}] is a string but no tokenizer was given")
            ids = tokenizer.encode(p)
        elif isinstance(p, Sequence) or isinstance(p, np.ndarray):
            if not all(_is_int(t) for t in p):
                wrong = next(t for t in p if not _is_int(t))
                raise MistralNNXError(f"prompts[{i}] holds {wrong!r}; token ids must be integers")
            ids = [int(t) for t in p]
        else:
            raise MistralNNXError(
                f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}"
            )
        if not ids:
            raise MistralNNXError(f"prompts[{i}] is empty")
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            raise MistralNNXError(
                f"prompts[{i}] has token id {outside[0]} outside the vocabulary "
                f"(0..{vocab_size - 1})"
            )
        out.append(ids)
    return out


def _stop_rules(
    stop: Sequence[str | Sequence[int]] | None,
    tokenizer: Tokenizer | None,
    eos_ids: Sequence[int],
    max_new: list[int],
) -> tuple[StopRules, list[str], list[list[int]]]:
    """Token-id stop sequences go to the device; stop strings are matched on the host text."""
    sequences: list[list[int]] = []
    strings: list[str] = []
    if stop is not None and not isinstance(stop, (str, Sequence)):
        raise MistralNNXError(
            f"stop must be a string, a list of strings and/or token-id lists, or None; got {stop!r}"
        )
    if isinstance(stop, str) or (
        isinstance(stop, Sequence) and stop and all(_is_int(t) for t in stop)
    ):
        stop = [stop]  # type: ignore[list-item]  # one stop string / one token sequence
    for s in stop or ():
        if isinstance(s, str):
            if tokenizer is None:
                raise MistralNNXError("stop strings need a tokenizer (or pass token-id lists)")
            if not s:
                raise MistralNNXError("stop strings must not be empty")
            strings.append(s)
        else:
            if not isinstance(s, Sequence) or not all(_is_int(t) for t in s):
                raise MistralNNXError(f"stop entries must be strings or token-id lists, got {s!r}")
            seq = [int(t) for t in s]
            if not seq:
                raise MistralNNXError("stop token sequences must not be empty")
            sequences.append(seq)
    width = max([len(s) for s in sequences] + [1])
    table = np.full((len(sequences), width), -2, np.int32)
    for row, seq in zip(table, sequences, strict=True):
        row[width - len(seq) :] = seq
    eos = np.asarray(list(eos_ids) or [-3], np.int32)
    put = jax.device_put  # not jnp.asarray: no program per array (cold start)
    rules = StopRules(put(eos), put(table), put(np.asarray(max_new, np.int32)))
    return rules, strings, sequences


def stream(
    model: Mistral,
    prompts: Sequence[str | Sequence[int]],
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | Sequence[int] = 0,
    stop: Sequence[str | Sequence[int]] | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    options: EngineOptions | None = None,
    stats: dict[str, float] | None = None,
) -> Iterator[Delta]:
    """Generate for a batch of prompts, yielding each sequence's increments chunk by chunk.

    `seed` is one integer for the batch (row i samples from (seed, i)) or one per prompt (a row's
    output then depends only on its prompt and its seed, never on the rest of the batch). The text
    of a sequence that a stop string, a stop token sequence or EOS ended never holds that stop;
    its `tokens` end with the token that stopped it. `logprobs` adds each chosen token's logprob,
    `top_logprobs=n` the n most likely (token id, logprob) pairs at each step; both are of the
    model's own distribution (before temperature and filters), as in vLLM.
    """
    options = options or EngineOptions()
    if not isinstance(options, EngineOptions):
        raise MistralNNXError(f"options must be an EngineOptions, got {type(options).__name__}")
    sampling_params = SamplingParams(temperature, top_k, top_p, min_p)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise MistralNNXError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids = _prepare_prompts(prompts, tokenizer, model.config.vocab_size)
    check_top_logprobs(top_logprobs, model.config.vocab_size)
    config = model.config
    b = len(ids)
    keys = row_keys(seed, b)
    lengths = [len(p) for p in ids]
    if options.max_seq_len is not None and options.max_seq_len > config.max_position_embeddings:
        raise MistralNNXError(
            f"EngineOptions.max_seq_len {options.max_seq_len} exceeds the model's context length "
            f"(max_position_embeddings {config.max_position_embeddings})"
        )
    max_seq = options.max_seq_len or config.max_position_embeddings
    if max(lengths) + max_new_tokens > max_seq:
        raise MistralNNXError(
            f"prompt of {max(lengths)} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"cache's max_seq_len {max_seq}"
        )
    prompt_len = _bucket(max(lengths), options.min_bucket, options.prefill_chunk)
    cache_len = min(_bucket(prompt_len + max_new_tokens, 64, 1 << 30), max_seq)
    eos_ids = tokenizer.eos_ids if tokenizer is not None else config.eos_token_ids
    rules, stop_strings, stop_sequences = _stop_rules(
        stop, tokenizer, eos_ids, [max_new_tokens] * b
    )
    sampling = BatchSampling.from_params(sampling_params, b)
    sharder = model.sharder  # the mesh + rules of load_model(mesh=...), if any
    graphdef, params = nnx.split(model)

    t0 = time.perf_counter()
    cache_sharding = None if sharder is None else functools.partial(sharder, strict=False)
    cache = init_cache(config, b, cache_len, model.dtype, cache_sharding)
    chunk = min(prompt_len, options.prefill_chunk)
    cache, last_logits = prefill(
        graphdef,
        params,
        cache,
        ids,
        prompt_len,
        chunk,
        config.vocab_size,
        sharder,
        options.short_lived,
    )
    history_len = max(1, rules.sequences.shape[1])
    put = jax.device_put  # host arrays in without a program each (cold start)
    state = DecodeState(
        token=put(np.zeros((b,), np.int32)),
        position=put(np.asarray(lengths, np.int32) - 1),
        done=put(np.zeros((b,), bool)),
        finish=put(np.zeros((b,), np.int32)),
        count=put(np.zeros((b,), np.int32)),
        history=put(np.full((b, history_len), -1, np.int32)),
        key=keys,
    )
    # All greedy: the first token's program then holds no sampling code, which is less to trace
    # and lower in a fresh process (a small program: two variants cost little). The decode
    # program stays one for every setting, so switching settings never recompiles it.
    greedy = sampling_params.temperature == 0.0
    state, out_tok, out_lp, top_ids, top_lp = _start(
        last_logits, state, sampling, rules, top_logprobs, greedy
    )
    first_token_time = None

    text_stops = stop_sequences + [[int(e)] for e in eos_ids]  # cut from the text like strings
    rows = [_RowOutput(tokenizer, stop_strings, text_stops) for _ in range(b)]
    generated = 0
    while True:
        tok_np, lp_np = host_local_array(out_tok), host_local_array(out_lp)
        top_ids_np, top_lp_np = host_local_array(top_ids), host_local_array(top_lp)
        done_np, finish_np = host_local_array(state.done), host_local_array(state.finish)
        if first_token_time is None:
            first_token_time = time.perf_counter() - t0
        force_done = []
        for i, row in enumerate(rows):
            if row.finished:
                continue
            valid = tok_np[i] >= 0
            new = [int(t) for t in tok_np[i][valid]]
            lps = [float(x) for x in lp_np[i][valid]]
            tops = top_pairs(top_ids_np[i][valid], top_lp_np[i][valid]) if top_logprobs else None
            reason = _FINISH_NAMES.get(int(finish_np[i])) if done_np[i] else None
            delta = row.advance(i, new, lps, reason, logprobs, tops)
            generated += len(delta.tokens)
            if delta.finish_reason == "stop" and reason is None:
                force_done.append(i)  # a stop string ended it: tell the device
            if delta.tokens or delta.text or delta.finish_reason:
                yield delta
        if all(row.finished for row in rows):
            break
        if force_done:
            mask = np.zeros(b, bool)
            mask[force_done] = True
            state = dataclasses.replace(
                state,
                done=state.done | jnp.asarray(mask),
                finish=jnp.where(jnp.asarray(mask), FINISH_STOP, state.finish),
            )
        cache, state, out_tok, out_lp, top_ids, top_lp = _decode(
            graphdef,
            params,
            cache,
            state,
            sampling,
            rules,
            options.decode_steps,
            sharder,
            top_logprobs,
        )
    if stats is not None:
        elapsed = time.perf_counter() - t0
        stats.update(
            seconds=elapsed,
            tokens=generated,
            first_token_seconds=first_token_time or 0.0,
            tokens_per_second=generated / elapsed if elapsed > 0 else 0.0,
        )
        # Decode rate: tokens after the first of each row, over the time after the first token.
        decode_time = elapsed - (first_token_time or 0.0)
        stats["decode_tokens_per_second"] = (
            (generated - b) / decode_time if decode_time > 0 and generated > b else 0.0
        )


def check_top_logprobs(n: object, vocab_size: int) -> None:
    if not _is_int(n) or not 0 <= n <= vocab_size:  # type: ignore[operator]
        raise MistralNNXError(
            f"top_logprobs must be an integer in 0..{vocab_size} (the vocabulary), got {n!r}"
        )


def top_pairs(ids: np.ndarray, lps: np.ndarray) -> list[list[tuple[int, float]]]:
    """[T, n] ids and logprobs -> per token, the (id, logprob) pairs, most likely first."""
    return [
        [(int(t), float(lp)) for t, lp in zip(row_ids, row_lps, strict=True)]
        for row_ids, row_lps in zip(ids, lps, strict=True)
    ]


class _RowOutput:
    """Host-side bookkeeping of one sequence: incremental text, stop strings and stop tokens.

    Text that could be the start of a stop string is held back until it is known not to be, so
    a stop string split across chunks never leaks its first part; when a stop string completes,
    the text is cut before it and the tokens after the one that completed it are dropped. Stop
    token sequences (EOS included) are cut from the text the same way: tokens that could begin
    one are decoded only once it is known that they do not.
    """

    def __init__(
        self, tokenizer: Tokenizer | None, stop_strings: list[str], stop_tokens: list[list[int]]
    ) -> None:
        self.detok = StreamDetokenizer(tokenizer) if tokenizer is not None else None
        self.stops = stop_strings
        self.stop_tokens = stop_tokens
        self.pending: list[int] = []  # generated ids not decoded yet (may begin a stop sequence)
        self.text = ""  # all text decoded so far, including held-back text
        self.released = 0  # how much of it has been yielded
        self.finished = False

    def advance(
        self,
        index: int,
        tokens: list[int],
        lps: list[float],
        reason: str | None,
        want_lp: bool,
        tops: list[list[tuple[int, float]]] | None = None,
    ) -> Delta:
        if self.detok is None:
            self.finished = reason is not None
            return Delta(index, tokens, None, lps if want_lp else None, reason, tops)
        held = len(self.pending)
        to_decode = self._text_tokens(self.pending + tokens, reason)
        kept = len(tokens)
        if self.stops:
            for n, token in enumerate(to_decode):  # token by token, to know which one stopped
                self.text += self.detok.add([token])
                if n == len(to_decode) - 1 and reason:
                    self.text += self.detok.flush()
                if self._stop_at() is not None:
                    kept, reason = max(0, n + 1 - held), "stop"
                    break
        else:
            self.text += self.detok.add(to_decode) + (self.detok.flush() if reason else "")
        cut = self._stop_at()
        if cut is not None:
            end = cut
        elif reason:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        piece = self.text[self.released : end]
        self.released = end
        self.finished = reason is not None
        top = None if tops is None else tops[:kept]
        return Delta(index, tokens[:kept], piece, lps[:kept] if want_lp else None, reason, top)

    def _text_tokens(self, ids: list[int], reason: str | None) -> list[int]:
        """The ids whose text can be decoded now; the rest wait in `pending`."""
        self.pending = []
        if reason == "stop":  # the device stopped on EOS or a stop sequence: drop it
            for seq in self.stop_tokens:
                if len(ids) >= len(seq) and ids[len(ids) - len(seq) :] == seq:
                    return ids[: len(ids) - len(seq)]
            return ids
        if reason:
            return ids
        hold = 0
        for seq in self.stop_tokens:  # the longest tail that is a proper prefix of a sequence
            for n in range(min(len(seq) - 1, len(ids)), hold, -1):
                if ids[len(ids) - n :] == seq[:n]:
                    hold = n
                    break
        self.pending = ids[len(ids) - hold :] if hold else []
        return ids[: len(ids) - hold]

    def _stop_at(self) -> int | None:
        """Where the earliest stop string starts in the unreleased text, if one is complete."""
        found = [i for s in self.stops if (i := self.text.find(s, self.released)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail = self.text[self.released :]
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best


def generate(
    model: Mistral,
    prompts: Sequence[str | Sequence[int]],
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | Sequence[int] = 0,
    stop: Sequence[str | Sequence[int]] | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    options: EngineOptions | None = None,
    stats: dict[str, float] | None = None,
) -> list[Completion]:
    """One Completion per prompt, in order. See stream() for the arguments."""
    results = [
        Completion(
            [],
            "" if tokenizer else None,
            "length",
            [] if logprobs else None,
            [] if top_logprobs else None,
        )
        for _ in prompts
    ]
    for delta in stream(
        model,
        prompts,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        stop=stop,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        options=options,
        stats=stats,
    ):
        result = results[delta.index]
        result.tokens.extend(delta.tokens)
        if delta.text is not None and result.text is not None:
            result.text += delta.text
        if delta.logprobs is not None and result.logprobs is not None:
            result.logprobs.extend(delta.logprobs)
        if delta.top_logprobs is not None and result.top_logprobs is not None:
            result.top_logprobs.extend(delta.top_logprobs)
        if delta.finish_reason:
            result.finish_reason = delta.finish_reason
    return results


def print_stats(stats: dict[str, float], *, since_launch: float | None = None) -> None:
    """One line on stderr; `since_launch` adds the time since the command started (loading
    included), the time the user actually waited."""
    waited = f"; {since_launch:.2f} s since launch" if since_launch is not None else ""
    print(
        f"[{stats['tokens']:.0f} tokens in {stats['seconds']:.2f} s, "
        f"{stats['tokens_per_second']:.1f} tokens/s; first token after "
        f"{stats['first_token_seconds']:.2f} s, then "
        f"{stats['decode_tokens_per_second']:.1f} tokens/s{waited}]",
        file=sys.stderr,
    )
