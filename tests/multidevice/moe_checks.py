"""Mixtral on 8 fake CPU devices: every preset against one device.

Run by tests/test_mixtral_sharding.py as `python moe_checks.py CHECKPOINT OUT_JSON` with
XLA_FLAGS=--xla_force_host_platform_device_count=8. Records logit differences, generated tokens
and per-parameter shard sizes; the tests assert on them.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mistral_nnx as mn
from mistral_nnx.engine import EngineOptions, generate
from mistral_nnx.sharding import activation_sharding

RUNS = [
    ("data=2,model=4", "tp"),
    ("data=2,model=4", "fsdp"),
    ("data=2,model=4", "tp+fsdp"),
    ("data=1,model=8", "ep"),
]
# The engine under a mesh once: experts spread over devices, so decode gathers across them.
GENERATE = {("data=1,model=8", "ep")}
PROMPTS = [[int(t) for t in np.random.RandomState(n).randint(3, 256, n)] for n in (5, 14)]
OPTIONS = EngineOptions(decode_steps=4, prefill_chunk=16)


def forward(model: mn.Mistral, tokens: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: Any, tokens: jax.Array) -> jax.Array:
        with activation_sharding(model.sharder):
            return nnx.merge(graphdef, state)(tokens)

    return np.asarray(run(state, jnp.asarray(tokens)))


def shard_report(model: mn.Mistral, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        spec = list(value.sharding.spec)
        out[".".join(map(str, path))] = dict(
            spec=spec,
            n=math.prod(mesh.shape[a] for a in spec if a is not None),
            size=int(value.size),
            shard_sizes=sorted({int(s.data.size) for s in value.addressable_shards}),
        )
    return out


def main(checkpoint: str, out_path: str) -> None:
    tokens = np.random.RandomState(0).randint(0, 256, (8, 24)).astype(np.int32)
    single = mn.load_model(checkpoint, progress=False)
    reference = forward(single, tokens)
    ref_tokens = [c.tokens for c in generate(single, PROMPTS, max_new_tokens=8, options=OPTIONS)]
    out: dict[str, Any] = dict(devices=jax.device_count(), runs={})
    for spec, preset in RUNS:
        mesh = mn.make_mesh(spec)
        model = mn.load_model(checkpoint, mesh=mesh, rules=preset, progress=False)
        run: dict[str, Any] = dict(
            max_diff=float(np.abs(forward(model, tokens) - reference).max()),
            params=shard_report(model, mesh),
        )
        if (spec, preset) in GENERATE:
            got = generate(model, PROMPTS, max_new_tokens=8, options=OPTIONS)
            run["same_tokens"] = [c.tokens for c in got] == ref_tokens
        out["runs"][f"{spec} {preset}"] = run
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
