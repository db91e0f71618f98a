"""Peak host memory (RSS) while loading a checkpoint sharded over a device mesh, on CPU.

    .venv/bin/python benchmarks/load_sharded.py                  # random 176M Mistral, float32
    .venv/bin/python benchmarks/load_sharded.py --checkpoint DIR --mesh data=2,model=4

Every figure comes from a fresh process with fake CPU devices (XLA_FLAGS): it imports jax,
starts the backend, resets the kernel's peak-RSS mark (/proc/self/clear_refs; ru_maxrss of
getrusage otherwise), loads with load_model(mesh=..., rules=...), and reports how far its peak
RSS rose above the RSS before loading. On CPU the devices' buffers are this host's memory, so:

* unsharded (1 device) and sharded over 8 devices in 1 process: the whole model lives in the
  process either way; the rise is the model plus the loader's transient (about one tensor);
* 2 processes x 4 devices under jax.distributed (localhost): each process places only its own
  devices' shards, so each rises by its half of the model plus the transient, never the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

MB = 1e6


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    """One measured process: print one JSON line."""
    import jax

    from mistral_nnx import load_model, make_mesh
    from mistral_nnx.distributed import setup_distributed

    if args.num_processes > 1:
        setup_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            initialization_timeout=120,
            heartbeat_timeout=60,
        )
    mesh = make_mesh(args.mesh) if args.mesh else None
    jax.devices()  # start the backend before the baseline
    before = _rss_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, mesh=mesh, rules=args.rules, progress=False)
    leaves = jax.tree.leaves(model)
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    local = sum(
        s.data.nbytes for x in leaves if isinstance(x, jax.Array) for s in x.addressable_shards
    )
    print(
        json.dumps(
            dict(
                process=jax.process_index(),
                before=before,
                peak=peak,
                reset=reset,
                local_shard_bytes=local,
                seconds=seconds,
                process_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            )
        )
    )


def _env(devices: int) -> dict[str, str]:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def measure(
    checkpoint: Path, mesh: str | None, rules: str, devices: int, processes: int
) -> list[dict[str, Any]]:
    base = [
        sys.executable,
        __file__,
        "--worker",
        "--checkpoint",
        str(checkpoint),
        "--rules",
        rules,
        "--mesh",
        mesh or "",
    ]
    if processes == 1:
        out = subprocess.run(base, env=_env(devices), capture_output=True, text=True, timeout=900)
        outs = [(out.returncode, out.stdout, out.stderr)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            subprocess.Popen(
                base
                + [
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    str(processes),
                    "--process-id",
                    str(i),
                ],
                env=_env(devices // processes),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=900)
            outs.append((p.returncode, stdout, stderr))
    results = []
    for rc, stdout, stderr in outs:
        if rc != 0:
            raise SystemExit(f"worker failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        help="HF / native / GGUF / orbax checkpoint (default: "
        "a random 176M Mistral written to a temp dir)",
    )
    parser.add_argument("--mesh", default="data=2,model=4", help="mesh of the sharded loads")
    parser.add_argument("--rules", default="tp+fsdp")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from safetensors import safe_open

    print(_util.header("Peak host RSS while loading sharded (CPU, fake devices)"))
    print(_util.versions())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = (
            Path(args.checkpoint)
            if args.checkpoint
            else _util.make_random_mistral(Path(tmp) / "random176m")
        )
        devices = 1
        for part in args.mesh.split(","):
            devices *= int(part.split("=")[1])
        model_bytes, largest = 0, 0
        for f in checkpoint.glob("*.safetensors"):
            with safe_open(f, "np") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = st.get_slice(name)
                    n = 4
                    for d in sl.get_shape():
                        n *= d
                    model_bytes += n
                    largest = max(largest, n)
        runs = [
            ("unsharded", None, 1, 1),
            (f"{args.mesh}, 1 process", args.mesh, devices, 1),
            (f"{args.mesh}, 2 processes", args.mesh, devices, 2),
        ]
        rows = []
        for label, mesh, n_dev, n_proc in runs:
            for r in measure(checkpoint, mesh, args.rules, n_dev, n_proc):
                rise = r["peak"] - r["before"]
                rows.append(
                    [
                        label,
                        f"{r['process']}/{n_proc}",
                        f"{r['before'] / MB:.0f}",
                        f"{r['peak'] / MB:.0f}",
                        f"{rise / MB:.0f}",
                        f"{rise / model_bytes:.2f}",
                        f"{r['local_shard_bytes'] / MB:.0f}",
                        f"{r['seconds']:.1f}",
                    ]
                )
        print(
            f"model: {checkpoint.name}, {model_bytes / MB:.0f} MB as float32 (largest tensor "
            f"{largest / MB:.0f} MB); rules {args.rules}"
        )
        print(
            _util.table(
                [
                    "load",
                    "process",
                    "RSS before MB",
                    "peak RSS MB",
                    "rise MB",
                    "rise / model",
                    "own shards MB",
                    "load s",
                ],
                rows,
            )
        )


if __name__ == "__main__":
    main()
