"""megatron-to-megalign against megatron-core 0.16.1 itself: a GPTModel (local layer spec, RMSNorm, SwiGLU,
RoPE, GQA) built and run at TP 2 x PP 2 on 4 gloo ranks is saved in both Megatron formats (torch_dist with
``dist_checkpointing.save``, legacy ``torch`` per-rank files laid out as Megatron-LM's checkpointing.py lays
them out); each is converted, and megalign's logits equal megatron-core's own forward (fp32), and so do
transformers' after ``megalign-to-hf``. Variants: untied (4 heads / 2 groups) and tied with q/k/v bias
(8 heads / 2 groups, GQA ratio 4). Skipped without megatron-core.

megatron-core 0.16.1 cannot save torch_dist on a CPU-only torch as shipped; the saving ranks patch four
things (test-only): ``torch.cuda.synchronize`` (called after the CPU copy of the tensors),
``torch.cuda.current_device`` (the device of the failure flag it broadcasts after writing),
``torch.Tensor.cuda`` (the tied output layer's initial all-reduce with the embedding runs on CUDA) and
``filesystem_async._process_memory`` (needs psutil, which is not installed; it only logs memory use); and
the forward pass forks the CUDA RNG tracker around attention dropout (0 here), so its ``fork`` is a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalign.checkpoint.model_record import checkpoint_model_config
from megalign.checkpoint.storage import load_checkpoint
from megalign.convert import convert_megalign_to_hf
from megalign.convert.megatron_to_megalign import convert_megatron_to_megalign
from megalign.model import GPTModel

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.megatron, pytest.mark.filterwarnings("ignore::UserWarning")]

ROWS, BATCH, SEQ = 1024, 2, 12
VARIANTS: Dict[str, Dict[str, Any]] = {
    "untied-gqa2": dict(heads=4, groups=2, tied=False, bias=False, true_vocab=1000),
    "tied-bias-gqa4": dict(heads=8, groups=2, tied=True, bias=True, true_vocab=None),
}


def _tokens() -> torch.Tensor:
    return torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _args(v: Dict[str, Any]) -> argparse.Namespace:
    """The Megatron-LM args of the run (its argument names), as its checkpoints record them."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=v["heads"],
        group_query_attention=True,
        num_query_groups=v["groups"],
        kv_channels=64 // v["heads"],
        max_position_embeddings=128,
        seq_length=64,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=v["bias"],
        untie_embeddings_and_output_weights=not v["tied"],
        position_embedding_type="rope",
        rotary_base=50000,
        rotary_percent=1.0,
        use_rope_scaling=False,
        apply_layernorm_1p=False,
        vocab_size=v["true_vocab"],
        padded_vocab_size=ROWS,
        init_method_std=0.02,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        params_dtype=torch.float32,
        attention_backend=AttnBackend.auto,
        ckpt_format="torch_dist",
    )


def _save_and_run(rank: int, world: int, out: str, name: str) -> Optional[torch.Tensor]:
    """Build the model at TP 2 x PP 2, save it in both formats, return the last stage's logits (rank 0 of it)."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.models.gpt import GPTModel as MegatronGPT
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.cuda.synchronize = lambda *a, **k: None  # see the module doc
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self  # the tied embedding's initial all-reduce moves it to CUDA
    filesystem_async._process_memory = lambda: 0
    tensor_parallel.random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    v = VARIANTS[name]
    ps.initialize_model_parallel(2, 2)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(1234)
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=v["heads"],
        num_query_groups=v["groups"],
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=v["bias"],
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.05,
    )
    model = MegatronGPT(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=ROWS,
        max_sequence_length=128,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=v["tied"],
        position_embedding_type="rope",
        rotary_base=50000,
        parallel_output=False,
    ).eval()
    with torch.no_grad():  # norms are 1 and biases 0 at init: perturb every weight so that a wrong mapping shows
        for pname, param in model.named_parameters():
            shared = pname in ("embedding.word_embeddings.weight", "output_layer.weight") and v["tied"]
            key = "shared" if shared else f"{pname}/{pp}"
            if getattr(param, "tensor_model_parallel", False):  # replicated tensors get the same noise on all TP
                key += f"/tp{tp}"
            gen = torch.Generator().manual_seed(sum(map(ord, key)) * 7919 + len(key))
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    args = _args(v)
    root = Path(out)
    legacy = root / "legacy" / "iter_0000007" / f"mp_rank_{tp:02d}_{pp:03d}"
    legacy.mkdir(parents=True, exist_ok=True)
    rng = [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": numpy.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }
    ]
    torch.save(
        {"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": model.state_dict(), "rng_state": rng},
        legacy / "model_optim_rng.pt",
    )
    dist_dir = root / "dist" / "iter_0000007"
    dist_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": model.sharded_state_dict()}
    dist_checkpointing.save(state, str(dist_dir))
    if rank == 0:
        for fmt in ("legacy", "dist"):
            (root / fmt / "latest_checkpointed_iteration.txt").write_text("7")
    tokens = _tokens()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]  # True: masked out
    with torch.no_grad():
        if pp == 0:
            hidden = model(tokens, positions, mask)
            dist.send(hidden.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(SEQ, BATCH, 64)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        logits = model(tokens, positions, mask)
    return logits if tp == 0 else None


# each variant is one 4-rank megatron-core job (~60-120 s on 2 shared cores): the tied one runs in the slow tier
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow if VARIANTS[name]["tied"] else ()) for name in VARIANTS]
)
def test_megatron_checkpoints_convert_to_equal_logits(distributed, tmp_path: Path, name: str) -> None:
    results = distributed(_save_and_run, 4, str(tmp_path), name, timeout=400)
    expected = next(r for r in results if r is not None)
    assert expected.shape == (BATCH, SEQ, ROWS)
    v = VARIANTS[name]
    true = v["true_vocab"] or ROWS
    tokens = _tokens()
    for fmt, layout in (("dist", (2, 1)), ("legacy", (1, 2))):
        save = tmp_path / f"ours-{fmt}"
        lines = []
        convert_megatron_to_megalign(tmp_path / fmt, save, *layout, progress=False, log=lines.append)
        assert lines and str(true) in lines[0]
        ckpt = load_checkpoint(save)
        config = checkpoint_model_config(ckpt)
        assert ckpt.metadata.parallel == {"tensor": layout[0], "pipeline": layout[1], "data": 1}
        assert ckpt.extra["vocab"] == {"true_size": true, "padded_rows": ROWS}
        assert ckpt.extra["megatron"]["format"] == ("torch_dist" if fmt == "dist" else "torch")
        assert ckpt.extra["megatron"]["iteration"] == 7
        assert (config.num_attention_heads, config.num_key_value_heads) == (v["heads"], v["groups"])
        assert (config.tie_word_embeddings, config.qkv_bias, config.rope_theta) == (v["tied"], v["bias"], 50000.0)
        model = GPTModel(config).eval()
        model.load_state_dict(ckpt.model_state(), strict=True)
        with torch.no_grad():
            logits = model(tokens)
        torch.testing.assert_close(logits[..., :true], expected[..., :true], rtol=0, atol=2e-5)

        hf_dir = tmp_path / f"hf-{fmt}"
        convert_megalign_to_hf(save, hf_dir, dtype="fp32", progress=False)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
        with torch.no_grad():
            hf_logits = hf_model(input_ids=tokens).logits
        assert hf_logits.shape[-1] == true
        torch.testing.assert_close(hf_logits, expected[..., :true], rtol=0, atol=2e-5)
