"""MistralConfig: one frozen dataclass, built from HF config.json, Mistral params.json or GGUF."""

from __future__ import annotations

import contextvars
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mistral_nnx.errors import MistralNNXError

# Rope scaling types we implement; anything else (longrope, dynamic, ...) is refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
TEXT_MODEL_TYPES = ("mistral", "ministral", "ministral3", "mixtral", "llama")
# Vision-language wrappers whose text model we load (the vision tower is neither built nor read).
WRAPPER_MODEL_TYPES = ("mistral3",)
HF_MODEL_TYPES = TEXT_MODEL_TYPES + WRAPPER_MODEL_TYPES
_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
)


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
    # Mixture of experts (Mixtral): 0 experts means a dense MLP in every layer.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # Ministral 3's position-dependent query scaling (after RoPE):
    # q *= 1 + beta * log(1 + floor(position / llama4_scaling_original_max)).
    llama4_scaling_beta: float | None = None
    llama4_scaling_original_max: int | None = None
    # The vision-language wrapper this text model was read from ("mistral3"), if any.
    wrapper: str | None = None

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
            self._validate_rope_scaling(source)
        if self.num_experts or self.num_experts_per_tok:
            e, k = self.num_experts, self.num_experts_per_tok
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (e, k)):
                raise MistralNNXError(f"{source}: expert counts must be integers, got {e!r}, {k!r}")
            if e <= 0 or not 0 < k <= e:
                raise MistralNNXError(
                    f"{source}: num_experts_per_tok ({k}) must be between 1 and the number of "
                    f"experts ({e})"
                )
        if self.llama4_scaling_beta is not None:
            period = self.llama4_scaling_original_max
            if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
                raise MistralNNXError(
                    f"{source}: llama_4 query scaling needs a positive integer "
                    f"original_max_position_embeddings, got {period!r}"
                )

    def _validate_rope_scaling(self, source: str) -> None:
        scaling = self.rope_scaling_dict
        rope_type = scaling.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise MistralNNXError(
                f"{source}: rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        required = {
            "linear": ("factor",),
            "llama3": (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ),
            "yarn": ("original_max_position_embeddings",),
        }.get(rope_type, ())
        for key in required:
            value = scaling.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise MistralNNXError(
                    f"{source}: {rope_type} rope scaling needs a positive '{key}', got {value!r}"
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

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or with `active=True` those one token uses (k of the experts)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2
        mlp = 3 * d * self.intermediate_size
        if self.is_moe:
            experts = self.num_experts_per_tok if active else self.num_experts
            mlp = experts * mlp + d * self.num_experts  # + the router
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
        """Build from a Hugging Face config.json dict (model_type mistral, ministral, ministral3,
        mixtral, llama, or the mistral3 vision-language wrapper, read as its text model)."""
        model_type = data.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise MistralNNXError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(HF_MODEL_TYPES)})"
            )
        if model_type in WRAPPER_MODEL_TYPES:
            return _from_wrapper(cls, data, source)
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
        theta = rope.get("rope_theta", data.get("rope_theta", _DEFAULT_THETA.get(model_type, 1e4)))
        max_positions = int(data.get("max_position_embeddings", 32768))
        scaling = data.get("rope_scaling") or (
            rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        )
        llama4_beta = rope.get("llama_4_scaling_beta") if model_type == "ministral3" else None
        if scaling is not None:
            if not isinstance(scaling, Mapping):
                raise MistralNNXError(f"{source}: field 'rope_scaling' must be an object")
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "yarn":
                # As transformers' standardize_rope_params: the pretraining length defaults to
                # max_position_embeddings; keys YaRN does not read are dropped.
                scaling.setdefault("original_max_position_embeddings", max_positions)
                scaling = {k: v for k, v in scaling.items() if k in _YARN_KEYS + ("rope_type",)}
            if scaling["rope_type"] == "default":
                scaling = None
        llama4_period = None
        if llama4_beta is not None:
            llama4_period = (scaling or {}).get("original_max_position_embeddings")
            if not isinstance(llama4_beta, int | float) or isinstance(llama4_beta, bool):
                raise MistralNNXError(
                    f"{source}: field 'rope_parameters.llama_4_scaling_beta' must be a number, "
                    f"got {llama4_beta!r}"
                )
            llama4_beta = float(llama4_beta)

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
        experts, per_token = 0, 0
        if model_type == "mixtral":
            experts = get("num_local_experts", int)
            per_token = get("num_experts_per_tok", int)
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
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=data.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            pad_token_id=data.get("pad_token_id"),
            model_type=model_type,
            num_experts=experts,
            num_experts_per_tok=per_token,
            llama4_scaling_beta=llama4_beta,
            llama4_scaling_original_max=llama4_period,
        )

    @classmethod
    def from_mistral(cls, data: Mapping[str, Any], source: str = "params.json") -> MistralConfig:
        """Build from Mistral's native params.json (with its `moe`, `yarn` and `llama_4_scaling`
        blocks read as transformers' and vLLM's Mistral-format conversions read them)."""
        if data.get("quantization") or data.get("quantization_config"):
            raise MistralNNXError(f"{source}: quantized native checkpoints are not supported")
        for key in ("q_lora_rank", "kv_lora_rank"):
            if data.get(key):
                raise MistralNNXError(
                    f"{source}: field '{key}' (multi-head latent attention, Mistral Large 3 / "
                    "Small 4) is not supported"
                )
        experts, per_token = _native_moe(data.get("moe"), source)
        # Pixtral / Mistral 3 native checkpoints: the text model is read, the vision encoder not.
        multimodal = data.get("multimodal")
        vision = data.get("vision_encoder") or (
            isinstance(multimodal, Mapping) and multimodal.get("vision_encoder_args")
        )
        scaling = _native_yarn(data.get("yarn"), source)
        llama4_beta, llama4_period = _native_llama4(data.get("llama_4_scaling"), source)
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
        if "rope_scaling" in data:
            raise MistralNNXError(
                f"{source}: field 'rope_scaling' in params.json is not supported (only 'yarn')"
            )
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
            rope_scaling=_freeze(scaling),
            max_position_embeddings=int(declared or 32768),
            tie_word_embeddings=bool(data.get("tied_embeddings", False)),
            bos_token_id=1,
            eos_token_ids=(2,),
            model_type="mixtral" if experts else "mistral",
            num_experts=experts,
            num_experts_per_tok=per_token,
            llama4_scaling_beta=llama4_beta,
            llama4_scaling_original_max=llama4_period,
            wrapper="mistral3" if vision else None,
        )


_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("config_source", default="config")
# transformers' defaults when a config.json leaves rope_theta out.
_DEFAULT_THETA = {"mixtral": 1e6, "ministral3": 1e6}
_MOE_TRIVIAL = {"num_shared_experts": 0, "first_k_dense_replace": 0, "num_expert_groups": 1}


def _from_wrapper(cls: type[MistralConfig], data: Mapping[str, Any], source: str) -> MistralConfig:
    """A vision-language wrapper (mistral3) as its text model: text_config, with the wrapper's
    tie_word_embeddings (the loader unties when the checkpoint has its own lm_head.weight)."""
    text = data.get("text_config")
    if not isinstance(text, Mapping):
        raise MistralNNXError(f"{source}: field 'text_config' is missing or not an object")
    text = {"model_type": "mistral", **text}
    if text["model_type"] not in ("mistral", "ministral3"):
        raise MistralNNXError(
            f"{source}: text_config.model_type {text['model_type']!r} is not supported "
            "(supported: mistral, ministral3)"
        )
    if "tie_word_embeddings" in data:
        text["tie_word_embeddings"] = data["tie_word_embeddings"]
    config = cls.from_hf(text, f"{source} (text_config)")
    return config.replace(wrapper=data["model_type"])


def _native_moe(moe: Any, source: str) -> tuple[int, int]:
    if moe is None:
        return 0, 0
    if not isinstance(moe, Mapping):
        raise MistralNNXError(f"{source}: field 'moe' must be an object")
    for key, trivial in _MOE_TRIVIAL.items():
        if moe.get(key, trivial) not in (trivial, None):
            raise MistralNNXError(
                f"{source}: field 'moe.{key}' = {moe[key]!r} is not supported (Mixtral-style "
                "experts only)"
            )
    values = []
    for key in ("num_experts", "num_experts_per_tok"):
        value = moe.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise MistralNNXError(f"{source}: field 'moe.{key}' must be an integer, got {value!r}")
        values.append(value)
    return values[0], values[1]


def _native_yarn(yarn: Any, source: str) -> dict[str, Any] | None:
    """params.json `yarn` -> HF yarn parameters: beta -> beta_fast, alpha -> beta_slow; without
    `apply_scale` the attention factor is 1.0 (Mistral Large 3 / Ministral 3 write false)."""
    if yarn is None:
        return None
    if not isinstance(yarn, Mapping):
        raise MistralNNXError(f"{source}: field 'yarn' must be an object")
    known = {"factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale"}
    unknown = sorted(set(yarn) - known)
    if unknown:
        raise MistralNNXError(f"{source}: unknown field 'yarn.{unknown[0]}'")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in yarn:
            raise MistralNNXError(f"{source}: required field 'yarn.{key}' is missing")
    scaling: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": float(yarn["factor"]),
        "original_max_position_embeddings": yarn["original_max_position_embeddings"],
        "beta_fast": float(yarn.get("beta", 32)),
        "beta_slow": float(yarn.get("alpha", 1)),
    }
    if not yarn.get("apply_scale", False):
        scaling["attention_factor"] = 1.0
    return scaling


def _native_llama4(block: Any, source: str) -> tuple[float | None, int | None]:
    if block is None:
        return None, None
    if not isinstance(block, Mapping):
        raise MistralNNXError(f"{source}: field 'llama_4_scaling' must be an object")
    for key in ("beta", "original_max_position_embeddings"):
        if key not in block:
            raise MistralNNXError(f"{source}: required field 'llama_4_scaling.{key}' is missing")
    beta = block["beta"]
    if not isinstance(beta, int | float) or isinstance(beta, bool):
        raise MistralNNXError(f"{source}: field 'llama_4_scaling.beta' must be a number")
    return float(beta), block["original_max_position_embeddings"]


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
