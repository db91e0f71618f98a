"""Read llama.cpp GGUF checkpoints (architectures ``llama`` and ``mistral``; Mixtral is ``llama``
with ``llama.expert_count`` and stacked ``ffn_*_exps`` tensors).

``read_gguf_config`` builds a MistralConfig from the GGUF metadata. ``iter_gguf_tensors`` yields
the weights one at a time, dequantised to float32 and renamed / laid out exactly as a Hugging Face
``LlamaForCausalLM.state_dict()`` holds them ([out_features, in_features] for linear weights).

Two details of the llama.cpp format matter here:

* GGUF lists a tensor's dimensions fastest-varying first (``[in, out]`` for a linear weight); the
  ``gguf`` reader exposes the data as a row-major array, which is already HF's ``[out, in]``.
* llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` within every head, from
  HF's "rotate half" RoPE layout (pairs ``(j, j + head_dim / 2)``) to the interleaved layout that
  ggml's RoPE uses (pairs ``(2j, 2j + 1)``). We undo that reordering.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
# Architectures llama.cpp writes for models this project loads from other formats only.
REFUSED_ARCHITECTURES = {
    "mistral3": "its YaRN and llama_4 query-scaling metadata (mistral3.rope.scaling.*, "
    "mistral3.attention.temperature_scale) are not read yet; load the Hugging Face or Mistral "
    "native checkpoint of this model instead",
}

SUPPORTED_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)

# Per-layer tensors: GGUF name suffix -> Hugging Face name suffix.
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Mixture-of-experts layers: router + experts stacked over a leading expert dimension, as
# transformers 5 stacks them ([E, M, D] gate/up, [E, D, M] down).
_MOE_NAMES = {
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}


# ---- public API ---------------------------------------------------------------------------------
def read_gguf_config(path: Path) -> MistralConfig:
    """Build the model config from a GGUF file's metadata (no tensor data is read)."""
    path = Path(path)
    reader = _open(path)
    arch = _architecture(reader, path)
    meta = _Metadata(reader, path, arch)

    hidden = meta.integer("embedding_length")
    heads = meta.integer("attention.head_count")
    kv_heads = meta.integer("attention.head_count_kv", default=heads)
    head_dim = meta.integer("attention.key_length", default=0)
    if not head_dim:
        if heads <= 0 or hidden % heads:
            raise MistralNNXError(
                f"{path}: embedding_length ({hidden}) is not divisible by head_count ({heads}) "
                f"and no {arch}.attention.key_length is given"
            )
        head_dim = hidden // heads
    for key in ("attention.value_length", "rope.dimension_count"):
        value = meta.integer(key, default=head_dim)
        if value != head_dim:
            raise MistralNNXError(
                f"{path}: {arch}.{key} = {value} differs from the head dimension {head_dim} "
                "(not supported)"
            )
    _check_no_rope_scaling(reader, meta, path)

    num_layers = meta.integer("block_count")
    window = meta.integer("attention.sliding_window", default=0) if arch == "mistral" else 0

    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is not None and len(embed.shape) == 2:
        vocab_size = int(embed.shape[1])  # GGUF dims are [hidden, vocab]
    elif "tokenizer.ggml.tokens" in reader.fields:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    else:
        raise MistralNNXError(f"{path}: tensor 'token_embd.weight' is missing")

    eos = _optional_int(reader, "tokenizer.ggml.eos_token_id", path)
    experts = meta.integer("expert_count", default=0)
    per_token = meta.integer("expert_used_count", default=0) if experts else 0
    try:
        return MistralConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=meta.integer("feed_forward_length"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            layer_windows=(window or None,) * num_layers,
            rms_norm_eps=meta.number("attention.layer_norm_rms_epsilon", default=1e-5),
            rope_theta=meta.number("rope.freq_base", default=10000.0),
            max_position_embeddings=meta.integer("context_length", default=32768),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=_optional_int(reader, "tokenizer.ggml.bos_token_id", path),
            eos_token_ids=() if eos is None else (eos,),
            pad_token_id=_optional_int(reader, "tokenizer.ggml.padding_token_id", path),
            model_type=arch,
            num_experts=experts,
            num_experts_per_tok=per_token,
        )
    except MistralNNXError as e:
        raise MistralNNXError(f"{path}: {e}") from None


def iter_gguf_tensors(path: Path, config: MistralConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every weight, dequantising one tensor at a time.

    All tensors are checked (present, expected shape, supported type, no extras) before the
    first is yielded.
    ``lm_head.weight`` is yielded only when ``config.tie_word_embeddings`` is false.
    """
    path = Path(path)
    reader = _open(path)
    _architecture(reader, path)
    by_name = {t.name: t for t in reader.tensors}

    plan = _tensor_plan(config)
    missing = [gguf_name for gguf_name, _, _ in plan if gguf_name not in by_name]
    if missing:
        raise MistralNNXError(f"{path}: tensor '{missing[0]}' is missing{_and_more(missing)}")
    expected = {gguf_name for gguf_name, _, _ in plan}
    extra = sorted(name for name in by_name if name not in expected)
    if extra:
        raise MistralNNXError(
            f"{path}: unexpected tensor '{extra[0]}' for this config{_and_more(extra)}"
        )
    for gguf_name, hf_name, shape in plan:
        tensor = by_name[gguf_name]
        file_shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first
        if file_shape != shape:
            raise MistralNNXError(
                f"{path}: tensor '{gguf_name}' has shape {list(file_shape)}, "
                f"expected {list(shape)} for {hf_name}"
            )
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise MistralNNXError(
                f"{path}: tensor '{gguf_name}' has quantization type {tensor.tensor_type.name}, "
                f"which is not supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
            )
        if tensor.data.nbytes != tensor.n_bytes:
            raise MistralNNXError(f"{path}: tensor '{gguf_name}' is truncated")

    for gguf_name, hf_name, shape in plan:
        array = _dequantize(by_name[gguf_name], path).reshape(shape)
        if gguf_name.endswith(".attn_q.weight"):
            array = _unpermute_rope_rows(array, config.num_heads)
        elif gguf_name.endswith(".attn_k.weight"):
            array = _unpermute_rope_rows(array, config.num_kv_heads)
        yield hf_name, array


# ---- helpers ------------------------------------------------------------------------------------
def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise MistralNNXError(f"{path}: GGUF file not found")
    stat = path.stat()
    # Parsing the header (tens of thousands of vocab strings) takes seconds: read_gguf_config
    # and iter_gguf_tensors share one reader while the file is unchanged.
    return _open_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_cached(path_text: str, size: int, mtime_ns: int) -> GGUFReader:
    path = Path(path_text)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises many kinds of errors on corrupt input
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MistralNNXError(f"{path}: not a valid GGUF file or truncated ({detail})") from None
    if reader.byte_order != "I":
        raise MistralNNXError(f"{path}: GGUF files of the opposite byte order are not supported")
    return reader


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise MistralNNXError(f"{path}: metadata 'general.architecture' is missing")
    if arch in REFUSED_ARCHITECTURES:
        raise MistralNNXError(
            f"{path}: GGUF architecture {arch!r} is not supported: {REFUSED_ARCHITECTURES[arch]}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MistralNNXError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _field(reader: GGUFReader, key: str) -> Any:
    """The decoded value of a metadata key, or None when absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _optional_int(reader: GGUFReader, key: str, path: Path) -> int | None:
    value = _field(reader, key)
    if value is not None and not isinstance(value, int):
        raise MistralNNXError(f"{path}: metadata '{key}' must be an integer, got {value!r}")
    return value


class _Metadata:
    """Typed access to the ``{arch}.*`` metadata keys."""

    _MISSING = object()

    def __init__(self, reader: GGUFReader, path: Path, arch: str) -> None:
        self.reader, self.path, self.arch = reader, path, arch

    def get(self, key: str) -> Any:
        return _field(self.reader, f"{self.arch}.{key}")

    def integer(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key)
        if value is None:
            if default is self._MISSING:
                raise MistralNNXError(f"{self.path}: metadata '{self.arch}.{key}' is missing")
            return int(default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise MistralNNXError(
                f"{self.path}: metadata '{self.arch}.{key}' must be an integer, "
                f"got {_short(value)} (per-layer values are not supported)"
            )
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise MistralNNXError(
                f"{self.path}: metadata '{self.arch}.{key}' must be a number, got {_short(value)}"
            )
        # GGUF stores float32: take the shortest decimal that rounds to it (1e-05, not 9.99e-06).
        return float(str(np.float32(value)))


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_no_rope_scaling(reader: GGUFReader, meta: _Metadata, path: Path) -> None:
    scaling_type = meta.get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise MistralNNXError(
            f"{path}: rope scaling type {scaling_type!r} ({meta.arch}.rope.scaling.type) "
            "is not supported in GGUF files"
        )
    scale_linear = meta.get("rope.scale_linear")
    if scale_linear not in (None, 1.0):
        raise MistralNNXError(
            f"{path}: linear rope scaling ({meta.arch}.rope.scale_linear = {scale_linear}) "
            "is not supported in GGUF files"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise MistralNNXError(
            f"{path}: tensor 'rope_freqs.weight' (llama3-style rope scaling) is not supported "
            "in GGUF files"
        )


def _tensor_plan(config: MistralConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, HF shape) for every tensor, in the order they are yielded."""
    d, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    layer_shapes = {
        "attn_q.weight": (q_rows, d),
        "attn_k.weight": (kv_rows, d),
        "attn_v.weight": (kv_rows, d),
        "attn_output.weight": (d, q_rows),
        "ffn_gate.weight": (ffn, d),
        "ffn_up.weight": (ffn, d),
        "ffn_down.weight": (d, ffn),
        "attn_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }
    names = dict(_LAYER_NAMES)
    if config.is_moe:
        e = config.num_experts
        for key in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):
            del names[key]
        names.update(_MOE_NAMES)
        layer_shapes["ffn_gate_inp.weight"] = (e, d)
        layer_shapes["ffn_gate_exps.weight"] = (e, ffn, d)
        layer_shapes["ffn_up_exps.weight"] = (e, ffn, d)
        layer_shapes["ffn_down_exps.weight"] = (e, d, ffn)
    plan: list[tuple[str, str, tuple[int, ...]]] = [
        ("token_embd.weight", "model.embed_tokens.weight", (vocab, d))
    ]
    for i in range(config.num_layers):
        for suffix, hf_suffix in names.items():
            plan.append(
                (f"blk.{i}.{suffix}", f"model.layers.{i}.{hf_suffix}", layer_shapes[suffix])
            )
    plan.append(("output_norm.weight", "model.norm.weight", (d,)))
    if not config.tie_word_embeddings:
        plan.append(("output.weight", "lm_head.weight", (vocab, d)))
    return plan


def _dequantize(tensor: ReaderTensor, path: Path) -> np.ndarray:
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise MistralNNXError(
            f"{path}: cannot dequantize tensor '{tensor.name}' ({tensor.tensor_type.name}): {e}"
        ) from None
    array = np.asarray(array, dtype=np.float32)
    if tensor.tensor_type == GGMLQuantizationType.F32:
        array = array.copy()  # a view of the read-only memory map: hand out an array we own
    return array


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: interleaved RoPE pairs back to HF's rotate-half halves.

    Within each head llama.cpp stores row ``2 * j + h`` where HF has row ``h * head_dim / 2 + j``
    (``h`` in {0, 1} picks the half, ``j`` the frequency).
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)
