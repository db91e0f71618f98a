"""The Python API's promises: every user error is a MistralNNXError, seeded sampling is per row,
and stop token ids and stop strings are cut from the text alike."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import mistral_nnx as mn
from mistral_nnx.engine import EngineOptions, generate
from mistral_nnx.errors import MistralNNXError


@pytest.fixture(scope="module")
def tiny(hf_checkpoints) -> Any:
    directory, _ = hf_checkpoints["gqa_window16"]
    return mn.load_model(directory, progress=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> tuple[Any, Any]:
    return mn.load_model(smollm2_path, progress=False), mn.load_tokenizer(smollm2_path)


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).randint(3, 200, n).tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=2**70), "seed must be in [0, 2**64)"),
        (dict(seed=-1), "seed must be in [0, 2**64)"),
        (dict(seed=None), "seed must be an integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=[1, 2, 3]), "a list of 1 integers"),
        (dict(stop=5), "stop must be a string"),
        (dict(stop=[1.5]), "stop entries must be strings or token-id lists"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be a positive integer"),
        (dict(options=EngineOptions(max_seq_len=10**6)), "exceeds the model's context length"),
        (dict(options="fast"), "options must be an EngineOptions"),
        (dict(top_k=2.5, temperature=1.0), "top_k must be an int"),
    ],
)
def test_bad_arguments_raise_our_error(tiny, kwargs, message):
    with pytest.raises(MistralNNXError, match=re.escape(message)):
        generate(tiny, [[5, 6, 7]], **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[5.0, 6.0]], "token ids must be integers"),
        ([["5", "6"]], "token ids must be integers"),
        ([[True, 5]], "token ids must be integers"),
        ([5], "must be a string or a list of token ids"),
        ([[]], "is empty"),
        ("hello", "non-empty list"),
    ],
)
def test_bad_prompts_raise_our_error(tiny, prompts, message):
    with pytest.raises(MistralNNXError, match=message):
        generate(tiny, prompts, max_new_tokens=4)


def test_load_model_of_none():
    with pytest.raises(MistralNNXError, match="source must be a path"):
        mn.load_model(None)  # type: ignore[arg-type]


def test_text_with_lone_surrogates(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(MistralNNXError, match="not valid"):
        generate(model, ["Caf\udce9"], tokenizer=tokenizer, max_new_tokens=2)
    with pytest.raises(MistralNNXError, match="not valid"):
        tokenizer.encode("Caf\udce9")


def test_seeded_rows_are_independent_of_the_batch(tiny):
    a, b, c = _prompt(7, 1), _prompt(12, 2), _prompt(3, 3)
    kw: dict[str, Any] = dict(max_new_tokens=12, temperature=1.5)
    # One seed: row i depends on (seed, i) and its prompt only.
    first = generate(tiny, [a, b], seed=5, **kw)
    second = generate(tiny, [a, c], seed=5, **kw)
    assert first[0].tokens == second[0].tokens
    assert first[0].tokens != first[1].tokens or a == b  # rows draw from different streams
    # One seed per prompt: a request's output does not depend on its neighbours or position.
    batched = generate(tiny, [c, a, b], seed=[9, 4, 7], **kw)
    alone = generate(tiny, [a], seed=[4], **kw)
    assert batched[1].tokens == alone[0].tokens
    assert generate(tiny, [a], seed=4, **kw)[0].tokens == alone[0].tokens
    assert generate(tiny, [a], seed=[5], **kw)[0].tokens != alone[0].tokens


def test_seeds_beyond_32_bits_are_distinct(tiny):
    kw: dict[str, Any] = dict(max_new_tokens=16, temperature=2.0)
    low = generate(tiny, [_prompt(5, 4)], seed=1, **kw)[0].tokens
    high = generate(tiny, [_prompt(5, 4)], seed=1 + 2**32, **kw)[0].tokens
    assert low != high  # jax.random.key(seed) alone would wrap 2**32 + 1 to 1


@pytest.mark.parametrize("decode_steps", [1, 32])
def test_stop_tokens_and_stop_strings_cut_alike(smollm2, decode_steps):
    model, tokenizer = smollm2
    options = EngineOptions(decode_steps=decode_steps)
    prompt = ["Once upon a time, in a small village,"]
    free = generate(model, prompt, tokenizer=tokenizer, max_new_tokens=24, options=options)[0]
    tokens = free.tokens
    k = next(
        i
        for i in range(4, 20)
        if tokenizer.decode(tokens[: i + 2]).startswith(tokenizer.decode(tokens[:i]))
        and tokenizer.decode(tokens[:i]).strip()
    )
    before = tokenizer.decode(tokens[:k])
    stop_text = tokenizer.decode(tokens[: k + 2])[len(before) :]
    assert stop_text and stop_text not in before
    by_tokens = generate(
        model,
        prompt,
        tokenizer=tokenizer,
        max_new_tokens=24,
        stop=[tokens[k : k + 2]],
        options=options,
    )[0]
    by_string = generate(
        model, prompt, tokenizer=tokenizer, max_new_tokens=24, stop=[stop_text], options=options
    )[0]
    for out in (by_tokens, by_string):
        assert out.finish_reason == "stop"
        assert out.text == before
        assert out.tokens == tokens[: k + 2]
    # Streamed pieces add up to the same text, never showing the stop's first token.
    pieces = [
        d.text
        for d in mn.stream(
            model,
            prompt,
            tokenizer=tokenizer,
            max_new_tokens=24,
            stop=[tokens[k : k + 2]],
            options=options,
        )
    ]
    assert "".join(p or "" for p in pieces) == before


def test_eos_is_cut_from_text_but_kept_in_tokens(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    out = generate(model, [ids], tokenizer=tokenizer, max_new_tokens=64)[0]
    assert out.finish_reason == "stop" and out.tokens[-1] in tokenizer.eos_ids
    assert out.text == tokenizer.decode(out.tokens[:-1])
