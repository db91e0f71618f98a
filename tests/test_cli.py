"""End to end through the console script, on the embedded SmolLM2 model, plus bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mistral_nnx as mn
from mistral_nnx.cli import main

ENV = {
    **os.environ,
    "MISTRAL_NNX_NO_COMPILE_CACHE": "1",
    "HF_HUB_OFFLINE": "1",
    "JAX_PLATFORMS": "cpu",  # the fake-device mesh test needs CPU devices, also on a GPU host
}


def _run(*args: str, stdin: str | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "mistral_nnx.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_generate_on_embedded_model():
    result = _run("generate", "--chat", "--max-new-tokens", "24", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr


def test_chat_keeps_turns_and_resets():
    script = "My name is Ada.\nWhat is my name?\n/reset\nHello!\n"
    result = _run("chat", "--max-new-tokens", "16", stdin=script)
    assert result.returncode == 0, result.stderr  # Ctrl-D (end of input) exits cleanly
    assert "Ada" in result.stdout
    assert "[history cleared]" in result.stderr
    assert result.stderr.count(" tokens in ") == 3  # one stats line per answered turn


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


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["generate", "--model", "/no/such/model", "hi"],
            "model path '/no/such/model' does not exist",
        ),
        (["generate", "--temperature", "-1", "hi"], "temperature must be >= 0"),
        (["generate", "--top-p", "1.5", "hi"], "top_p must be in (0, 1]"),
        (["generate", "--top-k", "-3", "hi"], "top_k must be >= 0"),
        (["generate", "--min-p", "1", "hi"], "min_p must be in [0, 1)"),
        (["generate", "--max-new-tokens", "0", "hi"], "must be at least 1"),
        (
            ["generate", "--max-seq-len", "8", "a long prompt " * 10],
            "exceeds the cache's max_seq_len",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_format_via_subprocess(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"nope")
    result = _run("generate", "--model", str(tmp_path / "weights.npz"), "hi")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("unknown model format (expected a directory or a .gguf)")
    assert "Traceback" not in result.stderr


def test_convert_refuses_existing_destination(hf_checkpoints, tmp_path, capsys):
    directory, _ = hf_checkpoints["llama"]
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(directory), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(Path(tmp_path / "taken").iterdir()) == []


def test_generate_on_a_mesh():
    """The CLI on 6 fake CPU devices, SmolLM2 split over model=3 (9 q heads, 3 kv heads)."""
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=6"}
    args = [
        "generate",
        "--mesh",
        "data=2,model=3",
        "--chat",
        "--max-new-tokens",
        "24",
        "What is the capital of France?",
    ]
    single = _run("generate", *args[3:])
    result = subprocess.run(
        [sys.executable, "-m", "mistral_nnx.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == single.stdout and "Paris" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mistral_nnx.cli", "generate", "--mesh", "data=2,model=4", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2 and "needs 8 devices" not in bad.stderr
    assert "6 are available" in bad.stderr and "Traceback" not in bad.stderr


def _fill_stats(stats: dict) -> None:
    """What stream() reports, for a fake stream in chat tests."""
    stats.update(
        seconds=1.0,
        tokens=1,
        first_token_seconds=0.5,
        tokens_per_second=1.0,
        decode_tokens_per_second=1.0,
    )


def test_chat_history_and_reset(monkeypatch, capsys, smollm2_path):
    """Turns accumulate in the prompt (user and assistant), and /reset starts afresh."""
    import io

    from mistral_nnx import cli, engine
    from mistral_nnx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    prompts: list[str] = []

    def fake_stream(model, batch, **kwargs):
        prompts.append(tokenizer.decode(batch[0]))
        _fill_stats(kwargs["stats"])
        yield engine.Delta(0, [1], f"reply{len(prompts)}", None, "stop")

    monkeypatch.setattr(cli, "_load", lambda args: (None, tokenizer))
    monkeypatch.setattr(engine, "stream", fake_stream)
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


def test_chat_survives_a_failed_turn(monkeypatch, capsys, smollm2_path):
    import io

    from mistral_nnx import cli, engine
    from mistral_nnx.errors import MistralNNXError
    from mistral_nnx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    calls = []

    def fake_stream(model, batch, **kwargs):
        calls.append(tokenizer.decode(batch[0]))
        if len(calls) == 1:
            raise MistralNNXError("prompt of 900 tokens + max_new_tokens 256 exceeds the cache")
        _fill_stats(kwargs["stats"])
        yield engine.Delta(0, [1], "ok", None, "stop")

    monkeypatch.setattr(cli, "_load", lambda args: (None, tokenizer))
    monkeypatch.setattr(engine, "stream", fake_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("too long\nshort\n"))
    assert main(["chat"]) == 0
    err = capsys.readouterr().err
    assert "exceeds the cache (/reset clears the history)" in err
    assert "too long" not in calls[1]  # the failed turn is not kept in the history


def test_convert_into_a_file_path(hf_checkpoints, tmp_path, capsys):
    directory, _ = hf_checkpoints["llama"]
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(directory), str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
