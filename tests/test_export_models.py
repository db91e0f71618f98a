"""Merged export of Mixtral, Ministral 3 and the mistral3 wrapper's text model: a LoRA model
(random A and B) merged and written by save_merged_hf gives the adapted model's logits in
transformers' AutoModelForCausalLM and in load_model (float32, within 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import mistral_nnx
from mistral_nnx.train.export import hf_config, save_merged_hf
from mistral_nnx.train.lora import LoraConfig, apply_lora

LORA = LoraConfig(rank=4, alpha=12.0)  # the seven default targets; experts per expert


@nnx.jit
def logits(model: mistral_nnx.Mistral, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def _adapted(directory: Path, seed: int) -> mistral_nnx.Mistral:
    """The checkpoint with LoRA on every default target, A and B random (nothing zero)."""
    model = apply_lora(mistral_nnx.load_model(directory, progress=False), LORA)
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            value = 0.1 * rng.standard_normal(var.get_value().shape)
            var.set_value(jnp.asarray(value, jnp.float32))
    return model


def _transformers(out: Path, architecture: str) -> Any:
    import transformers

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == architecture
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return hf.float().eval()


def _check_export(directory: Path, out: Path, architecture: str, seq: int, seed: int) -> None:
    import torch

    model = _adapted(directory, seed)
    save_merged_hf(model, out, lora=LORA)
    ids = np.random.default_rng(seed).integers(3, 211, (2, seq)).astype(np.int32)
    ours = np.asarray(logits(model, jnp.asarray(ids)))
    base = np.asarray(logits(mistral_nnx.load_model(directory, progress=False), jnp.asarray(ids)))
    assert np.abs(ours - base).max() > 1e-1  # the adapters matter
    with torch.no_grad():
        theirs = _transformers(out, architecture)(torch.tensor(ids, dtype=torch.long)).logits
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4, rtol=1e-4)
    again = mistral_nnx.load_model(out, progress=False)
    np.testing.assert_allclose(logits(again, jnp.asarray(ids)), ours, atol=1e-4, rtol=1e-4)


def test_mixtral(tmp_path: Path) -> None:
    from test_mixtral import build_mixtral

    build_mixtral(tmp_path / "base", seed=3, sliding_window=16)
    # 2 x 40 tokens: the dense path, where every expert (and so every adapter) is used
    _check_export(tmp_path / "base", tmp_path / "merged", "MixtralForCausalLM", 40, 1)
    names = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert names["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (96, 64)
    assert names["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (64, 96)
    assert names["model.layers.1.block_sparse_moe.gate.weight"].shape == (4, 64)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["sliding_window"] == 16


@pytest.mark.parametrize("kind", ["ministral3", "mistral3", "mistral3_mistral"])
def test_ministral3_and_the_mistral3_text_model(tmp_path: Path, kind: str) -> None:
    """80 tokens cross four llama_4 query scaling periods (16); a mistral3 wrapper's text model
    is written as a text checkpoint of its own type."""
    from test_mistral3 import build_ministral3, build_mistral3

    base = tmp_path / "base"
    if kind == "ministral3":
        build_ministral3(base, seed=5, sliding_window=24)
    else:
        text_type = "mistral" if kind == "mistral3_mistral" else "ministral3"
        build_mistral3(base, seed=6, text_type=text_type)
    architecture = "MistralForCausalLM" if kind == "mistral3_mistral" else "Ministral3ForCausalLM"
    _check_export(base, tmp_path / "merged", architecture, 80, 2)
    if kind != "mistral3_mistral":
        config = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert config["rope_parameters"]["llama_4_scaling_beta"] == 0.5


def test_what_transformers_cannot_express_is_refused() -> None:
    from mistral_nnx.config import MistralConfig

    config = MistralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=8, layer_windows=(8, None), model_type="mixtral",
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    with pytest.raises(mistral_nnx.MistralNNXError, match="per-layer sliding windows on a mixtral"):
        hf_config(config, "float32")
    yarn = (("factor", 4.0), ("original_max_position_embeddings", 16), ("rope_type", "yarn"))
    ministral3 = config.replace(
        num_experts=0, num_experts_per_tok=0, layer_windows=(None, None), rope_scaling=yarn,
        llama4_scaling_beta=0.1, llama4_scaling_original_max=32, model_type="ministral3",
    )  # fmt: skip
    with pytest.raises(mistral_nnx.MistralNNXError, match=r"period 32\) without YaRN"):
        hf_config(ministral3, "float32")
    written = hf_config(ministral3.replace(llama4_scaling_original_max=16), "float32")
    assert written["model_type"] == "ministral3"


def test_finetune_save_merged_on_mixtral(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mistral-nnx finetune --save-merged` on a tiny Mixtral: OUT/merged is what the saved
    adapters give at load."""
    from test_mixtral import build_mixtral
    from train_fixtures import CHATS, VOCAB, write_jsonl, write_tokenizer

    from mistral_nnx.cli import main

    base = tmp_path / "base"
    build_mixtral(base, seed=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    write_tokenizer(base)
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "run"
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "-q"]
    args += ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--steps", "2"]
    args += ["--batch-size", "2", "--seq-len", "32", "--save-merged"]
    assert main(args) == 0, capsys.readouterr().err
    merged = mistral_nnx.load_model(out / "merged", progress=False)
    adapted = mistral_nnx.load_model(base, adapters=out / "adapter", progress=False)
    before = mistral_nnx.load_model(base, progress=False)
    ids = jnp.asarray(np.arange(12).reshape(1, 12), jnp.int32)
    assert float(jnp.abs(logits(merged, ids) - logits(before, ids)).max()) > 1e-3  # it trained
    np.testing.assert_allclose(logits(merged, ids), logits(adapted, ids), atol=1e-5)
    assert (out / "merged" / "tokenizer.json").is_file()


def test_finetune_refuses_an_unexportable_model_before_training(tmp_path: Path) -> None:
    """--full (or --save-merged) on a model the final export would refuse fails at the start,
    not after the training: nothing is written."""
    from train_fixtures import CHATS, VOCAB, write_jsonl, write_tokenizer

    from mistral_nnx.config import MistralConfig
    from mistral_nnx.train.loop import FinetuneConfig, finetune
    from mistral_nnx.train.step import OptimConfig

    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=8, layer_windows=(8, None), model_type="mixtral",
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    write_tokenizer(tmp_path)
    tokenizer = mistral_nnx.load_tokenizer(tmp_path / "tokenizer.json")
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "run"
    cfg = FinetuneConfig(
        model="unused", data=str(data), out=str(out), lora=None, optim=OptimConfig(steps=2),
        batch_size=2, seq_len=32, progress=False,
    )  # fmt: skip
    model = mistral_nnx.Mistral(config)
    with pytest.raises(mistral_nnx.MistralNNXError, match="per-layer sliding windows"):
        finetune(cfg, model=model, tokenizer=tokenizer)
    assert not out.exists()
