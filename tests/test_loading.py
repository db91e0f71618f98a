"""Checkpoint formats, streaming placement, atomic orbax writes and every bad-input refusal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_to_native
from safetensors.numpy import save_file

import mistral_nnx as mn
from mistral_nnx.checkpoint import orbax_io
from mistral_nnx.errors import MistralNNXError


def _tokens(seq: int = 48) -> jnp.ndarray:
    return jnp.asarray(np.random.RandomState(3).randint(0, 211, (2, seq)).astype(np.int32))


def _logits(model, tokens=None) -> np.ndarray:
    return np.asarray(model(_tokens() if tokens is None else tokens))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_native(hf_model, directory: Path, params: dict) -> None:
    hf = {name: t.numpy().copy() for name, t in hf_model.state_dict().items()}
    directory.mkdir()
    save_file(
        hf_to_native(hf, params["n_heads"], params["n_kv_heads"]),
        directory / "consolidated.safetensors",
    )
    (directory / "params.json").write_text(json.dumps(params))


def _native_params(**fields: object) -> dict:
    """params.json of the tiny conftest checkpoints (hidden 64, 4 heads, 2 kv heads)."""
    base = {
        "dim": 64,
        "head_dim": 16,
        "hidden_dim": 128,
        "n_heads": 4,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "vocab_size": 211,
        "rope_theta": 10000.0,
    }
    return {**base, **fields}


def test_mistral_native_layout_matches_hf(hf_checkpoints, tmp_path):
    directory, hf_model = hf_checkpoints["gqa_window16"]
    hf_logits = _logits(mn.load_model(directory, progress=False))
    params = _native_params(n_layers=3, sliding_window=16)
    _write_native(hf_model, tmp_path / "native", params)
    native = mn.load_model(tmp_path / "native", progress=False)
    assert native.config.layer_windows == (16, 16, 16)
    assert np.abs(_logits(native) - hf_logits).max() < 1e-5


def _permute_for_rope(tensor: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """transformers' own Mistral conversion (models/mistral/convert_mistral_weights_to_hf.py,
    `permute_for_rope`): native q/k rows -> HF rows. An independent reading of the layout."""
    tensor = tensor.view(n_heads, dim1 // n_heads // 2, 2, dim2)
    tensor = tensor.transpose(1, 2)
    return tensor.reshape(dim1, dim2)


def test_native_matches_transformers_conversion(tmp_path):
    """Random weights written in Mistral's native layout, converted to transformers the way its
    conversion script does (key map + permute_for_rope on wq / wk): the logits agree. q/k are
    large enough that attention is sharp, so a wrong row order cannot hide."""
    import transformers

    params = _native_params(n_layers=2, sliding_window=16, rope_theta=1e6)
    d, h, kv, e, ffn = 64, 4, 2, 16, 128
    gen = torch.Generator().manual_seed(7)

    def rand(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    native = {
        "tok_embeddings.weight": rand(211, d, std=1.0),
        "norm.weight": 1.0 + rand(d, std=0.1),
        "output.weight": rand(211, d),
    }
    for i in range(2):
        p = f"layers.{i}."
        native |= {
            p + "attention.wq.weight": rand(h * e, d, std=0.4),
            p + "attention.wk.weight": rand(kv * e, d, std=0.4),
            p + "attention.wv.weight": rand(kv * e, d, std=0.1),
            p + "attention.wo.weight": rand(d, h * e, std=0.1),
            p + "feed_forward.w1.weight": rand(ffn, d, std=0.1),
            p + "feed_forward.w2.weight": rand(d, ffn, std=0.1),
            p + "feed_forward.w3.weight": rand(ffn, d, std=0.1),
            p + "attention_norm.weight": 1.0 + rand(d, std=0.1),
            p + "ffn_norm.weight": 1.0 + rand(d, std=0.1),
        }
    directory = tmp_path / "native"
    directory.mkdir()
    save_file({k: v.numpy() for k, v in native.items()}, directory / "consolidated.safetensors")
    (directory / "params.json").write_text(json.dumps(params))

    key_map = [  # the script's STATE_DICT_MAPPING
        (r"^output.weight", r"lm_head.weight"),
        (r"^norm.weight", r"model.norm.weight"),
        (r"^tok_embeddings.weight", r"model.embed_tokens.weight"),
        (r"^layers.(\d+).attention_norm.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"^layers.(\d+).ffn_norm.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"^layers.(\d+).attention.w(q|k|v|o).weight", r"model.layers.\1.self_attn.\2_proj.weight"),
        (r"^layers.(\d+).feed_forward.w1.weight", r"model.layers.\1.mlp.gate_proj.weight"),
        (r"^layers.(\d+).feed_forward.w2.weight", r"model.layers.\1.mlp.down_proj.weight"),
        (r"^layers.(\d+).feed_forward.w3.weight", r"model.layers.\1.mlp.up_proj.weight"),
    ]
    converted = {}
    for old, tensor in native.items():
        new = next(re.sub(a, b, old) for a, b in key_map if re.match(a, old))
        if "q_proj" in new:
            tensor = _permute_for_rope(tensor, h, h * e, d)
        elif "k_proj" in new:
            tensor = _permute_for_rope(tensor, kv, kv * e, d)
        converted[new] = tensor
    config = transformers.MistralConfig(
        hidden_size=d,
        num_hidden_layers=2,
        intermediate_size=ffn,
        num_attention_heads=h,
        num_key_value_heads=kv,
        head_dim=e,
        rms_norm_eps=1e-5,
        vocab_size=211,
        sliding_window=16,
        rope_theta=1e6,
        max_position_embeddings=32768,
    )
    hf = transformers.MistralForCausalLM(config).eval()
    hf.load_state_dict(converted, strict=True)
    tokens = _tokens(40)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    ours = mn.load_model(directory, progress=False)
    assert ours.config.layer_windows == (16, 16)
    assert np.abs(_logits(ours, tokens) - ref).max() < 1e-4
    assert ref.std(axis=-1).min() > 0.1


def test_native_tied_embeddings_and_norm_eps(tmp_path):
    """params.json's own spellings, `tied_embeddings` (no output.weight in the file) and
    `norm_eps`, against transformers with the same tie and a norm eps large enough to move
    the logits (every published file says 1e-5, the default)."""
    from conftest import build_hf

    hf_model = build_hf(
        "mistral", tmp_path / "hf", seed=5, tie_word_embeddings=True, rms_norm_eps=0.05
    )
    hf = {name: t.numpy().copy() for name, t in hf_model.state_dict().items()}
    native = hf_to_native(hf, 4, 2)
    del native["output.weight"]  # a tied native checkpoint stores the embedding once
    directory = tmp_path / "native"
    directory.mkdir()
    save_file(native, directory / "consolidated.safetensors")
    params = _native_params(n_layers=3, norm_eps=0.05, tied_embeddings=True)
    (directory / "params.json").write_text(json.dumps(params))
    ours = mn.load_model(directory, progress=False)
    assert ours.config.tie_word_embeddings and ours.config.rms_norm_eps == 0.05
    with torch.no_grad():
        ref = hf_model(torch.tensor(np.asarray(_tokens()), dtype=torch.long)).logits.numpy()
    assert np.abs(_logits(ours) - ref).max() < 1e-4


def test_native_per_layer_window_list(hf_checkpoints, tmp_path):
    """params.json's window list (Ministral) gives the same network as HF layer_types."""
    directory, hf_model = hf_checkpoints["interleaved"]
    params = _native_params(n_layers=4, max_seq_len=512, sliding_window=[8, 8, 512, 8])
    _write_native(hf_model, tmp_path / "native", params)
    native = mn.load_model(tmp_path / "native", progress=False)
    assert native.config.layer_windows == (8, 8, None, 8)
    tokens = _tokens(40)
    with torch.no_grad():
        ref = hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    assert np.abs(_logits(native, tokens) - ref).max() < 1e-4


def test_sharded_hf_checkpoint(hf_checkpoints, tmp_path):
    directory, hf_model = hf_checkpoints["mha_nowindow"]
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = mn.load_model(tmp_path / "sharded", progress=False)
    single = mn.load_model(directory, progress=False)
    assert np.array_equal(_logits(sharded), _logits(single))


def test_orbax_round_trip_is_exact(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["tied"]
    model = mn.load_model(directory, progress=False)
    mn.save_model(model, tmp_path / "orbax")
    again = mn.load_model(tmp_path / "orbax", progress=False)
    assert again.config == model.config
    assert np.array_equal(_logits(again), _logits(model))
    with pytest.raises(MistralNNXError, match="already exists"):
        mn.save_model(model, tmp_path / "orbax")
    bf16 = mn.load_model(tmp_path / "orbax", param_dtype=jnp.bfloat16, progress=False)
    assert bf16.embed[...].dtype == jnp.bfloat16


def _write_v1(model: mn.Mistral, path: Path) -> None:
    """`model` as FORMAT_VERSION 1 wrote it: the dense projections [in..., out...]
    (wq [D, H, E], wo [H, E, D], gate / up / down / lm_head transposed)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    old_axes = {"wq": (2, 0, 1), "wk": (2, 0, 1), "wv": (2, 0, 1), "wo": (1, 2, 0)}
    state: dict = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var[...])
        if key[-1] in old_axes:
            value = value.transpose(old_axes[key[-1]])
        elif value.ndim == 2 and key != ("embed",):
            value = value.T
        node = state
        for part in key[:-1]:
            node = node.setdefault(str(part), {})
        node[str(key[-1])] = np.ascontiguousarray(value)
    path.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute() / "state", state)
        ckptr.wait_until_finished()
    marker = {"format": "mistral_nnx", "version": 1, "config": model.config.to_dict()}
    (path / orbax_io.MARKER).write_text(json.dumps(marker))


def test_orbax_version_1_is_transposed_on_restore(hf_checkpoints, tmp_path):
    """A checkpoint this project wrote before the switch to [out, in] weights (format version 1)
    loads into the same model, on one device and onto a mesh; a later version is refused."""
    directory, _ = hf_checkpoints["llama"]  # untied: lm_head too
    model = mn.load_model(directory, progress=False)
    _write_v1(model, tmp_path / "v1")
    again = mn.load_model(tmp_path / "v1", progress=False)
    assert np.array_equal(_logits(again), _logits(model))
    mesh = mn.make_mesh("data=1,model=1")
    sharded = mn.load_model(tmp_path / "v1", mesh=mesh, progress=False)
    assert np.array_equal(_logits(sharded), _logits(model))
    marker = tmp_path / "v1" / orbax_io.MARKER
    marker.write_text(marker.read_text().replace('"version": 1', '"version": 3'))
    with pytest.raises(MistralNNXError, match="format version 3 is not supported"):
        mn.load_model(tmp_path / "v1")


def test_orbax_write_is_atomic(hf_checkpoints, tmp_path, monkeypatch):
    directory, _ = hf_checkpoints["llama"]
    model = mn.load_model(directory, progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io.shutil, "copy2", interrupted)  # dies after the arrays
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mn.save_model(model, target, extra_files=[directory / "config.json"])
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either
    with pytest.raises(MistralNNXError, match="does not exist"):
        mn.load_model(target)
    # Overwriting an existing checkpoint that then fails keeps the old one intact.
    monkeypatch.undo()
    mn.save_model(model, target)
    monkeypatch.setattr(orbax_io.shutil, "copy2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mn.save_model(model, target, overwrite=True, extra_files=[directory / "config.json"])
    assert np.array_equal(_logits(mn.load_model(target, progress=False)), _logits(model))


# ---- bad input: one clear error naming the file / tensor, nothing half-loaded --------------


def test_missing_path():
    with pytest.raises(MistralNNXError, match="model path '/no/such/dir' does not exist"):
        mn.load_model("/no/such/dir")


def test_hub_id_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MistralNNXError, match="cannot download 'someorg/no-such-model'.*local"):
        mn.load_model("someorg/no-such-model")


def test_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MistralNNXError, match="unknown model format"):
        mn.load_model(tmp_path)
    with pytest.raises(MistralNNXError, match="unknown model format"):
        mn.load_model(tmp_path / "notes.txt")


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(MistralNNXError, match=r"pytorch_model\.bin: pickled.*save_pretrained"):
        mn.load_model(tmp_path)
    with pytest.raises(MistralNNXError, match="pickled"):
        mn.load_model(tmp_path / "pytorch_model.bin")


def test_truncated_safetensors(hf_checkpoints, tmp_path):
    d = _copy(hf_checkpoints["llama"][0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(MistralNNXError, match=r"model\.safetensors: truncated file: tensor '"):
        mn.load_model(d)


def test_corrupt_safetensors_header(hf_checkpoints, tmp_path):
    d = _copy(hf_checkpoints["llama"][0], tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(MistralNNXError, match=r"model\.safetensors: corrupt safetensors header"):
        mn.load_model(d)
    f.write_bytes(b"abc")
    with pytest.raises(MistralNNXError, match="truncated safetensors file"):
        mn.load_model(d)


def test_shape_disagrees_with_config(hf_checkpoints, tmp_path):
    d = _copy(hf_checkpoints["llama"][0], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(MistralNNXError, match=r"tensor 'model\.layers\.0\.mlp\..*disagrees"):
        mn.load_model(d)


def test_missing_and_unexpected_tensors(hf_checkpoints, tmp_path):
    src, hf_model = hf_checkpoints["llama"]
    tensors = {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}
    d = _copy(src, tmp_path / "missing")
    save_file(
        {k: v for k, v in tensors.items() if "layers.2.mlp.up" not in k}, d / "model.safetensors"
    )
    with pytest.raises(MistralNNXError, match=r"missing tensor for 'layers\.2\.mlp\.up'"):
        mn.load_model(d)
    d = _copy(src, tmp_path / "extra")
    save_file(
        {**tensors, "model.layers.9.mlp.up_proj.weight": tensors["lm_head.weight"]},
        d / "model.safetensors",
    )
    with pytest.raises(MistralNNXError, match=r"unexpected tensor 'model\.layers\.9\.mlp"):
        mn.load_model(d)


def test_bad_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MistralNNXError, match=r"config\.json: model_type 'gemma3'"):
        mn.load_model(tmp_path)


def test_corrupt_orbax_marker(hf_checkpoints, tmp_path):
    model = mn.load_model(hf_checkpoints["llama"][0], progress=False)
    mn.save_model(model, tmp_path / "o")
    (tmp_path / "o" / "mistral_nnx.json").write_text("{")
    with pytest.raises(MistralNNXError, match="corrupt mistral_nnx checkpoint marker"):
        mn.load_model(tmp_path / "o")


def test_bad_dtype_and_unsupported_tensor_dtype(hf_checkpoints, tmp_path):
    directory, hf_model = hf_checkpoints["llama"]
    with pytest.raises(MistralNNXError, match="dtype must be a floating dtype.*'bf16'"):
        mn.load_model(directory, dtype="bf16")
    with pytest.raises(MistralNNXError, match="param_dtype must be a floating dtype"):
        mn.load_model(directory, param_dtype="int8")
    d = _copy(directory, tmp_path / "f8")
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in hf_model.state_dict().items()}
    from safetensors.torch import save_file as save_torch

    save_torch(tensors, d / "model.safetensors")
    with pytest.raises(MistralNNXError, match="has dtype F8_E4M3, which is not supported"):
        mn.load_model(d)
