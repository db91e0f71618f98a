"""Training on 4 fake CPU devices: full fine-tuning (tp+fsdp) against one device, LoRA
(fsdp), and QLoRA (nf4 base, tp+fsdp) against QLoRA on one device. Run by
tests/test_train_mesh.py as `python train_checks.py CHECKPOINT OUT_JSON` with
XLA_FLAGS=--xla_force_host_platform_device_count=4; writes the losses and where the weights and
optimizer moments live."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from flax import nnx

import mistral_nnx
from mistral_nnx.train.lora import LoraConfig, apply_lora
from mistral_nnx.train.step import OptimConfig, Trainer

MESH = "data=2,model=2"
RUNS = [
    (None, None, "full"),
    (MESH, "tp+fsdp", "full"),
    (MESH, "fsdp", "lora"),
    (None, None, "qlora"),
    (MESH, "tp+fsdp", "qlora"),
]


def batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 300, (4, 16)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones((4, 16), bool), "valid": np.ones((4, 16), bool)}


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = []
    for mesh, rules, mode in RUNS:
        lora = mode != "full"
        m = mistral_nnx.make_mesh(mesh) if mesh else None
        model = mistral_nnx.load_model(checkpoint, mesh=m, rules=rules, progress=False)
        if lora:
            quant = "nf4" if mode == "qlora" else None
            model = apply_lora(model, LoraConfig(4, 8, quant=quant, quant_block=32))
        optim = OptimConfig(steps=5, lr=1e-2, schedule="constant")
        trainer = Trainer(model, optim, wrt=nnx.LoRAParam if lora else nnx.Param)
        losses = [trainer.step(batch(0))["loss"] for _ in range(3)]
        flat = {
            ".".join(map(str, (0, *p))): v.get_value()
            for p, v in nnx.to_flat_state(nnx.state(trainer.model))
        }
        flat |= {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(trainer.state)}
        up = "0.layers.0.mlp.up" + (".array.qvalue" if mode == "qlora" else "")
        moment = next(
            k for k in flat if k.endswith(".mu.layers.0.mlp." + ("up_lora_b" if lora else "up"))
        )
        results.append(
            {
                "mesh": mesh,
                "rules": rules,
                "mode": mode,
                "losses": losses,
                "weight_shards": len(flat[up].sharding.device_set),
                "weight_shard_shape": list(flat[up].addressable_shards[0].data.shape),
                "moment_shard_shape": list(flat[moment].addressable_shards[0].data.shape),
                "moment_shape": list(flat[moment].shape),
            }
        )
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
