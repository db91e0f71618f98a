"""load_model: resolve a source, read its config, stream its tensors into their final shards."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mistral_nnx.checkpoint import names, vlm
from mistral_nnx.checkpoint.safetensors_io import iter_safetensors, read_header, shard_files
from mistral_nnx.config import MistralConfig, load_config
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sharding import Rules, Sharder

ORBAX_MARKER = "mistral_nnx.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_TOKENIZER = ["*.json", "tokenizer.model*", "*.jinja"]


def _hub_patterns(files: list[str]) -> list[str]:
    """Download one weight format only: Mistral repos ship both HF shards and consolidated
    files, and fetching both doubles the download."""
    if any(f.startswith("model") and f.endswith(".safetensors") for f in files):
        return [*_HUB_TOKENIZER, "model*.safetensors"]
    if any(f.startswith("consolidated") and f.endswith(".safetensors") for f in files):
        return [*_HUB_TOKENIZER, "consolidated*.safetensors"]
    return _HUB_TOKENIZER + ["*.safetensors"]


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local path as is; a Hugging Face hub id downloaded into the standard HF cache.

    Offline (`HF_HUB_OFFLINE=1`, or the hub not reachable within a few seconds) a hub id is
    served from the local HF cache only, and a miss is one clear error, not retries.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise MistralNNXError(
            f"source must be a path or a hub id (a string), got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _from_hub(text)
    raise MistralNNXError(f"model path '{text}' does not exist")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else _hub_unreachable()
    if why:
        try:  # whatever an earlier download left in the local cache
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:
            raise MistralNNXError(
                f"cannot download '{repo_id}' ({why}) and it is not in the local Hugging Face "
                "cache; pass a local directory or .gguf file instead"
            ) from None
    try:
        patterns = _hub_patterns(HfApi().list_repo_files(repo_id))
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # auth, missing repo, network lost midway: one line for the user
        raise MistralNNXError(
            f"cannot download '{repo_id}' from the Hugging Face hub ({type(e).__name__}); "
            "with no network, pass a local directory or .gguf file path instead"
        ) from None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one TCP connect to its endpoint), or None if it can."""
    import socket
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"no network: {host} is unreachable ({e.strerror or type(e).__name__})"


def detect_format(path: Path) -> str:
    """'gguf', 'orbax', 'hf' or 'native'; a clear refusal for anything else."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix in _PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        raise MistralNNXError(f"{path}: unknown model format (expected a directory or a .gguf)")
    if (path / ORBAX_MARKER).exists():
        return "orbax"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return "hf"
    if (path / "consolidated.safetensors").exists() or (
        path / "consolidated.safetensors.index.json"
    ).exists():
        return "native"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if len(ggufs) > 1:
        raise MistralNNXError(
            f"{path}: holds several GGUF files ({', '.join(p.name for p in ggufs)}); "
            "pass the one to load"
        )
    pickles = [p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refusal(pickles[0])
    raise MistralNNXError(
        f"{path}: unknown model format (no model.safetensors, "
        "consolidated.safetensors, .gguf or mistral_nnx checkpoint)"
    )


def _pickle_refusal(path: Path) -> MistralNNXError:
    return MistralNNXError(
        f"{path}: pickled checkpoints are never loaded (unpickling runs arbitrary code); convert "
        "it once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
        ".save_pretrained(out, safe_serialization=True)"
    )


def read_model_config(path: Path) -> MistralConfig:
    """The config of a resolved source of any format, without reading its weights (so that
    arguments can be checked against it before the slow part of loading)."""
    fmt = detect_format(path)
    if fmt == "orbax":
        from mistral_nnx.checkpoint.orbax_io import read_marker

        return read_marker(path)
    if fmt == "gguf":
        from mistral_nnx.checkpoint.gguf import read_gguf_config

        return read_gguf_config(gguf_file(path))
    return load_config(path)


def gguf_file(path: Path) -> Path:
    return path if path.is_file() else sorted(path.glob("*.gguf"))[0]


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: str | Rules | None = None,
    progress: bool = True,
    adapters: str | os.PathLike[str] | None = None,
    mmap: bool = True,
) -> Mistral:
    """Load a checkpoint (HF safetensors, Mistral native, GGUF or this project's orbax format).

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`). With a
    `mesh`, every tensor goes straight into its shards under `rules` (a preset name or mapping).
    `adapters`: a LoRA adapter directory in PEFT's format, merged into the weights.

    `mmap` (safetensors and GGUF; orbax ignores it): a tensor stored as the model holds it
    (same dtype and layout, 64-byte aligned in the file) is used in place from the file's pages,
    not copied. Like llama.cpp's mmap, the weights then share the page cache: truncating the
    file in place while the model lives crashes the process (SIGBUS), and rewriting it in place
    changes the weights; writers that replace files atomically (write elsewhere, then rename)
    are safe. `mmap=False` copies every tensor into process memory, after which the file may
    change or go.
    """
    if adapters is not None:
        from mistral_nnx.train.export import load_adapters

        base = load_model(
            source,
            dtype=dtype,
            param_dtype=param_dtype,
            mesh=mesh,
            rules=rules,
            progress=progress,
            mmap=mmap,
        )
        return load_adapters(base, adapters)
    dtype = _float_dtype(dtype, "dtype")
    param_dtype = dtype if param_dtype is None else _float_dtype(param_dtype, "param_dtype")
    path = resolve_source(source)
    fmt = detect_format(path)
    sharder = Sharder(mesh, rules) if mesh is not None else None
    if fmt == "orbax":
        from mistral_nnx.checkpoint.orbax_io import load_orbax

        return attach_sharder(
            load_orbax(path, dtype=dtype, param_dtype=param_dtype, sharder=sharder), sharder
        )
    if fmt == "gguf":
        from mistral_nnx.checkpoint.gguf import iter_gguf_tensors, read_gguf_config

        file = gguf_file(path)
        config = read_gguf_config(file)
        # mmap: plain tensors already stored in param_dtype come as views of the file
        mapped_dtype = np.dtype(param_dtype) if mmap else None
        tensors: Iterator[tuple[str, np.ndarray, Path]] = (
            (n, w, file) for n, w in iter_gguf_tensors(file, config, mapped_dtype)
        )
    else:
        config = load_config(path)
        if fmt == "hf":
            files = shard_files(path, "model.safetensors.index.json", "model.safetensors")
            if config.wrapper is not None:  # mistral3: its text model only
                config, tensors = vlm.text_tensors(files, config, path)
            else:
                tensors = iter_safetensors(files)
        else:
            files = shard_files(
                path, "consolidated.safetensors.index.json", "consolidated.safetensors"
            )
            if config.wrapper is not None:  # vision-language: its text model only
                config, native = vlm.text_tensors(files, config, path, native=True)
            else:
                native = iter_safetensors(files)
            tensors = (names.native_to_hf(n, w, config) + (f,) for n, w, f in native)
        for f in files:  # check every header before placing anything
            read_header(f)
    if config.is_moe:  # per-expert or packed expert tensors -> one stacked array per kind
        tensors = names.stack_experts(tensors, config)
    model = abstract_model(config, dtype, param_dtype)
    model = place_tensors(
        model, tensors, config, param_dtype, sharder, str(path), progress, mapped=mmap
    )
    return attach_sharder(model, sharder)


def attach_sharder(model: Mistral, sharder: Sharder | None) -> Mistral:
    """Remember the mesh + rules on the model, so generate() shards its cache and activations
    the same way (a static attribute: it travels in the graphdef, not in the state)."""
    if sharder is not None:
        model.sharder = sharder
    return model


def _float_dtype(value: Any, name: str) -> Any:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise MistralNNXError(
            f"{name} must be a floating dtype such as 'float32' or 'bfloat16', got {value!r}"
        )
    return dtype


def abstract_model(config: MistralConfig, dtype: Any, param_dtype: Any) -> Mistral:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no random init."""
    return Mistral(config, dtype=dtype, param_dtype=param_dtype, abstract=True)


def param_sharding(var: Any, sharder: Sharder | None, name: str) -> jax.sharding.Sharding:
    shape = var.get_value().shape
    if sharder is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return sharder(
        shape, var.get_metadata().get("logical_axes", (None,) * len(shape)), strict=True, name=name
    )


def check_shardable(model: Mistral, sharder: Sharder | None) -> None:
    """Refuse uneven parameter sharding before any weight is read."""
    if sharder is None:
        return
    for path, var in nnx.to_flat_state(nnx.state(model)):
        param_sharding(var, sharder, ".".join(map(str, path)))


def place_tensors(
    model: Mistral,
    tensors: Iterator[tuple[str, np.ndarray, Path]],
    config: MistralConfig,
    param_dtype: Any,
    sharder: Sharder | None,
    source: str,
    progress: bool,
    mapped: bool = False,
) -> Mistral:
    """Map, transform, cast and place each tensor into the abstract model; all or nothing.
    `mapped`: a tensor the model can use as it is stays a view of its file map (zero-copy)."""
    check_shardable(model, sharder)
    graphdef, state = nnx.split(model)
    targets = dict(nnx.to_flat_state(state))
    # the cast is fused into the re-layout
    table = names.hf_table(config, np.dtype(param_dtype), mapped)
    loaded: set[tuple[Any, ...]] = set()
    bar = tqdm(
        total=len(targets),
        desc="loading",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )

    def prepare(item: tuple[str, np.ndarray, Path]) -> tuple[tuple[Any, ...], np.ndarray] | None:
        """Name -> model path, layout change + cast, shape check (runs one tensor ahead, in a
        thread). `array` may be a view of a file map: the transform copies it out, or with
        `mapped` keeps it when it is already what the model holds."""
        name, array, file = item
        if names.IGNORED_HF.match(name):
            return None
        if config.tie_word_embeddings and name == "lm_head.weight":
            return None  # tied checkpoints sometimes store the shared matrix twice
        found = _lookup(table, name)
        if found is None or found[0] not in targets:
            raise MistralNNXError(f"{file}: unexpected tensor '{name}' for this config")
        path, transform = found
        expected = tuple(targets[path].get_value().shape)
        try:
            value = transform(array)
        except ValueError:  # a reshape that cannot fit: reported below as a shape mismatch
            value = array
        if tuple(value.shape) != expected:
            raise MistralNNXError(
                f"{file}: tensor '{name}' has shape {list(array.shape)}, which disagrees with "
                f"the config (expected {list(expected)} after layout change)"
            )
        return path, value

    # Reading and re-layout of the next tensor run in a thread while this one is placed.
    with bar:
        for prepared in _prefetch(tensors, prepare):
            if prepared is None:
                continue
            path, value = prepared
            var = targets[path]
            sharding = param_sharding(var, sharder, ".".join(map(str, path)))
            var.set_value(_place(value, param_dtype, sharding))
            loaded.add(path)
            bar.update()
    missing = [".".join(map(str, p)) for p in targets if p not in loaded]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MistralNNXError(f"{source}: checkpoint is missing tensor for '{missing[0]}'{more}")
    return nnx.merge(graphdef, state)


_DONE = object()


def _prefetch(items: Iterator[Any], fn: Callable[[Any], Any]) -> Iterator[Any]:
    """fn(item) for each item, computed one item ahead in a background thread (file reads and
    numpy copies release the GIL, so the stages run in parallel)."""

    def work() -> Any:
        try:
            item = next(items)
        except StopIteration:
            return _DONE
        return fn(item)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(work)
        while (result := pending.result()) is not _DONE:
            pending = pool.submit(work)
            yield result


def _lookup(table: list[Any], name: str) -> tuple[tuple[Any, ...], Any] | None:
    """(model path, transform) of the first row whose pattern matches `name`."""
    for pattern, path_fn, transform in table:
        m = pattern.fullmatch(name)
        if m:
            return path_fn(m), transform
    return None


def _place(value: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Put each device's slice, cast, on that device: no device sees the whole tensor unless its
    sharding says so, and multi-host works (each process feeds only its own devices). A slice
    that is contiguous, 64-byte aligned and in `dtype` is adopted by JAX's CPU backend without a
    copy (a read-only file map included: XLA never writes into it, donated or not); JAX copies
    any other."""
    dtype = np.dtype(dtype)
    return jax.make_array_from_callback(
        value.shape, sharding, lambda index: np.ascontiguousarray(value[index], dtype=dtype)
    )
