"""Export: merged weights as a Hugging Face checkpoint, adapters in PEFT's format, and adapters
read back (PEFT format) onto a model.

Layouts. Our weights are HF's [out, in] with the heads split out (wq [H, E, D], wo [D, H, E],
gate [M, D]). qwix's adapters are A [in..., r], B [r, out...]; PEFT's are lora_A.weight [r, in],
lora_B.weight [out, r]; both scale A @ B by alpha / r.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.train.lora import HF_MODULES, LoraConfig, apply_lora, lora_pairs, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
_TARGET_OF = {v.split(".")[-1]: k for k, v in HF_MODULES.items()}  # q_proj -> wq
_SHORT = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "gate": "gate", "up": "up", "down": "down"}


# ---- Hugging Face names and layouts --------------------------------------------------------
def hf_name(path: tuple[Any, ...]) -> str:
    """Our parameter path -> the HF tensor name."""
    if path == ("embed",):
        return "model.embed_tokens.weight"
    if path == ("norm", "weight"):
        return "model.norm.weight"
    if path == ("lm_head",):
        return "lm_head.weight"
    _, i, *rest = path
    tail = {
        ("attn_norm", "weight"): "input_layernorm.weight",
        ("mlp_norm", "weight"): "post_attention_layernorm.weight",
    }.get(tuple(rest))
    if tail is None:
        tail = HF_MODULES[rest[-1]] + ".weight"
    return f"model.layers.{i}.{tail}"


def to_hf_layout(path: tuple[Any, ...], w: np.ndarray) -> np.ndarray:
    """Our layout -> HF's [out, in] (the inverse of the loader's reshapes)."""
    if path[-1] in ("wq", "wk", "wv"):  # [n, e, d] -> [n*e, d]
        return w.reshape(-1, w.shape[-1])
    if path[-1] == "wo":  # [d, h, e] -> [d, h*e]
        return w.reshape(w.shape[0], -1)
    return w


def hf_config(config: MistralConfig, dtype: str) -> dict[str, Any]:
    """config.json for transformers (MistralForCausalLM, LlamaForCausalLM or Ministral)."""
    if config.is_moe or config.wrapper or config.llama4_scaling_beta is not None:
        raise MistralNNXError(f"export: {config.model_type} models are not supported yet")
    windows = set(config.layer_windows)
    model_type = config.model_type if config.model_type in ("mistral", "llama") else "mistral"
    out: dict[str, Any] = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
        ],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    if config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling_dict)
    if len(windows) > 1:
        out["model_type"] = "ministral"
        out["architectures"] = ["MinistralForCausalLM"]
        out["sliding_window"] = max(w for w in windows if w is not None)
        out["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in config.layer_windows
        ]
    elif model_type == "mistral":
        out["sliding_window"] = next(iter(windows))
    elif windows != {None}:
        raise MistralNNXError("export: a llama-type model with a sliding window")
    return out


def _atomic_dir(out: Path, write: Any, overwrite: bool) -> Path:
    """Build the directory under a temporary name, then rename it into place."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise MistralNNXError(f"{out}: already exists")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        raise MistralNNXError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_merged_hf(
    model: Mistral,
    out: str | os.PathLike[str],
    *,
    tokenizer_files: Iterable[Path] = (),
    lora: LoraConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """model.safetensors + config.json (+ the tokenizer files) that transformers'
    from_pretrained and load_model read. A LoRA model (with `lora`) is merged first."""
    from safetensors.numpy import save_file

    plain = merge_lora(model, lora.scaling) if lora is not None else model
    dtype = str(np.dtype(plain.embed[...].dtype))
    tensors = {
        hf_name(path): to_hf_layout(path, np.asarray(var[...]))
        for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param))
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(plain.config, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in tokenizer_files:
            shutil.copy2(f, tmp / Path(f).name)

    return _atomic_dir(Path(out), write, overwrite)


# ---- PEFT adapters -----------------------------------------------------------------------------
def peft_tensors(model: Mistral) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors content for a LoRA model."""
    out = {}
    for key, (a, b) in lora_pairs(model).items():
        _, i, _, weight = key.split("/")
        r = a.shape[-1]
        name = f"{PEFT_PREFIX}{i}.{HF_MODULES[weight]}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a).reshape(-1, r).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b).reshape(r, -1).T)
    return out


def set_peft_tensors(model: Mistral, tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Copy PEFT-format adapters into a LoRA model's adapters (same targets and rank)."""
    seen = set()
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.LoRAParam):
            continue
        _, i, _, leaf = map(str, path)
        weight, _, ab = leaf.rpartition("_lora_")
        name = f"{PEFT_PREFIX}{i}.{HF_MODULES[weight]}.lora_{ab.upper()}.weight"
        if name not in tensors:
            raise MistralNNXError(f"{source}: adapter tensor '{name}' is missing")
        t = np.asarray(tensors[name])
        shape = var.get_value().shape
        want = (
            (int(np.prod(shape[:-1])), shape[-1])
            if ab == "a"
            else (shape[0], int(np.prod(shape[1:])))
        )
        value = t.T  # A [r, in] -> [in, r]; B [out, r] -> [r, out]
        if value.shape != want:
            raise MistralNNXError(
                f"{source}: adapter tensor '{name}' has shape {list(t.shape)}, expected "
                f"{list(want[::-1])}"
            )
        var.set_value(jnp.asarray(value.reshape(var.get_value().shape), jnp.float32))
        seen.add(name)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise MistralNNXError(f"{source}: unexpected adapter tensor '{extra[0]}'")


def save_adapters(
    model: Mistral,
    lora: LoraConfig,
    out: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable by PeftModel.from_pretrained."""
    from safetensors.numpy import save_file

    tensors = peft_tensors(model)
    modules = sorted({name.split(".")[-3] for name in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "layers_to_transform": sorted({int(n[len(PEFT_PREFIX) :].split(".")[0]) for n in tensors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

    return _atomic_dir(Path(out), write, overwrite)


def read_adapter_config(directory: Path) -> LoraConfig:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise MistralNNXError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MistralNNXError(f"{path}: cannot read ({e})") from None
    if data.get("peft_type", "LORA") != "LORA":
        raise MistralNNXError(f"{path}: peft_type {data.get('peft_type')!r} is not LORA")
    if data.get("use_rslora") or data.get("use_dora"):
        raise MistralNNXError(f"{path}: rsLoRA / DoRA adapters are not supported")
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        raise MistralNNXError(f"{path}: a regex target_modules is not supported")
    short = []
    for t in targets:
        weight = _TARGET_OF.get(str(t))
        if weight is None:
            raise MistralNNXError(f"{path}: unsupported target module {t!r}")
        short.append(_SHORT[weight])
    layers = data.get("layers_to_transform")
    patterns = tuple(short)
    if layers is not None:
        from mistral_nnx.train.lora import SHORT_TARGETS

        layer_re = "(" + "|".join(str(int(i)) for i in layers) + ")"
        patterns = tuple(SHORT_TARGETS[s].replace(r"\d+", layer_re) for s in short)
    return LoraConfig(
        rank=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=0.0, targets=patterns
    )


def load_adapters(model: Mistral, adapters: str | os.PathLike[str]) -> Mistral:
    """`model` with the PEFT adapters of directory `adapters` merged into its weights."""
    from safetensors.numpy import load_file

    directory = Path(adapters).expanduser()
    lora = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise MistralNNXError(f"{directory}: no {ADAPTER_WEIGHTS}")
    lora_model = apply_lora(model, lora)
    set_peft_tensors(lora_model, load_file(str(weights)), str(weights))
    return merge_lora(lora_model, lora.scaling)
