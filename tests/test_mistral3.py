"""The Mistral 3 generation against transformers, float32: Ministral3ForCausalLM (YaRN + llama_4
query scaling), MistralForCausalLM with YaRN, and Mistral3ForConditionalGeneration read text-only.

original_max_position_embeddings is 16, so 80-token sequences cross four llama_4 scaling steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_greedy, hf_to_native, randomize_norms
from safetensors.numpy import load_file, save_file

import mistral_nnx as mn
from mistral_nnx.cache import init_cache
from mistral_nnx.checkpoint import vlm
from mistral_nnx.engine import EngineOptions, generate
from mistral_nnx.errors import MistralNNXError

VOCAB, SEQ, PERIOD = 211, 80, 16
TEXT: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Ministral 3's own form (mscale == mscale_all_dim: attention factor 1.0), and YaRN's paper
# attention factor 0.1 ln(4) + 1 (no mscale keys).
YARN_MINISTRAL = dict(
    rope_type="yarn",
    rope_theta=1e6,
    factor=4.0,
    original_max_position_embeddings=PERIOD,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
    llama_4_scaling_beta=0.5,
)
YARN_PAPER = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=8)
VISION = dict(
    model_type="pixtral",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    head_dim=8,
)


def _finish(model: Any, directory: Path | None, seed: int) -> Any:
    """Projections drawn at 1/sqrt(fan_in) (transformers' 0.02 makes attention nearly uniform,
    and so blind to the query scaling), norms randomised; saved when `directory` is given."""
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("self_attn" in name or ".mlp." in name):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    randomize_norms(model, seed)
    model = model.float().eval()
    if directory is not None:
        model.save_pretrained(directory, safe_serialization=True)
    return model


def build_ministral3(directory: Path | None, seed: int = 0, **overrides: Any) -> Any:
    import transformers as tf

    torch.manual_seed(seed)
    rope = overrides.pop("rope_parameters", YARN_MINISTRAL)
    config = tf.Ministral3Config(**{**TEXT, "rope_parameters": dict(rope), **overrides})
    return _finish(tf.Ministral3ForCausalLM(config), directory, seed)


def build_mistral3(
    directory: Path | None, seed: int = 0, tie: bool = False, text_type: str = "ministral3"
) -> Any:
    import transformers as tf

    torch.manual_seed(seed)
    text = {**TEXT, "model_type": text_type, "sliding_window": None}
    if text_type == "ministral3":
        text["rope_parameters"] = dict(YARN_MINISTRAL)
    config = tf.Mistral3Config(text_config=text, vision_config=VISION, tie_word_embeddings=tie)
    return _finish(tf.Mistral3ForConditionalGeneration(config), directory, seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    import transformers as tf

    root = tmp_path_factory.mktemp("mistral3")
    out = {
        "ministral3": (root / "m3", build_ministral3(root / "m3", 0)),
        "ministral3_window": (
            root / "m3w",
            build_ministral3(
                root / "m3w",
                1,
                sliding_window=24,
                rope_parameters={**YARN_PAPER, "llama_4_scaling_beta": 0.3},
            ),
        ),
        "mistral3": (root / "vl", build_mistral3(root / "vl", 2)),
        # Mistral Small 3.1 / 3.2: the wrapper around a plain mistral text model.
        "mistral3_mistral": (root / "vlm", build_mistral3(root / "vlm", 4, text_type="mistral")),
    }
    torch.manual_seed(3)
    mistral = tf.MistralForCausalLM(tf.MistralConfig(**TEXT, rope_parameters=dict(YARN_PAPER)))
    out["mistral_yarn"] = (root / "my", _finish(mistral, root / "my", 3))
    return out


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, seq)).astype(np.int32)


def _reference(hf_model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _max_err(model: mn.Mistral, hf_model: Any, tokens: np.ndarray) -> float:
    out = np.asarray(model(jnp.asarray(tokens)))
    return float(np.abs(out - _reference(hf_model, tokens)).max())


# ---- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["ministral3", "ministral3_window", "mistral_yarn", "mistral3", "mistral3_mistral"]
)
def test_logits_match_transformers(models, name):
    directory, hf_model = models[name]
    model = mn.load_model(directory, progress=False)
    tokens = _tokens()
    assert _max_err(model, hf_model, tokens) < 1e-4
    if name == "ministral3_window":
        assert (model.config.llama4_scaling_beta, model.config.llama4_scaling_original_max) == (
            0.3,
            8,
        )
        assert model.config.layer_windows == (24, 24)
    elif name in ("ministral3", "mistral3"):
        assert model.config.llama4_scaling_beta == 0.5
        assert model.config.llama4_scaling_original_max == PERIOD
    else:
        assert model.config.llama4_scaling_beta is None


def test_llama4_scaling_bites_only_past_the_first_period(models):
    """Without the query scaling, positions < 16 are unchanged and later ones differ."""
    directory, hf_model = models["ministral3"]
    model = mn.load_model(directory, progress=False)
    tokens = jnp.asarray(_tokens())
    scaled = np.asarray(model(tokens))
    for layer in model.layers:
        layer.attn.llama4 = None
    plain = np.asarray(model(tokens))
    assert np.abs(scaled[:, :PERIOD] - plain[:, :PERIOD]).max() < 1e-5
    assert np.abs(scaled[:, PERIOD:] - plain[:, PERIOD:]).max() > 1e-2


def test_prefill_then_decode_equals_full_forward(models):
    """Chunks of 5 then single tokens, crossing every llama_4 period, with a 24-token window."""
    directory, hf_model = models["ministral3_window"]
    model = mn.load_model(directory, progress=False)
    ids = _tokens(1, SEQ, seed=4)
    reference = _reference(hf_model, ids)[0]
    cache = init_cache(model.config, 1, 96)
    step = jax.jit(lambda tok, pos, cache: model.forward(tok, pos, None, cache))
    got = []
    for start in range(0, 20, 5):
        pos = jnp.arange(start, start + 5, dtype=jnp.int32)[None]
        logits, cache = step(jnp.asarray(ids[:, start : start + 5]), pos, cache)
        got.append(np.asarray(logits[0]))
    for i in range(20, SEQ):
        logits, cache = step(jnp.asarray(ids[:, i : i + 1]), jnp.asarray([[i]], jnp.int32), cache)
        got.append(np.asarray(logits[0]))
    assert np.abs(np.concatenate(got) - reference).max() < 1e-4


def test_greedy_generation_of_a_ragged_batch(models):
    """Two prompts of different lengths in one batch: each row's 64 greedy tokens equal
    transformers' generate on that prompt alone (positions differ per row past every period)."""
    directory, hf_model = models["ministral3"]
    model = mn.load_model(directory, progress=False)
    prompts = [_tokens(1, n, seed=n)[0].tolist() for n in (5, 12)]
    batched = generate(model, prompts, max_new_tokens=64, options=EngineOptions(decode_steps=16))
    for prompt, result in zip(prompts, batched, strict=True):
        assert result.tokens == hf_greedy(hf_model, prompt, 64)


# ---- Mistral native params.json ------------------------------------------------------------------
def test_native_yarn_and_llama4_blocks_match_hf(models, tmp_path):
    directory, hf_model = models["ministral3"]
    save_file(hf_to_native(load_file(str(directory / "model.safetensors")), 4, 2),
              str(tmp_path / "consolidated.safetensors"))  # fmt: skip
    params = {
        "dim": 64,
        "n_layers": 2,
        "head_dim": 16,
        "hidden_dim": 96,
        "n_heads": 4,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "rope_theta": 1e6,
        "max_position_embeddings": 512,
        "yarn": {
            "factor": 4.0,
            "original_max_position_embeddings": PERIOD,
            "beta": 32.0,
            "alpha": 1.0,
            "apply_scale": False,
        },
        "llama_4_scaling": {"original_max_position_embeddings": PERIOD, "beta": 0.5},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = mn.load_model(tmp_path, progress=False)
    assert _max_err(model, hf_model, _tokens()) < 1e-4


# ---- the mistral3 wrapper ------------------------------------------------------------------------
def test_wrapper_reads_no_vision_bytes_and_says_text_only(models, monkeypatch, capsys):
    directory, hf_model = models["mistral3"]
    read: list[str] = []
    original = vlm.read_tensor

    def spy(path: Path, info: Any) -> np.ndarray:
        read.append(info.name)
        return original(path, info)

    monkeypatch.setattr(vlm, "read_tensor", spy)
    model = mn.load_model(directory, progress=False)
    assert read and not [n for n in read if "vision" in n or "projector" in n]
    assert any(n.startswith("language_model.model.") for n in read)  # the names save writes
    lines = [line for line in capsys.readouterr().err.splitlines() if "text model only" in line]
    assert len(lines) == 1 and "mistral3" in lines[0]
    assert not model.config.tie_word_embeddings


def _write(directory: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_wrapper_new_names_and_head_tying(models, tmp_path):
    """model.language_model.* + lm_head.weight (as transformers 5 names them in memory); a config
    saying tie_word_embeddings=true does not tie when the file has its own lm_head.weight; a file
    without one is tied."""
    directory, hf_model = models["mistral3"]
    config = json.loads((directory / "config.json").read_text())
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert "model.language_model.embed_tokens.weight" in state and "lm_head.weight" in state
    new = _write(tmp_path / "new", state, {**config, "tie_word_embeddings": True})
    model = mn.load_model(new, progress=False)
    assert not model.config.tie_word_embeddings
    assert _max_err(model, hf_model, _tokens()) < 1e-4

    tied_hf = build_mistral3(tmp_path / "tied", 5, tie=True)
    saved = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert not [k for k in saved if "lm_head" in k]
    model = mn.load_model(tmp_path / "tied", progress=False)
    assert model.config.tie_word_embeddings
    assert _max_err(model, tied_hf, _tokens()) < 1e-4


def test_wrapper_without_text_weights_is_refused(models, tmp_path):
    directory, _ = models["mistral3"]
    state = load_file(str(directory / "model.safetensors"))
    vision_only = {k: v for k, v in state.items() if not k.startswith("language_model.")}
    config = json.loads((directory / "config.json").read_text())
    broken = _write(tmp_path / "v", vision_only, config)
    with pytest.raises(MistralNNXError) as info:
        mn.load_model(broken, progress=False)
    msg = str(info.value)
    assert "no text model weights" in msg and str(broken) in msg and "\n" not in msg


def test_gguf_mistral3_architecture_is_refused_in_one_line(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "m3.gguf", "mistral3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MistralNNXError) as info:
        mn.load_model(tmp_path / "m3.gguf", progress=False)
    msg = str(info.value)
    assert "'mistral3'" in msg and "mistral3.rope.scaling" in msg and "\n" not in msg


def test_native_vision_language_checkpoint_reads_its_text_model(models, tmp_path, monkeypatch):
    """consolidated.safetensors with a vision encoder (params.json `vision_encoder`): the text
    model matches transformers, and no vision tensor is read."""
    directory, hf_model = models["mistral3"]
    text = {
        k.replace("language_model.", "", 1): v
        for k, v in load_file(str(directory / "model.safetensors")).items()
        if k.startswith("language_model.")
    }
    native = hf_to_native(text, 4, 2)
    native["vision_encoder.transformer.layers.0.attention.wq.weight"] = np.ones((16, 16), "f4")
    native["vision_language_adapter.w_in.weight"] = np.ones((64, 16), "f4")
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
        "rope_theta": 1e6,
        "max_position_embeddings": 512,
        "yarn": {"factor": 4.0, "original_max_position_embeddings": PERIOD, "beta": 32.0,
                 "alpha": 1.0, "apply_scale": False},
        "llama_4_scaling": {"original_max_position_embeddings": PERIOD, "beta": 0.5},
        "vision_encoder": {"hidden_size": 16, "num_hidden_layers": 1, "image_size": 32},
    }  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    read: list[str] = []
    original = vlm.read_tensor
    monkeypatch.setattr(
        vlm, "read_tensor", lambda p, info: read.append(info.name) or original(p, info)
    )
    model = mn.load_model(tmp_path, progress=False)
    assert read and not [n for n in read if n.startswith(("vision", "patch_merger"))]
    assert model.config.wrapper == "mistral3"
    assert _max_err(model, hf_model, _tokens()) < 1e-4
