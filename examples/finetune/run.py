"""LoRA on the embedded SmolLM2-135M-Instruct: teach it to open every answer with "Ahoy, matey!".

    python examples/finetune/run.py [--steps 40] [--out /tmp/smollm2-ahoy]

Generates greedy answers to held-out questions (eval.jsonl) before and after, fine-tunes on
train.jsonl (40 conversations written for this example), reloads the base model with the saved
PEFT-format adapters (`load_model(base, adapters=...)`) and writes the loss curve to OUT/loss.png.
Equivalent command line:

    mistral-nnx finetune --data examples/finetune/train.jsonl \\
        --eval-data examples/finetune/eval.jsonl --out /tmp/smollm2-ahoy --steps 40 \\
        --batch-size 4 --seq-len 128 --lr 1e-3 --lora-rank 8 --lora-alpha 16 --plot
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mistral_nnx
from mistral_nnx.cli import default_model
from mistral_nnx.train.loop import FinetuneConfig, finetune
from mistral_nnx.train.lora import LoraConfig
from mistral_nnx.train.plot import loss_curve_png
from mistral_nnx.train.step import OptimConfig

HERE = Path(__file__).parent


def answers(model: mistral_nnx.Mistral, tokenizer: mistral_nnx.Tokenizer) -> list[str]:
    questions = [
        json.loads(line)["messages"][0]["content"]
        for line in (HERE / "eval.jsonl").read_text().splitlines()
    ]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    done = mistral_nnx.generate(model, prompts, tokenizer=tokenizer, max_new_tokens=24)
    return [f"{q} -> {c.text.strip()}" for q, c in zip(questions, done, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="/tmp/smollm2-ahoy")
    args = parser.parse_args()
    source = default_model()
    tokenizer = mistral_nnx.load_tokenizer(source)
    base = mistral_nnx.load_model(source, progress=False)
    before = answers(base, tokenizer)
    cfg = FinetuneConfig(
        model=str(source),
        data=str(HERE / "train.jsonl"),
        eval_data=str(HERE / "eval.jsonl"),
        eval_every=20,
        out=args.out,
        lora=LoraConfig(rank=8, alpha=16),
        optim=OptimConfig(steps=args.steps, lr=1e-3, warmup=0.05),
        batch_size=4,
        seq_len=128,
    )
    t = time.perf_counter()
    result = finetune(cfg, model=base, tokenizer=tokenizer)
    seconds = time.perf_counter() - t
    tuned = mistral_nnx.load_model(source, adapters=result.out / "adapter", progress=False)
    after = answers(tuned, tokenizer)
    png = loss_curve_png(result.out / "log.jsonl", result.out / "loss.png")
    print(f"\ntrainable parameters: {result.trainable:,}; {args.steps} steps in {seconds:.0f} s")
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; curve: {png}")
    for title, lines in (("before", before), ("after", after)):
        hits = sum("Ahoy, matey!" in line.split(" -> ", 1)[1][:14] for line in lines)
        print(f"\n{title} ({hits}/{len(lines)} answers open with 'Ahoy, matey!'):")
        print("\n".join(f"  {line}" for line in lines))


if __name__ == "__main__":
    main()
