"""Demo step: Megatron-LM's own Llama-3 launch flags as they are, at tiny sizes.

The flags are those of Megatron-LM's ``examples/llama/train_llama3_8b_h100_fp8.sh`` (model, training, parallel,
data and logging groups), with the sizes shrunk so that a CPU runs it: 2 layers of hidden 64, sequence 64,
Llama-3's 128,256-token vocabulary on ``--mock-data``. The fp8 group is refused with an error naming the flag
(fp8 is not built). The run goes at TP 4 on 4 processes, so the vocabulary is padded to 128,512 rows. Megatron's
``--save X --load X`` idiom starts it from scratch. Then the checkpoint resumes in one process with
``--use-checkpoint-args`` and no shape flags, with 128,384 rows at TP 1 (in fp32: the bf16 weights load into an
fp32 model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Sequence

from megalign.config.loading import build_parser
from megalign.errors import ConfigError, MegalignError
from megalign.training.checkpoint_args import training_config_from_namespace

Runner = Callable[[str, Sequence[str]], None]
TorchRunner = Callable[[Sequence[str], int], None]

# Megatron's MODEL_ARGS, tiny sizes (the script: 32 layers, hidden 4096, ffn 14336, 32 heads, kv-channels 128).
MODEL_ARGS = (
    "--use-mcore-models --num-layers 2 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 8 "
    "--group-query-attention --num-query-groups 4 --kv-channels 8 --seq-length 64 --max-position-embeddings 64 "
    "--position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0 "
    "--hidden-dropout 0.0 --swiglu --normalization RMSNorm --init-method-std 0.0134 --attention-backend fused "
    "--apply-layernorm-1p --untie-embeddings-and-output-weights --disable-bias-linear"
)
# TRAINING_ARGS with DDP_ARGS (samples scaled down: 6 steps here; the script trains 1,953,125,000 samples).
TRAINING_ARGS = (
    "--micro-batch-size 2 --global-batch-size 8 --train-samples 48 --lr-decay-samples 60 --lr-warmup-samples 16 "
    "--lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine "
    "--clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 "
    "--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1 "
    "--exit-duration-in-mins 235 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather"
)
FP8_ARGS = "--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-param-gather"
PARALLEL_ARGS = "--tensor-model-parallel-size 4 --context-parallel-size 1 --sequence-parallel"
DATA_ARGS = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --tiktoken-pattern v2 --split 99,1,0 "
    "--no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1"
)
LOGGING_ARGS = (
    "--log-interval 2 --eval-iters 1 --eval-interval 6 --save-interval 6 --log-throughput --profile "
    "--profile-step-start 2 --profile-step-end 4 --ckpt-format torch_dist --distributed-timeout-minutes 60"
)


def megatron_argv(workdir: Path, *groups: str) -> List[str]:
    """The flag groups split into argv, with the script's paths (data cache, save/load, TensorBoard) in ``workdir``."""
    save = str(workdir / "megatron_checkpoints")
    paths = ["--data-cache-path", str(workdir / "megatron_cache"), "--save", save, "--load", save,
             "--tensorboard-dir", str(workdir / "megatron_tensorboard")]  # fmt: skip
    return [word for group in groups for word in group.split()] + paths


def megatron_dropin(workdir: Path, run: Runner, torchrun: TorchRunner) -> None:
    """Refuse the fp8 group, train at TP 4 from scratch on the script's flags, resume in one process."""
    argv = megatron_argv(workdir, MODEL_ARGS, TRAINING_ARGS, PARALLEL_ARGS, DATA_ARGS, LOGGING_ARGS)
    try:
        training_config_from_namespace(build_parser().parse_args([*argv, *FP8_ARGS.split()]))
    except ConfigError as exc:
        print(f"with the script's fp8 flags: refused at start: {exc}")
    else:
        raise MegalignError("demo: the fp8 flags were accepted, but fp8 is not built")
    torchrun(argv, 4)
    save = workdir / "megatron_checkpoints"
    metadata = json.loads((save / "iter_0000006" / "metadata.json").read_text(encoding="utf-8"))
    print(f"checkpoint at TP 4 records vocab {metadata['extra']['vocab']} and the model it holds")
    resume = [
        "--use-checkpoint-args", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-samples", "64", "--lr-decay-samples", "60", "--lr-warmup-samples", "16", "--lr", "0.00015",
        "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--lr-decay-style",
        "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta2", "0.95",
        "--calculate-per-token-loss", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "128256", "--split", "99,1,0", "--log-interval", "1", "--eval-iters", "1",
        "--eval-interval", "8", "--data-cache-path", str(workdir / "megatron_cache"), "--save", str(save),
        "--load", str(save),
    ]  # fmt: skip
    print("resuming in one process in fp32 (this CPU runs bf16 matmuls about 50x slower than fp32)")
    run("train", resume)
