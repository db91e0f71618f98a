"""QLoRA through qwix: the base projections quantised (nf4, int4, int8), float32 adapters.

The reference base is quantised here with our own numpy code (NF4 levels of the QLoRA paper,
absmax scales per block of inputs), not with qwix: with B = 0 the QLoRA model must compute
exactly that dequantised model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import CHATS, write_jsonl, write_model

import mistral_nnx
from mistral_nnx.cli import main
from mistral_nnx.train.lora import LoraConfig, apply_lora, count_params, lora_pairs, merge_lora
from mistral_nnx.train.step import OptimConfig, Trainer

TINY = mistral_nnx.MistralConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, layer_windows=(None, 4),
)  # fmt: skip
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
BLOCK = 16
# Appendix E of the QLoRA paper (arXiv 2305.14314)
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip


def quantise(w: np.ndarray, qtype: str, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w [in, out...] -> (codes, scales [in / block, 1, out]): one absmax scale per `block`
    inputs and per output; nf4: index of the nearest NF4 level of w / absmax; intN: w / scale
    rounded, scale = absmax / (2^(N-1) - 0.5) (qwix's bound: the extreme value is a tie)."""
    blocks = w.reshape(w.shape[0] // block, block, -1)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == "nf4":
        return np.abs((blocks / absmax)[..., None] - NF4).argmin(-1).reshape(w.shape), absmax
    bits = {"int4": 4, "int8": 8}[qtype]
    scale = absmax / np.float32(2 ** (bits - 1) - 0.5)
    codes = np.clip(np.round(blocks / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return codes.reshape(w.shape), scale


def dequantise(codes: np.ndarray, scales: np.ndarray, qtype: str) -> np.ndarray:
    values = NF4[codes] if qtype == "nf4" else codes.astype(np.float32)
    blocks = values.reshape(scales.shape[0], -1, scales.shape[-1])
    return (blocks * scales).astype(np.float32).reshape(codes.shape)


def projections(model: mistral_nnx.Mistral) -> list[tuple[Any, str]]:
    return [
        (module, name)
        for layer in model.layers
        for module, names in ((layer.attn, ("wq", "wk", "wv", "wo")), (layer.mlp, MLP))
        for name in names
    ]


def compute_layout(w: np.ndarray, name: str) -> np.ndarray:
    """A weight [out..., in...] as [in, out], the layout `quantise` takes (wo [d, h, e] is
    multiplied as [d, h*e])."""
    return (w.reshape(w.shape[0], -1) if name == "wo" else w.reshape(-1, w.shape[-1])).T


def reference(base: mistral_nnx.Mistral, qtype: str, qlora: Any = None) -> mistral_nnx.Mistral:
    """A plain copy of `base` with every decoder projection quantised and dequantised by the
    numpy code above; with `qlora` (a QLoRA model of `base`), the codes are its stored ones
    (the scales still ours), which must differ from ours only at rounding ties."""
    model = nnx.clone(base)
    for (module, name), (qmodule, _) in zip(
        projections(model), projections(qlora or model), strict=True
    ):
        var = getattr(module, name)
        w = compute_layout(np.asarray(var[...]), name)
        codes, scales = quantise(w, qtype)
        if qlora is not None:
            kept = np.asarray(getattr(qmodule, name).array.qvalue[...]).astype(np.int64)
            kept = compute_layout(kept, name)
            differ = kept != codes
            if qtype == "nf4":
                assert not differ.any()
            else:  # only at rounding ties (w / scale = k + 0.5: at every block's absmax
                # element, +-(qmax + 0.5), and wherever else random weights land on one), by one
                ratio = (w.reshape(scales.shape[0], BLOCK, -1) / scales).reshape(w.shape)
                tie = np.abs(np.abs(ratio) % 1 - 0.5) < 1e-4
                assert (tie | ~differ).all() and (np.abs(kept - codes) <= 1).all()
            codes = kept
        var.set_value(jnp.asarray(dequantise(codes, scales, qtype).T.reshape(var[...].shape)))
    return model


MLP = ("gate", "up", "down")


@nnx.jit
def logits(model: mistral_nnx.Mistral, tokens: jax.Array) -> jax.Array:
    return model(tokens)


@pytest.mark.parametrize("qtype", ["nf4", "int4", "int8"])
def test_b0_logits_equal_the_dequantised_base(qtype: str) -> None:
    base = mistral_nnx.Mistral(TINY)
    model = apply_lora(base, LoraConfig(rank=4, alpha=8, quant=qtype, quant_block=BLOCK))
    assert len(lora_pairs(model)) == 14
    for a, b in lora_pairs(model).values():
        assert a.dtype == b.dtype == jnp.float32
    stored = model.layers[0].attn.wq.array.qvalue[...].dtype
    assert stored == {"nf4": jnp.uint4, "int4": jnp.int4, "int8": jnp.int8}[qtype]
    got = np.asarray(logits(model, TOKENS))
    want = np.asarray(logits(reference(base, qtype, model), TOKENS))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if qtype == "nf4":  # no rounding ties: the numpy reference alone gives the same logits
        np.testing.assert_allclose(got, logits(reference(base, qtype), TOKENS), atol=2e-5)
    # the quantisation matters at this tolerance: the unquantised base differs
    assert np.abs(np.asarray(logits(base, TOKENS)) - want).max() > 1e-2
    # merging B = 0 gives the dequantised base as a plain model
    np.testing.assert_allclose(logits(merge_lora(model, 2.0), TOKENS), want, atol=2e-5)


def test_training_lowers_the_loss_and_changes_only_adapters() -> None:
    base = mistral_nnx.Mistral(TINY)
    model = apply_lora(base, LoraConfig(rank=4, alpha=8, quant="nf4", quant_block=BLOCK))
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    trainer = Trainer(model, OptimConfig(steps=8, lr=1e-2, warmup=0, schedule="constant"))
    tokens = np.random.default_rng(1).integers(0, 64, (2, 12)).astype(np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}
    losses = [trainer.step(batch)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(trainer.model))}
    assert after.keys() == before.keys()
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    lora = {p for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert changed == lora  # every adapter trained (B, then A), nothing else
    assert any("qvalue" in map(str, p) for p in before)  # the frozen base is the quantised one
    assert count_params(model, nnx.LoRAParam) == sum(before[p].size for p in lora)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quant="nf8"), "QLoRA quantisation must be one of nf4, int4, int8, got 'nf8'"),
        (dict(quant="nf4", quant_block=0), "QLoRA block size must be a positive integer"),
    ],
)
def test_bad_qlora_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(mistral_nnx.MistralNNXError, match=message):
        LoraConfig(**kwargs)


def test_block_must_divide_the_inputs() -> None:
    with pytest.raises(
        mistral_nnx.MistralNNXError, match="block size 64 must divide .*hidden_size 32"
    ):
        apply_lora(mistral_nnx.Mistral(TINY), LoraConfig(quant="nf4"))


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    write_model(root / "base", seed=7)
    return root / "base"


def test_cli_qlora_run(cli_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "run"
    args = ["finetune", "--model", str(cli_base), "--data", str(data), "--out", str(out)]
    args += ["-q", "--qlora", "nf4", "--qlora-block", "16", "--lora-rank", "4", "--lr", "1e-2"]
    args += ["--steps", "4", "--warmup", "0", "--batch-size", "2", "--seq-len", "32"]
    assert main([*args, "--save-merged"]) == 0
    assert "trained 4 steps" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = mistral_nnx.load_model(out / "merged", progress=False)
    plain = mistral_nnx.load_model(cli_base, progress=False)
    ids = jnp.asarray(np.arange(12).reshape(1, 12), jnp.int32)
    trained = logits(merged, ids)
    # the merged model is the trained QLoRA function: dequantised base + adapters
    lora = apply_lora(plain, LoraConfig(rank=4, alpha=32, quant="nf4", quant_block=16))
    from safetensors.numpy import load_file

    from mistral_nnx.train.export import set_peft_tensors

    set_peft_tensors(lora, load_file(str(out / "adapter" / "adapter_model.safetensors")), "")
    np.testing.assert_allclose(trained, logits(lora, ids), atol=2e-5)
    assert float(jnp.abs(trained - logits(plain, ids)).max()) > 1e-3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qlora", "nf5"], "argument --qlora: invalid choice: 'nf5'"),
        (["--qlora", "nf4", "--full"], "--qlora trains LoRA adapters: it cannot be combined"),
        (["--qlora", "int4", "--qlora-block", "0"], "--qlora-block: must be a positive integer"),
        (["--qlora", "int8", "--qlora-block", "48"], "QLoRA block size 48 must divide"),
    ],
)
def test_cli_bad_qlora_one_line(
    cli_base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    args = ["finetune", "--model", str(cli_base), "--data", str(data), "--out", str(tmp_path)]
    assert main([*args, "-q", "--seq-len", "32", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mistral-nnx: error: ") and message in err


def test_resume_continues_exactly(cli_base: Path, tmp_path: Path) -> None:
    """Checkpoints hold the adapters and optimizer only: the quantised base is rebuilt from the
    base model on resume, and the loss sequence equals the uninterrupted run's."""
    import dataclasses

    from mistral_nnx.train.checkpoints import list_checkpoints
    from mistral_nnx.train.loop import FinetuneConfig, finetune

    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    cfg = FinetuneConfig(
        model=str(cli_base),
        data=str(data),
        out=str(tmp_path / "a"),
        lora=LoraConfig(rank=4, alpha=8, quant="nf4", quant_block=16),
        optim=OptimConfig(steps=4, lr=1e-2, warmup=0),
        batch_size=2,
        seq_len=32,
        save_every=2,
        progress=False,
    )
    full = finetune(cfg)
    interrupted = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    finetune(interrupted, stop_after=3)
    assert list_checkpoints(tmp_path / "b" / "checkpoints") == [2]
    resumed = finetune(dataclasses.replace(interrupted, resume=True))
    assert resumed.losses == full.losses and full.losses[-1] < full.losses[0]
