"""Decode at batch 1 and prefill against llama.cpp at the matrix sizes of real Mistral models,
CPU float32.

    .venv/bin/python benchmarks/vs_llama_cpp.py                         # Mistral 7B's shapes
    .venv/bin/python benchmarks/vs_llama_cpp.py --shapes smollm2,mistral7b,nemo --layers 4

SmolLM2-135M (cpu_vs_hf.py --llama-cpp) has 576-wide layers: 211 small matrix-vector products
per step, where a fixed cost per product weighs. The models this project is for have 4096- and
5120-wide layers. This writes an F32 GGUF (llama architecture, SmolLM2's tokenizer, seeded
random weights, an untied head) with the chosen model's layer shapes and `--layers` of its
layers, loads it in both (mistral_nnx's GGUF loader, llama-cpp-python with a float32 KV cache),
and alternates (A B, B A, ...): the same greedy decode, `--new-tokens` steps after a
`--prompt-len` prompt, one token per llama.cpp `eval`, on every core, timed from the first new
token to the last in both; then one `--prefill-len` prompt's forward (cache written, the last
position's logits, which are compared). Prints the medians, the best runs, whether the greedy
tokens agree, and each decode step against the host's read floor (the bytes of weights a step
reads / the read bandwidth). Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402
from cpu_vs_hf import LlamaCpp, Ours, alternate, same_prefix  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int  # the real model's depth (only --layers of them are built)


SHAPES = {
    "smollm2": Shape(576, 1536, 9, 3, 64, 30),
    "mistral7b": Shape(4096, 14336, 32, 8, 128, 32),
    "nemo": Shape(5120, 14336, 32, 8, 128, 40),
}


def write_gguf(path: Path, shape: Shape, layers: int, seed: int = 0) -> tuple[int, int]:
    """An F32 llama-architecture GGUF of `layers` layers of `shape`, with SmolLM2's tokenizer
    (vocab 49152) and an untied head; returns (the bytes of weights a decode step reads, the
    bytes of the head among them)."""
    import gguf

    source = gguf.GGUFReader(_util.smollm2_gguf())
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in source.fields.items():  # the tokenizer, as SmolLM2's file has it
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)

    rng = np.random.default_rng(seed)
    h, kv, e = shape.hidden, shape.kv_heads * shape.head_dim, shape.head_dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), np.float32) * cols**-0.5).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h, np.float32)).astype(np.float32)

    read = 0
    tensors = {"token_embd.weight": matrix(vocab, h)}
    for i in range(layers):
        layer = {
            "attn_norm": norm(),
            "attn_q": matrix(shape.heads * e, h),
            "attn_k": matrix(kv, h),
            "attn_v": matrix(kv, h),
            "attn_output": matrix(h, shape.heads * e),
            "ffn_norm": norm(),
            "ffn_gate": matrix(shape.ffn, h),
            "ffn_up": matrix(shape.ffn, h),
            "ffn_down": matrix(h, shape.ffn),
        }
        tensors.update({f"blk.{i}.{k}.weight": v for k, v in layer.items()})
    tensors["output_norm.weight"] = norm()
    tensors["output.weight"] = matrix(vocab, h)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
        if name != "token_embd.weight":  # a step reads B rows of the embedding, not the table
            read += value.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read, tensors["output.weight"].nbytes


def measure(
    name: str,
    path: Path,
    weights: tuple[int, int],
    read_bw: float,
    threads: int,
    args: argparse.Namespace,
) -> tuple[list[str], list[str]]:
    """(decode row, prefill row): ours and llama.cpp's on the GGUF at `path`, alternated.
    `weights`: (bytes a decode step reads, the head's bytes among them)."""
    import mistral_nnx

    read, head = weights
    model = mistral_nnx.load_model(path, progress=False)
    model.config = model.config.replace(eos_token_ids=())
    ours, llama = Ours(model), LlamaCpp(path, threads)
    ids = np.random.default_rng(1).integers(100, 40000, (1, args.prompt_len))
    new = args.new_tokens
    _, tok_ours = ours.generate(ids, new, new)  # warm-up (compiles)
    _, tok_llama = llama.generate(ids, new)
    s = alternate(
        {
            "ours": lambda: ours.generate(ids, new, new)[0],
            "llama": lambda: llama.generate(ids, new)[0],
        },
        args.repeats,
    )
    steps = new - 1
    med_o, med_l = _util.median(s["ours"]) / steps, _util.median(s["llama"]) / steps
    best_o, best_l = min(s["ours"]) / steps, min(s["llama"]) / steps
    floor = read / (read_bw * 1e9)
    decode_row = [
        f"{name} x{args.layers} layers", f"{read / 1e9:.2f} GB",
        f"{1e3 * med_o:.1f} ms ({floor / med_o:.0%})",
        f"{1e3 * med_l:.1f} ms ({floor / med_l:.0%})",
        f"{med_l / med_o:.2f}x", f"{best_l / best_o:.2f}x",
        same_prefix(tok_ours, tok_llama),
    ]  # fmt: skip

    # Prefill: one forward over a prompt that fills the cache and gives the last logits.
    prompt = np.random.default_rng(2).integers(100, 40000, (1, args.prefill_len))
    logits_ours = ours.prefill(prompt)[0]  # warm-up (compiles)
    logits_llama = llama.prefill(prompt)
    diff = float(np.max(np.abs(logits_ours - logits_llama)))
    p = alternate(
        {
            "ours": lambda: _util.timed(lambda: ours.prefill(prompt))[0],
            "llama": lambda: _util.timed(lambda: llama.prefill(prompt))[0],
        },
        args.repeats,
    )
    med_o, med_l = _util.median(p["ours"]), _util.median(p["llama"])
    # The layers' weights once per token, the head once (the last position); attention left out.
    flops = 2 * (args.prefill_len * (read - head) + head) / 4
    prefill_row = [
        f"{name} x{args.layers} layers", f"T={args.prefill_len}",
        f"{1e3 * med_o:.1f} ms ({flops / med_o / 1e9:.0f} GFLOPS)",
        f"{1e3 * med_l:.1f} ms ({flops / med_l / 1e9:.0f} GFLOPS)",
        f"{med_l / med_o:.2f}x", f"{min(p['llama']) / min(p['ours']):.2f}x",
        f"last logits: max abs diff {diff:.1e}, max abs {np.max(np.abs(logits_llama)):.1f}",
    ]  # fmt: skip
    return decode_row, prefill_row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="mistral7b", help=f"comma list of: {', '.join(SHAPES)}")
    p.add_argument("--layers", type=int, default=4, help="layers built (memory: ~0.9 GB each)")
    p.add_argument("--repeats", type=int, default=5, help="alternated runs")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=128, help="prompt of the prefill timing")
    p.add_argument("--workdir", default=None, help="where to write the GGUFs (temp dir)")
    args = p.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}")
    if args.layers < 1:
        p.error("--layers must be at least 1")
    if not 1 <= args.prefill_len <= 512:
        p.error("--prefill-len must be 1..512 (llama.cpp's context here)")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.prompt_len + args.new_tokens > 512:
        p.error("need --new-tokens >= 2, --prompt-len >= 1, and both together <= 512")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if importlib.util.find_spec("llama_cpp") is None:
        p.error("llama-cpp-python is not installed: pip install -e '.[bench]'")

    import jax

    jax.config.update("jax_platforms", "cpu")

    threads = _util.num_cores()
    print(_util.header("mistral_nnx vs llama.cpp, decode B=1, CPU float32"))
    print(f"{_util.versions()}\nllama.cpp: {threads} threads; XLA: its default pool")
    read_bw = _util.read_bandwidth(1.0)
    print(f"read bandwidth (1 GB, best): {read_bw:.1f} GB/s")

    rows: list[list[str]] = []
    prefill_rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in shapes:
            shape = SHAPES[name]
            path = Path(tmp) / f"{name}-{args.layers}.F32.gguf"
            t0 = time.perf_counter()
            weights = write_gguf(path, shape, args.layers)
            print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
            decode_row, prefill_row = measure(name, path, weights, read_bw, threads, args)
            rows.append(decode_row)
            prefill_rows.append(prefill_row)
            print(f"  {name} done", file=sys.stderr, flush=True)
    print(f"\nmedians of {args.repeats} alternated runs, {args.new_tokens - 1} decode steps "
          f"after a {args.prompt_len}-token prompt; (%) = the read floor / the step\n")  # fmt: skip
    headers = [
        "shape", "weights read/step", "mistral_nnx step", "llama.cpp step",
        "speedup (median)", "speedup (best)", "greedy tokens",
    ]  # fmt: skip
    print(_util.table(headers, rows))
    print(
        f"\nprefill of one {args.prefill_len}-token prompt (cache written, last logits), "
        f"medians of {args.repeats} alternated runs; GFLOPS from the weights alone\n"
    )
    headers = [
        "shape", "prompt", "mistral_nnx", "llama.cpp", "speedup (median)", "speedup (best)",
        "check",
    ]  # fmt: skip
    print(_util.table(headers, prefill_rows))


if __name__ == "__main__":
    main()
