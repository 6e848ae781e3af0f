"""Convert checkpoints between Hugging Face (LlamaForCausalLM, Qwen2ForCausalLM) and megalign, and import
Megatron-LM checkpoints.

hf-to-megalign writes a megalign checkpoint (step 0, weights only) at the given tensor/pipeline-parallel
layout; train from it with `megalign train --finetune --load SAVE ...` at any layout. The embedding and LM
head are padded with zero rows to the trainer's padded vocabulary (--make-vocab-size-divisible-by x TP);
tokenizer files are copied to SAVE/tokenizer/.
megalign-to-hf writes config.json, generation_config.json, (sharded) safetensors weights and the tokenizer
files, with the vocabulary padding stripped, loadable by transformers' AutoModelForCausalLM.
megatron-to-megalign writes a megalign checkpoint (step 0, weights only) from a Megatron-LM / megatron-core
GPT checkpoint in the torch_dist or legacy torch format (megalign/convert/megatron_to_megalign.py).
"""

from __future__ import annotations

import argparse

from megalign.checkpoint.model_record import DTYPES
from megalign.convert.hf_to_megalign import convert_hf_to_megalign
from megalign.convert.megalign_to_hf import convert_megalign_to_hf, describe
from megalign.convert.megatron_to_megalign import convert_megatron_to_megalign

EXAMPLES = """examples:
  megalign convert hf-to-megalign --hf-dir Meta-Llama-3-8B --save ckpt/llama3-8b \\
      --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
  megalign convert megalign-to-hf --load ckpt/llama3-8b-tamed --hf-dir out/llama3-8b-tamed --dtype bf16
  python tools/convert_checkpoint.py megalign-to-hf --load ckpt/run1 --hf-dir out/run1 --max-shard-size 2GB
  megalign convert megatron-to-megalign --load megatron-runs/llama3-8b --save ckpt/llama3-8b-from-megatron \
      --tensor-model-parallel-size 2 --vocab-size 128256
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the hf-to-megalign, megalign-to-hf and megatron-to-megalign sub-commands."""
    sub = parser.add_subparsers(
        dest="direction", required=True, metavar="{hf-to-megalign,megalign-to-hf,megatron-to-megalign}"
    )
    imp = sub.add_parser(
        "hf-to-megalign",
        help="Hugging Face folder -> megalign checkpoint",
        description="Import a Hugging Face LLaMA/Qwen2 model as a megalign checkpoint.",
    )
    imp.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + weights)")
    imp.add_argument("--save", required=True, help="checkpoint directory to create (must not hold a checkpoint)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the files (default 1)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size of the files (default 1)")
    imp.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this x TP, as the trainer does (default 128)",
    )
    imp.add_argument("--no-progress", action="store_true", help="do not print progress lines")
    exp = sub.add_parser(
        "megalign-to-hf",
        help="megalign checkpoint -> Hugging Face folder",
        description="Export a megalign checkpoint as a Hugging Face LLaMA/Qwen2 model folder.",
    )
    exp.add_argument("--load", required=True, help="checkpoint directory (its latest step is exported)")
    exp.add_argument("--hf-dir", required=True, help="output folder to create (must not exist or be empty)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest weights file, e.g. 5GB, 500MB (default 5GB)")
    exp.add_argument("--ckpt-step", type=int, default=None, help="export this step instead of the latest")
    exp.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="HF vocabulary size to cut the padded embedding to (default: the true vocabulary the checkpoint records)",
    )
    exp.add_argument("--no-progress", action="store_true", help="do not print progress lines")
    meg = sub.add_parser(
        "megatron-to-megalign",
        help="Megatron-LM checkpoint (torch_dist or torch) -> megalign checkpoint",
        description="Import a Megatron-LM / megatron-core GPT checkpoint (LLaMA-style: RMSNorm, SwiGLU, RoPE, "
        "GQA) saved at any TP/PP, in the torch_dist or legacy torch format, as a megalign checkpoint.",
        epilog="examples:\n  megalign convert megatron-to-megalign --load runs/llama3 --save ckpt/llama3 "
        "--ckpt-step 5000 --tensor-model-parallel-size 2\n  megalign convert megalign-to-hf --load ckpt/llama3 "
        "--hf-dir out/llama3 --dtype bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    meg.add_argument("--load", required=True, help="Megatron --save directory, or one iter_NNNNNNN/ inside it")
    meg.add_argument("--save", required=True, help="checkpoint directory to create (must not hold a checkpoint)")
    meg.add_argument("--ckpt-step", type=int, default=None, help="import iter_{N} instead of the latest")
    meg.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the files (default 1)")
    meg.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size of the files (default 1)")
    meg.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="true vocabulary size; rows past it are padding (default: the args' vocab_size, else every row)",
    )
    meg.add_argument("--no-progress", action="store_true", help="do not print progress lines")


def main(args: argparse.Namespace) -> int:
    """Run the chosen conversion; prints the output path."""
    if args.direction == "hf-to-megalign":
        path = convert_hf_to_megalign(
            args.hf_dir,
            args.save,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.make_vocab_size_divisible_by,
            progress=not args.no_progress,
        )
        print(f"wrote megalign checkpoint {path}")
    elif args.direction == "megatron-to-megalign":
        path = convert_megatron_to_megalign(
            args.load,
            args.save,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.ckpt_step,
            args.vocab_size,
            progress=not args.no_progress,
        )
        print(f"wrote megalign checkpoint {path}")
    else:
        path = convert_megalign_to_hf(
            args.load,
            args.hf_dir,
            args.dtype,
            args.max_shard_size,
            args.ckpt_step,
            args.vocab_size,
            progress=not args.no_progress,
        )
        print(f"wrote Hugging Face model {describe(path)}")
    return 0
