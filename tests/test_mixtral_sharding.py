"""Mixtral sharded over 8 fake CPU devices with every preset (in one subprocess, as
tests/test_sharding.py does for the dense model): logits equal one device, shards 1/n."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_mixtral import build_mixtral

HELPER = Path(__file__).parent / "multidevice" / "moe_checks.py"
# Every sharded dimension divides 8: 8 query and kv heads, 8 experts, mlp 128, vocab 256.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=16,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("moe_sharding")
    build_mixtral(root / "ckpt", seed=7, **TINY)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(root / "ckpt"), str(root / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "out.json").read_text())


def test_every_preset_matches_one_device(checks):
    assert checks["devices"] == 8
    assert len(checks["runs"]) == 4
    assert "same_tokens" in checks["runs"]["data=1,model=8 ep"]
    for name, run in checks["runs"].items():
        assert run["max_diff"] < 1e-5, name
        if "same_tokens" in run:
            assert run["same_tokens"], name


def test_every_parameter_is_split_evenly(checks):
    for name, run in checks["runs"].items():
        for param, p in run["params"].items():
            assert p["shard_sizes"] == [p["size"] // p["n"]], (name, param, p)


def test_expert_weights_follow_the_preset(checks):
    runs = checks["runs"]
    gate = "layers.0.mlp.gate"  # [E, D, M]
    # tp: every expert split inside (mlp over model); tp+fsdp adds embed over data.
    assert runs["data=2,model=4 tp"]["params"][gate]["spec"] == [None, None, "model"]
    assert runs["data=2,model=4 tp+fsdp"]["params"][gate]["spec"] == [None, "data", "model"]
    assert runs["data=2,model=4 tp+fsdp"]["params"][gate]["n"] == 8
    assert runs["data=2,model=4 fsdp"]["params"][gate]["spec"] == [None, "data", None]
    # ep: whole experts per device.
    assert runs["data=1,model=8 ep"]["params"][gate]["spec"] == ["model", None, None]
    assert runs["data=1,model=8 ep"]["params"]["layers.1.mlp.down"]["n"] == 8
