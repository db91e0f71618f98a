"""Checkpoint load time and peak host memory: safetensors, GGUF-F32 and orbax vs a raw read.

    .venv/bin/python benchmarks/load.py                     # warm page cache, 3 repeats
    .venv/bin/python benchmarks/load.py --page-cache cold   # files evicted before every run
    .venv/bin/python benchmarks/load.py --compare-src /tmp/old/src   # an older tree beside

Builds a random float32 Mistral (~700 MB) with transformers' save_pretrained, converts it once
to this project's orbax format with `mistral_nnx.save_model` and to a float32 GGUF the way
llama.cpp lays it out (q/k rows permuted). Zero-copy loading (load_model's default `mmap=True`)
adopts a tensor's file pages only when it is 64-byte aligned in the file, so two more copies are
measured: the safetensors file rewritten by mistral_nnx's own writer (`save_safetensors`: every
tensor 64-byte aligned; also loaded with `mmap=False`, which copies everything), and the GGUF
written with `general.alignment` = 64 (gguf-py's default is 32). Whether a file written by
transformers (8-byte padded header) or a default GGUF gets any tensor without a copy is luck: the
rows without a suffix show what a typical file gets, and a line under the table says how many
weights each load used in place. Every measurement runs in a fresh process under
`/usr/bin/time -v` (peak RSS), in alternating order, with the files it reads either read once
just before (`--page-cache warm`, the default) or evicted (`cold`: `posix_fadvise(DONTNEED)`
after `fdatasync`, checked with `fincore` where present):

* raw read: `cat <files> > /dev/null` of the same files (time measured around the process);
* copy: a numpy child reading the safetensors file into one fresh array (`readinto`), timed
  after its imports: what any load that ends with the weights in fresh memory must pay;
* load: `mistral_nnx.load_model(path)` + block_until_ready, timed inside the child (after its
  imports); peak RSS is the whole child process, imports included. RSS counts the mapped file
  pages a zero-copy load keeps: those are the page cache's (shared, reclaimable), not a copy;
* baseline: a bare `import mistral_nnx, jax; jax.devices()` process, for its RSS (the JAX
  runtime's own share, reported separately).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

LOAD_CHILD = """
import json, os, resource, sys, time
t0 = time.perf_counter()
import jax
import mistral_nnx
from flax import nnx
jax.devices()
t1 = time.perf_counter()
kwargs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
m = mistral_nnx.load_model(sys.argv[1], progress=False, **kwargs)
jax.block_until_ready(nnx.state(m))
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
# weights used in place: their buffers lie in a mapping of a file of the checkpoint
root = os.path.realpath(sys.argv[1])
maps = []
for line in open("/proc/self/maps"):
    f = line.split(maxsplit=5)
    if len(f) == 6 and f[5].strip().startswith(root):
        maps.append([int(x, 16) for x in f[0].split("-")])
ptrs = [v.get_value().unsafe_buffer_pointer() for _, v in nnx.to_flat_state(nnx.state(m))]
mapped = sum(any(lo <= p < hi for lo, hi in maps) for p in ptrs)
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "self_rss_mb": rss,
                  "mapped": mapped, "params": len(ptrs)}))
"""

NO_MMAP = json.dumps({"mmap": False})

COPY_CHILD = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as f:
    size = f.seek(0, 2); f.seek(0)
    out = np.empty(size, np.uint8)
    f.readinto(memoryview(out))
print(json.dumps({"load_s": time.perf_counter() - t0}))
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


ALIGNED_CHILD = """
import shutil, sys
from pathlib import Path
from safetensors.numpy import load_file
from mistral_nnx.checkpoint.safetensors_io import save_safetensors
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
shutil.copy(src / "config.json", dst / "config.json")
tensors = load_file(str(src / "model.safetensors"))
save_safetensors(tensors, dst / "model.safetensors", metadata={"format": "pt"})
"""


def write_gguf_f32(st: Path, out: Path, alignment: int | None = None) -> None:
    """The safetensors checkpoint as a float32 GGUF in llama.cpp's layout (run in a child:
    it imports gguf-py and safetensors); `alignment` sets general.alignment (default 32)."""
    code = f"""
import json
import gguf, numpy as np
from safetensors.numpy import load_file
c = json.load(open({str(st / "config.json")!r}))
w = load_file({str(st / "model.safetensors")!r})
h, kv, e = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
def permute(x, n):
    return x.reshape(n, 2, e // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
g = gguf.GGUFWriter({str(out)!r}, "llama")
if {alignment!r} is not None: g.add_custom_alignment({alignment!r})
g.add_block_count(c["num_hidden_layers"]); g.add_context_length(c["max_position_embeddings"])
g.add_embedding_length(c["hidden_size"]); g.add_feed_forward_length(c["intermediate_size"])
g.add_head_count(h); g.add_head_count_kv(kv); g.add_key_length(e); g.add_value_length(e)
g.add_rope_dimension_count(e); g.add_layer_norm_rms_eps(c["rms_norm_eps"])
g.add_rope_freq_base(c.get("rope_theta", 10000.0))
g.add_token_list([f"<t{{i}}>" for i in range(c["vocab_size"])])
names = {{"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
    "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj":
    "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm"}}
for name, x in w.items():
    if name == "model.embed_tokens.weight": n = "token_embd.weight"
    elif name == "model.norm.weight": n = "output_norm.weight"
    elif name == "lm_head.weight": n = "output.weight"
    else:
        _, _, i, rest = name.split(".", 3)
        n = f"blk.{{i}}.{{names[rest.removesuffix('.weight')]}}.weight"
        if "q_proj" in rest: x = permute(x, h)
        if "k_proj" in rest: x = permute(x, kv)
    g.add_tensor(n, np.ascontiguousarray(x, np.float32))
g.write_header_to_file(); g.write_kv_data_to_file(); g.write_tensors_to_file(); g.close()
"""
    _util.run_measured([sys.executable, "-c", code])


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
    def __init__(self, warm: bool) -> None:
        self.warm = warm
        self.evict_checked: list[int] = []
        self.mapped: dict[tuple[str, ...], str] = {}  # (path, *args) -> "mapped/params"

    def prepare(self, files: list[Path]) -> None:
        """Warm: read the files once (into the page cache). Cold: evict them."""
        if self.warm:
            for f in files:
                with f.open("rb") as fh:
                    while fh.read(1 << 24):
                        pass
            return
        evict(files)
        left = resident_bytes(files)
        if left is not None:
            self.evict_checked.append(left)

    def raw(self, files: list[Path]) -> tuple[float, float | None]:
        self.prepare(files)
        cmd = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)]
        wall, rss, _ = _util.run_measured(cmd)
        return wall, rss

    def child(
        self, code: str, path: Path, env: dict[str, str] | None = None, *args: str
    ) -> tuple[float, float]:
        self.prepare([path] if path.is_file() else files_of(path))
        full_env = dict(os.environ, **env) if env else None
        cmd = [sys.executable, "-c", code, str(path), *args]
        _, rss, out = _util.run_measured(cmd, env=full_env)
        result = json.loads(out.strip().splitlines()[-1])
        if "mapped" in result:
            self.mapped[(str(path), *args)] = f"{result['mapped']}/{result['params']}"
        return result["load_s"], rss if rss is not None else result.get("self_rss_mb", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="alternated runs per measurement")
    p.add_argument("--layers", type=int, default=8, help="layers of the ~700 MB model")
    p.add_argument("--page-cache", choices=("warm", "cold"), default="warm")
    p.add_argument("--compare-src", default=None, help="an older tree's src dir to run beside")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (temp dir)")
    args = p.parse_args()

    print(_util.header(f"checkpoint loading: time and peak host RSS, {args.page_cache} cache"))
    print(_util.versions())
    runner = Runner(warm=args.page_cache == "warm")
    tmp = Path(tempfile.mkdtemp(prefix="mnnx-load-", dir=args.workdir))
    try:
        st = _util.make_random_mistral(tmp / "st", num_hidden_layers=args.layers)
        orbax = tmp / "orbax"
        _util.run_measured([sys.executable, "-c", CONVERT_CHILD, str(st), str(orbax)])
        gguf = tmp / "model-f32.gguf"
        write_gguf_f32(st, gguf)
        st64 = tmp / "st-aligned"
        _util.run_measured([sys.executable, "-c", ALIGNED_CHILD, str(st), str(st64)])
        gguf64 = tmp / "model-f32-align64.gguf"
        write_gguf_f32(st, gguf64, alignment=64)
        st_files = [st / "model.safetensors"]
        orbax_files = files_of(orbax)
        size = st_files[0].stat().st_size  # the float32 parameter bytes (+ a small header)
        orbax_size = sum(f.stat().st_size for f in orbax_files)
        print(
            f"checkpoints: safetensors {size / 1e6:.0f} MB ({args.layers} layers), GGUF F32 "
            f"{gguf.stat().st_size / 1e6:.0f} MB, orbax {orbax_size / 1e6:.0f} MB in "
            f"{len(orbax_files)} files; all float32",
            flush=True,
        )
        trees: dict[str, dict[str, str] | None] = {"": None}
        in_place: dict[str, tuple[str, str]] = {}  # load measure -> runner.mapped key
        if args.compare_src:
            trees[f" (PYTHONPATH={args.compare_src})"] = {"PYTHONPATH": args.compare_src}
        measures: dict[str, tuple[str, Callable[[], tuple[float, float | None]]]] = {
            "raw read safetensors (cat)": ("st", lambda: runner.raw(st_files)),
            "copy safetensors into fresh memory (numpy)": (
                "st",
                lambda: runner.child(COPY_CHILD, st_files[0]),
            ),
            "raw read GGUF (cat)": ("gguf", lambda: runner.raw([gguf])),
            "raw read orbax files (cat)": ("orbax", lambda: runner.raw(orbax_files)),
        }
        loads = [  # (label, kind of raw read to compare with, path, load_model kwargs)
            ("safetensors", "st", st, "{}"),
            ("safetensors (64-aligned, mistral_nnx writer)", "st", st64, "{}"),
            ("safetensors (64-aligned, mistral_nnx writer, mmap=False)", "st", st64, NO_MMAP),
            ("GGUF F32", "gguf", gguf, "{}"),
            ("GGUF F32 (general.alignment 64)", "gguf", gguf64, "{}"),
            ("orbax", "orbax", orbax, "{}"),
        ]
        for suffix, env in trees.items():
            for label, kind, path, kwargs in loads:
                if env is not None and kwargs != "{}":
                    continue  # an older tree may not know the keyword
                measures[f"load {label}{suffix}"] = (
                    kind,
                    functools.partial(runner.child, LOAD_CHILD, path, env, kwargs),
                )
                in_place[f"load {label}{suffix}"] = (str(path), kwargs)
        samples: dict[str, list[tuple[float, float | None]]] = {k: [] for k in measures}
        names = list(measures)
        for r in range(args.repeats):
            for k in names if r % 2 == 0 else names[::-1]:
                samples[k].append(measures[k][1]())
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

    raw = {
        "st": med("raw read safetensors (cat)", 0),
        "gguf": med("raw read GGUF (cat)", 0),
        "orbax": med("raw read orbax files (cat)", 0),
    }
    copy = med("copy safetensors into fresh memory (numpy)", 0)
    rows = []
    for k in names:
        kind = measures[k][0]
        secs, rss = med(k, 0), med(k, 1)
        is_load = k.startswith("load")
        rows.append(
            [
                k,
                f"{secs:.3f}",
                f"{rss:.0f}",
                f"{rss * 1e6 / size:.2f}" if is_load else "",
                f"{(rss - base_rss) * 1e6 / size:.2f}" if is_load else "",
                f"{secs / raw[kind]:.2f}x",
                f"{secs / copy:.2f}x" if kind == "st" or is_load else "",
            ]
        )
    rows.append(["bare `import mistral_nnx, jax` process", "", f"{base_rss:.0f}", "", "", "", ""])
    if args.page_cache == "warm":
        cache = "page cache warm: the files were read once right before every run"
    elif runner.evict_checked:
        cache = (
            "page cache evicted before every run with posix_fadvise(DONTNEED); fincore "
            f"found at most {max(runner.evict_checked) / 1e6:.0f} MB still cached"
        )
    else:
        cache = "page cache evicted with posix_fadvise(DONTNEED) (not verified: no fincore)"
    rss_src = "/usr/bin/time -v" if _util.TIME_BIN.exists() else "the child's own ru_maxrss"
    print(
        f"\n{cache}. Peak RSS from {rss_src}, whole process (imports included); 'minus JAX' "
        f"subtracts the bare-import baseline ({base_rss:.0f} MB). Model size = the float32 "
        f"parameter bytes ({size / 1e6:.0f} MB). Medians of {args.repeats} alternated runs.\n"
    )
    print(
        _util.table(
            [
                "measure",
                "seconds",
                "peak RSS MB",
                "RSS / model",
                "RSS minus JAX / model",
                "time / raw read",
                "time / fresh copy",
            ],
            rows,
        )
    )
    used = [f"{k[5:]} {runner.mapped[key]}" for k, key in in_place.items() if key in runner.mapped]
    if used:
        print("\nweights used in place from the file (zero-copy) / all: " + "; ".join(used))


if __name__ == "__main__":
    main()
