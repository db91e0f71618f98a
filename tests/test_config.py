"""MistralConfig against the published config.json / params.json of real Mistral models.

The files under tests/data/configs/<model>/ are the models' published configs; SOURCES.md says
where each one's values were confirmed (and which fields could not be).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mistral_nnx.config import MistralConfig, load_config
from mistral_nnx.errors import MistralNNXError

DATA = Path(__file__).parent / "data" / "configs"

V01 = "Mistral-7B-v0.1"
V03 = "Mistral-7B-v0.3"
NEMO = "Mistral-Nemo-Base-2407"
MINISTRAL = "Ministral-8B-Instruct-2410"
SMALL = "Mistral-Small-24B-Base-2501"
ALL_MODELS = [V01, V03, NEMO, MINISTRAL, SMALL]
# Models whose published params.json is kept here (Ministral's could not be confirmed verbatim).
WITH_PARAMS = [V01, V03, NEMO, SMALL]

# Published sizes: HF model pages (7.24B, 7.25B, 12.2B, 23.6B) and, exactly, Ministral's card
# ("Parameters 8,019,808,256").
PUBLISHED_PARAMS = {V01: 7.24e9, V03: 7.25e9, NEMO: 12.2e9, MINISTRAL: 8.02e9, SMALL: 23.6e9}
MINISTRAL_EXACT_PARAMS = 8_019_808_256

# Ministral-8B's interleaving, from its model card ("Attention Pattern: Ragged
# (128k,32k,32k,32k)") and the transformers Ministral docs ("1 full attention layer followed by 3
# sliding window attention layers"): a 4-layer pattern [full, 32768, 32768, 32768] that
# mistral-inference cycles over the 36 layers (9 repeats). Its config.json (model_type mistral)
# declares one window, 32768, for every layer.
MINISTRAL_WINDOW = 32768
MINISTRAL_LAYERS = 36
MINISTRAL_PATTERN: list[int | None] = [None, MINISTRAL_WINDOW, MINISTRAL_WINDOW, MINISTRAL_WINDOW]
MINISTRAL_EXPECTED = tuple(MINISTRAL_PATTERN * (MINISTRAL_LAYERS // 4))
# Ministral's published params.json could not be found verbatim, so its params.json is built from
# the confirmed values (model card + config.json). The full layer may be spelled null (mistral-
# inference and vLLM both read null as full attention) or 131072 (the card's "128k").
MINISTRAL_PARAMS_BASE: dict[str, Any] = {
    "dim": 4096,
    "n_layers": 36,
    "head_dim": 128,
    "hidden_dim": 12288,
    "n_heads": 32,
    "n_kv_heads": 8,
    "rope_theta": 100000000.0,
    "norm_eps": 1e-05,
    "vocab_size": 131072,
}
MINISTRAL_PATTERN_SPELLINGS = {
    "null-for-full": [None, 32768, 32768, 32768],
    "128k-for-full": [131072, 32768, 32768, 32768],
}


def read(model: str, name: str) -> dict[str, Any]:
    return json.loads((DATA / model / name).read_text())


def hf(model: str) -> MistralConfig:
    return MistralConfig.from_hf(read(model, "config.json"))


def ministral_params(spelling: str = "null-for-full", **extra: Any) -> dict[str, Any]:
    return {
        **MINISTRAL_PARAMS_BASE,
        "sliding_window": list(MINISTRAL_PATTERN_SPELLINGS[spelling]),
        **extra,
    }


def native(model: str) -> MistralConfig:
    if model == MINISTRAL:
        return MistralConfig.from_mistral(ministral_params(max_seq_len=131072))
    return MistralConfig.from_mistral(read(model, "params.json"))


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def full_or_window(windows: tuple[int | None, ...], context: int) -> tuple[int | None, ...]:
    """Windows with "as long as the context" written as None (both mean full attention)."""
    return tuple(None if w is None or w >= context else w for w in windows)


# ---- the data files themselves ------------------------------------------------------------------
def test_every_data_file_is_a_json_object_and_has_a_source() -> None:
    sources = (DATA / "SOURCES.md").read_text()
    files = sorted(DATA.glob("*/*.json"))
    assert {f.parent.name for f in files} == set(ALL_MODELS) | set(MOE_AND_GENERATION_3)
    for f in files:
        assert isinstance(json.loads(f.read_text()), dict), f
        assert f"{f.parent.name}/{f.name}" in sources, f"{f} is not listed in SOURCES.md"
    for model in WITH_PARAMS:
        assert (DATA / model / "params.json").is_file()


# ---- parsing and agreement ----------------------------------------------------------------------
@pytest.mark.parametrize("model", ALL_MODELS)
def test_config_json_parses(model: str) -> None:
    config = hf(model)
    data = read(model, "config.json")
    assert config.hidden_size == data["hidden_size"]
    assert config.num_layers == data["num_hidden_layers"] == len(config.layer_windows)
    assert config.vocab_size == data["vocab_size"]
    assert config.rope_scaling is None
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)


@pytest.mark.parametrize("model", WITH_PARAMS)
def test_params_json_parses(model: str) -> None:
    config = MistralConfig.from_mistral(read(model, "params.json"))
    data = read(model, "params.json")
    assert config.hidden_size == data["dim"]
    assert config.num_layers == data["n_layers"] == len(config.layer_windows)
    assert config.intermediate_size == data["hidden_dim"]
    assert config.head_dim == data["head_dim"]


SIZE_FIELDS = [
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_config_json_and_params_json_agree_on_sizes(model: str) -> None:
    a, b = hf(model), native(model)
    for field in SIZE_FIELDS:
        assert getattr(a, field) == getattr(b, field), field
    assert a.num_parameters() == b.num_parameters()


@pytest.mark.parametrize("model", [V01, V03, NEMO, SMALL])
def test_config_json_and_params_json_agree_on_windows(model: str) -> None:
    assert hf(model).layer_windows == native(model).layer_windows


@pytest.mark.parametrize("model", ALL_MODELS)
def test_load_config_on_the_published_directory_reads_config_json(model: str) -> None:
    config = load_config(DATA / model)
    assert config == hf(model)


@pytest.mark.parametrize("model", WITH_PARAMS)
def test_load_config_falls_back_to_params_json(model: str, tmp_path: Path) -> None:
    shutil.copy(DATA / model / "params.json", tmp_path / "params.json")
    assert load_config(tmp_path) == MistralConfig.from_mistral(read(model, "params.json"))


# ---- parameter counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", ALL_MODELS)
def test_parameter_count_matches_published_size(model: str) -> None:
    assert hf(model).num_parameters() == pytest.approx(PUBLISHED_PARAMS[model], rel=0.005)
    assert native(model).num_parameters() == pytest.approx(PUBLISHED_PARAMS[model], rel=0.005)


def test_ministral_parameter_count_is_exactly_the_model_card_figure() -> None:
    assert hf(MINISTRAL).num_parameters() == MINISTRAL_EXACT_PARAMS


# ---- model-specific shapes and windows ----------------------------------------------------------
def test_v01_has_window_4096_on_every_layer() -> None:
    for config in (hf(V01), native(V01), load_config(DATA / V01)):
        assert config.layer_windows == (4096,) * 32
        assert config.sliding_window == 4096
        assert config.rope_theta == 10000.0


def test_v03_has_no_window() -> None:
    for config in (hf(V03), native(V03), load_config(DATA / V03)):
        assert config.layer_windows == (None,) * 32
        assert config.sliding_window is None
        assert config.vocab_size == 32768
        assert config.rope_theta == 1_000_000.0


def test_nemo_head_dim_is_explicit_and_not_hidden_over_heads() -> None:
    for config in (hf(NEMO), native(NEMO)):
        assert config.head_dim == 128
        assert config.num_heads == 32
        assert config.num_heads * config.head_dim == 4096 != config.hidden_size == 5120
        assert config.layer_windows == (None,) * 40
    # Without head_dim, hidden // heads would give 160: the explicit field must win.
    assert read(NEMO, "config.json")["hidden_size"] // 32 == 160


def test_small_24b_shapes() -> None:
    config = hf(SMALL)
    assert (config.hidden_size, config.num_layers, config.intermediate_size) == (5120, 40, 32768)
    assert config.head_dim == 128 and config.rope_theta == 100_000_000.0
    assert config.layer_windows == (None,) * 40


def test_ministral_config_json_alone_declares_one_window_for_all_layers() -> None:
    # The HF config.json (model_type mistral) cannot express the interleaving.
    assert hf(MINISTRAL).layer_windows == (MINISTRAL_WINDOW,) * MINISTRAL_LAYERS


def ministral_dir(tmp_path: Path, params: dict[str, Any]) -> Path:
    shutil.copy(DATA / MINISTRAL / "config.json", tmp_path / "config.json")
    write_json(tmp_path / "params.json", params)
    return tmp_path


@pytest.mark.parametrize("spelling", sorted(MINISTRAL_PATTERN_SPELLINGS))
def test_ministral_windows_via_load_config_with_declared_context(
    spelling: str, tmp_path: Path
) -> None:
    # params.json pattern [full, 32768, 32768, 32768] cycled over 36 layers; sizes from config.json.
    config = load_config(ministral_dir(tmp_path, ministral_params(spelling, max_seq_len=131072)))
    assert full_or_window(config.layer_windows, 131072) == MINISTRAL_EXPECTED
    assert config.hidden_size == 4096 and config.num_layers == MINISTRAL_LAYERS


@pytest.mark.parametrize("spelling", sorted(MINISTRAL_PATTERN_SPELLINGS))
def test_ministral_windows_via_load_config(spelling: str, tmp_path: Path) -> None:
    # params.json pattern [full, 32768, 32768, 32768] cycled over 36 layers, with no max_seq_len
    # (as the other published params.json files here have none): the 32k layers must keep 32768.
    config = load_config(ministral_dir(tmp_path, ministral_params(spelling)))
    assert full_or_window(config.layer_windows, 131072) == MINISTRAL_EXPECTED


def test_ministral_type_config_json_layer_types_interleave() -> None:
    # transformers' `ministral` model_type writes the interleaving as layer_types.
    data = {
        **read(MINISTRAL, "config.json"),
        "model_type": "ministral",
        "architectures": ["MinistralForCausalLM"],
        "layer_types": [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
        ]
        * 9,
    }
    config = MistralConfig.from_hf(data)
    assert config.model_type == "ministral"
    assert config.layer_windows == MINISTRAL_EXPECTED
    assert config.sliding_window is None  # some layer sees everything


def test_layer_types_of_wrong_length_is_refused() -> None:
    data = {
        **read(MINISTRAL, "config.json"),
        "model_type": "ministral",
        "layer_types": ["full_attention"] * 4,
    }
    with pytest.raises(MistralNNXError, match=r"config\.json.*'layer_types'"):
        MistralConfig.from_hf(data)


# ---- other accepted forms -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "rope_parameters",
    [{"rope_theta": 1000000.0}, {"rope_theta": 1000000.0, "rope_type": "default"}],
)
def test_transformers_v5_rope_parameters_is_read(rope_parameters: dict[str, Any]) -> None:
    data = read(V03, "config.json")
    del data["rope_theta"]
    data["rope_parameters"] = rope_parameters
    config = MistralConfig.from_hf(data)
    assert config.rope_theta == 1_000_000.0
    assert config.rope_scaling is None


def test_transformers_v5_rope_parameters_with_llama3_scaling() -> None:
    data = read(V03, "config.json")
    del data["rope_theta"]
    data["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = MistralConfig.from_hf(data)
    assert config.rope_theta == 500000.0
    scaling = config.rope_scaling_dict
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert "rope_theta" not in scaling


def test_llama_config_ignores_sliding_window() -> None:
    data = {
        **read(V01, "config.json"),
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }
    assert data["sliding_window"] == 4096
    config = MistralConfig.from_hf(data)
    assert config.model_type == "llama"
    assert config.layer_windows == (None,) * 32


# ---- refusals: one MistralNNXError naming the file and the field --------------------------------
def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {**read(V03, "config.json"), "model_type": "gemma3"})
    with pytest.raises(MistralNNXError) as info:
        load_config(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "config.json") in msg
    assert "model_type" in msg and "gemma3" in msg


@pytest.mark.parametrize(
    "change",
    [
        {"rope_scaling": {"type": "longrope", "factor": 4.0}},
        {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "su", "rope_theta": 1000000.0, "factor": 4.0}},
    ],
)
def test_unknown_rope_types_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(MistralNNXError) as info:
        MistralConfig.from_hf({**read(V03, "config.json"), **change})
    msg = str(info.value)
    assert "rope scaling type" in msg and "supported" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "change",
    [
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
    ],
)
def test_yarn_is_read_from_mistral_configs(change: dict[str, Any]) -> None:
    config = MistralConfig.from_hf({**read(V03, "config.json"), **change})
    scaling = config.rope_scaling_dict
    assert scaling["rope_type"] == "yarn" and scaling["factor"] == 4.0
    # transformers' default for a missing pretraining length: max_position_embeddings.
    assert scaling["original_max_position_embeddings"] in (8, 32768)
    assert config.llama4_scaling_beta is None  # only ministral3 scales queries


def test_params_json_yarn_and_llama4_blocks_are_read() -> None:
    data = {
        **read(V03, "params.json"),
        "yarn": {
            "factor": 16.0,
            "original_max_position_embeddings": 16384,
            "beta": 32.0,
            "alpha": 1.0,
            "apply_scale": False,
        },
        "llama_4_scaling": {"original_max_position_embeddings": 16384, "beta": 0.1},
    }
    config = MistralConfig.from_mistral(data)
    assert config.rope_scaling_dict == {
        "rope_type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": 1.0,
    }
    assert (config.llama4_scaling_beta, config.llama4_scaling_original_max) == (0.1, 16384)
    applied = MistralConfig.from_mistral({**data, "yarn": {**data["yarn"], "apply_scale": True}})
    assert "attention_factor" not in applied.rope_scaling_dict  # YaRN's 0.1 ln(factor) + 1


@pytest.mark.parametrize(
    "block, field",
    [
        ({"yarn": {"factor": 4.0}}, "yarn.original_max_position_embeddings"),
        ({"yarn": {"factor": 4.0, "original_max_position_embeddings": 8, "gamma": 1}}, "gamma"),
        ({"llama_4_scaling": {"beta": 0.1}}, "llama_4_scaling.original_max_position_embeddings"),
        ({"moe": {"num_experts": 8}}, "moe.num_experts_per_tok"),
        ({"moe": {"num_experts": 8, "num_experts_per_tok": 9}}, "num_experts_per_tok (9)"),
        ({"moe": {"num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1}}, "shared"),
        ({"q_lora_rank": 1536}, "q_lora_rank"),
    ],
)
def test_params_json_bad_blocks_are_refused(block: dict[str, Any], field: str) -> None:
    with pytest.raises(MistralNNXError) as info:
        MistralConfig.from_mistral({**read(V03, "params.json"), **block})
    msg = str(info.value)
    assert msg.startswith("params.json") and field in msg and "\n" not in msg


@pytest.mark.parametrize("builder", ["hf", "native"])
def test_heads_not_a_multiple_of_kv_heads_is_refused(builder: str) -> None:
    if builder == "hf":
        data = {**read(V03, "config.json"), "num_key_value_heads": 5}
        build = MistralConfig.from_hf
    else:
        data = {**read(V03, "params.json"), "n_kv_heads": 5}
        build = MistralConfig.from_mistral
    with pytest.raises(MistralNNXError) as info:
        build(data)
    msg = str(info.value)
    assert "num_attention_heads (32)" in msg and "num_key_value_heads (5)" in msg


def test_hidden_not_divisible_by_heads_without_head_dim_is_refused() -> None:
    data = read(NEMO, "config.json")
    del data["head_dim"]
    data["num_attention_heads"] = 48  # 5120 / 48 is not whole
    with pytest.raises(MistralNNXError, match=r"config\.json.*hidden_size.*head_dim"):
        MistralConfig.from_hf(data)


@pytest.mark.parametrize(
    "name, change",
    [
        ("config.json", {"num_key_value_heads": 5}),
        ("config.json", {"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}),
        ("params.json", {"n_kv_heads": 5}),
    ],
)
def test_validation_refusals_name_the_file(
    name: str, change: dict[str, Any], tmp_path: Path
) -> None:
    write_json(tmp_path / name, {**read(V03, name), **change})
    with pytest.raises(MistralNNXError) as info:
        load_config(tmp_path)
    assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize(
    "name, field",
    [
        ("config.json", "hidden_size"),
        ("config.json", "num_hidden_layers"),
        ("config.json", "vocab_size"),
        ("config.json", "intermediate_size"),
        ("params.json", "dim"),
        ("params.json", "n_layers"),
        ("params.json", "hidden_dim"),
        ("params.json", "vocab_size"),
    ],
)
def test_missing_required_field_is_refused_without_keyerror(
    name: str, field: str, tmp_path: Path
) -> None:
    data = read(V03, name)
    del data[field]
    write_json(tmp_path / name, data)
    with pytest.raises(MistralNNXError) as info:  # a KeyError would escape pytest.raises
        load_config(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and f"'{field}'" in msg and "missing" in msg


def test_wrong_field_type_is_refused() -> None:
    data = {**read(V03, "config.json"), "hidden_size": "4096"}
    with pytest.raises(MistralNNXError, match=r"config\.json.*'hidden_size'.*integer"):
        MistralConfig.from_hf(data)


def test_params_json_with_moe_is_read(tmp_path: Path) -> None:
    data = {**read(V03, "params.json"), "moe": {"num_experts": 8, "num_experts_per_tok": 2}}
    write_json(tmp_path / "params.json", data)
    config = load_config(tmp_path)
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
    assert config.model_type == "mixtral"


@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_invalid_json_is_refused(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_text('{"hidden_size": 4096,')
    with pytest.raises(MistralNNXError) as info:
        load_config(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and "not valid JSON" in msg


def test_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", [1, 2, 3])
    with pytest.raises(MistralNNXError, match=r"config\.json.*JSON object"):
        load_config(tmp_path)


def test_directory_with_neither_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(MistralNNXError) as info:
        load_config(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "config.json" in msg and "params.json" in msg


def test_refusal_is_one_line() -> None:
    with pytest.raises(MistralNNXError) as info:
        MistralConfig.from_hf({**read(V03, "config.json"), "model_type": "gemma3"})
    assert "\n" not in str(info.value)


# ---- Mixtral and the Mistral 3 generation (see SOURCES.md) ---------------------------------------
MIXTRAL_7 = "Mixtral-8x7B-v0.1"
MIXTRAL_22 = "Mixtral-8x22B-v0.1"
SMALL_32 = "Mistral-Small-3.2-24B-Instruct-2506"
MINISTRAL3 = {3: "Ministral-3-3B-Instruct-2512", 8: "Ministral-3-8B-Instruct-2512"}
MINISTRAL3[14] = "Ministral-3-14B-Instruct-2512"
DEVSTRAL_2 = "Devstral-Small-2-24B-Instruct-2512"
MOE_AND_GENERATION_3 = [MIXTRAL_7, MIXTRAL_22, SMALL_32, *MINISTRAL3.values(), DEVSTRAL_2]


@pytest.mark.parametrize(
    "model, total, active",
    [(MIXTRAL_7, 46.7e9, 12.9e9), (MIXTRAL_22, 141e9, 39e9)],
)
def test_mixtral_parameter_counts_match_published_sizes(
    model: str, total: float, active: float
) -> None:
    config = hf(model)
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
    assert config.num_parameters() == pytest.approx(total, rel=0.005)
    assert config.num_parameters(active=True) == pytest.approx(active, rel=0.005)
    assert config.layer_windows == (None,) * config.num_layers
    assert config.rope_theta == 1e6


def test_mixtral_params_json_agrees_with_config_json() -> None:
    native = MistralConfig.from_mistral(read(MIXTRAL_7, "params.json"))
    assert native.num_parameters() == hf(MIXTRAL_7).num_parameters()
    assert (native.num_experts, native.num_experts_per_tok) == (8, 2)


def test_small_32_loads_its_text_model() -> None:
    """mistral3 wrapper around a mistral text model: the same backbone as Small-24B-2501
    (23.6B), plus a 0.4B vision tower that is not built: 24B in all."""
    config = hf(SMALL_32)
    assert config.wrapper == "mistral3" and config.model_type == "mistral"
    assert config.rope_theta == 1e9 and config.rope_scaling is None
    assert config.num_parameters() == hf(SMALL).num_parameters()
    assert config.num_parameters() + 0.4e9 == pytest.approx(24e9, rel=0.01)


@pytest.mark.parametrize("size, lm_params", [(3, 3.4e9), (8, 8.4e9), (14, 13.5e9)])
def test_ministral3_text_models(size: int, lm_params: float) -> None:
    config = hf(MINISTRAL3[size])
    assert config.wrapper == "mistral3" and config.model_type == "ministral3"
    assert config.rope_scaling_dict == {
        "rope_type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    assert (config.llama4_scaling_beta, config.llama4_scaling_original_max) == (0.1, 16384)
    assert config.tie_word_embeddings == (size == 3)
    # Model cards: "a {3.4, 8.4, 13.5}B language model and a 0.4B vision encoder".
    assert config.num_parameters() == pytest.approx(lm_params, rel=0.015)


def test_ministral3_attention_factor_is_one() -> None:
    """mscale == mscale_all_dim: YaRN's attention factor is 1.0 (not 0.1 ln 16 + 1)."""
    from mistral_nnx.rope import rope_parameters

    assert rope_parameters(hf(MINISTRAL3[8]))[1] == 1.0


def test_devstral_small_2_is_ministral3_on_the_small_backbone() -> None:
    config = hf(DEVSTRAL_2)
    assert config.wrapper == "mistral3" and config.model_type == "ministral3"
    assert config.rope_theta == 1e8
    scaling = config.rope_scaling_dict
    assert (scaling["factor"], scaling["original_max_position_embeddings"]) == (48.0, 8192)
    assert (config.llama4_scaling_beta, config.llama4_scaling_original_max) == (0.1, 8192)
    assert config.num_parameters() == hf(SMALL).num_parameters()  # 23.6B + 0.4B vision: "24B"
