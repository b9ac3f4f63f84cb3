"""The safetensors reader/writer: what the safetensors package reads back, bf16 exactness, and refusal of
truncated or tampered files with the tensor named; atomic replacement."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from msbnb_pass.io import CheckpointError, SafetensorsFile, bf16_to_float32, float32_to_bf16, write_safetensors


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.packed": rng.integers(0, 255, (7, 1)).astype(np.uint8),
        "c.scb": rng.random(4).astype(np.float32),
        "d.int8": rng.integers(-127, 127, (2, 3)).astype(np.int8),
        "e.scalar": np.array(0, np.uint8),
        "f.ids": np.arange(6, dtype=np.int64)[None],
    }


def test_written_files_read_back_exactly_and_by_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file

    t = _tensors()
    write_safetensors(tmp_path / "m.safetensors", t, metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert f.metadata == {"format": "pt"} and sorted(f.keys()) == sorted(t)
    theirs = load_file(str(tmp_path / "m.safetensors"))
    for k, v in t.items():
        assert f.get(k).dtype == v.dtype and np.array_equal(f.get(k), v), k
        assert np.array_equal(theirs[k], v), k
    assert f.shape("e.scalar") == ()


def test_bf16_and_f16_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1000).astype(np.float32)
    bf = bf16_to_float32(float32_to_bf16(x))  # values representable in bf16
    assert np.all(np.abs(bf - x) <= np.abs(x) * 2.0**-8)
    assert np.array_equal(float32_to_bf16(bf), float32_to_bf16(x))
    h = x.astype(np.float16).astype(np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"bf": bf, "h": h}, {"bf": "BF16", "h": "F16"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert f.dtype("bf") == "BF16" and f.dtype("h") == "F16"
    assert np.array_equal(f.get("bf"), bf) and np.array_equal(f.get("h"), h)
    assert f.get("bf").dtype == np.float32
    # nearest-even rounding: 1 + 2^-8 (a tie) goes to 1.0, 1 + 3*2^-9 up to 1 + 2^-7
    ties = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-9], np.float32)
    assert np.array_equal(bf16_to_float32(float32_to_bf16(ties)), np.array([1.0, 1 + 2.0**-7], np.float32))


def test_truncated_file_is_refused_naming_the_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, _tensors())
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="tensor 'f.ids'.*truncated"):
        SafetensorsFile(p)
    p.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(p)


def _rewrite_header(p, edit):
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def test_tampered_headers_are_refused_naming_the_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, _tensors())

    def shape(h):
        h["a.weight"]["shape"] = [5, 5]

    _rewrite_header(p, shape)
    with pytest.raises(CheckpointError, match=r"tensor 'a.weight': F32 \[5, 5\] needs 100 bytes"):
        SafetensorsFile(p)

    write_safetensors(p, _tensors())

    def overlap(h):
        h["b.packed"]["data_offsets"] = [0, 7]

    _rewrite_header(p, overlap)
    with pytest.raises(CheckpointError, match="tensor '(a.weight|b.packed)' overlaps the previous tensor"):
        SafetensorsFile(p)

    write_safetensors(p, _tensors())

    def dtype(h):
        h["a.weight"]["dtype"] = "Q4"

    _rewrite_header(p, dtype)
    with pytest.raises(CheckpointError, match="tensor 'a.weight': dtype 'Q4' is not supported"):
        SafetensorsFile(p)


def test_writes_are_atomic_and_refuse_non_regular_targets(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"x": np.ones(3, np.float32)})
    good = p.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_safetensors(p, {"x": np.zeros(1000, np.float32)})
    monkeypatch.undo()
    assert p.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary file left behind

    # an encoding error half-way (float values asked to be stored as int8) leaves the target untouched too
    with pytest.raises(CheckpointError, match="tensor 'y': cannot store float values as I8"):
        write_safetensors(p, {"x": np.zeros(2, np.float32), "y": np.ones(2, np.float32)}, {"y": "I8"})
    assert p.read_bytes() == good

    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with pytest.raises(CheckpointError, match="not a regular file"):
        write_safetensors(link, {"x": np.ones(1, np.float32)})
    assert target.read_bytes() == b"keep"
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        write_safetensors(tmp_path / "dir.safetensors", {"x": np.ones(1, np.float32)})


def test_streaming_writer_produces_tensors_in_turn_and_aborts_cleanly(tmp_path):
    from msbnb_pass.io.safetensors_io import write_safetensors_streaming

    p = tmp_path / "big.safetensors"
    asked = []

    def produce(name):
        asked.append(name)
        return np.full((2, 3), len(asked), np.float32)

    write_safetensors_streaming(p, [("b", "F16", (2, 3)), ("a", "BF16", (2, 3))], produce)
    f = SafetensorsFile(p)
    assert asked == ["b", "a"] and f.dtype("b") == "F16" and np.array_equal(f.get("a"), np.full((2, 3), 2.0))
    good = p.read_bytes()
    with pytest.raises(CheckpointError, match=r"tensor 'a': produced shape \(3, 2\), the header says \(2, 3\)"):
        write_safetensors_streaming(p, [("a", "F32", (2, 3))], lambda name: np.zeros((3, 2), np.float32))
    assert p.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["big.safetensors"]
