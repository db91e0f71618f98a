"""Logical axis names -> mesh axes. Presets, custom rules, make_mesh, activation constraints."""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_nnx.errors import MistralNNXError

LOGICAL_AXES = ("batch", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "expert")

# Logical axes replicated, even on parameters, when their size does not divide the mesh axis:
# grouped-query attention with fewer kv heads than the model axis (2 kv heads on model=4) keeps
# whole kv heads on every device, as large serving stacks do. Any other uneven parameter split
# is refused (padding heads, mlp or vocab would change the checkpoint).
REPLICATE_IF_UNEVEN = frozenset({"kv_heads"})

# Mixture-of-experts weights [E, D, M] carry an `expert` axis. The tensor-parallel presets split
# every expert's mlp dimension over `model` (each device holds a slice of every expert, so the
# decode path's gather of the chosen experts stays local); "ep" puts whole experts on devices
# instead (expert parallelism: fewer, larger matmuls per device for prefill).
_TP = {"q_heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}
PRESETS: dict[str, dict[str, str | None]] = {
    "tp": {**_TP, "batch": "data"},
    "fsdp": {"embed": "data", "batch": "data"},
    "tp+fsdp": {**_TP, "embed": "data", "batch": "data"},
    "ep": {**_TP, "mlp": None, "expert": "model", "batch": "data"},
    "replicated": {"batch": "data"},
}

Rules = Mapping[str, str | None]


def make_mesh(spec: str, devices: Sequence[Any] | None = None) -> Mesh:
    """`"data=2,model=4"` -> a Mesh over all devices (of every process); the sizes must multiply
    to the device count. The presets use the axis names `data` and `model`.

    Axis types are Auto, chosen deliberately over Explicit (the default of recent
    `jax.make_mesh`): the model states shardings on parameters, cache and a few activations, and
    lets XLA's partitioner propagate the rest, so no op needs a sharding-aware type rule and the
    same model code runs unsharded, on one device or on a mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    names: list[str] = []
    sizes: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
        if not match:
            raise MistralNNXError(
                f"mesh: cannot parse {part!r} in {spec!r} (expected e.g. 'data=2,model=4')"
            )
        if match.group(1) in names:
            raise MistralNNXError(f"mesh: axis {match.group(1)!r} given twice in {spec!r}")
        if int(match.group(2)) < 1:
            raise MistralNNXError(f"mesh: axis {match.group(1)!r} in {spec!r} has size 0")
        names.append(match.group(1))
        sizes.append(int(match.group(2)))
    if math.prod(sizes) != len(devices):
        raise MistralNNXError(
            f"mesh: {spec!r} has {math.prod(sizes)} devices but "
            f"{len(devices)} are available (sizes must multiply to the count)"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=auto, devices=devices)


def parse_rules(text: str) -> dict[str, str | None]:
    """A preset name, or custom rules as text: `"q_heads=model,mlp=model,embed=none"`."""
    if "=" not in text:
        if text not in PRESETS:
            raise MistralNNXError(
                f"rules: unknown preset {text!r} "
                f"(presets: {', '.join(PRESETS)}; or e.g. 'mlp=model,embed=data')"
            )
        return dict(PRESETS[text])
    out: dict[str, str | None] = {}
    for part in text.split(","):
        logical, sep, axis = (x.strip() for x in part.partition("="))
        if not sep or not logical or not axis:
            raise MistralNNXError(
                f"rules: cannot parse {part!r} in {text!r} (expected e.g. 'mlp=model,embed=data')"
            )
        out[logical] = None if axis.lower() == "none" else axis
    return out


def resolve_rules(rules: str | Rules | None, mesh: Mesh) -> dict[str, str | None]:
    """A preset name, rules text or a mapping {logical axis: mesh axis or None}; logical axes
    not named are replicated. A preset adapts to the mesh (its axes missing from the mesh are
    replicated: "tp" on a mesh "model=8"); custom rules must name existing axes only."""
    if rules is None:
        rules = "tp"  # the fastest for inference; "tp+fsdp" when memory is tighter
    preset = isinstance(rules, str) and rules in PRESETS
    if isinstance(rules, str):
        rules = parse_rules(rules)
    out: dict[str, str | None] = {}
    for logical, axis in rules.items():
        if logical not in LOGICAL_AXES:
            raise MistralNNXError(
                f"rules: unknown logical axis {logical!r} (known: {', '.join(LOGICAL_AXES)})"
            )
        if logical == "head_dim" and axis is not None:
            raise MistralNNXError("rules: head_dim is never sharded")
        if axis is not None and axis not in mesh.axis_names:
            if preset:
                axis = None
            else:
                raise MistralNNXError(
                    f"rules: mesh axis {axis!r} (for {logical!r}) is not in the mesh "
                    f"{dict(mesh.shape)}"
                )
        out[logical] = axis
    return out


def partition_spec(axes: Sequence[str | None], rules: Mapping[str, str | None]) -> PartitionSpec:
    """Logical axes -> PartitionSpec. A mesh axis is used at most once per array."""
    used: set[str] = set()
    spec: list[str | None] = []
    for name in axes:
        axis = rules.get(name) if name is not None else None
        if axis is not None and axis in used:
            axis = None
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


class Sharder:
    """Maps (shape, logical axes) to a NamedSharding on one mesh under one set of rules.

    `strict` (parameters) refuses a dimension the rules would split unevenly, except the axes of
    REPLICATE_IF_UNEVEN; otherwise (caches, activations) any such dimension is replicated, as
    large frameworks do for 2 kv heads over 4 devices or a batch of 3 over 2.
    """

    def __init__(self, mesh: Mesh, rules: str | Rules | None = None) -> None:
        self.mesh = mesh
        self.rules = resolve_rules(rules, mesh)

    def spec(
        self,
        shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        strict: bool = False,
        name: str = "array",
    ) -> PartitionSpec:
        spec = list(partition_spec(axes, self.rules))
        for i, axis in enumerate(spec):
            if axis is None:
                continue
            n = self.mesh.shape[axis]
            if shape[i] % n:
                if strict and axes[i] not in REPLICATE_IF_UNEVEN:
                    raise MistralNNXError(
                        f"sharding: {name} dimension {i} ({axes[i]}, size {shape[i]}) does not "
                        f"divide evenly over mesh axis {axis!r} of size {n}"
                    )
                spec[i] = None
        return PartitionSpec(*spec)

    def __call__(
        self,
        shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        strict: bool = False,
        name: str = "array",
    ) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(shape, axes, strict=strict, name=name))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


_ACTIVE: contextvars.ContextVar[Sharder | None] = contextvars.ContextVar("sharder", default=None)


@contextlib.contextmanager
def activation_sharding(sharder: Sharder | None) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set(sharder)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharder() -> Sharder | None:
    """The sharder of the enclosing `activation_sharding`, if any."""
    return _ACTIVE.get()


def sharded_activations() -> bool:
    """Whether the code being traced runs under `activation_sharding` with a mesh."""
    return _ACTIVE.get() is not None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A sharding constraint on an activation, or nothing when no mesh is active."""
    sharder = _ACTIVE.get()
    if sharder is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharder(x.shape, axes))


def replicate(x: Any) -> Any:
    """Constrain every array of `x` (a pytree) to be fully replicated when a mesh is active, so
    that each process can read it on the host; nothing without a mesh."""
    sharder = _ACTIVE.get()
    if sharder is None:
        return x
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharder.replicated()), x)


def host_local_array(x: Any) -> np.ndarray:
    """A (possibly multi-host sharded) array as a numpy array on every process: a local copy when
    this process holds all of it (or it is replicated), else an all-gather across processes
    (a collective: every process must make the same call)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
