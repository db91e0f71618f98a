"""Tokenizers: one small protocol and three adapters.

`load_tokenizer(source)` picks the adapter from what `source` holds:

- mistral-common files (`tekken.json`, `tokenizer.model.v*`, or `tokenizer.model` next to a
  `params.json`): `MistralCommonTokenizer`, whose chat encoding is mistral-common's own;
- a Hugging Face `tokenizer.json`: `HFTokenizer` over the `tokenizers` library, with the chat
  template rendered by jinja2 the way transformers renders it;
- a `.gguf` file: the same `HFTokenizer`, built from the vocabulary embedded in the GGUF the way
  transformers' GGUF conversion builds it (`AutoTokenizer(..., gguf_file=...)`), by
  `gguf_tokenizer.py` without transformers.

`StreamDetokenizer` turns generated ids into text piece by piece without ever returning half a
multi-byte character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mistral_nnx.errors import MistralNNXError

if TYPE_CHECKING:
    import tokenizers
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

__all__ = [
    "HFTokenizer",
    "MistralCommonTokenizer",
    "StreamDetokenizer",
    "Tokenizer",
    "load_tokenizer",
]

# Names under which a Hugging Face tokenizer names its special tokens; each is also a variable the
# chat template can read (`{{ bos_token }}`), as in transformers.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """What the rest of mistral_nnx needs from a tokenizer."""

    bos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends generation

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with the beginning-of-sequence token first if `add_bos`."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, leaving special tokens out."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation (`[{"role": ..., "content": ...}]`), ending with the
        prompt that makes the model answer as the assistant."""
        ...


# --------------------------------------------------------------------------- mistral-common


class MistralCommonTokenizer:
    """A tokenizer file of mistral-common (tekken JSON or SentencePiece model)."""

    def __init__(self, path: Path) -> None:
        try:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError as err:
            raise MistralNNXError(
                f"{path}: reading this tokenizer needs the mistral-common package "
                "(pip install mistral-common)"
            ) from err
        try:
            self._mistral: MistralTokenizer = MistralTokenizer.from_file(str(path))
        except Exception as err:
            raise MistralNNXError(f"{path}: not a valid mistral-common tokenizer: {err}") from err
        inner = self._mistral.instruct_tokenizer.tokenizer
        self._inner = inner
        self.has_chat_template = True  # mistral-common's own chat format
        self.bos_id: int | None = inner.bos_id
        self.eos_ids: tuple[int, ...] = (inner.eos_id,)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return list(self._inner.encode(_valid_text(text), bos=add_bos, eos=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._mistral.decode([int(i) for i in ids])

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            messages_json = [dict(m) for m in messages]
            request: ChatCompletionRequest[Any] = ChatCompletionRequest.model_validate(
                {"messages": messages_json}
            )
            return list(self._mistral.encode_chat_completion(request).tokens)
        except Exception as err:  # pydantic validation or mistral-common's message checks
            raise MistralNNXError(f"messages: {_one_line(err)}") from err


# --------------------------------------------------------------------------- Hugging Face


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and special tokens that go with it.

    `encode` lets the tokenizer's post-processor decide whether a BOS goes first (as
    `tokenizer(text)` does in transformers); `encode_chat` renders the chat template and encodes
    the result without adding special tokens, as `apply_chat_template(tokenize=True)` does.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        eos_ids: Sequence[int] = (),
        source: str = "tokenizer",
    ) -> None:
        self._backend = backend
        self._chat_template = chat_template
        self.has_chat_template = chat_template is not None
        self._special_tokens = dict(special_tokens)
        self._source = source
        self._compiled_template: Any = None
        bos = self._special_tokens.get("bos_token")
        self.bos_id: int | None = backend.token_to_id(bos) if bos is not None else None
        eos = self._special_tokens.get("eos_token")
        eos_token_id = backend.token_to_id(eos) if eos is not None else None
        ids = ([eos_token_id] if eos_token_id is not None else []) + [int(i) for i in eos_ids]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return list(self._backend.encode(_valid_text(text), add_special_tokens=add_bos).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The conversation as text, through the chat template, with the generation prompt."""
        if self._chat_template is None:
            raise MistralNNXError(f"{self._source}: the tokenizer has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self._chat_template, self._source)
        try:
            return str(
                self._compiled_template.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=True,
                    **self._special_tokens,
                )
            )
        except Exception as err:  # raise_exception() in the template, or a template bug
            raise MistralNNXError(f"messages: chat template failed: {_one_line(err)}") from err

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        text = _valid_text(self.render_chat(messages))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def save(self, directory: Path) -> list[Path]:
        """Write tokenizer.json + tokenizer_config.json (special tokens, chat template), the
        files `load_tokenizer(directory)` reads back; used to carry a GGUF's tokenizer into a
        converted checkpoint."""
        tokenizer_file = directory / "tokenizer.json"
        self._backend.save(str(tokenizer_file))
        config: dict[str, Any] = dict(self._special_tokens)
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        config_file = directory / "tokenizer_config.json"
        config_file.write_text(json.dumps(config, indent=1), encoding="utf-8")
        generation_file = directory / "generation_config.json"
        generation_file.write_text(json.dumps({"eos_token_id": list(self.eos_ids)}))
        return [tokenizer_file, config_file, generation_file]


def _compile_chat_template(template: str, source: str) -> Any:
    """A jinja2 template compiled in the sandbox transformers uses for chat templates."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; render it as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise MistralNNXError(f"{source}: invalid chat template: {_one_line(err)}") from err


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _pick_template(value: Any) -> str | None:
    """The default template out of a single template or a list of named ones."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    if isinstance(value, Mapping):
        default = value.get("default")
        return default if isinstance(default, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MistralNNXError(f"{path}: cannot read JSON: {_one_line(err)}") from err
    if not isinstance(data, dict):
        raise MistralNNXError(f"{path}: expected a JSON object")
    return data


def _eos_ids_from(config: Mapping[str, Any]) -> list[int]:
    value = config.get("eos_token_id")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _load_hf(directory: Path) -> HFTokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as BackendTokenizer

    tokenizer_file = directory / "tokenizer.json"
    try:
        backend = BackendTokenizer.from_file(str(tokenizer_file))
    except Exception as err:
        raise MistralNNXError(f"{tokenizer_file}: cannot load: {_one_line(err)}") from err

    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    special_tokens: dict[str, str] = {}
    for name in _SPECIAL_TOKEN_NAMES:
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if content is not None:
            special_tokens[name] = content
    # transformers registers the named special tokens with the backend, so that they are matched
    # whole in text and dropped when decoding; do the same for the ones the vocabulary has.
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in special_tokens.values()
            if backend.token_to_id(token) is not None
        ]
    )

    template_file = directory / "chat_template.jinja"  # takes priority, as in transformers
    if template_file.is_file():
        chat_template: str | None = template_file.read_text(encoding="utf-8")
    else:
        chat_template = _pick_template(config.get("chat_template"))

    eos_ids = _eos_ids_from(_read_json(directory / "generation_config.json"))
    eos_ids += _eos_ids_from(_read_json(directory / "config.json"))
    return HFTokenizer(
        backend,
        chat_template=chat_template,
        special_tokens=special_tokens,
        eos_ids=eos_ids,
        source=str(tokenizer_file),
    )


# --------------------------------------------------------------------------- GGUF


def _load_gguf(path: Path) -> HFTokenizer:
    """The tokenizer embedded in a GGUF's metadata (its tensors are not read), built the way
    transformers' GGUF conversion builds it, without transformers or torch."""
    from mistral_nnx.checkpoint.gguf_metadata import read_gguf_metadata
    from mistral_nnx.gguf_tokenizer import build_gguf_tokenizer

    parts = build_gguf_tokenizer(read_gguf_metadata(path), path)
    return HFTokenizer(
        parts.backend,
        chat_template=parts.chat_template,
        special_tokens=parts.special_tokens,
        eos_ids=parts.eos_ids,
        source=str(path),
    )


# --------------------------------------------------------------------------- loading


def _has_mistral_common() -> bool:
    import importlib.util

    return importlib.util.find_spec("mistral_common") is not None


def _mistral_common_file(path: Path) -> Path | None:
    """The mistral-common tokenizer file of a checkpoint directory, if it has one."""
    tekken = path / "tekken.json"
    if tekken.is_file():
        return tekken
    versioned = sorted(path.glob("tokenizer.model.v*"))
    if len(versioned) > 1:
        names = ", ".join(p.name for p in versioned)
        raise MistralNNXError(f"{path}: several tokenizer files ({names}); pass one of them")
    if versioned:
        return versioned[0]
    if (path / "tokenizer.model").is_file() and (path / "params.json").is_file():
        return path / "tokenizer.model"
    return None


def load_tokenizer(source: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a checkpoint directory, a GGUF file, or a tokenizer file."""
    path = Path(source)
    if not path.exists():
        raise MistralNNXError(f"{path}: no such file or directory")
    if path.is_file():
        return _load_file(path)

    mistral_file = _mistral_common_file(path)
    if mistral_file is not None:
        if _has_mistral_common() or not (path / "tokenizer.json").is_file():
            return MistralCommonTokenizer(mistral_file)
        # Without mistral-common (e.g. a machine that cannot install it), Mistral's HF repos
        # also ship tokenizer.json with the same vocabulary and a chat template.
    if (path / "tokenizer.json").is_file():
        return _load_hf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise MistralNNXError(f"{path}: several GGUF files ({names}); pass one of them")
    raise MistralNNXError(
        f"no tokenizer found in {path} (expected tekken.json, tokenizer.model.v*, "
        "tokenizer.json or a .gguf file)"
    )


def _load_file(path: Path) -> Tokenizer:
    name = path.name
    if name.endswith(".gguf"):
        return _load_gguf(path)
    if name == "tokenizer.json":
        return _load_hf(path.parent)
    if (name.endswith(".json") and "tekken" in name) or ".model" in name:
        return MistralCommonTokenizer(path)
    raise MistralNNXError(f"no tokenizer found in {path} (not a known tokenizer file)")


# --------------------------------------------------------------------------- streaming


class StreamDetokenizer:
    """Decodes generated ids incrementally, returning only text that is complete.

    Each call decodes a short window of recent ids twice, with and without the new ones, and
    returns the difference. Decoding a window rather than single ids keeps what depends on the
    neighbours right (SentencePiece's leading space, bytes of one character split over several
    tokens); text ending in U+FFFD is an unfinished character and is held back until it is
    complete (or until `flush`).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # the window of context decoded with the new ids starts here
        self._emitted = 0  # ids before this index have been turned into returned text

    def add(self, ids: Sequence[int]) -> str:
        """Take newly generated ids; return the text they complete (maybe "")."""
        self._ids.extend(int(i) for i in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back, complete or not, and start over."""
        text = self._advance(final=True)
        self._ids, self._start, self._emitted = [], 0, 0
        return text

    def _advance(self, *, final: bool) -> str:
        if self._emitted == len(self._ids):
            return ""
        before = self._tokenizer.decode(self._ids[self._start : self._emitted])
        after = self._tokenizer.decode(self._ids[self._start :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._start, self._emitted = self._emitted, len(self._ids)
        return after[len(before) :]


def _valid_text(text: str) -> str:
    """`text` if it can be encoded as UTF-8; lone surrogates (undecodable bytes that Python kept
    with `surrogateescape`, e.g. from argv) are refused in one line."""
    if not isinstance(text, str):
        raise MistralNNXError(f"text to encode must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MistralNNXError(
            "text is not valid Unicode (lone surrogates, e.g. from undecodable bytes)"
        ) from None
    return text


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
