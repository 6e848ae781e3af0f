"""The streaming safetensors writer: files it writes read back with safetensors, tensor for tensor."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from megalign.utils.safetensors_stream import StreamingSafetensorsWriter


def _tensors() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=generator),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.randn(2, 2, generator=generator).to(torch.float16),
    }


def test_round_trip_matches_save_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "stream.safetensors"
    writer = StreamingSafetensorsWriter(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                                        {"format": "pt"})
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    info = writer.close()
    assert info["size"] == path.stat().st_size
    loaded = safetensors.torch.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    with safetensors.safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_non_contiguous_input_and_dtype_cast(tmp_path):
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "cast.safetensors"
    writer = StreamingSafetensorsWriter(path, [("w", (4, 3), torch.bfloat16)])
    writer.add("w", source.t())  # a transposed view: written in its logical order
    writer.close()
    loaded = safetensors.torch.load_file(str(path))["w"]
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded, source.t().to(torch.bfloat16))


def test_order_shape_and_completeness_are_checked(tmp_path):
    plan = [("x", (2,), torch.float32), ("y", (3,), torch.float32)]
    writer = StreamingSafetensorsWriter(tmp_path / "a.safetensors", plan)
    with pytest.raises(RuntimeError, match="tensor y written out of the planned order .expected x"):
        writer.add("y", torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"tensor x has shape \[3\], planned \[2\]"):
        writer.add("x", torch.zeros(3))
    writer.abort()

    writer = StreamingSafetensorsWriter(tmp_path / "b.safetensors", plan)
    writer.add("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match="tensor y was planned but never written"):
        writer.close()
    writer.abort()


def test_bad_plans_are_refused(tmp_path):
    with pytest.raises(ValueError, match="planned twice"):
        StreamingSafetensorsWriter(tmp_path / "c.safetensors", [("x", (1,), torch.float32)] * 2)
    with pytest.raises(ValueError, match="cannot store tensor z of dtype"):
        StreamingSafetensorsWriter(tmp_path / "d.safetensors", [("z", (1,), torch.complex64)])
