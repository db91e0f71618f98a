"""Next-token cross-entropy in float32 with a loss mask, as transformers computes it for
`model(input_ids, attention_mask=valid, labels=where(loss_mask, input_ids, -100))`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mistral_nnx.model import Mistral

Batch = Mapping[str, jax.Array]


def target_mask(loss_mask: Any, valid: Any) -> Any:
    """[B, T - 1] bool: which next tokens count as targets (loss_mask and not padding). Plain
    operators, so numpy batches (the loop's accumulation weights) and traced ones agree."""
    return (loss_mask & valid)[:, 1:]


def loss(model: Mistral, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(mean loss over the counted targets, number of counted targets).

    batch: "tokens" [B, T] int; "loss_mask" [B, T] bool, True where token t is a target
    (predicted from the tokens before it: completion-only training leaves the prompt False);
    optional "valid" [B, T] bool, False on padding (padding is never a target either).
    """
    tokens = jnp.asarray(batch["tokens"])
    valid = jnp.asarray(batch.get("valid", jnp.ones(tokens.shape, bool)), bool)
    # Position t predicts token t + 1: the last input token predicts nothing, so it is not fed.
    logits = model(tokens[:, :-1], valid=valid[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    weights = target_mask(jnp.asarray(batch["loss_mask"], bool), valid).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(weights)
    total = jnp.sum((log_z - target_logit) * weights)
    return total / jnp.maximum(count, 1.0), count
