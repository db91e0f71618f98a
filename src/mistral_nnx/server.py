"""`mistral-nnx serve`: the OpenAI HTTP API over the continuous-batching `Engine`.

HTTP only: requests are validated (pydantic), turned into `batching.Request`s, and the engine's
deltas are shaped into OpenAI responses or server-sent events. Nothing here touches arrays.
Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mistral_nnx.batching import Engine, QueueFull
from mistral_nnx.batching import Request as EngineRequest
from mistral_nnx.engine import Delta
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.sampling import SamplingParams

__all__ = ["create_app"]

# Fields clients may send that change nothing here.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Fields accepted only at their neutral value: anything else is refused, never ignored.
_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "repetition_penalty": 1,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "response_format": {"type": "text"},
    "best_of": 1,
    "echo": False,
    "suffix": None,
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}


def _error_body(message: str, kind: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request shapes -----------------------------------------------------------------------------


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Base):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


class CompletionRequest(_Base):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0)  # n: the n most likely tokens too


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[_Message] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def _refuse_unsupported(body: BaseModel) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _IGNORED:
            continue
        if name in _NEUTRAL:
            if value in (None, _NEUTRAL[name]):
                continue
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
        raise APIError(400, f"unknown field '{name}'", param=name)


# ---- the app ------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("mistral_nnx_requests_running", "Requests in a slot", registry=r).set_function(
            lambda: engine.stats.running
        )
        Gauge("mistral_nnx_requests_waiting", "Requests queued", registry=r).set_function(
            lambda: engine.stats.waiting
        )
        Gauge("mistral_nnx_slot_occupancy", "Busy slots / slots", registry=r).set_function(
            lambda: engine.stats.running / engine.max_slots
        )
        Gauge("mistral_nnx_slots", "Decode slots", registry=r).set(engine.max_slots)
        self.prompt_tokens = Counter(
            "mistral_nnx_prompt_tokens", "Prompt tokens prefilled", registry=r
        )
        self.generated_tokens = Counter(
            "mistral_nnx_generation_tokens", "Tokens generated", registry=r
        )
        self.requests = Counter(
            "mistral_nnx_requests", "Finished requests", ["finish_reason"], registry=r
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "mistral_nnx_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r
        )
        self.itl = Histogram(
            "mistral_nnx_inter_token_latency_seconds",
            "Time per output token",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        engine.on_first_token = self.ttft.observe
        # Compilations once warm: the engine promises none (a new shape would be a bug).
        late = Gauge(
            "mistral_nnx_compilations_after_warmup",
            "XLA compilations since the engine became ready",
            registry=r,
        )

        def on_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
            if event == "/jax/core/compile/backend_compile_duration" and engine.ready.is_set():
                late.inc()

        import jax

        jax.monitoring.register_event_duration_secs_listener(on_event)

        def on_tokens(count: int, seconds: float | None) -> None:
            self.generated_tokens.inc(count)
            if seconds is not None:  # None: a first token (counted in TTFT instead)
                for _ in range(count):
                    self.itl.observe(seconds)

        engine.on_tokens = on_tokens


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (bearer `api_key` if given)."""
    app = FastAPI(title="mistral-nnx", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer
    metrics = _Metrics(engine)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(
            _error_body(err.message, err.kind, err.param, err.status),
            status_code=err.status,
            headers=err.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else "invalid request body"
        return JSONResponse(_error_body(message, "invalid_request_error", param, 400), 400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        message = f"internal error: {type(err).__name__}: {err}"
        return JSONResponse(_error_body(message, "internal_error", None, 500), 500)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[..., Any]) -> Response:
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                body = _error_body("invalid or missing API key", "authentication_error", None, 401)
                return JSONResponse(body, status_code=401)
        response: Response = await call_next(request)
        return response

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404, f"the model '{name}' does not exist", param="model", kind="not_found_error"
            )

    def need_tokenizer(what: str) -> Any:
        if tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this model has none")
        return tokenizer

    @app.get("/health")
    async def health() -> Response:
        if engine.error is not None or (engine.ready.is_set() and not engine.alive()):
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "mistral-nnx",
            "max_model_len": engine.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        tok = need_tokenizer("tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        try:
            if body.messages is not None:
                ids = tok.encode_chat(
                    [{"role": m.role, "content": m.text()} for m in body.messages]
                )
            else:
                ids = tok.encode(body.prompt)
        except MistralNNXError as e:
            raise APIError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        vocab = engine.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in 0..{vocab - 1}", param="tokens")
        return {"prompt": need_tokenizer("detokenize").decode(body.tokens)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        _refuse_unsupported(body)
        check_model(body.model)
        tok = need_tokenizer("chat")
        if not getattr(tok, "has_chat_template", True):
            raise APIError(400, "the model's tokenizer has no chat template", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tok.encode_chat(messages)
        except MistralNNXError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        top_n = body.top_logprobs or 0
        if top_n and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        check_top(top_n, "top_logprobs")
        return await _respond(body, ids, max_tokens, body.logprobs, top_n, request, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _refuse_unsupported(body)
        check_model(body.model)
        top_n = body.logprobs or 0
        check_top(top_n, "logprobs")
        if isinstance(body.prompt, str):
            ids = need_tokenizer("a text prompt").encode(body.prompt)
        else:
            ids = list(body.prompt)
        want_lp = body.logprobs is not None
        max_tokens = body.max_tokens or 16
        return await _respond(body, ids, max_tokens, want_lp, top_n, request, chat=False)

    def check_top(n: int, param: str) -> None:
        if n > engine.max_top_logprobs:
            raise APIError(
                400, f"{param} must be at most {engine.max_top_logprobs}, got {n}", param=param
            )

    async def _respond(
        body: _Base,
        ids: list[int],
        max_tokens: int | None,
        want_logprobs: bool,
        top_n: int,
        http: Request,
        *,
        chat: bool,
    ) -> Response:
        if max_tokens is None:
            max_tokens = engine.max_seq_len - len(ids)  # as vLLM: the rest of the context
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        try:
            sampling = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=None if body.top_k in (None, -1) else body.top_k,
                top_p=body.top_p,
                min_p=body.min_p,
            )
        except MistralNNXError as e:
            raise APIError(400, str(e)) from None
        requests = [
            EngineRequest(
                prompt=ids,
                max_tokens=max_tokens,
                sampling=sampling,
                seed=body.seed,
                index=i,
                stop=stops,
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos,
                logprobs=want_logprobs,
                top_logprobs=top_n,
            )
            for i in range(body.n)
        ]
        queues: list[asyncio.Queue[Delta | BaseException]] = []
        handles = []
        loop = asyncio.get_running_loop()
        try:
            for req in requests:
                q: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

                def put(item: Delta | BaseException, q: asyncio.Queue[Any] = q) -> None:
                    loop.call_soon_threadsafe(q.put_nowait, item)

                handles.append(engine.submit(req, on_delta=put))
                queues.append(q)
        except QueueFull as e:
            for handle in handles:
                handle.cancel()
            raise APIError(503, str(e), kind="server_busy", headers={"Retry-After": "1"}) from None
        except MistralNNXError as e:
            for handle in handles:
                handle.cancel()
            raise APIError(400, str(e)) from None
        metrics.prompt_tokens.inc(len(ids) * body.n)
        shape = _Shape(chat, model_name, tokenizer)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if body.stream:
            events = _events(queues, handles, shape, len(ids), include_usage, metrics)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(await _collect(queues, handles, shape, len(ids), http, metrics))

    return app


async def _next(q: asyncio.Queue[Delta | BaseException]) -> Delta:
    item = await q.get()
    if isinstance(item, BaseException):
        raise item
    return item


class _Shape:
    """OpenAI response shapes for chat or text completions."""

    def __init__(self, chat: bool, model: str, tokenizer: Any) -> None:
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model,
        }

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer else str(token)

    def logprobs(
        self, tokens: list[int], lps: list[float] | None, tops: list[list[tuple[int, float]]] | None
    ) -> Any:
        if lps is None:
            return None
        pieces = [self.piece(t) for t in tokens]
        alternatives = tops if tops is not None else [[] for _ in tokens]
        if self.chat:

            def entry(piece: str, lp: float) -> dict[str, Any]:
                return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

            return {
                "content": [
                    {
                        **entry(p, lp),
                        "top_logprobs": [entry(self.piece(t), tlp) for t, tlp in alts],
                    }
                    for p, lp, alts in zip(pieces, lps, alternatives, strict=True)
                ]
            }
        top = None
        if tops is not None:  # the legacy shape: {token text: logprob}, as OpenAI returns it
            top = [{self.piece(t): tlp for t, tlp in alts} for alts in tops]
        return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": top, "text_offset": []}

    def choice(
        self, index: int, text: str, lp: Any, finish: str | None, *, delta: bool, first: bool
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        message: dict[str, Any] = {"content": text}
        if first or not delta:
            message["role"] = "assistant"
        key = "delta" if delta else "message"
        return {"index": index, key: message, "logprobs": lp, "finish_reason": finish}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _collect(
    queues: list[asyncio.Queue[Delta | BaseException]],
    handles: list[Any],
    shape: _Shape,
    prompt_tokens: int,
    http: Request,
    metrics: _Metrics,
) -> dict[str, Any]:
    choices, completion = [], 0
    try:
        for index, q in enumerate(queues):
            text, tokens, lps = "", [], []
            tops: list[list[tuple[int, float]]] = []
            while True:
                getter = asyncio.ensure_future(_next(q))
                while not getter.done():
                    await asyncio.wait([getter], timeout=0.5)
                    if not getter.done() and await http.is_disconnected():
                        getter.cancel()
                        raise asyncio.CancelledError
                delta = getter.result()
                text += delta.text or ""
                tokens += delta.tokens
                lps += delta.logprobs or []
                tops += delta.top_logprobs or []
                if delta.finish_reason is not None:
                    break
            completion += len(tokens)
            metrics.requests.labels(delta.finish_reason).inc()
            lp = shape.logprobs(
                tokens,
                lps if delta.logprobs is not None else None,
                tops if delta.top_logprobs is not None else None,
            )
            choices.append(
                shape.choice(index, text, lp, delta.finish_reason, delta=False, first=True)
            )
    except MistralNNXError as e:
        raise APIError(500, str(e), kind="internal_error") from None
    finally:
        for handle in handles:
            handle.cancel()  # no-op for finished requests; frees the slot of abandoned ones
    return {
        **shape.head(chunk=False),
        "choices": choices,
        "usage": _usage(prompt_tokens, completion),
    }


async def _events(
    queues: list[asyncio.Queue[Delta | BaseException]],
    handles: list[Any],
    shape: _Shape,
    prompt_tokens: int,
    include_usage: bool,
    metrics: _Metrics,
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk first (chat), text deltas (whole characters only: the
    engine's detokenizer never splits one), the finish_reason, the usage if asked, [DONE]."""

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    completion = 0
    pending: dict[asyncio.Future[Delta], int] = {}
    try:
        if shape.chat:
            for index in range(len(queues)):
                first = shape.choice(index, "", None, None, delta=True, first=True)
                yield event({**shape.head(chunk=True), "choices": [first]})
        pending = {asyncio.ensure_future(_next(q)): i for i, q in enumerate(queues)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    delta = future.result()
                except MistralNNXError as e:
                    body = _error_body(str(e), "internal_error", None, 500)
                    yield event(body)
                    return
                completion += len(delta.tokens)
                lp = shape.logprobs(delta.tokens, delta.logprobs, delta.top_logprobs)
                choice = shape.choice(
                    index, delta.text or "", lp, delta.finish_reason, delta=True, first=False
                )
                yield event({**shape.head(chunk=True), "choices": [choice]})
                if delta.finish_reason is None:
                    pending[asyncio.ensure_future(_next(queues[index]))] = index
                else:
                    metrics.requests.labels(delta.finish_reason).inc()
        if include_usage:
            usage = _usage(prompt_tokens, completion)
            yield event({**shape.head(chunk=True), "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the engine frees the slots
        for future in pending:
            future.cancel()
        for handle in handles:
            handle.cancel()
