"""`mistral-nnx serve` as a process on 127.0.0.1, driven by the official openai client and raw
HTTP: outputs equal generate()'s and the same request sent alone, errors are OpenAI bodies,
disconnects free slots, a full queue answers 503, SIGTERM ends it with status 0."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest

import mistral_nnx as mn

openai = pytest.importorskip("openai")

KEY = "sk-test"
NAME = "smol"
SLOTS, QUEUE, MAX_LEN, MAX_TOP = 4, 12, 256, 5
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MISTRAL_NNX_NO_COMPILE_CACHE"}
    env.update(XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg")), JAX_PLATFORMS="cpu")
    args = [
        "serve", "--port", str(port), "--max-slots", str(SLOTS), "--max-seq-len", str(MAX_LEN),
        "--prefill-chunk", "64", "--max-queue", str(QUEUE), "--decode-steps", "4",
        "--api-key", KEY, "--served-model-name", NAME, "--max-logprobs", str(MAX_TOP),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_nnx.cli", *args], stderr=err, env=env
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the server never became healthy"
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def local(smollm2_path) -> tuple[Any, Any]:
    return mn.load_model(smollm2_path, progress=False), mn.load_tokenizer(smollm2_path)


def _chat(client: Any, content: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": content}], **kwargs
    )


def _stream_text(client: Any, content: str, **kwargs: Any) -> tuple[str, str | None, Any]:
    chunks = list(_chat(client, content, stream=True, **kwargs))
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return text, finish[0] if finish else None, chunks


def test_health_and_models(server, client):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)]
)
def test_same_text_streamed_or_not_and_as_generate(client, local, sampling):
    model, tokenizer = local
    question = "Name three colours."
    whole = _chat(client, question, max_tokens=12, logprobs=True, top_logprobs=3, **sampling)
    text, finish, chunks = _stream_text(
        client, question, max_tokens=12, stream_options={"include_usage": True}, **sampling
    )
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == finish
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = tokenizer.encode_chat([{"role": "user", "content": question}])
    assert whole.usage.prompt_tokens == len(ids)
    reference = mn.generate(
        model,
        [ids],
        tokenizer=tokenizer,
        max_new_tokens=12,
        temperature=sampling["temperature"],
        top_p=sampling.get("top_p"),
        seed=sampling.get("seed", 0),
        logprobs=True,
        top_logprobs=3,
    )[0]
    assert text == reference.text
    content = whole.choices[0].logprobs.content
    got = [c.logprob for c in content]
    assert len(got) == len(reference.logprobs or [])
    # generate() ran at batch 1, the server at 4 slots: the same math, other GEMM blocking.
    np.testing.assert_allclose(got, reference.logprobs, atol=1e-4)
    assert reference.top_logprobs is not None
    tops = [[(e.token, e.logprob) for e in c.top_logprobs] for c in content]
    want = [[(tokenizer.decode([t]), lp) for t, lp in p] for p in reference.top_logprobs]
    assert [[t for t, _ in p] for p in tops] == [[t for t, _ in p] for p in want]
    np.testing.assert_allclose(
        [[lp for _, lp in p] for p in tops], [[lp for _, lp in p] for p in want], atol=1e-4
    )


def test_completions_with_token_ids(client, local):
    model, tokenizer = local
    prompt = tokenizer.encode("The capital of France is")
    out = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=2
    )
    reference = mn.generate(model, [prompt], max_new_tokens=6, logprobs=True, top_logprobs=2)[0]
    assert reference.top_logprobs is not None
    top = out.choices[0].logprobs.top_logprobs
    assert len(top) == len(reference.tokens)
    for got, pairs in zip(top, reference.top_logprobs, strict=True):
        assert list(got) == [tokenizer.decode([t]) for t, _ in pairs]
        np.testing.assert_allclose(list(got.values()), [lp for _, lp in pairs], atol=1e-4)
    text = client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert out.choices[0].text == text.choices[0].text
    assert out.object == "text_completion" and out.usage.prompt_tokens == len(prompt)


def test_completions_defaults_and_logprobs_zero(client, local):
    """OpenAI's legacy defaults: no max_tokens means 16; logprobs=0 means the chosen tokens'
    logprobs and no alternatives (not null)."""
    model, tokenizer = local
    prompt = tokenizer.encode("Once upon a time")
    out = client.completions.create(
        model=NAME, prompt=prompt, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    reference = mn.generate(model, [prompt], max_new_tokens=16, logprobs=True)[0]  # no EOS here
    lp = out.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in reference.tokens]
    np.testing.assert_allclose(lp.token_logprobs, reference.logprobs, atol=1e-4)


def test_n_choices_are_the_rows_of_one_seeded_generate(server, client, local):
    """Choice i of a seeded request with n > 1 samples row i's stream of generate(seed=...):
    the choices differ from each other and each can be reproduced."""
    model, tokenizer = local
    question = "Write one sentence about the sea."
    out = _chat(client, question, n=3, max_tokens=10, temperature=1.0, seed=11)
    ids = tokenizer.encode_chat([{"role": "user", "content": question}])
    reference = mn.generate(
        model, [ids] * 3, tokenizer=tokenizer, max_new_tokens=10, temperature=1.0, seed=11
    )
    texts = [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [r.text for r in reference]
    assert len(set(texts)) > 1
    assert out.usage.completion_tokens == sum(len(r.tokens) for r in reference)
    assert _metric(server, "mistral_nnx_compilations_after_warmup") == 0  # any n, one program


def test_concurrent_requests_equal_alone(server, client):
    rng = np.random.RandomState(0)
    words = "apple river mountain quick silver ocean tiger violin garden planet".split()
    requests = []
    for i in range(16):
        prompt = " ".join(rng.choice(words, rng.randint(2, 40)))
        kwargs: dict[str, Any] = dict(max_tokens=int(rng.randint(2, 12)))
        if i % 2:
            top_k = {"top_k": 20}  # not an OpenAI field: sent as vLLM users do
            kwargs.update(temperature=1.0, seed=int(rng.randint(0, 2**31)), extra_body=top_k)
        else:
            kwargs.update(temperature=0.0)
        requests.append((prompt, kwargs))

    def ask(item: tuple[str, dict[str, Any]]) -> tuple[str, str]:
        out = _chat(client, item[0], **item[1])
        return out.choices[0].message.content, out.choices[0].finish_reason

    alone = [ask(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests, timeout=TIMEOUT * 4))
    assert together == alone
    assert _metric(server, "mistral_nnx_compilations_after_warmup") == 0


def _metric(server: str, name: str) -> float:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for(server: str, running: int, waiting: int = 0, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while (
        seen := (
            _metric(server, "mistral_nnx_requests_running"),
            _metric(server, "mistral_nnx_requests_waiting"),
        )
    ) != (running, waiting):
        if time.time() > deadline:
            finished = [
                x
                for x in httpx.get(server + "/metrics").text.splitlines()
                if "_requests_total" in x
            ]
            health = httpx.get(server + "/health").text
            raise AssertionError(
                f"never {running} running, {waiting} waiting: {seen}; {health}; {finished}"
            )
        time.sleep(0.05)


def _wait_idle(server: str, timeout: float = 30) -> None:
    _wait_for(server, 0, 0, timeout)


def _long_stream(server: str, http: httpx.Client) -> Any:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": MAX_LEN - 40,
        "ignore_eos": True,
        "stream": True,
    }
    return http.stream(
        "POST",
        server + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
    )


def test_disconnect_frees_the_slot(server):
    _wait_idle(server)
    with httpx.Client(timeout=TIMEOUT) as http, _long_stream(server, http) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:  # up to the first generated text: the request is decoding
            if line.startswith("data: ") and '"content": ""' not in line and "role" not in line:
                assert '"finish_reason": null' in line, line
                break
        _wait_for(server, running=1)
    _wait_idle(server, timeout=10)


def test_full_queue_answers_503(server):
    _wait_idle(server)
    with httpx.Client(timeout=TIMEOUT) as http:
        streams = []
        try:
            for i in range(SLOTS + QUEUE):  # fill the slots, then the queue
                streams.append(_long_stream(server, http))
                assert streams[-1].__enter__().status_code == 200
                _wait_for(server, min(i + 1, SLOTS), max(0, i + 1 - SLOTS))
            response = http.post(
                server + "/v1/chat/completions",
                json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {KEY}"},
            )
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "server_busy"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    _wait_idle(server)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"tools": [{"type": "function"}]}, 400, "tools"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"top_logprobs": 3}, 400, "top_logprobs"),  # without logprobs=true
        ({"top_logprobs": 6, "logprobs": True}, 400, "top_logprobs"),  # above --max-logprobs
        ({"top_logprobs": -1, "logprobs": True}, 400, "top_logprobs"),
        ({"foo": 1}, 400, "foo"),
        ({"temperature": -1}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": 0}, 400, "n"),
        ({"seed": -5}, 400, "seed"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": "other"}, 404, "model"),
        ({"stop": [""]}, 400, "stop"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    payload = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **body}
    response = httpx.post(
        server + "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == status


def test_prompt_beyond_context_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, "word " * 100, max_tokens=MAX_LEN)
    message = str(info.value)
    assert f"max_tokens ({MAX_LEN})" in message and f"context length {MAX_LEN}" in message


def test_api_key_required(server):
    response = httpx.post(server + "/v1/chat/completions", json={"messages": []})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/health").status_code == 200  # health stays open


def test_tokenize_and_detokenize(server, local):
    _, tokenizer = local
    ids = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert ids == tokenizer.encode("Hello world")
    chat = httpx.post(
        server + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
    ).json()
    assert chat["tokens"] == tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    text = httpx.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "Hello world"
