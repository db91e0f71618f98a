"""Weight layout micro-benchmark: [in, out] with `x @ W` vs [out, in] with einsum("bd,nd->bn").

    .venv/bin/python benchmarks/layout.py                 # 15 alternated rounds
    .venv/bin/python benchmarks/layout.py --repeats 31

A chain of SmolLM2-135M's 30 SwiGLU MLPs (hidden 576, intermediate 1536, float32), jitted as one
program with the weights passed as arguments (as the model's are), at batch 1 and 8:

* [in, out]: gate/up [576, 1536], down [1536, 576]; `h = silu(x @ g) * (x @ u); x + h @ d`
  (this model's layout before the switch);
* [out, in]: gate/up [1536, 576], down [576, 1536]; the same with einsum("bd,nd->bn")
  (the layout of HF / GGUF files, torch's `F.linear`, and this model's since).

Both layouts give the same numbers (checked). Then the load-time side: turning the 90 matrices
from the files' [out, in] into each layout from a read-only file map, the way the loader does
(a blocked transpose for [in, out], a plain aligned copy for [out, in]).
Each measure is timed in rounds that alternate the variants (A B A B ...); medians reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

from mistral_nnx.checkpoint.names import _transpose_into  # noqa: E402
from mistral_nnx.checkpoint.safetensors_io import aligned_empty, map_bytes, owned  # noqa: E402

LAYERS, HIDDEN, INTER = 30, 576, 1536

Weights = list[tuple[jax.Array, jax.Array, jax.Array]]


def transpose(w: np.ndarray) -> np.ndarray:
    """The loader's transpose of an [out, in] matrix into [in, out] before the switch to
    [out, in] (blocked, on two threads)."""
    out = aligned_empty(w.shape[::-1], w.dtype)
    _transpose_into(out, w)
    return out


@jax.jit
def chain_in_out(x: jax.Array, weights: Weights) -> jax.Array:
    for g, u, d in weights:
        x = x + (jax.nn.silu(x @ g) * (x @ u)) @ d
    return x


@jax.jit
def chain_out_in(x: jax.Array, weights: Weights) -> jax.Array:
    def linear(v: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.einsum("bd,nd->bn", v, w)

    for g, u, d in weights:
        x = x + linear(jax.nn.silu(linear(x, g)) * linear(x, u), d)
    return x


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, the variants alternated every round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            samples[k].append(timed(fns[k]))
    return {k: _util.median(v) for k, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="alternated rounds per measure")
    p.add_argument("--calls", type=int, default=20, help="chain calls per timed sample")
    args = p.parse_args()
    print(_util.header("weight layout: [in, out] x @ W vs [out, in] einsum, SmolLM2 MLP chain"))
    print(_util.versions(("jax", "jaxlib", "numpy")))

    rng = np.random.default_rng(0)
    scale = 1 / np.sqrt(HIDDEN)
    files = [  # the files' layout: [out, in]
        tuple(
            (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
            for shape in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
        )
        for _ in range(LAYERS)
    ]
    out_in: Weights = [tuple(jnp.asarray(w) for w in ws) for ws in files]  # type: ignore[misc]
    in_out: Weights = [tuple(jnp.asarray(w.T) for w in ws) for ws in files]  # type: ignore[misc]

    rows = []
    for batch in (1, 8):
        x = jnp.asarray(rng.standard_normal((batch, HIDDEN), dtype=np.float32))
        a = np.asarray(chain_in_out(x, in_out))
        b = np.asarray(chain_out_in(x, out_in))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

        def run(fn: Callable[..., jax.Array], w: Weights, x: jax.Array = x) -> Callable[[], None]:
            def go() -> None:
                for _ in range(args.calls):
                    y = fn(x, w)
                y.block_until_ready()

            return go

        med = alternate(
            {"in_out": run(chain_in_out, in_out), "out_in": run(chain_out_in, out_in)},
            args.repeats,
        )
        ms = {k: v / args.calls * 1e3 for k, v in med.items()}
        rows.append(
            [
                f"B={batch}: one chain call (30 MLPs)",
                f"{ms['in_out']:.2f} ms",
                f"{ms['out_in']:.2f} ms",
                f"{ms['out_in'] / ms['in_out']:.2f}",
            ]
        )

    # Load side: from a read-only file map in the files' layout, as the loader reads.
    with tempfile.TemporaryDirectory(prefix="mnnx-layout-") as tmp:
        path = Path(tmp) / "weights.bin"
        with path.open("wb") as f:
            for ws in files:
                for w in ws:
                    f.write(w.tobytes())
        path.read_bytes()  # warm page cache

        def mapped() -> list[np.ndarray]:
            views, at = [], 0
            for ws in files:
                for w in ws:
                    raw = map_bytes(path, at, at + w.nbytes)
                    views.append(raw.view(np.float32).reshape(w.shape))
                    at += w.nbytes
            return views

        def to_in_out() -> None:
            for w in mapped():
                transpose(w)

        def to_out_in() -> None:
            for w in mapped():
                owned(w)

        med = alternate({"in_out": to_in_out, "out_in": to_out_in}, args.repeats)
        nbytes = sum(w.nbytes for ws in files for w in ws)
        rows.append(
            [
                f"load: 90 matrices from the file map ({nbytes / 1e6:.0f} MB)",
                f"{med['in_out'] * 1e3:.1f} ms (transpose)",
                f"{med['out_in'] * 1e3:.1f} ms (copy)",
                f"{med['out_in'] / med['in_out']:.2f}",
            ]
        )
    print(
        f"\nMedians of {args.repeats} alternated rounds; a chain sample is {args.calls} calls. "
        "Last column: [out, in] time / [in, out] time (below 1: [out, in] is faster).\n"
    )
    print(_util.table(["measure", "[in, out] x @ W", "[out, in] einsum", "out_in / in_out"], rows))


if __name__ == "__main__":
    main()
