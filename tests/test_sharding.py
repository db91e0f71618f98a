"""Sharding over device meshes, and multi-process runs under jax.distributed.

This pytest process keeps its single device: the multi-device checks run in subprocesses with
fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count): tests/multidevice/
run_checks.py once for every 8-device check (it records facts, the tests below assert on them),
and tests/multidevice/mp_worker.py as 2 processes x 2 devices joined on localhost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from conftest import build_hf

import mistral_nnx as mn
from mistral_nnx import distributed
from mistral_nnx.errors import MistralNNXError
from mistral_nnx.sharding import PRESETS, parse_rules, resolve_rules

HELPERS = Path(__file__).parent / "multidevice"
# Every sharded dimension divides 8: 8 query heads, mlp 128, vocab 256, embed 64.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    head_dim=16,
    sliding_window=16,
    max_position_embeddings=128,
)
MESHES = ["data=1,model=8", "data=2,model=4", "data=8,model=1"]
RUNS = {"kv8": [[m, "tp+fsdp"] for m in MESHES], "kv2": [["data=2,model=4", "tp+fsdp"]]}
# A ragged batch; 27 + 12 tokens run far past the window of 16, so the ring cache wraps.
PROMPTS = [[int(t) for t in np.random.RandomState(n).randint(3, 256, n)] for n in (3, 17, 27, 9)]
MAX_NEW = 12


def _env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sharding")
    build_hf("mistral", root / "kv8", seed=1, num_key_value_heads=8, **TINY)
    build_hf("mistral", root / "kv2", seed=2, num_key_value_heads=2, **TINY)
    return {"kv8": str(root / "kv8"), "kv2": str(root / "kv2")}


@pytest.fixture(scope="module")
def checks(checkpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run every 8-device check in one subprocess; its recorded results."""
    root = tmp_path_factory.mktemp("checks")
    rng = np.random.RandomState(0)
    lengths = rng.randint(4, 17, 8)
    config = dict(
        checkpoints=checkpoints,
        runs=RUNS,
        prompts=PROMPTS,
        max_new_tokens=MAX_NEW,
        tokens=rng.randint(0, 256, (8, 16)).tolist(),
        valid=(np.arange(16)[None] < lengths[:, None]).tolist(),
    )
    (root / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [
            sys.executable,
            str(HELPERS / "run_checks.py"),
            str(root / "config.json"),
            str(root / "out.json"),
        ],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"run_checks.py failed:\n{_tail(proc.stderr)}"
    return json.loads((root / "out.json").read_text())


# ---- single device, in this process -----------------------------------------------------------


def test_this_process_keeps_one_device():
    assert jax.device_count() == 1


def test_mesh_spec_errors():
    with pytest.raises(MistralNNXError, match="has 8 devices but 1 are available"):
        mn.make_mesh("data=2,model=4")
    for bad in ("data=2;model=4", "data", "data=x", "data=1,data=1", "data=0"):
        with pytest.raises(MistralNNXError, match="mesh:"):
            mn.make_mesh(bad)
    mesh = mn.make_mesh("data=1,model=1")
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_rules_presets_and_custom():
    mesh = mn.make_mesh("data=1,model=1")
    assert resolve_rules("tp", mesh) == PRESETS["tp"]
    for name in ("q_heads", "kv_heads", "mlp", "vocab"):
        assert PRESETS["tp"][name] == PRESETS["tp+fsdp"][name] == "model"
    assert PRESETS["fsdp"]["embed"] == PRESETS["tp+fsdp"]["embed"] == "data"
    assert parse_rules("mlp=model, embed=None") == {"mlp": "model", "embed": None}
    assert resolve_rules({"mlp": "model", "vocab": None}, mesh) == {"mlp": "model", "vocab": None}
    # A preset adapts to the mesh: no data axis, so batch and embed stay replicated.
    model_only = mn.make_mesh("model=1")
    assert resolve_rules("tp+fsdp", model_only) == {**PRESETS["tp"], "batch": None, "embed": None}
    with pytest.raises(MistralNNXError, match="unknown logical axis 'heads'"):
        resolve_rules({"heads": "model"}, mesh)
    with pytest.raises(MistralNNXError, match="mesh axis 'tensor'"):
        resolve_rules("mlp=tensor", mesh)
    with pytest.raises(MistralNNXError, match=r"unknown preset 'tp\+dp'"):
        resolve_rules("tp+dp", mesh)
    with pytest.raises(MistralNNXError, match="cannot parse"):
        resolve_rules("mlp=model,embed", mesh)
    with pytest.raises(MistralNNXError, match="head_dim is never sharded"):
        resolve_rules({"head_dim": "model"}, mesh)


def test_setup_distributed_single_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    assert distributed.setup_distributed() is False
    assert distributed.setup_distributed(num_processes=1) is False
    with pytest.raises(MistralNNXError, match="also give num_processes and process_id"):
        distributed.setup_distributed("127.0.0.1:1234")
    with pytest.raises(MistralNNXError, match=r"process_id 2 is not in \[0, 2\)"):
        distributed.setup_distributed("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(MistralNNXError, match="JAX_NUM_PROCESSES"):
        distributed.setup_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert distributed.setup_distributed() is False


# ---- 8 fake devices, one subprocess ------------------------------------------------------------


def test_subprocess_has_eight_devices(checks):
    assert checks["devices"] == 8


@pytest.mark.parametrize("run", [f"{n} {m} {r}" for n, runs in RUNS.items() for m, r in runs])
def test_sharded_forward_and_generate_match_single_device(checks, run):
    result = checks["runs"][run]
    assert result["logits_diff"] < 1e-5
    reference = checks[run.split()[0]]["tokens"]
    assert result["tokens"] == reference
    assert [len(t) for t in reference] == [MAX_NEW] * len(PROMPTS)


def test_every_device_holds_one_nth_of_each_parameter(checks):
    for run, result in checks["runs"].items():
        for name, p in result["params"].items():
            assert p["devices"] == 8, (run, name)
            assert p["shard_sizes"] == [p["size"] // p["n"]], (run, name, p)
    # tp+fsdp on 2 x 4: the big matrices are split 8 ways, norms only over data.
    params = checks["runs"]["kv8 data=2,model=4 tp+fsdp"]["params"]
    for name in (
        "embed",
        "lm_head",
        "layers.0.attn.wq",
        "layers.1.attn.wk",
        "layers.0.attn.wo",
        "layers.0.mlp.gate",
        "layers.1.mlp.down",
    ):
        assert params[name]["n"] == 8, name
    assert params["norm.weight"]["n"] == 2


def test_partition_specs_follow_the_preset(checks):
    params = checks["runs"]["kv8 data=2,model=4 tp+fsdp"]["params"]
    expected = {
        "embed": ["model", "data"],
        "lm_head": ["model", "data"],
        "layers.0.attn.wq": ["model", None, "data"],
        "layers.0.attn.wk": ["model", None, "data"],
        "layers.0.attn.wo": ["data", "model", None],
        "layers.0.mlp.up": ["model", "data"],
        "layers.0.mlp.down": ["data", "model"],
        "layers.0.attn_norm.weight": ["data"],
    }
    for name, spec in expected.items():
        assert params[name]["spec"] == spec, name
    specs = checks["preset_specs"]
    assert specs["tp"]["embed,q_heads,head_dim"] == [None, "model", None]
    assert specs["tp"]["vocab,embed"] == ["model", None]
    assert specs["fsdp"]["embed,mlp"] == ["data", None]
    assert specs["tp+fsdp"]["embed,mlp"] == ["data", "model"]
    assert specs["replicated"]["vocab,embed"] == [None, None]
    assert specs["tp"]["batch,kv_heads"] == ["data", None]  # 2 kv heads over 4: replicated


def test_kv_cache_sharded_over_kv_heads_or_replicated(checks):
    runs = checks["runs"]
    # 8 kv heads: sharded over model; batch of 4 over data=2, but not over data=8.
    assert runs["kv8 data=2,model=4 tp+fsdp"]["cache_k"] == ["data", "model", None, None]
    assert runs["kv8 data=1,model=8 tp+fsdp"]["cache_k"] == ["data", "model", None, None]
    assert runs["kv8 data=8,model=1 tp+fsdp"]["cache_k"] == [None, "model", None, None]
    # 2 kv heads on model=4: cache and wk/wv replicated over model, no error, same tokens.
    kv2 = runs["kv2 data=2,model=4 tp+fsdp"]
    assert kv2["cache_k"] == ["data", None, None, None]
    assert kv2["params"]["layers.0.attn.wk"]["spec"] == [None, None, "data"]
    assert kv2["params"]["layers.0.attn.wq"]["spec"] == ["model", None, "data"]
    assert kv2["same_tokens"] and kv2["logits_diff"] < 1e-5


def test_bad_input_refused_before_any_weight_is_read(checks):
    errors = checks["bad_inputs"]
    assert "'data=2,model=2' has 4 devices but 8 are available" in errors["mesh_size"]
    assert "unknown logical axis 'heads'" in errors["unknown_logical"]
    assert "mesh axis 'tensor'" in errors["unknown_mesh_axis"]
    assert "unknown preset 'tp+dp'" in errors["unknown_preset"]
    assert re.search(
        r"layers\.0\.attn\.w[qo] dimension \d \(q_heads, size 8\) does not divide "
        r"evenly over mesh axis 'model' of size 3",
        errors["uneven"],
    )


# ---- 2 processes x 2 devices, jax.distributed on localhost -----------------------------------


@dataclass
class Finished:
    returncode: int | None  # None: killed by the launcher
    log: str
    seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    commands: list[list[str]], logs: Path, *, grace: float, deadline: float
) -> list[Finished]:
    """Start the processes, each in its own process group; once one fails, the others get
    `grace` seconds to stop by themselves, then their groups are killed; all are killed at
    `deadline` seconds. Never hangs."""
    start = time.monotonic()
    files = [open(logs / f"process{i}.log", "w+") for i in range(len(commands))]
    procs = [
        subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(2), start_new_session=True
        )
        for cmd, f in zip(commands, files, strict=True)
    ]
    ended: dict[int, float] = {}
    failed_at = None
    try:
        while len(ended) < len(procs):
            now = time.monotonic() - start
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = now
                    if p.returncode != 0 and failed_at is None:
                        failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            time.sleep(0.05)
    finally:
        killed = set()
        for i, p in enumerate(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                killed.add(i)
    out = []
    for i, f in enumerate(files):
        f.seek(0)
        out.append(
            Finished(
                None if i in killed else procs[i].returncode,
                f.read(),
                ended.get(i, time.monotonic() - start),
            )
        )
        f.close()
    return out


def _worker_commands(
    checkpoint: str, out: Path, *, fail: tuple[int, str] | None, timeout: int
) -> list[list[str]]:
    """Both processes' command lines; `fail` = (process id, "before-join" | "after-join")."""
    port = _free_port()
    commands = []
    for pid in range(2):
        flags = (
            f"--coordinator 127.0.0.1:{port} --num-processes 2 --process-id {pid} "
            f"--checkpoint {checkpoint} --mesh data=2,model=2 --max-new-tokens {MAX_NEW} "
            f"--out {out / f'out{pid}.json'} --timeout {timeout}"
        ).split()
        if fail is not None and fail[0] == pid:
            flags += ["--fail", fail[1]]
        worker = str(HELPERS / "mp_worker.py")
        commands.append([sys.executable, worker, *flags, "--prompts", json.dumps(PROMPTS)])
    return commands


def test_two_processes_generate_like_one(checks, checkpoints, tmp_path):
    commands = _worker_commands(checkpoints["kv8"], tmp_path, fail=None, timeout=60)
    results = launch(commands, tmp_path, grace=20, deadline=240)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} failed (rc {r.returncode}):\n{_tail(r.log)}"
    reference = checks["kv8"]["tokens"]
    for pid in range(2):
        got = json.loads((tmp_path / f"out{pid}.json").read_text())
        assert (got["process_index"], got["process_count"]) == (pid, 2)
        assert (got["devices"], got["local_devices"]) == (4, 2)
        assert got["embed_shard"] == [128, 32]  # vocab 256 over model=2, embed 64 over data=2
        assert got["tokens"] == reference


@pytest.mark.parametrize(
    "failing, when", [(1, "after-join"), (0, "after-join"), (1, "before-join")]
)
def test_one_process_failing_ends_all_quickly(checkpoints, tmp_path, failing, when):
    """The failing process exits at once with its error. The other, left alone (not killed),
    stops by itself within jax.distributed's timeouts (5 s here): a dead peer is noticed by its
    missing heartbeats, one that never joins by the initialization timeout."""
    t0 = time.monotonic()
    commands = _worker_commands(checkpoints["kv8"], tmp_path, fail=(failing, when), timeout=5)
    results = launch(commands, tmp_path, grace=30, deadline=90)
    failed, other = results[failing], results[1 - failing]
    assert failed.returncode == 1
    assert f"RuntimeError: injected failure in process {failing} {when[:-5]} joining" in failed.log
    assert failed.seconds < 20
    assert other.returncode is not None, "the surviving process hung and had to be killed"
    assert other.returncode != 0, _tail(other.log)
    assert not (tmp_path / f"out{1 - failing}.json").exists()
    assert time.monotonic() - t0 < 60
