"""LoRA through qwix: counts, targets, float32 adapters, step-0 equivalence, and the same
function as HF PEFT (scaling alpha / r, layouts) on a tiny random checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_nnx
from mistral_nnx.cache import init_cache
from mistral_nnx.model import _weight_first
from mistral_nnx.train.export import peft_tensors, set_peft_tensors
from mistral_nnx.train.lora import (
    ATTENTION_TARGETS,
    LoraConfig,
    apply_lora,
    count_params,
    lora_pairs,
)

TINY = mistral_nnx.MistralConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, layer_windows=(None, 4),
)  # fmt: skip
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)


@nnx.jit
def logits(model: mistral_nnx.Mistral, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def test_mistral_7b_rank16_all_projections_trains_41943040_params() -> None:
    """The issue's figure for Mistral-7B (32 layers); counted on 4 of its layers (tracing all
    32 costs half a minute), per-layer counts being identical."""
    config = mistral_nnx.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=4,
        num_heads=32, num_kv_heads=8, head_dim=128, layer_windows=(4096,) * 4,
    )  # fmt: skip
    model = apply_lora(mistral_nnx.Mistral(config, abstract=True), LoraConfig(16, 32))
    assert count_params(model, nnx.LoRAParam) == 41_943_040 * 4 // 32


def test_targets_rank_and_float32_adapters_on_bfloat16_base() -> None:
    base = mistral_nnx.Mistral(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = apply_lora(base, LoraConfig(rank=4, alpha=8, targets=("q", "down")))
    pairs = lora_pairs(model)
    assert sorted(pairs) == [f"layers/{i}/{w}" for i in (0, 1) for w in ("attn/wq", "mlp/down")]
    for a, b in pairs.values():
        assert a.dtype == b.dtype == jnp.float32 and a.shape[-1] == b.shape[0] == 4
    assert base.layers[0].attn.wq[...].dtype == jnp.bfloat16
    # step 0 (B = 0): the same logits as the base model, bit for bit
    np.testing.assert_array_equal(logits(model, TOKENS), logits(base, TOKENS))
    regex = apply_lora(base, LoraConfig(rank=2, alpha=2, targets=(r"layers/1/attn/w[qv]",)))
    assert sorted(lora_pairs(regex)) == ["layers/1/attn/wq", "layers/1/attn/wv"]


def test_step0_equivalence_float32() -> None:
    base = mistral_nnx.Mistral(TINY)
    model = apply_lora(base, LoraConfig(rank=8, alpha=16))
    assert len(lora_pairs(model)) == 14
    np.testing.assert_array_equal(logits(model, TOKENS), logits(base, TOKENS))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(targets=("(",)), "regex"),
    ],
)
def test_bad_lora_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(mistral_nnx.MistralNNXError, match=message):
        LoraConfig(**kwargs)


def test_target_matching_nothing_is_an_error() -> None:
    with pytest.raises(mistral_nnx.MistralNNXError, match="match no weight"):
        apply_lora(mistral_nnx.Mistral(TINY), LoraConfig(targets=("lm_head",)))


def test_eager_call_is_refused() -> None:
    model = apply_lora(mistral_nnx.Mistral(TINY), LoraConfig(rank=2, alpha=2))
    with pytest.raises(mistral_nnx.MistralNNXError, match="jit"):
        model(TOKENS)


def test_cached_forward_applies_the_adapters_at_a_few_rows() -> None:
    """The engine's path (a forward with a cache) at 18 rows, where a plain model's layers take
    weight-first products (DecoderLayer: weight_first) that qwix would not recognise: an adapted
    layer keeps x @ W.T, so the logits equal the full forward's (which test_same_function_as_peft
    ties to PEFT) and differ from the base model's."""
    base = mistral_nnx.Mistral(TINY)
    model = apply_lora(base, LoraConfig(rank=4, alpha=8))
    adapters = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(
        model, jax.tree.map(lambda v: 0.1 * jax.random.normal(next(keys), v.shape), adapters)
    )

    @nnx.jit
    def cached(model: mistral_nnx.Mistral, tokens: jax.Array) -> jax.Array:
        cache = init_cache(model.config, tokens.shape[0], 16)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.forward(tokens, positions, None, cache)[0]

    def layer_weights(m: mistral_nnx.Mistral) -> Any:
        return (v for _, v in nnx.to_flat_state(nnx.state(m.layers[0])))

    assert _weight_first(layer_weights(base), None)  # the plain model takes them on CPU
    assert not _weight_first(layer_weights(model), None)
    full = logits(model, TOKENS)
    np.testing.assert_allclose(cached(model, TOKENS), full, atol=1e-5)
    assert np.abs(np.asarray(full - logits(base, TOKENS))).max() > 1e-2


PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(
    directory: Path, hf: Any, rank: int, alpha: float, seed: int = 0, targets: Any = None
) -> Any:
    import peft
    import torch

    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or PEFT_TARGETS
    )
    model = peft.get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init: make the adapters matter
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def peft_lora_tensors(pm: Any) -> dict[str, np.ndarray]:
    """A PEFT model's adapter tensors under the names our export uses (no ".default")."""
    return {
        k.replace(".default", ""): v.detach().numpy()
        for k, v in pm.state_dict().items()
        if "lora_" in k
    }


def test_same_function_as_peft(tmp_path: Path) -> None:
    """PEFT adapters copied into ours: same logits, and our export reads back PEFT's tensors."""
    import torch
    from conftest import build_hf

    hf = build_hf("mistral", tmp_path / "base", seed=3, sliding_window=4, num_hidden_layers=2)
    rank, alpha = 4, 12.0  # alpha / r = 3: a scaling bug (alpha, or 1) cannot pass
    pm = peft_model(tmp_path / "base", hf, rank, alpha)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    base = mistral_nnx.load_model(tmp_path / "base", progress=False)
    model = apply_lora(base, LoraConfig(rank=rank, alpha=alpha))
    assert count_params(model, nnx.LoRAParam) == trainable
    theirs = peft_lora_tensors(pm)
    set_peft_tensors(model, theirs, "peft")
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = pm(torch.tensor(ids)).logits.numpy()
    got = np.asarray(logits(model, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    back = peft_tensors(model)
    assert sorted(back) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(back[k], v)


def test_mixtral_attention_lora_same_function_as_peft(tmp_path: Path) -> None:
    """Mixtral with adapters on the attention projections only (the experts' adapters:
    tests/test_lora_moe.py): B = 0 gives the base logits, PEFT's adapters copied in give PEFT's
    logits; QLoRA on experts is refused."""
    import torch
    from test_mixtral import build_mixtral

    hf = build_mixtral(tmp_path / "base", seed=2, sliding_window=None)
    rank, alpha = 4, 12.0
    base = mistral_nnx.load_model(tmp_path / "base", progress=False)
    model = apply_lora(base, LoraConfig(rank=rank, alpha=alpha, targets=ATTENTION_TARGETS))
    layers = range(base.config.num_layers)
    assert sorted(lora_pairs(model)) == [f"layers/{i}/attn/w{x}" for i in layers for x in "koqv"]
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 11))
    tokens = jnp.asarray(ids, jnp.int32)
    np.testing.assert_array_equal(logits(model, tokens), logits(base, tokens))
    pm = peft_model(tmp_path / "base", hf, rank, alpha, targets=PEFT_TARGETS[:4])
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert count_params(model, nnx.LoRAParam) == trainable
    theirs = peft_lora_tensors(pm)
    set_peft_tensors(model, theirs, "peft")
    with torch.no_grad():
        want = pm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits(model, tokens), want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - np.asarray(logits(base, tokens))).max() > 1e-2  # the adapters matter
    # it trains (a few steps lower the loss) and the merged model is the same function
    from mistral_nnx.train.lora import merge_lora
    from mistral_nnx.train.step import OptimConfig, Trainer

    trainer = Trainer(model, OptimConfig(steps=5, lr=1e-2, warmup=0, schedule="constant"))
    batch = {"tokens": ids.astype(np.int32), "loss_mask": np.ones(ids.shape, bool)}
    losses = [trainer.step(batch)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    trained = trainer.model
    np.testing.assert_allclose(
        logits(merge_lora(trained, alpha / rank), tokens), logits(trained, tokens), atol=1e-4
    )
    with pytest.raises(mistral_nnx.MistralNNXError, match="QLoRA on mixture-of-experts"):
        apply_lora(base, LoraConfig(quant="nf4", quant_block=16))


def test_trainer_state_views_are_read_back() -> None:
    """Trainer keeps flat arrays between steps; its .state view may be changed in place (as a
    checkpoint restore does) or assigned, and the next step reads the change; a state of
    another structure is refused."""
    from mistral_nnx.train.step import OptimConfig, Trainer

    def trainer() -> Trainer:
        model = apply_lora(mistral_nnx.Mistral(TINY), LoraConfig(rank=4, alpha=8))
        return Trainer(model, OptimConfig(steps=3, lr=1e-2, warmup=0, schedule="constant"))

    batch = {"tokens": np.asarray(TOKENS), "loss_mask": np.ones(TOKENS.shape, bool)}
    a, b = trainer(), trainer()
    a.step(batch)
    view = b.state  # b's adapters and optimizer moments set in place to a's
    for (_, mine), (_, theirs) in zip(
        nnx.to_flat_state(view), nnx.to_flat_state(a.state), strict=True
    ):
        mine.set_value(theirs.get_value().copy())  # copies: a step donates its state
    assert b.step(batch)["loss"] == a.step(batch)["loss"]
    fresh = trainer()
    fresh.state = jax.tree.map(lambda x: x.copy(), a.state)
    assert fresh.step(batch)["loss"] == a.step(batch)["loss"]
    with pytest.raises(mistral_nnx.MistralNNXError, match="structure differs"):
        fresh.state = trainer().frozen
