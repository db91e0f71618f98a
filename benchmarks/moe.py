"""Mixture-of-experts compute paths, side by side on one machine (ratios, medians).

One MoE layer (moe.MoE) of Mixtral's shape scaled down (E=8 experts, top-2, M = 3.5 D), float32:
- prefill (N tokens): all experts over every token, chunked (the model's path) vs sort tokens by
  expert then `jax.lax.ragged_dot` (the alternative the issue asked to measure);
- decode (a few tokens): gather the chosen experts' weights (the model's path for N*k <= E) vs
  the dense path. The bytes of expert weights each step touches are printed with the times.
Runs alternate between the variants and report medians, so load from other processes hits all
variants alike.

    python benchmarks/moe.py [--dim 1024] [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import _util
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.moe import MoE

E, K = 8, 2


def ragged_dot_path(moe: MoE, x: jax.Array) -> jax.Array:
    """Sort the N*k (token, expert) pairs by expert, three ragged_dots, scatter-add back."""
    weights, index = moe.route(x)
    flat = index.reshape(-1)
    order = jnp.argsort(flat)
    token = order // K
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token]
    g = jax.lax.ragged_dot(xs, moe.gate[...], sizes)
    u = jax.lax.ragged_dot(xs, moe.up[...], sizes)
    y = jax.lax.ragged_dot(jax.nn.silu(g) * u, moe.down[...], sizes)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(y)


def dense_path(moe: MoE, x: jax.Array) -> jax.Array:
    return moe._dense(x, *moe.route(x))


def gathered_path(moe: MoE, x: jax.Array) -> jax.Array:
    return moe._gathered(x, *moe.route(x))


def compiled(
    fn: Callable[[MoE, jax.Array], jax.Array], moe: MoE, x: jax.Array
) -> Callable[[], Any]:
    graphdef, state = nnx.split(moe)
    run = jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x))
    run(state, x).block_until_ready()
    return lambda: run(state, x).block_until_ready()


def race(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: _util.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d, m = args.dim, args.dim * 7 // 2
    moe = MoE(d, m, E, K, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    expert_bytes = 3 * d * m * 4
    print(_util.header(f"MoE paths: E={E}, k={K}, D={d}, M={m}, float32"))
    rows = []

    x = jnp.asarray(np.random.RandomState(0).randn(args.tokens, d), jnp.float32)
    dense = compiled(dense_path, moe, x)
    ragged = compiled(ragged_dot_path, moe, x)
    diff = float(jnp.abs(dense_path(moe, x) - ragged_dot_path(moe, x)).max())
    t = race({"dense": dense, "ragged": ragged}, args.repeats)
    rows.append(
        [f"prefill N={args.tokens}", "dense chunked", f"{t['dense'] * 1e3:.1f}",
         "ragged_dot", f"{t['ragged'] * 1e3:.1f}", f"{t['ragged'] / t['dense']:.2f}",
         f"{diff:.1e}"]
    )  # fmt: skip

    for n in (1, 2, 4):
        x = jnp.asarray(np.random.RandomState(n).randn(n, d), jnp.float32)
        gathered = compiled(gathered_path, moe, x)
        dense = compiled(dense_path, moe, x)
        diff = float(jnp.abs(dense_path(moe, x) - gathered_path(moe, x)).max())
        t = race({"gathered": gathered, "dense": dense}, args.repeats * 4)
        read = min(n * K, E) * expert_bytes / (E * expert_bytes)
        rows.append(
            [f"decode N={n}", f"gather ({read:.0%} of expert bytes)",
             f"{t['gathered'] * 1e3:.2f}", "dense (100%)", f"{t['dense'] * 1e3:.2f}",
             f"{t['dense'] / t['gathered']:.2f}", f"{diff:.1e}"]
        )  # fmt: skip
    print(
        _util.table(
            ["case", "model's path", "ms", "alternative", "ms", "alt / model", "max |diff|"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
