"""Data parallelism: contiguous fp32 gradient buffers, buckets, and their averaging over the DP group.

:class:`DataParallelGrads` gives every trainable parameter an fp32 ``param.main_grad`` that is a view into
one contiguous buffer per model dtype (:class:`GradBuffer`). Parameters are laid out in *reverse* order,
the order backward produces their gradients, and split into :class:`Bucket` s of about ``bucket_size``
elements. A post-accumulate-grad hook adds each backward's ``.grad`` into ``main_grad`` and frees it, so
micro-batch gradients are summed in fp32.

After the last micro-batch, every bucket is *averaged* over the data-parallel group (Megatron's default:
scale by ``1 / dp_size``, then sum): with an all-reduce (plain data parallelism: every rank ends up with
the whole averaged gradient), or with a reduce-scatter (``shard=True``, the distributed optimizer: rank
``r`` gets the averaged values of the ``r``-th of ``dp_size`` equal, contiguous slices of each bucket; the
rest of its buffer then holds stale local sums). Buckets are padded with zeros to a multiple of
``dp_size`` elements; a parameter's elements may span two shards.

Overlap (``overlap_grad_reduce=True``): a bucket's collective is launched asynchronously as soon as all its
parameters received their gradient in the last micro-batch's backward, while backward continues with
earlier layers; :meth:`DataParallelGrads.finish_grad_sync` launches what is left and waits. Buckets are
launched strictly in index order, so all ranks issue the same collectives in the same order. With gloo on
CPU this still overlaps: gloo runs the collective on its own thread while autograd computes. Around all
but the last micro-batch the trainer must enter :meth:`DataParallelGrads.no_sync` (as with torch DDP);
adding a gradient into a bucket whose collective is already in flight raises a RuntimeError.

With one data-parallel rank (``group=None``) nothing is communicated.

``grad_dtype=torch.bfloat16`` (--grad-reduce-in-bf16) keeps the buffers, hence the accumulation and the
data-parallel collective, in bfloat16 (half the memory and traffic); the optimizer reads fp32 copies.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Bucket", "DataParallelGrads", "GradBuffer", "ParamSlot", "PendingParamGather", "default_bucket_size"]

# torch >= 2.13 renamed the tensor collectives; older versions only have the *_tensor names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _WithMainGrad(Protocol):
    """A parameter carrying the ``main_grad`` attribute DataParallelGrads attaches (a view into a buffer)."""

    main_grad: torch.Tensor


def default_bucket_size(dp_size: int, overlap_grad_reduce: bool) -> Optional[int]:
    """Megatron's default (``--ddp-bucket-size`` unset): ``max(40M, 1M x dp)`` elements with overlap, else
    None (one bucket per buffer: a single large collective is the most efficient without overlap)."""
    return max(40_000_000, 1_000_000 * dp_size) if overlap_grad_reduce else None


@dataclass
class ParamSlot:
    """Where one parameter's gradient lives: its buffer, bucket and element range ``[start, end)`` in the buffer."""

    name: str
    param: nn.Parameter
    buffer: "GradBuffer"
    bucket: "Bucket"
    start: int
    end: int


@dataclass
class Bucket:
    """A contiguous slice ``[start, end)`` of a buffer whose gradients are averaged by one collective."""

    index: int
    buffer: "GradBuffer"
    start: int
    end: int
    slots: List[ParamSlot] = field(default_factory=list)
    pending: int = 0
    handle: Optional[Any] = None
    launched: bool = False

    @property
    def data(self) -> torch.Tensor:
        """The bucket's gradient elements (padding included)."""
        return self.buffer.data[self.start : self.end]

    @property
    def shard_size(self) -> int:
        """Elements each data-parallel rank owns in this bucket."""
        return (self.end - self.start) // self.buffer.dp_size

    def shard_range(self, dp_rank: int) -> Tuple[int, int]:
        """Buffer range ``[start, end)`` owned by ``dp_rank``."""
        begin = self.start + dp_rank * self.shard_size
        return begin, begin + self.shard_size


class GradBuffer:
    """The gradients (fp32, or ``grad_dtype``) of all parameters of one model dtype, contiguous, bucketed in
    backward order."""

    def __init__(
        self,
        named_params: Sequence[Tuple[str, nn.Parameter]],
        dp_size: int,
        bucket_size: Optional[int],
        pad_buckets: bool,
        grad_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.param_dtype = named_params[0][1].dtype
        self.dp_size = dp_size
        self.buckets: List[Bucket] = []
        self.slots: List[ParamSlot] = []
        offset = 0
        bucket = Bucket(0, self, 0, 0)
        for name, param in reversed(named_params):  # backward produces gradients roughly in reverse order
            slot = ParamSlot(name, param, self, bucket, offset, offset + param.numel())
            bucket.slots.append(slot)
            self.slots.append(slot)
            offset = slot.end
            if bucket_size is not None and offset - bucket.start >= bucket_size:
                offset = self._close(bucket, offset, pad_buckets)
                bucket = Bucket(len(self.buckets), self, offset, offset)
        if bucket.slots:
            offset = self._close(bucket, offset, pad_buckets)
        device = named_params[0][1].device
        self.data = torch.zeros(offset, dtype=grad_dtype, device=device)

    def _close(self, bucket: Bucket, offset: int, pad: bool) -> int:
        """End ``bucket`` at ``offset`` (padded to a multiple of dp_size when sharding); return the new offset."""
        if pad:
            offset += (-(offset - bucket.start)) % self.dp_size
        bucket.end = offset
        self.buckets.append(bucket)
        return offset


@dataclass
class PendingParamGather:
    """One bucket's parameter all-gather in flight: :meth:`finish` waits for it and writes the parameters."""

    bucket: Bucket
    flat: torch.Tensor
    handle: Optional[Any]

    def finish(self) -> None:
        """Wait for the gather (once) and copy the bucket's full values into its parameters."""
        if self.handle is not None:
            self.handle.wait()
        self.handle = None
        with torch.no_grad():
            for slot in self.bucket.slots:
                values = self.flat[slot.start - self.bucket.start : slot.end - self.bucket.start]
                slot.param.detach().view(-1).copy_(values)


class DataParallelGrads:
    """fp32 ``main_grad`` buffers for ``named_params`` and their averaging over the data-parallel ``group``.

    ``shard=True`` reduce-scatters (distributed optimizer) instead of all-reducing. ``bucket_size`` is in
    elements (None: :func:`default_bucket_size`). ``grad_dtype``: the buffers' dtype (fp32, or bf16 for
    --grad-reduce-in-bf16). Call :meth:`close` to detach the hooks and buffers.
    """

    def __init__(
        self,
        named_params: Sequence[Tuple[str, nn.Parameter]],
        *,
        group: Optional[Any] = None,
        bucket_size: Optional[int] = None,
        overlap_grad_reduce: bool = False,
        shard: bool = False,
        grad_dtype: torch.dtype = torch.float32,
    ) -> None:
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 element, got {bucket_size}")
        if grad_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"grad_dtype must be torch.float32 or torch.bfloat16, got {grad_dtype}")
        self.grad_dtype = grad_dtype
        self.group = group
        self.dp_size = dist.get_world_size(group) if group is not None else 1
        self.dp_rank = dist.get_rank(group) if group is not None else 0
        self.shard = bool(shard)
        self.overlap_grad_reduce = bool(overlap_grad_reduce) and self.dp_size > 1
        if bucket_size is None:
            bucket_size = default_bucket_size(self.dp_size, overlap_grad_reduce)
        for name, param in named_params:
            if hasattr(param, "main_grad"):
                raise ValueError(
                    f"parameter {name} is already managed by an optimizer; call that optimizer's "
                    "close() before building a new one over the same model"
                )
            if not param.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; its gradient cannot be a buffer view")
        by_dtype: Dict[torch.dtype, List[Tuple[str, nn.Parameter]]] = {}
        for name, param in named_params:
            by_dtype.setdefault(param.dtype, []).append((name, param))
        self.buffers = [
            GradBuffer(params, self.dp_size, bucket_size, pad_buckets=self.shard, grad_dtype=grad_dtype)
            for params in by_dtype.values()
        ]
        self.slots: Dict[int, ParamSlot] = {}
        for buffer in self.buffers:
            for slot in buffer.slots:
                self.slots[id(slot.param)] = slot
                cast(_WithMainGrad, slot.param).main_grad = buffer.data[slot.start : slot.end].view(slot.param.shape)
        self._order = [bucket for buffer in self.buffers for bucket in buffer.buckets]
        self._next = 0  # index in _order of the next bucket to launch
        self._sync = True
        self._hooks = [slot.param.register_post_accumulate_grad_hook(self._on_grad) for slot in self.slots.values()]
        self._reset()

    @property
    def buckets(self) -> List[Bucket]:
        """All buckets, in launch order."""
        return list(self._order)

    def slot(self, param: nn.Parameter) -> ParamSlot:
        """Where ``param``'s gradient lives."""
        return self.slots[id(param)]

    # ----- gradient accumulation and the collectives -----

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without launching collectives (every micro-batch but the last)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add ``.grad`` into ``main_grad``, free it, launch ready buckets."""
        if param.grad is None:
            return
        slot = self.slots[id(param)]
        if slot.bucket.launched:
            raise RuntimeError(
                f"gradient of {slot.name} arrived after its bucket's collective was launched: with "
                "overlap_grad_reduce, run every micro-batch but the last inside no_sync()"
            )
        cast(_WithMainGrad, param).main_grad.add_(param.grad)  # a managed parameter: main_grad attached
        param.grad = None
        if self.overlap_grad_reduce and self._sync:
            slot.bucket.pending -= 1
            while self._next < len(self._order) and self._order[self._next].pending <= 0:
                self._launch(self._order[self._next])

    def _launch(self, bucket: Bucket) -> None:
        """Start the averaging collective of ``bucket`` (asynchronously)."""
        self._next += 1
        bucket.launched = True
        if self.dp_size == 1:
            return
        data = bucket.data
        data.mul_(1.0 / self.dp_size)
        if self.shard:
            begin, end = bucket.shard_range(self.dp_rank)
            output = bucket.buffer.data[begin:end]
            bucket.handle = _reduce_scatter(output, data, group=self.group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(data, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Launch every bucket not yet launched (in order), wait for all, and re-arm for the next iteration."""
        while self._next < len(self._order):
            self._launch(self._order[self._next])
        for bucket in self._order:
            if bucket.handle is not None:
                bucket.handle.wait()
        self._reset()

    def _reset(self) -> None:
        self._next = 0
        for bucket in self._order:
            bucket.handle, bucket.launched, bucket.pending = None, False, len(bucket.slots)

    def zero(self) -> None:
        """Zero every buffer (start of an iteration)."""
        for buffer in self.buffers:
            buffer.data.zero_()

    # ----- distributed-optimizer helpers -----

    def local_range(self, param: nn.Parameter) -> Optional[Tuple[int, int]]:
        """The range ``[a, b)`` of ``param``'s flattened elements in this rank's shard (None if empty)."""
        slot = self.slot(param)
        begin, end = slot.bucket.shard_range(self.dp_rank) if self.shard else (slot.bucket.start, slot.bucket.end)
        a, b = max(slot.start, begin), min(slot.end, end)
        return (a - slot.start, b - slot.start) if a < b else None

    def _gathered_bucket(
        self, bucket: Bucket, local: Dict[int, torch.Tensor], dtype: Optional[torch.dtype], async_op: bool
    ) -> Tuple[torch.Tensor, Optional[Any]]:
        """``bucket``'s flat values with this rank's shard filled in from ``local``, and the all-gather of the
        other shards into it (waited for unless ``async_op``; then its handle, None without data parallelism)."""
        flat = torch.zeros(
            bucket.end - bucket.start, dtype=dtype or bucket.buffer.param_dtype, device=bucket.buffer.data.device
        )
        for slot in bucket.slots:
            part = self.local_range(slot.param)
            if part is not None and id(slot.param) in local:
                a, b = part
                flat[slot.start - bucket.start + a : slot.start - bucket.start + b].copy_(local[id(slot.param)])
        if self.dp_size == 1:
            return flat, None
        begin = bucket.shard_size * self.dp_rank
        handle = _all_gather(flat, flat[begin : begin + bucket.shard_size], group=self.group, async_op=async_op)
        return flat, handle if async_op else None

    def all_gather(
        self, local: Dict[int, torch.Tensor], dtype: Optional[torch.dtype] = None
    ) -> Iterator[Tuple[ParamSlot, torch.Tensor]]:
        """Assemble full parameters from every rank's shard values (a collective over the DP group).

        ``local`` maps ``id(param)`` to this rank's 1-D values for :meth:`local_range` of that param; the
        gather runs in ``dtype`` (None: each buffer's parameter dtype). Yields,
        bucket by bucket, ``(slot, flat full values)``; the flat tensor is a view into a temporary bucket
        buffer that the next bucket reuses, so copy it before advancing.
        """
        for bucket in self._order:
            flat, _ = self._gathered_bucket(bucket, local, dtype, async_op=False)
            for slot in bucket.slots:
                yield slot, flat[slot.start - bucket.start : slot.end - bucket.start]

    def start_param_gather(self, local: Dict[int, torch.Tensor]) -> List["PendingParamGather"]:
        """Launch the all-gather of every bucket's updated parameters without waiting (--overlap-param-gather),
        in forward order: the buckets holding the first layers (reduced last in the backward pass) first."""
        pending = []
        for bucket in reversed(self._order):
            flat, handle = self._gathered_bucket(bucket, local, None, async_op=True)
            pending.append(PendingParamGather(bucket, flat, handle))
        return pending

    def close(self) -> None:
        """Remove the hooks and the ``main_grad`` attributes."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for slot in self.slots.values():
            if hasattr(slot.param, "main_grad"):
                del slot.param.main_grad
