"""Compile time of the prefill and decode step functions at Mistral-7B shapes (32 layers).

No weights are made: the step functions are traced, lowered and compiled ahead of time against
abstract shapes (jax.ShapeDtypeStruct), so this runs on any machine. Each stage is timed on its
own: tracing and lowering are Python work paid in every process (a persistent-cache hit skips
only the compile). On CPU the compile figure is indicative of XLA's work for the graph; the GPU
figure comes from gpu.py. No persistent cache is used.

    python benchmarks/compile_time.py [--layers 32] [--batch 1] [--cache 4096]
    PYTHONPATH=/tmp/old/src python benchmarks/compile_time.py   # an older tree, for a before/after
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_nnx import MistralConfig, engine
from mistral_nnx.cache import init_cache
from mistral_nnx.checkpoint.loader import abstract_model
from mistral_nnx.sampling import BatchSampling, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=args.layers,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        layer_windows=(4096,) * args.layers,
    )
    model = abstract_model(config, jnp.bfloat16, jnp.bfloat16)
    graphdef, state = nnx.split(model)
    b = args.batch
    cache = jax.eval_shape(lambda: init_cache(config, b, args.cache, jnp.bfloat16))
    i32 = jax.ShapeDtypeStruct((b, args.chunk), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    logits = jax.ShapeDtypeStruct((b, config.vocab_size), jnp.float32)

    prefill = stages(
        engine._prefill_chunk, graphdef, state, cache, i32, i32, lengths, logits, None, fresh=True
    )

    sampling = BatchSampling.from_params(SamplingParams(), b)
    rules = engine._stop_rules(None, None, [2], [128] * b)[0]
    decode_state = jax.eval_shape(
        lambda: engine.DecodeState(
            token=jnp.zeros((b,), jnp.int32),
            position=jnp.zeros((b,), jnp.int32),
            done=jnp.zeros((b,), bool),
            finish=jnp.zeros((b,), jnp.int32),
            count=jnp.zeros((b,), jnp.int32),
            history=jnp.zeros((b, 1), jnp.int32),
            key=jax.random.key(0),
        )
    )
    decode = stages(
        engine._decode, graphdef, state, cache, decode_state, sampling, rules, args.steps, None
    )

    print(
        f"\nMistral-7B shapes, {args.layers} layers, bf16, batch {b}, cache {args.cache}, "
        f"prefill chunk {args.chunk}, {jax.devices()[0].platform}\n"
    )
    print("| step function | trace s | lower s | compile s |")
    print("|---|---|---|---|")
    for name, times in (
        ("prefill chunk", prefill),
        (f"decode loop ({args.steps} steps/call)", decode),
    ):
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


def stages(jitted: Any, *args: Any, **kwargs: Any) -> tuple[float, float, float]:
    """Seconds to trace, lower and compile `jitted` for these (abstract) arguments."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args, **kwargs)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


if __name__ == "__main__":
    main()
