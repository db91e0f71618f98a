"""One process of the multi-process test: join, load sharded over every device, generate greedy.

Run by tests/test_sharding.py (several copies on localhost); writes its tokens as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--rules", default="tp+fsdp")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail", choices=["before-join", "after-join"], help="raise early")
    parser.add_argument("--timeout", type=int, default=20, help="jax.distributed timeouts (s)")
    args = parser.parse_args()

    import jax

    import mistral_nnx as mn
    from mistral_nnx.distributed import setup_distributed
    from mistral_nnx.engine import EngineOptions, generate

    if args.fail == "before-join":
        raise RuntimeError(f"injected failure in process {args.process_id} before joining")
    setup_distributed(
        args.coordinator,
        args.num_processes,
        args.process_id,
        initialization_timeout=args.timeout,
        heartbeat_timeout=args.timeout,
        shutdown_timeout=args.timeout,
    )
    if args.fail == "after-join":
        raise RuntimeError(f"injected failure in process {args.process_id} after joining")
    mesh = mn.make_mesh(args.mesh)
    model = mn.load_model(args.checkpoint, mesh=mesh, rules=args.rules, progress=False)
    shard = model.embed.get_value().addressable_shards[0].data.shape
    out = generate(
        model,
        json.loads(args.prompts),
        max_new_tokens=args.max_new_tokens,
        options=EngineOptions(decode_steps=4, prefill_chunk=16),  # as run_checks.py
    )
    result = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        devices=jax.device_count(),
        local_devices=jax.local_device_count(),
        embed_shard=list(shard),
        tokens=[c.tokens for c in out],
    )
    Path(args.out).write_text(json.dumps(result))
    print(f"process {args.process_id}: ok", file=sys.stderr)


if __name__ == "__main__":
    from mistral_nnx.distributed import exit_process

    try:
        main()
    except BaseException:
        traceback.print_exc()
        exit_process(1)  # at once: the peers see this process gone and stop too
