"""Sampling through generate(): token frequencies against transformers' own distribution.

The reference is transformers end to end: its logits for the prompt, warped by its Temperature /
TopK / TopP / MinP logits warpers in the order its generate() applies them, then softmax. The
first token of every row comes from the prefill, the second from the on-device decode loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import build_hf

import mistral_nnx as mn
from mistral_nnx.engine import generate

ROWS = 1500
PROMPT = [5, 17, 33, 101, 7, 64, 150, 9, 88]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A tiny model whose next-token distributions are peaked (lm_head scaled up), so that
    temperature and the filters change them a lot."""
    directory = tmp_path_factory.mktemp("peaked")
    hf = build_hf("mistral", directory, seed=11, sliding_window=16)
    with torch.no_grad():
        hf.lm_head.weight.mul_(12.0)
    hf.save_pretrained(directory)
    return hf, mn.load_model(directory, progress=False)


def _hf_probs(hf: Any, ids: list[int], temperature: float, **filters: Any) -> np.ndarray:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    with torch.no_grad():
        scores = hf(torch.tensor([ids])).logits[:, -1]
    warpers = [TemperatureLogitsWarper(temperature)]
    if filters.get("top_k"):
        warpers.append(TopKLogitsWarper(filters["top_k"]))
    if filters.get("top_p") is not None:
        warpers.append(TopPLogitsWarper(filters["top_p"]))
    if filters.get("min_p") is not None:
        warpers.append(MinPLogitsWarper(filters["min_p"]))
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, -1)[0].double().numpy()


def _check(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Tokens the reference removed never appear; every token expected at least 5 times has
    its frequency within 5 standard errors of its probability, and so do the rest, pooled."""
    counts = np.bincount(tokens, minlength=probs.size)
    assert np.all(counts[probs == 0] == 0), np.flatnonzero(counts * (probs == 0))
    common = probs * tokens.size >= 5
    bins_p = np.append(probs[common], probs[~common].sum())
    bins_f = np.append(counts[common], counts[~common].sum()) / tokens.size
    stderr = np.sqrt(bins_p * (1 - bins_p) / tokens.size)
    bad = np.flatnonzero(np.abs(bins_f - bins_p) > 5 * stderr + 1e-12)
    assert bad.size == 0, [(np.flatnonzero(common).tolist() + ["rest"])[i] for i in bad]


SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.6, top_k=4),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.3, min_p=0.15),
    dict(temperature=1.2, top_k=12, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items())
)
def test_generate_frequencies_match_transformers(peaked, setting: dict[str, Any]) -> None:
    hf, model = peaked
    out = generate(model, [PROMPT] * ROWS, max_new_tokens=2, seed=5, **setting)
    first = np.array([c.tokens[0] for c in out])
    probs = _hf_probs(hf, PROMPT, **setting)
    assert 0.05 < probs.max() < 0.9 and (probs > 0.01).sum() >= 3  # a distribution worth testing
    _check(first, probs)
    # The second token, from the decode loop, for the rows whose first token was the commonest.
    top = int(np.bincount(first).argmax())
    second = np.array([c.tokens[1] for c in out if c.tokens[0] == top])
    assert second.size > 100
    _check(second, _hf_probs(hf, PROMPT + [top], **setting))
