"""Mixtral (sparse mixture of experts) against transformers' MixtralForCausalLM, float32.

Tiny random checkpoints: GQA (4 heads, 2 kv heads), 4 experts, top-2, with and without a window.
Router and expert weights are drawn at 1/sqrt(fan_in) (transformers' init of 0.02 would make the
experts' contribution, and so the test, nearly blind).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_greedy, randomize_norms
from safetensors.numpy import save_file

import mistral_nnx as mn
from mistral_nnx.cache import init_cache
from mistral_nnx.config import load_config
from mistral_nnx.engine import EngineOptions, generate
from mistral_nnx.errors import MistralNNXError

VOCAB, SEQ = 211, 64
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    rope_theta=10000.0,
)


def build_mixtral(directory: Path, seed: int = 0, **overrides: Any) -> Any:
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**{**BASE, **overrides}))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:  # router and experts: weights that make every expert matter
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    randomize_norms(model, seed)
    model = model.float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("mixtral")
    return {
        "nowindow": (root / "a", build_mixtral(root / "a", 0, sliding_window=None)),
        "window16": (root / "b", build_mixtral(root / "b", 1, sliding_window=16)),
    }


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, seq)).astype(np.int32)


def _reference(hf_model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _max_err(model: mn.Mistral, hf_model: Any, tokens: np.ndarray) -> float:
    out = np.asarray(model(jnp.asarray(tokens)))
    return float(np.abs(out - _reference(hf_model, tokens)).max())


# ---- the network --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nowindow", "window16"])
def test_logits_match_transformers(mixtral, name):
    directory, hf_model = mixtral[name]
    model = mn.load_model(directory, progress=False)
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    assert model.layers[0].mlp.gate[...].shape == (4, 64, 96)  # stacked [E, D, M]
    assert model.layers[0].mlp.down[...].shape == (4, 96, 64)
    assert model.layers[0].mlp.router[...].shape == (4, 64)  # [E, D]
    # 5 x 64 = 320 tokens: the dense path runs in chunks of 256 (the last one padded).
    tokens = _tokens(batch=5 if name == "nowindow" else 2)
    out = np.asarray(model(jnp.asarray(tokens)))
    ref = _reference(hf_model, tokens)
    assert np.abs(out - ref).max() < 1e-4
    assert out.std(axis=-1).min() > 1e-2


def test_bfloat16_weights_within_bfloat16_tolerance(mixtral):
    directory, hf_model = mixtral["window16"]
    model = mn.load_model(directory, dtype=jnp.bfloat16, progress=False)
    assert model.layers[0].mlp.gate[...].dtype == jnp.bfloat16
    tokens = _tokens()
    out, ref = np.asarray(model(jnp.asarray(tokens))), _reference(hf_model, tokens)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_every_expert_is_used_and_matters(mixtral):
    """The router picks every expert somewhere, and zeroing one expert changes the logits."""
    directory, hf_model = mixtral["nowindow"]
    model = mn.load_model(directory, progress=False)
    x = jnp.asarray(np.random.RandomState(3).randn(128, 64), jnp.float32)
    _, index = model.layers[0].mlp.route(x)
    assert set(np.asarray(index).ravel().tolist()) == {0, 1, 2, 3}
    tokens = jnp.asarray(_tokens())
    before = np.asarray(model(tokens))
    down = model.layers[1].mlp.down
    down[...] = down[...].at[2].set(0.0)
    assert np.abs(np.asarray(model(tokens)) - before).max() > 1e-3


def _matmul_operand_shapes(jaxpr: Any) -> set[tuple[int, ...]]:
    shapes: set[tuple[int, ...]] = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.update(tuple(v.aval.shape) for v in eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes |= _matmul_operand_shapes(sub)
    return shapes


def test_decode_path_reads_only_the_chosen_experts(mixtral):
    """A batch-1 one-token step multiplies gathered [k, D, M] slices, never all E experts."""
    directory, _ = mixtral["nowindow"]
    model = mn.load_model(directory, progress=False)
    moe = model.layers[0].mlp
    full = {(4, 64, 96), (4, 96, 64)}
    one = jnp.ones((1, 1, 64), jnp.float32)
    assert not full & _matmul_operand_shapes(jax.make_jaxpr(moe)(one).jaxpr)
    prefill = jnp.ones((1, 8, 64), jnp.float32)  # the dense path does multiply all experts
    assert full & _matmul_operand_shapes(jax.make_jaxpr(moe)(prefill).jaxpr)
    many = jnp.ones((2, 8, 64), jnp.float32)  # 16 tokens x 2 > 4 experts: the dense path
    gathered = moe._gathered(many.reshape(16, 64), *moe.route(many.reshape(16, 64)))
    dense = moe(many).reshape(16, 64)
    assert np.abs(np.asarray(gathered) - np.asarray(dense)).max() < 1e-5


def test_packed_transformers5_names_load_the_same(mixtral, tmp_path):
    """mlp.gate.weight + experts.gate_up_proj [E, 2M, D] (gate rows first) + experts.down_proj,
    as transformers 5 holds the weights in memory."""
    directory, hf_model = mixtral["window16"]
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model = mn.load_model(tmp_path, progress=False)
    assert _max_err(model, hf_model, _tokens()) < 1e-4


def test_cache_prefill_then_decode_equals_full_forward(mixtral):
    directory, hf_model = mixtral["window16"]
    model = mn.load_model(directory, progress=False)
    ids = _tokens(1, 72, seed=4)
    reference = _reference(hf_model, ids)[0]
    cache = init_cache(model.config, 1, 96)
    step = jax.jit(lambda tok, pos, cache: model.forward(tok, pos, None, cache))
    logits, cache = step(jnp.asarray(ids[:, :20]), jnp.arange(20, dtype=jnp.int32)[None], cache)
    got = [np.asarray(logits[0])]
    for i in range(20, 72):
        logits, cache = step(jnp.asarray(ids[:, i : i + 1]), jnp.asarray([[i]], jnp.int32), cache)
        got.append(np.asarray(logits[0]))
    assert np.abs(np.concatenate(got) - reference).max() < 1e-4


def test_greedy_generation_of_a_ragged_batch(mixtral):
    """Two prompts of different lengths in one batch: each row's 64 greedy tokens equal
    transformers' generate on that prompt alone (batch invariance of the routing included)."""
    directory, hf_model = mixtral["window16"]
    model = mn.load_model(directory, progress=False)
    prompts = [_tokens(1, n, seed=n)[0].tolist() for n in (4, 13)]
    batched = generate(model, prompts, max_new_tokens=64, options=EngineOptions(decode_steps=16))
    for prompt, result in zip(prompts, batched, strict=True):
        assert result.tokens == hf_greedy(hf_model, prompt, 64)


# ---- other formats ------------------------------------------------------------------------------
def _native_name(name: str) -> str | None:
    table = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in table:
        return table[name]
    parts = name.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    mapping = {
        "self_attn.q_proj.weight": "attention.wq.weight",
        "self_attn.k_proj.weight": "attention.wk.weight",
        "self_attn.v_proj.weight": "attention.wv.weight",
        "self_attn.o_proj.weight": "attention.wo.weight",
        "input_layernorm.weight": "attention_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
    }
    if rest in mapping:
        return f"layers.{layer}.{mapping[rest]}"
    if rest.startswith("block_sparse_moe.experts."):
        return f"layers.{layer}.feed_forward.{rest[len('block_sparse_moe.') :]}"
    return None


def _to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    rows, cols = w.shape
    e = rows // heads
    return w.reshape(heads, 2, e // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_native_params_json_moe_form_matches(mixtral, tmp_path):
    from safetensors.numpy import load_file

    directory, hf_model = mixtral["nowindow"]
    hf = load_file(str(directory / "model.safetensors"))
    native = {}
    for name, w in hf.items():
        target = _native_name(name)
        assert target is not None, name
        if name.endswith("q_proj.weight"):
            w = _to_interleaved(w, 4)
        elif name.endswith("k_proj.weight"):
            w = _to_interleaved(w, 2)
        native[target] = w
    save_file(native, str(tmp_path / "consolidated.safetensors"))
    params = {
        "dim": 64,
        "n_layers": 2,
        "head_dim": 16,
        "hidden_dim": 96,
        "n_heads": 4,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
        "moe": {"num_experts": 4, "num_experts_per_tok": 2},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = mn.load_model(tmp_path, progress=False)
    assert model.config.num_experts == 4
    assert _max_err(model, hf_model, _tokens()) < 1e-4


def test_orbax_round_trip_carries_experts(mixtral, tmp_path):
    directory, hf_model = mixtral["window16"]
    model = mn.load_model(directory, progress=False)
    mn.save_model(model, tmp_path / "ckpt")
    again = mn.load_model(tmp_path / "ckpt", progress=False)
    assert again.config == model.config
    assert _max_err(again, hf_model, _tokens()) < 1e-4


# ---- refusals -----------------------------------------------------------------------------------
def test_more_experts_per_token_than_experts_is_refused(tmp_path):
    config = {**BASE, "model_type": "mixtral", "num_experts_per_tok": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MistralNNXError) as info:
        load_config(tmp_path)
    msg = str(info.value)
    assert "config.json" in msg and "num_experts_per_tok (5)" in msg and "\n" not in msg


def test_missing_expert_tensor_is_refused(mixtral, tmp_path):
    from safetensors.numpy import load_file

    directory, _ = mixtral["nowindow"]
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(
        MistralNNXError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"
    ):
        mn.load_model(tmp_path, progress=False)


def _llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF half-rotation q/k rows -> llama.cpp's interleaved order."""
    return _to_interleaved(w, heads)


def test_gguf_stacked_experts_match_hf(mixtral, tmp_path):
    """A llama-arch GGUF with expert_count / expert_used_count, router ffn_gate_inp and stacked
    ffn_{gate,up,down}_exps, written with the gguf package as llama.cpp lays it out."""
    import gguf
    from safetensors.numpy import load_file

    directory, hf_model = mixtral["nowindow"]
    hf = load_file(str(directory / "model.safetensors"))
    writer = gguf.GGUFWriter(tmp_path / "mixtral.gguf", "llama")
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(16)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", hf["model.norm.weight"])
    writer.add_tensor("output.weight", hf["lm_head.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        layer = {
            "attn_q": _llama_cpp_rows(hf[p + "self_attn.q_proj.weight"], 4),
            "attn_k": _llama_cpp_rows(hf[p + "self_attn.k_proj.weight"], 2),
            "attn_v": hf[p + "self_attn.v_proj.weight"],
            "attn_output": hf[p + "self_attn.o_proj.weight"],
            "attn_norm": hf[p + "input_layernorm.weight"],
            "ffn_norm": hf[p + "post_attention_layernorm.weight"],
            "ffn_gate_inp": hf[p + "block_sparse_moe.gate.weight"],
        }
        for kind, gguf_kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            pieces = [hf[f"{p}block_sparse_moe.experts.{j}.{kind}.weight"] for j in range(4)]
            layer[f"ffn_{gguf_kind}_exps"] = np.stack(pieces)
        for name, w in layer.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = mn.load_model(tmp_path / "mixtral.gguf", progress=False)
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (4, 2)
    assert _max_err(model, hf_model, _tokens()) < 1e-4
    # `mistral-nnx convert` carries the stacked experts into the orbax format.
    from mistral_nnx import cli

    assert cli.main(["convert", str(directory), str(tmp_path / "orbax")]) == 0
    converted = mn.load_model(tmp_path / "orbax", progress=False)
    assert converted.config.num_experts == 4
    assert _max_err(converted, hf_model, _tokens()) < 1e-4
