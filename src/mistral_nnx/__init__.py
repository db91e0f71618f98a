"""mistral_nnx: Mistral-family language models in Flax NNX.

The public names are imported on first use (PEP 562), so that `import mistral_nnx.cli` or
`mistral_nnx.errors` does not pay for importing JAX: the CLI installs its Ctrl-C handling and
checks its arguments before the heavy imports start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mistral_nnx.errors import MistralNNXError

if TYPE_CHECKING:
    from mistral_nnx.batching import Engine, Request
    from mistral_nnx.checkpoint.loader import load_model
    from mistral_nnx.checkpoint.orbax_io import save_model
    from mistral_nnx.config import MistralConfig, load_config
    from mistral_nnx.engine import Completion, Delta, EngineOptions, generate, stream
    from mistral_nnx.model import Mistral
    from mistral_nnx.sampling import SamplingParams
    from mistral_nnx.sharding import make_mesh
    from mistral_nnx.tokenizer import Tokenizer, load_tokenizer
    from mistral_nnx.train.loss import loss

_WHERE = {
    "Engine": "mistral_nnx.batching",
    "Request": "mistral_nnx.batching",
    "load_model": "mistral_nnx.checkpoint.loader",
    "save_model": "mistral_nnx.checkpoint.orbax_io",
    "MistralConfig": "mistral_nnx.config",
    "load_config": "mistral_nnx.config",
    "Completion": "mistral_nnx.engine",
    "Delta": "mistral_nnx.engine",
    "EngineOptions": "mistral_nnx.engine",
    "generate": "mistral_nnx.engine",
    "stream": "mistral_nnx.engine",
    "Mistral": "mistral_nnx.model",
    "SamplingParams": "mistral_nnx.sampling",
    "make_mesh": "mistral_nnx.sharding",
    "Tokenizer": "mistral_nnx.tokenizer",
    "load_tokenizer": "mistral_nnx.tokenizer",
    "loss": "mistral_nnx.train.loss",
}

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineOptions",
    "Mistral",
    "MistralConfig",
    "MistralNNXError",
    "Request",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "load_config",
    "load_model",
    "load_tokenizer",
    "loss",
    "make_mesh",
    "save_model",
    "stream",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mistral_nnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
