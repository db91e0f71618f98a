"""Export: merged weights as a Hugging Face checkpoint, adapters in PEFT's format, and adapters
read back (PEFT format) onto a model.

Layouts. Our weights are HF's [out, in] with the heads split out (wq [H, E, D], wo [D, H, E],
gate [M, D]). qwix's adapters are A [in..., r], B [r, out...]; PEFT's are lora_A.weight [r, in],
lora_B.weight [out, r]; both scale A @ B by alpha / r.

Mixtral's experts. transformers 5 packs them (`mlp.experts.gate_up_proj` [E, 2M, D], gate rows
first, and `mlp.experts.down_proj` [E, D, M]) and PEFT adapts those parameters with
`target_parameters` (its ParamWrapper, one per parameter, nested on `mlp.experts` in the order
gate_up_proj, down_proj: the first is the inner one, whose tensors are named
`mlp.experts.base_layer.lora_A.weight`): lora_A.weight [E * R, in] (expert-major rows),
lora_B.weight [out, R * E] (column j * E + e), expert e adding B_e @ A_e. gate and up thus share
one A per expert in PEFT, where ours are separate adapters of rank r. The mapping, exact both ways:
- export: gate and up as one gate_up_proj adapter of rank 2r, A = [A_gate; A_up] and B block
  diagonal, with rank_pattern 2r and alpha_pattern 2 alpha (the scaling unchanged); this is how
  PEFT itself converts per-expert w1 / w3 adapters for transformers 5. A gate-only (up-only)
  adapter is exported at rank r with zero up (gate) rows of B.
- import: a gate_up_proj adapter of rank r gives our gate and up adapters the same A (a B half
  that is not zero needs that target); one of rank 2r must be block diagonal as above.
  Adapters written for transformers 4's per-expert modules (target_modules w1, w3, w2:
  `block_sparse_moe.experts.J.w1.lora_A.weight` [r, D], ...) are our gate, up, down as they are.
PEFT refuses dropout on parameter adapters, so an export with experts says lora_dropout 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_nnx.checkpoint.safetensors_io import save_safetensors
from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.moe import MoE
from mistral_nnx.train.lora import (
    HF_MODULES,
    SHORT_TARGETS,
    LoraConfig,
    apply_lora,
    lora_pairs,
    merge_lora,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
_TARGET_OF = {v.split(".")[-1]: k for k, v in HF_MODULES.items()}  # q_proj -> wq
_SHORT = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "gate": "gate", "up": "up", "down": "down"}
# PEFT's expert parameters (transformers 5 Mixtral) -> our stacked experts, in PEFT's wrapping order
EXPERT_PARAMS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
# transformers 4's per-expert Mixtral modules (block_sparse_moe.experts.J.w1 ...), read too
V4_EXPERTS = {"w1": "gate", "w3": "up", "w2": "down"}


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


# transformers' class for each config.json model_type we write
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def export_type(config: MistralConfig) -> str:
    """The model_type written: ministral3 (llama_4 query scaling), mixtral (experts), llama,
    ministral (per-layer windows) or mistral. A mistral3 wrapper's text model is written as its
    text config's type: the vision tower is no part of our model, so it cannot be exported."""
    mixed = len(set(config.layer_windows)) > 1
    if config.llama4_scaling_beta is not None or config.is_moe:
        model_type = "ministral3" if config.llama4_scaling_beta is not None else "mixtral"
        if mixed:
            raise MistralNNXError(
                f"export: per-layer sliding windows on a {model_type} model (transformers' "
                f"{ARCHITECTURES[model_type]} has one window for every layer)"
            )
        return model_type
    if mixed:
        return "ministral"
    if config.model_type != "llama":
        return "mistral"
    if config.layer_windows[0] is not None:
        raise MistralNNXError("export: a llama-type model with a sliding window")
    return "llama"


def _ministral3_rope(config: MistralConfig) -> dict[str, Any]:
    """Ministral3's rope_parameters: YaRN's, the rope theta and the llama_4 beta, whose period
    transformers takes from YaRN's original_max_position_embeddings."""
    scaling = config.rope_scaling_dict
    period = config.llama4_scaling_original_max
    if scaling.get("rope_type") != "yarn" or scaling["original_max_position_embeddings"] != period:
        raise MistralNNXError(
            f"export: llama_4 query scaling (period {period}) without YaRN rope scaling of "
            "the same original_max_position_embeddings (transformers' Ministral3 reads its "
            "period there)"
        )
    return {
        **scaling,
        "rope_theta": config.rope_theta,
        "llama_4_scaling_beta": config.llama4_scaling_beta,
    }


def hf_config(config: MistralConfig, dtype: str) -> dict[str, Any]:
    """config.json for transformers: MistralForCausalLM, LlamaForCausalLM, MinistralForCausalLM,
    Ministral3ForCausalLM or MixtralForCausalLM (see export_type)."""
    model_type = export_type(config)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
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
    if model_type == "ministral3":
        del out["rope_theta"]
        out["rope_parameters"] = _ministral3_rope(config)
    elif config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling_dict)
    if model_type == "ministral":
        out["sliding_window"] = max(w for w in config.layer_windows if w is not None)
        out["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in config.layer_windows
        ]
    elif model_type != "llama":
        out["sliding_window"] = config.layer_windows[0]
    if model_type == "mixtral":
        out["num_local_experts"] = config.num_experts
        out["num_experts_per_tok"] = config.num_experts_per_tok
        out["router_jitter_noise"] = 0.0
    return out


def hf_tensors(model: Mistral) -> dict[str, np.ndarray]:
    """A plain model's weights under their HF names and layouts. Experts are written per expert
    (`block_sparse_moe.experts.J.w1/w3/w2.weight` [out, in], router `block_sparse_moe.gate`):
    the form transformers 5's save_pretrained writes and reads (renamed and packed into
    `mlp.experts.gate_up_proj` at load), and every other Mixtral reader too."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        w = np.asarray(var[...])
        if not (model.config.is_moe and path[2:3] == ("mlp",)):
            out[hf_name(path)] = to_hf_layout(path, w)
            continue
        prefix = f"model.layers.{path[1]}.block_sparse_moe."
        if path[3] == "router":  # [E, D]: already [out, in]
            out[prefix + "gate.weight"] = w
            continue
        module = {kind: name for name, kind in V4_EXPERTS.items()}[str(path[3])]
        for j in range(w.shape[0]):  # [E, in, out] -> expert j's [out, in]
            out[f"{prefix}experts.{j}.{module}.weight"] = np.ascontiguousarray(w[j].T)
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
    from_pretrained and load_model read. A LoRA model (with `lora`) is merged first.

    Mixtral is written as MixtralForCausalLM (per-expert tensors, see hf_tensors), Ministral 3
    as Ministral3ForCausalLM. A mistral3 vision-language checkpoint's text model is written
    alone, as a text checkpoint of its text config's type (Ministral3ForCausalLM or
    MistralForCausalLM): the vision tower and projector are never read into our model, so image
    inputs still need the original checkpoint."""
    plain = merge_lora(model, lora.scaling) if lora is not None else model
    config = hf_config(plain.config, str(np.dtype(plain.embed[...].dtype)))
    tensors = hf_tensors(plain)

    def write(tmp: Path) -> None:
        # 64-byte aligned: load_model maps the tensors it can use as they are (zero-copy)
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in tokenizer_files:
            shutil.copy2(f, tmp / Path(f).name)

    return _atomic_dir(Path(out), write, overwrite)


# ---- PEFT adapters -----------------------------------------------------------------------------
def _shape(moe: MoE, name: str) -> tuple[int, ...]:
    return tuple(getattr(moe, name).get_value().shape)


def _expert_params(moe: MoE) -> list[str]:
    """The PEFT parameters of a MoE module's adapters, in PEFT's wrapping order."""
    return [p for p, kinds in EXPERT_PARAMS.items() if set(kinds) & set(moe.lora_kinds)]


def _expert_name(layer: int, params: list[str], param: str) -> str:
    """PEFT's tensor prefix for the adapter of `param`: nested wrappers, the first innermost."""
    inner = len(params) - 1 - params.index(param)
    return f"{PEFT_PREFIX}{layer}.mlp.experts." + "base_layer." * inner


def _gate_up_blocks(moe: MoE, rank: int) -> list[tuple[str, slice, slice]]:
    """(kind, rank columns, output rows of gate_up_proj) of our gate / up adapters in PEFT's
    gate_up_proj adapter of rank `rank`: stacked (rank 2r) or sharing A (rank r)."""
    kinds = [k for k in ("gate", "up") if k in moe.lora_kinds]
    r = _shape(moe, f"{kinds[0]}_lora_a")[-1]
    m = _shape(moe, kinds[0])[-1]
    rows = {"gate": slice(0, m), "up": slice(m, 2 * m)}
    if rank == r:
        return [(k, slice(0, r), rows[k]) for k in kinds]
    return [(k, slice(j * r, (j + 1) * r), rows[k]) for j, k in enumerate(kinds)]


def _peft_pair(moe: MoE, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Our adapters of `kind` per expert in PEFT's orientation: A [E, r, in], B [E, out, r]."""
    a, b = (np.asarray(getattr(moe, f"{kind}_lora_{x}")[...]) for x in "ab")
    return a.transpose(0, 2, 1), b.transpose(0, 2, 1)


def _peft_expert_tensors(layer: int, moe: MoE) -> dict[str, np.ndarray]:
    params = _expert_params(moe)
    out = {}
    for param in params:
        if param == "down_proj":
            a_e, b_e = _peft_pair(moe, "down")
        else:  # gate and up stacked along the rank, B block diagonal
            kinds = [k for k in ("gate", "up") if k in moe.lora_kinds]
            e, _, m = _shape(moe, kinds[0])
            a_e = np.concatenate([_peft_pair(moe, k)[0] for k in kinds], axis=1)
            b_e = np.zeros((e, 2 * m, a_e.shape[1]), np.float32)
            for kind, cols, rows in _gate_up_blocks(moe, a_e.shape[1]):
                b_e[:, rows, cols] = _peft_pair(moe, kind)[1]
        e, rank, _ = a_e.shape
        name = _expert_name(layer, params, param)
        out[f"{name}lora_A.weight"] = np.ascontiguousarray(a_e.reshape(e * rank, -1))
        b = b_e.transpose(1, 2, 0).reshape(b_e.shape[1], rank * e)  # column j * E + e
        out[f"{name}lora_B.weight"] = np.ascontiguousarray(b)
    return out


def peft_tensors(model: Mistral) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors content for a LoRA model."""
    out = {}
    for n, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoE) and layer.mlp.lora_kinds:
            out.update(_peft_expert_tensors(n, layer.mlp))
    for key, (a, b) in lora_pairs(model).items():
        _, i, part, weight = key.split("/")
        if model.config.is_moe and part == "mlp":
            continue  # the experts, above
        r = a.shape[-1]
        name = f"{PEFT_PREFIX}{i}.{HF_MODULES[weight]}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a).reshape(-1, r).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b).reshape(r, -1).T)
    return out


def _set_expert_tensors(
    layer: int, moe: MoE, tensors: Mapping[str, np.ndarray], source: str, seen: set[str]
) -> None:
    """PEFT's gate_up_proj / down_proj (or per-expert w1 / w3 / w2) adapters into a MoE
    module's per-expert adapters."""
    v4 = f"{PEFT_PREFIX}{layer}.block_sparse_moe.experts.0."
    if any(name.startswith(v4) for name in tensors):
        _set_v4_expert_tensors(layer, moe, tensors, source, seen)
        return
    params = _expert_params(moe)
    e = moe.num_experts
    for param in params:
        prefix = _expert_name(layer, params, param)
        a, b = (_tensor(tensors, f"{prefix}lora_{x}.weight", source, seen) for x in "AB")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] % e or a.shape[0] != b.shape[1]:
            raise MistralNNXError(
                f"{source}: adapter tensors '{prefix}lora_A/B.weight' have shapes "
                f"{list(a.shape)}, {list(b.shape)}: not {e} experts' adapters"
            )
        rank = a.shape[0] // e
        a_e = a.reshape(e, rank, -1).transpose(0, 2, 1)  # [E, in, R]
        b_e = b.reshape(b.shape[0], rank, e).transpose(2, 1, 0)  # [E, R, out]
        if param == "down_proj":
            blocks = [("down", slice(None), slice(None))]
        else:
            blocks = _gate_up_blocks(moe, rank)
        rest = b_e.copy()
        for kind, cols, rows in blocks:
            want_a, want_b = _shape(moe, f"{kind}_lora_a"), _shape(moe, f"{kind}_lora_b")
            value_a, value_b = a_e[:, :, cols], b_e[:, cols, rows]
            if value_a.shape != want_a or value_b.shape != want_b:
                raise MistralNNXError(
                    f"{source}: adapter '{prefix}lora_A/B.weight' (rank {rank}) does not fit "
                    f"this model's {kind} expert adapters (rank {want_a[-1]})"
                )
            getattr(moe, f"{kind}_lora_a").set_value(jnp.asarray(value_a, jnp.float32))
            getattr(moe, f"{kind}_lora_b").set_value(jnp.asarray(value_b, jnp.float32))
            rest[:, cols, rows] = 0
        if np.any(rest):
            raise MistralNNXError(
                f"{source}: adapter '{prefix}lora_B.weight' changes outputs that this model's "
                f"expert adapters ({', '.join(moe.lora_kinds)}) cannot express"
            )


def _set_v4_expert_tensors(
    layer: int, moe: MoE, tensors: Mapping[str, np.ndarray], source: str, seen: set[str]
) -> None:
    """transformers 4's per-expert adapters (lora_A [r, in], lora_B [out, r] of expert J's w1,
    w3, w2) stacked into ours (A [E, in, r], B [E, r, out])."""
    module = {kind: w for w, kind in V4_EXPERTS.items()}
    for kind in moe.lora_kinds:
        for x in "ab":
            names = [
                f"{PEFT_PREFIX}{layer}.block_sparse_moe.experts.{j}.{module[kind]}"
                f".lora_{x.upper()}.weight"
                for j in range(moe.num_experts)
            ]
            value = np.stack([_tensor(tensors, n, source, seen).T for n in names])
            var = getattr(moe, f"{kind}_lora_{x}")
            if value.shape != var.get_value().shape:
                want = list(var.get_value().shape[:0:-1])
                raise MistralNNXError(
                    f"{source}: adapter tensor '{names[0]}' has shape {list(value.shape[:0:-1])}, "
                    f"expected {want}"
                )
            var.set_value(jnp.asarray(value, jnp.float32))


def _tensor(tensors: Mapping[str, np.ndarray], name: str, source: str, seen: set[str]) -> Any:
    if name not in tensors:
        raise MistralNNXError(f"{source}: adapter tensor '{name}' is missing")
    seen.add(name)
    return np.asarray(tensors[name], np.float32)


def set_peft_tensors(model: Mistral, tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Copy PEFT-format adapters into a LoRA model's adapters (same targets and rank)."""
    seen: set[str] = set()
    for n, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoE) and layer.mlp.lora_kinds:
            _set_expert_tensors(n, layer.mlp, tensors, source, seen)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.LoRAParam):
            continue
        _, i, part, leaf = map(str, path)
        if model.config.is_moe and part == "mlp":
            continue  # the experts, above
        weight, _, ab = leaf.rpartition("_lora_")
        name = f"{PEFT_PREFIX}{i}.{HF_MODULES[weight]}.lora_{ab.upper()}.weight"
        t = _tensor(tensors, name, source, seen)
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
    tensors = peft_tensors(model)
    module_tensors = [n for n in tensors if ".mlp.experts." not in n]
    modules = sorted({name.split(".")[-3] for name in module_tensors})
    layers = sorted({int(n[len(PEFT_PREFIX) :].split(".")[0]) for n in module_tensors})
    parameters, rank_pattern, alpha_pattern = [], {}, {}
    for i, layer in enumerate(model.layers):
        if not (isinstance(layer.mlp, MoE) and layer.mlp.lora_kinds):
            continue
        for param in _expert_params(layer.mlp):
            name = f"model.layers.{i}.mlp.experts.{param}"  # exact names: only these layers
            parameters.append(name)
            rank = len(set(EXPERT_PARAMS[param]) & set(layer.mlp.lora_kinds)) * lora.rank
            if rank != lora.rank:  # gate and up stacked: rank 2r, the scaling unchanged
                rank_pattern[re.escape(name)] = rank
                alpha_pattern[re.escape(name)] = lora.alpha * rank / lora.rank
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        # PEFT refuses dropout on parameter (expert) adapters
        "lora_dropout": 0.0 if parameters else lora.dropout,
        "target_modules": modules,
        "layers_to_transform": layers or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if parameters:
        config.update(
            target_parameters=parameters, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        )

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

    return _atomic_dir(Path(out), write, overwrite)


def read_adapter_config(directory: Path, moe: bool = False) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory, for a model with experts (`moe`) or not."""
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
    rank, alpha = int(data["r"]), float(data["lora_alpha"])
    ranks, alphas = data.get("rank_pattern") or {}, data.get("alpha_pattern") or {}
    for key in set(ranks) | set(alphas):  # (our export's stacked gate / up: rank 2r, alpha 2a)
        if not math.isclose(alphas.get(key, alpha) / ranks.get(key, rank), alpha / rank):
            raise MistralNNXError(
                f"{path}: rank_pattern / alpha_pattern {key!r} changes the LoRA scaling "
                "(unsupported)"
            )
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        raise MistralNNXError(f"{path}: a regex target_modules is not supported")
    short = []
    for t in targets:
        if moe and str(t) in V4_EXPERTS:
            short.append(V4_EXPERTS[str(t)])
            continue
        weight = _TARGET_OF.get(str(t))
        if weight is None or (moe and weight in ("gate", "up", "down")):  # (experts: below)
            raise MistralNNXError(f"{path}: unsupported target module {t!r}")
        short.append(_SHORT[weight])
    layers = data.get("layers_to_transform")
    patterns = tuple(short)
    if layers is not None:
        layer_re = "(" + "|".join(str(int(i)) for i in layers) + ")"
        patterns = tuple(SHORT_TARGETS[s].replace(r"\d+", layer_re) for s in short)
    for t in data.get("target_parameters") or []:
        # "gate_up_proj" (every layer: PEFT ignores layers_to_transform for these) or
        # "model.layers.3.mlp.experts.gate_up_proj"
        kinds = EXPERT_PARAMS.get(str(t).rpartition(".")[2])
        if kinds is None or not moe:
            raise MistralNNXError(f"{path}: unsupported target parameter {t!r}")
        layer = re.search(r"layers\.(\d+)\.", str(t))
        patterns += tuple(
            SHORT_TARGETS[k].replace(r"\d+", layer.group(1)) if layer else SHORT_TARGETS[k]
            for k in kinds
        )
    return LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=patterns)


def load_adapters(model: Mistral, adapters: str | os.PathLike[str]) -> Mistral:
    """`model` with the PEFT adapters of directory `adapters` merged into its weights."""
    from safetensors.numpy import load_file

    directory = Path(adapters).expanduser()
    lora = read_adapter_config(directory, model.config.is_moe)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise MistralNNXError(f"{directory}: no {ADAPTER_WEIGHTS}")
    lora_model = apply_lora(model, lora)
    set_peft_tensors(lora_model, load_file(str(weights)), str(weights))
    return merge_lora(lora_model, lora.scaling)
