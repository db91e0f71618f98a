"""mistral_nnx: Mistral-family language models in Flax NNX."""

from mistral_nnx.config import MistralConfig, load_config
from mistral_nnx.errors import MistralNNXError

__all__ = ["MistralConfig", "MistralNNXError", "load_config"]
