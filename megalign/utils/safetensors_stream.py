"""Write one safetensors file a tensor at a time, so memory holds one tensor, not the file.

The header is planned from the tensors' names, shapes and dtypes before any data exists; each tensor is
then appended as soon as it is produced, in the planned order. The bytes are exactly what
``safetensors.torch.save_file`` would accept on reading (8-byte aligned data, little-endian).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["SAFETENSORS_CODES", "StreamingSafetensorsWriter", "tensor_nbytes"]

SAFETENSORS_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """One safetensors file at ``path`` holding ``plan`` = [(name, shape, dtype), ...] in that order.

    ``add`` each tensor in order, then ``close`` (flushes and fsyncs). A tensor out of order, of another
    shape, or missing at close raises RuntimeError; the caller writes into a temp directory and removes it
    on error, so a half-written file is never installed.
    """

    def __init__(
        self,
        path: Path,
        plan: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
        metadata: Optional[Dict[str, str]] = None,
    ) -> None:
        self.path = Path(path)
        header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._pending: List[Tuple[str, Tuple[int, ...], torch.dtype]] = []
        for name, shape, dtype in plan:
            if dtype not in SAFETENSORS_CODES:
                raise ValueError(f"safetensors cannot store tensor {name} of dtype {dtype}")
            if name in header:
                raise ValueError(f"tensor {name} planned twice for {self.path}")
            nbytes = tensor_nbytes(shape, dtype)
            header[name] = {
                "dtype": SAFETENSORS_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._pending.append((name, tuple(shape), dtype))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._handle: Optional[Any] = open(self.path, "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``name``'s data (cast to the planned dtype); it must be the next planned tensor."""
        if self._handle is None:
            raise RuntimeError(f"{self.path}: already closed")
        if not self._pending or self._pending[0][0] != name:
            expected = self._pending[0][0] if self._pending else "nothing"
            raise RuntimeError(f"{self.path}: tensor {name} written out of the planned order (expected {expected})")
        _, shape, dtype = self._pending.pop(0)
        if tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: tensor {name} has shape {list(tensor.shape)}, planned {list(shape)}")
        data = tensor.detach().to("cpu", dtype).contiguous()
        if data.numel():
            self._handle.write(data.reshape(-1).view(torch.uint8).numpy().data)  # 0-d tensors too

    def close(self) -> Dict[str, Any]:
        """Finish the file (every planned tensor must have been added); returns ``{"size": bytes}``."""
        if self._handle is None:
            raise RuntimeError(f"{self.path}: already closed")
        if self._pending:
            raise RuntimeError(f"{self.path}: tensor {self._pending[0][0]} was planned but never written")
        handle, self._handle = self._handle, None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        return {"size": self.path.stat().st_size}

    def abort(self) -> None:
        """Close without checks (on error; the caller removes the file)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
