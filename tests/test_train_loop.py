"""The training loop: LoRA on a tiny model, checkpoints, exact resume, logs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from train_fixtures import CHATS, write_jsonl, write_model

from mistral_nnx import MistralNNXError
from mistral_nnx.train.checkpoints import list_checkpoints
from mistral_nnx.train.loop import FinetuneConfig, finetune
from mistral_nnx.train.lora import LoraConfig
from mistral_nnx.train.step import OptimConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loop")
    write_model(root / "base")
    return root / "base", write_jsonl(root / "train.jsonl", CHATS)


def config(base: Path, data: Path, out: Path, **changes: object) -> FinetuneConfig:
    cfg = FinetuneConfig(
        model=str(base),
        data=str(data),
        out=str(out),
        lora=LoraConfig(rank=4, alpha=8, dropout=0.1),  # dropout: random state is resumed too
        optim=OptimConfig(steps=6, lr=1e-2, warmup=1, grad_accum=2),
        batch_size=2,
        seq_len=32,
        save_every=2,
        progress=False,
    )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def test_resume_continues_exactly(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    full = finetune(config(base, data, tmp_path / "a"))
    assert len(full.losses) == 6 and full.losses[-1] < full.losses[0]
    sizes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert full.trainable == 2 * sum(4 * (i + o) for i, o in sizes)  # rank 4, 7 targets, 2 layers
    interrupted = config(base, data, tmp_path / "b")
    finetune(interrupted, stop_after=3)  # as if killed during step 4: last checkpoint is step 2
    ckpts = tmp_path / "b" / "checkpoints"
    assert list_checkpoints(ckpts) == [2]
    assert [p.name for p in ckpts.iterdir()] == ["step_00000002"]  # nothing half-written
    with pytest.raises(MistralNNXError, match="--resume"):
        finetune(interrupted)
    resumed = finetune(dataclasses.replace(interrupted, resume=True))
    assert resumed.losses == full.losses  # bit for bit
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == full.losses
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and "lr" in r for r in log)
    assert (tmp_path / "b" / "adapter" / "adapter_config.json").is_file()
    assert list_checkpoints(ckpts) == [4, 6]  # keep=2
    # a checkpoint of a newer format is refused in one line, before anything is restored
    meta_path = ckpts / "step_00000006" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 2
    meta_path.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(MistralNNXError, match="newer mistral_nnx .checkpoint format 99"):
        finetune(dataclasses.replace(interrupted, resume=True))


def test_bad_settings(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    with pytest.raises(MistralNNXError, match="context length"):
        finetune(config(base, data, tmp_path / "x", seq_len=10**6))
    with pytest.raises(MistralNNXError, match="not found"):
        config(base, tmp_path / "missing.jsonl", tmp_path / "x")
    with pytest.raises(MistralNNXError, match="remat"):
        config(base, data, tmp_path / "x", remat="all")
