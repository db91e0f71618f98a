"""`mistral-nnx finetune`: a LoRA run end to end, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import CHATS, write_jsonl, write_model

import mistral_nnx
from mistral_nnx.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_model(root / "base", seed=7)
    return root / "base"


def test_finetune_writes_log_checkpoint_adapters_and_merged_model(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "run"
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "-q"]
    # the settings of test_train_loop (one compiled step for both)
    args += ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lr", "1e-2"]
    args += ["--steps", "6", "--warmup", "1", "--grad-accum", "2", "--batch-size", "2"]
    args += ["--seq-len", "32", "--save-merged", "--plot"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "trained 6 steps" in err and "loss.png" in err
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "step_00000006" / "meta.json").is_file()
    merged = mistral_nnx.load_model(out / "merged", progress=False)
    adapted = mistral_nnx.load_model(base, adapters=out / "adapter", progress=False)
    before = mistral_nnx.load_model(base, progress=False)
    ids = jnp.asarray(np.arange(12).reshape(1, 12), jnp.int32)
    logits = nnx.jit(lambda m: m(ids))  # one compile for the three (same structure)
    assert float(jnp.abs(logits(merged) - logits(before)).max()) > 1e-3  # it trained
    np.testing.assert_allclose(logits(merged), logits(adapted), atol=1e-5)
    assert (out / "merged" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-rank", "0"], "argument --lora-rank: must be a positive integer"),
        (["--seq-len", "100000"], "--seq-len) 100000 exceeds the model's context length 512"),
        (["--lora-targets", "lm_head"], "match no weight"),
        (["--mesh", "data=3"], "mesh"),
    ],
)
def test_bad_arguments_one_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "-q", "--seq-len", "32", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mistral-nnx: error: ") and message in err


def test_malformed_line_named(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n" + '{"messages": [{"role": "user"}]}\n')
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "-q", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:2: message 0" in err


_FAULTS = """
import ctypes, resource, sys
from mistral_nnx.train.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 64 * 2**20, []
for _ in range(4):  # a 64 MB block allocated, written and freed, as XLA:CPU does every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(faults[1:]))
"""


def test_freed_training_memory_is_reused_without_page_faults():
    """keep_freed_memory: a large block freed and allocated again reuses the same pages (no
    faults); glibc's default maps it afresh each time (16,384 faults for 64 MB)."""
    import subprocess
    import sys

    out = {}
    for mode in ("default", "keep"):
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        applied, faults = run.stdout.split()
        out[mode] = (applied, int(faults))
    assert out["keep"][0] == "True"
    assert out["default"][1] > 10_000  # the control: the fresh mapping of every block is seen
    assert out["keep"][1] < 1_000


def test_finetune_sets_the_malloc_policy_before_jax_starts(tmp_path, base):
    """The settings only reach threads that have not picked an arena yet: the CLI applies them
    before JAX's backend (and its thread pools) exists."""
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    write_jsonl(data, CHATS)
    code = """
import sys
from jax._src import xla_bridge
from mistral_nnx.train import host_memory, loop
seen = []
host_memory.keep_freed_memory = lambda: seen.append(xla_bridge.backends_are_initialized())
def finetune(cfg):
    raise SystemExit(0 if seen == [False] else 3)
loop.finetune = finetune
from mistral_nnx.cli import main
main(sys.argv[1:])
"""
    argv = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
