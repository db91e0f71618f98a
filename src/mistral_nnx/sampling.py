"""Token sampling: greedy, temperature, top-k, top-p (nucleus) and min-p, per batch row.

`SamplingParams` is the user-facing, validated description of one sequence's sampling.
`BatchSampling` packs one `SamplingParams` per row into device arrays (a pytree), so a single
jitted decode step serves a batch whose rows sample differently, without recompiling when the
values change. `sample` draws one token per row, entirely on the device.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mistral_nnx.errors import MistralNNXError


def _check_real(name: str, value: object) -> float:
    """`value` as a finite float; bools and non-numbers are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MistralNNXError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise MistralNNXError(f"{name} must be finite, got {result}")
    return result


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one sequence.

    Filters are applied in the order of vLLM / transformers: temperature, top-k, top-p, min-p.
    """

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it."""
    top_k: int | None = None
    """Keep the k most likely tokens; None or 0 = off."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability sums to >= top_p; None or 1.0 = off."""
    min_p: float | None = None
    """Drop tokens with probability < min_p * (highest probability); None or 0.0 = off."""

    def __post_init__(self) -> None:
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise MistralNNXError(f"temperature must be >= 0, got {temperature}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
                raise MistralNNXError(f"top_k must be an int or None, got {self.top_k!r}")
            if self.top_k < 0:
                raise MistralNNXError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None:
            top_p = _check_real("top_p", self.top_p)
            if not 0.0 < top_p <= 1.0:
                raise MistralNNXError(f"top_p must be in (0, 1], got {top_p}")
        if self.min_p is not None:
            min_p = _check_real("min_p", self.min_p)
            if not 0.0 <= min_p < 1.0:
                raise MistralNNXError(f"min_p must be in [0, 1), got {min_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchSampling:
    """Per-row sampling parameters as device arrays of shape [B] (a pytree; pass it to jit)."""

    temperature: jax.Array
    """float32; 0 = greedy."""
    top_k: jax.Array
    """int32; 0 = off."""
    top_p: jax.Array
    """float32; 1 = off."""
    min_p: jax.Array
    """float32; 0 = off."""

    @staticmethod
    def from_params(params: Sequence[SamplingParams] | SamplingParams, batch: int) -> BatchSampling:
        """One row per sequence: a single `SamplingParams` is used for every row."""
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise MistralNNXError(f"batch must be a positive int, got {batch!r}")
        rows = [params] * int(batch) if isinstance(params, SamplingParams) else list(params)
        if len(rows) != batch:
            raise MistralNNXError(f"params has {len(rows)} entries but batch is {batch}")
        for i, row in enumerate(rows):
            if not isinstance(row, SamplingParams):
                raise MistralNNXError(f"params[{i}] must be a SamplingParams, got {row!r}")
        # device_put, not jnp constructors: no small program per field (cold start).
        return BatchSampling(
            temperature=jax.device_put(np.array([r.temperature for r in rows], np.float32)),
            # k beyond the vocabulary keeps everything; clamp so that it fits int32.
            top_k=jax.device_put(np.array([min(r.top_k or 0, 2**31 - 1) for r in rows], np.int32)),
            top_p=jax.device_put(
                np.array([1.0 if r.top_p is None else r.top_p for r in rows], np.float32)
            ),
            min_p=jax.device_put(np.array([r.min_p or 0.0 for r in rows], np.float32)),
        )


def _filter(scaled: jax.Array, sampling: BatchSampling) -> jax.Array:
    """Set logits removed by top-k, top-p or min-p to -inf; `scaled` is [B, V], temperature-scaled.

    Each filter keeps a prefix of the descending-sorted logits, so it is expressed as a per-row
    threshold on the logit value: no scatter back from sorted order is needed. Tokens tied with
    a threshold are all kept (as in vLLM), which can keep slightly more than k / top_p.
    """
    vocab = scaled.shape[-1]
    # A full descending sort is needed for exact top-p over the whole vocabulary (a capped
    # `lax.top_k` would truncate the nucleus); `sample` only reaches here when a row filters.
    sorted_desc = -jnp.sort(-scaled, axis=-1)

    # top-k: the k-th largest logit; k = 0 (off) keeps the whole vocabulary.
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    sorted_desc = jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf)

    # top-p, on the top-k-renormalised distribution: keep a token while the probability mass
    # strictly before it is < top_p, i.e. the smallest prefix reaching top_p. The top token
    # always stays (mass before it is 0 < top_p); top_p >= 1 keeps everything despite rounding.
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < sampling.top_p[:, None]) | (sampling.top_p[:, None] >= 1.0)
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)

    # min-p: p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p). Renormalising after
    # top-k / top-p does not change probability ratios and never drops the top token, so this
    # equals min-p applied to the already filtered distribution. min_p = 0 gives -inf (off).
    mth = sorted_desc[:, :1] + jnp.log(sampling.min_p)[:, None]

    threshold = jnp.maximum(jnp.maximum(kth, pth), mth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(
    logits: jax.Array, key: jax.Array, sampling: BatchSampling, greedy_only: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row: logits [B, V] -> (tokens [B] int32, logprobs [B] float32).

    Rows with temperature 0 take the argmax; the others sample from the temperature-scaled,
    top-k / top-p / min-p filtered distribution with `jax.random.categorical`. The same key gives
    the same tokens; split the key between decode steps. logprobs are those of the model's own
    distribution (log_softmax of the unmodified logits) at the chosen tokens, as vLLM returns.
    `key` is one key for the batch, or one key per row (shape [B]).
    `greedy_only` (static): the caller knows every row is greedy; the sampling branch is then
    not even traced (less to trace and lower in a fresh process, the same tokens).
    Jit-able: no Python branching on array values.
    """
    if logits.ndim != 2:
        raise MistralNNXError(f"logits must have shape [B, V], got {tuple(logits.shape)}")
    batch = logits.shape[0]
    for field in dataclasses.fields(sampling):
        shape = tuple(getattr(sampling, field.name).shape)
        if shape != (batch,):
            raise MistralNNXError(f"sampling.{field.name} must have shape ({batch},), got {shape}")

    logits = logits.astype(jnp.float32)
    greedy = sampling.temperature <= 0.0
    argmax = jnp.argmax(logits, axis=-1)

    def sample_rows() -> jax.Array:
        temperature = jnp.where(greedy, 1.0, sampling.temperature)
        scaled = logits / temperature[:, None]
        # The sort in `_filter` costs far more than the rest of the step at a 131072 vocabulary,
        # so skip it at run time (lax.cond, not Python `if`) when no sampling row filters: the
        # plain-temperature case. Rows with all filters off are unchanged by `_filter`.
        filters_on = (sampling.top_k > 0) | (sampling.top_p < 1.0) | (sampling.min_p > 0.0)
        needs_filter = jnp.any(filters_on & ~greedy)
        scaled = jax.lax.cond(needs_filter, _filter, lambda x, _: x, scaled, sampling)
        if key.ndim == 0:
            sampled = jax.random.categorical(key, scaled, axis=-1)
        else:  # one key per row: a row's draw never depends on the other rows
            sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled)
        return jnp.where(greedy, argmax, sampled)

    if greedy_only:
        tokens = argmax.astype(jnp.int32)
    else:  # an all-greedy batch (the default) skips drawing [B, V] Gumbel noise as well
        tokens = jax.lax.cond(jnp.all(greedy), lambda: argmax, sample_rows).astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
    return tokens, logprobs
