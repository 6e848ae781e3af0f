"""The table of training flags: one :class:`Flag` per setting drives the argparse parser, the YAML loader,
value checking and the generated documentation (``docs/configuration.md``).

Flag names and defaults are Megatron-LM's wherever the concept is the same; each flag's destination
(``--micro-batch-size`` -> ``micro_batch_size``) is also its YAML key and its field in the section
dataclass named by ``Flag.section`` (see :mod:`megalign.config`).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from megalign.data.tokenizers import TOKENIZER_TYPES
from megalign.errors import ConfigError
from megalign.model.attention_backends import ATTENTION_BACKENDS
from megalign.model.config import PRESETS
from megalign.training.lr_schedule import DECAY_STYLES, WSD_DECAY_STYLES

__all__ = ["CONFLICTS", "FLAGS", "FLAGS_BY_DEST", "SECTIONS", "Flag", "add_flag_arguments", "flags_markdown",
           "parse_value"]

KINDS = ("int", "float", "str", "bool", "list")


@dataclass(frozen=True)
class Flag:
    """One command-line flag / YAML key: its section, value kind, default, help and allowed values."""

    name: str
    section: str
    kind: str
    default: Any
    help: str
    choices: Optional[Tuple[str, ...]] = None
    minimum: Optional[float] = None

    @property
    def dest(self) -> str:
        """Attribute, dataclass field and YAML key (``--micro-batch-size`` -> ``micro_batch_size``)."""
        return self.name[2:].replace("-", "_")


# (section key, heading) in the order of --help and the docs.
SECTIONS: Tuple[Tuple[str, str], ...] = (
    ("model", "Model"),
    ("data", "Data"),
    ("optimization", "Optimization"),
    ("precision", "Mixed precision"),
    ("recompute", "Activation recomputation"),
    ("parallel", "Parallelism"),
    ("checkpointing", "Checkpointing"),
    ("logging", "Evaluation and logging"),
    ("misc", "Miscellaneous"),
)

_PRESET = "preset's value"

FLAGS: Tuple[Flag, ...] = (
    # model
    Flag("--model-preset", "model", "str", None, "Start from a named model shape (ours); the flags below override "
         "its fields. Without a preset give --num-layers, --hidden-size and --num-attention-heads.",
         choices=tuple(PRESETS)),
    Flag("--num-layers", "model", "int", None, f"Number of decoder layers (default: {_PRESET}).", minimum=1),
    Flag("--hidden-size", "model", "int", None, f"Hidden size (default: {_PRESET}).", minimum=1),
    Flag("--ffn-hidden-size", "model", "int", None, "SwiGLU MLP size (default: the preset's, else Megatron's "
         "int(8 * hidden / 3 / 64) * 64).", minimum=1),
    Flag("--num-attention-heads", "model", "int", None, f"Attention heads (default: {_PRESET}).", minimum=1),
    Flag("--num-query-groups", "model", "int", None, "Key/value heads for grouped-query attention (default: the "
         "preset's, else --num-attention-heads).", minimum=1),
    Flag("--seq-length", "model", "int", None, "Tokens per training sample (required).", minimum=1),
    Flag("--max-position-embeddings", "model", "int", None, "Longest supported sequence (default: the preset's, "
         "else --seq-length).", minimum=1),
    Flag("--rotary-base", "model", "float", None, "Rotary embedding base theta (default: the preset's, else 10000).",
         minimum=0.0),
    Flag("--vocab-size", "model", "int", None, "Vocabulary size (default: the preset's, else the tokenizer's padded "
         "size).", minimum=1),
    Flag("--norm-epsilon", "model", "float", None, "RMSNorm epsilon (default: the preset's, else 1e-5).", minimum=0.0),
    Flag("--init-method-std", "model", "float", None, "Std of the normal weight init (default: the preset's, "
         "else 0.02).", minimum=0.0),
    # data
    Flag("--attention-backend", "model", "str", "auto", "Attention kernel: auto (flash-attn, else Transformer Engine, "
         "else torch SDPA, by what is installed and the device), or one of them explicitly.",
         choices=ATTENTION_BACKENDS),
    Flag("--data-path", "data", "list", None, "Dataset prefixes, optionally weighted: P1 P2 ... or W1 P1 W2 P2 ..."),
    Flag("--split", "data", "str", "969,30,1", "Train,valid,test proportions of --data-path."),
    Flag("--tokenizer-type", "data", "str", None, "Tokenizer class.", choices=TOKENIZER_TYPES),
    Flag("--tokenizer-model", "data", "str", None, "Tokenizer model file or directory."),
    Flag("--data-cache-path", "data", "str", None, "Directory for the dataset index caches."),
    Flag("--reset-position-ids", "data", "bool", False, "Restart position ids after each end-of-document token."),
    Flag("--reset-attention-mask", "data", "bool", False, "Keep attention within each document of a sample."),
    Flag("--eod-mask-loss", "data", "bool", False, "Do not train on predicting end-of-document tokens."),
    Flag("--make-vocab-size-divisible-by", "data", "int", 128, "Pad the tokenizer's vocabulary to a multiple "
         "of this.", minimum=1),
    # optimization
    Flag("--micro-batch-size", "optimization", "int", None, "Samples per forward/backward pass (required).",
         minimum=1),
    Flag("--global-batch-size", "optimization", "int", None, "Samples per optimizer step (default: micro batch "
         "size x data-parallel size); the rest is gradient accumulation.", minimum=1),
    Flag("--train-iters", "optimization", "int", None, "Optimizer steps to train for.", minimum=1),
    Flag("--train-samples", "optimization", "int", None, "Samples to train for (steps = samples // global "
         "batch size).", minimum=1),
    Flag("--lr", "optimization", "float", None, "Peak learning rate (required).", minimum=0.0),
    Flag("--min-lr", "optimization", "float", 0.0, "Learning rate at the end of the decay.", minimum=0.0),
    Flag("--lr-decay-style", "optimization", "str", "linear", "Decay after warmup.", choices=DECAY_STYLES),
    Flag("--lr-warmup-iters", "optimization", "int", 0, "Linear warmup steps.", minimum=0),
    Flag("--lr-warmup-fraction", "optimization", "float", None, "Warmup as a fraction of --lr-decay-iters.",
         minimum=0.0),
    Flag("--lr-warmup-init", "optimization", "float", 0.0, "Learning rate at the start of warmup.", minimum=0.0),
    Flag("--lr-decay-iters", "optimization", "int", None, "Steps to decay over (default: the training steps).",
         minimum=1),
    Flag("--lr-wsd-decay-iters", "optimization", "int", None, "Annealing steps at the end of a WSD schedule.",
         minimum=1),
    Flag("--lr-wsd-decay-style", "optimization", "str", "exponential", "Annealing of a WSD schedule.",
         choices=WSD_DECAY_STYLES),
    Flag("--weight-decay", "optimization", "float", 0.01, "AdamW weight decay (not on biases and norms).",
         minimum=0.0),
    Flag("--adam-beta1", "optimization", "float", 0.9, "AdamW beta1.", minimum=0.0),
    Flag("--adam-beta2", "optimization", "float", 0.999, "AdamW beta2.", minimum=0.0),
    Flag("--adam-eps", "optimization", "float", 1e-8, "AdamW epsilon.", minimum=0.0),
    Flag("--clip-grad", "optimization", "float", 1.0, "Clip gradients to this global L2 norm (0: no clipping).",
         minimum=0.0),
    # precision
    Flag("--bf16", "precision", "bool", False, "Train in bfloat16 with fp32 master weights."),
    Flag("--fp16", "precision", "bool", False, "Train in float16 with fp32 master weights and loss scaling."),
    Flag("--initial-loss-scale", "precision", "float", 2.0 ** 32, "fp16: first dynamic loss scale.", minimum=0.0),
    Flag("--loss-scale", "precision", "float", None, "fp16: a static loss scale instead of a dynamic one.",
         minimum=0.0),
    Flag("--loss-scale-window", "precision", "int", 1000, "fp16: finite steps before the scale grows.", minimum=1),
    Flag("--hysteresis", "precision", "int", 2, "fp16: overflows tolerated before the scale shrinks.", minimum=1),
    Flag("--min-loss-scale", "precision", "float", 1.0, "fp16: lower bound of the dynamic loss scale.",
         minimum=0.0),
    # recompute
    Flag("--recompute-granularity", "recompute", "str", None, "Recompute activations in the backward pass: whole "
         "layers (full) or the attention core (selective).", choices=("full", "selective")),
    Flag("--recompute-method", "recompute", "str", None, "full: recompute every --recompute-num-layers layers "
         "(uniform) or the first --recompute-num-layers layers (block).", choices=("uniform", "block")),
    Flag("--recompute-num-layers", "recompute", "int", None, "Layers per recompute unit (full granularity).",
         minimum=1),
    # parallelism
    Flag("--tensor-model-parallel-size", "parallel", "int", 1, "Tensor-parallel degree (ranks splitting each "
         "layer's matrices; adjacent ranks, one node).", minimum=1),
    Flag("--pipeline-model-parallel-size", "parallel", "int", 1, "Pipeline-parallel degree (ranks holding "
         "consecutive slices of the layers).", minimum=1),
    Flag("--sequence-parallel", "parallel", "bool", False, "Split the activations outside attention/MLP along "
         "the sequence over the tensor-parallel ranks."),
    Flag("--num-layers-per-virtual-pipeline-stage", "parallel", "int", None, "Layers per model chunk of the "
         "interleaved 1F1B schedule (each rank holds several chunks).", minimum=1),
    Flag("--decoder-first-pipeline-num-layers", "parallel", "int", None, "Layers of the first pipeline stage "
         "(uneven split; the middle stages share the rest).", minimum=0),
    Flag("--decoder-last-pipeline-num-layers", "parallel", "int", None, "Layers of the last pipeline stage "
         "(uneven split).", minimum=0),
    Flag("--use-distributed-optimizer", "parallel", "bool", False, "Shard fp32 master weights and optimizer "
         "state over the data-parallel ranks (ZeRO-1)."),
    Flag("--overlap-grad-reduce", "parallel", "bool", False, "Reduce gradient buckets during the backward pass."),
    Flag("--ddp-bucket-size", "parallel", "int", None, "Elements per gradient bucket (default: one bucket, or "
         "Megatron's size with --overlap-grad-reduce).", minimum=1),
    Flag("--distributed-backend", "parallel", "str", None, "torch.distributed backend (default: nccl on GPUs, "
         "gloo on CPUs).", choices=("nccl", "gloo")),
    Flag("--distributed-timeout-minutes", "parallel", "int", 10, "Timeout of collective operations.", minimum=1),
    # checkpointing
    Flag("--save", "checkpointing", "str", None, "Directory to save checkpoints in."),
    Flag("--load", "checkpointing", "str", None, "Directory to resume (or, with --finetune, start) from."),
    Flag("--save-interval", "checkpointing", "int", None, "Save every this many steps.", minimum=1),
    Flag("--finetune", "checkpointing", "bool", False, "Load only the weights from --load; reset the optimizer, "
         "schedule and iteration."),
    Flag("--keep-last", "checkpointing", "int", None, "Keep only the newest N checkpoints in --save (ours).",
         minimum=1),
    Flag("--async-save", "checkpointing", "bool", False, "Write checkpoints in a background thread while training "
         "continues (tensors are copied first; at most one save in flight)."),
    Flag("--max-consecutive-skipped-steps", "checkpointing", "int", None, "Save and abort after this many "
         "non-finite steps in a row (ours).", minimum=1),
    # logging
    Flag("--eval-interval", "logging", "int", 1000, "Evaluate on the validation split every this many steps.",
         minimum=1),
    Flag("--eval-iters", "logging", "int", 100, "Validation batches per evaluation.", minimum=0),
    Flag("--log-interval", "logging", "int", 100, "Log every this many steps.", minimum=1),
    Flag("--tensorboard-dir", "logging", "str", None, "Write TensorBoard events here."),
    Flag("--tensorboard-log-interval", "logging", "int", 1, "Write training scalars to TensorBoard every this "
         "many steps.", minimum=1),
    Flag("--peak-tflops", "logging", "float", None, "Peak TFLOP/s of one device, for MFU (ours; default: a table of "
         "GPUs; CPUs need it).", minimum=0.0),
    # misc
    Flag("--seed", "misc", "int", 1234, "Random seed (model init, data order).", minimum=0),
    Flag("--torch-compile", "misc", "bool", False, "Compile each decoder layer with torch.compile (ours)."),
    Flag("--sft", "misc", "bool", False, "Supervised fine-tuning: --data-path holds `preprocess --sft` output; "
         "one conversation per sample, loss on the assistant replies only."),
)

FLAGS_BY_DEST: Dict[str, Flag] = {flag.dest: flag for flag in FLAGS}

# Pairs of flags that cannot both be set (a flag is set when its value differs from its default).
CONFLICTS: Tuple[Tuple[str, str], ...] = (
    ("bf16", "fp16"),
    ("train_iters", "train_samples"),
    ("lr_warmup_iters", "lr_warmup_fraction"),
)


def _check_table() -> None:
    """Fail at import on a malformed table (a bug, not user input)."""
    sections = {key for key, _ in SECTIONS}
    assert len(FLAGS_BY_DEST) == len(FLAGS), "duplicate flag"
    for flag in FLAGS:
        assert flag.name.startswith("--") and flag.section in sections and flag.kind in KINDS, flag
        assert flag.default is None or flag.kind == "list" or parse_value(flag, flag.default) == flag.default, flag
    for pair in CONFLICTS:
        assert all(dest in FLAGS_BY_DEST for dest in pair), pair


def _describe(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "list": "a list of strings"}[kind]


def parse_value(flag: Flag, value: Any, where: str = "") -> Any:
    """Check and convert one value (a CLI string, or a YAML/JSON value) for ``flag``.

    ``where`` prefixes the message (e.g. ``"cfg.yaml: "``). None is accepted only where the default is None.
    """
    prefix = f"{where}{flag.name}"
    if value is None:
        if flag.default is None:
            return None
        raise ConfigError(f"{prefix}: needs {_describe(flag.kind)}, got null")
    bad = ConfigError(f"{prefix}: expected {_describe(flag.kind)}, got {value!r}")
    if flag.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if flag.kind == "list":
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or any(
                isinstance(item, (bool, list, dict)) or item is None for item in items):
            raise bad
        return [str(item) for item in items]
    if isinstance(value, (bool, list, dict)):
        raise bad
    if flag.kind == "str":
        result: Any = str(value)
        if flag.choices is not None:
            matched = {choice.lower(): choice for choice in flag.choices}.get(result.lower())
            if matched is None:
                raise ConfigError(f"{prefix}: {result!r} is not one of {', '.join(flag.choices)}")
            result = matched
        return result
    try:
        if flag.kind == "int":
            if isinstance(value, float):
                raise ValueError
            result = int(value)
        else:
            result = float(value)
    except ValueError:
        raise bad from None
    if flag.kind == "float" and not math.isfinite(result):
        raise ConfigError(f"{prefix}: {value!r} must be finite")
    if flag.minimum is not None and result < flag.minimum:
        raise ConfigError(f"{prefix}: {result!r} must be >= {flag.minimum:g}")
    return result


def _cli_type(flag: Flag) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse_value(flag, text)
        except ConfigError as exc:  # argparse reports ArgumentTypeError's own message
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    convert.__name__ = flag.kind
    return convert


def _default_text(flag: Flag) -> str:
    if flag.default is None:
        return "-"
    if flag.kind == "bool":
        return "false"
    return f"{flag.default:g}" if isinstance(flag.default, float) else str(flag.default)


_METAVARS = {"int": "N", "float": "X", "str": "STR", "list": "PATH"}


def add_flag_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every flag, grouped by section. Defaults are SUPPRESSed (absent from the namespace unless given),
    so that explicit flags can be told apart from defaults and override YAML values."""
    groups = {key: parser.add_argument_group(title) for key, title in SECTIONS}
    for flag in FLAGS:
        group = groups[flag.section]
        text = flag.help
        if flag.kind != "bool" and flag.default is not None:
            text += f" (default: {_default_text(flag)})"
        if flag.kind == "bool":
            group.add_argument(flag.name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            metavar = "{" + ",".join(flag.choices) + "}" if flag.choices else _METAVARS[flag.kind]
            convert = str if flag.kind == "list" else _cli_type(flag)  # lists are checked whole, later
            group.add_argument(flag.name, type=convert, default=argparse.SUPPRESS, metavar=metavar,
                               nargs="+" if flag.kind == "list" else None, help=text)


def flags_markdown(flags: Sequence[Flag] = FLAGS) -> str:
    """The flag reference as Markdown tables, one per section (docs/configuration.md embeds this verbatim)."""
    lines = []
    for key, title in SECTIONS:
        lines += [f"### {title}", "", "| flag | default | description |", "| --- | --- | --- |"]
        for flag in (f for f in flags if f.section == key):
            text = flag.help.replace("|", "\\|")
            if flag.choices:
                text += " One of: " + ", ".join(f"`{choice}`" for choice in flag.choices) + "."
            lines.append(f"| `{flag.name}` | {_default_text(flag)} | {text} |")
        lines.append("")
    return "\n".join(lines)


_check_table()
