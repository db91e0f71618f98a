"""Mistral-7B-v0.1-shaped throughput on one GPU: copy bandwidth, prefill, decode, compile times.

    python benchmarks/gpu.py            # on a machine with a GPU (< 5 min on one H100/H200)
    python benchmarks/gpu.py --tiny     # small shapes, any backend: checks the script end to end
    python benchmarks/gpu.py --preset mixtral   # Mixtral-8x7B shapes, 8 of its 32 layers

Random bfloat16 weights are created on the device (shapes from `nnx.eval_shape`, one small jitted
fill per distinct shape; nothing is materialised on the host). Everything runs through the
engine's own jitted step functions with `nnx.split(model)` state, as generate() calls them:

* copy: a jitted `x + 1` over a 4 GiB array; bytes read + written / time.
* prefill B x 2048: `engine._prefill_chunk` with one 2048-token chunk into an empty cache (pass
  `EngineOptions(prefill_chunk=2048)` to generate() for the same program); TFLOP/s counts
  2 x params x tokens, the convention of the reference figures. Every call gets an empty
  cache (slot positions reset to -1), as generate() does: a first chunk attends only to
  itself, and that is what takes cuDNN flash attention (the "attention:" line; see
  mistral_nnx/attention.py). `--attention xla` forces the explicit-mask path for an A/B run.
* decode at batch 1, 8, 32: `engine._decode` running 128 greedy steps in its on-device
  while_loop after a 128-token prompt, with a cache of 256 slots (what generate() allocates for
  128 + 128). The prompt's cache slots are marked filled without running a prefill (the
  values do not change the work), to save three compiles. ms/step = call time / 128.
  Roofline = (weight bytes + KV bytes of the filled slots) / measured copy bandwidth.
* compile time = first call - median of the warm calls.

Only the standard library, numpy, jax and flax (and mistral_nnx) are imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

# Reference figures of the issue: H200, transformers 5.17 / torch 2.11, bf16.
REFERENCE = {
    "copy": "4.26 TB/s",
    "prefill1": "61.9 ms, 479 TFLOP/s",
    "decode1": "eager 21.8 ms/step; static cache + torch.compile 7.49 ms/step; roofline 3.40",
    "decode8": "compiled 8.86 ms/step",
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    config: dict[str, Any]
    copy_bytes: int
    prefill_len: int
    prefill_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    decode_batches: tuple[int, ...]


MISTRAL_7B = Shapes(
    config=dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        layer_windows=(4096,) * 32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=32768,
    ),
    copy_bytes=4 << 30,
    prefill_len=2048,
    prefill_batches=(1, 8),
    prompt_len=128,
    new_tokens=128,
    decode_batches=(1, 8, 32),
)

# Mixtral-8x7B: 8 experts top-2; 8 of its 32 layers (11.9B parameters, 24 GB in bf16). TFLOP/s
# count all parameters; the decode roofline counts the bytes of the experts the batch's tokens
# choose (k of E at batch 1, nearly all of them at batch 8).
MIXTRAL = Shapes(
    config=dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=8,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        layer_windows=(None,) * 8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    copy_bytes=4 << 30,
    prefill_len=2048,
    prefill_batches=(1, 8),
    prompt_len=128,
    new_tokens=128,
    decode_batches=(1, 8, 32),
)
PRESETS = {"mistral7b": MISTRAL_7B, "mixtral": MIXTRAL}

TINY = Shapes(
    config=dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        layer_windows=(4096,) * 2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    copy_bytes=64 << 20,
    prefill_len=64,
    prefill_batches=(1, 8),
    prompt_len=16,
    new_tokens=16,
    decode_batches=(1, 8, 32),
)


def random_model(config: Any) -> tuple[Any, int, int]:
    """A bf16 Mistral with N(0, 0.02) weights (norms 1) made on the default device.

    Returns (model, parameter count, embedding-table bytes)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mistral_nnx import Mistral

    bf16 = jnp.bfloat16
    abstract = nnx.eval_shape(
        lambda: Mistral(config, dtype=bf16, param_dtype=bf16, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)

    @functools.partial(jax.jit, static_argnames=("shape", "dtype", "ones"))
    def fill(key: jax.Array, shape: tuple[int, ...], dtype: Any, ones: bool) -> jax.Array:
        if ones:
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, dtype) * 0.02).astype(dtype)

    n_params, embed_bytes = 0, 0
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        sds = var.get_value()
        value = fill(
            jax.random.key(i), tuple(sds.shape), sds.dtype, any("norm" in str(p) for p in path)
        )
        var.set_value(value)
        n_params += value.size
        if path == ("embed",):
            embed_bytes = value.nbytes
    model = nnx.merge(graphdef, state)
    jax.block_until_ready(nnx.state(model))
    return model, n_params, embed_bytes


class Timer:
    """Runs fn() once cold and `repeats` times warm; every call ends with block_until_ready."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats

    def run(self, fn: Any) -> tuple[float, float]:
        """(first call seconds, median warm seconds)."""
        import jax

        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        warm = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            warm.append(time.perf_counter() - t0)
        return first, _util.median(warm)


def copy_bandwidth(nbytes: int, timer: Timer) -> float:
    """Device copy bandwidth in bytes/s, read + write."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    add = jax.jit(lambda a: a + 1.0)
    _, t = timer.run(lambda: add(x))
    return 2 * x.nbytes / t


def bench_prefill(model: Any, batch: int, length: int, timer: Timer) -> tuple[float, float]:
    """(compile seconds, warm seconds) of one `length`-token chunk at `batch`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mistral_nnx import engine
    from mistral_nnx.cache import KVCache, init_cache

    config = model.config
    graphdef, params = nnx.split(model)
    holder = {"cache": init_cache(config, batch, length, model.dtype)}
    n_layers, slots = len(holder["cache"].layers), holder["cache"].layers[0].capacity
    # One jitted call makes every layer's "empty" slot positions (a buffer per layer: the cache
    # is donated, and a buffer cannot be donated twice); keys/values stay, unread.
    empty = jax.jit(lambda: tuple(jnp.full((batch, slots), -1, jnp.int32) for _ in range(n_layers)))
    rng = np.random.default_rng(batch)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    lengths = jnp.full((batch,), length, jnp.int32)
    last = jnp.zeros((batch, config.vocab_size), jnp.float32)

    def call() -> Any:
        # The cache is donated; the returned one is fed back, emptied.
        cache = KVCache(
            tuple(
                dataclasses.replace(layer, pos=p)
                for layer, p in zip(holder["cache"].layers, empty(), strict=True)
            )
        )
        holder["cache"], logits = engine._prefill_chunk(
            graphdef, params, cache, tokens, pos, lengths, last, None, fresh=True
        )
        return holder["cache"], logits

    first, warm = timer.run(call)
    return first - warm, warm


def bench_decode(
    model: Any, batch: int, prompt: int, steps: int, timer: Timer
) -> tuple[float, float, int]:
    """(compile seconds, warm seconds for `steps` steps, cache slots) at `batch`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mistral_nnx import engine
    from mistral_nnx.cache import KVCache, init_cache
    from mistral_nnx.sampling import BatchSampling, SamplingParams

    config = model.config
    graphdef, params = nnx.split(model)
    slots = engine._bucket(prompt + steps, 64, 1 << 30)  # generate()'s cache length
    holder = {"cache": init_cache(config, batch, slots, model.dtype)}
    sampling = BatchSampling.from_params(SamplingParams(), batch)  # greedy
    rules = engine.StopRules(
        eos_ids=jnp.asarray([-3], jnp.int32),
        sequences=jnp.zeros((0, 1), jnp.int32),
        max_new=jnp.full((batch,), 1 << 30, jnp.int32),
    )

    def call() -> Any:
        ar = jnp.arange(slots, dtype=jnp.int32)
        filled = jnp.broadcast_to(jnp.where(ar < prompt, ar, -1), (batch, slots))
        # One buffer per layer: the cache is donated, and a buffer cannot be donated twice.
        cache = KVCache(
            tuple(
                dataclasses.replace(layer, pos=filled + 0 * i)
                for i, layer in enumerate(holder["cache"].layers)
            )
        )
        state = engine.DecodeState(
            token=jnp.zeros((batch,), jnp.int32),
            position=jnp.full((batch,), prompt - 1, jnp.int32),
            done=jnp.zeros((batch,), bool),
            finish=jnp.zeros((batch,), jnp.int32),
            count=jnp.zeros((batch,), jnp.int32),
            history=jnp.full((batch, 1), -1, jnp.int32),
            key=jax.random.key(0),
        )
        holder["cache"], state, tokens, *_ = engine._decode(
            graphdef, params, cache, state, sampling, rules, steps, None
        )
        return holder["cache"], tokens

    first, warm = timer.run(call)
    return first - warm, warm, slots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes; runs on CPU too")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mistral7b", help="model shapes")
    p.add_argument("--repeats", type=int, default=5, help="warm calls per measurement")
    p.add_argument(
        "--budget-s",
        type=float,
        default=260.0,
        help="skip the remaining measurements once this many seconds have passed",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "cudnn", "dpa-xla", "xla"],
        default="auto",
        help="attention path of the prefill (auto: cudnn on a CUDA GPU; see attention.py)",
    )
    args = p.parse_args()
    if args.attention != "auto":
        from mistral_nnx.attention import ENV

        os.environ[ENV] = args.attention

    import jax

    backend = jax.default_backend()
    if backend != "gpu" and not args.tiny:
        print(
            f"gpu.py: no GPU here (JAX backend is '{backend}'); nothing measured. Run it on a "
            "GPU machine, or pass --tiny for a small end-to-end check on this backend."
        )
        sys.exit(2)
    t_start = time.perf_counter()
    import jax.numpy as jnp

    from mistral_nnx import MistralConfig

    shapes = TINY if args.tiny else PRESETS[args.preset]
    config = MistralConfig(**shapes.config)
    timer = Timer(args.repeats)
    device = jax.devices()[0]
    title = "tiny shapes" if args.tiny else f"{args.preset} shapes"
    print(_util.header(f"gpu.py ({title})"))
    packages = ("jax", "jaxlib", "flax", "numpy")
    print(f"device: {device.device_kind} ({backend}); {_util.versions(packages)}")
    from mistral_nnx.attention import attention_path

    attention = attention_path(jnp.bfloat16, config.head_dim)
    print(
        f"attention: {attention} (prefill chunks into an empty cache; decode and later chunks: "
        "xla, the explicit mask)",
        flush=True,
    )

    t0 = time.perf_counter()
    model, n_params, embed_bytes = random_model(config)
    weight_bytes = 2 * n_params
    print(
        f"random bf16 model on device: {n_params / 1e6:.1f} M params, {weight_bytes / 1e9:.3f} "
        f"GB, made in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    rows: list[list[str]] = []
    compiles: list[list[str]] = []

    def out_of_time(what: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append([what, "skipped (time budget)", "", "", ""])
            return True
        return False

    bw = copy_bandwidth(shapes.copy_bytes, timer)
    rows.append(["copy bandwidth (r+w)", f"{bw / 1e12:.3g} TB/s", "", "", REFERENCE["copy"]])
    print(f"copy: {bw / 1e12:.3f} TB/s", flush=True)

    # Bytes one decode step must read: every weight except the embedding table (B rows of it).
    step_weight_bytes = weight_bytes - embed_bytes

    def step_bytes(batch: int) -> float:
        """Weight bytes a decode step of `batch` tokens must read. Mixture of experts: only the
        experts some token chose, E * (1 - (1 - k/E)**batch) per layer when routing is uniform
        (k at batch 1; 7.2 of Mixtral's 8 at batch 8)."""
        if not config.is_moe:
            return step_weight_bytes
        e, k = config.num_experts, config.num_experts_per_tok
        unused = config.num_parameters() - config.num_parameters(active=True)  # E - k experts
        touched = e * (1 - (1 - k / e) ** batch)
        return step_weight_bytes - 2 * unused * (e - touched) / (e - k)

    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    plan: list[tuple[str, int]] = [
        ("decode", shapes.decode_batches[0]),
        ("prefill", shapes.prefill_batches[0]),
    ]
    plan += [("decode", b) for b in shapes.decode_batches[1:]]
    plan += [("prefill", b) for b in shapes.prefill_batches[1:]]
    for kind, b in plan:
        if kind == "prefill":
            what = f"prefill {b}x{shapes.prefill_len}"
            if out_of_time(what):
                continue
            compile_s, t = bench_prefill(model, b, shapes.prefill_len, timer)
            tflops = 2 * n_params * b * shapes.prefill_len / t / 1e12
            rows.append(
                [
                    what,
                    f"{1e3 * t:.1f} ms",
                    f"{tflops:.3g} TFLOP/s",
                    "",
                    REFERENCE["prefill1"] if b == 1 else "",
                ]
            )
        else:
            what = f"decode B={b}"
            if out_of_time(what):
                continue
            steps = shapes.new_tokens
            compile_s, t, slots = bench_decode(model, b, shapes.prompt_len, steps, timer)
            ms = 1e3 * t / steps
            filled = shapes.prompt_len + steps / 2  # average filled slots over the run
            roof_ms = 1e3 * (step_bytes(b) + b * filled * kv_per_token) / bw
            rows.append(
                [
                    f"{what} (prompt {shapes.prompt_len}, {slots} slots)",
                    f"{ms:.2f} ms/step",
                    f"{b * steps / t:.0f} tok/s",
                    f"{100 * roof_ms / ms:.0f}% of {roof_ms:.2f} ms",
                    REFERENCE.get(f"decode{b}", ""),
                ]
            )
        compiles.append([what, f"{compile_s:.1f} s"])
        print(f"{rows[-1][0]}: {rows[-1][1]} (compile {compile_s:.1f} s)", flush=True)
        jnp.zeros(()).block_until_ready()

    print("\ncompile times (first call - warm call):\n")
    print(_util.table(["program", "compile"], compiles))
    print(
        f"\nattention: {attention}; wall time of the script: {time.perf_counter() - t_start:.0f} "
        "s; weights read per "
        f"decode step {step_bytes(1) / 1e9:.2f} GB at batch 1 (embedding table excluded; the "
        "reference roofline counts all params). Medians of "
        f"{args.repeats} warm calls.\n"
    )
    print(
        _util.table(
            [
                "measure",
                "mistral_nnx",
                "rate",
                "vs HBM roofline",
                "reference (H200, transformers 5.17 / torch 2.11)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
