"""GPTModel split into pipeline stages (with tensor parallelism and interleaving): losses and gradients equal
the single-process model's on a real gloo job."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from megalign.model import GPTModel, preset
from megalign.model.decoder import PipelineStage
from megalign.parallel import gather_state_dict, initialize_parallel
from megalign.config.layout import stage_layer_ranges
from megalign.parallel.pipeline import PipelineSpec, run_schedule, schedule_for, sum_tied_embedding_grads

CONFIGS = {"llama": preset("tiny", num_layers=4, vocab_size=256),
           "qwen2": preset("tiny", num_layers=4, vocab_size=256, qkv_bias=True, tie_word_embeddings=True)}
MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 16


def _batch(m: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + m)
    tokens = torch.randint(0, 256, (MICRO_BATCH_SIZE, SEQ), generator=g)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
            "loss_mask": (torch.rand(MICRO_BATCH_SIZE, SEQ, generator=g) > 0.2).float()}


def _stage_rank(rank: int, world: int, name: str, tp: int, pp: int, chunks: int,
                sequence_parallel: bool) -> Dict[str, object]:
    config = CONFIGS[name]
    state = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                sequence_parallel=sequence_parallel)
    spec = PipelineSpec(pp, state.pipeline_model_parallel_rank, state.pipeline_ranks, chunks, state.pipeline_group)
    ranges = stage_layer_ranges(config.num_layers, spec.num_stages)
    models: List[GPTModel] = []
    for chunk in range(chunks):
        stage = spec.stage(chunk)
        torch.manual_seed(11)
        models.append(GPTModel(config, state.context, stage=PipelineStage(ranges[stage], first=stage == 0,
                                                                            last=stage == spec.num_stages - 1)))

    def forward_step(chunk: int, x, m: int) -> torch.Tensor:
        out = models[chunk](**_batch(m), hidden_states=x)
        return out / MICRO_BATCHES if models[chunk].stage.last else out

    seq = SEQ // tp if sequence_parallel else SEQ
    losses = run_schedule(spec, schedule_for(spec, MICRO_BATCHES), forward_step, MICRO_BATCHES,
                          (MICRO_BATCH_SIZE, seq, config.hidden_size), torch.float32, torch.device("cpu"))
    sum_tied_embedding_grads(models, state.embedding_group)
    grads: Dict[str, torch.Tensor] = {}
    for model in models:
        for name, param in model.named_parameters():
            param.data = param.grad  # gather the gradient shards with the weights' layout
        grads.update(gather_state_dict(model))  # a tied table appears on two stages: equal after the sum
    return {"losses": [float(v) * MICRO_BATCHES for v in losses], "grads": grads if state.tensor_model_parallel_rank == 0
            else {}}


@pytest.mark.parametrize("name, tp, pp, chunks, sequence_parallel", [
    ("llama", 1, 4, 1, False), ("llama", 2, 2, 1, True), ("llama", 1, 2, 2, False), ("qwen2", 2, 2, 1, False)])
def test_pipeline_stages_equal_the_whole_model(distributed, name: str, tp: int, pp: int, chunks: int,
                                               sequence_parallel: bool) -> None:
    torch.manual_seed(11)
    reference = GPTModel(CONFIGS[name])
    expected = []
    for m in range(MICRO_BATCHES):
        loss = reference(**_batch(m))
        (loss / MICRO_BATCHES).backward()
        expected.append(loss.item())
    results = distributed(_stage_rank, tp * pp, name, tp, pp, chunks, sequence_parallel)
    losses = [r["losses"] for r in results if r["losses"]]
    assert len(losses) == tp and all(l == pytest.approx(expected, rel=1e-5) for l in losses)
    grads: Dict[str, torch.Tensor] = {}
    for result in results:
        for key, grad in result["grads"].items():
            if key in grads:  # only the tied embedding table lives on two stages
                assert key == "embed_tokens.weight" and torch.equal(grads[key], grad), key
            grads[key] = grad
    assert sorted(grads) == sorted(n for n, _ in reference.named_parameters())
    for key, param in reference.named_parameters():
        torch.testing.assert_close(grads[key], param.grad, rtol=1e-5, atol=1e-6, msg=key)
