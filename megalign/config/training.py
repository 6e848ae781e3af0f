"""The training configuration of ``megalign train`` / ``pretrain_gpt.py``: one typed section per flag group.

Values come from, in increasing priority: the flag defaults (Megatron's), a ``--config FILE.yaml`` (keys are
flag names with dashes or underscores: ``micro_batch_size: 4`` or ``micro-batch-size: 4``) and explicit
command-line flags (megalign.config.loading). Every flag is one field of a section in
megalign.config.sections; :meth:`TrainingConfig.validate` checks conflicts and constraints and raises
:class:`~megalign.errors.ConfigError` naming the flags involved. Components take their section:

    cfg = load_config(["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
                       "--train-iters", "100", "--lr", "3e-4"])
    schedule = LRSchedule.from_config(cfg.optimization, cfg.train_iters)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, TypeVar

from megalign.config.data_paths import parse_data_path, parse_split
from megalign.config.flags import Flag, collect_flags, parse_value
from megalign.config.flags import flags_markdown as _flags_markdown
from megalign.config.layout import data_parallel_size, stage_layer_ranges
from megalign.config.lr_settings import LRScheduleSettings
from megalign.config.megatron_flags import apply_architecture_flags, check_architecture_flags, check_unbuilt_flags
from megalign.config.model import ModelConfig, ModelOptions, preset
from megalign.config.sections import (
    CheckpointingSection,
    DataSection,
    LoggingSection,
    MiscSection,
    ModelSection,
    OptimizationSection,
    ParallelSection,
    PrecisionSection,
    RecomputeSection,
)
from megalign.errors import ConfigError

__all__ = [
    "CONFLICTS",
    "FLAGS",
    "FLAGS_BY_DEST",
    "SECTIONS",
    "TrainingConfig",
    "flags_markdown",
    "world_size_from_environment",
]

_Number = TypeVar("_Number", int, float)
logger = logging.getLogger(__name__)

# Model flags that override a ModelConfig field of another name.
_MODEL_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rope_theta",
    "vocab_size": "vocab_size",
    "norm_epsilon": "rms_norm_eps",
    "init_method_std": "init_std",
}


# Model fields a flag may change when the model comes from the checkpoint: they change no weight. (--vocab-size
# is the tokenizer's size for NullTokenizer, as in Megatron; the trainer checks the tokenizer against the rows.)
_FREE_WITH_CHECKPOINT = ("init_std", "max_position_embeddings", "attention_dropout", "hidden_dropout", "vocab_size")
# Architecture fields set by flags other than _MODEL_FIELDS, and the flags that set them.
_ARCHITECTURE_FLAGS = {
    "qkv_bias": "--add-qkv-bias / --disable-bias-linear",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
    "kv_channels": "--kv-channels",
    "apply_layernorm_1p": "--apply-layernorm-1p",
    "rope_scaling": "--use-rope-scaling / --rope-scaling-factor",
    "rotary_interpolation_factor": "--rotary-seq-len-interpolation-factor",
}


def _disagreement(flag: str, value: Any, stored: Any) -> ConfigError:
    return ConfigError(
        f"{flag} {value} disagrees with the --load checkpoint, which has {stored}; drop the flag "
        "(the model is built from the checkpoint) or load a checkpoint of that shape"
    )


def _check_against_checkpoint(overrides: Mapping[str, Any], recorded: Mapping[str, Any]) -> None:
    """ConfigError naming the flag and both values when an explicit shape flag disagrees with the checkpoint."""
    flags = {name: dest for dest, name in _MODEL_FIELDS.items()}
    for name, value in overrides.items():
        if name in _FREE_WITH_CHECKPOINT or name not in recorded:
            continue
        stored = recorded[name]
        if value != stored:
            raise _disagreement(FLAGS_BY_DEST[flags[name]].name if name in flags else name, value, stored)


def _check_architecture_against_checkpoint(built: Mapping[str, Any], recorded: Mapping[str, Any]) -> None:
    """The same for the architecture flags (biases, tied embeddings, head size, 1p norms, rope variants)."""
    for name, flag in _ARCHITECTURE_FLAGS.items():
        if built.get(name) != recorded.get(name):
            raise _disagreement(flag, f"(gives {name}={built.get(name)!r})", f"{name}={recorded.get(name)!r}")


def _required(value: Optional[_Number], flag: str) -> _Number:
    if value is None:
        raise ConfigError(f"{flag} is required")
    return value


def world_size_from_environment() -> int:
    """The number of processes of this job: torchrun's WORLD_SIZE, 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None
    if size < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={size} must be >= 1")
    return size


@dataclass
class TrainingConfig:
    """Everything a training run is configured with, one dataclass per flag group."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpointing: CheckpointingSection = field(default_factory=CheckpointingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    misc: MiscSection = field(default_factory=MiscSection)
    # The model recorded in the --load checkpoint, when it defines the shape (--use-checkpoint-args, or a --load
    # without shape flags): the base the model flags override, as a preset is; a flag that disagrees is an error.
    checkpoint_model: Optional[ModelConfig] = field(default=None, metadata={"section": False})

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_values(
        cls, values: Mapping[str, Any], where: str = "", checkpoint_model: Optional[ModelConfig] = None
    ) -> "TrainingConfig":
        """Build from flat ``{dest: value}`` (unset flags keep defaults), checking each value; then validate.

        ``checkpoint_model``: the shape recorded in the checkpoint to build the model from (see the field)."""
        unknown = sorted(set(values) - set(FLAGS_BY_DEST))
        if unknown:
            raise ConfigError(f"{where}unknown setting(s) {', '.join(unknown)}")
        config = cls(checkpoint_model=checkpoint_model)
        for dest, value in values.items():
            flag = FLAGS_BY_DEST[dest]
            setattr(getattr(config, flag.section), dest, parse_value(flag, value, where))
        config.validate()
        return config

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """JSON-ready ``{section: {dest: value}}`` (checkpoint metadata); inverse of :meth:`from_dict`."""
        return {key: dataclasses.asdict(getattr(self, key)) for key, _ in SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainingConfig":
        """Build from :meth:`to_dict` output; unknown sections or keys, or a key in the wrong section, are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"training config: expected a mapping of sections, got {type(data).__name__}")
        sections = [key for key, _ in SECTIONS]
        values: Dict[str, Any] = {}
        for key, section in data.items():
            if key not in sections:
                raise ConfigError(f"training config: unknown section {key!r}; known: {', '.join(sections)}")
            if not isinstance(section, Mapping):
                raise ConfigError(f"training config: section {key!r} must be a mapping")
            for dest, value in section.items():
                flag = FLAGS_BY_DEST.get(dest)
                if flag is None or flag.section != key:
                    raise ConfigError(f"training config: {key}.{dest} is not a setting of section {key!r}")
                values[dest] = value
        return cls.from_values(values, "training config: ")

    def flat(self) -> Dict[str, Any]:
        """``{dest: value}`` over every section, as given (nothing derived)."""
        return {dest: getattr(getattr(self, flag.section), dest) for dest, flag in FLAGS_BY_DEST.items()}

    # ---- derived values -----------------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        """Data-parallel replicas: world size (torchrun's WORLD_SIZE) / (TP x PP)."""
        p = self.parallel
        return max(1, self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size))

    @property
    def world_size(self) -> int:
        """Processes in this job (torchrun's WORLD_SIZE; 1 without a launcher)."""
        return world_size_from_environment()

    @property
    def num_model_chunks(self) -> int:
        """Model chunks per pipeline rank: 1, or more with --num-layers-per-virtual-pipeline-stage."""
        p, layers = (
            self.parallel,
            self._shape_fields()["num_layers"],
        )
        if p.num_layers_per_virtual_pipeline_stage is None:
            return 1
        return layers // p.pipeline_model_parallel_size // p.num_layers_per_virtual_pipeline_stage

    @property
    def seq_length(self) -> int:
        """--seq-length (required: validation rejects a config without it)."""
        return _required(self.model.seq_length, "--seq-length")

    @property
    def micro_batch_size(self) -> int:
        """--micro-batch-size (required)."""
        return _required(self.optimization.micro_batch_size, "--micro-batch-size")

    @property
    def global_batch_size(self) -> int:
        """--global-batch-size, or micro batch size x data-parallel size."""
        opt = self.optimization
        if opt.global_batch_size is not None:
            return opt.global_batch_size
        return self.micro_batch_size * self.data_parallel_size

    @property
    def train_iters(self) -> int:
        """Optimizer steps: --train-iters, or --train-samples // global batch size (Megatron's rule)."""
        opt = self.optimization
        if opt.train_iters is not None:
            return opt.train_iters
        return _required(opt.train_samples, "--train-iters or --train-samples") // self.global_batch_size

    @property
    def num_microbatches(self) -> int:
        """Gradient-accumulation steps per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def _shape_fields(self) -> Dict[str, Any]:
        """:meth:`_model_fields` for shape checks before the tokenizer is known (a stand-in vocabulary of 1)."""
        m = self.model
        return self._model_fields(None if (m.model_preset or m.vocab_size or self.checkpoint_model) else 1)

    def _model_fields(self, vocab_size: Optional[int], true_vocab_size: Optional[int] = None) -> Dict[str, Any]:
        """ModelConfig keyword arguments: the checkpoint's or the preset's fields (if any) with the model flags
        applied. ``vocab_size``/``true_vocab_size``: the embedding's rows and the real vocabulary (trainer)."""
        m = self.model
        overrides = {name: getattr(m, dest) for dest, name in _MODEL_FIELDS.items() if getattr(m, dest) is not None}
        if self.checkpoint_model is not None:
            base = self.checkpoint_model.to_dict()
            _check_against_checkpoint(overrides, base)
            overrides.pop("vocab_size", None)  # a tokenizer setting here: the rows follow the checkpoint's vocabulary
            base.update(overrides)
            if vocab_size is not None:
                base.update(vocab_size=vocab_size, true_vocab_size=true_vocab_size or base["true_vocab_size"])
            built = apply_architecture_flags(base, m, has_base=True)
            _check_architecture_against_checkpoint(built, self.checkpoint_model.to_dict())
            return built
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
            if true_vocab_size is not None:
                overrides["true_vocab_size"] = true_vocab_size
        if m.model_preset is not None:
            return apply_architecture_flags({**preset(m.model_preset).to_dict(), **overrides}, m, has_base=True)
        missing = [
            FLAGS_BY_DEST[d].name for d in ("num_layers", "hidden_size", "num_attention_heads") if getattr(m, d) is None
        ]
        if missing:
            raise ConfigError(f"give --model-preset, or {', '.join(missing)} to define the model")
        if "vocab_size" not in overrides:
            raise ConfigError("the model needs a vocabulary size: give --vocab-size, a --model-preset, or a tokenizer")
        overrides.setdefault(
            "intermediate_size", max(64, int(8 * _required(m.hidden_size, "--hidden-size") / 3 / 64) * 64)
        )
        overrides.setdefault("num_key_value_heads", m.num_attention_heads)
        overrides.setdefault("max_position_embeddings", m.seq_length)
        return apply_architecture_flags(overrides, m, has_base=False)

    def model_options(self) -> ModelOptions:
        """How the model runs: --attention-backend and the --recompute-* flags."""
        r = self.recompute
        return ModelOptions(
            attention_backend=self.model.attention_backend,
            recompute_granularity=r.recompute_granularity,
            recompute_method=r.recompute_method,
            recompute_num_layers=r.recompute_num_layers,
        )

    def model_config(self, vocab_size: Optional[int] = None, true_vocab_size: Optional[int] = None) -> ModelConfig:
        """The model shape: the checkpoint's (``checkpoint_model``) or --model-preset with the model flags as
        overrides, or the flags alone.

        ``vocab_size`` (the padded rows for this layout) wins over --vocab-size and the preset's;
        ``true_vocab_size`` is the real vocabulary (rows past it are padding).
        """
        return ModelConfig.from_dict(self._model_fields(vocab_size, true_vocab_size))

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check required flags, conflicts and constraints; ConfigError names the flags and the constraint."""
        values = self.flat()
        for first, second in CONFLICTS:
            if values[first] != FLAGS_BY_DEST[first].default and values[second] != FLAGS_BY_DEST[second].default:
                raise ConfigError(
                    f"{FLAGS_BY_DEST[first].name} and {FLAGS_BY_DEST[second].name} cannot be used "
                    "together; give only one"
                )
        for dest in ("seq_length", "micro_batch_size", "lr"):
            if values[dest] is None:
                raise ConfigError(f"{FLAGS_BY_DEST[dest].name} is required")
        if values["train_iters"] is None and values["train_samples"] is None:
            raise ConfigError("give --train-iters or --train-samples (how long to train)")
        self._validate_megatron_flags()
        self._validate_parallel_layout()
        self._validate_batch()
        self._validate_model()
        self._validate_optimization()
        self._validate_precision()
        self._validate_recompute()
        self._validate_checkpointing()
        self._validate_logging()
        self._validate_data()
        self._validate_training_behaviour()

    def _validate_parallel_layout(self) -> None:
        """World size vs TP x PP, heads and KV heads vs TP, layers vs pipeline stages, the interleaved schedule."""
        p = self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        data_parallel_size(self.world_size, tp, pp)
        if p.sequence_parallel and tp == 1:  # Megatron's rule (its Llama script passes both)
            logger.warning("--sequence-parallel is disabled: --tensor-model-parallel-size is 1 (Megatron's rule)")
            p.sequence_parallel = False
        fields_ = self._shape_fields()
        heads, groups, layers = fields_["num_attention_heads"], fields_["num_key_value_heads"], fields_["num_layers"]
        if heads % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} must divide --num-attention-heads {heads}")
        if groups % tp and tp % groups:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} must divide --num-query-groups {groups} (or be a "
                "multiple of it: each rank then keeps a copy of one key/value head)"
            )
        uneven = p.decoder_first_pipeline_num_layers is not None or p.decoder_last_pipeline_num_layers is not None
        if uneven and pp == 1:
            raise ConfigError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        chunks = 1
        if p.num_layers_per_virtual_pipeline_stage is not None:
            if pp == 1:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            if uneven:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage cannot be combined with "
                    "--decoder-first/last-pipeline-num-layers"
                )
            if layers % pp or (layers // pp) % p.num_layers_per_virtual_pipeline_stage:
                raise ConfigError(
                    f"--num-layers {layers} / --pipeline-model-parallel-size {pp} must be a multiple of "
                    f"--num-layers-per-virtual-pipeline-stage {p.num_layers_per_virtual_pipeline_stage}"
                )
            chunks = layers // pp // p.num_layers_per_virtual_pipeline_stage
        stage_layer_ranges(layers, pp * chunks, p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)

    def _validate_batch(self) -> None:
        opt = self.optimization
        unit = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % unit:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} must be divisible by --micro-batch-size "
                f"{opt.micro_batch_size} x data-parallel size {self.data_parallel_size}"
            )
        p = self.parallel
        if (
            p.num_layers_per_virtual_pipeline_stage is not None
            and self.num_microbatches % p.pipeline_model_parallel_size
        ):
            raise ConfigError(
                f"the interleaved schedule needs the micro-batches per step ({self.num_microbatches} = "
                f"--global-batch-size / (--micro-batch-size x data-parallel size)) to be a multiple of "
                f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}"
            )
        if opt.train_samples is not None and opt.train_samples < self.global_batch_size:
            raise ConfigError(
                f"--train-samples {opt.train_samples} must be at least --global-batch-size "
                f"{self.global_batch_size} (one optimizer step)"
            )

    def _validate_model(self) -> None:
        m = self.model
        fields_ = self._shape_fields()
        hidden, heads, groups = (fields_["hidden_size"], fields_["num_attention_heads"], fields_["num_key_value_heads"])
        if hidden % heads and fields_.get("kv_channels") is None:
            raise ConfigError(f"--num-attention-heads {heads} must divide --hidden-size {hidden}")
        if heads % groups:
            raise ConfigError(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
        if m.seq_length > fields_["max_position_embeddings"]:
            raise ConfigError(
                f"--seq-length {m.seq_length} must not exceed --max-position-embeddings "
                f"{fields_['max_position_embeddings']}"
            )
        layers = self.recompute.recompute_num_layers
        if layers is not None and layers > fields_["num_layers"]:
            raise ConfigError(f"--recompute-num-layers {layers} must not exceed --num-layers {fields_['num_layers']}")
        ModelConfig.from_dict(fields_)  # the remaining shape checks (even head size, ...)

    def _validate_optimization(self) -> None:
        opt = self.optimization
        if opt.min_lr > _required(opt.lr, "--lr"):
            raise ConfigError(f"--min-lr {opt.min_lr:g} must not exceed --lr {opt.lr:g}")
        for dest in ("adam_beta1", "adam_beta2"):
            if not getattr(opt, dest) < 1.0:
                raise ConfigError(f"{FLAGS_BY_DEST[dest].name} {getattr(opt, dest):g} must be in [0, 1)")
        if opt.adam_eps <= 0.0:
            raise ConfigError(f"--adam-eps {opt.adam_eps:g} must be > 0")
        for dest in ("lr_wsd_decay_iters", "lr_wsd_decay_samples"):
            if getattr(opt, dest) is not None and opt.lr_decay_style != "wsd":
                raise ConfigError(
                    f"{FLAGS_BY_DEST[dest].name} is only used with --lr-decay-style wsd, not {opt.lr_decay_style}"
                )
        LRScheduleSettings.from_section(opt, self.train_iters)  # warmup vs decay steps, WSD, ...: name flags

    def _validate_precision(self) -> None:
        p = self.precision
        if not p.fp16:
            for dest in ("initial_loss_scale", "loss_scale", "loss_scale_window", "hysteresis", "min_loss_scale"):
                if getattr(p, dest) != FLAGS_BY_DEST[dest].default:
                    raise ConfigError(
                        f"{FLAGS_BY_DEST[dest].name} is only used with --fp16 (bf16 and fp32 need "
                        "no loss scaling); remove it or add --fp16"
                    )
        if p.loss_scale is not None and p.loss_scale <= 0.0:
            raise ConfigError(f"--loss-scale {p.loss_scale:g} must be > 0")
        if not 0.0 < p.min_loss_scale <= p.initial_loss_scale:
            raise ConfigError(
                f"--min-loss-scale {p.min_loss_scale:g} must be > 0 and must not exceed "
                f"--initial-loss-scale {p.initial_loss_scale:g}"
            )

    def _validate_recompute(self) -> None:
        r = self.recompute
        if r.recompute_granularity is None:
            if r.recompute_method is not None or r.recompute_num_layers is not None:
                raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")
        elif r.recompute_granularity == "full":
            if r.recompute_method is None or r.recompute_num_layers is None:
                raise ConfigError(
                    "--recompute-granularity full needs --recompute-method (uniform or block) and "
                    "--recompute-num-layers"
                )
        elif r.recompute_method is not None or r.recompute_num_layers is not None:
            raise ConfigError(
                "--recompute-granularity selective takes no --recompute-method or "
                "--recompute-num-layers (they are for full)"
            )

    def _validate_checkpointing(self) -> None:
        c = self.checkpointing
        for dest in ("save_interval", "keep_last", "async_save"):
            if getattr(c, dest) not in (None, False) and c.save is None:
                raise ConfigError(f"{FLAGS_BY_DEST[dest].name} needs --save (where checkpoints go)")
        if c.finetune and c.load is None:
            raise ConfigError("--finetune needs --load (the checkpoint to start from)")
        if c.use_checkpoint_args and c.load is None:
            raise ConfigError("--use-checkpoint-args needs --load (the checkpoint whose model to build)")

    def _validate_logging(self) -> None:
        if self.logging.tensorboard_log_interval != 1 and self.logging.tensorboard_dir is None:
            raise ConfigError("--tensorboard-log-interval needs --tensorboard-dir (where the events go)")

    def _validate_training_behaviour(self) -> None:
        """Decoupled LR, batch-size ramps, parameter gather, profiling and the run controls (--manual-gc, ...)."""
        opt, p, log, misc = self.optimization, self.parallel, self.logging, self.misc
        if opt.decoupled_min_lr is not None:
            if opt.decoupled_lr is None:
                raise ConfigError("--decoupled-min-lr needs --decoupled-lr (the peak of the same param groups)")
            if opt.decoupled_min_lr > opt.decoupled_lr:
                raise ConfigError(
                    f"--decoupled-min-lr {opt.decoupled_min_lr:g} must not exceed --decoupled-lr {opt.decoupled_lr:g}"
                )
        if opt.decoupled_lr is not None and opt.decoupled_min_lr is None and opt.min_lr > opt.decoupled_lr:
            raise ConfigError(
                f"--decoupled-lr {opt.decoupled_lr:g} is below --min-lr {opt.min_lr:g} (its floor by default); "
                "give --decoupled-min-lr"
            )
        _check_batch_ramp(self)
        if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
            raise ConfigError(
                "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce (as in Megatron)"
            )
        if p.overlap_param_gather and self.misc.torch_compile:
            raise ConfigError(
                "--overlap-param-gather cannot be combined with --torch-compile (its forward pre-hooks wait for "
                "communication, which compiled layers would trace); drop one of them"
            )
        if log.profile:
            if log.profile_step_end <= log.profile_step_start:
                raise ConfigError(
                    f"--profile-step-end {log.profile_step_end} must be larger than --profile-step-start "
                    f"{log.profile_step_start}"
                )
            for rank in log.profile_ranks or []:
                if not rank.isdigit():
                    raise ConfigError(f"--profile-ranks {rank!r} is not a rank number (0, 1, ...)")
        else:
            for dest in ("use_pytorch_profiler", "profile_step_start", "profile_step_end", "profile_ranks"):
                if getattr(log, dest) != FLAGS_BY_DEST[dest].default:
                    raise ConfigError(f"{FLAGS_BY_DEST[dest].name} needs --profile (it sets what is profiled)")
        if not misc.manual_gc:
            for dest in ("manual_gc_interval", "no_manual_gc_eval"):
                if getattr(misc, dest) != FLAGS_BY_DEST[dest].default:
                    raise ConfigError(f"{FLAGS_BY_DEST[dest].name} needs --manual-gc")
        if misc.empty_unused_memory_level > 2:
            raise ConfigError(f"--empty-unused-memory-level {misc.empty_unused_memory_level} must be 0, 1 or 2")

    def _validate_megatron_flags(self) -> None:
        """Megatron flags of values megalign does not build (megalign.config.megatron_flags); Megatron's default
        --tokenizer-type GPT2BPETokenizer when --vocab-file or --merge-file is given without one."""
        d = self.data
        self._shape_fields()  # first: a model without a preset or the shape flags is the more basic error
        if d.tokenizer_type is None and (d.vocab_file is not None or d.merge_file is not None):
            d.tokenizer_type = "GPT2BPETokenizer"
        has_base = self.model.model_preset is not None or self.checkpoint_model is not None
        check_architecture_flags(self.model, has_base=has_base)
        check_unbuilt_flags(d, self.precision, self.parallel, self.checkpointing)
        if d.mock_data and self.misc.sft:
            raise ConfigError(
                "--mock-data has no conversations for --sft; give --data-path with `preprocess --sft` output"
            )

    def _validate_data(self) -> None:
        d = self.data
        if self.misc.sft:
            for dest in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
                if getattr(d, dest):
                    raise ConfigError(
                        f"{FLAGS_BY_DEST[dest].name} does not apply to --sft: an SFT sample is one "
                        "conversation (padding is never trained on); remove it"
                    )
        if d.data_path is not None:
            parse_data_path(d.data_path)
        try:
            parse_split(d.split)
        except ConfigError as exc:
            raise ConfigError(f"--{exc}") from None
        if d.tokenizer_model is not None and d.tokenizer_type is None:
            raise ConfigError("--tokenizer-model needs --tokenizer-type (how to read the model file)")
        if self.misc.seed > 2**32 - 1:
            raise ConfigError(f"--seed {self.misc.seed} must be < 2**32")


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_batch_size_schedule(text: str) -> List[Tuple[int, int]]:
    """``--step-batch-size-schedule "0:16 2.4B:320"`` -> ``[(0, 16), (2400000000, 320)]`` (threshold, batch size).

    Thresholds take K/M/B/T suffixes and must start at 0 and increase; batch sizes are positive integers.
    """
    entries: List[Tuple[int, int]] = []
    for item in text.split():
        threshold, sep, size = item.partition(":")
        scale = _SUFFIXES.get(threshold[-1:].upper(), 1)
        number = threshold[:-1] if scale > 1 else threshold
        try:
            at, batch = int(round(float(number) * scale)), int(size)
        except ValueError:
            raise ConfigError(
                f"--step-batch-size-schedule: {item!r} is not THRESHOLD:BATCH_SIZE (e.g. 0:16 or 2.4B:320)"
            ) from None
        if not sep or at < 0 or batch < 1 or (entries and at <= entries[-1][0]):
            raise ConfigError(
                f"--step-batch-size-schedule: {item!r}: thresholds must be >= 0 and increasing, batch sizes >= 1"
            )
        entries.append((at, batch))
    if not entries or entries[0][0] != 0:
        raise ConfigError(f"--step-batch-size-schedule {text!r} must start with a 0:BATCH_SIZE entry")
    return entries


def _check_batch_ramp(config: TrainingConfig) -> None:
    """Validate --step-batch-size-schedule / --rampup-batch-size, then refuse them: not built yet."""
    opt = config.optimization
    if opt.step_batch_size_schedule is not None:
        if opt.global_batch_size is not None:
            raise ConfigError("--step-batch-size-schedule and --global-batch-size cannot be used together")
        if opt.rampup_batch_size is not None:
            raise ConfigError("--step-batch-size-schedule and --rampup-batch-size cannot be used together")
        unit = config.micro_batch_size * config.data_parallel_size
        for _, batch in parse_batch_size_schedule(opt.step_batch_size_schedule):
            if batch % unit:
                raise ConfigError(
                    f"--step-batch-size-schedule: batch size {batch} must be divisible by --micro-batch-size "
                    f"x data-parallel size ({unit})"
                )
        flag = f"--step-batch-size-schedule {opt.step_batch_size_schedule!r}"
    elif opt.rampup_batch_size is not None:
        values = opt.rampup_batch_size
        if len(values) != 3 or not all(value.isdigit() and int(value) > 0 for value in values):
            raise ConfigError(
                f"--rampup-batch-size {' '.join(values)}: give three positive integers START INCREMENT SAMPLES"
            )
        start, increment, _ = (int(value) for value in values)
        if (config.global_batch_size - start) % increment:
            raise ConfigError(
                f"--rampup-batch-size: --global-batch-size {config.global_batch_size} minus start {start} must "
                f"be a multiple of the increment {increment}"
            )
        flag = f"--rampup-batch-size {' '.join(values)}"
    else:
        return
    raise ConfigError(
        f"{flag}: batch-size ramps are not built yet (megalign trains with a constant global batch size); "
        "drop the flag and give --global-batch-size"
    )


SECTIONS, FLAGS = collect_flags(TrainingConfig)
FLAGS_BY_DEST: Dict[str, Flag] = {flag.dest: flag for flag in FLAGS}

# Pairs of flags that cannot both be set (a flag is set when its value differs from its default).
CONFLICTS = (
    ("bf16", "fp16"),
    ("train_iters", "train_samples"),
    ("lr_warmup_iters", "lr_warmup_fraction"),
)


def flags_markdown() -> str:
    """The training flag reference as Markdown tables, one per section (embedded in docs/configuration.md)."""
    return _flags_markdown(SECTIONS, FLAGS)
