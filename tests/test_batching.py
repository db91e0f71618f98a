"""The continuous-batching engine in process, on tiny random models: a request's tokens and
logprobs are bit-identical alone and among others (mixed lengths that move the decode's
attention prefix, greedy and seeded), equal to generate(), and cancelling frees the slot."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import mistral_nnx as mn
from mistral_nnx.batching import Engine, QueueFull, Request
from mistral_nnx.engine import Delta
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.sampling import SamplingParams


@pytest.fixture(scope="module", params=["gqa_window16", "llama"])
def engine(request, hf_checkpoints) -> Any:
    directory, _ = hf_checkpoints[request.param]
    model = mn.load_model(directory, progress=False)
    eng = Engine(
        model, None, max_slots=3, max_seq_len=512, prefill_chunk=128, max_queue=2,
        max_top_logprobs=TOP,
    )  # fmt: skip
    eng.start()
    assert eng.ready.wait(timeout=600)
    yield eng
    eng.stop()


TOP = 3  # the engine's max_top_logprobs


def _requests() -> list[Request]:
    rng = np.random.RandomState(0)
    lengths = [5, 300, 12, 280, 40, 6]  # past and under the 256-slot attention prefix
    return [
        Request(
            prompt=rng.randint(3, 200, n).tolist(),
            max_tokens=int(rng.randint(4, 16)),
            sampling=SamplingParams(temperature=float(i % 2), top_k=20 if i % 4 == 1 else None),
            seed=i,
            stop_token_ids=[7] if i == 2 else [],
            logprobs=True,
            top_logprobs=[0, TOP, 1][i % 3],  # chunks with and without the top-n program
        )
        for i, n in enumerate(lengths)
    ]


def _run(engine: Engine, request: Request) -> tuple[list[int], list[float], str | None, Any]:
    tokens: list[int] = []
    lps: list[float] = []
    tops: list[list[tuple[int, float]]] | None = None
    reason = None
    for delta in engine.submit(request):
        tokens += delta.tokens
        lps += delta.logprobs or []
        if delta.top_logprobs is not None:
            tops = (tops or []) + delta.top_logprobs
        reason = delta.finish_reason
    return tokens, lps, reason, tops


def test_alone_equals_batched_equals_generate(engine):
    requests = _requests()
    alone = [_run(engine, r) for r in requests]
    for _ in range(100):  # the queue holds 2 beyond the free slots: wait for them to drain
        if engine.stats.running == 0:
            break
        time.sleep(0.05)
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = []
        for r in requests:
            futures.append(pool.submit(_run, engine, r))
            time.sleep(0.3)  # arrive while others decode
        together = [f.result(timeout=600) for f in futures]
    assert together == alone
    for r, (tokens, lps, _, tops) in zip(requests, alone, strict=True):
        stop = [[t] for t in r.stop_token_ids] or None
        ref = mn.generate(
            engine.model,
            [r.prompt],
            max_new_tokens=r.max_tokens,
            temperature=r.sampling.temperature,
            top_k=r.sampling.top_k,
            seed=r.seed,
            stop=stop,
            logprobs=True,
            top_logprobs=r.top_logprobs,
        )[0]
        assert tokens == ref.tokens
        np.testing.assert_allclose(lps, ref.logprobs, atol=1e-5)
        assert (tops is None) == (ref.top_logprobs is None)
        if tops is not None and ref.top_logprobs is not None:
            assert [[t for t, _ in p] for p in tops] == [
                [t for t, _ in p] for p in ref.top_logprobs
            ]
            got, want = (
                [[lp for _, lp in p] for p in tops],
                [[lp for _, lp in p] for p in ref.top_logprobs],
            )
            np.testing.assert_allclose(got, want, atol=1e-5)


@contextlib.contextmanager
def _decode_held(engine: Engine) -> Iterator[threading.Event]:
    """Hold the engine thread at its first decode delivery until the yielded event is set:
    the tiny models decode 400 tokens in tens of milliseconds, so a test that needs requests
    to stay running must not race them."""
    release = threading.Event()

    def hold(_tokens: int, step_seconds: float | None) -> None:
        if step_seconds is not None:  # a decode chunk's tokens (None: a first token)
            release.wait(timeout=60)

    _wait_idle(engine)  # the cancelled requests of earlier tests are gone
    engine.on_tokens = hold
    try:
        yield release
    finally:
        engine.on_tokens = None
        release.set()


def test_cancel_frees_the_slot(engine):
    with _decode_held(engine) as release:
        handle = engine.submit(Request(prompt=[5, 6, 7], max_tokens=400, ignore_eos=True))
        first = next(iter(handle))
        handle.cancel()
        release.set()
    _wait_idle(engine)
    delivered = [first]
    while not handle._queue.empty():
        item = handle._queue.get()
        assert isinstance(item, Delta)
        delivered.append(item)
    # freed at the next chunk boundary, long before its 400 tokens, with no finish reason
    assert 0 < sum(len(d.tokens) for d in delivered) < 400
    assert all(d.finish_reason is None for d in delivered)


def test_bad_requests(engine):
    with pytest.raises(MistralNNXError, match="exceeds the context length 512"):
        engine.submit(Request(prompt=[5] * 500, max_tokens=20))
    with pytest.raises(MistralNNXError, match="empty"):
        engine.submit(Request(prompt=[], max_tokens=2))
    with pytest.raises(MistralNNXError, match="outside the vocabulary"):
        engine.submit(Request(prompt=[10**6], max_tokens=2))


def _wait_idle(engine: Engine) -> None:
    deadline = time.time() + 60
    while engine.stats.running or engine.stats.waiting:
        assert time.time() < deadline, "the engine never went idle"
        time.sleep(0.02)


def test_queue_is_bounded(engine):
    """With no request able to finish, the engine takes one per slot plus max_queue more
    (running, mid-admission or waiting alike) and refuses the next."""

    def long() -> Request:
        return Request(prompt=[5, 6], max_tokens=400, ignore_eos=True)

    handles = []
    with _decode_held(engine):
        try:
            for _ in range(engine.max_slots + engine.max_queue):
                handles.append(engine.submit(long()))
            with pytest.raises(QueueFull, match="2 requests waiting"):
                engine.submit(long())
        finally:
            for h in handles:
                h.cancel()
    _wait_idle(engine)


def test_a_request_mid_admission_holds_one_slot_not_two(engine):
    """While the engine thread is inside an admission (held in on_first_token, after the slot
    is filled), the other slots and the whole queue still take requests."""
    inside, release = threading.Event(), threading.Event()

    def hold(_: float) -> None:
        inside.set()
        release.wait(timeout=60)

    def long() -> Request:
        return Request(prompt=[5, 6], max_tokens=400, ignore_eos=True)

    _wait_idle(engine)  # the cancelled requests of earlier tests are gone
    engine.on_first_token = hold
    handles = []
    try:
        handles.append(engine.submit(long()))
        assert inside.wait(timeout=60)
        for _ in range(engine.max_slots - 1 + engine.max_queue):
            handles.append(engine.submit(long()))
        with pytest.raises(QueueFull):
            engine.submit(long())
    finally:
        engine.on_first_token = None
        release.set()
        for h in handles:
            h.cancel()
    _wait_idle(engine)


def test_every_eos_id_stops_a_request(hf_checkpoints):
    """A model with five EOS ids (Llama 3 lists three; some list more): a request stops at the
    one greedy decoding meets, as generate() stops."""
    directory, _ = hf_checkpoints["llama"]
    model = mn.load_model(directory, progress=False)
    prompt = [5, 6, 7]
    free = mn.generate(model, [prompt], max_new_tokens=24)[0].tokens
    assert len(free) > 6
    target = free[6]
    unused = [t for t in range(3, 200) if t not in free][:3]
    model.config = model.config.replace(eos_token_ids=(2, *unused, target))
    reference = mn.generate(model, [prompt], max_new_tokens=24)[0]
    assert reference.finish_reason == "stop" and reference.tokens[-1] == target
    engine = Engine(model, None, max_slots=2, max_seq_len=64, prefill_chunk=16)
    engine.start()
    try:
        assert engine.ready.wait(timeout=600)
        tokens, _, reason, _ = _run(engine, Request(prompt=prompt, max_tokens=24))
    finally:
        engine.stop()
    assert (tokens, reason) == (reference.tokens, "stop")


_MESH_CHECK = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import mistral_nnx as mn
from mistral_nnx.batching import Engine, Request
from conftest import build_hf
build_hf("mistral", Path({path!r}), seed=0, vocab_size=256)
single = mn.load_model({path!r}, progress=False)
sharded = mn.load_model({path!r}, progress=False, mesh=mn.make_mesh("data=2,model=2"))
engine = Engine(sharded, None, max_slots=4, max_seq_len=128, prefill_chunk=32)
engine.start()
assert engine.ready.wait(timeout=600), engine.error
for n in (4, 20, 40):
    prompt = list(range(3, 3 + n))
    got = [t for d in engine.submit(Request(prompt=prompt, max_tokens=8)) for t in d.tokens]
    want = mn.generate(single, [prompt], max_new_tokens=8)[0].tokens
    assert got == want, (got, want)
engine.stop()
print("OK")
"""


def test_engine_on_a_mesh(tmp_path):
    """Slots over data=2, weights split over model=2 (4 fake CPU devices): the same greedy
    tokens as one device."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = _MESH_CHECK.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
