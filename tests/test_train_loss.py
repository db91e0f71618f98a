"""mistral_nnx.loss and its gradients against transformers (float32, tiny random checkpoints)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_nnx
from mistral_nnx.checkpoint import names


def make_batch(vocab: int, seed: int = 0, b: int = 2, t: int = 40) -> dict[str, np.ndarray]:
    """Random tokens; row 1 right-padded; a prompt (not a target) then random target holes."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    valid = np.ones((b, t), bool)
    valid[1, t - 7 :] = False
    tokens[~valid] = 0
    mask = rng.random((b, t)) < 0.8
    mask[:, :5] = False  # a prompt
    return {"tokens": tokens, "loss_mask": mask & valid, "valid": valid}


def hf_loss_and_grads(hf: Any, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, Any]]:
    import torch

    ids = torch.tensor(batch["tokens"], dtype=torch.long)
    labels = torch.where(torch.tensor(batch["loss_mask"]), ids, torch.tensor(-100))
    attn = torch.tensor(batch["valid"], dtype=torch.long)
    hf.zero_grad()
    out = hf(input_ids=ids, attention_mask=attn, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in hf.named_parameters()}
    return float(out.loss.detach()), grads


@nnx.jit
def value_and_grad(model: mistral_nnx.Mistral, batch: dict[str, jax.Array]) -> Any:
    def f(m: mistral_nnx.Mistral) -> tuple[jax.Array, jax.Array]:
        return mistral_nnx.loss(m, batch)

    return nnx.value_and_grad(f, has_aux=True)(model)


def compare_grads(model: mistral_nnx.Mistral, ours: Any, theirs: dict[str, Any]) -> int:
    """Every HF gradient, moved to our layout with the loader's own transform, vs ours."""
    table = names.hf_table(model.config)
    flat = {path: v[...] for path, v in nnx.to_flat_state(ours)}
    checked = 0
    for name, g in theirs.items():
        found = [(row, row[0].fullmatch(name)) for row in table]
        hits = [(row, m) for row, m in found if m]
        assert hits, f"no mapping for {name}"
        (_, path_fn, transform), m = hits[0]
        path = path_fn(m)
        if path not in flat:  # a tied lm_head: HF's grad sits on the embedding
            continue
        want = np.asarray(transform(g))
        got = np.asarray(flat[path])
        scale = np.abs(want).max()
        assert scale > 0, name
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=1e-4, err_msg=name)
        checked += 1
    assert checked == len(flat), (checked, len(flat))
    return checked


@pytest.mark.parametrize("name", ["gqa_window16", "tied", "interleaved"])
def test_loss_and_grads_match_transformers(hf_checkpoints: Any, name: str) -> None:
    directory, hf = hf_checkpoints[name]
    model = mistral_nnx.load_model(directory, progress=False)
    batch = make_batch(model.config.vocab_size, seed=1)
    want, hf_grads = hf_loss_and_grads(hf, batch)
    (got, count), grads = value_and_grad(model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert int(count) == int(batch["loss_mask"][:, 1:].sum())
    assert abs(float(got) - want) < 1e-5, (float(got), want)
    compare_grads(model, grads, hf_grads)
    # Nothing to learn (all masked): zero loss and zero gradients, not NaN.
    batch["loss_mask"][:] = False
    (value, count), grads = value_and_grad(model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert float(count) == 0 and float(value) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_remat_layer_same_loss_and_grads(hf_checkpoints: Any) -> None:
    directory, hf = hf_checkpoints["gqa_window16"]
    model = mistral_nnx.load_model(directory, progress=False)
    batch = {k: jnp.asarray(v) for k, v in make_batch(model.config.vocab_size, seed=2).items()}
    (plain, _), g_plain = value_and_grad(model, batch)
    model.remat = "layer"
    (remat, _), g_remat = value_and_grad(model, batch)

    # nnx.remat really recomputes: the backward pass holds a checkpoint (remat) primitive.
    def backward_jaxpr() -> str:
        graphdef, state = nnx.split(model)

        def pure(s: Any) -> jax.Array:
            return mistral_nnx.loss(nnx.merge(graphdef, s), batch)[0]

        return str(jax.make_jaxpr(jax.grad(pure))(state))

    assert backward_jaxpr().count("remat") == model.config.num_layers
    model.remat = None
    assert "remat" not in backward_jaxpr()
    assert abs(float(plain) - float(remat)) < 1e-6
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from test_mixtral import build_mixtral

    directory = tmp_path_factory.mktemp("mixtral") / "m"
    return directory, build_mixtral(directory, seed=5, sliding_window=16)


def test_mixtral_loss_and_grads_match_transformers(tiny_mixtral: tuple[Any, Any]) -> None:
    """Router (through the renormalised top-k weights) and every expert's gradients too; 78
    tokens take the dense expert path, the one training uses."""
    directory, hf = tiny_mixtral
    model = mistral_nnx.load_model(directory, progress=False)
    assert model.config.is_moe
    batch = make_batch(model.config.vocab_size, seed=4)
    want, hf_grads = hf_loss_and_grads(hf, batch)
    (got, _), grads = value_and_grad(model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert abs(float(got) - want) < 1e-5, (float(got), want)
    theirs = {}
    for name, g in hf_grads.items():  # packed [E, 2M, D] split as the loader splits it
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, half = name[: -len("gate_up_proj")], g.shape[1] // 2
            theirs[prefix + "gate_proj"], theirs[prefix + "up_proj"] = g[:, :half], g[:, half:]
        else:
            theirs[name] = g
    # every expert of every layer learns something: none is a zero-gradient bystander
    for name, g in theirs.items():
        if ".experts." in name:
            assert (np.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0).all(), name
    compare_grads(model, grads, theirs)
