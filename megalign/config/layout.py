"""The rules of a parallel layout, checked when the configuration is validated and used when it is built.

World size = TP x DP x PP (TP innermost, then DP, then PP: megalign.parallel.state lays the ranks out);
the decoder layers are split over the pipeline stages evenly or, with Megatron's
--decoder-first/last-pipeline-num-layers, unevenly. Errors name the flags whose values do not fit.
"""

from __future__ import annotations

from typing import List, Optional

from megalign.errors import ConfigError

__all__ = ["data_parallel_size", "stage_layer_ranges"]


def data_parallel_size(
    world_size: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> int:
    """World size / (TP x PP); ConfigError naming the constraint when the sizes do not fit."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for name, value in (
        ("world size", world_size),
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} must be divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * pp} (data parallel = world / (TP x PP))"
        )
    return world_size // (tp * pp)


def stage_layer_ranges(
    num_layers: int, num_stages: int, first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None
) -> List[range]:
    """The decoder layers of each global pipeline stage: an even split, or Megatron's uneven split where the
    first and/or last stage get the given number of layers and the middle stages share the rest evenly.

    Raises ConfigError naming the flags when the layers cannot be split that way.
    """
    if num_stages == 1:
        return [range(num_layers)]
    counts: List[Optional[int]] = [None] * num_stages
    if first_stage_layers is not None:
        counts[0] = first_stage_layers
    if last_stage_layers is not None:
        counts[-1] = last_stage_layers
    fixed = sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    rest = num_layers - fixed
    if rest < 0 or (free and rest % len(free)) or (not free and rest):
        given = (
            f" with --decoder-first-pipeline-num-layers {first_stage_layers}" if first_stage_layers is not None else ""
        ) + (f" and --decoder-last-pipeline-num-layers {last_stage_layers}" if last_stage_layers is not None else "")
        raise ConfigError(
            f"--num-layers {num_layers} cannot be split into {num_stages} pipeline stages{given}: "
            f"the remaining {rest} layers must divide evenly over the other {len(free)} stages"
        )
    for i in free:
        counts[i] = rest // len(free)
    if any(c < 1 for c in counts):  # type: ignore[operator]
        raise ConfigError(
            f"--num-layers {num_layers} over {num_stages} pipeline stages leaves a stage without "
            "layers; use fewer stages or more layers"
        )
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))  # type: ignore[operator]
        start += count  # type: ignore[operator]
    return ranges
