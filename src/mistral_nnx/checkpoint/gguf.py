"""Read llama.cpp GGUF checkpoints (architectures ``llama`` and ``mistral``; Mixtral is ``llama``
with ``llama.expert_count`` and stacked ``ffn_*_exps`` tensors).

``read_gguf_config`` builds a MistralConfig from the GGUF metadata. ``iter_gguf_tensors`` yields
the weights one at a time, dequantised to float32 and renamed / laid out exactly as a Hugging Face
``LlamaForCausalLM.state_dict()`` holds them ([out_features, in_features] for linear weights).

Two details of the llama.cpp format matter here:

* GGUF lists a tensor's dimensions fastest-varying first (``[in, out]`` for a linear weight); the
  data is row-major, which is HF's ``[out, in]``.
* llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` within every head, from
  HF's "rotate half" RoPE layout (pairs ``(j, j + head_dim / 2)``) to the interleaved layout that
  ggml's RoPE uses (pairs ``(2j, 2j + 1)``). We undo that reordering.

The header is parsed by ``gguf_metadata`` (shared with the tokenizer, parsed once per file).
Tensor bytes are memory-mapped one tensor at a time and dequantised here with numpy, a block of
rows at a time, straight into the output rows (the q/k reordering applied to the quantised rows
first): matrices stay ``[out, in]``, this model's layout too. Stacked experts are written as
``[E, in, out]`` (the layout of moe.py) and handed over as the ``[E, out, in]`` view of that
buffer, which the loader's swap_last recognises and keeps. One pass over the output, no float32
intermediate of the whole tensor. With ``mapped_dtype`` (zero-copy loading), an F32 / F16 / BF16
tensor already stored in that dtype, 64-byte aligned in the file and needing no reordering comes
as a read-only view of the file map instead, which the loader keeps as it is. K-quants are
decoded with gguf-py's ``gguf.quants``, imported only when a file has them (importing ``gguf``
costs ~0.4 s of a cold start).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mistral_nnx.checkpoint.gguf_metadata import GGUFHeader, GGUFTensorInfo, read_gguf_header
from mistral_nnx.checkpoint.safetensors_io import ALIGN, aligned_empty, in_halves, map_bytes
from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
# Architectures llama.cpp writes for models this project loads from other formats only.
REFUSED_ARCHITECTURES = {
    "mistral3": "its YaRN and llama_4 query-scaling metadata (mistral3.rope.scaling.*, "
    "mistral3.attention.temperature_scale) are not read yet; load the Hugging Face or Mistral "
    "native checkpoint of this model instead",
}

# ggml type number -> (name, values per block, bytes per block), as in ggml.h / gguf-py.
_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
SUPPORTED_TYPES = tuple(name for name, _, _ in _TYPES.values())
# The float types a tensor can be handed over in without decoding (a view of the file).
_PLAIN: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_ROWS_PER_BLOCK = 128  # rows dequantised at a time: a few hundred KB of scratch, cache-resident
_WINDOW_BYTES = 16 << 20  # bytes of the file mapped at a time

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
    header = _open(path)
    arch = _architecture(header, path)
    meta = _Metadata(header, path, arch)

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
    _check_no_rope_scaling(header, meta, path)

    num_layers = meta.integer("block_count")
    window = meta.integer("attention.sliding_window", default=0) if arch == "mistral" else 0

    tensors = header.tensors
    embed = tensors.get("token_embd.weight")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if embed is not None and len(embed.dims) == 2:
        vocab_size = int(embed.dims[1])  # GGUF dims are [hidden, vocab]
    elif isinstance(tokens, list):
        vocab_size = len(tokens)
    else:
        raise MistralNNXError(f"{path}: tensor 'token_embd.weight' is missing")

    eos = _optional_int(header, "tokenizer.ggml.eos_token_id", path)
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
            bos_token_id=_optional_int(header, "tokenizer.ggml.bos_token_id", path),
            eos_token_ids=() if eos is None else (eos,),
            pad_token_id=_optional_int(header, "tokenizer.ggml.padding_token_id", path),
            model_type=arch,
            num_experts=experts,
            num_experts_per_tok=per_token,
        )
    except MistralNNXError as e:
        raise MistralNNXError(f"{path}: {e}") from None


def iter_gguf_tensors(
    path: Path, config: MistralConfig, mapped_dtype: np.dtype | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every weight, dequantising one tensor at a time.

    All tensors are checked (present, expected shape, supported type, no extras) before the
    first is yielded. Every array is writable and owned; stacked experts come as the
    ``[E, out, in]`` view of a contiguous ``[E, in, out]`` buffer, everything else contiguous.
    ``lm_head.weight`` is yielded only when ``config.tie_word_embeddings`` is false.

    ``mapped_dtype``: a tensor stored as an F32 / F16 / BF16 of exactly that dtype, at a 64-byte
    aligned file offset and without the q/k row reordering, comes instead as a read-only view of
    its file map, in that dtype (zero-copy loading: the model can hold it as it is).
    """
    path = Path(path)
    header = _open(path)
    _architecture(header, path)
    by_name = header.tensors

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
        file_shape = tuple(int(n) for n in reversed(tensor.dims))  # GGUF lists dims fastest first
        if file_shape != shape:
            raise MistralNNXError(
                f"{path}: tensor '{gguf_name}' has shape {list(file_shape)}, "
                f"expected {list(shape)} for {hf_name}"
            )
        if tensor.type not in _TYPES:
            raise MistralNNXError(
                f"{path}: tensor '{gguf_name}' has quantization type {_type_name(tensor.type)}, "
                f"which is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if tensor.start + _nbytes(tensor) > header.size:
            raise MistralNNXError(f"{path}: tensor '{gguf_name}' is truncated")

    for gguf_name, hf_name, shape in plan:
        order = None
        if gguf_name.endswith(".attn_q.weight"):
            order = _rope_row_order(shape[0], config.num_heads)
        elif gguf_name.endswith(".attn_k.weight"):
            order = _rope_row_order(shape[0], config.num_kv_heads)
        tensor = by_name[gguf_name]
        if order is None and _mappable(tensor, shape, mapped_dtype):
            try:
                view = map_bytes(path, tensor.start, tensor.start + _nbytes(tensor))
            except (OSError, ValueError) as e:
                raise MistralNNXError(f"{path}: cannot read tensor '{gguf_name}' ({e})") from None
            yield hf_name, view.view(mapped_dtype).reshape(shape)
        else:
            yield hf_name, _read(tensor, shape, path, order)


# ---- helpers ------------------------------------------------------------------------------------
def _open(path: Path) -> GGUFHeader:
    if not path.is_file():
        raise MistralNNXError(f"{path}: GGUF file not found")
    header = read_gguf_header(path)  # parsed once per file: config, tokenizer and weights share it
    for tensor in header.tensors.values():
        if tensor.type in _TYPES and tensor.start + _nbytes(tensor) > header.size:
            raise MistralNNXError(
                f"{path}: not a valid GGUF file or truncated (tensor '{tensor.name}' ends past "
                "the end of the file)"
            )
    return header


def _architecture(header: GGUFHeader, path: Path) -> str:
    arch = header.metadata.get("general.architecture")
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


def _optional_int(header: GGUFHeader, key: str, path: Path) -> int | None:
    value = header.metadata.get(key)
    if value is not None and not isinstance(value, int):
        raise MistralNNXError(f"{path}: metadata '{key}' must be an integer, got {value!r}")
    return value


class _Metadata:
    """Typed access to the ``{arch}.*`` metadata keys."""

    _MISSING = object()

    def __init__(self, header: GGUFHeader, path: Path, arch: str) -> None:
        self.header, self.path, self.arch = header, path, arch

    def get(self, key: str) -> Any:
        return self.header.metadata.get(f"{self.arch}.{key}")

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


def _check_no_rope_scaling(header: GGUFHeader, meta: _Metadata, path: Path) -> None:
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
    if "rope_freqs.weight" in header.tensors:
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


def _type_name(kind: int) -> str:
    if kind in _TYPES:
        return _TYPES[kind][0]
    from gguf import GGMLQuantizationType  # only to name a type this reader refuses

    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"unknown ({kind})"


def _nbytes(tensor: GGUFTensorInfo) -> int:
    _, block, size = _TYPES[tensor.type]
    return int(np.prod(tensor.dims, dtype=np.int64)) // block * size


def _mappable(tensor: GGUFTensorInfo, shape: tuple[int, ...], dtype: np.dtype | None) -> bool:
    """Whether the tensor can be handed over as a view of the file: stored in `dtype` exactly,
    not a stacked-experts tensor (those are transposed), and 64-byte aligned (else JAX would copy
    it anyway, and the decoders below copy on two threads)."""
    plain = _PLAIN.get(_TYPES[tensor.type][0])
    return (
        dtype is not None
        and plain == np.dtype(dtype)
        and len(shape) < 3
        and tensor.start % ALIGN == 0
    )


def _rope_row_order(rows: int, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: HF row r is GGUF row order[r].

    Within each head llama.cpp stores row ``2 * j + h`` where HF has row ``h * head_dim / 2 + j``
    (``h`` in {0, 1} picks the half, ``j`` the frequency).
    """
    half = rows // n_heads // 2
    return np.arange(rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(rows)


def _read(
    tensor: GGUFTensorInfo,
    shape: tuple[int, ...],
    path: Path,
    order: np.ndarray | None,
) -> np.ndarray:
    """Dequantise one tensor (HF shape `shape`) to float32, a block of rows at a time, with its
    rows taken in `order` (q/k). Stacked experts [E, out, in] are written as [E, in, out] and
    that buffer's [E, out, in] view returned. The file is mapped a window of rows at a time, so
    that its pages leave the resident set as the output fills (peak: the output plus one
    window)."""
    _, per_block, size = _TYPES[tensor.type]
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    row_bytes = _nbytes(tensor) // max(rows, 1)
    step = _ROWS_PER_BLOCK
    window = max(1, _WINDOW_BYTES // max(row_bytes * step, 1)) * step

    def mapped(lo: int, hi: int) -> np.ndarray:  # the raw rows [lo, hi)
        at = tensor.start + lo * row_bytes
        return map_bytes(path, at, at + (hi - lo) * row_bytes).reshape(hi - lo, row_bytes)

    decode = _decoder(tensor.type)
    f32 = np.dtype(np.float32)
    try:
        if len(shape) < 3:  # decoded straight into the output rows
            flat = aligned_empty((rows, cols), f32)

            def plain(start: int, stop: int) -> None:
                whole = None if order is None else mapped(0, rows)  # q/k: small, rows reordered
                for w in range(start, stop, window):
                    raw = mapped(w, min(w + window, stop)) if whole is None else whole
                    for i in range(w, min(w + window, stop), step):
                        end = min(i + step, stop)
                        if order is None:
                            block = raw[i - w : end - w]
                        else:  # the q/k row reordering, applied to the quantised rows
                            block = raw[order[i:end]]
                        decode(block.reshape(-1, size), flat[i:end].reshape(-1, per_block))

            in_halves(rows, plain, step)
            return flat.reshape(shape)
        experts = shape[0]
        per = rows // experts  # rows of one expert's matrix
        out = aligned_empty((experts, cols, per), f32)
        for j in range(experts):

            def matrix(start: int, stop: int, j: int = j) -> None:
                scratch = np.empty((step * cols // per_block, per_block), f32)
                for w in range(start, stop, window):
                    raw = mapped(j * per + w, j * per + min(w + window, stop))
                    for i in range(w, min(w + window, stop), step):
                        end = min(i + step, stop)
                        values = scratch[: (end - i) * cols // per_block]
                        decode(raw[i - w : end - w].reshape(-1, size), values)
                        out[j, :, i:end] = values.reshape(end - i, cols).T

            in_halves(per, matrix, step)
    except OSError as e:
        raise MistralNNXError(f"{path}: cannot read tensor '{tensor.name}' ({e})") from None
    except Exception as e:
        raise MistralNNXError(
            f"{path}: cannot dequantize tensor '{tensor.name}' ({_type_name(tensor.type)}): {e}"
        ) from None
    return out.swapaxes(1, 2)


# ---- dequantisation: raw blocks [n, bytes] uint8 -> out [n, values] float32 -------------------
# The same float32 values as gguf-py's gguf.quants (bit-identical: the same float32 products and
# sums; the integer offsets are exact in float32), computed in place in `out`: no temporaries of
# the block's size besides the nibbles.
Decoder = Callable[[np.ndarray, np.ndarray], None]


def _decoder(kind: int) -> Decoder:
    name = _TYPES[kind][0]
    if name in _DECODERS:
        return _DECODERS[name]
    from gguf import GGMLQuantizationType  # K-quants: gguf-py's numpy decoders
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(kind)

    def decode(b: np.ndarray, out: np.ndarray) -> None:
        out[...] = dequantize(b, qtype)

    return decode


def _half(b: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [n, 1]."""
    return b[:, at : at + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """16 bytes of 4-bit values -> 32 values: the low nibbles first, then the high ones."""
    out[:, :16] = qs & np.uint8(0x0F)
    out[:, 16:] = qs >> np.uint8(4)


def _fifth_bits(qh: np.ndarray, out: np.ndarray) -> None:
    """Add bit i of 4 bytes (a little-endian u32) as 16 to value i."""
    bits = (qh.view("<u4") >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    out += (bits << np.uint32(4)).astype(np.float32)


def _f32(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = b.view("<f4")


def _f16(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = b.view("<f2")


def _bf16(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = (b.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 2:], out)
    out -= np.float32(8)
    out *= _half(b, 0)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 4:], out)
    out *= _half(b, 0)
    out += _half(b, 2)


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 6:], out)
    _fifth_bits(b[:, 2:6], out)
    out -= np.float32(16)
    out *= _half(b, 0)


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 8:], out)
    _fifth_bits(b[:, 4:8], out)
    out *= _half(b, 0)
    out += _half(b, 2)


def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = b[:, 2:].view(np.int8)
    out *= _half(b, 0)


_DECODERS: dict[str, Decoder] = {
    "F32": _f32,
    "F16": _f16,
    "BF16": _bf16,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
}
