"""Serving benchmark: `mistral-nnx serve` under load, like `vllm bench serve`, on 127.0.0.1.

Starts the server (default model unless --model), waits until /health is 200, then at each
concurrency level sends a fixed set of streamed chat requests (prompt lengths drawn from one
seeded distribution, `max_tokens` output tokens each, EOS ignored) and measures TTFT, time per
output token (TPOT), inter-token latency (ITL; mean / p50 / p99), request and output-token
throughput. Then the same prompts through this project's static `generate()` batch, in this
process, after the server has stopped (never both at once on the same cores). Compilations
after warm-up come from the server's /metrics and must be 0.

With `--llama-server BIN --llama-gguf F32.gguf`, llama.cpp's own server (the same slots, each of
--max-seq-len positions, every core) runs beside it: both stay up (idle costs nothing), and each
concurrency level goes to one server then the other, the order alternating per round.

    python benchmarks/serve.py --levels 1 4 16 --requests 32 --max-tokens 64
    python benchmarks/serve.py --rounds 3 --llama-server ~/llama.cpp/build/bin/llama-server \
        --llama-gguf smollm2-f32.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    words = "the of river a mountain quick silver ocean tiger violin garden planet story".split()
    lengths = rng.randint(8, 200, count)  # words: roughly 10-250 tokens with the template
    return [" ".join(rng.choice(words, n)) for n in lengths]


async def _one(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    end = time.perf_counter()
    # A server that sends no usage chunk streams one token per chunk (llama.cpp's does both).
    return {"start": start, "end": end, "times": times, "tokens": tokens or len(times)}


async def _level(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    # A new connection per request: a reused keep-alive connection that the server closes while
    # idle ends the next request with "Server disconnected without sending a response".
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=no_keepalive) as http:

        async def bounded(p: str) -> dict[str, Any]:
            async with limit:
                return await _one(http, url, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    tpot = [(r["end"] - r["times"][0]) / max(1, r["tokens"] - 1) for r in results if r["times"]]
    itl = np.concatenate([np.diff(r["times"]) for r in results if len(r["times"]) > 1])
    out_tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests/s": len(results) / wall,
        "output tok/s": out_tokens / wall,
        "TTFT mean ms": 1e3 * float(np.mean(ttft)),
        "TTFT p99 ms": 1e3 * float(np.percentile(ttft, 99)),
        "TPOT mean ms": 1e3 * float(np.mean(tpot)),
        "ITL p50 ms": 1e3 * float(np.percentile(itl, 50)),
        "ITL p99 ms": 1e3 * float(np.percentile(itl, 99)),
    }


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def _static_generate(
    model_src: str | None, prompts: list[str], batch: int, max_tokens: int
) -> float:
    """Output tokens/s of generate() over the same prompts in batches of `batch` (warm)."""
    import mistral_nnx as mn
    from mistral_nnx.cli import default_model

    source = model_src or default_model()
    model, tok = mn.load_model(source, progress=False), mn.load_tokenizer(source)
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    eos_free = [-1]  # nothing stops early, as ignore_eos on the server

    def run() -> float:
        start, total = time.perf_counter(), 0
        for i in range(0, len(ids), batch):
            out = mn.generate(model, ids[i : i + batch], max_new_tokens=max_tokens, stop=[eos_free])
            total += sum(len(c.tokens) for c in out)
        return total / (time.perf_counter() - start)

    run()  # compile
    return run()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before becoming healthy")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} never became healthy")


def _start_ours(args: argparse.Namespace) -> tuple[str, subprocess.Popen[bytes]]:
    port = _free_port()
    command = [sys.executable, "-m", "mistral_nnx.cli", "serve", "--port", str(port)]
    command += ["--max-slots", str(args.max_slots), "--max-seq-len", str(args.max_seq_len)]
    if args.model:
        command += ["--model", args.model]
    proc = subprocess.Popen(command, stderr=_log("mistral-nnx"), env={**os.environ})
    return f"http://127.0.0.1:{port}", proc


def _start_llama(args: argparse.Namespace) -> tuple[str, subprocess.Popen[bytes]]:
    """llama.cpp's own server: the same slots, each with --max-seq-len positions, all cores."""
    port = _free_port()
    command = [
        args.llama_server, "-m", args.llama_gguf, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(args.max_slots), "-c", str(args.max_slots * args.max_seq_len),
        "-t", str(os.cpu_count()), "-tb", str(os.cpu_count()), "--jinja", "--no-webui",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=_log("llama.cpp"))
    return f"http://127.0.0.1:{port}", proc


LOGS: dict[str, Any] = {}


def _log(name: str) -> Any:
    """A temp file for a server's stderr; its tail is printed if the benchmark fails."""
    LOGS[name] = tempfile.TemporaryFile()
    return LOGS[name]


def _print_rows(title: str, rows: list[dict[str, float]]) -> None:
    keys = list(rows[0])
    print(f"\n{title}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model source (default: the embedded SmolLM2)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-slots", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians)")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    parser.add_argument("--llama-gguf", help="the GGUF llama-server loads (e.g. an F32 one)")
    parser.add_argument("--no-static", action="store_true", help="skip the generate() baseline")
    args = parser.parse_args()
    if bool(args.llama_server) != bool(args.llama_gguf):
        parser.error("--llama-server and --llama-gguf go together")

    servers = {"mistral-nnx": _start_ours(args)}
    if args.llama_server:
        servers["llama.cpp"] = _start_llama(args)
    results: dict[str, dict[int, list[dict[str, float]]]] = {
        name: {c: [] for c in args.levels} for name in servers
    }
    try:
        for name, (url, proc) in servers.items():
            _wait_healthy(url, proc, name)
        prompts = _prompts(args.requests)
        for url, _ in servers.values():  # first-request effects out of the way
            asyncio.run(_level(url, prompts[:2], 2, 4))
        order = list(servers)
        for r in range(args.rounds):  # each level on each server in turn, the order alternating
            for c in args.levels:
                for name in order if r % 2 == 0 else order[::-1]:
                    url = servers[name][0]
                    try:
                        row = asyncio.run(_level(url, prompts, c, args.max_tokens))
                    except httpx.HTTPError as e:
                        raise RuntimeError(f"{name}, concurrency {c}: {e!r}") from e
                    results[name][c].append(row)
        late = _metric(servers["mistral-nnx"][0], "mistral_nnx_compilations_after_warmup")
    except BaseException:
        for name, log in LOGS.items():
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            print(f"--- {name} stderr (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        for _, proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc in servers.values():
            proc.wait(timeout=120)
    for name in servers:
        rows = []
        for c in args.levels:
            runs = results[name][c]
            rows.append({k: float(np.median([run[k] for run in runs])) for k in runs[0]})
        _print_rows(f"{name} (medians of {args.rounds} rounds)", rows)
    if "llama.cpp" in servers:
        print("\nratio mistral-nnx / llama.cpp (medians; tok/s: higher is better, ms: lower is)")
        for c in args.levels:
            ours = {k: float(np.median([x[k] for x in results["mistral-nnx"][c]])) for k in
                    results["mistral-nnx"][c][0]}  # fmt: skip
            theirs = {k: float(np.median([x[k] for x in results["llama.cpp"][c]])) for k in ours}
            parts = [f"{k} {ours[k] / theirs[k]:.2f}x" for k in ("output tok/s", "TTFT mean ms")]
            print(f"concurrency {c}: " + ", ".join(parts))
    print(f"compilations after warm-up: {late:.0f}")
    if not args.no_static:
        static = _static_generate(
            args.model, _prompts(args.requests), args.max_slots, args.max_tokens
        )
        print(f"static generate(), batches of {args.max_slots}: {static:.1f} output tok/s")


if __name__ == "__main__":
    main()
