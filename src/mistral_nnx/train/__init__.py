"""Supervised fine-tuning: loss, LoRA (qwix), data, the optax step and loop, export.

Names are imported on first use, so that the CLI can register `finetune` without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mistral_nnx.train.lora import LoraConfig, apply_lora, count_params, merge_lora
    from mistral_nnx.train.loss import loss

_WHERE = {
    "LoraConfig": "mistral_nnx.train.lora",
    "apply_lora": "mistral_nnx.train.lora",
    "count_params": "mistral_nnx.train.lora",
    "merge_lora": "mistral_nnx.train.lora",
    "loss": "mistral_nnx.train.loss",
}

__all__ = ["LoraConfig", "apply_lora", "count_params", "loss", "merge_lora"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mistral_nnx.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
