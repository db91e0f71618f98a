"""GGUF reading: config and tensors vs transformers' GGUF loader, and tiny hand-made files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from mistral_nnx.checkpoint.gguf import iter_gguf_tensors, read_gguf_config
from mistral_nnx.cli import default_model
from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError


# ---- the real SmolLM2 Q4_1 file vs transformers -------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Path:
    return smollm2_path


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):  # type: ignore[no-untyped-def]
    return smollm2_hf


@pytest.fixture(scope="module")
def ours(smollm2: Path) -> tuple[MistralConfig, dict[str, np.ndarray]]:
    config = read_gguf_config(smollm2)
    return config, dict(iter_gguf_tensors(smollm2, config))


def test_config_matches_transformers(ours, hf_model) -> None:  # type: ignore[no-untyped-def]
    config, hf = ours[0], hf_model.config
    assert config.model_type == "llama"
    assert config.vocab_size == hf.vocab_size == 49152
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.head_dim == hf.head_dim
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config.rms_norm_eps == 1e-5  # the float32 in the file, read back as the decimal it was
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings is hf.tie_word_embeddings is True
    assert config.bos_token_id == hf.bos_token_id
    assert config.eos_token_ids == (hf.eos_token_id,)
    assert config.layer_windows == (None,) * config.num_layers
    assert config.rope_scaling is None


def test_tensors_match_transformers(ours, hf_model) -> None:  # type: ignore[no-untyped-def]
    tensors, state = ours[1], hf_model.state_dict()
    assert set(tensors) == set(state) - {"lm_head.weight"}  # lm_head is tied
    for name, array in tensors.items():
        hf = state[name].numpy()
        assert array.dtype == np.float32, name
        assert array.shape == hf.shape, name
        np.testing.assert_array_equal(array, hf, err_msg=name)


# ---- tiny hand-made files -----------------------------------------------------------------------
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 96, 4, 2, 16, 40, 2


def _hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-layout weights whose values Q8_0 stores exactly: integers in [-127, 127] times 2^-7,
    with 127 in every 32-block so that each block's scale is exactly 2^-7."""

    def exact(*shape: int) -> np.ndarray:
        ints = rng.integers(-127, 128, size=shape)
        ints[..., ::32] = 127
        return (ints * 2.0**-7).astype(np.float32)

    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    weights = {"model.embed_tokens.weight": exact(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = exact(q_rows, HIDDEN)
        weights[p + "self_attn.k_proj.weight"] = exact(kv_rows, HIDDEN)
        weights[p + "self_attn.v_proj.weight"] = exact(kv_rows, HIDDEN)
        weights[p + "self_attn.o_proj.weight"] = exact(HIDDEN, q_rows)
        weights[p + "mlp.gate_proj.weight"] = exact(FFN, HIDDEN)
        weights[p + "mlp.up_proj.weight"] = exact(FFN, HIDDEN)
        weights[p + "mlp.down_proj.weight"] = exact(HIDDEN, FFN)
        weights[p + "input_layernorm.weight"] = rng.standard_normal(HIDDEN).astype(np.float32)
        weights[p + "post_attention_layernorm.weight"] = rng.standard_normal(HIDDEN).astype(
            np.float32
        )
    weights["model.norm.weight"] = rng.standard_normal(HIDDEN).astype(np.float32)
    weights["lm_head.weight"] = exact(VOCAB, HIDDEN)
    return weights


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written row by row: GGUF row (head, 2j + s) holds HF row
    (head, s * head_dim / 2 + j)."""
    head_dim = weight.shape[0] // n_heads
    order = [
        head * head_dim + s * (head_dim // 2) + j
        for head in range(n_heads)
        for j in range(head_dim // 2)
        for s in (0, 1)
    ]
    return weight[order]


_GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def _write_tiny(
    path: Path,
    weights: dict[str, np.ndarray],
    arch: str = "llama",
    qtype: QT = QT.Q8_0,
    types: dict[str, QT] | None = None,
    extra_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write `weights` (HF names and layout) as llama.cpp would: renamed, q/k rows permuted,
    matrices in `qtype` (or `types[hf_name]`), norms in F32."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if extra_metadata is not None:
        extra_metadata(writer)
    for hf_name, weight in weights.items():
        if hf_name.endswith("q_proj.weight"):
            weight = _llama_cpp_permute(weight, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            weight = _llama_cpp_permute(weight, KV_HEADS)
        tensor_type = (types or {}).get(hf_name, QT.F32 if weight.ndim == 1 else qtype)
        if tensor_type == QT.F32:
            writer.add_tensor(_gguf_name(hf_name), weight)
        elif tensor_type == QT.IQ4_NL:  # gguf-py cannot write it; zero blocks of its size
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            data = np.zeros((weight.shape[0], weight.shape[1] // block * size), np.uint8)
            writer.add_tensor(_gguf_name(hf_name), data, raw_dtype=tensor_type)
        else:
            data = quantize(weight, tensor_type)
            writer.add_tensor(_gguf_name(hf_name), data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    return _hf_weights(np.random.default_rng(0))


def test_tiny_round_trip(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    # Matrices alternate between Q8_0 and F32, so both paths see permuted q/k rows.
    types = {name: QT.F32 for name in weights if ".1." in name or name == "lm_head.weight"}
    path = _write_tiny(tmp_path / "tiny.gguf", weights, types=types)
    config = read_gguf_config(path)
    assert config == MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        layer_windows=(None,) * LAYERS,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=None,
        model_type="llama",
    )
    ours = list(iter_gguf_tensors(path, config))
    assert [name for name, _ in ours] == list(weights)  # HF order, lm_head last
    for name, array in ours:
        assert array.dtype == np.float32 and array.flags.writeable, name
        np.testing.assert_array_equal(array, weights[name], err_msg=name)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q8_0])
def test_tiny_quant_types(tmp_path: Path, weights: dict[str, np.ndarray], qtype: QT) -> None:
    """The weights (k * 2^-7, |k| <= 127, a 127 in every block of 32) are exact in all three
    types, so the loader must give them back unchanged. The block-quantised types are checked
    against llama.cpp's layouts in test_quants.py."""
    del weights["lm_head.weight"]  # tied
    path = _write_tiny(tmp_path / "tiny.gguf", weights, qtype=qtype)
    config = read_gguf_config(path)
    assert config.tie_word_embeddings
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {qtype, QT.F32}
    for name, array in iter_gguf_tensors(path, config):
        np.testing.assert_array_equal(array, weights[name], err_msg=name)


def test_mistral_arch_sliding_window(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    path = _write_tiny(
        tmp_path / "m.gguf",
        weights,
        arch="mistral",
        extra_metadata=lambda w: w.add_sliding_window(32),
    )
    config = read_gguf_config(path)
    assert config.model_type == "mistral"
    assert config.layer_windows == (32,) * LAYERS
    got = dict(iter_gguf_tensors(path, config))
    np.testing.assert_array_equal(
        got["model.layers.1.self_attn.k_proj.weight"],
        weights["model.layers.1.self_attn.k_proj.weight"],
    )


def test_llama_arch_ignores_sliding_window(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    path = _write_tiny(
        tmp_path / "l.gguf", weights, extra_metadata=lambda w: w.add_sliding_window(32)
    )
    assert read_gguf_config(path).layer_windows == (None,) * LAYERS


def test_q4_1_dequantization_by_hand(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    """Decode Q4_1 independently of gguf.quants: per block of 32, f16 d, f16 m, 16 bytes of
    nibbles (low nibbles are values 0-15, high nibbles 16-31), x = d * q + m."""
    path = _write_tiny(tmp_path / "t.gguf", weights, qtype=QT.Q4_1)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == QT.Q4_1
    blocks = np.asarray(tensor.data).reshape(HIDDEN, FFN // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32)
    expected = (d * q + m).reshape(HIDDEN, FFN)
    got = dict(iter_gguf_tensors(path, read_gguf_config(path)))[
        "model.layers.0.mlp.down_proj.weight"
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(got - weights["model.layers.0.mlp.down_proj.weight"]).max() < 0.1  # 4-bit error


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 0.99, 200])
def test_truncated_file(tmp_path: Path, weights: dict[str, np.ndarray], keep: float) -> None:
    full = _write_tiny(tmp_path / "full.gguf", weights).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[: int(keep * len(full)) if keep < 1 else int(keep)])
    with pytest.raises(MistralNNXError, match="cut.gguf"):
        read_gguf_config(cut)
    config = read_gguf_config(tmp_path / "full.gguf")
    with pytest.raises(MistralNNXError, match="cut.gguf"):
        list(iter_gguf_tensors(cut, config))


def test_truncated_real_file(tmp_path: Path) -> None:
    real = default_model()
    cut = tmp_path / "cut.gguf"
    with real.open("rb") as f:
        cut.write_bytes(f.read(1 << 20))  # ends inside the tokenizer metadata
    with pytest.raises(MistralNNXError, match="cut.gguf"):
        read_gguf_config(cut)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(MistralNNXError, match="junk.gguf"):
        read_gguf_config(path)
    with pytest.raises(MistralNNXError, match="not found"):
        read_gguf_config(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    path = _write_tiny(tmp_path / "q.gguf", weights, arch="qwen2")
    with pytest.raises(MistralNNXError, match=r"q\.gguf.*'qwen2'"):
        read_gguf_config(path)
    config = read_gguf_config(_write_tiny(tmp_path / "ok.gguf", weights))
    with pytest.raises(MistralNNXError, match=r"q\.gguf.*'qwen2'"):
        list(iter_gguf_tensors(path, config))


def test_unsupported_quant_type(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    types = {"model.layers.1.mlp.up_proj.weight": QT.IQ4_NL}
    path = _write_tiny(tmp_path / "t.gguf", weights, types=types)
    with pytest.raises(MistralNNXError, match=r"t\.gguf.*'blk\.1\.ffn_up\.weight'.*IQ4_NL"):
        list(iter_gguf_tensors(path, read_gguf_config(path)))


def test_missing_tensor(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    del weights["model.layers.1.mlp.down_proj.weight"]
    path = _write_tiny(tmp_path / "t.gguf", weights)
    with pytest.raises(MistralNNXError, match=r"t\.gguf.*'blk\.1\.ffn_down\.weight' is missing"):
        list(iter_gguf_tensors(path, read_gguf_config(path)))


def test_wrong_shape(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    path = _write_tiny(tmp_path / "t.gguf", weights)
    config = read_gguf_config(path).replace(intermediate_size=128)
    with pytest.raises(MistralNNXError, match=r"'blk\.0\.ffn_gate\.weight' has shape \[96, 64\]"):
        list(iter_gguf_tensors(path, config))


def test_rope_scaling_refused(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    def add_scaling(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    path = _write_tiny(tmp_path / "t.gguf", weights, extra_metadata=add_scaling)
    with pytest.raises(MistralNNXError, match=r"t\.gguf.*rope scaling type 'linear'"):
        read_gguf_config(path)


def test_missing_metadata(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    writer.add_embedding_length(HIDDEN)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        MistralNNXError, match=r"t\.gguf.*'llama\.attention\.head_count' is missing"
    ):
        read_gguf_config(tmp_path / "t.gguf")
