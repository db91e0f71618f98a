"""The optimizer and the jitted train step.

AdamW on a linear-warmup + cosine schedule, global-norm clipping, gradient accumulation with
optax.MultiSteps; the step is one jax.jit over the split (model, optimizer) state, donated, so
parameters and optimizer moments are updated in place. Only the variables of `wrt` are trained
(nnx.LoRAParam for LoRA, nnx.Param for full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sharding import Sharder, activation_sharding
from mistral_nnx.train.lora import without_dropout
from mistral_nnx.train.loss import loss


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`steps` optimizer updates, each over `grad_accum` batches; `warmup` is a fraction of
    `steps` (< 1) or a number of steps."""

    steps: int = 100
    lr: float = 2e-4
    warmup: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip: float | None = 1.0
    grad_accum: int = 1
    schedule: str = "cosine"  # or "constant"
    optimizer: str = "adamw"  # or "sgd"

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise MistralNNXError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise MistralNNXError(f"lr must be positive, got {self.lr!r}")
        if self.warmup < 0:
            raise MistralNNXError(f"warmup must be >= 0, got {self.warmup!r}")
        if self.schedule not in ("cosine", "constant"):
            raise MistralNNXError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise MistralNNXError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")

    @property
    def warmup_steps(self) -> int:
        return int(math.ceil(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    def schedule_fn(self) -> optax.Schedule:
        if self.schedule == "constant":
            return optax.constant_schedule(self.lr)
        warmup = min(self.warmup_steps, self.steps - 1)
        return optax.warmup_cosine_decay_schedule(
            0.0, self.lr, warmup_steps=warmup, decay_steps=self.steps, end_value=0.0
        )

    def transformation(self) -> optax.GradientTransformation:
        schedule = self.schedule_fn()
        if self.optimizer == "sgd":
            opt = optax.sgd(schedule)
        else:
            opt = optax.adamw(schedule, self.b1, self.b2, self.eps, weight_decay=self.weight_decay)
        tx = optax.chain(optax.clip_by_global_norm(self.clip), opt) if self.clip else opt
        if self.grad_accum > 1:
            return optax.MultiSteps(tx, every_k_schedule=self.grad_accum)  # type: ignore[return-value]
        return tx


@functools.cache
def _transformation(optim: OptimConfig) -> optax.GradientTransformation:
    """One optax object per config: equal configs give equal graphdefs (one compile)."""
    return optim.transformation()


def _frozen(wrt: Any) -> Any:
    """The weights a step reads but does not train (the base model under LoRA)."""
    return nnx.All(nnx.Param, nnx.Not(wrt))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def train_step(
    graphdef: Any,
    wrt: Any,
    sharder: Sharder | None,
    optim: OptimConfig,
    frozen: Any,
    state: Any,
    batch: Mapping[str, jax.Array],
) -> tuple[Any, dict[str, jax.Array]]:
    """One micro-batch: loss, gradients of the `wrt` variables, optimizer update. `state` (the
    trained variables, optimizer and random state) is donated: updated in place; `frozen` (the
    rest) is only read, so the model it came from stays usable. Module-level, so identical
    models share one compiled program."""
    with activation_sharding(sharder):
        model, optimizer = nnx.merge(graphdef, frozen, state)
        grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (value, count), grads = grad_fn(model, batch)
        lr = optim.schedule_fn()(optimizer.step[...] // optim.grad_accum)
        optimizer.update(model, grads)
        metrics = {"loss": value, "tokens": count, "grad_norm": optax.global_norm(grads), "lr": lr}
        parts: Any = nnx.split((model, optimizer), _frozen(wrt), ...)
        return parts[2], metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_step(
    graphdef: Any, sharder: Sharder | None, frozen: Any, state: Any, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    with activation_sharding(sharder):
        model, _ = nnx.merge(graphdef, frozen, state)
        return loss(without_dropout(model), batch)


class Trainer:
    """Holds the (model, optimizer) state split apart (frozen weights / the rest) and steps it
    with `train_step`.

    `trainer.step(batch)` runs one micro-batch (an optimizer update every `grad_accum` of them)
    and returns {"loss", "tokens", "grad_norm", "lr"} as host floats; `trainer.model` is the current
    model.
    """

    def __init__(self, model: Mistral, optim: OptimConfig, wrt: Any = nnx.LoRAParam) -> None:
        self.optim = optim
        self.wrt = wrt
        self.sharder: Sharder | None = model.sharder
        if self.sharder is not None:
            _replicate_unplaced(model, self.sharder)
        optimizer = nnx.Optimizer(model, _transformation(optim), wrt=wrt)
        if self.sharder is not None:
            _replicate_unplaced(optimizer, self.sharder)
        parts: Any = nnx.split((model, optimizer), _frozen(wrt), ...)
        self.graphdef: Any = parts[0]
        self.frozen: Any = parts[1]
        self.state: Any = parts[2]
        # Every array committed to its device(s), as the step's outputs are: the second step
        # then reuses the first one's program.
        for _, var in nnx.to_flat_state(self.state):
            value = var.get_value()
            if isinstance(value, jax.Array) and not value.committed:
                var.set_value(jax.device_put(value, value.sharding))

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.sharder is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {
            k: jax.device_put(v, self.sharder(v.shape, ("batch", None))) for k, v in batch.items()
        }

    def step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        self.state, metrics = train_step(
            self.graphdef,
            self.wrt,
            self.sharder,
            self.optim,
            self.frozen,
            self.state,
            self.put(batch),
        )
        return {k: float(v) for k, v in metrics.items()}

    def eval_loss(self, batch: Mapping[str, np.ndarray]) -> tuple[float, float]:
        batch_ = self.put(batch)
        value, count = eval_step(self.graphdef, self.sharder, self.frozen, self.state, batch_)
        return float(value), float(count)

    @property
    def model(self) -> Mistral:
        model, _ = nnx.merge(self.graphdef, self.frozen, self.state)
        return model  # type: ignore[no-any-return]


def _replicate_unplaced(module: Any, sharder: Sharder) -> None:
    """Variables not on the mesh yet (adapters, optimizer counters) replicated over it."""
    mesh_devices = set(sharder.mesh.devices.flat)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and isinstance(var.get_value(), jax.Array):
            value = var.get_value()
            if set(value.sharding.device_set) != mesh_devices:
                var.set_value(jax.device_put(value, sharder.replicated()))
