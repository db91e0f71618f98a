"""Supervised fine-tuning: loss, LoRA (qwix), data, the optax step and loop, export."""

from mistral_nnx.train.lora import LoraConfig, apply_lora, count_params, merge_lora
from mistral_nnx.train.loss import loss

__all__ = ["LoraConfig", "apply_lora", "count_params", "loss", "merge_lora"]
