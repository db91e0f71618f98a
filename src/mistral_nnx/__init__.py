"""mistral_nnx: Mistral-family language models in Flax NNX."""

from mistral_nnx.checkpoint.loader import load_model
from mistral_nnx.checkpoint.orbax_io import save_model
from mistral_nnx.config import MistralConfig, load_config
from mistral_nnx.engine import Completion, Delta, EngineOptions, generate, stream
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sampling import SamplingParams
from mistral_nnx.sharding import make_mesh
from mistral_nnx.tokenizer import Tokenizer, load_tokenizer
from mistral_nnx.train.loss import loss

__all__ = [
    "Completion",
    "Delta",
    "EngineOptions",
    "Mistral",
    "MistralConfig",
    "MistralNNXError",
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
