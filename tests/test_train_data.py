"""JSONL -> token batches: chat rendering and masks, errors naming the line, order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import CHATS, write_jsonl, write_tokenizer

from mistral_nnx import MistralNNXError, load_tokenizer
from mistral_nnx.tokenizer import Tokenizer
from mistral_nnx.train.data import batches, bucket_lengths, load_examples


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return load_tokenizer(directory)


def spans(targets: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], targets.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def test_chat_targets_are_the_assistant_replies(tokenizer: Tokenizer, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "answer briefly."},
        {"role": "user", "content": "what is the capital of france?"},
        {"role": "assistant", "content": "paris."},
        {"role": "user", "content": "count to three"},
        {"role": "assistant", "content": "one two three"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (ex,) = load_examples(path, tokenizer, seq_len=512)
    tokens = ex.tokens.tolist()
    found = spans(ex.targets)
    assert [tokenizer.decode(tokens[a:b]) for a, b in found] == ["paris.", "one two three"]
    eos = tokenizer.eos_ids[0]
    assert all(tokens[b - 1] == eos for _, b in found)  # each reply ends with EOS, a target
    # Each reply follows exactly what `mistral-nnx chat` sends for the turns before it.
    for (start, _), i in zip(found, (2, 4), strict=True):
        assert tokens[:start] == tokenizer.encode_chat(messages[:i])


def test_text_records_learn_every_token(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}])
    (ex,) = load_examples(path, tokenizer, seq_len=512)
    assert ex.tokens[0] == tokenizer.bos_id and ex.tokens[-1] == tokenizer.eos_ids[0]
    assert tokenizer.decode(ex.tokens.tolist()) == "the cat sat" and ex.targets.all()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x"}', "'messages' or 'text'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "last message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0"),
        ('{"messages": []}', "non-empty list"),
        ('{"text": ""}', "non-empty string"),
    ],
)
def test_bad_record_names_file_and_line(
    tokenizer: Tokenizer, tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(MistralNNXError, match=message) as err:
        load_examples(path, tokenizer, seq_len=64)
    assert str(err.value).startswith(f"{path}:3: ")
    assert "\n" not in str(err.value)


def test_missing_file(tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(MistralNNXError, match="not found"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, seq_len=64)


def test_batches_deterministic_resumable_bucketed(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", CHATS * 3)
    examples = load_examples(path, tokenizer, seq_len=128)

    def take(seed: int, n: int, start: int = 0) -> list[dict[str, np.ndarray]]:
        stream = batches(examples, 2, 128, seed, start=start)
        return [next(stream) for _ in range(n)]

    first, again, other = take(0, 30), take(0, 30), take(1, 30)
    same = [np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, again, strict=True)]
    assert all(same)
    assert not all(
        a["tokens"].shape == b["tokens"].shape and np.array_equal(a["tokens"], b["tokens"])
        for a, b in zip(first, other, strict=True)
    )
    resumed = take(0, 10, start=20)  # crosses an epoch boundary (12 batches per epoch)
    for a, b in zip(first[20:], resumed, strict=True):
        assert np.array_equal(a["tokens"], b["tokens"])
    for b in first:
        assert b["tokens"].shape[1] in bucket_lengths(128)
        assert not (b["loss_mask"] & ~b["valid"]).any()
    # every record of an epoch is seen exactly once
    rows = [(r, v) for b in first[:12] for r, v in zip(b["tokens"], b["valid"], strict=True)]
    seen = sorted(tuple(r[v].tolist()) for r, v in rows)
    assert seen == sorted(tuple(e.tokens.tolist()) for e in examples)
