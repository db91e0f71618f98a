"""XLA:CPU flag sweep: SmolLM2 prefill and decode under each flag set, in fresh processes.

    .venv/bin/python benchmarks/xla_flags.py                  # every candidate, 3 rounds
    .venv/bin/python benchmarks/xla_flags.py --rounds 5 --only onednn,xnn

XLA reads XLA_FLAGS once, at backend start, so every flag set needs its own process. A round
runs the baseline (no flags) and each candidate once, in that order, each process loading the
shipped SmolLM2 GGUF (as float32) and timing, after a warm-up:

* prefill: one forward of B=1, T=128 through the engine's prefill program (median of 5);
* decode B=1 and B=8: `generate()` of 33 tokens after a 16-token prompt, decode seconds only
  (median of 3);
* the max |logit| difference of the prefill against the baseline's, so a flag that changes the
  numbers shows it.

A flag set this jaxlib rejects is reported as such. Ratios are candidate time / baseline time
of the same round (below 1 is faster), medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

CANDIDATES: dict[str, str] = {
    "baseline": "",
    # Dots go to YNNPACK by default in this jaxlib; these route them elsewhere.
    "eigen-dots": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn-dots": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn-dots": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "no-fusion-emitters": "--xla_cpu_use_fusion_emitters=false",
    "vector-512": "--xla_cpu_prefer_vector_width=512",
    "no-eigen-threads": "--xla_cpu_multi_thread_eigen=false",
    "concurrency-sched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    # Each dot on one thread, independent ones (q/k/v, gate/up) side by side: no fork-join per
    # small GEMV.
    "1-thread-dots-concurrent": "--xla_cpu_multi_thread_eigen=false "
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}


def child(out: Path) -> None:
    """Measure in this process (XLA_FLAGS already set by the parent) and write JSON to `out`."""
    import jax.numpy as jnp
    from flax import nnx

    import mistral_nnx
    from mistral_nnx import engine
    from mistral_nnx.cache import init_cache

    model = mistral_nnx.load_model(_util.smollm2_gguf(), progress=False)
    model.config = model.config.replace(eos_token_ids=())
    graphdef, params = nnx.split(model)
    config = model.config
    rng = np.random.default_rng(0)

    ids = rng.integers(100, config.vocab_size, (1, 128))
    pos = jnp.asarray(np.arange(128, dtype=np.int32)[None])

    def prefill() -> np.ndarray:
        cache = init_cache(config, 1, 192, model.dtype)
        _, logits = engine._prefill_chunk(
            graphdef,
            params,
            cache,
            jnp.asarray(ids),
            pos,
            jnp.full((1,), 128, jnp.int32),
            jnp.zeros((1, config.vocab_size), jnp.float32),
            None,
            fresh=True,
        )
        return np.asarray(logits)

    logits = prefill()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        prefill()
        times.append(time.perf_counter() - t0)
    result: dict[str, float] = {"prefill_ms": 1e3 * float(np.median(times))}
    for b in (1, 8):
        prompts = rng.integers(100, config.vocab_size, (b, 16)).tolist()
        engine.generate(model, prompts, max_new_tokens=33)  # compile
        decode = []
        for _ in range(3):
            stats: dict[str, float] = {}
            engine.generate(model, prompts, max_new_tokens=33, stats=stats)
            decode.append((stats["seconds"] - stats["first_token_seconds"]) / 32)
        result[f"decode_b{b}_ms"] = 1e3 * float(np.median(decode))
    np.save(out.with_suffix(".npy"), logits)
    out.write_text(json.dumps(result))


def run_one(flags: str, out: Path) -> dict[str, float] | str:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(out)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"failed: {last[:150]}"
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    names = ["baseline"] + [
        n for n in CANDIDATES if n != "baseline" and (not args.only or n in args.only.split(","))
    ]
    print(_util.header("XLA:CPU flag sweep, SmolLM2-135M f32"))
    measures = ("prefill_ms", "decode_b1_ms", "decode_b8_ms")
    ratios: dict[str, dict[str, list[float]]] = {n: {m: [] for m in measures} for n in names}
    absolute: dict[str, dict[str, list[float]]] = {n: {m: [] for m in measures} for n in names}
    diffs: dict[str, float] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            got: dict[str, dict[str, float]] = {}
            for name in names:
                if name in failed:
                    continue
                out = Path(tmp) / f"{name}.json"
                res = run_one(CANDIDATES[name], out)
                if isinstance(res, str):
                    failed[name] = res
                    continue
                got[name] = res
                base = np.load(Path(tmp) / "baseline.npy")
                diffs[name] = max(
                    diffs.get(name, 0.0),
                    float(np.abs(np.load(out.with_suffix(".npy")) - base).max()),
                )
                print(
                    f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()),
                    flush=True,
                )
            for name, res in got.items():
                for m in measures:
                    absolute[name][m].append(res[m])
                    ratios[name][m].append(res[m] / got["baseline"][m])
    rows = []
    for name in names:
        if name in failed:
            rows.append([name, CANDIDATES[name], failed[name], "", "", ""])
            continue
        cells = [
            f"{_util.median(absolute[name][m]):.1f} ms ({_util.median(ratios[name][m]):.2f}x)"
            for m in measures
        ]
        rows.append([name, CANDIDATES[name] or "(none)", *cells, f"{diffs[name]:.1e}"])
    print(
        _util.table(
            [
                "name",
                "XLA_FLAGS",
                "prefill B=1 T=128",
                "decode B=1 /step",
                "decode B=8 /step",
                "max abs dlogit",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
