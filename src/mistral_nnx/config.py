"""MistralConfig: one frozen dataclass, built from HF config.json, Mistral params.json or GGUF."""

from __future__ import annotations

import contextvars
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mistral_nnx.errors import MistralNNXError

# Rope scaling types we implement; anything else (yarn, longrope, dynamic, ...) is refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
HF_MODEL_TYPES = ("mistral", "ministral", "llama")


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # One entry per layer: the sliding window W (query i sees keys i - W < j <= i), or None.
    layer_windows: tuple[int | None, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hashable form of HF's rope_scaling dict: (("rope_type", "llama3"), ("factor", 8.0), ...).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    model_type: str = "mistral"

    def __post_init__(self) -> None:
        self.validate(_SOURCE.get())

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, source: str) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MistralNNXError(
                    f"{source}: field '{name}' must be a positive integer, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise MistralNNXError(
                f"{source}: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise MistralNNXError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_windows) != self.num_layers:
            raise MistralNNXError(
                f"{source}: {len(self.layer_windows)} per-layer windows for "
                f"{self.num_layers} layers"
            )
        for w in self.layer_windows:
            if w is not None and (not isinstance(w, int) or w <= 0):
                raise MistralNNXError(
                    f"{source}: sliding window must be a positive integer or null, got {w!r}"
                )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling_dict.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise MistralNNXError(
                    f"{source}: rope scaling type {rope_type!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )

    # ---- derived ------------------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def sliding_window(self) -> int | None:
        """The largest window if every layer has one, else None (some layer sees everything)."""
        if any(w is None for w in self.layer_windows):
            return None
        return max(w for w in self.layer_windows if w is not None)

    def num_parameters(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def replace(self, **changes: Any) -> MistralConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_windows"] = list(self.layer_windows)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["rope_scaling"] = self.rope_scaling_dict or None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MistralConfig:
        """Inverse of to_dict (this project's own format, used by the orbax checkpoints)."""
        data = dict(data)
        data["layer_windows"] = tuple(data["layer_windows"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        data["rope_scaling"] = _freeze(data.get("rope_scaling"))
        return cls(**data)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, data: Mapping[str, Any], source: str = "config.json") -> MistralConfig:
        """Build from a Hugging Face config.json dict (model_type mistral, ministral or llama)."""
        model_type = data.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise MistralNNXError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(HF_MODEL_TYPES)})"
            )
        get = _field_getter(data, source)
        hidden = get("hidden_size", int)
        heads = get("num_attention_heads", int)
        kv_heads = get("num_key_value_heads", int, default=heads)
        head_dim = get("head_dim", int, default=None)
        if head_dim is None:
            if hidden % heads:
                raise MistralNNXError(
                    f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads "
                    f"({heads}) and no head_dim is given"
                )
            head_dim = hidden // heads
        num_layers = get("num_hidden_layers", int)

        rope = data.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise MistralNNXError(f"{source}: field 'rope_parameters' must be an object")
        theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
        scaling = data.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "default":
                scaling = None

        window = data.get("sliding_window")
        if model_type == "llama":
            window = None
        if window is not None and not isinstance(window, int):
            raise MistralNNXError(
                f"{source}: field 'sliding_window' must be an integer or null, got {window!r}"
            )
        layer_types = data.get("layer_types")
        if layer_types is not None and model_type != "llama":
            if len(layer_types) != num_layers:
                raise MistralNNXError(
                    f"{source}: field 'layer_types' has {len(layer_types)} entries for "
                    f"{num_layers} layers"
                )
            windows: list[int | None] = []
            for t in layer_types:
                if t == "sliding_attention":
                    windows.append(window)
                elif t == "full_attention":
                    windows.append(None)
                else:
                    raise MistralNNXError(f"{source}: unknown layer type {t!r} in 'layer_types'")
        else:
            windows = [window] * num_layers

        eos = data.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return _build(
            cls,
            source,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            layer_windows=tuple(windows),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=_freeze(scaling),
            max_position_embeddings=int(data.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=data.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            pad_token_id=data.get("pad_token_id"),
            model_type=model_type,
        )

    @classmethod
    def from_mistral(cls, data: Mapping[str, Any], source: str = "params.json") -> MistralConfig:
        """Build from Mistral's native params.json."""
        if "moe" in data:
            raise MistralNNXError(
                f"{source}: mixture-of-experts models (field 'moe') are not supported yet"
            )
        if data.get("quantization"):
            raise MistralNNXError(f"{source}: quantized native checkpoints are not supported")
        get = _field_getter(data, source)
        dim = get("dim", int)
        heads = get("n_heads", int)
        num_layers = get("n_layers", int)
        head_dim = get("head_dim", int, default=None)
        if head_dim is None:
            head_dim = dim // heads
        window = data.get("sliding_window")
        if isinstance(window, list):
            if not window:
                raise MistralNNXError(f"{source}: field 'sliding_window' is an empty list")
            # A per-layer pattern; mistral-inference cycles it over the layers.
            windows = [window[i % len(window)] for i in range(num_layers)]
        else:
            windows = [window] * num_layers
        declared = data.get("max_seq_len") or data.get("max_position_embeddings")
        windows = [_native_window(w, declared, source) for w in windows]
        if "rope_scaling" in data or "yarn" in data:
            raise MistralNNXError(f"{source}: rope scaling in params.json is not supported")
        return _build(
            cls,
            source,
            vocab_size=get("vocab_size", int),
            hidden_size=dim,
            intermediate_size=get("hidden_dim", int),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=get("n_kv_heads", int, default=heads),
            head_dim=head_dim,
            layer_windows=tuple(windows),
            rms_norm_eps=float(data.get("norm_eps", 1e-5)),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            max_position_embeddings=int(declared or 32768),
            tie_word_embeddings=bool(data.get("tied_embeddings", False)),
            bos_token_id=1,
            eos_token_ids=(2,),
            model_type="mistral",
        )


_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("config_source", default="config")


def _build(cls: type[MistralConfig], source: str, **fields: Any) -> MistralConfig:
    """Construct with validation errors naming `source` (the file the fields came from)."""
    token = _SOURCE.set(source)
    try:
        return cls(**fields)
    finally:
        _SOURCE.reset(token)


def _native_window(w: Any, max_seq: int | None, source: str) -> int | None:
    if w is None:
        return None
    if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
        raise MistralNNXError(f"{source}: field 'sliding_window' has invalid entry {w!r}")
    # A window as long as the context is full attention (Ministral writes it that way).
    return None if max_seq is not None and w >= max_seq else w


def _freeze(d: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if not d:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _field_getter(data: Mapping[str, Any], source: str):  # type: ignore[no-untyped-def]
    missing = object()

    def get(name: str, kind: type, default: Any = missing) -> Any:
        if name not in data or data[name] is None:
            if default is missing:
                raise MistralNNXError(f"{source}: required field '{name}' is missing")
            return default
        value = data[name]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise MistralNNXError(f"{source}: field '{name}' must be an integer, got {value!r}")
        return value

    return get


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MistralNNXError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise MistralNNXError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise MistralNNXError(f"{path}: expected a JSON object")
    return data


def load_config(directory: str | Path) -> MistralConfig:
    """Read the config of a checkpoint directory: config.json (HF) and/or params.json (Mistral).

    When both exist, config.json gives the sizes and params.json's per-layer window list (if any)
    gives the interleaving: Ministral-8B's config.json declares one window for every layer.
    """
    directory = Path(directory)
    hf_path, native_path = directory / "config.json", directory / "params.json"
    if hf_path.exists():
        config = MistralConfig.from_hf(_read_json(hf_path), str(hf_path))
        if native_path.exists():
            native = _read_json(native_path)
            if isinstance(native.get("sliding_window"), list):
                windows = MistralConfig.from_mistral(native, str(native_path)).layer_windows
                if len(windows) == config.num_layers:
                    config = config.replace(layer_windows=windows)
        return config
    if native_path.exists():
        return MistralConfig.from_mistral(_read_json(native_path), str(native_path))
    raise MistralNNXError(f"{directory}: no config.json or params.json found")
