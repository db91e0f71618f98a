"""Checkpoint load time and peak host memory: safetensors and orbax vs a raw read of the files.

    .venv/bin/python benchmarks/load.py                # ~700 MB + ~500 MB checkpoints, 3 repeats
    .venv/bin/python benchmarks/load.py --repeats 5

Builds a random float32 Mistral (~700 MB) with transformers' save_pretrained, converts it once
to this project's orbax format with `mistral_nnx.save_model`, and builds a second one of ~500 MB.
Every measurement runs in a fresh process under `/usr/bin/time -v` (peak RSS), with the page
cache of the files it reads evicted first (`posix_fadvise(POSIX_FADV_DONTNEED)` after
`fdatasync`, checked with `fincore` where present), in alternating order:

* raw read: `cat <files> > /dev/null` of the same files (time measured around the process);
* load: `mistral_nnx.load_model(path)` + block_until_ready, timed inside the child (after its
  imports); peak RSS is the whole child process, imports included;
* baseline: a bare `import mistral_nnx, jax; jax.devices()` process, for its RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

LOAD_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import jax
import mistral_nnx
from flax import nnx
jax.devices()
t1 = time.perf_counter()
m = mistral_nnx.load_model(sys.argv[1], progress=False)
jax.block_until_ready(nnx.state(m))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1,
                  "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}))
"""

BASELINE_CHILD = """
import json, resource
import jax
import mistral_nnx
jax.devices()
print(json.dumps({"self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}))
"""

CONVERT_CHILD = """
import sys
import mistral_nnx
mistral_nnx.save_model(mistral_nnx.load_model(sys.argv[1], progress=False), sys.argv[2])
"""


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of `files` in the page cache (fincore), or None without fincore."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *map(str, files)],
        capture_output=True,
        text=True,
    )
    return sum(int(x) for x in out.stdout.split() if x.isdigit())


class Runner:
    def __init__(self) -> None:
        self.evict_checked: list[int] = []

    def cold(self, files: list[Path]) -> None:
        evict(files)
        left = resident_bytes(files)
        if left is not None:
            self.evict_checked.append(left)

    def raw(self, files: list[Path]) -> tuple[float, float | None]:
        self.cold(files)
        cmd = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)]
        wall, rss, _ = _util.run_measured(cmd)
        return wall, rss

    def load(self, path: Path) -> tuple[float, float]:
        self.cold(files_of(path))
        _, rss, out = _util.run_measured([sys.executable, "-c", LOAD_CHILD, str(path)])
        result = json.loads(out.strip().splitlines()[-1])
        return result["load_s"], rss if rss is not None else result["self_rss_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="alternated runs per measurement")
    p.add_argument("--layers", type=int, default=8, help="layers of the ~700 MB model")
    p.add_argument("--small-layers", type=int, default=4, help="layers of the ~500 MB model")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (temp dir)")
    args = p.parse_args()

    print(_util.header("checkpoint loading: time and peak host RSS"))
    print(_util.versions())
    runner = Runner()
    tmp = Path(tempfile.mkdtemp(prefix="mnnx-load-", dir=args.workdir))
    try:
        st = _util.make_random_mistral(tmp / "st", num_hidden_layers=args.layers)
        small = _util.make_random_mistral(tmp / "st_small", num_hidden_layers=args.small_layers)
        orbax = tmp / "orbax"
        _util.run_measured([sys.executable, "-c", CONVERT_CHILD, str(st), str(orbax)])
        st_files = [st / "model.safetensors"]
        orbax_files = files_of(orbax)
        size = st_files[0].stat().st_size
        small_size = (small / "model.safetensors").stat().st_size
        orbax_size = sum(f.stat().st_size for f in orbax_files)
        print(
            f"checkpoints: safetensors {size / 1e6:.0f} MB ({args.layers} layers), orbax "
            f"{orbax_size / 1e6:.0f} MB in {len(orbax_files)} files, small safetensors "
            f"{small_size / 1e6:.0f} MB ({args.small_layers} layers); all float32",
            flush=True,
        )

        measures = {
            "raw read safetensors (cat)": lambda: runner.raw(st_files),
            "load safetensors": lambda: runner.load(st),
            "raw read orbax files (cat)": lambda: runner.raw(orbax_files),
            "load orbax": lambda: runner.load(orbax),
            "load safetensors, small": lambda: runner.load(small),
        }
        samples: dict[str, list[tuple[float, float | None]]] = {k: [] for k in measures}
        names = list(measures)
        for r in range(args.repeats):
            for k in names if r % 2 == 0 else names[::-1]:
                samples[k].append(measures[k]())
            print(f"  round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        base = [
            _util.run_measured([sys.executable, "-c", BASELINE_CHILD]) for _ in range(args.repeats)
        ]
        base_rss = _util.median(
            [b[1] if b[1] is not None else json.loads(b[2])["self_rss_mb"] for b in base]
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(k: str, i: int) -> float:
        return _util.median([s[i] for s in samples[k] if s[i] is not None])  # type: ignore[misc]

    raw_st, raw_orbax = med("raw read safetensors (cat)", 0), med("raw read orbax files (cat)", 0)
    rows = []
    for k in names:
        secs = med(k, 0)
        model_size = small_size if k.endswith("small") else size  # float32 parameter bytes
        raw = raw_orbax if "orbax" in k else raw_st
        on_disk = orbax_size if "orbax" in k else model_size
        rss = med(k, 1)
        rows.append(
            [
                f"{k} ({on_disk / 1e6:.0f} MB on disk)",
                f"{secs:.2f}",
                f"{rss:.0f}",
                f"{rss * 1e6 / model_size:.2f}" if k.startswith("load") else "",
                f"{secs / raw:.2f}x"
                if not k.endswith("small")
                else f"{secs / raw_st * size / small_size:.2f}x (size-scaled)",
            ]
        )
    rows.append(["bare `import mistral_nnx, jax` process", "", f"{base_rss:.0f}", "", ""])
    evicted = (
        "page cache evicted before every run with posix_fadvise(DONTNEED); fincore "
        f"found at most {max(runner.evict_checked) / 1e6:.0f} MB still cached"
        if runner.evict_checked
        else "page cache evicted with posix_fadvise(DONTNEED) (not verified: no fincore)"
    )
    rss_src = "/usr/bin/time -v" if _util.TIME_BIN.exists() else "the child's own ru_maxrss"
    print(
        f"\n{evicted}. Peak RSS from {rss_src}, whole process (imports included; "
        f"subtract the bare-import baseline for the loader's own share). Medians of "
        f"{args.repeats} alternated runs. RSS / model size uses the float32 file size.\n"
    )
    print(
        _util.table(
            ["measure", "seconds", "peak RSS MB", "RSS / model size", "time / raw read"], rows
        )
    )


if __name__ == "__main__":
    main()
