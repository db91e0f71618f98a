"""Fine-tuning throughput: mistral_nnx (qwix LoRA / full, optax AdamW) vs HF PEFT + torch.

    python benchmarks/finetune.py                    # CPU: SmolLM2-135M, LoRA and full, vs PEFT
    python benchmarks/finetune.py --preset mistral7b # accelerator: Mistral-7B shapes, random bf16
    python benchmarks/finetune.py --preset mistral7b --stack peft   # the same with PEFT + torch

CPU mode: the embedded SmolLM2-135M-Instruct (float32) is trained on the same padded token
batches (examples/finetune/train.jsonl) by both stacks, with the same LoRA init (PEFT's, copied
into ours), AdamW and clipping; steps are alternated in rounds (ours k steps, torch k steps) and
per-step medians compared. Tokens/s counts every token of a batch (padding included). Peak
memory of our step is XLA's own account of the compiled step (arguments + outputs + temporaries),
with and without remat="layer".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import header, median, table, versions  # noqa: E402

ROOT = Path(__file__).parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tokenizer: Any, batch: int, seq_len: int, n: int) -> list[dict[str, np.ndarray]]:
    from mistral_nnx.train.data import collate, load_examples

    examples = load_examples(ROOT / "examples/finetune/train.jsonl", tokenizer, seq_len)
    out = []
    for i in range(n):
        idx = [(i * batch + j) % len(examples) for j in range(batch)]
        b = collate(examples, idx, batch, seq_len)
        b = {k: np.pad(v, ((0, 0), (0, seq_len - v.shape[1]))) for k, v in b.items()}
        out.append(b)
    return out


def torch_step(pm: Any, params: list[Any], opt: Any, b: dict[str, np.ndarray]) -> float:
    import torch

    ids = torch.tensor(b["tokens"], dtype=torch.long)
    labels = torch.where(torch.tensor(b["loss_mask"]), ids, torch.tensor(-100))
    out = pm(input_ids=ids, attention_mask=torch.tensor(b["valid"]).long(), labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    return float(out.loss.detach())


def peft_init(pm: Any) -> dict[str, np.ndarray]:
    """A PEFT model's LoRA tensors (copies, named as set_peft_tensors reads them): the initial
    adapters our model starts from, so that both stacks train the same LoRA."""
    return {
        k.replace(".default", ""): v.detach().numpy().copy()
        for k, v in pm.state_dict().items()
        if "lora_" in k
    }


def step_memory(trainer: Any, batch: dict[str, np.ndarray]) -> float:
    """GB XLA reserves for one compiled train step."""
    from mistral_nnx.train.step import train_step

    compiled = train_step.lower(*trainer.step_args(batch)).compile()
    m = compiled.memory_analysis()
    if m is None:
        raise SystemExit("this backend reports no memory analysis for the compiled step")
    used = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (used - m.alias_size_in_bytes) / 1e9


def cpu(args: argparse.Namespace) -> None:
    import peft
    import torch
    import transformers
    from flax import nnx

    import mistral_nnx
    from mistral_nnx.cli import default_model
    from mistral_nnx.train.export import set_peft_tensors
    from mistral_nnx.train.lora import LoraConfig, apply_lora
    from mistral_nnx.train.step import OptimConfig, Trainer

    source = default_model()
    tokenizer = mistral_nnx.load_tokenizer(source)
    data = batches(tokenizer, args.batch_size, args.seq_len, args.rounds * args.k + 2)
    tokens = args.batch_size * args.seq_len
    optim = OptimConfig(steps=1000, lr=1e-4, schedule="constant", clip=1.0)
    print(header("finetune: mistral_nnx vs HF PEFT + torch (CPU, float32)"))
    print(versions(["jax", "flax", "optax", "qwix", "torch", "transformers", "peft"]))
    print(
        f"batch {args.batch_size} x {args.seq_len} tokens; torch threads {torch.get_num_threads()}"
    )
    rows = []
    for mode in args.modes.split(","):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        base = mistral_nnx.load_model(source, progress=False) if mode == "lora" else None
        pm: Any
        if mode == "lora":
            pm = peft.get_peft_model(
                hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
            )
            init = peft_init(pm)
            wrt: Any = nnx.LoRAParam
        else:
            pm, wrt, init = hf, nnx.Param, {}

        def fresh(mode: str = mode, base: Any = base, init: Any = init) -> Any:
            """A trainer's step consumes (donates) the variables it trains: one model each."""
            if mode != "lora":
                return mistral_nnx.load_model(source, progress=False)
            lora_model = apply_lora(base, LoraConfig(16, 32.0))
            set_peft_tensors(lora_model, init, "peft")
            return lora_model

        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        variants = [("none", None)] + ([("layer", "layer")] if mode == "lora" else [])
        for remat_name, remat in variants:
            model = fresh()
            model.remat = remat
            trainer = Trainer(model, optim, wrt=wrt)
            memory = step_memory(trainer, data[0])
            ours_t: list[float] = []
            theirs_t: list[float] = []
            ours_loss = theirs_loss = float("nan")
            trainer.step(data[0])  # compile
            if remat_name == "none":
                torch_step(pm, params, opt, data[0])
            for r in range(args.rounds):
                chunk = data[1 + r * args.k : 1 + (r + 1) * args.k]
                for b in chunk:
                    t = time.perf_counter()
                    ours_loss = trainer.step(b)["loss"]
                    ours_t.append(time.perf_counter() - t)
                if remat_name == "none":
                    for b in chunk:
                        t = time.perf_counter()
                        theirs_loss = torch_step(pm, params, opt, b)
                        theirs_t.append(time.perf_counter() - t)
            mine = median(ours_t)
            rows.append(
                [
                    mode,
                    remat_name,
                    f"{tokens / mine:.0f}",
                    f"{tokens / median(theirs_t):.0f}" if theirs_t else "-",
                    f"{median(theirs_t) / mine:.2f}" if theirs_t else "-",
                    f"{min(theirs_t) / min(ours_t):.2f}" if theirs_t else "-",
                    f"{ours_loss:.4f}",
                    f"{theirs_loss:.4f}" if theirs_t else "-",
                    f"{memory:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    print(
        table(
            [
                "mode",
                "remat",
                "ours tok/s",
                "PEFT tok/s",
                "speedup (medians)",
                "speedup (best runs)",
                "ours last loss",
                "PEFT last loss",
                "ours step GB (XLA)",
            ],
            rows,
        )
    )


def lora_worker(args: argparse.Namespace) -> None:
    """One stack's LoRA steps in this process (`--worker ours|peft`), as its users run it: ours
    with the host-memory setting `mistral-nnx finetune` applies (unless `--malloc default`),
    PEFT with glibc's defaults. Prints one JSON line: step times and the last loss."""
    import json

    if args.worker == "ours" and args.malloc == "training":
        from mistral_nnx.train.host_memory import keep_freed_memory

        keep_freed_memory()  # before anything starts JAX, as the CLI does
    import peft
    import torch
    import transformers

    import mistral_nnx
    from mistral_nnx.cli import default_model

    source = default_model()
    data = batches(mistral_nnx.load_tokenizer(source), args.batch_size, args.seq_len, args.k + 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    torch.manual_seed(0)  # the same LoRA init in both processes
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    if args.worker == "peft":
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        def step(b: dict[str, np.ndarray]) -> float:
            return torch_step(pm, params, opt, b)
    else:
        from mistral_nnx.train.export import set_peft_tensors
        from mistral_nnx.train.lora import LoraConfig, apply_lora
        from mistral_nnx.train.step import OptimConfig, Trainer

        init = peft_init(pm)
        model = apply_lora(mistral_nnx.load_model(source, progress=False), LoraConfig(16, 32.0))
        set_peft_tensors(model, init, "peft")
        del pm, hf
        optim = OptimConfig(steps=1000, lr=1e-4, schedule="constant", clip=1.0)
        trainer = Trainer(model, optim)

        def step(b: dict[str, np.ndarray]) -> float:
            return float(trainer.step(b)["loss"])

    step(data[0])  # compile / warm-up
    times, loss = [], float("nan")
    for b in data[1:]:
        t = time.perf_counter()
        loss = step(b)
        times.append(time.perf_counter() - t)
    print(json.dumps({"times": times, "loss": loss}))


def lora_processes(args: argparse.Namespace) -> None:
    """LoRA, each stack in its own fresh process, alternated `--rounds` times: ours as
    `mistral-nnx finetune` runs (its host-memory setting), ours with glibc's defaults, PEFT."""
    import json
    import subprocess

    arms = [("ours", "training"), ("ours", "default"), ("peft", "default")]
    common = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    common += ["-k", str(args.k)]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {arm: [] for arm in arms}
    print(header("finetune: LoRA, one process per stack, alternated (CPU, float32)"))
    print(versions(["jax", "flax", "optax", "qwix", "torch", "transformers", "peft"]))
    print(f"batch {args.batch_size} x {args.seq_len} tokens; {args.k} timed steps per process")
    for r in range(args.rounds):
        for worker, malloc in arms:
            cmd = [sys.executable, __file__, "--worker", worker, "--malloc", malloc, *common]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[worker, malloc].append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    tokens = args.batch_size * args.seq_len
    peft_times = [t for res in results["peft", "default"] for t in res["times"]]
    rows = []
    for worker, malloc in arms:
        times = [t for res in results[worker, malloc] for t in res["times"]]
        rows.append(
            [
                "mistral_nnx" if worker == "ours" else "HF PEFT + torch",
                "finetune CLI's (keep freed memory)" if malloc == "training" else "glibc default",
                f"{tokens / median(times):.0f}",
                f"{median(peft_times) / median(times):.2f}",
                f"{min(peft_times) / min(times):.2f}",
                " / ".join(f"{res['loss']:.4f}" for res in results[worker, malloc]),
            ]
        )
    heads = ["stack", "malloc", "tok/s (median)", "vs PEFT (medians)", "vs PEFT (best)"]
    print(table([*heads, "last loss per process"], rows))


def qlora_memory(args: argparse.Namespace) -> None:
    """SmolLM2, LoRA r16 on a float32 base vs QLoRA (int8, int4, nf4 bases, blocks of 64): the
    bytes of the frozen base and XLA's account of one compiled train step. Compile-time
    figures only (no timing), so a busy machine does not change them."""
    import jax

    import mistral_nnx
    from mistral_nnx.cli import default_model
    from mistral_nnx.train.lora import LoraConfig, apply_lora
    from mistral_nnx.train.step import OptimConfig, Trainer

    source = default_model()
    tokenizer = mistral_nnx.load_tokenizer(source)
    data = batches(tokenizer, args.batch_size, args.seq_len, 1)
    base = mistral_nnx.load_model(source, progress=False)
    optim = OptimConfig(steps=1000, lr=1e-4, schedule="constant", clip=1.0)
    print(header("finetune: LoRA vs QLoRA memory (SmolLM2, XLA's account of the step)"))
    print(versions(["jax", "flax", "qwix"]))
    rows = []
    for quant in (None, "int8", "int4", "nf4"):
        trainer = Trainer(apply_lora(base, LoraConfig(16, 32.0, quant=quant)), optim)
        leaves = jax.tree.leaves(trainer.frozen)
        # jax counts a 4-bit element as one byte (numpy's itemsize); XLA's figure is the real one
        frozen = sum(x.size * jax.numpy.dtype(x.dtype).itemsize for x in leaves) / 1e9
        rows.append(
            [quant or "none (float32)", f"{frozen:.3f}", f"{step_memory(trainer, data[0]):.3f}"]
        )
        print(rows[-1], flush=True)
    print(table(["base", "frozen GB (jax)", "step GB (XLA)"], rows))


def accelerator_config(tiny: bool) -> Any:
    import mistral_nnx

    config = mistral_nnx.MistralConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, layer_windows=(None,) * 32,
    )  # fmt: skip
    if tiny:
        config = config.replace(num_layers=2, hidden_size=256, intermediate_size=512, head_dim=32,
                                num_heads=8, num_kv_heads=2, layer_windows=(None,) * 2)  # fmt: skip
    return config


def random_batch(vocab: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (batch_size, seq_len)
    return {
        "tokens": rng.integers(0, vocab, shape).astype(np.int32),
        "loss_mask": np.ones(shape, bool),
        "valid": np.ones(shape, bool),
    }


def time_steps(step: Callable[[], float], n: int) -> tuple[list[float], float]:
    """One untimed first step (compiles, warms up), then `n` timed ones; each ends when its loss
    is on the host. Returns the step times and the last loss."""
    t = time.perf_counter()
    step()
    print(f"first step (compile, warm-up) {time.perf_counter() - t:.1f} s", flush=True)
    times, loss = [], float("nan")
    for _ in range(n):
        t = time.perf_counter()
        loss = float(step())
        times.append(time.perf_counter() - t)
    return times, loss


def report(args: argparse.Namespace, times: list[float], peak: float, loss: float) -> None:
    tok = args.batch_size * args.seq_len / median(times)
    row = [args.stack, f"{tok:.0f}", f"{median(times):.3f}", f"{min(times):.3f}", f"{loss:.4f}"]
    heads = ["stack", "tokens/s", "step s (median)", "best step s", "last loss", "peak GB"]
    print(table(heads, [row + [f"{peak:.1f}"]]))


def accelerator_peft(args: argparse.Namespace) -> None:
    """The same model, data and optimizer through transformers + PEFT on torch's GPU: bf16 base,
    LoRA r16 on the seven projections (PEFT keeps the adapters in float32, as ours are)."""
    import peft
    import torch
    import transformers

    config = accelerator_config(args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.MistralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):
        hf: Any = transformers.MistralForCausalLM(hf_config)
        hf = hf.to(torch.bfloat16)
    if args.remat:
        hf.gradient_checkpointing_enable()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    print(header(f"finetune: Mistral-7B shapes, LoRA r16, bf16 base, PEFT {peft.__version__}"))
    trainable = sum(p.numel() for p in params)
    print(f"trainable {trainable:,}; adapter dtype {params[0].dtype}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {device}")  # fmt: skip
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b = random_batch(config.vocab_size, args.batch_size, args.seq_len)
    ids = torch.tensor(b["tokens"], dtype=torch.long, device=device)

    def step() -> float:
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        return float(out.loss.detach())  # waits for the GPU, as our step's float() does

    times, loss = time_steps(step, args.rounds * args.k)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    report(args, times, peak, loss)


def accelerator(args: argparse.Namespace) -> None:
    """Mistral-7B shapes, random bf16 base weights made on the device, float32 LoRA r16."""
    import gpu
    import jax
    from flax import nnx

    from mistral_nnx.train.lora import LoraConfig, apply_lora, count_params
    from mistral_nnx.train.step import OptimConfig, Trainer

    print(header(f"finetune: Mistral-7B shapes, LoRA r16, {args.qlora or 'bf16'} base"))
    print(versions(["jax", "flax", "optax", "qwix"]))
    config = accelerator_config(args.tiny)
    t = time.perf_counter()
    base, _, _ = gpu.random_model(config)  # made on the device, one small fill per shape
    print(f"base weights made in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    model = apply_lora(base, LoraConfig(16, 32.0, quant=args.qlora))
    model.remat = args.remat
    print(f"LoRA applied in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"trainable {count_params(model, nnx.LoRAParam):,}; devices {jax.devices()}")
    optim = OptimConfig(steps=1000, lr=1e-4, schedule="constant", clip=1.0)
    trainer = Trainer(model, optim)
    batch = random_batch(config.vocab_size, args.batch_size, args.seq_len)
    times, loss = time_steps(lambda: trainer.step(batch)["loss"], args.rounds * args.k)
    stats = jax.devices()[0].memory_stats() or {}
    report(args, times, stats.get("peak_bytes_in_use", 0) / 1e9, loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["smollm2", "mistral7b"], default="smollm2")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-k", type=int, default=3, help="steps per framework per round")
    parser.add_argument("--remat", choices=["layer"], default=None)
    parser.add_argument("--tiny", action="store_true", help="mistral7b preset at toy size")
    parser.add_argument("--qlora", choices=["nf4", "int4", "int8"], help="mistral7b: QLoRA base")
    parser.add_argument("--stack", choices=["ours", "peft"], default="ours", help="mistral7b")
    parser.add_argument(
        "--qlora-memory", action="store_true", help="smollm2: LoRA vs QLoRA step memory only"
    )
    parser.add_argument(
        "--processes", action="store_true", help="smollm2 LoRA: each stack in its own process"
    )
    parser.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=["training", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        lora_worker(args)
    elif args.processes:
        lora_processes(args)
    elif args.qlora_memory:
        qlora_memory(args)
    elif args.preset == "smollm2":
        cpu(args)
    elif args.stack == "peft":
        accelerator_peft(args)
    else:
        accelerator(args)


if __name__ == "__main__":
    main()
