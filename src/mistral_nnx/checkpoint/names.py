"""Declarative name maps: checkpoint tensor names -> model state paths + a transform.

Every format is first expressed in Hugging Face names and HF torch layout ([out, in] linear
weights, half-rotation q/k rows); one table then maps HF names onto this model's layout, which
keeps [out, in] (a copy or reshape; only the stacked experts are transposed).

Mixture-of-experts weights reach the table stacked, as transformers 5 holds them in memory:
`model.layers.N.mlp.experts.{gate_proj,up_proj}` [E, M, D] and `...down_proj` [E, D, M].
`stack_experts` builds these from the per-expert tensors that checkpoints store
(`block_sparse_moe.experts.J.w1/w2/w3.weight`) or splits the packed `gate_up_proj`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mistral_nnx.checkpoint.safetensors_io import aligned_empty, in_halves, is_aligned, owned
from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError

Path_ = tuple[str | int, ...]
Transform = Callable[[np.ndarray], np.ndarray]


def hf_table(
    config: MistralConfig, dtype: np.dtype | None = None, mapped: bool = False
) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], Path_], Transform]]:
    """(regex on the HF name, model path from the match, transform to our layout). Every
    transform returns an array the model may keep, cast to `dtype` (default: the input's) in the
    same pass as the re-layout. That is never a view of a file map unless `mapped`: then a
    tensor that needs only a reshape (a view) and no cast may stay one (zero-copy loading)."""
    d, h, k, e = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim

    def layer(*rest: str) -> Callable[[re.Match[str]], Path_]:
        return lambda m: ("layers", int(m.group(1)), *rest)

    def heads_out(n: int) -> Transform:  # [n*e, d] -> [n, e, d]
        return lambda w: owned(w, dtype, mapped).reshape(n, e, d)

    def identity(w: np.ndarray) -> np.ndarray:
        return owned(w, dtype, mapped)

    def experts(w: np.ndarray) -> np.ndarray:
        return swap_last(w, dtype)

    rows: list[tuple[str, Callable[[re.Match[str]], Path_], Transform]] = [
        (r"model\.embed_tokens\.weight", lambda m: ("embed",), identity),
        (r"model\.norm\.weight", lambda m: ("norm", "weight"), identity),
        (r"lm_head\.weight", lambda m: ("lm_head",), identity),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", layer("attn", "wq"), heads_out(h)),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", layer("attn", "wk"), heads_out(k)),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", layer("attn", "wv"), heads_out(k)),
        (
            r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight",
            layer("attn", "wo"),
            lambda w: owned(w, dtype, mapped).reshape(d, h, e),
        ),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", layer("mlp", "gate"), identity),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", layer("mlp", "up"), identity),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", layer("mlp", "down"), identity),
        (
            r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight",
            layer("mlp", "router"),
            identity,
        ),
        (r"model\.layers\.(\d+)\.mlp\.experts\.gate_proj", layer("mlp", "gate"), experts),
        (r"model\.layers\.(\d+)\.mlp\.experts\.up_proj", layer("mlp", "up"), experts),
        (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj", layer("mlp", "down"), experts),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", layer("attn_norm", "weight"), identity),
        (
            r"model\.layers\.(\d+)\.post_attention_layernorm\.weight",
            layer("mlp_norm", "weight"),
            identity,
        ),
    ]
    return [(re.compile(pattern), path, fn) for pattern, path, fn in rows]


def _transpose_into(out: np.ndarray, w: np.ndarray, block: int = 128) -> None:
    """out[:] = w.T, copied in row blocks with the cast fused: numpy's plain strided copy of a
    large transposed view is cache-hostile (3x slower on a 32768 x 1024 matrix)."""

    def rows(start: int, stop: int) -> None:
        for i in range(start, stop, block):
            out[:, i : min(i + block, stop)] = w[i : min(i + block, stop)].T

    in_halves(w.shape[0], rows, block)


def swap_last(w: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """[E, a, b] -> [E, b, a], contiguous: each expert's matrix transposed. A reader that
    already wrote the experts transposed hands over the swapped view of an array it owns (see
    gguf.py): that array is returned as is."""
    dtype = w.dtype if dtype is None else np.dtype(dtype)
    t = w.swapaxes(1, 2)
    if t.flags.c_contiguous and t.flags.writeable and t.dtype == dtype and is_aligned(t):
        return t
    out = aligned_empty(t.shape, dtype)
    for j in range(w.shape[0]):
        _transpose_into(out[j], w[j])
    return out


# ---- mixture of experts: per-expert and packed names -> stacked ---------------------------------
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_PACKED_GATE_UP = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj")
_STACKED = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

Tensors = Iterator[tuple[str, np.ndarray, Path]]


def stack_experts(tensors: Tensors, config: MistralConfig) -> Tensors:
    """Pass tensors through, except expert weights: per-expert pieces are gathered into one
    stacked array per layer and kind (yielded once all E pieces arrived), packed gate_up_proj
    [E, 2M, D] is split into gate_proj and up_proj (gate rows first)."""
    experts = config.num_experts
    pending: dict[tuple[int, str], tuple[np.ndarray, set[int]]] = {}
    for name, array, file in tensors:
        m = _EXPERT.fullmatch(name)
        if m is None or not experts:
            packed = _PACKED_GATE_UP.fullmatch(name)
            if packed is not None and array.ndim == 3 and array.shape[1] % 2 == 0:
                half = array.shape[1] // 2
                prefix = f"model.layers.{packed.group(1)}.mlp.experts."
                yield prefix + "gate_proj", array[:, :half], file
                yield prefix + "up_proj", array[:, half:], file
            else:
                yield name, array, file
            continue
        layer, index, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        if index >= experts:
            raise MistralNNXError(
                f"{file}: unexpected tensor '{name}' (the config has {experts} experts)"
            )
        key = (layer, kind)
        if key not in pending:
            pending[key] = (aligned_empty((experts, *array.shape), array.dtype), set())
        stacked, seen = pending[key]
        if array.shape != stacked.shape[1:]:
            raise MistralNNXError(
                f"{file}: tensor '{name}' has shape {list(array.shape)}, but expert 0 of the "
                f"same layer has {list(stacked.shape[1:])}"
            )
        stacked[index] = array
        seen.add(index)
        if len(seen) == experts:
            del pending[key]
            yield f"model.layers.{layer}.mlp.experts.{_STACKED[kind]}", stacked, file
    if pending:
        (layer, kind), (_, seen) = min(pending.items())
        absent = min(set(range(experts)) - seen)
        raise MistralNNXError(
            f"checkpoint is missing tensor "
            f"'model.layers.{layer}.block_sparse_moe.experts.{absent}.{kind}.weight'"
        )


# ---- vision-language wrappers (mistral3): text weights only --------------------------------------
_WRAPPED = [
    (re.compile(r"model\.language_model\.(.*)"), "model.{}"),
    (re.compile(r"language_model\.model\.(.*)"), "model.{}"),
    (re.compile(r"language_model\.lm_head\.(.*)"), "lm_head.{}"),
    (re.compile(r"(lm_head\..*)"), "{}"),
]
UNREAD_PREFIXES = (
    "model.vision_tower.",
    "vision_tower.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
)


def text_model_name(name: str) -> str | None:
    """A wrapper checkpoint's tensor name as the text model's HF name; None for the vision
    tower and projector (never read); other names unchanged (reported as unexpected)."""
    if name.startswith(UNREAD_PREFIXES):
        return None
    for pattern, target in _WRAPPED:
        m = pattern.fullmatch(name)
        if m:
            return target.format(m.group(1))
    return name


# Mistral-native vision-language checkpoints (consolidated.safetensors of Pixtral / Mistral 3).
NATIVE_UNREAD_PREFIXES = (
    "vision_encoder.",
    "vision_language_adapter.",
    "patch_merger.",
    "pre_mm_projector_norm.",
)


def native_text_name(name: str) -> str | None:
    """None for the vision encoder's native tensors (never read); other names unchanged."""
    return None if name.startswith(NATIVE_UNREAD_PREFIXES) else name


# Tensors some HF checkpoints carry that hold no weights of this network.
IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


def interleaved_to_half(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from interleaved RoPE pairs (Mistral native, llama.cpp) to
    HF's half-rotation layout: per head, rows (0,1),(2,3),... become (0..E/2-1),(E/2..E-1)."""
    rows, cols = w.shape
    e = rows // num_heads
    return w.reshape(num_heads, e // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_NATIVE = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", "model.layers.{}.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", "model.layers.{}.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", "model.layers.{}.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{}.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.feed_forward\.gate\.weight", "model.layers.{}.block_sparse_moe.gate.weight"),
    (
        r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight",
        "model.layers.{}.block_sparse_moe.experts.{}.{}.weight",
    ),
]
_NATIVE_RE = [(re.compile(p), target) for p, target in _NATIVE]


def native_to_hf(name: str, w: np.ndarray, config: MistralConfig) -> tuple[str, np.ndarray]:
    """A Mistral-native tensor as its HF name and layout (q/k rows un-interleaved)."""
    for pattern, target in _NATIVE_RE:
        m = pattern.fullmatch(name)
        if m:
            hf_name = target.format(*m.groups())
            if name.endswith("attention.wq.weight"):
                w = interleaved_to_half(w, config.num_heads)
            elif name.endswith("attention.wk.weight"):
                w = interleaved_to_half(w, config.num_kv_heads)
            return hf_name, w
    return name, w  # unknown: reported as unexpected by the loader
