"""JSONL -> token batches.

Records are `{"messages": [{"role": ..., "content": ...}, ...]}` (a conversation ending with an
assistant turn) or `{"text": "..."}`. A conversation is tokenized exactly as `mistral-nnx chat`
would send it: each assistant turn follows `tokenizer.encode_chat(messages before it)`, and its
reply tokens plus the end-of-sequence token are the only targets. A text record is BOS + text +
EOS, all targets.

Batches are length-bucketed rather than packed: the model's attention has no document
boundaries, so packing several records in one row would let them see each other. Examples are
shuffled from a seed, grouped by length in windows of `BUCKET_WINDOW` batches, padded (on the
right) to the smallest of a few lengths, and the batches shuffled again: the order is a pure
function of (file, seed, epoch), so a resumed run can skip to any batch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.tokenizer import Tokenizer

BUCKET_WINDOW = 16  # batches sorted by length together
ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    targets: np.ndarray  # bool [n]: token i is predicted and counted


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; one clear error for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise MistralNNXError(f"{path}: data file not found")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MistralNNXError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not ("messages" in record or "text" in record):
                raise MistralNNXError(
                    f"{path}:{number}: expected an object with 'messages' or 'text'"
                )
            records.append((number, record))
    if not records:
        raise MistralNNXError(f"{path}: no records")
    return records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise MistralNNXError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, Mapping)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise MistralNNXError(
                f"{where}: message {i} must be {{'role': one of {list(ROLES)}, "
                "'content': a string}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise MistralNNXError(f"{where}: the last message must be the assistant's")
    return out


def encode_chat_example(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], where: str
) -> Example:
    """Targets: each assistant reply + EOS, placed after the chat prompt of the turns before it."""
    eos = tokenizer.eos_ids[0]
    tokens: list[int] = []
    targets: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.encode_chat(messages[:i])
        if prompt[: len(tokens)] != tokens:
            raise MistralNNXError(
                f"{where}: the chat template renders the turns before message {i} differently "
                "once later turns follow; split this conversation into one record per reply"
            )
        reply = tokenizer.encode(m["content"], add_bos=False) + [eos]
        targets += [False] * (len(prompt) - len(tokens)) + [True] * len(reply)
        tokens = prompt + reply
    return Example(np.asarray(tokens, np.int32), np.asarray(targets, bool))


def encode_text_example(tokenizer: Tokenizer, text: Any, where: str) -> Example:
    if not isinstance(text, str) or not text:
        raise MistralNNXError(f"{where}: 'text' must be a non-empty string")
    tokens = tokenizer.encode(text, add_bos=True) + [tokenizer.eos_ids[0]]
    return Example(np.asarray(tokens, np.int32), np.ones(len(tokens), bool))


def load_examples(path: str | Path, tokenizer: Tokenizer, seq_len: int) -> list[Example]:
    """Every record of the file, tokenized and cut to seq_len tokens."""
    examples = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in record:
            messages = _check_messages(record["messages"], where)
            try:
                ex = encode_chat_example(tokenizer, messages, where)
            except MistralNNXError as e:
                msg = str(e)
                raise MistralNNXError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        else:
            ex = encode_text_example(tokenizer, record["text"], where)
        ex = Example(ex.tokens[:seq_len], ex.targets[:seq_len])
        if not ex.targets[1:].any():
            raise MistralNNXError(f"{where}: nothing to learn within --seq-len {seq_len} tokens")
        examples.append(ex)
    return examples


def bucket_lengths(seq_len: int, smallest: int = 32) -> list[int]:
    """Padded lengths: powers of two from `smallest`, then seq_len (few shapes, few compiles)."""
    sizes = []
    n = smallest
    while n < seq_len:
        sizes.append(n)
        n *= 2
    return sizes + [seq_len]


def epoch_batches(
    examples: Sequence[Example], batch_size: int, seq_len: int, seed: int, epoch: int
) -> list[list[int]]:
    """The example indices of each batch of one epoch (the last partial batch is dropped
    unless it is the only one)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    window = batch_size * BUCKET_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].tokens))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size] or batches[:1]
    return [full[i] for i in rng.permutation(len(full))]


def collate(
    examples: Sequence[Example], indices: Sequence[int], batch_size: int, seq_len: int
) -> dict[str, np.ndarray]:
    """Right-padded arrays; a short batch is filled with fully masked rows."""
    longest = max(len(examples[i].tokens) for i in indices)
    length = next(n for n in bucket_lengths(seq_len) if n >= longest)
    tokens = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), bool)
    valid = np.zeros((batch_size, length), bool)
    for row, i in enumerate(indices):
        ex = examples[i]
        n = len(ex.tokens)
        tokens[row, :n], mask[row, :n], valid[row, :n] = ex.tokens, ex.targets, True
    return {"tokens": tokens, "loss_mask": mask, "valid": valid}


def batches(
    examples: Sequence[Example], batch_size: int, seq_len: int, seed: int, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """An endless, deterministic stream of batches, starting at batch number `start`."""
    per_epoch = len(epoch_batches(examples, batch_size, seq_len, seed, 0))
    epoch, skip = divmod(start, per_epoch)
    while True:
        for indices in epoch_batches(examples, batch_size, seq_len, seed, epoch)[skip:]:
            yield collate(examples, indices, batch_size, seq_len)
        epoch, skip = epoch + 1, 0
