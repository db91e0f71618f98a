"""The optimizer and the jitted train step.

AdamW on a linear-warmup + cosine schedule, global-norm clipping, gradient accumulation with
optax.MultiSteps (token-weighted: `accumulation_weights`); the step is one jax.jit over the
split (model, optimizer) state, donated, so parameters and optimizer moments are updated in
place. Only the variables of `wrt` are trained (nnx.LoRAParam for LoRA, nnx.Param for full
fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
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
from mistral_nnx.train.loss import loss, target_mask


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


class HashedOnce:
    """A static jit argument hashed once. jax hashes the static arguments on every dispatch, and
    flax's GraphDef rehashes its whole node tree each time (8 ms for SmolLM2 under LoRA)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashedOnce):
            return NotImplemented
        return self.value is other.value or (
            self._hash == other._hash and self.value == other.value
        )


def _frozen(wrt: Any) -> Any:
    """The weights a step reads but does not train (the base model under LoRA)."""
    return nnx.All(nnx.Param, nnx.Not(wrt))


# The step takes and returns the variables as flat lists of arrays, their tree structures static:
# passing nnx.State itself made jax flatten ~1,500 Variables and build ~1,300 new ones around the
# outputs in Python on every call, 28 ms of dispatch per step (benchmarks/RESULTS.md section 6).
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def train_step(
    structure: HashedOnce,
    wrt: Any,
    sharder: Sharder | None,
    optim: OptimConfig,
    frozen: list[jax.Array],
    state: list[jax.Array],
    batch: Mapping[str, jax.Array],
    weight: jax.Array,
) -> tuple[list[jax.Array], dict[str, jax.Array]]:
    """One micro-batch: loss, gradients of the `wrt` variables, optimizer update. `state` (the
    trained variables, optimizer and random state) is donated: updated in place; `frozen` (the
    rest) is only read, so the model it came from stays usable. `structure` is (graphdef, frozen
    treedef, state treedef). Module-level, so identical models share one compiled program.
    The gradient is of `weight` x the micro-batch's mean loss (see `accumulation_weights`)."""

    def objective(model: Mistral, batch: Mapping[str, jax.Array]) -> Any:
        value, count = loss(model, batch)
        return value * weight, (value, count)

    with activation_sharding(sharder):
        model, optimizer = _merge(structure, frozen, state)
        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (_, (value, count)), grads = grad_fn(model, batch)
        lr = optim.schedule_fn()(optimizer.step[...] // optim.grad_accum)
        optimizer.update(model, grads)
        metrics = {"loss": value, "tokens": count, "grad_norm": optax.global_norm(grads), "lr": lr}
        parts: Any = nnx.split((model, optimizer), _frozen(wrt), ...)
        new_state, new_def = jax.tree.flatten(parts[2])
        assert new_def == structure.value[2], "the train step changed the state's structure"
        return new_state, metrics


def accumulation_weights(batches: Sequence[Mapping[str, np.ndarray]]) -> list[float]:
    """Per micro-batch of one optimizer step, the weight on its mean loss that makes the
    accumulated update (optax.MultiSteps averages the k gradients) the gradient of the mean
    loss over every target of the k batches, as one big batch and transformers' Trainer give:
    k x (its targets / all targets). Equal counts give 1.0 each."""
    counts = []
    for b in batches:
        valid = np.asarray(b.get("valid", True), bool)  # True: no padding
        counts.append(float(np.sum(target_mask(np.asarray(b["loss_mask"], bool), valid))))
    total = sum(counts)
    return [len(counts) * n / total if total else 1.0 for n in counts]


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_step(
    structure: HashedOnce,
    sharder: Sharder | None,
    frozen: list[jax.Array],
    state: list[jax.Array],
    batch: Mapping[str, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    with activation_sharding(sharder):
        model, _ = _merge(structure, frozen, state)
        return loss(without_dropout(model), batch)


def _merge(structure: HashedOnce, frozen: list[jax.Array], state: list[jax.Array]) -> Any:
    """(model, optimizer) from the flat frozen and state leaves."""
    graphdef, frozen_def, state_def = structure.value
    return nnx.merge(
        graphdef, jax.tree.unflatten(frozen_def, frozen), jax.tree.unflatten(state_def, state)
    )


class Trainer:
    """Holds the (model, optimizer) state split apart (frozen weights / the rest) and steps it
    with `train_step`.

    `trainer.step(batch)` runs one micro-batch (an optimizer update every `grad_accum` of them)
    and returns {"loss", "tokens", "grad_norm", "lr"} as host floats; `trainer.model` is the current
    model; `trainer.state` the trained variables and optimizer state as an nnx.State (assign a
    changed one back, as a checkpoint restore does).
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
        graphdef, frozen, state = parts
        # Every array committed to its device(s), as the step's outputs are: the second step
        # then reuses the first one's program.
        for _, var in nnx.to_flat_state(state):
            value = var.get_value()
            if isinstance(value, jax.Array) and not value.committed:
                var.set_value(jax.device_put(value, value.sharding))
        frozen_leaves, frozen_def = jax.tree.flatten(frozen)
        state_leaves, state_def = jax.tree.flatten(state)
        self.structure = HashedOnce((graphdef, frozen_def, state_def))
        # [frozen, state] as flat arrays, and the nnx.State views of them handed out by .frozen /
        # .state / .model, live until the next step: changes made to a view in place (a
        # checkpoint restore) are read back before it.
        self._flat = [frozen_leaves, state_leaves]
        self._views: list[Any] = [None, None]

    def _view(self, i: int) -> Any:
        if self._views[i] is None:
            self._views[i] = jax.tree.unflatten(self.structure.value[1 + i], self._leaves(i))
        return self._views[i]

    def _leaves(self, i: int) -> list[jax.Array]:
        if self._views[i] is not None:
            leaves, treedef = jax.tree.flatten(self._views[i])
            if treedef != self.structure.value[1 + i]:
                raise MistralNNXError("Trainer: a state handed out changed its structure")
            self._flat[i] = leaves
        return self._flat[i]

    @property
    def frozen(self) -> Any:
        return self._view(0)

    @property
    def state(self) -> Any:
        return self._view(1)

    @state.setter
    def state(self, value: Any) -> None:
        leaves, treedef = jax.tree.flatten(value)
        if treedef != self.structure.value[2]:
            raise MistralNNXError("Trainer.state: the new state's structure differs")
        self._flat[1], self._views[1] = leaves, None

    def step_args(self, batch: Mapping[str, np.ndarray], weight: float = 1.0) -> tuple[Any, ...]:
        """`train_step`'s arguments for `batch` (to lower or profile the step)."""
        return (
            self.structure,
            self.wrt,
            self.sharder,
            self.optim,
            self._leaves(0),
            self._leaves(1),
            self.put(batch),
            jnp.float32(weight),
        )

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.sharder is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {
            k: jax.device_put(v, self.sharder(v.shape, ("batch", None))) for k, v in batch.items()
        }

    def step(self, batch: Mapping[str, np.ndarray], weight: float = 1.0) -> dict[str, float]:
        """One micro-batch; `weight` scales its gradient (`accumulation_weights`: with
        grad_accum > 1, the finetune loop passes each batch's share of the step's targets)."""
        self._flat[1], metrics = train_step(*self.step_args(batch, weight))
        self._views[1] = None  # the old state was donated
        return {k: float(v) for k, v in metrics.items()}

    def eval_loss(self, batch: Mapping[str, np.ndarray]) -> tuple[float, float]:
        args = (self.structure, self.sharder, self._leaves(0), self._leaves(1), self.put(batch))
        value, count = eval_step(*args)
        return float(value), float(count)

    @property
    def model(self) -> Mistral:
        model, _ = nnx.merge(self.structure.value[0], self.frozen, self.state)
        return model  # type: ignore[no-any-return]


def _replicate_unplaced(module: Any, sharder: Sharder) -> None:
    """Variables not on the mesh yet (adapters, optimizer counters) replicated over it."""
    mesh_devices = set(sharder.mesh.devices.flat)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and isinstance(var.get_value(), jax.Array):
            value = var.get_value()
            if set(value.sharding.device_set) != mesh_devices:
                var.set_value(jax.device_put(value, sharder.replicated()))
