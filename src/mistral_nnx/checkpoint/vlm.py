"""Vision-language checkpoints (mistral3): read the text model only.

The vision tower and projector tensors are skipped by name from the safetensors headers, so their
bytes are never read. The head is tied only when the checkpoint has no lm_head.weight of its own
(a mistral3 config.json may say tie_word_embeddings=true while the file holds a separate head).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mistral_nnx.checkpoint.names import Tensors, native_text_name, text_model_name
from mistral_nnx.checkpoint.safetensors_io import read_header, read_tensor
from mistral_nnx.config import MistralConfig
from mistral_nnx.errors import MistralNNXError


def text_tensors(
    files: list[Path], config: MistralConfig, source: Path, native: bool = False
) -> tuple[MistralConfig, Tensors]:
    """(config with the head tying settled, iterator over the text model's tensors). HF names
    come out as the text model's HF names; `native` (consolidated.safetensors) names stay native,
    without the vision encoder's, and params.json's `tied_embeddings` decides the tying."""
    rename = native_text_name if native else text_model_name
    plan = []
    for path in files:
        for info in read_header(path):
            name = rename(info.name)
            if name is not None:
                plan.append((name, path, info))
    found = {name for name, _, _ in plan}
    embed = "tok_embeddings.weight" if native else "model.embed_tokens.weight"
    if embed not in found:
        expected = (
            "'tok_embeddings.weight'"
            if native
            else ("'model.language_model.*' or 'language_model.model.*' tensors")
        )
        raise MistralNNXError(
            f"{source}: no text model weights found in this {config.wrapper} checkpoint "
            f"(expected {expected})"
        )
    if not native:
        config = config.replace(tie_word_embeddings="lm_head.weight" not in found)
    print(
        f"note: {source} is a {config.wrapper} vision-language checkpoint; loading its text "
        "model only (image inputs are not supported)",
        file=sys.stderr,
    )
    return config, ((name, read_tensor(path, info), path) for name, path, info in plan)
