"""The CLI as a user meets it: the console command end to end on the embedded SmolLM2 model
(subprocesses, for signals, pipes and exit codes), and every mistake ending in one line."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mistral_nnx as mn
from mistral_nnx import cli
from mistral_nnx.cli import main

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Subprocess environment: a compile cache private to this module (later runs skip the
    compiles of the first), no hub access, CPU."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    base = {k: v for k, v in os.environ.items() if k != "MISTRAL_NNX_NO_COMPILE_CACHE"}
    return {**base, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


# Runs the CLI with torch and transformers made unimportable (None in sys.modules is what
# Python sees for a package that is not installed): no runtime path may need them.
_NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
    "from mistral_nnx.cli import run; run()"
)


def _command(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-c", _NO_TORCH, *args]


def _run(env: dict[str, str], *args: str | bytes, stdin: bytes | None = None, timeout: int = 300):
    return subprocess.run(
        _command(*args), input=stdin, capture_output=True, timeout=timeout, env=env
    )


def _no_traceback(stderr: bytes | str) -> None:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    for marker in ("Traceback", "Exception ignored", "Error in atexit", "Segmentation"):
        assert marker not in text, text[-2000:]


# ---- the default model, end to end --------------------------------------------------------------


def test_generate_on_embedded_model_without_torch(env):
    """The README's first command: chat template applied by default, no torch needed, and the
    closing line counts from the launch."""
    result = _run(env, "generate", "-v", "--max-new-tokens", "24", QUESTION)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "Paris" in result.stdout.decode()
    assert "mode: chat template" in err
    assert "tokens/s" in err and "since launch" in err
    _no_traceback(err)


def test_raw_completion_and_non_utf8_prompt(env):
    result = _run(env, "generate", "--raw", "--max-new-tokens", "8", b"Caf\xe9 au lait is")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "not valid UTF-8; invalid bytes were replaced" in err
    _no_traceback(err)


def test_chat_turns_reset_and_bad_bytes(env):
    script = b"My name is Ada.\nWhat is my name?\n/reset\nCaf\xe9?\nHello!\n"
    result = _run(env, "chat", "--max-new-tokens", "16", stdin=script)
    err = result.stderr.decode()
    assert result.returncode == 0, err  # end of input exits cleanly
    assert "Ada" in result.stdout.decode()
    assert "[history cleared]" in err
    assert err.count("since launch") == 4  # every turn answered, the bad bytes one included
    assert "not valid UTF-8" in err
    _no_traceback(err)


def test_broken_pipe_is_quiet(env):
    proc = subprocess.Popen(
        _command("generate", "--raw", "--max-new-tokens", "200", "Once upon a time"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(5)
    proc.stdout.close()  # as `| head -c 5` does
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == cli.EXIT_BROKEN_PIPE
    _no_traceback(err)


class _Exited(Exception):
    pass


@pytest.mark.parametrize(
    "code, command, how",
    [
        (0, "generate", "os._exit"),  # printed everything: no interpreter teardown
        (0, "chat", "os._exit"),
        (0, "convert", "sys.exit"),  # wrote files: the normal exit
        (0, "serve", "sys.exit"),
        (2, "generate", "hard exit"),
    ],
)
def test_exit_after_a_command(monkeypatch, code, command, how):
    calls = []

    def record(kind: str):
        def stop(*args: Any, **kwargs: Any):
            calls.append((kind, args[0]))
            raise _Exited

        return stop

    monkeypatch.setattr(cli, "_main", lambda argv: (code, command))
    monkeypatch.setattr(cli.os, "_exit", record("os._exit"))
    monkeypatch.setattr(cli.sys, "exit", record("sys.exit"))
    monkeypatch.setattr(cli, "_hard_exit", record("hard exit"))
    with pytest.raises(_Exited):
        cli.run()
    assert calls == [(how, code)]


# ---- Ctrl-C -------------------------------------------------------------------------------------


def _interrupt_after(proc: subprocess.Popen, seconds: float) -> tuple[int, float, bytes]:
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    _, err = proc.communicate(timeout=60)
    return proc.returncode, time.perf_counter() - sent, err


@pytest.mark.parametrize("seconds", [0.3, 1.5, 4.0])
def test_ctrl_c_while_starting_or_loading(env, seconds):
    proc = subprocess.Popen(
        _command("generate", "--raw", "--max-new-tokens", "600", "Once upon a time"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    code, took, err = _interrupt_after(proc, seconds)
    assert code == cli.EXIT_INTERRUPTED, err.decode()[-2000:]
    assert took < 2.0
    _no_traceback(err)


def test_ctrl_c_while_decoding(env):
    proc = subprocess.Popen(
        _command("generate", "--raw", "--max-new-tokens", "2000", "Once upon a time"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.read(10)  # text is streaming: the decode loop is running
    code, took, err = _interrupt_after(proc, 0.2)
    assert code == cli.EXIT_INTERRUPTED, err.decode()[-2000:]
    assert took < 2.0
    _no_traceback(err)


class _Reader:
    """Collects a pipe's bytes in a thread, so a test can wait for some output to appear."""

    def __init__(self, pipe: Any) -> None:
        self.data = b""
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        while chunk := pipe.read1(4096):
            self.data += chunk

    def wait_for(self, needle: bytes, after: int = 0, timeout: float = 240) -> int:
        deadline = time.time() + timeout
        while (at := self.data.find(needle, after)) < 0:
            assert time.time() < deadline, f"{needle!r} never came: {self.data[-1000:]!r}"
            time.sleep(0.05)
        return at + len(needle)


def test_chat_ctrl_c_stops_the_reply_then_exits_at_the_prompt(env):
    proc = subprocess.Popen(
        _command("chat", "--temperature", "0.8", "--max-new-tokens", "2000"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    # Both replies must still be streaming when Ctrl-C comes: a short one ("Hello!") can end
    # between two polls, and Ctrl-C at the prompt exits instead.
    messages = (b"Write a very long story about a dragon.\n", b"Now a long one about a ship.\n")
    for message in messages:
        seen = len(out.data)
        proc.stdin.write(message)
        proc.stdin.flush()
        out.wait_for(b" ", after=seen)  # the reply is streaming
        mark = len(err.data)
        proc.send_signal(signal.SIGINT)  # stops this reply; the session goes on
        err.wait_for(b"[stopped]", after=mark)
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)  # at the prompt: exits
    assert proc.wait(timeout=30) == cli.EXIT_INTERRUPTED
    time.sleep(0.2)
    assert err.data.count(b"[stopped]") == 2
    _no_traceback(err.data)


_WRITER_THEN_HARD_EXIT = """
import sys, threading, time
from pathlib import Path
from mistral_nnx import cleanup, cli
tmp = Path(sys.argv[1])
cleanup.track(tmp)
def write():  # as orbax's threads do: recreate the directory and keep writing into it
    while True:
        (tmp / "state").mkdir(parents=True, exist_ok=True)
        (tmp / "state" / "chunk").write_bytes(b"x" * 4096)
threading.Thread(target=write, daemon=True).start()
time.sleep(0.2)
cli._hard_exit(cli.EXIT_INTERRUPTED)
"""


def test_hard_exit_removes_what_threads_still_write(tmp_path):
    """A tracked directory that another thread keeps recreating is gone once the process has
    ended and its output closed (removing it before exiting alone would race those threads)."""
    for attempt in range(3):
        tmp = tmp_path / f".out.tmp-{attempt}"
        proc = subprocess.run(
            [sys.executable, "-c", _WRITER_THEN_HARD_EXIT, str(tmp)],
            capture_output=True,
            timeout=120,
        )
        assert proc.returncode == cli.EXIT_INTERRUPTED, proc.stderr.decode()[-2000:]
        assert not tmp.exists(), attempt


def test_ctrl_c_during_convert_leaves_nothing(env, smollm2_path, tmp_path):
    """Nothing half-written beside the destination, and nothing in the temp directory (a hard
    exit could not clean a temp dir up, so convert must not use one)."""
    dst = tmp_path / "smol"
    temp = tmp_path.parent / f"{tmp_path.name}_tmpdir"
    temp.mkdir()
    proc = subprocess.Popen(
        _command("convert", str(smollm2_path), str(dst)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "TMPDIR": str(temp)},
    )
    deadline = time.time() + 240
    while not list(tmp_path.glob(".smol.tmp-*")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err.decode()[-2000:]
    assert list(tmp_path.iterdir()) == []
    assert list(temp.iterdir()) == []
    _no_traceback(err)


# ---- convert ------------------------------------------------------------------------------------


def test_convert_then_generate(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["gqa_window16"]
    assert main(["convert", str(directory), str(tmp_path / "orbax")]) == 0
    original = mn.load_model(directory, progress=False)
    converted = mn.load_model(tmp_path / "orbax", progress=False)
    ids = [[5, 6, 7, 8]]
    assert (
        mn.generate(original, ids, max_new_tokens=8)[0].tokens
        == mn.generate(converted, ids, max_new_tokens=8)[0].tokens
    )


def test_relative_paths(hf_checkpoints, tmp_path, monkeypatch):
    """The README's save_model(model, "out/") then load_model("out/"), and convert to a
    relative destination."""
    directory, _ = hf_checkpoints["llama"]
    model = mn.load_model(directory, progress=False)
    monkeypatch.chdir(tmp_path)
    mn.save_model(model, "out/")
    assert mn.load_model("out/", progress=False).config == model.config
    assert main(["convert", str(directory), "smol"]) == 0
    assert mn.load_model("smol", progress=False).config == model.config


def test_convert_overwrite_never_deletes_the_source_or_foreign_files(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["llama"]
    parent = tmp_path / "parent"
    parent.mkdir()
    source = parent / "src"
    source.symlink_to(directory, target_is_directory=True)
    (parent / "notes.txt").write_text("mine")
    before = sorted(p.name for p in directory.iterdir())
    assert main(["convert", str(source), str(parent), "--overwrite"]) == 2
    assert main(["convert", str(directory), str(directory), "--overwrite"]) == 2
    assert (parent / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in directory.iterdir()) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert main(["convert", str(directory), str(other), "--overwrite"]) == 2
    assert (other / "keep.txt").read_text() == "keep"

    # A checkpoint of ours is replaced; one with a user's file in it is not.
    out = tmp_path / "out"
    assert main(["convert", str(directory), str(out)]) == 0
    assert main(["convert", str(directory), str(out), "--overwrite"]) == 0
    (out / "mine.txt").write_text("x")
    assert main(["convert", str(directory), str(out), "--overwrite"]) == 2
    assert (out / "mine.txt").exists()


def test_convert_removes_leftovers_of_a_killed_run(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["llama"]
    dead_pid = 2**22 + 12345  # above the kernel's pid limit: no such process
    tmp_left = tmp_path / f".out.tmp-{dead_pid}-deadbeef"
    (tmp_left / "state").mkdir(parents=True)
    (tmp_left / "state" / "junk").write_bytes(b"0" * 1000)
    old_left = tmp_path / f".out.old-{dead_pid}-cafecafe"
    old_left.mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-0000aaaa"  # our own pid counts as gone too
    live.mkdir()
    other = tmp_path / ".other.tmp-1-abcd"  # another destination's: not touched
    other.mkdir()
    assert main(["convert", str(directory), str(tmp_path / "out")]) == 0
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".other.tmp-1-abcd", "out"]


def test_convert_refuses_existing_destination(hf_checkpoints, tmp_path, capsys):
    directory, _ = hf_checkpoints["llama"]
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(directory), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(Path(tmp_path / "taken").iterdir()) == []


def test_convert_into_a_file_path(hf_checkpoints, tmp_path, capsys):
    directory, _ = hf_checkpoints["llama"]
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(directory), str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_corrupt_orbax_data_is_one_short_line(env, hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["llama"]
    assert main(["convert", str(directory), str(tmp_path / "ckpt")]) == 0
    data = [p for p in (tmp_path / "ckpt" / "state").rglob("*") if p.is_file() and "d" in p.parts]
    assert data, "orbax wrote no data files"
    for p in data:
        p.write_bytes(os.urandom(max(64, p.stat().st_size)))
    result = _run(env, "convert", str(tmp_path / "ckpt"), str(tmp_path / "again"))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("loading")]
    assert len(lines) == 1 and len(lines[0]) < 400, err
    assert "damaged" in lines[0]
    _no_traceback(err)


# ---- one clear line for every mistake -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["generate", "--model", "/no/such/model", "hi"],
            "model path '/no/such/model' does not exist",
        ),
        (["generate", "--temperature", "-1", "hi"], "temperature must be >= 0"),
        (["generate", "--temperature", "inf", "hi"], "must be a finite number"),
        (["generate", "--top-p", "1.5", "hi"], "top_p must be in (0, 1]"),
        (["generate", "--top-k", "-3", "hi"], "must be at least 0"),
        (["generate", "--min-p", "1", "hi"], "min_p must be in [0, 1)"),
        (["generate", "--max-new-tokens", "0", "hi"], "must be at least 1"),
        (["generate", "--seed", "1180591620717411303424", "hi"], "must be between 0 and"),
        (["generate", "--seed", "-1", "hi"], "must be between 0 and"),
        (["generate", ""], "the prompt is empty"),
        (["generate"], "no prompt"),
        (["generate", "-f", "/no/such/file"], "cannot read the prompt"),
        (["generate", "-f", "x", "hi"], "not both"),
        (["generate", "--chat", "--raw", "hi"], "not allowed with argument"),
        (["generate", "--raw", "--system", "be brief", "hi"], "--system needs the chat template"),
        (
            ["generate", "--max-seq-len", "8", "a long prompt " * 10],
            "plus --max-new-tokens 256 exceeds the context length 8",
        ),
        (
            ["generate", "--max-seq-len", "100000", "hi"],
            "--max-seq-len 100000 exceeds the model's context length 8192",
        ),
        (
            ["generate", "--max-new-tokens", "9000", "hi"],
            "plus --max-new-tokens 9000 exceeds the context length 8192",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_before_loading(args, message, capsys, monkeypatch):
    def no_loading(self: Any) -> None:
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(cli._Session, "load_weights", no_loading)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_huge_top_k_runs(capsys, monkeypatch):
    """--top-k beyond int32 means 'keep everything', not an OverflowError."""
    seen: list[int] = []
    monkeypatch.setattr(cli._Session, "load_weights", lambda self: None)
    monkeypatch.setattr(
        cli._Session, "stream_reply", lambda self, ids, stop=None, once=False: seen.extend(ids)
    )
    assert main(["generate", "--top-k", "99999999999", "--temperature", "1", "hi"]) == 0
    assert seen
    sampling = mn.SamplingParams(temperature=1.0, top_k=99999999999)
    from mistral_nnx.sampling import BatchSampling

    assert int(BatchSampling.from_params(sampling, 1).top_k[0]) == 2**31 - 1


def test_malformed_index_json(hf_checkpoints, tmp_path, capsys):
    directory, _ = hf_checkpoints["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": 5}))
    assert main(["convert", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "corrupt index" in err and err.count("\n") == 1


def test_two_gguf_files_in_a_directory(smollm2_path, tmp_path, capsys):
    (tmp_path / "a.gguf").symlink_to(smollm2_path)
    (tmp_path / "b.gguf").symlink_to(smollm2_path)
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    err = capsys.readouterr().err
    assert "a.gguf, b.gguf" in err and "pass the one to load" in err


def test_hub_id_offline_is_quick(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["generate", "--model", "mistralai/Not-A-Cached-Model", "hi"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and err.count("\n") == 1
    # Not offline, but the endpoint does not answer (a closed local port): one quick line.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main(["generate", "--model", "mistralai/Not-A-Cached-Model", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and err.count("\n") == 1
    assert time.perf_counter() - start < 10


def test_prompt_from_file_and_stdin(tmp_path, monkeypatch, smollm2_path):
    seen: list[list[int]] = []
    monkeypatch.setattr(cli._Session, "load_weights", lambda self: None)
    monkeypatch.setattr(
        cli._Session, "stream_reply", lambda self, ids, stop=None, once=False: seen.append(ids)
    )
    long_prompt = "Summarise: " + "the quick brown fox " * 500  # longer than a shell argument
    (tmp_path / "prompt.txt").write_text(long_prompt)
    assert main(["generate", "--raw", "-f", str(tmp_path / "prompt.txt")]) == 0

    class Stdin:
        buffer = io.BytesIO(long_prompt.encode())

    monkeypatch.setattr("sys.stdin", Stdin)
    assert main(["generate", "--raw", "-"]) == 0
    tokenizer = mn.load_tokenizer(smollm2_path)
    assert seen == [tokenizer.encode(long_prompt)] * 2


def test_chat_refuses_a_tokenizer_without_template(hf_checkpoints, smollm2_path, tmp_path, capsys):
    from mistral_nnx.tokenizer import HFTokenizer

    directory, _ = hf_checkpoints["llama"]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in directory.iterdir():
        (model_dir / f.name).symlink_to(f)
    tokenizer = mn.load_tokenizer(smollm2_path)
    assert isinstance(tokenizer, HFTokenizer)
    plain = HFTokenizer(tokenizer._backend, chat_template=None, special_tokens={})
    plain.save(model_dir)
    assert main(["chat", "--model", str(model_dir)]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert main(["generate", "--chat", "--model", str(model_dir), "hi"]) == 2
    assert "use --raw" in capsys.readouterr().err


def test_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert "mistral-nnx generate" in top and "SmolLM2" in top and "parse arguments" not in top
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    gen = capsys.readouterr().out
    assert "(default: 256)" in gen and "--raw" in gen and "-f FILE" in gen
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    conv = capsys.readouterr().out
    assert "checkpoint to read" in conv and "directory to create" in conv


# ---- chat turn handling (model stubbed) ---------------------------------------------------------


def _fake_reply(replies: list[str], prompts: list[str], tokenizer: Any):
    def stream_reply(self: Any, ids: list[int], stop: Any = None) -> str:
        prompts.append(tokenizer.decode(ids))
        reply = f"reply{len(prompts)}"
        replies.append(reply)
        print(reply)
        return reply

    return stream_reply


def test_chat_history_and_reset(monkeypatch, capsys, smollm2_path):
    """Turns accumulate in the prompt (user and assistant), and /reset starts afresh."""
    tokenizer = mn.load_tokenizer(smollm2_path)
    prompts: list[str] = []
    replies: list[str] = []
    monkeypatch.setattr(cli._Session, "load_weights", lambda self: None)
    monkeypatch.setattr(cli._Session, "stream_reply", _fake_reply(replies, prompts, tokenizer))
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("first question\nsecond question\n/reset\nthird\n")
    )
    assert main(["chat"]) == 0
    assert len(prompts) == 3
    assert "first question" in prompts[1] and "reply1" in prompts[1]
    assert "second question" in prompts[1]
    assert "third" in prompts[2]
    assert "first question" not in prompts[2] and "reply" not in prompts[2]
    assert capsys.readouterr().out.split() == ["reply1", "reply2", "reply3"]


def test_chat_reset_hint_only_when_the_history_is_the_cause(monkeypatch, capsys, smollm2_path):
    tokenizer = mn.load_tokenizer(smollm2_path)
    prompts: list[str] = []
    monkeypatch.setattr(cli._Session, "load_weights", lambda self: None)
    monkeypatch.setattr(cli._Session, "stream_reply", _fake_reply([], prompts, tokenizer))
    too_long, medium = "word " * 300, "word " * 100  # room for 200 prompt tokens
    script = f"{too_long}\n{medium}\n{medium}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--max-seq-len", "300", "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("mistral-nnx: error")]
    # 1st: the message alone is too long (no hint); 3rd: it fits alone, not after the 2nd.
    assert len(errors) == 2 and len(prompts) == 1, err
    assert "the message" in errors[0] and "/reset" not in errors[0]
    assert "the conversation" in errors[1] and "/reset clears the history" in errors[1]


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "convert", "finetune", None])
def test_no_mmap_reaches_the_loader(command, smollm2_path, tmp_path, monkeypatch):
    """--no-mmap on every command that loads a model asks load_model to copy the weights
    (mmap=False); without it, the default (mapped) is asked for."""
    import socket

    from mistral_nnx.checkpoint import loader
    from mistral_nnx.errors import MistralNNXError

    directory = str(smollm2_path)
    asked = []

    def load_model(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("mmap", True))
        raise MistralNNXError("stopped before loading")

    monkeypatch.setattr(loader, "load_model", load_model)
    with socket.socket() as s:  # a free port for serve
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello world"}\n')
    argv = {
        "generate": ["generate", "--model", directory, "Hi"],
        "chat": ["chat", "--model", directory],
        "serve": ["serve", "--model", directory, "--port", port],
        "convert": ["convert", directory, str(tmp_path / "out")],
        "finetune": ["finetune", "--model", directory, "--data", str(data), "--out", str(tmp_path)],
    }
    for name, args in argv.items():
        if command is None or name == command:
            extra = [] if command is None else ["--no-mmap"]
            assert main([args[0], *extra, *args[1:]]) == 2, name
    assert asked == ([True] * 5 if command is None else [False])
