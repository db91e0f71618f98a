"""LoRA through google's qwix: a `qwix.LoraProvider` applied with `qwix.apply_lora_to_model`.

qwix intercepts the model's `jnp.einsum` / `jnp.dot` calls and adds `x @ A @ B * alpha / rank`
to the projections whose module path matches a rule; A and B are `nnx.LoRAParam`s that qwix
creates on the model (shapes follow the weights' layouts: A [in..., r], B [r, out...]).
On top of qwix, the provider below:
- targets weights by name: qwix rules select modules, and our Attention / MLP modules each hold
  several projections (wq, wk, wv, wo / gate, up, down), so the weight's full path
  ("layers/3/attn/wq") is also matched against the target regexes;
- keeps adapters float32 on any base dtype (qwix would give them the base weight's dtype) and
  casts the projection's output back to the compute dtype;
- intercepts `forward` (what `__call__` and the inference engine both call) and applies dropout
  only while the model holds dropout random state (training).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral

# Short names (as in PEFT's target_modules for Mistral) -> our weight paths.
SHORT_TARGETS = {
    "q": r"layers/\d+/attn/wq",
    "k": r"layers/\d+/attn/wk",
    "v": r"layers/\d+/attn/wv",
    "o": r"layers/\d+/attn/wo",
    "gate": r"layers/\d+/mlp/gate",
    "up": r"layers/\d+/mlp/up",
    "down": r"layers/\d+/mlp/down",
}
ALL_TARGETS = tuple(SHORT_TARGETS)
# Our weight name -> HF / PEFT module name.
HF_MODULES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r as in PEFT), dropout on the adapter
    input, targets: short names (q, k, v, o, gate, up, down) or regexes over weight paths
    such as "layers/0/attn/wq"."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise MistralNNXError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise MistralNNXError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MistralNNXError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise MistralNNXError("LoRA targets: at least one target is needed")
        for t in self.targets:
            try:
                re.compile(SHORT_TARGETS.get(t, t))
            except re.error as e:
                raise MistralNNXError(f"LoRA target {t!r} is not a valid regex: {e}") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(SHORT_TARGETS.get(t, t) for t in self.targets)


def _zeros_f32(key: jax.Array, shape: Sequence[int], dtype: Any = None) -> jax.Array:
    """qwix's initialiser for both adapters while tracing: float32 whatever the base dtype (the
    values are filled in by apply_lora)."""
    del key, dtype
    return jnp.zeros(shape, jnp.float32)


def init_a(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """He-uniform over the input dimension (qwix's default for A): U(-sqrt(6/in), sqrt(6/in))."""
    limit = np.sqrt(6.0 / int(np.prod(shape[:-1])))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


_CLASSES: dict[Any, type] = {}


@functools.cache
def _provider(config: LoraConfig) -> Any:
    import qwix
    from qwix._src.providers import lora as qlora
    from qwix._src.providers import ptq
    from qwix._src.utils import flax_util

    patterns = [re.compile(p) for p in config.patterns]

    class TargetedLoraProvider(qwix.LoraProvider):  # type: ignore[misc]
        """qwix's LoraProvider restricted to weights whose path matches a target. The adapter
        term is computed here with qwix's own helpers (shapes, parameter creation, delta) rather
        than by LoraProvider's methods, which set a module attribute on every call (refused
        inside the inference engine's loops) and always apply dropout; here dropout applies only
        while the model holds dropout random state (training), and the output is cast back to
        the compute dtype (float32 adapters on a bfloat16 model)."""

        def _target(self, op: str, rhs: Any) -> tuple[Any, str] | None:
            rule, _ = self._get_current_rule_and_op_id(op, repeated_call=True)
            name = flax_util.find_param(rhs, ptq.WithAux)
            if not isinstance(rule, qlora.LoraRule) or name is None:
                return None
            path = "/".join(map(str, flax_util.get_current_module_path())) + "/" + name
            return (rule, name) if any(p.fullmatch(path) for p in patterns) else None

        def _dropout(self, rule: Any, x: jax.Array) -> jax.Array:
            module = flax_util.get_current_module()
            if rule.dropout > 0 and isinstance(getattr(module, "qwix_rngs", None), nnx.Rngs):
                rng = flax_util.make_rng("dropout")
                return nnx.Dropout(rule.dropout, deterministic=False)(x, rngs=rng)
            return x

        def einsum(self, einsum_str: str, *operands: Any, **kwargs: Any) -> jax.Array:
            out = ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
            found = self._target("einsum", operands[1]) if len(operands) == 2 else None
            if found is None:
                return out
            (rule, name), (lhs, rhs) = found, operands
            a_shape, b_shape, lora_str, a_t, b_t = qlora._parse_einsum_str_for_lora(
                lhs.shape, rhs.shape, einsum_str, rule.rank
            )
            a, b = qlora._get_or_create_lora_params(
                name=name,
                rule=rule,
                a_shape=a_shape,
                b_shape=b_shape,
                a_sharding_transpose=a_t,
                b_sharding_transpose=b_t,
            )
            delta = jnp.einsum(lora_str, self._dropout(rule, lhs), a, b, **kwargs)
            return (out + delta * (rule.alpha / rule.rank)).astype(lhs.dtype)

        def dot_general(
            self,
            lhs: Any,
            rhs: Any,
            dimension_numbers: Any,
            precision: Any = None,
            preferred_element_type: Any = None,
            out_sharding: Any = None,
        ) -> jax.Array:
            # In our model every jnp.dot inside a LoRA'd module takes a weight; wo is reshaped
            # first, which qwix can only follow back to its parameter inside a jit trace.
            if not isinstance(rhs, jax.core.Tracer) and flax_util.find_param(rhs) is None:
                raise MistralNNXError(
                    "a LoRA model must be called under jax.jit / nnx.jit (qwix finds reshaped "
                    "weights only while tracing)"
                )
            out = ptq.PtqProvider.dot_general(
                self,
                lhs,
                rhs,
                dimension_numbers,
                precision,
                preferred_element_type,
                out_sharding=out_sharding,
            )
            found = self._target("dot_general", rhs)
            if found is None:
                return out
            rule, name = found
            (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
            rhs_ra = tuple(i for i in range(rhs.ndim) if i not in rhs_ca and i not in rhs_ba)
            contract = tuple(rhs.shape[i] for i in rhs_ca)
            batch = tuple(rhs.shape[i] for i in rhs_ba)
            remain = tuple(rhs.shape[i] for i in rhs_ra)
            a_shape, a_t, b_shape, b_t = qlora._create_lora_layer_shapes(
                rhs_ca, rhs_ba, rhs_ra, contract, batch, remain, rule.rank
            )
            a, b = qlora._get_or_create_lora_params(
                name=name,
                rule=rule,
                a_shape=a_shape,
                b_shape=b_shape,
                a_sharding_transpose=a_t,
                b_sharding_transpose=b_t,
            )
            delta = qlora._compute_lora_delta(
                self._dropout(rule, lhs),
                a,
                b,
                lhs_ca,
                lhs_ba,
                contract,
                batch,
                remain,
                rule.rank,
                precision=precision,
            )
            return (out + delta * (rule.alpha / rule.rank)).astype(lhs.dtype)

    return TargetedLoraProvider(
        module_path=r"layers/\d+/(attn|mlp)",
        rank=config.rank,
        alpha=float(config.alpha),
        dropout=config.dropout,
        lora_a_initializer=_zeros_f32,
        lora_b_initializer=_zeros_f32,
    )


def apply_lora(model: Mistral, config: LoraConfig, seed: int = 0) -> Mistral:
    """A copy of `model` with LoRA adapters (A he-uniform, B = 0, float32) on the target weights
    (an abstract model gets abstract adapters: shapes only).

    qwix builds the adapted model while running it once; that run is only traced (nnx.eval_shape:
    no compile, and qwix can follow a reshaped weight back to its parameter while tracing). The
    base weights are then shared with `model` and the adapters initialised here from `seed`.
    """
    import qwix

    if model.config.is_moe:
        raise MistralNNXError("LoRA on mixture-of-experts models is not supported yet")
    provider = _provider(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    current = dict(nnx.to_flat_state(nnx.state(model)))
    shapes_only = isinstance(current[("embed",)].get_value(), jax.ShapeDtypeStruct)

    def build(m: Mistral) -> Mistral:
        # `forward`, which __call__ and the inference engine both go through
        return qwix.apply_lora_to_model(
            m, provider, tokens, methods=("forward",), rngs=nnx.Rngs(params=seed, dropout=seed)
        )

    # A concrete model is closed over rather than passed: its weights stay concrete arrays while
    # tracing, which keeps qwix's per-weight lookups cheap (on tracers they scan the whole trace).
    if shapes_only:
        abstract = nnx.eval_shape(build, model)
    else:
        abstract = nnx.eval_shape(lambda: build(model))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    adapters = 0
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.LoRAParam):
            var.set_value(current[path].get_value())
            continue
        adapters += 1
        shape = tuple(var.get_value().shape)
        if shapes_only:
            continue  # an abstract model (shapes only) gets abstract adapters
        if str(path[-1]).endswith("_lora_b"):
            var.set_value(jnp.zeros(shape, jnp.float32))
        else:
            var.set_value(jnp.asarray(init_a(rng, shape)))
    if not adapters:
        raise MistralNNXError(f"LoRA targets {list(config.targets)} match no weight of the model")
    lora_model: Mistral = nnx.merge(graphdef, state)
    # qwix makes a new subclass (holding the intercepted __call__) on every call; one per
    # provider keeps graphdefs of equal setups equal, so they share compiled programs.
    lora_model.__class__ = _CLASSES.setdefault(provider, type(lora_model))
    if config.dropout > 0:
        lora_model.set_attributes(qwix_rngs=nnx.Rngs(dropout=seed + 1), raise_if_not_found=False)
    return lora_model


def without_dropout(model: Mistral) -> Mistral:
    """Turn LoRA dropout off (in place; evaluation, inference): the adapters apply dropout only
    while the model holds dropout random state."""
    model.set_attributes(qwix_rngs=None, raise_if_not_found=False)
    return model


def count_params(model: nnx.Module, kind: type = nnx.Param) -> int:
    """Number of scalars in the model's variables of `kind` (nnx.LoRAParam: trainable)."""
    state = nnx.state(model, kind)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def lora_pairs(model: Mistral) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{"layers/0/attn/wq": (A, B), ...}: A [in..., r], B [r, out...]."""
    out: dict[str, Any] = {}
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.LoRAParam):
            name = "/".join(map(str, path))
            base, _, ab = name.rpartition("_lora_")
            out.setdefault(base, {})[ab] = v[...]
    return {k: (d["a"], d["b"]) for k, d in out.items()}


def merged_delta(weight_shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    """The weight update A @ B in the weight's layout (without the alpha / rank scaling).

    Every target weight is [in..., out...] flattened by qwix as A [in, r], B [r, out] with in
    the leading dims of the weight (wo [h, e, d] is used as [h*e, d])."""
    r = a.shape[-1]
    return (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(weight_shape)


def merge_lora(model: Mistral, scaling: float) -> Mistral:
    """A plain Mistral (no adapters, no qwix interception) with W + scaling * A @ B, in the
    base weights' dtype."""
    pairs = lora_pairs(model)
    current = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    plain = Mistral(model.config, dtype=model.dtype, abstract=True)
    plain.sharder = model.sharder
    graphdef, state = nnx.split(plain)
    for path, var in nnx.to_flat_state(state):
        value = current[path][...]
        key = "/".join(map(str, path))
        if key in pairs:
            delta = merged_delta(value.shape, *pairs[key]) * scaling
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
        var.set_value(value)
    merged: Mistral = nnx.merge(graphdef, state)
    return merged
