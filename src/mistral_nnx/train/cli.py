"""`mistral-nnx finetune`: the arguments, and the runner that calls train.loop.finetune."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Supervised fine-tuning, LoRA (default) or full, on a JSONL file of chat conversations "
    '({"messages": [...]}: the loss is on the assistant replies, rendered as `mistral-nnx chat` '
    'renders them) or of text ({"text": ...}). Writes OUT/log.jsonl (loss curve), '
    "OUT/checkpoints/ (orbax, every --save-every steps and at the end; --resume continues "
    "exactly), OUT/adapter/ (PEFT format) and, with --save-merged or --full, OUT/merged/ "
    "(HF safetensors + config.json + tokenizer files). --qlora nf4|int4|int8 quantises the "
    "frozen base (QLoRA)."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: file not found")
    return text


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `finetune` subcommand to the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "finetune", help="fine-tune a model (LoRA or full) on a JSONL file", description=DESCRIPTION
    )
    p.add_argument(
        "--model",
        metavar="SRC",
        help="checkpoint directory, .gguf file or hub id (default: the embedded SmolLM2)",
    )
    p.add_argument("--data", required=True, type=_existing_file, help="training JSONL file")
    p.add_argument("--eval-data", type=_existing_file, help="held-out JSONL file (eval loss)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    lora = p.add_argument_group("LoRA (the default) or full fine-tuning")
    lora.add_argument("--lora-rank", type=_positive_int, default=16, help="adapter rank r")
    lora.add_argument("--lora-alpha", type=_number, default=32.0, help="scaling alpha (x alpha/r)")
    lora.add_argument("--lora-dropout", type=_number, default=0.0, help="dropout on adapter input")
    lora.add_argument(
        "--lora-targets",
        default="q,k,v,o,gate,up,down",
        help="comma-separated projections (q,k,v,o,gate,up,down) or regexes over weight paths "
        "such as 'layers/0/attn/wq'",
    )
    lora.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    lora.add_argument(
        "--qlora",
        choices=["nf4", "int4", "int8"],
        help="QLoRA: quantise the frozen base projections (qwix) and train float32 adapters",
    )
    lora.add_argument(
        "--qlora-block", type=_positive_int, default=64, help="inputs per quantisation scale"
    )
    opt = p.add_argument_group("optimization")
    opt.add_argument("--lr", type=_number, default=2e-4, help="peak learning rate (AdamW)")
    opt.add_argument(
        "--warmup", type=_number, default=0.03, help="warmup: fraction of --steps (< 1) or steps"
    )
    opt.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    opt.add_argument("--weight-decay", type=_number, default=0.0)
    opt.add_argument("--clip", type=_number, default=1.0, help="global-norm clipping (0: off)")
    opt.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps")
    opt.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per batch")
    opt.add_argument(
        "--grad-accum", type=_positive_int, default=1, help="batches per optimizer step"
    )
    opt.add_argument("--seq-len", type=_positive_int, default=2048, help="longest sequence")
    opt.add_argument(
        "--remat", choices=["none", "layer"], default="none", help="recompute layers in backward"
    )
    opt.add_argument("--seed", type=_non_negative_int, default=0, help="data order and LoRA init")
    run = p.add_argument_group("run")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    run.add_argument("--param-dtype", choices=["float32", "bfloat16"], help="base weights dtype")
    run.add_argument("--mesh", help="device mesh, e.g. data=2,model=4 (batch over data)")
    run.add_argument("--rules", default="fsdp", help="sharding preset: fsdp, tp+fsdp, tp, ...")
    run.add_argument(
        "--save-every", type=_non_negative_int, default=0, help="checkpoint every N steps"
    )
    run.add_argument("--eval-every", type=_non_negative_int, default=0, help="eval every N steps")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument(
        "--save-merged", action="store_true", help="also write merged HF weights (LoRA)"
    )
    run.add_argument("--plot", action="store_true", help="write the loss curve to OUT/loss.png")
    from mistral_nnx.cli import add_mmap_arg  # defined once, with the other commands' options

    add_mmap_arg(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """FinetuneConfig from parsed arguments (the default model resolved here)."""
    from mistral_nnx.errors import MistralNNXError
    from mistral_nnx.train.loop import FinetuneConfig
    from mistral_nnx.train.lora import LoraConfig
    from mistral_nnx.train.step import OptimConfig

    model = args.model
    if model is None:
        from mistral_nnx.cli import default_model

        model = str(default_model())
    lora = None
    if args.full and args.qlora:
        raise MistralNNXError("--qlora trains LoRA adapters: it cannot be combined with --full")
    if not args.full:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraConfig(
            args.lora_rank,
            args.lora_alpha,
            args.lora_dropout,
            targets,
            quant=args.qlora,
            quant_block=args.qlora_block,
        )
    warmup = args.warmup if args.warmup < 1 else int(args.warmup)
    optim = OptimConfig(
        steps=args.steps,
        lr=args.lr,
        warmup=warmup,
        weight_decay=args.weight_decay,
        clip=args.clip or None,
        grad_accum=args.grad_accum,
        schedule=args.schedule,
    )
    return FinetuneConfig(
        model=model,
        data=args.data,
        out=args.out,
        lora=lora,
        optim=optim,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_data=args.eval_data,
        eval_every=args.eval_every,
        save_every=args.save_every,
        remat=None if args.remat == "none" else args.remat,
        mesh=args.mesh,
        rules=args.rules if args.mesh else None,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        seed=args.seed,
        resume=args.resume,
        save_merged=args.save_merged,
        progress=not args.quiet,
        mmap=not args.no_mmap,
    )


def run_finetune(args: argparse.Namespace, interrupts: Any = None) -> int:
    """The `finetune` command: 0 on success (errors raise MistralNNXError)."""
    from mistral_nnx.train.host_memory import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads (see host_memory)
    from mistral_nnx.train.loop import finetune
    from mistral_nnx.train.plot import loss_curve_png

    cfg = config_from_args(args)
    result = finetune(cfg)
    if args.plot:
        png = loss_curve_png(result.out / "log.jsonl", result.out / "loss.png")
        print(f"loss curve: {png}", file=sys.stderr)
    if result.losses:
        print(
            f"trained {len(result.losses)} steps: loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f}; output in {result.out}",
            file=sys.stderr,
        )
    return 0
