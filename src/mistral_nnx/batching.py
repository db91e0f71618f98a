"""Continuous batching: a fixed set of decode slots that requests join and leave between chunks.

One engine thread owns the device. It loops: admit waiting requests into free slots (each is
prefilled alone at batch 1, in prompt-length buckets, then its cache row and decode state are
written into the slot by one jitted update), run `decode_steps` decode steps for every slot on
the device, hand each request its new tokens and text, and free the slots of requests that
finished or were cancelled. Nothing recompiles after `warm_up()`: prefill shapes are the
buckets, the slot index is a traced integer, and the decode step always sees all slots.

A request's output does not depend on the other requests: its prefill runs alone, its decode
row is computed by the same program whatever the other rows hold (finished rows are masked,
never removed), and it samples with its own PRNG key, derived from its seed alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.cache import KVCache, init_cache
from mistral_nnx.engine import (
    _FINISH_NAMES,
    DecodeState,
    Delta,
    StopRules,
    _bucket,
    _decode,
    _RowOutput,
    _start,
    check_top_logprobs,
    prefill,
    row_key,
    row_keys,
    top_pairs,
)
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sampling import BatchSampling, SamplingParams
from mistral_nnx.tokenizer import Tokenizer

__all__ = ["Engine", "QueueFull", "Request", "RequestHandle"]

# Decode steps per host round trip. Each round trip costs a device sync and the Python work of
# every active row; fewer steps give new requests a slot (and the first token) sooner and let a
# cancelled request go sooner. 8 keeps that wait under ~0.3 s on a 2-core CPU for SmolLM2 at
# 16 slots while the round trip stays a small part of a step (measured in benchmarks/serve.py).
DEFAULT_DECODE_STEPS = 8
MAX_STOP_TOKENS = 8  # stop token ids per request (besides EOS)
EOS_SLOTS = 4  # the per-row EOS table's width, wider for a model that lists more EOS ids


class QueueFull(MistralNNXError):
    """Every slot is busy and the waiting queue is at its limit: retry later."""


@dataclasses.dataclass
class Request:
    """One completion to produce."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int | None = None  # None: a random seed
    index: int = 0  # which of a request's n choices: the PRNG stream is (seed, index)
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # the n most likely tokens at each step, at most the engine's limit


class RequestHandle:
    """The caller's side of a submitted request: iterate it for `Delta`s, or `cancel()` it."""

    def __init__(self, request: Request, on_delta: Callable[[Delta], None] | None) -> None:
        self.request = request
        self._queue: queue.SimpleQueue[Delta | BaseException] = queue.SimpleQueue()
        self._on_delta = on_delta
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next chunk boundary."""
        self.cancelled.set()

    def _emit(self, item: Delta | BaseException) -> None:
        if self._on_delta is None:
            self._queue.put(item)
            return
        try:
            self._on_delta(item)  # type: ignore[arg-type]
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop, quietly
            self.cancelled.set()

    def __iter__(self) -> Iterator[Delta]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


@dataclasses.dataclass
class _Slot:
    handle: RequestHandle
    output: _RowOutput
    generated: int = 0


@dataclasses.dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def reset(self) -> None:
        self.running = self.waiting = self.prompt_tokens = self.generated_tokens = 0


class Engine:
    """A continuous-batching engine over `max_slots` decode slots of `max_seq_len` positions."""

    def __init__(
        self,
        model: Mistral,
        tokenizer: Tokenizer | None,
        *,
        max_slots: int = 16,
        max_seq_len: int | None = None,
        decode_steps: int = DEFAULT_DECODE_STEPS,
        prefill_chunk: int = 512,
        max_queue: int = 256,
        min_bucket: int = 16,
        max_top_logprobs: int = 0,
    ) -> None:
        """`max_top_logprobs` > 0 compiles a second decode program that also returns the most
        likely tokens of each step; chunks where no request asks for them run without."""
        config = model.config
        for name, value in (
            ("max_slots", max_slots),
            ("decode_steps", decode_steps),
            ("prefill_chunk", prefill_chunk),
            ("max_queue", max_queue),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MistralNNXError(f"{name} must be a positive integer, got {value!r}")
        check_top_logprobs(max_top_logprobs, config.vocab_size)
        context = config.max_position_embeddings
        max_seq_len = max_seq_len or context
        if max_seq_len > context:
            raise MistralNNXError(
                f"max_seq_len {max_seq_len} exceeds the model's context length {context}"
            )
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_slots, self.max_seq_len = max_slots, max_seq_len
        self.decode_steps, self.max_queue = decode_steps, max_queue
        self.max_top_logprobs = max_top_logprobs
        self.prefill_chunk = min(prefill_chunk, max_seq_len)
        self.min_bucket = min(min_bucket, self.prefill_chunk)
        self.eos_ids = list(tokenizer.eos_ids if tokenizer is not None else config.eos_token_ids)
        self._eos_slots = max(EOS_SLOTS, len(self.eos_ids))
        self._graphdef, self._params = nnx.split(model)
        self._sharder = model.sharder
        self._waiting: deque[RequestHandle] = deque()
        self._slots: list[_Slot | None] = [None] * max_slots
        self._reserved: set[int] = set()  # slots whose request is off the queue, mid-admission
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.error: BaseException | None = None  # set if the engine thread died
        self.ready = threading.Event()  # warm: every program compiled
        self.stats = EngineStats()
        self.on_first_token: Callable[[float], None] | None = None  # seconds since submit
        # (tokens delivered, seconds per decode step or None for a request's first token)
        self.on_tokens: Callable[[int, float | None], None] | None = None
        self._init_device_state()

    # ---- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        """Compile everything, then serve requests on a background thread."""
        self._running = True
        self._thread = threading.Thread(target=self._run, name="mistral-nnx-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything and end the engine thread."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self, request: Request) -> None:
        """Raise MistralNNXError if `request` cannot be served (before queueing it)."""
        n = len(request.prompt)
        if n == 0:
            raise MistralNNXError("the prompt is empty")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise MistralNNXError(
                f"the prompt has token ids outside the vocabulary (0..{vocab - 1})"
            )
        if request.max_tokens < 1:
            raise MistralNNXError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if n + request.max_tokens > self.max_seq_len:
            raise MistralNNXError(
                f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                f"context length {self.max_seq_len}"
            )
        if not 0 <= request.top_logprobs <= self.max_top_logprobs:
            raise MistralNNXError(
                f"top_logprobs must be in 0..{self.max_top_logprobs}, got {request.top_logprobs}"
            )
        if len(request.stop_token_ids) > MAX_STOP_TOKENS:
            raise MistralNNXError(f"at most {MAX_STOP_TOKENS} stop_token_ids are supported")
        if any(not 0 <= t < vocab for t in request.stop_token_ids):
            raise MistralNNXError("stop_token_ids holds ids outside the vocabulary")
        if request.stop and self.tokenizer is None:
            raise MistralNNXError("stop strings need a tokenizer")

    def submit(
        self, request: Request, on_delta: Callable[[Delta], None] | None = None
    ) -> RequestHandle:
        """Queue a request; its deltas go to `on_delta` (called on the engine thread) or to
        the returned handle's iterator. Raises QueueFull when the queue is at its limit."""
        self.check(request)
        if self.error is not None or not self._running:
            raise MistralNNXError("the engine is not running")
        handle = RequestHandle(request, on_delta)
        with self._lock:
            # Requests bound for a free slot do not count against the queue.
            free = sum(
                entry is None and slot not in self._reserved
                for slot, entry in enumerate(self._slots)
            )
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(handle)
            self.stats.waiting = len(self._waiting)
            self._lock.notify_all()
        return handle

    # ---- device state -------------------------------------------------------------------------

    def _init_device_state(self) -> None:
        b, config = self.max_slots, self.config
        cache_sharding = None
        if self._sharder is not None:
            cache_sharding = functools.partial(self._sharder, strict=False)
        self._cache_sharding = cache_sharding
        self.cache: KVCache = init_cache(
            config, b, self.max_seq_len, self.model.dtype, cache_sharding
        )
        self.state = DecodeState(
            token=jnp.zeros((b,), jnp.int32),
            position=jnp.zeros((b,), jnp.int32),
            done=jnp.ones((b,), bool),  # an empty slot is a finished row: masked
            finish=jnp.zeros((b,), jnp.int32),
            count=jnp.zeros((b,), jnp.int32),
            history=jnp.full((b, 1), -1, jnp.int32),
            key=row_keys(0, b),
        )
        self.sampling = BatchSampling.from_params(SamplingParams(), b)
        self.rules = StopRules(
            eos_ids=jnp.full((b, self._eos_slots), -3, jnp.int32),
            sequences=jnp.full((b, MAX_STOP_TOKENS, 1), -3, jnp.int32),
            max_new=jnp.ones((b,), jnp.int32),
        )

    def _eos(self, request: Request) -> list[int]:
        return [] if request.ignore_eos else self.eos_ids

    def _row_tables(self, request: Request) -> tuple[BatchSampling, StopRules, jax.Array]:
        eos = self._eos(request)
        eos_row = np.full((1, self._eos_slots), -3, np.int32)
        eos_row[0, : len(eos)] = eos
        seq_row = np.full((1, MAX_STOP_TOKENS, 1), -3, np.int32)
        seq_row[0, : len(request.stop_token_ids), 0] = list(request.stop_token_ids)
        rules = StopRules(
            eos_ids=jnp.asarray(eos_row),
            sequences=jnp.asarray(seq_row),
            max_new=jnp.asarray([request.max_tokens], jnp.int32),
        )
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8))
        # (seed, index): the stream of row `index` of generate(..., seed=seed).
        key = row_key(seed, request.index)
        return BatchSampling.from_params(request.sampling, 1), rules, key

    def _prefill(self, request: Request) -> tuple[KVCache, jax.Array]:
        """The request's prompt through a fresh one-row cache; the last token's logits."""
        ids = request.prompt
        n = len(ids)
        cache = init_cache(self.config, 1, self.max_seq_len, self.model.dtype, self._cache_sharding)
        padded_len = _bucket(n, self.min_bucket, self.prefill_chunk)
        chunk = min(padded_len, self.prefill_chunk)
        vocab = self.config.vocab_size
        return prefill(
            self._graphdef, self._params, cache, [ids], padded_len, chunk, vocab, self._sharder
        )

    def _admit(self, slot: int, handle: RequestHandle) -> None:
        request = handle.request
        row_cache, logits = self._prefill(request)
        sampling, rules, key = self._row_tables(request)
        row_state = DecodeState(
            token=jnp.zeros((1,), jnp.int32),
            position=jnp.asarray([len(request.prompt) - 1], jnp.int32),
            done=jnp.zeros((1,), bool),
            finish=jnp.zeros((1,), jnp.int32),
            count=jnp.zeros((1,), jnp.int32),
            history=jnp.full((1, 1), -1, jnp.int32),
            key=key,
        )
        top_n = self.max_top_logprobs if request.top_logprobs else 0
        row_state, first, first_lp, top_ids, top_lp = _start(
            logits, row_state, sampling, rules, top_n
        )
        self.cache, self.state, self.sampling, self.rules = _insert(
            self.cache,
            self.state,
            self.sampling,
            self.rules,
            (row_cache, row_state, sampling, rules),
            jnp.int32(slot),
        )
        stops = [[t] for t in request.stop_token_ids] + [[e] for e in self._eos(request)]
        output = _RowOutput(self.tokenizer, list(request.stop), stops)
        self._slots[slot] = _Slot(handle, output)
        self.stats.prompt_tokens += len(request.prompt)
        done = bool(np.asarray(row_state.done)[0])
        finish = int(np.asarray(row_state.finish)[0])
        if self.on_first_token is not None:
            self.on_first_token(time.perf_counter() - handle.submitted)
        self._deliver(
            slot,
            [int(np.asarray(first)[0, 0])],
            [float(np.asarray(first_lp)[0, 0])],
            (np.asarray(top_ids)[0], np.asarray(top_lp)[0]),
            _FINISH_NAMES.get(finish) if done else None,
            None,
        )

    def _deliver(
        self,
        slot: int,
        tokens: list[int],
        lps: list[float],
        top: tuple[np.ndarray, np.ndarray],
        reason: str | None,
        step_seconds: float | None,
    ) -> None:
        """Hand a slot's new tokens to its request; `top` holds the ids and logprobs of the
        most likely tokens at each of those steps ([T, n], n = 0 when nobody asked)."""
        entry = self._slots[slot]
        assert entry is not None
        request = entry.handle.request
        tops = None
        if request.top_logprobs:
            n = request.top_logprobs
            tops = top_pairs(top[0][:, :n], top[1][:, :n])
        delta = entry.output.advance(0, tokens, lps, reason, request.logprobs, tops)
        entry.generated += len(delta.tokens)
        self.stats.generated_tokens += len(delta.tokens)
        if self.on_tokens is not None and delta.tokens:
            self.on_tokens(len(delta.tokens), step_seconds)
        if delta.finish_reason is not None:  # freed before the caller hears it is done
            self._free(slot)
        if delta.tokens or delta.text or delta.finish_reason:
            entry.handle._emit(delta)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._reserved.discard(slot)  # a request can finish on its first token
        self.state = _mark_done(self.state, jnp.int32(slot))

    # ---- the engine thread --------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile every program a request can need: prefill per bucket, start, insert, decode."""
        sizes, size = [], self.min_bucket
        while size < self.prefill_chunk:
            sizes.append(size)
            size *= 2
        sizes.append(self.prefill_chunk)
        if self.prefill_chunk + 1 < self.max_seq_len:
            sizes.append(self.prefill_chunk + 1)  # a second chunk: the logits come committed
        for n in sizes:
            request = Request(prompt=[0] * min(n, self.max_seq_len - 1), max_tokens=1)
            self._admit(0, RequestHandle(request, on_delta=lambda d: None))
        top_sizes = [0]
        if self.max_top_logprobs:  # the programs that also return the most likely tokens
            top_sizes.append(self.max_top_logprobs)
            request = Request([0], max_tokens=1, top_logprobs=self.max_top_logprobs)
            self._admit(0, RequestHandle(request, on_delta=lambda d: None))
        for top_n in top_sizes:
            self._decode_chunk(top_n)
        self._slots = [None] * self.max_slots
        self._init_device_state()
        self.stats.reset()  # in place: the server's metrics hold a reference

    def _decode_chunk(
        self, top_n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.cache, self.state, out_tok, out_lp, top_ids, top_lp = _decode(
            self._graphdef,
            self._params,
            self.cache,
            self.state,
            self.sampling,
            self.rules,
            self.decode_steps,
            self._sharder,
            top_n,
        )
        return (
            np.asarray(out_tok),
            np.asarray(out_lp),
            np.asarray(top_ids),
            np.asarray(top_lp),
            np.asarray(self.state.done),
            np.asarray(self.state.finish),
        )

    def _run(self) -> None:
        try:
            self.warm_up()
            self.ready.set()
            while True:
                with self._lock:
                    while self._running and not self._waiting and not any(self._slots):
                        self._lock.wait(timeout=1.0)
                    if not self._running:
                        break
                self._drop_cancelled()
                self._admit_waiting()
                if not any(self._slots):
                    continue
                started = time.perf_counter()
                wants_top = any(e and e.handle.request.top_logprobs for e in self._slots)
                top_n = self.max_top_logprobs if wants_top else 0
                tokens, lps, top_ids, top_lp, done, finish = self._decode_chunk(top_n)
                per_token = (time.perf_counter() - started) / max(1, self.decode_steps)
                for slot, entry in enumerate(self._slots):
                    if entry is None:
                        continue
                    valid = tokens[slot] >= 0
                    new = [int(t) for t in tokens[slot][valid]]
                    reason = _FINISH_NAMES.get(int(finish[slot])) if done[slot] else None
                    lp = [float(x) for x in lps[slot][valid]]
                    top = (top_ids[slot][valid], top_lp[slot][valid])
                    self._deliver(slot, new, lp, top, reason, per_token)
                self._update_counts()
        except BaseException as err:  # the server reports it (health 503); callers are told
            self.error = err
            for entry in self._slots:
                if entry is not None:
                    entry.handle._emit(MistralNNXError(f"the engine failed: {err}"))
        finally:
            with self._lock:
                waiting, self._waiting = list(self._waiting), deque()
            for handle in waiting:
                handle._emit(MistralNNXError("the engine stopped"))
            for slot, entry in enumerate(self._slots):
                if entry is not None and self.error is None:
                    entry.handle._emit(
                        Delta(0, [], "", [] if entry.handle.request.logprobs else None, "abort")
                    )
                    self._slots[slot] = None

    def _drop_cancelled(self) -> None:
        for slot, entry in enumerate(self._slots):
            if entry is not None and entry.handle.cancelled.is_set():
                self._free(slot)
        with self._lock:
            self._waiting = deque(h for h in self._waiting if not h.cancelled.is_set())

    def _admit_waiting(self) -> None:
        for slot in range(self.max_slots):
            if self._slots[slot] is not None:
                continue
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
                self._reserved.add(slot)
            try:
                self._admit(slot, handle)
            finally:
                with self._lock:
                    self._reserved.discard(slot)
        self._update_counts()

    def _update_counts(self) -> None:
        self.stats.running = sum(entry is not None for entry in self._slots)
        self.stats.waiting = len(self._waiting)


@functools.partial(jax.jit, donate_argnames=("cache", "state", "sampling", "rules"))
def _insert(
    cache: KVCache,
    state: DecodeState,
    sampling: BatchSampling,
    rules: StopRules,
    row: tuple[KVCache, DecodeState, BatchSampling, StopRules],
    slot: jax.Array,
) -> tuple[KVCache, DecodeState, BatchSampling, StopRules]:
    """Write a prefilled one-row cache, decode state and tables into `slot` (traced: one
    compile serves every slot)."""

    def put(big: jax.Array, one: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(big, one, slot, axis=0)

    return jax.tree.map(put, (cache, state, sampling, rules), row)


@functools.partial(jax.jit, donate_argnames=("state",))
def _mark_done(state: DecodeState, slot: jax.Array) -> DecodeState:
    return dataclasses.replace(state, done=state.done.at[slot].set(True))
