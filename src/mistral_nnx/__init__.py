"""mistral_nnx: Mistral-family language models in Flax NNX."""

from mistral_nnx.checkpoint.loader import load_model
from mistral_nnx.checkpoint.orbax_io import save_model
from mistral_nnx.config import MistralConfig, load_config
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.sharding import make_mesh

__all__ = ["Mistral", "MistralConfig", "MistralNNXError", "load_config", "load_model",
           "make_mesh", "save_model"]
