"""Training sharded over a mesh (4 fake CPU devices, in a subprocess): full fine-tuning with
tp+fsdp gives the losses of one device, with AdamW moments split like the weights; LoRA over an
fsdp-sharded base trains (adapters and optimizer counters replicated); QLoRA over tp+fsdp gives
the losses of QLoRA on one device, its quantised base split like the float one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import write_model

HELPER = Path(__file__).parent / "multidevice" / "train_checks.py"


def test_fsdp_and_tp_fsdp_train_like_one_device(tmp_path: Path) -> None:
    write_model(tmp_path / "base", seed=4)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(HELPER), str(tmp_path / "base"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text())
    one, tp_fsdp, lora, qlora_one, qlora_mesh = runs
    assert tp_fsdp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    # LoRA starts from the same model (B = 0), then learns
    assert lora["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert lora["losses"][-1] < lora["losses"][0]
    # mlp.up [128, 64]: embed over data=2 (both presets), mlp over model=2 (tp+fsdp only)
    assert tp_fsdp["weight_shards"] == lora["weight_shards"] == 4
    assert tp_fsdp["weight_shard_shape"] == tp_fsdp["moment_shard_shape"] == [64, 32]
    assert lora["weight_shard_shape"] == [128, 32]
    # QLoRA: the same training on the mesh, the nf4 codes of mlp.up split like the float weight
    assert qlora_mesh["losses"] == pytest.approx(qlora_one["losses"], rel=1e-5)
    assert qlora_one["losses"][-1] < qlora_one["losses"][0]
    assert qlora_mesh["weight_shards"] == 4
    assert qlora_mesh["weight_shard_shape"] == [64, 32]
