"""The "run a model" flag group every command that runs a model in this process shares, and its loader.

    --load CKPT | --hf-dir DIR   a megalign checkpoint (its latest step, or --ckpt-step) or a Hugging Face
                                 LlamaForCausalLM / Qwen2ForCausalLM folder loaded directly (no conversion)
    --ckpt-step N                with --load: this step instead of the latest
    --tokenizer-type T           tokenizer (default: recorded in the checkpoint / the folder's tokenizer.json)
    --tokenizer-model M          its model file or folder
    --device D                   torch device: cpu (default), cuda, cuda:1
    --dtype fp32|bf16|fp16       weights dtype (each command keeps its own default)
    --batch-size N               what a batch is depends on the command (documents, pieces, prompts)

Used by ``megalign align seed``, ``align report``, ``align rewrite`` (its in-process worker) and ``serve``.
This is the command-line layer: :func:`load_model_from_args` reads the parsed flags and calls
:func:`~megalign.inference.model_loading.load_model` or :func:`~megalign.inference.model_loading.load_hf_model`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Optional, Sequence

from megalign.errors import ConfigError

if TYPE_CHECKING:  # the loaders import torch: only when a model is loaded, not when a parser is built
    from megalign.inference.model_loading import LoadedModel

__all__ = [
    "DTYPE_NAMES",
    "MODEL_FLAGS",
    "add_model_arguments",
    "load_model_from_args",
    "model_given",
    "model_label",
    "positive_int",
]

MODEL_FLAGS = "--load CHECKPOINT or --hf-dir DIR"
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # megalign.checkpoint.model_record.DTYPES, without importing torch


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    required: bool = False,
    title: str = "model (--load CHECKPOINT or --hf-dir DIR)",
    dtype: str = "fp32",
    batch_size: Optional[int] = 8,
    batch_size_help: str = "items per batch",
    batch_flags: Sequence[str] = ("--batch-size",),
) -> Any:
    """Add the shared flags (see the module doc) as an argument group titled ``title``; returns the group, so
    a command can add its own model options to it.

    ``required``: the command cannot run without a model (checked by :func:`load_model_from_args`, so the
    error names both flags). ``dtype``: the ``--dtype`` default. ``batch_size``, ``batch_size_help``: the
    batch flag's default and help (the default is appended to the help); ``batch_flags``: its names, the
    first giving the ``args`` attribute (e.g. ``("--max-batch-size", "--batch-size")`` for serve).
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"add_model_arguments: dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    group = parser.add_argument_group(title)
    group.add_argument(
        "--load",
        default=None,
        metavar="CHECKPOINT",
        help="megalign checkpoint directory (its latest step)"
        + (" (this or --hf-dir is required)" if required else ""),
    )
    group.add_argument(
        "--hf-dir",
        default=None,
        metavar="DIR",
        help="Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder (config.json, *.safetensors, "
        "tokenizer.json), loaded directly without converting it",
    )
    group.add_argument(
        "--ckpt-step", type=int, default=None, metavar="N", help="with --load: load this step instead of the latest"
    )
    group.add_argument(
        "--tokenizer-type",
        default=None,
        help="tokenizer (default: recorded in the checkpoint, or --hf-dir's tokenizer.json)",
    )
    group.add_argument("--tokenizer-model", default=None, help="tokenizer model file or folder")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    group.add_argument("--dtype", default=dtype, choices=DTYPE_NAMES, help=f"weights dtype (default {dtype})")
    default_text = "" if batch_size is None else f" (default {batch_size})"
    group.add_argument(
        *batch_flags, type=positive_int, default=batch_size, metavar="N", help=f"{batch_size_help}{default_text}"
    )
    parser.set_defaults(model_required=required)
    return group


def model_label(args: argparse.Namespace) -> Optional[str]:
    """The model as given (the --load or --hf-dir path), or None when neither is.

    ConfigError naming both flags when both are given, or neither while the command requires a model;
    ConfigError when --ckpt-step is given with --hf-dir."""
    if args.load and args.hf_dir:
        raise ConfigError(f"--load {args.load} and --hf-dir {args.hf_dir}: give one model, not both")
    if not (args.load or args.hf_dir):
        if getattr(args, "model_required", False):
            raise ConfigError(f"this command runs a model: pass {MODEL_FLAGS}")
        return None
    step = getattr(args, "ckpt_step", None)
    if args.hf_dir and step is not None:
        raise ConfigError(f"--ckpt-step {step} applies to --load checkpoints, not to --hf-dir {args.hf_dir}")
    return args.load or args.hf_dir


def model_given(args: argparse.Namespace) -> bool:
    """Whether --load or --hf-dir was given (the checks of :func:`model_label` apply)."""
    return model_label(args) is not None


def load_model_from_args(args: argparse.Namespace, attention_backend: str = "auto") -> "LoadedModel":
    """The model the parsed flags name, loaded (ConfigError as :func:`model_label` says, and when no model
    is given at all)."""
    from megalign.inference.model_loading import load_hf_model, load_model

    if not model_given(args):
        raise ConfigError(f"this command runs a model: pass {MODEL_FLAGS}")
    if args.hf_dir:
        return load_hf_model(
            args.hf_dir,
            dtype=args.dtype,
            device=args.device,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            attention_backend=attention_backend,
        )
    return load_model(
        args.load,
        getattr(args, "ckpt_step", None),
        dtype=args.dtype,
        device=args.device,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        attention_backend=attention_backend,
    )
