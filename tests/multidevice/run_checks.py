"""Every single-process multi-device check, in one process with 8 fake CPU devices.

Run by tests/test_sharding.py as `python run_checks.py CONFIG_JSON OUT_JSON` with
XLA_FLAGS=--xla_force_host_platform_device_count=8; it records facts (logit differences,
generated tokens, PartitionSpecs, shard shapes, error messages) and the tests assert on them, so
the main pytest process keeps its single device and compiles nothing here.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mistral_nnx as mn
from mistral_nnx.cache import init_cache
from mistral_nnx.checkpoint import safetensors_io
from mistral_nnx.engine import EngineOptions, generate
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.sharding import Sharder, activation_sharding

OPTIONS = EngineOptions(decode_steps=4, prefill_chunk=16)


@functools.partial(jax.jit, static_argnames=("graphdef", "sharder"))
def _forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    valid: jax.Array,
    sharder: Sharder | None,
) -> jax.Array:
    """The jitted forward with the model's activation constraints (as the engine runs it)."""
    with activation_sharding(sharder):
        return nnx.merge(graphdef, state)(tokens, valid=valid)


def forward(model: mn.Mistral, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(
        _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), model.sharder)
    )


def spec_of(array: jax.Array) -> list[Any]:
    sharding = array.sharding
    assert isinstance(sharding, jax.sharding.NamedSharding)
    return list(sharding.spec)


def shard_report(model: mn.Mistral, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Per parameter: spec, and whether every device's buffer is exactly 1/n of it, where n is
    the product of the mesh axes the spec names."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        n = math.prod(mesh.shape[a] for a in spec_of(value) if a is not None)
        shards = value.addressable_shards
        out[".".join(map(str, path))] = dict(
            spec=spec_of(value),
            n=n,
            size=int(value.size),
            devices=len({s.device for s in shards}),
            shard_sizes=sorted({int(s.data.size) for s in shards}),
        )
    return out


def error_of(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except MistralNNXError as e:
        return str(e)
    return None


def bad_inputs(checkpoint: str) -> dict[str, Any]:
    """Each refusal must come before any weight is read: reading one raises here."""

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a weight was read before the refusal")

    real = safetensors_io.read_tensor
    safetensors_io.read_tensor = no_read
    try:
        mesh = mn.make_mesh("data=2,model=4")
        return dict(
            mesh_size=error_of(lambda: mn.make_mesh("data=2,model=2")),
            unknown_logical=error_of(
                lambda: mn.load_model(
                    checkpoint, mesh=mesh, rules={"heads": "model"}, progress=False
                )
            ),
            unknown_mesh_axis=error_of(
                lambda: mn.load_model(
                    checkpoint, mesh=mesh, rules={"q_heads": "tensor"}, progress=False
                )
            ),
            unknown_preset=error_of(
                lambda: mn.load_model(checkpoint, mesh=mesh, rules="tp+dp", progress=False)
            ),
            # 8 query heads over 3 devices: no even split, and padding heads is no option.
            uneven=error_of(
                lambda: mn.load_model(
                    checkpoint,
                    mesh=mn.make_mesh("model=3", jax.devices()[:3]),
                    rules={"q_heads": "model"},
                    progress=False,
                )
            ),
        )
    finally:
        safetensors_io.read_tensor = real


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    tokens = np.asarray(config["tokens"], np.int32)
    valid = np.asarray(config["valid"], bool)
    prompts = config["prompts"]
    max_new = config["max_new_tokens"]
    results: dict[str, Any] = dict(devices=jax.device_count(), runs={})
    for name, checkpoint in config["checkpoints"].items():
        single = mn.load_model(checkpoint, progress=False)
        ref_logits = forward(single, tokens, valid)
        ref_tokens = [
            c.tokens for c in generate(single, prompts, max_new_tokens=max_new, options=OPTIONS)
        ]
        results[name] = dict(tokens=ref_tokens)
        for spec, rules in config["runs"][name]:
            mesh = mn.make_mesh(spec)
            model = mn.load_model(checkpoint, mesh=mesh, rules=rules, progress=False)
            assert model.sharder is not None
            logits = forward(model, tokens, valid)
            out = [
                c.tokens for c in generate(model, prompts, max_new_tokens=max_new, options=OPTIONS)
            ]
            cache = init_cache(
                model.config,
                len(prompts),
                64,
                sharding=functools.partial(model.sharder, strict=False),
            )
            results["runs"][f"{name} {spec} {rules}"] = dict(
                logits_diff=float(np.abs(logits - ref_logits).max()),
                tokens=out,
                same_tokens=out == ref_tokens,
                params=shard_report(model, mesh),
                cache_k=spec_of(cache.layers[0].k),
                cache_pos=spec_of(cache.layers[0].pos),
                seconds=time.perf_counter() - t0,
            )
    results["bad_inputs"] = bad_inputs(config["checkpoints"]["kv8"])
    mesh = mn.make_mesh("data=2,model=4")
    shapes = {
        "embed,q_heads,head_dim": (64, 8, 16),
        "vocab,embed": (256, 64),
        "embed,mlp": (64, 128),
        "batch,kv_heads": (4, 2),
    }
    results["preset_specs"] = {
        rules: {
            axes: list(Sharder(mesh, rules).spec(shape, tuple(axes.split(","))))
            for axes, shape in shapes.items()
        }
        for rules in ("tp", "fsdp", "tp+fsdp", "replicated")
    }
    results["seconds"] = time.perf_counter() - t0
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
