"""`finetune(FinetuneConfig)`: model + data + LoRA/full + optimizer + checkpoints + logs +
export, from Python or from `mistral-nnx finetune`."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from flax import nnx

from mistral_nnx.errors import MistralNNXError
from mistral_nnx.model import Mistral
from mistral_nnx.tokenizer import Tokenizer
from mistral_nnx.train.checkpoints import list_checkpoints, restore_checkpoint, save_checkpoint
from mistral_nnx.train.data import Example, batches, load_examples
from mistral_nnx.train.lora import LoraConfig, apply_lora, count_params, without_dropout
from mistral_nnx.train.step import OptimConfig, Trainer, accumulation_weights


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. `lora=None` trains every weight (full fine-tuning)."""

    model: str  # checkpoint directory, .gguf file or hub id
    data: str
    out: str
    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch_size: int = 4
    seq_len: int = 2048
    eval_data: str | None = None
    eval_every: int = 0  # optimizer steps; 0: only at the end when eval_data is given
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep: int = 2
    remat: str | None = None
    mesh: str | None = None
    rules: str | None = None
    dtype: str = "float32"
    param_dtype: str | None = None
    seed: int = 0
    resume: bool = False
    save_merged: bool = False
    progress: bool = True
    mmap: bool = True  # load_model's: use the checkpoint file's pages in place where it can

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise MistralNNXError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise MistralNNXError(f"seq_len must be at least 2, got {self.seq_len}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise MistralNNXError(f"{name} must be >= 0")
        if self.remat not in (None, "none", "layer"):
            raise MistralNNXError(f"remat must be 'layer' or 'none', got {self.remat!r}")
        if not Path(self.data).is_file():
            raise MistralNNXError(f"{self.data}: data file not found")
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            raise MistralNNXError(f"{self.eval_data}: eval data file not found")


@dataclasses.dataclass
class FinetuneResult:
    model: Mistral  # the trained model (with adapters for LoRA)
    losses: list[float]  # training loss of each optimizer step
    trainable: int
    out: Path


def _load(cfg: FinetuneConfig) -> tuple[Mistral, Tokenizer, Path, list[Path]]:
    import jax.numpy as jnp

    from mistral_nnx.checkpoint.loader import (
        detect_format,
        gguf_file,
        load_model,
        resolve_source,
    )
    from mistral_nnx.checkpoint.orbax_io import TOKENIZER_FILES
    from mistral_nnx.tokenizer import load_tokenizer

    source = resolve_source(cfg.model)
    fmt = detect_format(source)
    tokenizer = load_tokenizer(gguf_file(source) if fmt == "gguf" else source)
    mesh = None
    if cfg.mesh:
        from mistral_nnx.sharding import make_mesh

        mesh = make_mesh(cfg.mesh)
    param_dtype = jnp.dtype(cfg.param_dtype) if cfg.param_dtype else None
    model = load_model(
        source,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=param_dtype,
        mesh=mesh,
        rules=cfg.rules,
        progress=cfg.progress,
        mmap=cfg.mmap,
    )
    files = [] if fmt == "gguf" else [source / n for n in TOKENIZER_FILES if (source / n).is_file()]
    return model, tokenizer, source, files


def _say(cfg: FinetuneConfig, text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr, flush=True)


def finetune(
    cfg: FinetuneConfig,
    *,
    model: Mistral | None = None,
    tokenizer: Tokenizer | None = None,
    stop_after: int | None = None,
) -> FinetuneResult:
    """Train, checkpoint, log, export. `model` / `tokenizer` skip loading `cfg.model`;
    `stop_after` ends the run after that many optimizer steps (as if interrupted, for tests)."""
    out = Path(cfg.out).expanduser()
    tokenizer_files: list[Path] = []
    source: Path | None = None
    if model is None or tokenizer is None:
        model, tokenizer, source, tokenizer_files = _load(cfg)
    context = model.config.max_position_embeddings
    if cfg.seq_len > context:
        raise MistralNNXError(
            f"seq_len (--seq-len) {cfg.seq_len} exceeds the model's context length {context}"
        )
    if cfg.lora is None or cfg.save_merged:
        from mistral_nnx.train.export import hf_config

        hf_config(model.config, "float32")  # a model the end's export refuses fails now, not then
    examples = load_examples(cfg.data, tokenizer, cfg.seq_len)
    eval_examples = load_examples(cfg.eval_data, tokenizer, cfg.seq_len) if cfg.eval_data else []
    ckpt_dir = out / "checkpoints"
    if not cfg.resume and list_checkpoints(ckpt_dir):
        raise MistralNNXError(f"{out}: holds checkpoints of an earlier run (pass --resume)")

    model.remat = "layer" if cfg.remat == "layer" else None
    wrt: Any = nnx.Param
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, seed=cfg.seed)
        wrt = nnx.LoRAParam
    trainable = count_params(model, wrt)
    total = count_params(model, nnx.Param)
    _say(cfg, f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    trainer = Trainer(model, cfg.optim, wrt=wrt)
    micro = 0
    losses: list[float] = []
    if cfg.resume and list_checkpoints(ckpt_dir):
        meta = restore_checkpoint(ckpt_dir, trainer.state, wrt)  # in place: read back next step
        micro, losses = int(meta["micro_step"]), list(meta["losses"])
        _truncate_log(out / "log.jsonl", int(meta["step"]))
        _say(cfg, f"resumed from optimizer step {meta['step']}")
    accum = cfg.optim.grad_accum
    total_micro = cfg.optim.steps * accum
    stream = batches(examples, cfg.batch_size, cfg.seq_len, cfg.seed, start=micro)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a" if cfg.resume else "w")
    bar = _bar(cfg, total_micro // accum, micro // accum)
    t0 = time.perf_counter()
    try:
        while micro < total_micro:  # checkpoints fall between optimizer steps: micro % accum == 0
            group = [next(stream) for _ in range(accum)]
            window: list[dict[str, float]] = []  # this optimizer step's micro-batches
            for batch, weight in zip(group, accumulation_weights(group), strict=True):
                metrics = trainer.step(batch, weight)
                metrics["seen"] = float(batch["valid"].sum())  # input tokens, padding excluded
                window.append(metrics)
            micro += accum
            step = micro // accum
            tokens = sum(m["tokens"] for m in window)
            # the mean over every target of the step, as the update follows
            loss = sum(m["loss"] * m["tokens"] for m in window) / max(tokens, 1.0)
            elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
            record = {
                "step": step,
                "loss": loss,
                "lr": window[-1]["lr"],
                "grad_norm": window[-1]["grad_norm"],
                "tokens": int(tokens),  # counted targets
                "tokens_per_s": sum(m["seen"] for m in window) / max(elapsed, 1e-9),
            }
            losses.append(loss)
            if eval_examples and cfg.eval_every and step % cfg.eval_every == 0:
                record["eval_loss"] = evaluate(trainer, eval_examples, cfg)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            bar.update()
            if (cfg.save_every and step % cfg.save_every == 0) or micro == total_micro:
                meta = {"micro_step": micro, "losses": losses, "seed": cfg.seed}
                save_checkpoint(ckpt_dir, step, trainer.state, wrt, meta, keep=cfg.keep)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        bar.close()
        log.close()
    trained = without_dropout(trainer.model)
    if micro == total_micro:
        if eval_examples:
            value = evaluate(trainer, eval_examples, cfg)
            _say(cfg, f"eval loss: {value:.4f}")
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps({"step": cfg.optim.steps, "eval_loss": value}) + "\n")
        _export(trained, cfg, out, tokenizer, tokenizer_files, source)
    return FinetuneResult(trained, losses, trainable, out)


def evaluate(trainer: Trainer, examples: list[Example], cfg: FinetuneConfig) -> float:
    """Token-weighted mean loss over every example of the held-out set."""
    from mistral_nnx.train.data import collate

    total = count = 0.0
    for start in range(0, len(examples), cfg.batch_size):
        indices = list(range(start, min(start + cfg.batch_size, len(examples))))
        value, n = trainer.eval_loss(collate(examples, indices, cfg.batch_size, cfg.seq_len))
        total, count = total + value * n, count + n
    return total / max(count, 1.0)


def _export(
    model: Mistral,
    cfg: FinetuneConfig,
    out: Path,
    tokenizer: Tokenizer,
    tokenizer_files: list[Path],
    source: Path | None,
) -> None:
    import tempfile

    from mistral_nnx.train.export import save_adapters, save_merged_hf

    if cfg.lora is not None:
        base = str(source) if source is not None else cfg.model
        path = save_adapters(model, cfg.lora, out / "adapter", base_model=base, overwrite=True)
        _say(cfg, f"adapters (PEFT format): {path}")
    if cfg.lora is None or cfg.save_merged:
        with tempfile.TemporaryDirectory() as tmp:
            files = list(tokenizer_files)
            save = getattr(tokenizer, "save", None)
            if not files and save is not None:  # a GGUF's tokenizer, written out as files
                files = save(Path(tmp))
            path = save_merged_hf(
                model, out / "merged", tokenizer_files=files, lora=cfg.lora, overwrite=True
            )
        _say(cfg, f"merged model (HF safetensors): {path}")


def _truncate_log(log: Path, step: int) -> None:
    """Drop the records written after the checkpoint a run resumes from."""
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        log.write_text("".join(line + "\n" for line in kept))


def _bar(cfg: FinetuneConfig, total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="finetune",
        unit="step",
        file=sys.stderr,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
