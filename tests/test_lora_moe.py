"""LoRA on Mixtral's experts: per-expert adapters against HF PEFT + transformers 5 (float32).

A tiny random Mixtral with 8 experts, top-2: a batch-1 2-token input takes moe.py's gathered path
(2 * tokens * k <= E), longer inputs the dense path, 300 tokens its chunked loop. PEFT adapts the
packed experts with target_parameters (gate_up_proj sharing one A per expert, down_proj);
export.py's docstring gives the mapping to our separate gate / up / down adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_lora import peft_lora_tensors

import mistral_nnx
from mistral_nnx.train.checkpoints import restore_checkpoint, save_checkpoint
from mistral_nnx.train.export import save_adapters, set_peft_tensors
from mistral_nnx.train.lora import (
    LoraConfig,
    apply_lora,
    count_params,
    lora_pairs,
    merge_lora,
    without_dropout,
)
from mistral_nnx.train.step import OptimConfig, Trainer

RANK, ALPHA = 4, 12.0  # alpha / r = 3: a scaling bug cannot pass
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
GATHERED, DENSE, CHUNKED = (1, 2), (2, 11), (1, 300)


@nnx.jit
def logits(model: mistral_nnx.Mistral, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def _ids(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 211, shape).astype(np.int32)


def _ours(model: mistral_nnx.Mistral, ids: np.ndarray) -> np.ndarray:
    return np.asarray(logits(model, jnp.asarray(ids)))


def _theirs(pm: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return pm(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _hf(directory: Path) -> Any:
    import transformers as tf

    return tf.MixtralForCausalLM.from_pretrained(directory).float().eval()


def _randomise(model: mistral_nnx.Mistral, seed: int) -> None:
    """Every adapter (A and B) random: separate gate / up adapters, nothing PEFT-shaped."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            value = 0.1 * rng.standard_normal(var.get_value().shape)
            var.set_value(jnp.asarray(value, jnp.float32))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, mistral_nnx.Mistral]:
    from test_mixtral import build_mixtral

    directory = tmp_path_factory.mktemp("moelora") / "base"
    build_mixtral(directory, seed=2, sliding_window=None, num_local_experts=8)
    return directory, mistral_nnx.load_model(directory, progress=False)


def test_b_zero_is_the_base_model_and_counts(mixtral: tuple[Path, Any]) -> None:
    _, base = mixtral
    c = base.config
    model = apply_lora(base, LoraConfig(rank=RANK, alpha=ALPHA))  # the seven default targets
    layers = range(c.num_layers)
    kinds = ("attn/wk", "attn/wo", "attn/wq", "attn/wv", "mlp/down", "mlp/gate", "mlp/up")
    assert sorted(lora_pairs(model)) == [f"layers/{i}/{k}" for i in layers for k in kinds]
    e, d, m = c.num_experts, c.hidden_size, c.intermediate_size
    a, b = lora_pairs(model)["layers/0/mlp/down"]
    assert a.shape == (e, m, RANK) and b.shape == (e, RANK, d) and a.dtype == jnp.float32
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attention = (d + q) + 2 * (d + kv) + (q + d)
    experts = 3 * e * (d + m)  # gate, up: E * (D + M) * r; down: E * (M + D) * r
    assert count_params(model, nnx.LoRAParam) == c.num_layers * (attention + experts) * RANK
    for shape in (GATHERED, DENSE, CHUNKED):
        ids = _ids(shape)
        np.testing.assert_array_equal(_ours(model, ids), _ours(base, ids))


def test_same_function_as_peft(mixtral: tuple[Path, Any]) -> None:
    """PEFT's adapters (random A and B) copied into ours: PEFT's logits, on both paths."""
    import peft
    import torch

    directory, base = mixtral
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=ATTENTION,
        target_parameters=["gate_up_proj", "down_proj"],
    )
    pm = peft.get_peft_model(_hf(directory), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # B = 0 at init: make the adapters matter
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    pm.eval()
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    model = apply_lora(base, LoraConfig(rank=RANK, alpha=ALPHA))
    set_peft_tensors(model, peft_lora_tensors(pm), "peft")
    for shape in (GATHERED, DENSE, CHUNKED):
        ids = _ids(shape)
        want = _theirs(pm, ids)
        np.testing.assert_allclose(_ours(model, ids), want, atol=1e-4, rtol=1e-4)
        assert np.abs(want - _ours(base, ids)).max() > 1e-1  # the adapters matter
    # PEFT's gate_up adapter shares A between gate and up: per layer, one A [E * r, D] fewer
    c = base.config
    shared = c.num_layers * c.num_experts * c.hidden_size * RANK
    assert count_params(model, nnx.LoRAParam) == trainable + shared


@pytest.mark.parametrize(
    "targets",
    [
        ("q", "k", "v", "o", "gate", "up", "down"),
        ("v", "gate"),  # gate only: exported at rank r with zero up rows
        (r"layers/1/mlp/(up|down)",),  # experts only, one layer
    ],
)
def test_export_peft_load_model_and_merge(
    mixtral: tuple[Path, Any], tmp_path: Path, targets: tuple[str, ...]
) -> None:
    """Our independent gate / up / down adapters exported: PeftModel.from_pretrained and
    load_model(adapters=...) give our un-merged model's logits, and so does merge_lora."""
    import peft

    directory, base = mixtral
    lora = LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
    model = apply_lora(base, lora)
    _randomise(model, seed=len(targets))
    out = save_adapters(model, lora, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(_hf(directory), out).eval()
    loaded = mistral_nnx.load_model(directory, adapters=out, progress=False)
    merged = merge_lora(model, lora.scaling)
    for shape in (GATHERED, DENSE):
        ids = _ids(shape, seed=3)
        ours = _ours(model, ids)
        assert np.abs(ours - _ours(base, ids)).max() > 1e-1
        np.testing.assert_allclose(_theirs(pm, ids), ours, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(_ours(loaded, ids), ours, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(_ours(merged, ids), ours, atol=1e-4, rtol=1e-4)


def test_transformers4_per_expert_adapters_load(mixtral: tuple[Path, Any], tmp_path: Path) -> None:
    """An adapter written for transformers 4's per-expert modules (target_modules w1, w3, w2;
    one A, B per expert): PEFT on transformers 5 converts it; load_model reads it as ours."""
    import json

    import peft
    from safetensors.numpy import save_file

    directory, base = mixtral
    lora = LoraConfig(rank=RANK, alpha=ALPHA, targets=("q", "gate", "up", "down"))
    model = apply_lora(base, lora)
    _randomise(model, seed=7)
    tensors = {}
    for key, (a, b) in lora_pairs(model).items():
        _, i, part, weight = key.split("/")
        prefix = f"base_model.model.model.layers.{i}."
        if part == "attn":
            tensors[f"{prefix}self_attn.q_proj.lora_A.weight"] = np.asarray(a).T.copy()
            tensors[f"{prefix}self_attn.q_proj.lora_B.weight"] = np.asarray(b).T.copy()
            continue
        w = {"gate": "w1", "up": "w3", "down": "w2"}[weight]
        for j in range(base.config.num_experts):
            name = f"{prefix}block_sparse_moe.experts.{j}.{w}"
            tensors[f"{name}.lora_A.weight"] = np.asarray(a[j]).T.copy()  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.asarray(b[j]).T.copy()  # [out, r]
    out = tmp_path / "v4"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0}
    config["target_modules"] = ["q_proj", "w1", "w2", "w3"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    pm = peft.PeftModel.from_pretrained(_hf(directory), out).eval()
    loaded = mistral_nnx.load_model(directory, adapters=out, progress=False)
    for shape in (GATHERED, DENSE):
        ids = _ids(shape, seed=5)
        ours = _ours(model, ids)
        np.testing.assert_allclose(_theirs(pm, ids), ours, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(_ours(loaded, ids), ours, atol=1e-4, rtol=1e-4)


def test_training_changes_only_adapters(mixtral: tuple[Path, Any], tmp_path: Path) -> None:
    """A few steps (expert dropout on) lower the loss and change only the adapters; the
    checkpoint restores them; without_dropout makes the model deterministic again."""
    _, base = mixtral
    lora = LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.3, targets=("gate", "up", "down"))
    model = apply_lora(base, lora)
    frozen = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    before = {k: np.asarray(a) for k, (a, _) in lora_pairs(model).items()}
    trainer = Trainer(model, OptimConfig(steps=6, lr=1e-2, warmup=0, schedule="constant"))
    ids = _ids((2, 12), seed=4)
    batch = {"tokens": ids, "loss_mask": np.ones(ids.shape, bool)}
    losses = [trainer.step(batch)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0]
    trained = trainer.model
    state = nnx.to_flat_state(nnx.state(trained, nnx.Param))
    for path, var in state:
        if not isinstance(var, nnx.LoRAParam):
            np.testing.assert_array_equal(np.asarray(var[...]), frozen[path], err_msg=str(path))
    for key, (a, b) in lora_pairs(trained).items():
        assert not np.array_equal(np.asarray(a), before[key]) and np.abs(b).max() > 0, key
    # dropout on the experts' adapters: two training-mode calls differ, evaluation does not
    tokens = jnp.asarray(ids)
    assert not np.array_equal(logits(trained, tokens), logits(trained, tokens))
    evaluated = without_dropout(trained)
    np.testing.assert_array_equal(logits(evaluated, tokens), logits(evaluated, tokens))
    # a checkpoint holds the expert adapters
    save_checkpoint(tmp_path, 6, trainer.state, nnx.LoRAParam, {})
    fresh = Trainer(apply_lora(base, lora, seed=9), OptimConfig(steps=6))
    restore_checkpoint(tmp_path, fresh.state, nnx.LoRAParam)
    for key, (a, b) in lora_pairs(fresh.model).items():
        np.testing.assert_array_equal(a, lora_pairs(trained)[key][0], err_msg=key)
        np.testing.assert_array_equal(b, lora_pairs(trained)[key][1], err_msg=key)


def test_bad_input(mixtral: tuple[Path, Any], tmp_path: Path) -> None:
    _, base = mixtral
    for targets in (("lm_head",), (r"layers/\d+/mlp/router",)):
        with pytest.raises(mistral_nnx.MistralNNXError, match="match no weight"):
            apply_lora(base, LoraConfig(targets=targets))
    with pytest.raises(mistral_nnx.MistralNNXError, match="QLoRA on mixture-of-experts"):
        apply_lora(base, LoraConfig(quant="nf4", quant_block=16))
    # a PEFT gate_up adapter whose up half is not zero cannot go into a gate-only model
    both = apply_lora(base, LoraConfig(rank=RANK, alpha=ALPHA, targets=("gate", "up")))
    _randomise(both, seed=0)
    out = save_adapters(both, LoraConfig(rank=RANK, alpha=ALPHA), tmp_path / "a")
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    gate_only = apply_lora(base, LoraConfig(rank=2 * RANK, alpha=ALPHA, targets=("gate",)))
    with pytest.raises(mistral_nnx.MistralNNXError, match="cannot express"):
        set_peft_tensors(gate_only, tensors, "adapter")
