"""The training flags, one typed dataclass per flag group (Megatron-LM's flag names and defaults).

Each field is one setting: its name is the flag's destination (``micro_batch_size`` is
``--micro-batch-size``) and its YAML key, its type says what values it takes, and :func:`setting`
attaches the help text, the allowed values and the lower bound. The parser, the YAML loader, value
checking and docs/configuration.md are all built from these fields (megalign.config.flags), so adding a
flag is adding one field here. Components take their section: the optimizer an :class:`OptimizationSection`,
the loss scaler a :class:`PrecisionSection`, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

from megalign.config.flags import setting
from megalign.config.model import ATTENTION_BACKENDS, PRESETS

__all__ = [
    "CheckpointingSection",
    "DECAY_STYLES",
    "DataSection",
    "LoggingSection",
    "MiscSection",
    "ModelSection",
    "OptimizationSection",
    "ParallelSection",
    "PrecisionSection",
    "RecomputeSection",
    "TOKENIZER_TYPES",
    "WSD_DECAY_STYLES",
]

# Megatron's --tokenizer-type names (megalign.data.tokenizers builds each).
TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "NullTokenizer",
    "GPT2BPETokenizer",
)
# --lr-decay-style and --lr-wsd-decay-style (megalign.training.lr_schedule computes them).
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "wsd")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")

_PRESET = "preset's value"


@dataclass
class ModelSection:
    """The model shape (a preset and overrides) and how attention runs."""

    title: ClassVar[str] = "Model"

    model_preset: Optional[str] = setting(
        None,
        "Start from a named model shape (ours); the flags below override its fields. Without a preset give "
        "--num-layers, --hidden-size and --num-attention-heads.",
        choices=tuple(PRESETS),
    )
    num_layers: Optional[int] = setting(None, f"Number of decoder layers (default: {_PRESET}).", minimum=1)
    hidden_size: Optional[int] = setting(None, f"Hidden size (default: {_PRESET}).", minimum=1)
    ffn_hidden_size: Optional[int] = setting(
        None, "SwiGLU MLP size (default: the preset's, else Megatron's int(8 * hidden / 3 / 64) * 64).", minimum=1
    )
    num_attention_heads: Optional[int] = setting(None, f"Attention heads (default: {_PRESET}).", minimum=1)
    num_query_groups: Optional[int] = setting(
        None,
        "Key/value heads for grouped-query attention (default: the preset's; without a preset it needs "
        "--group-query-attention, as in Megatron, and defaults to Megatron's 1).",
        minimum=1,
    )
    group_query_attention: bool = setting(
        False,
        "Grouped-query attention with --num-query-groups key/value heads (without a preset: otherwise every "
        "head has its own key/value head, Megatron's rule; with a preset the preset's groups apply).",
    )
    kv_channels: Optional[int] = setting(
        None,
        "Size of one attention head (default: the preset's, else --hidden-size / --num-attention-heads).",
        minimum=1,
    )
    seq_length: Optional[int] = setting(None, "Tokens per training sample (required).", minimum=1)
    max_position_embeddings: Optional[int] = setting(
        None, "Longest supported sequence (default: the preset's, else --seq-length).", minimum=1
    )
    rotary_base: Optional[float] = setting(
        None, "Rotary embedding base theta (default: the preset's, else 10000).", minimum=0.0
    )
    vocab_size: Optional[int] = setting(
        None, "Vocabulary size (default: the preset's, else the tokenizer's padded size).", minimum=1
    )
    norm_epsilon: Optional[float] = setting(None, "RMSNorm epsilon (default: the preset's, else 1e-5).", minimum=0.0)
    init_method_std: Optional[float] = setting(
        None, "Std of the normal weight init (default: the preset's, else 0.02).", minimum=0.0
    )
    attention_backend: str = setting(
        "auto",
        "Attention kernel: auto (flash-attn, else Transformer Engine, else torch SDPA, by what is installed "
        "and the device), or one of them explicitly; Megatron's fused is Transformer Engine (torch SDPA with one "
        "warning where it cannot run), unfused and local the explicit softmax(q k^T) v.",
        choices=ATTENTION_BACKENDS,
    )
    swiglu: bool = setting(
        False,
        "SwiGLU MLP (the only MLP megalign builds; without a preset Megatron's default, a GELU MLP, is refused, "
        "so give it).",
    )
    normalization: Optional[str] = setting(
        None,
        "Norm layers: RMSNorm only (default: the preset's RMSNorm; without a preset Megatron's LayerNorm, "
        "which megalign does not build, so give RMSNorm).",
        choices=("LayerNorm", "RMSNorm"),
    )
    apply_layernorm_1p: bool = setting(
        False, "Norm weights stored as w - 1 (initialised to 0) and applied as 1 + w; exported to HF as 1 + w."
    )
    position_embedding_type: Optional[str] = setting(
        None,
        "Positions: rope only (default: rope with a preset; without a preset Megatron's learned_absolute, "
        "which megalign does not build, so give rope).",
        choices=("learned_absolute", "rope", "yarn", "mrope", "relative", "none"),
    )
    rotary_percent: float = setting(1.0, "Fraction of each head rotated by RoPE: 1.0 only (partial RoPE is not built).")
    rotary_seq_len_interpolation_factor: Optional[float] = setting(
        None, "Linear RoPE position interpolation: positions are divided by this (HF rope_type linear).", minimum=1.0
    )
    use_rope_scaling: bool = setting(
        False, "Llama-3.1 RoPE frequency scaling (low/high frequency factors 1 and 4, original context 8192)."
    )
    rope_scaling_factor: Optional[float] = setting(
        None, "--use-rope-scaling factor (default: 8, Megatron's).", minimum=1.0
    )
    disable_bias_linear: bool = setting(
        False,
        "No biases in the linear layers (megalign builds none; without a preset Megatron's default has "
        "them everywhere, which is refused, so give this flag or --add-qkv-bias).",
    )
    add_qkv_bias: bool = setting(False, "Biases in the q/k/v projections only (Qwen2).")
    untie_embeddings_and_output_weights: bool = setting(
        False, "A separate LM head (default: the preset's choice; without a preset tied, Megatron's default)."
    )
    attention_dropout: Optional[float] = setting(
        None,
        "Dropout on the attention probabilities in training (default: the preset's 0; without a preset "
        "Megatron's 0.1). Runs the explicit attention kernel when > 0.",
        minimum=0.0,
    )
    hidden_dropout: Optional[float] = setting(
        None,
        "Dropout on the embedding output and on the attention and MLP outputs before each residual add, in "
        "training (default: the preset's 0; without a preset Megatron's 0.1).",
        minimum=0.0,
    )
    cross_entropy_loss_fusion: bool = setting(
        False, "No-op: the loss is always megalign's fused vocabulary-parallel cross-entropy."
    )
    use_mcore_models: bool = setting(False, "No-op (deprecated in Megatron): megalign has one model implementation.")


@dataclass
class DataSection:
    """Where the training data is and how samples are cut from it."""

    title: ClassVar[str] = "Data"

    data_path: Optional[List[str]] = setting(
        None, "Dataset prefixes, optionally weighted: P1 P2 ... or W1 P1 W2 P2 ..."
    )
    split: str = setting("969,30,1", "Train,valid,test proportions of --data-path.")
    tokenizer_type: Optional[str] = setting(None, "Tokenizer class.", choices=TOKENIZER_TYPES)
    tokenizer_model: Optional[str] = setting(None, "Tokenizer model file or directory.")
    vocab_file: Optional[str] = setting(
        None, "GPT2BPETokenizer: the vocab.json (without --tokenizer-type it selects GPT2BPETokenizer, as Megatron)."
    )
    merge_file: Optional[str] = setting(None, "GPT2BPETokenizer: the merges.txt.")
    tiktoken_pattern: Optional[str] = setting(
        None,
        "TikTokenizer pre-tokenization regex: v2 is the one megalign uses for Megatron's JSON vocabularies "
        "(Llama-3 .tiktoken files use Llama-3's); v1 is refused. Not used by other tokenizers.",
        choices=("v1", "v2"),
    )
    mock_data: bool = setting(
        False, "Train on synthetic tokens (deterministic in --seed) instead of --data-path (Megatron's mock data)."
    )
    no_mmap_bin_files: bool = setting(
        False, "No-op: megalign maps .bin files read-only and copies only the samples it reads."
    )
    no_create_attention_mask_in_dataloader: bool = setting(
        False, "No-op: megalign's loader never builds a dense mask (attention masks come from segment ids)."
    )
    data_cache_path: Optional[str] = setting(None, "Directory for the dataset index caches.")
    reset_position_ids: bool = setting(False, "Restart position ids after each end-of-document token.")
    reset_attention_mask: bool = setting(False, "Keep attention within each document of a sample.")
    eod_mask_loss: bool = setting(False, "Do not train on predicting end-of-document tokens.")
    make_vocab_size_divisible_by: int = setting(128, "Pad the tokenizer's vocabulary to a multiple of this.", minimum=1)
    num_workers: Optional[int] = setting(
        None,
        "DataLoader worker processes that read and collate batches while the model computes (default: 2 on GPUs, "
        "as Megatron; 0 on CPUs, where workers would compete with the training processes for the cores).",
        minimum=0,
    )


@dataclass
class OptimizationSection:
    """Batch sizes, run length, the learning-rate schedule and AdamW."""

    title: ClassVar[str] = "Optimization"

    micro_batch_size: Optional[int] = setting(None, "Samples per forward/backward pass (required).", minimum=1)
    global_batch_size: Optional[int] = setting(
        None,
        "Samples per optimizer step (default: micro batch size x data-parallel size); the rest is gradient "
        "accumulation.",
        minimum=1,
    )
    train_iters: Optional[int] = setting(None, "Optimizer steps to train for.", minimum=1)
    train_samples: Optional[int] = setting(
        None, "Samples to train for (steps = samples // global batch size).", minimum=1
    )
    lr: Optional[float] = setting(None, "Peak learning rate (required).", minimum=0.0)
    min_lr: float = setting(0.0, "Learning rate at the end of the decay.", minimum=0.0)
    lr_decay_style: str = setting("linear", "Decay after warmup.", choices=DECAY_STYLES)
    lr_warmup_iters: int = setting(0, "Linear warmup steps.", minimum=0)
    lr_warmup_fraction: Optional[float] = setting(None, "Warmup as a fraction of --lr-decay-iters.", minimum=0.0)
    lr_warmup_init: float = setting(0.0, "Learning rate at the start of warmup.", minimum=0.0)
    lr_decay_iters: Optional[int] = setting(None, "Steps to decay over (default: the training steps).", minimum=1)
    lr_wsd_decay_iters: Optional[int] = setting(None, "Annealing steps at the end of a WSD schedule.", minimum=1)
    lr_wsd_decay_style: str = setting("exponential", "Annealing of a WSD schedule.", choices=WSD_DECAY_STYLES)
    lr_warmup_samples: int = setting(
        0, "Linear warmup in samples (sample-based training: with --train-samples).", minimum=0
    )
    lr_decay_samples: Optional[int] = setting(
        None, "Samples to decay over (with --train-samples; default: --train-samples).", minimum=1
    )
    lr_wsd_decay_samples: Optional[int] = setting(
        None, "Annealing samples at the end of a WSD schedule (with --train-samples).", minimum=1
    )
    decoupled_lr: Optional[float] = setting(
        None,
        "Peak learning rate of the input embedding and the output layer (their own param groups, same "
        "schedule shape; default: --lr).",
        minimum=0.0,
    )
    decoupled_min_lr: Optional[float] = setting(
        None, "Minimum learning rate of the --decoupled-lr groups (default: --min-lr).", minimum=0.0
    )
    calculate_per_token_loss: bool = setting(
        False,
        "Normalise the loss by the global batch's non-masked tokens (over micro-batches and data-parallel "
        "ranks) instead of averaging per-micro-batch means.",
    )
    rampup_batch_size: Optional[List[str]] = setting(
        None,
        "Batch-size ramp START INCREMENT SAMPLES (Megatron's, deprecated there): validated, then refused: "
        "megalign trains with a constant global batch size.",
    )
    step_batch_size_schedule: Optional[str] = setting(
        None,
        'Step-wise global batch size "THRESHOLD:BS ..." (K/M/B/T suffixes; tokens): validated, then refused: '
        "megalign trains with a constant global batch size.",
    )
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and norms).", minimum=0.0)
    adam_beta1: float = setting(0.9, "AdamW beta1.", minimum=0.0)
    adam_beta2: float = setting(0.999, "AdamW beta2.", minimum=0.0)
    adam_eps: float = setting(1e-8, "AdamW epsilon.", minimum=0.0)
    clip_grad: float = setting(1.0, "Clip gradients to this global L2 norm (0: no clipping).", minimum=0.0)


@dataclass
class PrecisionSection:
    """Parameter dtype and fp16 loss scaling."""

    title: ClassVar[str] = "Mixed precision"

    bf16: bool = setting(False, "Train in bfloat16 with fp32 master weights.")
    fp16: bool = setting(False, "Train in float16 with fp32 master weights and loss scaling.")
    initial_loss_scale: float = setting(2.0**32, "fp16: first dynamic loss scale.", minimum=0.0)
    loss_scale: Optional[float] = setting(None, "fp16: a static loss scale instead of a dynamic one.", minimum=0.0)
    loss_scale_window: int = setting(1000, "fp16: finite steps before the scale grows.", minimum=1)
    hysteresis: int = setting(2, "fp16: overflows tolerated before the scale shrinks.", minimum=1)
    min_loss_scale: float = setting(1.0, "fp16: lower bound of the dynamic loss scale.", minimum=0.0)
    fp8_format: Optional[str] = setting(
        None,
        "FP8 training through Transformer Engine: refused, megalign does not train in fp8 yet.",
        choices=("e4m3", "hybrid"),
    )
    fp8_amax_history_len: int = setting(1, "fp8: amax history length (only with --fp8-format).", minimum=1)
    fp8_amax_compute_algo: str = setting(
        "most_recent", "fp8: amax of the history (only with --fp8-format).", choices=("most_recent", "max")
    )
    fp8_param_gather: bool = setting(False, "fp8: keep and all-gather parameters in fp8 (only with --fp8-format).")


@dataclass
class RecomputeSection:
    """Activation recomputation in the backward pass."""

    title: ClassVar[str] = "Activation recomputation"

    recompute_granularity: Optional[str] = setting(
        None,
        "Recompute activations in the backward pass: whole layers (full) or the attention core (selective).",
        choices=("full", "selective"),
    )
    recompute_method: Optional[str] = setting(
        None,
        "full: recompute every --recompute-num-layers layers (uniform) or the first --recompute-num-layers "
        "layers (block).",
        choices=("uniform", "block"),
    )
    recompute_num_layers: Optional[int] = setting(None, "Layers per recompute unit (full granularity).", minimum=1)


@dataclass
class ParallelSection:
    """The parallel layout, gradient reduction and the process-group backend."""

    title: ClassVar[str] = "Parallelism"

    tensor_model_parallel_size: int = setting(
        1, "Tensor-parallel degree (ranks splitting each layer's matrices; adjacent ranks, one node).", minimum=1
    )
    pipeline_model_parallel_size: int = setting(
        1, "Pipeline-parallel degree (ranks holding consecutive slices of the layers).", minimum=1
    )
    sequence_parallel: bool = setting(
        False, "Split the activations outside attention/MLP along the sequence over the tensor-parallel ranks."
    )
    num_layers_per_virtual_pipeline_stage: Optional[int] = setting(
        None, "Layers per model chunk of the interleaved 1F1B schedule (each rank holds several chunks).", minimum=1
    )
    decoder_first_pipeline_num_layers: Optional[int] = setting(
        None, "Layers of the first pipeline stage (uneven split; the middle stages share the rest).", minimum=0
    )
    decoder_last_pipeline_num_layers: Optional[int] = setting(
        None, "Layers of the last pipeline stage (uneven split).", minimum=0
    )
    use_distributed_optimizer: bool = setting(
        False, "Shard fp32 master weights and optimizer state over the data-parallel ranks (ZeRO-1)."
    )
    overlap_grad_reduce: bool = setting(False, "Reduce gradient buckets during the backward pass.")
    overlap_param_gather: bool = setting(
        False,
        "Distributed optimizer: overlap the all-gather of the updated parameters with the next forward pass "
        "(needs --use-distributed-optimizer and --overlap-grad-reduce; not with --torch-compile).",
    )
    grad_reduce_in_bf16: bool = setting(
        False, "Keep the gradient buffers in bfloat16 and reduce them over data parallelism in bfloat16."
    )
    ddp_bucket_size: Optional[int] = setting(
        None,
        "Elements per gradient bucket (default: one bucket, or Megatron's size with --overlap-grad-reduce).",
        minimum=1,
    )
    distributed_backend: Optional[str] = setting(
        None, "torch.distributed backend (default: nccl on GPUs, gloo on CPUs).", choices=("nccl", "gloo")
    )
    distributed_timeout_minutes: int = setting(10, "Timeout of collective operations.", minimum=1)
    context_parallel_size: int = setting(
        1, "Context-parallel degree: 1 only (context parallelism is not built).", minimum=1
    )


@dataclass
class CheckpointingSection:
    """Where checkpoints go, where a run starts from, and how often it saves."""

    title: ClassVar[str] = "Checkpointing"

    save: Optional[str] = setting(None, "Directory to save checkpoints in.")
    load: Optional[str] = setting(
        None,
        "Directory to resume (or, with --finetune, start) from. A directory without a checkpoint yet starts "
        "the run from scratch (Megatron's --save X --load X on every restart).",
    )
    use_checkpoint_args: bool = setting(
        False,
        "Build the model from the architecture recorded in the --load checkpoint (a --load without shape flags "
        "does so too); an explicit shape flag that disagrees with it is an error.",
    )
    save_interval: Optional[int] = setting(None, "Save every this many steps.", minimum=1)
    ckpt_format: str = setting(
        "torch_dist",
        "torch_dist only: megalign's own sharded, reshardable format plays its role; convert Megatron "
        "checkpoints of other formats with `megalign convert megatron-to-megalign`.",
    )
    finetune: bool = setting(False, "Load only the weights from --load; reset the optimizer, schedule and iteration.")
    keep_last: Optional[int] = setting(None, "Keep only the newest N checkpoints in --save (ours).", minimum=1)
    async_save: bool = setting(
        False,
        "Write checkpoints in a background thread while training continues (tensors are copied first; at "
        "most one save in flight).",
    )
    max_consecutive_skipped_steps: Optional[int] = setting(
        None, "Save and abort after this many non-finite steps in a row (ours).", minimum=1
    )


@dataclass
class LoggingSection:
    """Validation, console logging, TensorBoard and the MFU denominator."""

    title: ClassVar[str] = "Evaluation and logging"

    eval_interval: int = setting(1000, "Evaluate on the validation split every this many steps.", minimum=1)
    eval_iters: int = setting(100, "Validation batches per evaluation.", minimum=0)
    log_interval: int = setting(100, "Log every this many steps.", minimum=1)
    tensorboard_dir: Optional[str] = setting(None, "Write TensorBoard events here.")
    tensorboard_log_interval: int = setting(
        1, "Write training scalars to TensorBoard every this many steps.", minimum=1
    )
    peak_tflops: Optional[float] = setting(
        None, "Peak TFLOP/s of one device, for MFU (ours; default: a table of GPUs; CPUs need it).", minimum=0.0
    )
    log_throughput: bool = setting(
        False, "Add model TFLOP/s per device and MFU to the log line and the TensorBoard scalars."
    )
    profile: bool = setting(
        False,
        "Record a torch.profiler trace (chrome trace JSON) of steps --profile-step-start to --profile-step-end "
        "(in --tensorboard-dir/torch_profile, else --save/torch_profile, else ./torch_profile).",
    )
    use_pytorch_profiler: bool = setting(
        False, "Accepted for Megatron scripts: --profile always uses torch.profiler here (no nsys capture range)."
    )
    profile_step_start: int = setting(10, "First profiled step (--profile).", minimum=0)
    profile_step_end: int = setting(12, "Step at which profiling stops (--profile; exclusive).", minimum=0)
    profile_ranks: Optional[List[str]] = setting(
        None, "Global ranks that write a trace with --profile (default: every rank, Megatron's empty list)."
    )


@dataclass
class MiscSection:
    """The seed, torch.compile and supervised fine-tuning."""

    title: ClassVar[str] = "Miscellaneous"

    seed: int = setting(1234, "Random seed (model init, data order).", minimum=0)
    torch_compile: bool = setting(False, "Compile each decoder layer with torch.compile (ours).")
    sft: bool = setting(
        False,
        "Supervised fine-tuning: --data-path holds `preprocess --sft` output; one conversation per sample, "
        "loss on the assistant replies only.",
    )
    exit_duration_in_mins: Optional[int] = setting(
        None,
        "Stop at the first step boundary after this many minutes of training, saving a checkpoint when "
        "--save is set (every rank agrees).",
        minimum=1,
    )
    manual_gc: bool = setting(
        False, "Disable Python's automatic garbage collector; collect at set points on every rank instead."
    )
    manual_gc_interval: int = setting(
        0, "With --manual-gc: collect every this many steps (0: never between steps).", minimum=0
    )
    no_manual_gc_eval: bool = setting(
        False, "With --manual-gc: do not collect at the start and end of each evaluation."
    )
    empty_unused_memory_level: int = setting(
        0,
        "Free cached CUDA memory (torch.cuda.empty_cache), 0, 1 or 2: 1 after each step's forward/backward and "
        "each evaluation, 2 also after the optimizer step; on CPUs there is nothing to free (no-op).",
        minimum=0,
    )
