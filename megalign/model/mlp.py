"""The LLaMA/Qwen2 feed-forward block: ``down(silu(gate(x)) * up(x))``; with tensor parallelism each rank
holds ``intermediate_size / tp`` of the hidden units (gate/up split by rows, down by columns)."""

from __future__ import annotations

import torch
from torch import nn

from megalign.config.model import ModelConfig
from megalign.ops import swiglu
from megalign.parallel import (
    ColumnParallelLinear,
    InitMethod,
    ParallelContext,
    RowParallelLinear,
    column_parallel_input,
)

__all__ = ["MLP"]


class MLP(nn.Module):
    """SwiGLU MLP: gate and up projections column-parallel, down projection row-parallel; no biases."""

    def __init__(
        self, config: ModelConfig, context: ParallelContext, init_method: InitMethod, output_init_method: InitMethod
    ) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.context = context
        self.gate_proj = ColumnParallelLinear(hidden, ffn, context, bias=False, init_method=init_method)
        self.up_proj = ColumnParallelLinear(hidden, ffn, context, bias=False, init_method=init_method)
        self.down_proj = RowParallelLinear(
            ffn, hidden, context, bias=False, input_is_parallel=True, init_method=output_init_method
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden]`` → ``[batch, seq, hidden]`` (sequence shards under sequence parallelism)."""
        x = column_parallel_input(x, self.context)  # one collective for gate and up
        return self.down_proj(swiglu(self.gate_proj(x, input_prepared=True), self.up_proj(x, input_prepared=True)))
