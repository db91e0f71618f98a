"""Where a decode step or a prefill goes, op by op: XLA:CPU's own trace of one call, grouped.

    .venv/bin/python benchmarks/op_profile.py                          # decode, B=1, 16 tokens
    .venv/bin/python benchmarks/op_profile.py --batch 8 --prompt 1000  # decode at 1000 of context
    .venv/bin/python benchmarks/op_profile.py --prefill --prompt 128   # one prefill
    .venv/bin/python benchmarks/op_profile.py --train lora             # one train step, 2 x 128

SmolLM2-135M (the shipped GGUF, float32). After a warm-up, one `generate()` call is traced with
`jax.profiler`; the events of XLA's worker threads are read back (`jax.profiler.ProfileData`)
and grouped by kernel kind (numbered suffix dropped), output shape and the JAX op that made it
(from the compiled HLO's metadata). Times are thread time summed over both cores' workers, per
decode step (or per prefill), so they add up to more than the wall time when two kernels run at
once. Run it on a quiet machine: XLA's kernels slow down under a busy core.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

import mistral_nnx  # noqa: E402
from mistral_nnx import engine  # noqa: E402

_SKIP = ("ThunkExecutor", "Threadpool", "SlinkyThreadPool", "end:")


def hlo_index(text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (output shape, the JAX op of its metadata) from compiled HLO text."""
    index = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
        if m is None:
            continue
        meta = re.search(r'op_name="([^"]*)"', line)
        op = (meta.group(1) if meta else "").split("/")
        index[m.group(1)] = (
            m.group(2).split("{")[0],
            op[-2] if op[-1] == "dot_general" else op[-1],
        )
    return index


def traced(call: Any) -> list[tuple[str, int]]:
    """(kernel name, thread nanoseconds) of every XLA kernel the call ran."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        call()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    events = []
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            events += [(e.name, e.duration_ns) for e in line.events if not e.name.startswith(_SKIP)]
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=32, help="decode steps traced")
    parser.add_argument("--prefill", action="store_true", help="profile the prefill instead")
    parser.add_argument("--train", choices=["lora", "full"], help="profile one train step")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    if args.train:
        return train_profile(args)

    model = mistral_nnx.load_model(_util.smollm2_gguf(), progress=False)
    model.config = model.config.replace(eos_token_ids=())
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, model.config.vocab_size, (args.batch, args.prompt)).tolist()
    new = 1 if args.prefill else args.steps + 1
    programs: dict[str, Any] = {}

    def spy(name: str) -> Any:  # keeps a copy of the arguments of the jitted call to rerun it
        real = getattr(engine, name)

        def call(*a: Any, **k: Any) -> Any:
            copy = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, a)
            programs[name] = (real, copy, k)
            return real(*a, **k)

        return call

    def run() -> dict[str, float]:
        stats: dict[str, float] = {}
        engine.generate(model, prompts, max_new_tokens=new, stats=stats)
        return stats

    engine._decode, engine._prefill_chunk = spy("_decode"), spy("_prefill_chunk")
    run()
    wall = [run() for _ in range(3)]
    # The first call of the program profiled, run once more on its own (a copy: it donates).
    name = "_prefill_chunk" if args.prefill else "_decode"
    real, a, k = programs[name]
    index = hlo_index(real.lower(*a, **k).compile().as_text())
    out: list[Any] = []
    events = traced(lambda: out.append(jax.block_until_ready(real(*a, **k))))
    per = 1 if args.prefill else int((np.asarray(out[0][2]) >= 0).sum(axis=1).max())  # steps run
    if args.prefill:
        seconds = _util.median([s["first_token_seconds"] for s in wall])
        what = f"prefill of B={args.batch} x {args.prompt} tokens: {1e3 * seconds:.1f} ms wall"
    else:
        steps = new - 1
        seconds = _util.median([(s["seconds"] - s["first_token_seconds"]) / steps for s in wall])
        what = (
            f"decode step, B={args.batch}, {args.prompt}-token prompt: {1e3 * seconds:.2f} ms wall"
        )
    report(events, index, per, what, "prefill" if args.prefill else "step", args.top)


def report(
    events: list[tuple[str, int]], index: dict[str, Any], per: int, what: str, unit: str, top: int
) -> None:
    """Print the kernels grouped by (kind, output shape, JAX op), per `unit` (`per` of them)."""
    groups: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for kernel, ns in events:
        shape, op = index.get(kernel, ("", ""))
        key = (re.sub(r"\.\d+$", "", kernel), shape, op)
        groups[key][0] += ns / 1e6 / per
        groups[key][1] += 1 / per
    total = sum(g[0] for g in groups.values())
    print(_util.header(f"XLA op profile, SmolLM2-135M f32, {what}"))
    print(f"kernel thread time {total:.2f} ms per {unit}")
    rows = [
        [kernel, shape, op, f"{ms:.3f}", f"{100 * ms / total:.1f}%", f"{count:.0f}"]
        for (kernel, shape, op), (ms, count) in sorted(groups.items(), key=lambda g: -g[1][0])
    ][:top]
    print(_util.table(["kernel", "output", "jax op", "thread ms", "share", "count"], rows))


def train_profile(args: argparse.Namespace) -> None:
    """One train step (AdamW, clipping; LoRA r16 on the seven projections, or full) over a
    batch of 2 x 128 random tokens, traced after two warm-up steps."""
    import time

    from flax import nnx

    from mistral_nnx.train.lora import LoraConfig, apply_lora
    from mistral_nnx.train.step import OptimConfig, Trainer, train_step

    model = mistral_nnx.load_model(_util.smollm2_gguf(), progress=False)
    lora = args.train == "lora"
    if lora:
        model = apply_lora(model, LoraConfig(16, 32.0))
    optim = OptimConfig(steps=1000, lr=1e-4, schedule="constant", clip=1.0)
    trainer = Trainer(model, optim, wrt=nnx.LoRAParam if lora else nnx.Param)
    tokens = np.random.default_rng(0).integers(100, 40000, (2, 128)).astype(np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}
    wall = []
    for _ in range(5):
        start = time.perf_counter()
        trainer.step(batch)
        wall.append(time.perf_counter() - start)
    step_args = trainer.step_args(batch)
    index = hlo_index(train_step.lower(*step_args).compile().as_text() or "")
    state = [x.copy() for x in step_args[5]]  # the step donates its state
    fixed, rest = step_args[:5], step_args[6:]  # rest: the batch and its weight
    events = traced(lambda: jax.block_until_ready(train_step(*fixed, state, *rest)))
    what = f"{args.train} train step, 2 x 128 tokens: {_util.median(wall[2:]):.3f} s wall"
    report(events, index, 1, what, "step", args.top)


if __name__ == "__main__":
    main()
