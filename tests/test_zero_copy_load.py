"""Zero-copy loading (load_model's mmap) and the 64-byte aligned safetensors writer.

Whether a weight was adopted without a copy is read off /proc/self/maps: a param whose buffer
lies inside a mapping of the checkpoint file is the file's page-cache pages; the mapping's file
offset then tells which tensor of the file it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import build_hf, hf_to_native
from file_maps import file_maps
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import mistral_nnx as mn
from mistral_nnx.checkpoint import safetensors_io
from mistral_nnx.checkpoint.gguf_metadata import read_gguf_header
from mistral_nnx.checkpoint.safetensors_io import read_header, save_safetensors
from mistral_nnx.errors import MistralNNXError

# Adoption of host memory is what JAX's CPU backend does; an accelerator copies to its memory.
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-backend property")


# ---- helpers ------------------------------------------------------------------------------------
def _params(model: mn.Mistral) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _file_offsets(model: mn.Mistral, path: Path) -> dict[str, int]:
    """Param name -> the file offset its buffer maps, for the params that are views of `path`."""
    maps = file_maps(path)
    out = {}
    for name, array in _params(model).items():
        ptr = array.unsafe_buffer_pointer()
        for lo, hi, offset in maps:
            if lo <= ptr < hi:
                out[name] = offset + ptr - lo
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model: mn.Mistral) -> np.ndarray:
    tokens = np.random.RandomState(3).randint(0, 211, (2, 24)).astype(np.int32)
    return np.asarray(model(jnp.asarray(tokens)))


def _assert_same_params(a: mn.Mistral, b: mn.Mistral) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(np.asarray(pa[name]), np.asarray(pb[name]), err_msg=name)


def _rewrite(src: Path, dst: Path, write: Any) -> Path:
    """A copy of the HF checkpoint `src` whose model.safetensors is written by `write`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    write(load_file(str(src / "model.safetensors")), dst / "model.safetensors")
    return dst


@pytest.fixture
def aligned(hf_checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path) -> Path:
    """The gqa_window16 checkpoint rewritten by our aligned writer."""
    source, _ = hf_checkpoints["gqa_window16"]
    return _rewrite(
        source,
        tmp_path / "aligned",
        lambda t, p: save_safetensors(t, p, metadata={"format": "pt"}),
    )


# ---- safetensors --------------------------------------------------------------------------------
@cpu_only
def test_aligned_checkpoint_loads_without_a_copy(aligned: Path) -> None:
    file = aligned / "model.safetensors"
    starts = {info.start for info in read_header(file)}
    assert all(start % 64 == 0 for start in starts)
    mapped = mn.load_model(aligned, progress=False)
    offsets = _file_offsets(mapped, file)
    # every weight is the file's bytes, each at a different tensor's offset
    assert offsets.keys() == _params(mapped).keys()
    assert set(offsets.values()) == starts
    copied = mn.load_model(aligned, progress=False, mmap=False)
    assert _file_offsets(copied, file) == {}
    _assert_same_params(mapped, copied)
    np.testing.assert_array_equal(_logits(mapped), _logits(copied))


@cpu_only
def test_unaligned_file_is_copied(
    hf_checkpoints: dict[str, tuple[Path, Any]], aligned: Path, tmp_path: Path
) -> None:
    """safetensors' own writer pads its header to 8 bytes only: with a metadata string of the
    right length every tensor starts at 8 mod 64, which JAX cannot adopt."""
    source, _ = hf_checkpoints["gqa_window16"]
    tensors = load_file(str(source / "model.safetensors"))
    file = tmp_path / "model.safetensors"
    for pad in range(64):  # the header length moves in steps of 8
        save_file(tensors, str(file), metadata={"pad": "x" * pad})
        if read_header(file)[0].start % 64 == 8:
            break
    starts = [info.start % 64 for info in read_header(file)]
    assert set(starts) == {8}  # every tensor's size is a multiple of 64 bytes
    unaligned = tmp_path / "unaligned"
    unaligned.mkdir()
    shutil.copy(source / "config.json", unaligned / "config.json")
    file.rename(unaligned / "model.safetensors")
    model = mn.load_model(unaligned, progress=False)
    assert _file_offsets(model, unaligned / "model.safetensors") == {}
    _assert_same_params(model, mn.load_model(aligned, progress=False))


@cpu_only
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_large_unaligned_tensor_is_copied_whole(dtype: Any) -> None:
    """A tensor over the two-thread threshold is copied in two halves (cast fused): every row
    arrives, and the copy is one JAX adopts."""
    rows, cols = 1401, 1003  # 2.8 MB in bfloat16, an odd split
    raw = np.arange(rows * cols + 2, dtype=np.float32)
    view = raw[2:].reshape(rows, cols)  # numpy buffers are 16-aligned: never 64-aligned
    view.flags.writeable = False
    assert view.nbytes > 4 * (1 << 20) and not safetensors_io.is_aligned(view)
    copy = safetensors_io.owned(view, np.dtype(dtype), mapped=True)
    assert copy.dtype == dtype and safetensors_io.is_aligned(copy)
    np.testing.assert_array_equal(copy, view.astype(dtype))
    assert jax.device_put(copy).unsafe_buffer_pointer() == copy.ctypes.data


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_large_load_buffers_do_not_ask_for_huge_pages() -> None:
    """numpy advises transparent huge pages for arrays of 4 MB and up; the loader's buffers
    must not (on VMs that hand free memory back to the host, every fresh 2 MB page is faulted
    in from the host: loads 2-3x slower, benchmarks/RESULTS.md section 18)."""
    buf = safetensors_io.aligned_empty((2048, 1024), np.dtype(np.float32))  # 8 MB
    buf[...] = 1.0
    assert buf.flags.writeable and safetensors_io.is_aligned(buf)
    assert "hg" not in _vm_flags(buf.ctypes.data + buf.nbytes // 2)
    assert jax.device_put(buf).unsafe_buffer_pointer() == buf.ctypes.data


@cpu_only
def test_native_checkpoint_maps_all_but_q_and_k(aligned: Path, tmp_path: Path) -> None:
    """Mistral-native files: q/k rows are reordered (copied), everything else is mapped."""
    tensors = load_file(str(aligned / "model.safetensors"))
    heads, kv_heads, e = 4, 2, 16
    native = hf_to_native(tensors, heads, kv_heads)
    directory = tmp_path / "native"
    directory.mkdir()
    save_safetensors(native, directory / "consolidated.safetensors")
    params = {"dim": 64, "head_dim": e, "hidden_dim": 128, "n_heads": heads}
    params |= {"n_kv_heads": kv_heads, "n_layers": 3, "norm_eps": 1e-5, "vocab_size": 211}
    params |= {"rope_theta": 10000.0, "sliding_window": 16}
    (directory / "params.json").write_text(json.dumps(params))
    model = mn.load_model(directory, progress=False)
    mapped = _file_offsets(model, directory / "consolidated.safetensors")
    qk = {n for n in _params(model) if n.endswith(("attn.wq", "attn.wk"))}
    assert len(qk) == 6 and mapped.keys() == _params(model).keys() - qk
    _assert_same_params(model, mn.load_model(aligned, progress=False))


@cpu_only
def test_param_dtype_differing_from_the_file_is_copied(aligned: Path) -> None:
    model = mn.load_model(aligned, param_dtype="bfloat16", progress=False)
    assert _file_offsets(model, aligned / "model.safetensors") == {}
    copied = mn.load_model(aligned, param_dtype="bfloat16", progress=False, mmap=False)
    _assert_same_params(model, copied)


# ---- GGUF ---------------------------------------------------------------------------------------
# Odd sizes on purpose: a norm of 40 float32 is 160 bytes, so with GGUF's 32-byte alignment the
# tensors after it alternate between 0 and 32 mod 64 (some adopted, some copied).
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 40, 72, 4, 2, 10, 48, 2


def _write_gguf(path: Path, matrix_dtype: type) -> dict[str, int]:
    """A random llama GGUF (q/k rows in llama.cpp's order, matrices in `matrix_dtype`, norms
    float32) whose data section starts at a multiple of 64 (a metadata string's length moves
    it, in steps of 32); returns each tensor's absolute file offset."""
    for pad in range(64):
        _write_gguf_once(path, matrix_dtype, "x" * pad)
        starts = {name: t.start for name, t in read_gguf_header(path).tensors.items()}
        if starts["token_embd.weight"] % 64 == 0:
            return starts
    raise AssertionError("no padding put the GGUF data at a multiple of 64")


def _write_gguf_once(path: Path, matrix_dtype: type, pad: str) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_description(pad)
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"<t{i}>" for i in range(VOCAB)])

    def add(name: str, *shape: int) -> None:
        dtype = np.float32 if len(shape) == 1 else matrix_dtype
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(dtype))

    add("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):  # q and k first: 64-byte aligned in the float32 file
        add(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        add(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(f"blk.{i}.attn_norm.weight", HIDDEN)
        add(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", HIDDEN)
    add("output.weight", VOCAB, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@cpu_only
@pytest.mark.parametrize(
    ("matrix_dtype", "param_dtype"),
    [(np.float32, "float32"), (np.float16, "float16"), (np.float16, "float32")],
)
def test_gguf_maps_aligned_unpermuted_tensors(
    tmp_path: Path, matrix_dtype: type, param_dtype: str
) -> None:
    path = tmp_path / "tiny.gguf"
    starts = _write_gguf(path, matrix_dtype)
    stored = {n: np.float32 if n.endswith("norm.weight") else matrix_dtype for n in starts}
    expected = {
        start
        for name, start in starts.items()
        if start % 64 == 0
        and np.dtype(stored[name]) == np.dtype(param_dtype)
        and not name.endswith(("attn_q.weight", "attn_k.weight"))
    }
    unaligned = {s for n, s in starts.items() if s % 64 and np.dtype(stored[n]) == param_dtype}
    assert expected and unaligned  # both paths are exercised
    if np.dtype(matrix_dtype) == param_dtype:  # q/k are copied for their row order alone
        assert any(s % 64 == 0 for n, s in starts.items() if ".attn_q." in n or ".attn_k." in n)
    model = mn.load_model(path, param_dtype=param_dtype, progress=False)
    assert set(_file_offsets(model, path).values()) == expected
    copied = mn.load_model(path, param_dtype=param_dtype, progress=False, mmap=False)
    assert _file_offsets(copied, path) == {}
    _assert_same_params(model, copied)


# ---- donation: XLA writes new buffers, never the file ----------------------------------------
@cpu_only
def test_donating_a_mapped_weight_leaves_the_file_alone(aligned: Path) -> None:
    file = aligned / "model.safetensors"
    before = _sha(file)
    model = mn.load_model(aligned, progress=False)
    assert "embed" in _file_offsets(model, file)
    weight = _params(model)["embed"]
    expected = np.asarray(weight).copy()
    expected[0] = -1.0
    expected = expected * 2 + 1
    out = jax.jit(lambda x: x.at[0].set(-1.0) * 2 + 1, donate_argnums=0)(weight)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert _sha(file) == before


@cpu_only
def test_full_fine_tune_step_on_a_mapped_model(aligned: Path) -> None:
    from mistral_nnx.train.step import OptimConfig, Trainer

    file = aligned / "model.safetensors"
    before = _sha(file)
    tokens = np.random.default_rng(0).integers(3, 211, (2, 12)).astype(np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones(tokens.shape, bool)}
    results = []
    for mmap in (True, False):
        model = mn.load_model(aligned, progress=False, mmap=mmap)
        assert bool(_file_offsets(model, file)) == mmap
        optim = OptimConfig(steps=2, lr=1e-2, warmup=0, schedule="constant")
        trainer = Trainer(model, optim, wrt=nnx.Param)  # every weight trained, state donated
        losses = [trainer.step(batch)["loss"] for _ in range(2)]
        results.append((losses, _params(trainer.model)))
    assert results[0][0] == results[1][0]
    for name, value in results[0][1].items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(results[1][1][name]), name)
    assert _sha(file) == before
    # the trained weights moved away from the file's
    reloaded = _params(mn.load_model(aligned, progress=False, mmap=False))
    assert not np.array_equal(np.asarray(results[0][1]["embed"]), np.asarray(reloaded["embed"]))


def test_replacing_the_file_keeps_a_loaded_model(aligned: Path) -> None:
    """save_safetensors renames a new file over the old: a model that maps the old one keeps
    its values (the old pages live on, unlinked), and a new load reads the new file."""
    file = aligned / "model.safetensors"
    model = mn.load_model(aligned, progress=False)
    logits = _logits(model)
    tensors = load_file(str(file))
    save_safetensors({n: w * 0.5 for n, w in tensors.items()}, file)
    np.testing.assert_array_equal(_logits(model), logits)
    assert not np.array_equal(_logits(mn.load_model(aligned, progress=False)), logits)


# ---- sharded placement (8 fake CPU devices, in a subprocess) ---------------------------------
SHARDED_CHILD = """
import json, sys
import numpy as np
import jax
from flax import nnx
import mistral_nnx as mn
from file_maps import file_maps

path = sys.argv[1]
mesh = mn.make_mesh("data=2,model=4")
models = [mn.load_model(path, mesh=mesh, rules="tp+fsdp", progress=False, mmap=m)
          for m in (True, False)]
states = [dict(nnx.to_flat_state(nnx.state(m))) for m in models]
maps = file_maps(path + "/model.safetensors")
adopted = [0, 0]
for i, state in enumerate(states):
    for var in state.values():
        for shard in var.get_value().addressable_shards:
            ptr = shard.data.unsafe_buffer_pointer()
            adopted[i] += any(lo <= ptr < hi for lo, hi, _ in maps)
equal = all(
    np.array_equal(np.asarray(states[0][k].get_value()), np.asarray(states[1][k].get_value()))
    for k in states[0]
)
sharded = sum(len(v.get_value().sharding.device_set) == 8 for v in states[0].values())
print(json.dumps({"devices": jax.device_count(), "adopted": adopted, "equal": equal,
                  "sharded": sharded}))
"""


def test_sharded_placement_of_an_aligned_file(tmp_path: Path) -> None:
    source = tmp_path / "hf"
    build_hf(
        "mistral",
        source,
        vocab_size=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        num_hidden_layers=2,
        sliding_window=16,
    )
    directory = _rewrite(source, tmp_path / "aligned", save_safetensors)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    tests = str(Path(__file__).parent)  # for file_maps
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_CHILD, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["equal"] and result["sharded"] > 0
    # row-split slices of aligned tensors are adopted in place; with mmap=False none is
    assert result["adopted"][0] > 0 and result["adopted"][1] == 0


# ---- the writer ---------------------------------------------------------------------------------
def _writer_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        # an odd size first: the writer must still put the multiples of 64 bytes first
        "odd_f32": rng.standard_normal(7).astype(np.float32),
        "bf16": rng.standard_normal((4, 32)).astype(ml_dtypes.bfloat16),
        "f16_odd": rng.standard_normal((3, 5)).astype(np.float16),
        "f64": rng.standard_normal((2, 8)),
        "transposed_f32": rng.standard_normal((16, 8)).astype(np.float32).T,  # not contiguous
        "big_endian": rng.standard_normal(16).astype(">f4"),
        "i64": rng.integers(-9, 9, 9),
        "i32": rng.integers(-9, 9, (4, 16)).astype(np.int32),
        "i16": rng.integers(-9, 9, 3).astype(np.int16),
        "i8": rng.integers(-9, 9, 64).astype(np.int8),
        "u8": rng.integers(0, 255, 5).astype(np.uint8),
        "bool": rng.integers(0, 2, 64).astype(bool),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_writer_round_trip_and_alignment(tmp_path: Path) -> None:
    tensors = _writer_tensors()
    path = save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name, want in tensors.items():
            got = f.get_tensor(name)
            if want.dtype == ml_dtypes.bfloat16:
                assert got.dtype == torch.bfloat16
                got_np = got.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                got_np = got.numpy()
                assert got_np.dtype == want.dtype.newbyteorder("="), name
            assert got_np.shape == want.shape, name
            np.testing.assert_array_equal(got_np, want, err_msg=name)
    (header_len,) = np.frombuffer(path.read_bytes()[:8], "<u8")
    assert (8 + int(header_len)) % 64 == 0
    infos = read_header(path)
    multiples = [i for i in infos if (i.end - i.start) % 64 == 0]
    assert len(multiples) >= 5 and infos[: len(multiples)] == multiples
    assert all(i.start % 64 == 0 for i in multiples)
    assert infos[-1].end == path.stat().st_size  # no holes, nothing after the data


def test_writer_refuses_what_safetensors_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    with pytest.raises(MistralNNXError, match="'c' has dtype complex64"):
        save_safetensors({"c": np.zeros(2, np.complex64)}, path)
    with pytest.raises(MistralNNXError, match="has dtype object"):
        save_safetensors({"o": np.array([None, 1], object)}, path)
    with pytest.raises(MistralNNXError, match="metadata must map strings to strings"):
        save_safetensors({"a": np.zeros(2)}, path, metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(MistralNNXError, match="bad tensor name"):
        save_safetensors({"__metadata__": np.zeros(2)}, path)
    assert list(tmp_path.iterdir()) == []


class _FullDisk:
    """A file whose third write fails as a full disk would (after the header, mid-data)."""

    def __init__(self, real: Any) -> None:
        self.real, self.writes = real, 0

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes == 3:
            raise OSError(28, "No space left on device")
        return int(self.real.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_writer_failing_midway_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_safetensors({"a": np.arange(32, dtype=np.float32)}, tmp_path / "t.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(
        safetensors_io, "open", lambda *a, **k: _FullDisk(open(*a, **k)), raising=False
    )
    with pytest.raises(MistralNNXError, match="No space left on device"):
        save_safetensors(_writer_tensors(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary left
