"""The tokenizer a GGUF file describes, built with the `tokenizers` library from its metadata.

A GGUF carries no `tokenizer.json`: it stores the vocabulary, merges, token types, special ids and
chat template under llama.cpp's keys. This module builds the same `tokenizers.Tokenizer` that
transformers builds from them (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`; the tests
compare the two), without importing transformers or torch:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. Tokens not spelled in GPT-2's byte alphabet
  are re-spelled into it; the pre-tokenizer splits with the regex of `tokenizer.ggml.pre` when it
  names a known one, else GPT-2's own byte-level split.
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback and a `▁` metaspace;
  the merges come from the file or, when it has none, from the vocabulary and its scores.

Control tokens become special tokens (matched whole, dropped when decoding), user-defined tokens
plain added tokens; a BOS (and EOS) is added to each encoding as `tokenizer.ggml.add_bos_token`
(`add_eos_token`) says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from pathlib import Path
from typing import Any

from mistral_nnx.errors import MistralNNXError

__all__ = ["GGUFTokenizerParts", "build_gguf_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

# Pre-tokenizer splits by `tokenizer.ggml.pre`, for the vocabularies of Mistral-family models and
# the Llama-architecture models they are run beside. An unknown name falls back to GPT-2's split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "pixtral", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


@dataclass(frozen=True)
class GGUFTokenizerParts:
    """What `HFTokenizer` needs: the backend, named special tokens, chat template, EOS ids."""

    backend: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    eos_ids: tuple[int, ...]


def build_gguf_tokenizer(metadata: Mapping[str, Any], source: Path) -> GGUFTokenizerParts:
    """Build the tokenizer described by a GGUF's metadata (see the module docstring)."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise MistralNNXError(f"{source}: metadata 'tokenizer.ggml.tokens' is missing")
    if kind == "gpt2":
        backend = _byte_level(metadata, tokens)
    elif kind == "llama":
        backend = _sentencepiece(metadata, tokens)
    else:
        raise MistralNNXError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )

    special_tokens: dict[str, str] = {}
    for name, key in _SPECIAL_IDS.items():
        index = metadata.get(key)
        if isinstance(index, int) and 0 <= index < len(tokens):
            special_tokens[name] = tokens[index]
    _add_tokens(backend, metadata, tokens, byte_level=kind == "gpt2", named=special_tokens)
    _set_post_processor(backend, metadata, kind, special_tokens)
    eos_index = metadata.get(_SPECIAL_IDS["eos_token"])
    chat_template = metadata.get("tokenizer.chat_template")
    return GGUFTokenizerParts(
        backend=backend,
        special_tokens=special_tokens,
        chat_template=chat_template if isinstance(chat_template, str) else None,
        eos_ids=(eos_index,) if isinstance(eos_index, int) else (),
    )


def _byte_level(metadata: Mapping[str, Any], tokens: Sequence[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    spelling = _byte_alphabet()
    spelled = _byte_alphabet_re().fullmatch  # a C-level check per token: half the time of sets
    vocab = {
        token if spelled(token) else "".join(spelling[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    merges = _merges(metadata, vocab, scores=_scores(metadata, tokens))
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(metadata: Mapping[str, Any], tokens: Sequence[str]) -> Any:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges(metadata, vocab, scores=_scores(metadata, tokens))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return backend


def _merges(
    metadata: Mapping[str, Any], vocab: Mapping[str, int], scores: Mapping[str, float] | None
) -> list[tuple[str, str]]:
    """The file's merges; else every split of a token into two vocabulary tokens, ranked by the
    merged token's score (higher first) or, without scores, by its id (lower first)."""
    listed = metadata.get("tokenizer.ggml.merges")
    if isinstance(listed, list):  # ~50k of them: no Python call per merge
        return [(left, right) for left, _, right in map(str.partition, listed, repeat(" "))]
    ranked: list[tuple[float, int, int, str, str]] = []
    candidates = scores.keys() if scores is not None else vocab.keys()
    for token in candidates:
        rank = -float(scores[token]) if scores is not None else float(vocab[token])
        pairs = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked += [(rank, len(left), len(right), left, right) for left, right in pairs]
    # A stable sort: ties keep the vocabulary order, then the order of the split points.
    ranked.sort(key=lambda item: item[:3] if scores is None else (item[0], -item[1], -item[2]))
    return [(left, right) for _, _, _, left, right in ranked]


def _scores(metadata: Mapping[str, Any], tokens: Sequence[str]) -> dict[str, float] | None:
    scores = metadata.get("tokenizer.ggml.scores")
    return dict(zip(tokens, scores, strict=False)) if isinstance(scores, list) else None


def _add_tokens(
    backend: Any,
    metadata: Mapping[str, Any],
    tokens: Sequence[str],
    *,
    byte_level: bool,
    named: Mapping[str, str],
) -> None:
    """Control tokens and the named special tokens as special tokens, user-defined ones as plain
    added tokens. In a byte-level vocabulary a "control" token spelled outside the byte alphabet
    is a mislabel of llama.cpp's and stays an ordinary token."""
    from tokenizers import AddedToken

    types = metadata.get("tokenizer.ggml.token_type") or []
    alphabet = _byte_alphabet_set() if byte_level else None
    control = [
        token
        for token, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    user = [token for token, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED]
    special = list(dict.fromkeys(control + list(named.values())))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(
    backend: Any, metadata: Mapping[str, Any], kind: str, special_tokens: Mapping[str, str]
) -> None:
    """BOS / EOS around every encoding as the file's flags say (SentencePiece vocabularies add
    BOS unless told otherwise, as llama.cpp does)."""
    from tokenizers import processors

    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    bos = special_tokens.get("bos_token") if add_bos else None
    eos = special_tokens.get("eos_token") if add_eos else None
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    used = [t for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(used)],
    )


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


@lru_cache(maxsize=1)
def _byte_alphabet_set() -> frozenset[str]:
    return frozenset(_byte_alphabet().values())


@lru_cache(maxsize=1)
def _byte_alphabet_re() -> re.Pattern[str]:
    """Matches a string spelled only in GPT-2's byte alphabet."""
    return re.compile("[" + re.escape("".join(sorted(_byte_alphabet_set()))) + "]*")
