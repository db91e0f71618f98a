"""The continuous-batching engine under load on an accelerator: Mistral-7B shapes, random bf16
weights, 32 slots; output tokens/s, TTFT and inter-token latency at several concurrencies.

    python benchmarks/gpu_serve.py             # on a machine with a GPU (a few minutes)
    python benchmarks/gpu_serve.py --tiny      # small shapes, any backend: checks the script

The weights are made on the device as in gpu.py. The engine (`mistral_nnx.batching.Engine`, what
`mistral-nnx serve` runs, without the HTTP layer) compiles every program at start-up; then, at
each concurrency level, that many client threads send requests from one fixed list (prompt
lengths drawn from one seeded distribution, random token ids, `--max-tokens` new tokens each,
EOS ignored, greedy) and time every delta. TTFT = first delta - submit; ITL = time between
deltas / tokens in the delta; compilations after warm-up are counted and must be 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402
import gpu  # noqa: E402


@dataclasses.dataclass
class Timing:
    submitted: float
    deltas: list[tuple[float, int]]  # (time, tokens in the delta)


def run_level(engine: Any, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    from mistral_nnx.batching import Request

    todo = list(range(len(prompts)))
    lock = threading.Lock()
    timings: list[Timing] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            request = Request(prompt=prompts[i], max_tokens=max_tokens, ignore_eos=True)
            timing = Timing(time.perf_counter(), [])
            for delta in engine.submit(request):
                timing.deltas.append((time.perf_counter(), len(delta.tokens)))
            with lock:
                timings.append(timing)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [t.deltas[0][0] - t.submitted for t in timings]
    itl = [
        (b[0] - a[0]) / max(1, b[1])
        for t in timings
        for a, b in zip(t.deltas, t.deltas[1:], strict=False)
    ]
    tokens = sum(n for t in timings for _, n in t.deltas)
    return {
        "concurrency": concurrency,
        "requests/s": len(timings) / wall,
        "output tok/s": tokens / wall,
        "TTFT mean ms": 1e3 * float(np.mean(ttft)),
        "TTFT p99 ms": 1e3 * float(np.percentile(ttft, 99)),
        "ITL p50 ms": 1e3 * float(np.percentile(itl, 50)),
        "ITL p99 ms": 1e3 * float(np.percentile(itl, 99)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes; runs on CPU too")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    import jax

    from mistral_nnx import MistralConfig
    from mistral_nnx.batching import Engine

    shapes = gpu.TINY if args.tiny else gpu.MISTRAL_7B
    config = MistralConfig(**shapes.config)
    print(_util.header("continuous-batching engine under load, random bf16 weights"))
    print(f"{_util.versions(('jax', 'jaxlib', 'flax'))}; devices: {jax.devices()}")
    model, n_params, _ = gpu.random_model(config)
    print(f"model: {n_params / 1e9:.2f}B parameters, {config.num_layers} layers")

    compiles = {"after warm-up": 0}
    engine = Engine(
        model,
        None,
        max_slots=args.slots,
        max_seq_len=args.max_seq_len,
        decode_steps=args.decode_steps,
        prefill_chunk=512,
        max_queue=args.requests,
    )

    def on_event(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and engine.ready.is_set():
            compiles["after warm-up"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    t0 = time.perf_counter()
    engine.start()
    if not engine.ready.wait(timeout=1800):
        raise SystemExit(f"the engine never became ready: {engine.error}")
    print(f"warm-up (every program compiled): {time.perf_counter() - t0:.1f} s")

    rng = np.random.default_rng(0)
    longest = min(512, args.max_seq_len - args.max_tokens)
    lengths = rng.integers(16, longest, args.requests)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]
    run_level(engine, prompts[:2], 2, 4)  # first-request effects out of the way
    rows = [run_level(engine, prompts, c, args.max_tokens) for c in args.levels]
    engine.stop()

    keys = list(rows[0])
    print(
        f"\n{args.requests} requests per level, prompts {lengths.min()}-{lengths.max()} tokens "
        f"(mean {lengths.mean():.0f}), {args.max_tokens} new tokens each, {args.slots} slots, "
        f"decode_steps {args.decode_steps}\n"
    )
    print(_util.table(keys, [[f"{row[k]:.1f}" for k in keys] for row in rows]))
    print(f"\ncompilations after warm-up: {compiles['after warm-up']}")


if __name__ == "__main__":
    main()
