"""GGUF quantisation types, checked against an independent reading of llama.cpp's block layouts.

The blocks are written here byte by byte (random quants, chosen f16 scales), following the
structs of ggml-common.h (block_q4_0, block_q4_1, block_q5_0, block_q5_1, block_q8_0,
block_q4_K, block_q5_K, block_q6_K), and decoded with this file's own numpy transcription of
ggml-quants.c's dequantize_row_* loops. Neither side calls gguf.quants, which both our loader
and transformers' GGUF loader use. The whole file is then loaded by us and by transformers, and
their logits compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from test_gguf import _gguf_name, _llama_cpp_permute

import mistral_nnx as mn
from mistral_nnx.checkpoint.gguf import iter_gguf_tensors, read_gguf_config

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 256, 4, 2, 64, 2  # rows of 256: K-quants
HEAD_DIM = HIDDEN // HEADS

# type -> (values per block, bytes per block, byte offsets of f16 fields, their magnitude)
LAYOUTS: dict[QT, tuple[int, int, dict[int, float]]] = {
    QT.Q4_0: (32, 2 + 16, {0: 0.01}),  # d, qs[16]
    QT.Q4_1: (32, 2 + 2 + 16, {0: 0.01, 2: -0.08}),  # d, m, qs[16]
    QT.Q5_0: (32, 2 + 4 + 16, {0: 0.005}),  # d, qh[4], qs[16]
    QT.Q5_1: (32, 2 + 2 + 4 + 16, {0: 0.005, 2: -0.08}),  # d, m, qh[4], qs[16]
    QT.Q8_0: (32, 2 + 32, {0: 0.001}),  # d, qs[32] (int8)
    QT.Q4_K: (256, 2 + 2 + 12 + 128, {0: 3e-4, 2: 1e-3}),  # d, dmin, scales[12], qs[128]
    QT.Q5_K: (256, 2 + 2 + 12 + 32 + 128, {0: 1.5e-4, 2: 1e-3}),  # + qh[32]
    QT.Q6_K: (256, 128 + 64 + 16 + 2, {208: 2e-5}),  # ql[128], qh[64], scales[16] (int8), d
}
TYPES = list(LAYOUTS)
# The type of each matrix in file order: embed, (q, k, v, o, gate, up, down) x 2, lm_head.
ASSIGNED = [QT.Q8_0]
ASSIGNED += [QT.Q4_K, QT.Q6_K, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q5_K]
ASSIGNED += [QT.Q5_0, QT.Q4_1, QT.Q6_K, QT.Q4_K, QT.Q8_0, QT.Q4_0, QT.Q5_1]
ASSIGNED += [QT.Q5_K]


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian float16 at `offset` of every block, as float32 [n, 1]."""
    raw = blocks[:, offset].astype(np.uint16) | (blocks[:, offset + 1].astype(np.uint16) << 8)
    return raw.view(np.float16).astype(np.float32)[:, None]


def _u32(blocks: np.ndarray, offset: int) -> np.ndarray:
    b = blocks[:, offset : offset + 4].astype(np.uint32)
    return (b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24)[:, None]


def _scale_min_k4(scales: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) from the 12 bytes."""
    q = scales.astype(np.int32)
    if j < 4:
        return q[:, j : j + 1] & 63, q[:, j + 4 : j + 5] & 63
    sc = (q[:, j + 4 : j + 5] & 0xF) | ((q[:, j - 4 : j - 3] >> 6) << 4)
    mn_ = (q[:, j + 4 : j + 5] >> 4) | ((q[:, j : j + 1] >> 6) << 4)
    return sc, mn_


def decode(qtype: QT, blocks: np.ndarray) -> np.ndarray:
    """[n, bytes per block] uint8 -> [n, values per block] float32, per ggml-quants.c."""
    b = blocks
    n = b.shape[0]
    f32 = np.float32
    if qtype in (QT.Q4_0, QT.Q4_1):
        qs = b[:, -16:].astype(np.int32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # y[j] low nibble, y[j + 16] high
        if qtype == QT.Q4_0:
            return _f16(b, 0) * (q - 8).astype(f32)
        return _f16(b, 0) * q.astype(f32) + _f16(b, 2)
    if qtype in (QT.Q5_0, QT.Q5_1):
        qh = _u32(b, 2 if qtype == QT.Q5_0 else 4)
        qs = b[:, -16:].astype(np.uint32)
        j = np.arange(16, dtype=np.uint32)[None]
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        q = np.concatenate([(qs & 0xF) | xh0, (qs >> 4) | xh1], axis=1).astype(np.int32)
        if qtype == QT.Q5_0:
            return _f16(b, 0) * (q - 16).astype(f32)
        return _f16(b, 0) * q.astype(f32) + _f16(b, 2)
    if qtype == QT.Q8_0:
        return _f16(b, 0) * b[:, 2:].view(np.int8).astype(f32)
    if qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin, scales = _f16(b, 0), _f16(b, 2), b[:, 4:16]
        qh = b[:, 16:48].astype(np.int32) if qtype == QT.Q5_K else None
        qs = b[:, -128:].astype(np.int32)
        y = np.zeros((n, 256), f32)
        for c in range(4):  # 64 values per step: two sub-blocks of 32
            ql = qs[:, 32 * c : 32 * c + 32]
            sc1, m1 = _scale_min_k4(scales, 2 * c)
            sc2, m2 = _scale_min_k4(scales, 2 * c + 1)
            lo, hi = ql & 0xF, ql >> 4
            if qh is not None:
                lo = lo + 16 * ((qh & (1 << 2 * c)) != 0)
                hi = hi + 16 * ((qh & (2 << 2 * c)) != 0)
            y[:, 64 * c : 64 * c + 32] = (d * sc1) * lo - dmin * m1
            y[:, 64 * c + 32 : 64 * c + 64] = (d * sc2) * hi - dmin * m2
        return y
    if qtype == QT.Q6_K:
        ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
        sc, d = b[:, 192:208].view(np.int8).astype(f32), _f16(b, 208)
        y = np.zeros((n, 256), f32)
        for half in range(2):  # 128 values per step
            lq, hq, s = ql[:, 64 * half :], qh[:, 32 * half :], sc[:, 8 * half :]
            for l in range(32):  # noqa: E741 (the C loop's name)
                i = l // 16
                q1 = ((lq[:, l] & 0xF) | ((hq[:, l] >> 0) & 3) << 4) - 32
                q2 = ((lq[:, l + 32] & 0xF) | ((hq[:, l] >> 2) & 3) << 4) - 32
                q3 = ((lq[:, l] >> 4) | ((hq[:, l] >> 4) & 3) << 4) - 32
                q4 = ((lq[:, l + 32] >> 4) | ((hq[:, l] >> 6) & 3) << 4) - 32
                base = 128 * half + l
                for k, q in enumerate((q1, q2, q3, q4)):
                    y[:, base + 32 * k] = (d[:, 0] * s[:, i + 2 * k]) * q
        return y
    raise AssertionError(qtype)


def blocks_by_hand(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes (every bit pattern is a valid quant / scale), with the f16 scale fields set
    to magnitudes that give weights of order 0.05: [rows, bytes per row] uint8."""
    per_block, nbytes, fields = LAYOUTS[qtype]
    n = rows * cols // per_block
    blocks = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    for offset, magnitude in fields.items():
        value = (magnitude * rng.uniform(0.5, 1.5, n)).astype(np.float16)
        blocks[:, offset : offset + 2] = value.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


def _matrices() -> list[tuple[str, tuple[int, int]]]:
    """(HF name, [out, in]) of every matrix, in file order."""
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q_rows, HIDDEN)),
            (p + "self_attn.k_proj.weight", (kv_rows, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv_rows, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, q_rows)),
            (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, FFN)),
        ]
    return out + [("lm_head.weight", (VOCAB, HIDDEN))]


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A llama GGUF whose 16 matrices use the 8 types (each twice; five of them on the q / k
    projections or the embedding), written as raw blocks. Returns the path and, per HF
    name, (type, raw blocks in file row order)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quants") / "quants.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    written: dict[str, Any] = {}
    for k, (name, (rows, cols)) in enumerate(_matrices()):
        qtype = ASSIGNED[k]
        raw = blocks_by_hand(qtype, rows, cols, rng)
        written[name] = (qtype, raw)
        writer.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
        if name.endswith("down_proj.weight"):  # the layer's norms after its matrices
            layer = name.split(".")[2]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                weight = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
                hf_name = f"model.layers.{layer}.{norm}.weight"
                written[hf_name] = (QT.F32, weight)
                writer.add_tensor(_gguf_name(hf_name), weight)
    weight = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    written["model.norm.weight"] = (QT.F32, weight)
    writer.add_tensor("output_norm.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, written


def test_every_type_appears_twice(quant_file) -> None:
    _, written = quant_file
    types = [qtype for qtype, _ in written.values() if qtype != QT.F32]
    assert sorted(types) == sorted(TYPES * 2)
    kinds = {written[n][0] for n in written if "q_proj" in n or "k_proj" in n or "embed" in n}
    assert len(kinds) == 5  # the q/k row permutation meets five different block types


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantisation_matches_llama_cpp_layout(quant_file, qtype: QT) -> None:
    path, written = quant_file
    ours = dict(iter_gguf_tensors(path, read_gguf_config(path)))
    names = [name for name, (t, _) in written.items() if t == qtype]
    assert len(names) == 2
    per_block, nbytes, _ = LAYOUTS[qtype]
    for name in names:
        raw = written[name][1]
        rows = raw.shape[0]
        expected = decode(qtype, raw.reshape(-1, nbytes)).reshape(rows, -1)
        got = ours[name]
        if "q_proj" in name:
            got = _llama_cpp_permute(got, HEADS)  # back to the file's row order
        elif "k_proj" in name:
            got = _llama_cpp_permute(got, KV_HEADS)
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9, err_msg=name)
        # Not degenerate: the weights spread over the type's range.
        assert 0.01 < expected.std() < 0.2 and len(np.unique(expected)) > 100, name


def test_logits_match_transformers(quant_file) -> None:
    import transformers

    path, _ = quant_file
    hf = transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model = mn.load_model(path, progress=False)
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 40)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    out = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert out.std(axis=-1).min() > 1e-2
