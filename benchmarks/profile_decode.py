"""Where does a CPU decode step go? The engine's step against variants and a bare GEMV chain.

    .venv/bin/python benchmarks/profile_decode.py                       # SmolLM2, batch 1
    .venv/bin/python benchmarks/profile_decode.py --model random176m --batch 8

All variants run the same weights in float32, alternated round-robin, medians of --repeats;
ms per decode step:

* engine: `engine._decode` (on-device while_loop of --steps greedy steps, sampling and stop
  checks included) on a cache of 128 slots with 32 filled (what generate() uses for a 32-token
  prompt + 64 new tokens).
* engine, 1 step per call: the same function with steps=1, called from Python each step.
* engine, N slots: the cache capacity raised (same 32 filled): what a larger cache costs the
  attention (it reads the smallest prefix size holding the filled slots).
* bare GEMV chain: a jitted chain of einsum("bd,nd->bn", x, W) over exactly the model's weight
  matrices ([out, in] 2-D views) plus the LM head and an argmax: the floor XLA reaches for the
  same bytes.
* torch GEMV chain: the same chain with torch.nn.functional.linear (MKL), same thread count.
* sample() alone / argmax alone: the engine's sampler on [B, vocab] logits.

It also lists the largest copy/transpose fusions inside the compiled while-loop body.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def load(name: str) -> Any:
    import tempfile

    import mistral_nnx

    if name == "smollm2":
        return mistral_nnx.load_model(_util.smollm2_gguf(), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        return mistral_nnx.load_model(_util.make_random_mistral(Path(tmp) / "m"), progress=False)


class DecodeBench:
    """Compiles engine._decode for one batch / capacity / steps."""

    def __init__(self, model: Any, batch: int, slots: int, filled: int, steps: int) -> None:
        import jax
        from flax import nnx

        from mistral_nnx import engine
        from mistral_nnx.sampling import BatchSampling, SamplingParams

        self.model, self.batch, self.slots, self.filled, self.steps = (
            model,
            batch,
            slots,
            filled,
            steps,
        )
        graphdef, self.params = nnx.split(model)
        self.sampling = BatchSampling.from_params(SamplingParams(), batch)
        self.rules = engine.StopRules(
            eos_ids=jax.numpy.asarray([-3], jax.numpy.int32),
            sequences=jax.numpy.zeros((0, 1), jax.numpy.int32),
            max_new=jax.numpy.full((batch,), 1 << 30, jax.numpy.int32),
        )

        def step(params: Any, cache: Any, state: Any, sampling: Any, rules: Any) -> Any:
            return engine._decode.__wrapped__(  # type: ignore[attr-defined]
                graphdef, params, cache, state, sampling, rules, steps, None
            )

        cache, state = self.fresh()
        self.lowered = jax.jit(step, donate_argnums=(1, 2)).lower(
            self.params, cache, state, self.sampling, self.rules
        )
        self.compiled = self.lowered.compile()

    def fresh(self) -> tuple[Any, Any]:
        import jax
        import jax.numpy as jnp

        from mistral_nnx import engine
        from mistral_nnx.cache import KVCache, init_cache

        b, c = self.batch, self.slots
        cache = init_cache(self.model.config, b, c, self.model.dtype)
        ar = jnp.arange(c, dtype=jnp.int32)
        cache = KVCache(
            tuple(
                dataclasses.replace(
                    layer, pos=jnp.broadcast_to(jnp.where(ar < self.filled, ar, -1), (b, c)) + 0 * i
                )
                for i, layer in enumerate(cache.layers)
            )
        )
        state = engine.DecodeState(
            token=jnp.zeros((b,), jnp.int32),
            position=jnp.full((b,), self.filled - 1, jnp.int32),
            done=jnp.zeros((b,), bool),
            finish=jnp.zeros((b,), jnp.int32),
            count=jnp.zeros((b,), jnp.int32),
            history=jnp.full((b, 1), -1, jnp.int32),
            key=jax.random.key(0),
        )
        return jax.block_until_ready((cache, state))

    def ms_per_step(self, total_steps: int) -> float:
        """Run `total_steps` steps (calls of `steps` each); ms per step."""
        import jax

        cache, state = self.fresh()
        calls = max(1, total_steps // self.steps)
        t0 = time.perf_counter()
        for _ in range(calls):
            cache, state, tok, *_ = self.compiled(
                self.params, cache, state, self.sampling, self.rules
            )
            tok.block_until_ready() if self.steps == 1 else None
        jax.block_until_ready((cache, state))
        return 1e3 * (time.perf_counter() - t0) / (calls * self.steps)

    def loop_body_copies(self, top: int = 5) -> list[str]:
        """The largest copy / transpose fusions of the compiled while-loop body."""
        text = self.compiled.as_text() or ""
        comps = re.split(r"\n(?=\S)", text)
        bodies = [
            c for c in comps if "while" in c.split("\n", 1)[0] or "region_0" in c.split("\n", 1)[0]
        ]
        body = max(bodies or comps, key=len)
        agg: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        for line in body.split("\n"):
            m = re.search(
                r"%((?:copy|transpose)\w*?)(?:\.\d+)? = (\w+)\[([\d,]*)\]\S* fusion", line
            )
            if m:
                name, dtype, dims = m.groups()
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                size = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1}.get(dtype, 4)
                agg[(name, f"{dtype}[{dims}]")][0] += 1
                agg[(name, f"{dtype}[{dims}]")][1] += n * size
        ranked = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
        return [
            f"{cnt} x {name} {shape} = {nbytes / 1e6:.2f} MB written per step"
            for (name, shape), (cnt, nbytes) in ranked
        ]


def gemv_chains(
    model: Any, batch: int, threads: int
) -> tuple[Callable[[], float], Callable[[], float] | None]:
    """(XLA chain, torch chain) each returning ms for one pass over all weight matrices."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    config = model.config
    mats: list[Any] = []
    for layer in model.layers:
        a, m = layer.attn, layer.mlp
        d = config.hidden_size
        mats += [  # [out, in]
            a.wq[...].reshape(-1, d),
            a.wk[...].reshape(-1, d),
            a.wv[...].reshape(-1, d),
            a.wo[...].reshape(d, -1),
            m.gate[...],
            m.up[...],
            m.down[...],
        ]
    tied = config.tie_word_embeddings
    head = model.embed[...] if tied else model.lm_head[...]  # [V, D]

    def lin(x: Any, w: Any) -> Any:
        return jnp.einsum("bd,nd->bn", x, w)

    def chain(x: Any, mats: list[Any], head: Any) -> Any:
        for i in range(0, len(mats), 7):
            wq, wk, wv, wo, g, u, dn = mats[i : i + 7]
            a = lin(x, wq) + jnp.mean(lin(x, wk)) + jnp.mean(lin(x, wv))
            x = x + lin(jnp.tanh(a), wo)
            x = x + lin(jax.nn.silu(lin(x, g)) * lin(x, u), dn)
        return jnp.argmax(lin(x, head), axis=-1)

    jchain = jax.jit(chain)
    x = jnp.ones((batch, config.hidden_size), jnp.float32) * 0.01
    jchain(x, mats, head).block_until_ready()

    def run_xla() -> float:
        t0 = time.perf_counter()
        jchain(x, mats, head).block_until_ready()
        return 1e3 * (time.perf_counter() - t0)

    try:
        import torch
    except ImportError:
        return run_xla, None
    torch.set_num_threads(threads)
    tm = [torch.from_numpy(np.ascontiguousarray(np.asarray(w))) for w in mats]  # [out, in]
    th = torch.from_numpy(np.ascontiguousarray(np.asarray(head)))
    tx = torch.from_numpy(np.asarray(x))
    F = torch.nn.functional

    def tchain() -> Any:
        y = tx
        for i in range(0, len(tm), 7):
            wq, wk, wv, wo, g, u, dn = tm[i : i + 7]
            a = F.linear(y, wq) + F.linear(y, wk).mean() + F.linear(y, wv).mean()
            y = y + F.linear(torch.tanh(a), wo)
            y = y + F.linear(F.silu(F.linear(y, g)) * F.linear(y, u), dn)
        return F.linear(y, th).argmax(-1)

    def run_torch() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            tchain()
            return 1e3 * (time.perf_counter() - t0)

    run_torch()
    return run_xla, run_torch


def sampler_benches(batch: int, vocab: int) -> tuple[Callable[[], float], Callable[[], float]]:
    import jax
    import jax.numpy as jnp

    from mistral_nnx.sampling import BatchSampling, SamplingParams, sample

    logits = jax.random.normal(jax.random.key(0), (batch, vocab), jnp.float32)
    sampling = BatchSampling.from_params(SamplingParams(), batch)
    key = jax.random.key(1)
    f_sample = jax.jit(sample)
    f_argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    jax.block_until_ready(f_sample(logits, key, sampling))
    jax.block_until_ready(f_argmax(logits))

    def timeit(fn: Callable[[], Any], n: int = 50) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(fn())
            return 1e3 * (time.perf_counter() - t0) / n

        return run

    return (timeit(lambda: f_sample(logits, key, sampling)), timeit(lambda: f_argmax(logits)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "random176m"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slots", default="1024,4096", help="extra cache capacities to compare")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    threads = _util.num_cores()
    print(_util.header(f"decode profile: {args.model}, batch {args.batch}, float32"))
    print(f"{_util.versions()}; torch threads {threads}")
    model = load(args.model)
    b, steps = args.batch, args.steps
    base = DecodeBench(model, b, 128, 32, steps)
    variants: dict[str, Callable[[], float]] = {
        "engine (while_loop, 128 slots)": lambda: base.ms_per_step(steps)
    }
    one = DecodeBench(model, b, 128, 32, 1)
    variants["engine, 1 step per call"] = lambda: one.ms_per_step(steps)
    for s in [int(x) for x in args.slots.split(",") if x]:
        bench = DecodeBench(model, b, s, 32, steps)
        variants[f"engine, {s} slots (32 filled)"] = functools.partial(bench.ms_per_step, steps)
    xla_chain, torch_chain = gemv_chains(model, b, threads)
    variants["bare GEMV chain, XLA"] = xla_chain
    if torch_chain is not None and not args.no_torch:
        variants["bare GEMV chain, torch F.linear"] = torch_chain
    f_sample, f_argmax = sampler_benches(b, model.config.vocab_size)
    variants["sample() alone (greedy)"] = f_sample
    variants["argmax alone"] = f_argmax

    samples: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            samples[k].append(variants[k]())
    ref = _util.median(samples[names[0]])
    rows = [
        [k, f"{_util.median(v):.2f}", f"{min(v):.2f}", f"{_util.median(v) / ref:.2f}"]
        for k, v in samples.items()
    ]

    bw = _util.copy_bandwidth(1.0, repeats=3)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
    embed = 0 if model.config.tie_word_embeddings else model.embed[...].nbytes
    floor = 1e3 * (n_bytes - embed) / (max(bw.values()) * 1e9)
    print(
        f"\nweights read per step {(n_bytes - embed) / 1e6:.0f} MB; copy bandwidth "
        f"{max(bw.values()):.1f} GB/s -> floor {floor:.1f} ms/step"
    )
    print("largest copy/transpose fusions in the compiled decode loop body (engine):")
    for line in base.loop_body_copies():
        print("  " + line)
    print(
        f"\nms per decode step (sampler rows: ms per call); medians and minima of "
        f"{args.repeats} alternated runs of {steps} steps; batch {b}.\n"
    )
    print(_util.table(["variant", "ms (median)", "ms (min)", "vs engine"], rows))


if __name__ == "__main__":
    main()
