"""Tiny tokenizer + model directories for the fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is the capital of france? paris is the capital of france.",
    "answer briefly. yes. no. maybe. the sky is blue and the grass is green.",
    "one two three four five six seven eight nine ten",
]
VOCAB = 320


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE (vocab <= VOCAB) with BOS <s> = 0, EOS </s> = 1 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_model(directory: Path, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random HF Mistral + the tokenizer above; returns the torch model."""
    from conftest import build_hf

    settings: dict[str, Any] = dict(
        vocab_size=VOCAB, num_hidden_layers=2, sliding_window=None, bos_token_id=0, eos_token_id=1
    )
    settings.update(overrides)
    hf = build_hf("mistral", directory, seed=seed, **settings)
    write_tokenizer(directory)
    return hf


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHATS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [
        ("what is the capital of france?", "paris."),
        ("is the sky blue?", "yes."),
        ("count to three", "one two three"),
        ("where did the cat sit?", "on the mat."),
        ("is the grass green?", "yes."),
        ("count to five", "one two three four five"),
    ]
] + [{"text": "the dog sat on the log"}, {"text": "six seven eight nine ten"}]
