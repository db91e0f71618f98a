"""LoRA through google's qwix: a `qwix.LoraProvider` applied with `qwix.apply_lora_to_model`.

qwix intercepts the model's `jnp.einsum` / `jnp.dot` calls and adds `x @ A @ B * alpha / rank`
to the projections whose module path matches a rule; A and B are `nnx.LoRAParam`s that qwix
creates on the model (A [in..., r], B [r, out...], whatever the weight's layout).
On top of qwix, the provider below:
- targets weights by name: qwix rules select modules, and our Attention / MLP modules each hold
  several projections (wq, wk, wv, wo / gate, up, down), so the weight's full path
  ("layers/3/attn/wq") is also matched against the target regexes;
- keeps adapters float32 on any base dtype (qwix would give them the base weight's dtype) and
  casts the projection's output back to the compute dtype;
- intercepts `forward` (what `__call__` and the inference engine both call) and applies dropout
  only while the model holds dropout random state (training).

Mixture-of-experts models: qwix adapts the attention projections; the stacked experts (gate, up,
down [E, in, out]) get per-expert adapters A [E, in, r], B [E, r, out] that moe.py computes by
hand (`MoE.add_lora`; why not qwix: see moe.py), added here after qwix's pass. The router is
never a target.

QLoRA (`quant="nf4" | "int4" | "int8"`): the same rule carries qwix's `weight_qtype`, so qwix
quantises every projection of the decoder layers (LoRA targets or not, as bitsandbytes does) in
blocks of `quant_block` along the contracted axis, and its quantised einsum / dot_general
computes with them (nf4 dequantised to the compute dtype first). Our model reads a weight as
`self.w[...].astype(dt)`, which qwix's own WithAux cannot follow (its astype fails on a QArray,
and telling wk from wv by shape is ambiguous), so quantised weights are held in `QuantWeight`:
a WithAux whose astype casts the scales and which carries its own path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.moe import LORA_KINDS, MoE

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
ATTENTION_TARGETS = ("q", "k", "v", "o")
QUANT_TYPES = ("nf4", "int4", "int8")
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
    # QLoRA: the frozen base projections quantised by qwix ("nf4", "int4", "int8"), one scale
    # per block of `quant_block` inputs (bitsandbytes' nf4 uses 64).
    quant: str | None = None
    quant_block: int = 64

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
        if self.quant is not None and self.quant not in QUANT_TYPES:
            raise MistralNNXError(
                f"QLoRA quantisation must be one of {', '.join(QUANT_TYPES)}, got {self.quant!r}"
            )
        if not isinstance(self.quant_block, int) or self.quant_block <= 0:
            raise MistralNNXError(
                f"QLoRA block size must be a positive integer, got {self.quant_block!r}"
            )

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
def quant_weight_class() -> Any:
    """`QuantWeight`: qwix's WithAux (a quantised weight: QArray + how it was quantised) that
    survives our model's `w[...].astype(dt)` and names its weight (path "layers/0/attn/wq")."""
    import flax.struct
    from qwix._src.providers import ptq

    @flax.struct.dataclass
    class QuantWeight(ptq.WithAux):  # type: ignore[misc]
        path: str = flax.struct.field(pytree_node=False, default="")

        def astype(self, dtype: Any) -> Any:
            # the QArray's astype sets the dequantised dtype (its scales')
            return self.replace(array=self.array.astype(dtype))

        def reshape(self, *shape: Any) -> Any:
            # stored in the compute layout already (wo as [d, h*e]); WithAux's own reshape
            # refuses a -1 even when it names that layout
            dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
            if -1 in dims:
                known = math.prod(d for d in dims if d != -1)
                dims = tuple(math.prod(self.shape) // known if d == -1 else d for d in dims)
            return super().reshape(dims)

    nnx.register_data_type(QuantWeight)
    return QuantWeight


def _qtype(name: str) -> Any:
    return {"nf4": "nf4", "int4": jnp.int4, "int8": jnp.int8}[name]


@functools.cache
def _provider(config: LoraConfig, moe: bool = False) -> Any:
    import qwix
    from qwix._src.providers import lora as qlora
    from qwix._src.providers import ptq
    from qwix._src.utils import flax_util

    patterns = [re.compile(p) for p in config.patterns]
    quant_weight = quant_weight_class()

    class TargetedLoraProvider(qwix.LoraProvider):  # type: ignore[misc]
        """qwix's LoraProvider restricted to weights whose path matches a target. The adapter
        term is computed here with qwix's own helpers (shapes, parameter creation, delta) rather
        than by LoraProvider's methods, which set a module attribute on every call (refused
        inside the inference engine's loops) and always apply dropout; here dropout applies only
        while the model holds dropout random state (training), and the output is cast back to
        the compute dtype (float32 adapters on a bfloat16 model)."""

        def _target(self, op: str, rhs: Any) -> tuple[Any, str] | None:
            """(rule, weight name) when `rhs` is a target weight. Called before the base
            op: qwix's quantisation (on the first, building call) replaces the weight, after
            which wk and wv could no longer be told apart."""
            rule, _ = self._get_current_rule_and_op_id(op, repeated_call=True)
            if isinstance(rhs, quant_weight):
                path = rhs.path
                name = path.rpartition("/")[2]
            else:
                name = flax_util.find_param(rhs, ptq.WithAux)
                path = "/".join(map(str, flax_util.get_current_module_path())) + f"/{name}"
            if not isinstance(rule, qlora.LoraRule) or name is None:
                return None
            return (rule, name) if any(p.fullmatch(path) for p in patterns) else None

        def _dropout(self, rule: Any, x: jax.Array) -> jax.Array:
            module = flax_util.get_current_module()
            if rule.dropout > 0 and isinstance(getattr(module, "qwix_rngs", None), nnx.Rngs):
                rng = flax_util.make_rng("dropout")
                return nnx.Dropout(rule.dropout, deterministic=False)(x, rngs=rng)
            return x

        def einsum(self, einsum_str: str, *operands: Any, **kwargs: Any) -> jax.Array:
            found = self._target("einsum", operands[1]) if len(operands) == 2 else None
            if len(operands) == 2 and isinstance(operands[1], quant_weight):
                out = self._einsum_fn(einsum_str, operands[0], operands[1].array)
            else:
                out = ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
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
            quantised = isinstance(rhs, quant_weight)
            if not quantised and not isinstance(rhs, jax.core.Tracer):
                if flax_util.find_param(rhs) is None:
                    raise MistralNNXError(
                        "a LoRA model must be called under jax.jit / nnx.jit (qwix finds "
                        "reshaped weights only while tracing)"
                    )
            found = self._target("dot_general", rhs)
            if quantised:
                out = self._dot_general_fn(
                    lhs, rhs.array, dimension_numbers, out_sharding=out_sharding
                )
            else:
                out = ptq.PtqProvider.dot_general(
                    self,
                    lhs,
                    rhs,
                    dimension_numbers,
                    precision,
                    preferred_element_type,
                    out_sharding=out_sharding,
                )
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
        module_path=r"layers/\d+/attn" if moe else r"layers/\d+/(attn|mlp)",
        rank=config.rank,
        alpha=float(config.alpha),
        dropout=config.dropout,
        lora_a_initializer=_zeros_f32,
        lora_b_initializer=_zeros_f32,
        weight_qtype=_qtype(config.quant) if config.quant else None,
        tile_size=config.quant_block if config.quant else None,
    )


def apply_lora(model: Mistral, config: LoraConfig, seed: int = 0) -> Mistral:
    """A copy of `model` with LoRA adapters (A he-uniform, B = 0, float32) on the target weights
    (an abstract model gets abstract adapters: shapes only).

    qwix builds the adapted model while running it once; that run is only traced (nnx.eval_shape:
    no compile, and qwix can follow a reshaped weight back to its parameter while tracing). The
    base weights are then shared with `model` and the adapters initialised here from `seed`.
    With `config.quant` (QLoRA) the decoder layers' projections are quantised here instead.

    Mixture-of-experts models: the attention targets through qwix, the expert targets (gate, up,
    down: the stacked experts) as per-expert adapters added to the MoE modules afterwards
    (`MoE.add_lora`), initialised alike. QLoRA is refused: qwix cannot quantise the experts'
    einsums (the combine has three operands).
    """
    import qwix

    moe = model.config.is_moe
    if moe and config.quant:
        raise MistralNNXError(
            "QLoRA on mixture-of-experts models is not supported (qwix cannot quantise the "
            "expert einsums); use LoRA without --qlora"
        )
    if config.quant:
        c = model.config
        inputs = {
            "hidden_size": c.hidden_size,
            "num_heads * head_dim": c.num_heads * c.head_dim,
            "intermediate_size": c.intermediate_size,
        }
        bad = [f"{k} {v}" for k, v in inputs.items() if v % config.quant_block]
        if bad:
            raise MistralNNXError(
                f"QLoRA block size {config.quant_block} must divide the quantised weights' "
                f"input sizes ({', '.join(bad)})"
            )
    provider = _provider(config, moe)
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
            if path not in current:
                continue  # a quantised weight's QArray leaves, filled in by _quantise_base
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
    lora_model: Mistral = nnx.merge(graphdef, state)
    if moe:
        adapters += _add_expert_lora(lora_model, config, rng, shapes_only)
    if not adapters:
        only = " (the mixture-of-experts router is never a target)" if moe else ""
        raise MistralNNXError(
            f"LoRA targets {list(config.targets)} match no weight of the model{only}"
        )
    if config.quant:
        _quantise_base(lora_model, current, shapes_only)
    # qwix makes a new subclass (holding the intercepted __call__) on every call; one per
    # provider keeps graphdefs of equal setups equal, so they share compiled programs.
    lora_model.__class__ = _CLASSES.setdefault(provider, type(lora_model))
    if config.dropout > 0:
        lora_model.set_attributes(qwix_rngs=nnx.Rngs(dropout=seed + 1), raise_if_not_found=False)
    return lora_model


def _add_expert_lora(
    model: Mistral, config: LoraConfig, rng: np.random.Generator, shapes_only: bool
) -> int:
    """Per-expert adapters (A he-uniform per expert, B = 0, float32) on the stacked experts that
    the targets name ("layers/0/mlp/gate"); returns how many weights got them."""
    patterns = [re.compile(p) for p in config.patterns]
    r, added = config.rank, 0
    for i, layer in enumerate(model.layers):
        moe = layer.mlp
        if not isinstance(moe, MoE):
            continue
        for kind in LORA_KINDS:
            if not any(p.fullmatch(f"layers/{i}/mlp/{kind}") for p in patterns):
                continue
            e, d_in, d_out = getattr(moe, kind).get_value().shape
            a_shape, b_shape = (e, d_in, r), (e, r, d_out)
            if shapes_only:
                a: Any = jax.ShapeDtypeStruct(a_shape, jnp.float32)
                b: Any = jax.ShapeDtypeStruct(b_shape, jnp.float32)
            else:
                a = jnp.asarray(np.stack([init_a(rng, (d_in, r)) for _ in range(e)]))
                b = jnp.zeros(b_shape, jnp.float32)
            moe.add_lora(kind, a, b, config.scaling, config.dropout)
            added += 1
    return added


def _quantise_base(model: Mistral, current: dict[Any, Any], shapes_only: bool) -> None:
    """Replace (in place) the WithAux weights qwix made while tracing (abstract QArrays) by
    QuantWeights holding the base weights quantised as qwix decided (qtype, blocks, the compute
    layout: wo as [d, h*e]); quantised from float32 so the scales keep full precision."""
    from qwix._src.core import qarray
    from qwix._src.providers import ptq

    quant_weight = quant_weight_class()
    for path, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module):
            continue
        for name, value in list(vars(module).items()):
            if not isinstance(value, ptq.WithAux):
                continue
            key = (*path, name)
            if shapes_only:
                quantised = jax.tree.map(lambda v: v.get_value(), value.array, is_leaf=_is_var)
            else:
                var = current[key]
                weight = var.get_value().astype(jnp.float32).reshape(value.shape)
                quantise = functools.partial(qarray.quantize, how=value.how)
                placement, sharder = None, model.sharder
                if sharder is not None:  # codes and scales split like the weight
                    axes = _compute_axes(var, value.shape)
                    placement = jax.tree.map(
                        lambda leaf, axes=axes, sharder=sharder: sharder(leaf.shape, axes),
                        jax.eval_shape(quantise, weight),
                    )
                quantised = jax.jit(quantise, out_shardings=placement)(weight)
            boxed = jax.tree.map(nnx.Param, quantised)
            setattr(module, name, quant_weight(boxed, value.how, path="/".join(map(str, key))))


def _compute_axes(weight: nnx.Variable, shape: tuple[int, ...]) -> list[str | None]:
    """The logical axes of a weight in the compute layout `shape` qwix quantised it in, which
    may merge trailing dimensions (wo [d, h, e] as [d, h*e]): a merged dimension keeps the axis
    of its first part. Left to XLA, the quantised codes of gate/up came out replicated on an
    fsdp mesh; placed by these axes (a scale dimension that does not divide over its mesh axis
    is replicated) the quantised base is split like the float one."""
    dims, axes = weight.get_value().shape, weight.get_metadata()["logical_axes"]
    merged: list[str | None] = []
    i = 0
    for size in shape:
        merged.append(axes[i])
        covered = dims[i]
        i += 1
        while covered < size:
            covered *= dims[i]
            i += 1
    return merged


def dequantised_weights(model: Mistral) -> dict[tuple[Any, ...], jax.Array]:
    """{weight path: dequantised array (compute layout, float32)} of a QLoRA model's
    quantised weights (empty for others)."""
    from qwix._src.core import qarray

    quant_weight = quant_weight_class()
    out = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module):
            for name, value in vars(module).items():
                if isinstance(value, quant_weight):
                    array = jax.tree.map(lambda v: v[...], value.array, is_leaf=_is_var)
                    out[(*path, name)] = qarray.dequantize(array)
    return out


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


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
    """{"layers/0/attn/wq": (A, B), ...}: A [in..., r], B [r, out...]; a mixture-of-experts
    model's experts ("layers/0/mlp/gate"): A [E, in, r], B [E, r, out]."""
    out: dict[str, Any] = {}
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.LoRAParam):
            name = "/".join(map(str, path))
            base, _, ab = name.rpartition("_lora_")
            out.setdefault(base, {})[ab] = v[...]
    return {k: (d["a"], d["b"]) for k, d in out.items()}


def merged_delta(
    weight_shape: tuple[int, ...], a: jax.Array, b: jax.Array, experts: bool = False
) -> jax.Array:
    """The weight update (A @ B).T in the weight's layout (without the alpha / rank scaling).

    Every target weight is [out..., in...] (wq [h, e, d]; wo [d, h, e] is used as [d, h*e]);
    qwix's adapters flatten to A [in, r], B [r, out]. Stacked experts (`experts`) are
    [E, in, out], their adapters A [E, in, r], B [E, r, out]: the update is A_e @ B_e."""
    if experts:
        return jnp.einsum("eir,ero->eio", a, b).reshape(weight_shape)
    r = a.shape[-1]
    return (a.reshape(-1, r) @ b.reshape(r, -1)).T.reshape(weight_shape)


def merge_lora(model: Mistral, scaling: float) -> Mistral:
    """A plain Mistral (no adapters, no qwix interception) with W + scaling * A @ B, in the
    base weights' dtype. QLoRA's quantised weights are dequantised first: the merged model is
    the function that was trained."""
    pairs = lora_pairs(model)
    current = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, weight in dequantised_weights(model).items():
        current[path] = weight.astype(model.dtype)  # the dtype the model computed with
    plain = Mistral(model.config, dtype=model.dtype, abstract=True)
    plain.sharder = model.sharder
    graphdef, state = nnx.split(plain)
    for path, var in nnx.to_flat_state(state):
        value = current[path].reshape(var.get_value().shape)  # wo: [d, h*e] when quantised
        key = "/".join(map(str, path))
        if key in pairs:
            experts = model.config.is_moe and path[-2] == "mlp"
            delta = merged_delta(value.shape, *pairs[key], experts=experts) * scaling
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
        var.set_value(value)
    merged: Mistral = nnx.merge(graphdef, state)
    return merged
