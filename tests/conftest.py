"""Tiny random checkpoints built with transformers (PyTorch float32), saved locally."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MISTRAL_NNX_NO_COMPILE_CACHE", "1")  # tests never write ~/.cache
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # subprocesses share a GPU

import jax  # noqa: E402

# Parity is measured in true float32: on GPUs JAX's default float32 matmul is TF32.
jax.config.update("jax_default_matmul_precision", "highest")


def randomize_norms(model: Any, seed: int = 0) -> None:
    """HF initialises norms to 1; 1 + 0.1 N(0,1) makes the test sensitive to them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


_NATIVE_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_NATIVE_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_native(hf: dict[str, Any], heads: int, kv_heads: int) -> dict[str, Any]:
    """HF text-model tensors under Mistral-native names (consolidated.safetensors), q/k rows
    turned from HF's half-rotation order into Mistral's interleaved RoPE pairs."""
    out = {}
    for name, w in hf.items():
        if name in _NATIVE_NAMES:
            out[_NATIVE_NAMES[name]] = w
            continue
        parts = name.split(".")
        inner = _NATIVE_LAYER_NAMES[".".join(parts[3:-1])]
        n = {"attention.wq": heads, "attention.wk": kv_heads}.get(inner)
        if n is not None:
            rows, cols = w.shape
            w = w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)
        out[f"layers.{parts[2]}.{inner}.weight"] = w
    return out


def hf_greedy(hf_model: Any, prompt: list[int], new: int) -> list[int]:
    """transformers' `new` greedy tokens after `prompt` (batch 1), EOS ignored."""
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def build_hf(kind: str, directory: Path, seed: int = 0, **overrides: Any) -> Any:
    """Create and save a tiny random HF model of `kind`; returns the torch model (eval, f32)."""
    import torch
    import transformers as tf

    base: dict[str, Any] = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    if kind == "mistral":
        config = tf.MistralConfig(**base)
        model = tf.MistralForCausalLM(config)
    elif kind == "ministral":
        config = tf.MinistralConfig(**base)
        model = tf.MinistralForCausalLM(config)
    elif kind == "llama":
        config = tf.LlamaConfig(**base)
        model = tf.LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    randomize_norms(model, seed)
    model = model.float().eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return model


CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gqa_window16": ("mistral", dict(sliding_window=16)),
    "mha_nowindow": ("mistral", dict(num_key_value_heads=4, sliding_window=None)),
    "head_dim": ("mistral", dict(head_dim=24, sliding_window=None)),
    "tied": ("mistral", dict(tie_word_embeddings=True, sliding_window=32)),
    "interleaved": (
        "ministral",
        dict(
            num_hidden_layers=4,
            sliding_window=8,
            head_dim=16,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
        ),
    ),
    "llama": ("llama", dict()),
}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """name -> (directory, torch model) for every config in CONFIGS, built once per session."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (kind, overrides)) in enumerate(CONFIGS.items()):
        out[name] = (root / name, build_hf(kind, root / name, seed=i, **overrides))
    return out


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF that `make` installs (never skipped)."""
    from mistral_nnx.cli import default_model

    return default_model()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path: Path) -> Any:
    """The same GGUF loaded by transformers (dequantised, float32)."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()
