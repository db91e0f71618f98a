"""Multi-process (multi-host) start-up: one call, before any JAX computation, on every process.

Every process runs the same program (JAX's multi-controller model): it loads only the shards of
its own devices and takes part in every jitted step. The helpers here join the processes into
one runtime, or do nothing for a single process.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, NoReturn

import jax

from mistral_nnx.errors import MistralNNXError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise MistralNNXError(
            f"distributed: environment variable {name}={text!r} is not an integer"
        ) from None


def _cluster_detected() -> bool:
    """A multi-process launcher that jax can read on its own: SLURM (srun), Open MPI (mpirun) or
    a multi-host Cloud TPU slice."""
    env = os.environ

    def count(name: str) -> int:
        text = env.get(name, "1").strip()
        return int(text) if text.isdigit() else 1

    if "SLURM_JOB_ID" in env and count("SLURM_NTASKS") > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def setup_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    shutdown_timeout: int = 60,
) -> bool:
    """Join this process to a multi-process JAX runtime; True if it did, False if single-process.

    Each argument falls back to its environment variable (JAX_COORDINATOR_ADDRESS "host:port",
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). With none of them set, jax's own detection of SLURM,
    Open MPI and multi-host TPU slices is used; with no launcher either, or one process, this
    does nothing. Call it before anything touches a JAX device.

    The timeouts bound every wait on a peer that never comes or has died: joining
    (`initialization_timeout`), noticing a dead peer (`heartbeat_timeout`) and the exit barrier
    (`shutdown_timeout`), all in seconds, so no process hangs forever.
    """
    global _initialized
    if _initialized:
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes is not None and num_processes < 1:
        raise MistralNNXError(f"distributed: num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return False
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if not explicit and not _cluster_detected():
        return False
    if explicit and (num_processes is None or process_id is None) and not _cluster_detected():
        missing = [
            flag
            for flag, value in (
                ("coordinator", coordinator),
                ("num_processes", num_processes),
                ("process_id", process_id),
            )
            if value is None
        ]
        raise MistralNNXError(
            f"distributed: also give {' and '.join(missing)} (or set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
        )
    if (
        process_id is not None
        and num_processes is not None
        and not (0 <= process_id < num_processes)
    ):
        raise MistralNNXError(
            f"distributed: process_id {process_id} is not in [0, {num_processes})"
        )
    if getattr(jax.config, "jax_cpu_collectives_implementation", "absent") is None:
        # Cross-process collectives on CPU (tests, CPU clusters) need an implementation; gloo
        # ships with jaxlib (and is the default from jax 0.5 on). GPU and TPU ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = dict(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralNNXError(
            f"distributed: cannot join {num_processes or '?'} processes via "
            f"{coordinator or 'cluster auto-detection'}: {first}"
        ) from None
    _initialized = True
    return True


def is_main_process() -> bool:
    """True on the process that should print and write files (process 0)."""
    return jax.process_index() == 0


def exit_process(code: int) -> NoReturn:
    """End this process now with `code` (call it after reporting an error).

    In a multi-process run a failed process must not wait at jax.distributed's exit barrier for
    peers that are still computing: it leaves at once, its peers notice its missing heartbeats
    within `heartbeat_timeout` and stop too, so no process hangs. Single-process: sys.exit.
    """
    if not _initialized:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
