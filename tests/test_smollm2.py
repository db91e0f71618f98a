"""The real model: SmolLM2-135M-Instruct GGUF, this project vs transformers on the same file."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral_nnx as mn
from mistral_nnx.engine import generate
from mistral_nnx.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return mn.load_model(smollm2_path, progress=False), load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, local_files_only=True
    )


def test_chat_prompt_ids_identical(ours, hf_tokenizer):
    _, tokenizer = ours
    ref = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert tokenizer.encode_chat(MESSAGES) == list(ref)


def test_logits_agree_on_chat_prompt(ours, smollm2_hf):
    model, tokenizer = ours
    ids = tokenizer.encode_chat(MESSAGES)
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0].numpy()
    out = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
    assert np.abs(out - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def hf_greedy32(ours, smollm2_hf):
    """transformers' 32 greedy tokens for the chat prompt, EOS ignored."""
    _, tokenizer = ours
    ids = tokenizer.encode_chat(MESSAGES)
    with torch.no_grad():
        return smollm2_hf.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :].tolist()


def test_greedy_32_tokens_identical(ours, hf_greedy32):
    model, tokenizer = ours
    ids = tokenizer.encode_chat(MESSAGES)
    ref = hf_greedy32
    # Ignore EOS so both run the full 32 steps.
    model_eos = model.config.eos_token_ids
    model.config = model.config.replace(eos_token_ids=())
    try:
        out = generate(model, [ids], max_new_tokens=32)[0]
    finally:
        model.config = model.config.replace(eos_token_ids=model_eos)
    assert out.tokens == ref
    assert "Paris" in tokenizer.decode(out.tokens)


@pytest.mark.parametrize("decode_steps", [3, 32])
def test_stop_strings_cut_text_and_tokens(ours, decode_steps):
    """A stop string ends generation: the text stops before it, no streamed piece ever showed
    part of it, and the tokens end at the one that completed it."""
    from mistral_nnx.engine import EngineOptions, stream

    model, tokenizer = ours
    ids = tokenizer.encode_chat(MESSAGES)
    options = EngineOptions(decode_steps=decode_steps)
    free = generate(model, [ids], tokenizer=tokenizer, max_new_tokens=24, options=options)[0]
    text = free.text
    assert text is not None and len(text) > 12
    stop = text[8:11]  # three characters from the middle of the answer
    cut = text.find(stop)
    pieces = []
    out = None
    for delta in stream(
        model, [ids], tokenizer=tokenizer, max_new_tokens=24, stop=stop, options=options
    ):
        pieces.append(delta.text or "")
    out = generate(
        model, [ids], tokenizer=tokenizer, max_new_tokens=24, stop=[stop, "zzqx"], options=options
    )[0]
    assert "".join(pieces) == text[:cut] == out.text
    assert out.finish_reason == "stop"
    # The tokens end exactly where the decoded text first contains the stop string.
    n = len(out.tokens)
    assert out.tokens == free.tokens[:n]
    assert stop in tokenizer.decode(out.tokens) and stop not in tokenizer.decode(out.tokens[:-1])


def test_stop_strings_match_transformers(ours, smollm2_hf, hf_tokenizer, hf_greedy32):
    """generate(stop=...) against transformers' generate(stop_strings=...): the same tokens
    (ending with the one that completed the stop string), and our text is transformers' text
    cut before the stop. Stops inside one token, across two tokens, and the earliest of a list."""
    model, tokenizer = ours
    ids = tokenizer.encode_chat(MESSAGES)
    answer = hf_greedy32[: hf_greedy32.index(2)]  # up to <|im_end|>
    pieces = [hf_tokenizer.decode([t]) for t in answer]
    text = "".join(pieces)
    long = max(range(len(pieces) - 1), key=lambda i: len(pieces[i]))
    boundary = len("".join(pieces[:2]))
    assert len(pieces[long]) >= 4 and len(text) > boundary + 4
    stops = [
        [pieces[long][1:3]],  # inside one token
        [text[boundary - 1 : boundary + 2]],  # across two tokens
        ["zzqx", text[-4:-1], text[boundary + 1 : boundary + 4]],  # the earliest of a list
    ]
    for stop in stops:
        with torch.no_grad():
            ref = smollm2_hf.generate(
                torch.tensor([ids]),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=2,
                stop_strings=stop,
                tokenizer=hf_tokenizer,
            )[0, len(ids) :].tolist()
        assert len(ref) < len(answer), stop
        out = generate(model, [ids], tokenizer=tokenizer, max_new_tokens=24, stop=stop)[0]
        assert out.tokens == ref, stop
        ref_text = hf_tokenizer.decode(ref, skip_special_tokens=True)
        cut = min(i for s in stop if (i := ref_text.find(s)) >= 0)
        assert out.text == ref_text[:cut] and out.finish_reason == "stop", stop


def test_convert_gguf_to_orbax_keeps_tokenizer(ours, smollm2_path, tmp_path):
    from mistral_nnx.cli import main

    model, tokenizer = ours
    assert main(["convert", str(smollm2_path), str(tmp_path / "smol")]) == 0
    converted = mn.load_model(tmp_path / "smol", progress=False)
    carried = load_tokenizer(tmp_path / "smol")
    ids = tokenizer.encode_chat(MESSAGES)
    assert carried.encode_chat(MESSAGES) == ids
    assert carried.eos_ids == tokenizer.eos_ids
    a = generate(model, [ids], tokenizer=tokenizer, max_new_tokens=12)[0]
    b = generate(converted, [ids], tokenizer=carried, max_new_tokens=12)[0]
    assert a.tokens == b.tokens and a.text == b.text


def test_convert_gguf_to_aligned_safetensors(ours, smollm2_path, tmp_path):
    """convert --format safetensors: an HF directory whose every weight loads without a copy
    (mapped from the file), the same weights as the GGUF's, and its tokenizer carried; a second
    convert replaces a directory it wrote, never one holding anything else."""
    import jax
    from file_maps import file_maps
    from flax import nnx

    from mistral_nnx.cli import main

    model, tokenizer = ours
    dst = tmp_path / "smol"
    convert = ["convert", "--format", "safetensors", str(smollm2_path), str(dst)]
    assert main(convert) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in dst.iterdir()}
    converted = mn.load_model(dst, progress=False)
    maps = file_maps(dst / "model.safetensors")
    params = jax.tree.leaves(nnx.state(converted, nnx.Param))
    copied = [
        p.shape
        for p in params
        if not any(lo <= p.unsafe_buffer_pointer() < hi for lo, hi, _ in maps)
    ]
    assert not copied, f"{len(copied)} of {len(params)} weights were copied"
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), params, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    carried = load_tokenizer(dst)
    assert carried.encode_chat(MESSAGES) == tokenizer.encode_chat(MESSAGES)
    assert carried.eos_ids == tokenizer.eos_ids
    assert main([*convert, "--overwrite"]) == 0
    (dst / "notes.txt").write_text("mine")
    assert main([*convert, "--overwrite"]) == 2
    assert (dst / "notes.txt").read_text() == "mine"
