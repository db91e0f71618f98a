"""Export: PEFT adapters (PeftModel.from_pretrained), merged HF checkpoints (transformers and
load_model), load_model(adapters=)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import write_model

import mistral_nnx
from mistral_nnx.train.export import save_adapters, save_merged_hf
from mistral_nnx.train.lora import LoraConfig, apply_lora


@nnx.jit
def logits(model: mistral_nnx.Mistral, tokens: jax.Array) -> jax.Array:
    return model(tokens)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, LoraConfig]:
    """A tiny base checkpoint and a LoRA model on it with random (nonzero) B."""
    root = tmp_path_factory.mktemp("export")
    write_model(root / "base", seed=5, sliding_window=8)
    lora = LoraConfig(rank=4, alpha=12, targets=("q", "v", "o", "down"))
    model = apply_lora(mistral_nnx.load_model(root / "base", progress=False), lora, seed=1)
    for i, (path, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.LoRAParam) and str(path[-1]).endswith("_lora_b"):
            var.set_value(0.1 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    return root, model, lora


IDS = np.random.default_rng(2).integers(0, 300, (2, 13))


def torch_logits(model: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_peft_adapters_load_in_peft_and_in_load_model(trained: Any) -> None:
    import peft
    import transformers

    root, model, lora = trained
    out = save_adapters(model, lora, root / "adapter", base_model=str(root / "base"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12
    ours = np.asarray(logits(model, jnp.asarray(IDS, jnp.int32)))
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    theirs = torch_logits(peft.PeftModel.from_pretrained(base, out).eval())
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    loaded = mistral_nnx.load_model(root / "base", adapters=out, progress=False)
    np.testing.assert_allclose(logits(loaded, jnp.asarray(IDS, jnp.int32)), ours, atol=1e-4)
    # the engine runs a LoRA model as is (adapters applied, not ignored): same greedy tokens
    prompts = [IDS[0, :6].tolist(), IDS[1, :4].tolist()]
    with_adapters = mistral_nnx.generate(model, prompts, max_new_tokens=6)
    merged = mistral_nnx.generate(loaded, prompts, max_new_tokens=6)
    base_out = mistral_nnx.generate(
        mistral_nnx.load_model(root / "base", progress=False), prompts, max_new_tokens=6
    )
    assert [c.tokens for c in with_adapters] == [c.tokens for c in merged]
    assert [c.tokens for c in base_out] != [c.tokens for c in merged]


def test_merged_checkpoint_loads_in_transformers_and_load_model(trained: Any) -> None:
    import transformers

    root, model, lora = trained
    files = [root / "base" / "tokenizer.json", root / "base" / "tokenizer_config.json"]
    out = save_merged_hf(model, root / "merged", tokenizer_files=files, lora=lora)
    ours = np.asarray(logits(model, jnp.asarray(IDS, jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.sliding_window == 8
    np.testing.assert_allclose(torch_logits(hf), ours, atol=1e-4, rtol=1e-4)
    again = mistral_nnx.load_model(out, progress=False)
    np.testing.assert_allclose(logits(again, jnp.asarray(IDS, jnp.int32)), ours, atol=1e-4)
    tokenizer = mistral_nnx.load_tokenizer(out)
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.encode_chat(chat) == mistral_nnx.load_tokenizer(root / "base").encode_chat(
        chat
    )


def test_bad_adapter_directory(trained: Any, tmp_path: Path) -> None:
    root, _, _ = trained
    with pytest.raises(mistral_nnx.MistralNNXError, match="adapter_config.json"):
        mistral_nnx.load_model(root / "base", adapters=tmp_path, progress=False)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    with pytest.raises(mistral_nnx.MistralNNXError, match="adapter_model.safetensors"):
        mistral_nnx.load_model(root / "base", adapters=tmp_path, progress=False)


def test_gguf_base_exports_to_transformers(tmp_path: Path) -> None:
    """A GGUF base (llama.cpp's q/k row order, llama config) merged and written as HF."""
    import transformers
    from gguf import GGMLQuantizationType
    from test_gguf import VOCAB, _hf_weights, _write_tiny

    path = _write_tiny(
        tmp_path / "tiny.gguf",
        _hf_weights(np.random.default_rng(0)),
        qtype=GGMLQuantizationType.F32,
    )
    lora = LoraConfig(rank=2, alpha=4)
    model = apply_lora(mistral_nnx.load_model(path, progress=False), lora, seed=2)
    for i, (p, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.LoRAParam) and str(p[-1]).endswith("_lora_b"):
            var.set_value(0.05 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    out = save_merged_hf(model, tmp_path / "merged", lora=lora)
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 9))
    ours = np.asarray(logits(model, jnp.asarray(ids, jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == "llama"
    import torch

    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max(), rtol=1e-4)
