"""Training configuration for ``megalign train`` / ``pretrain_gpt.py``: nested dataclasses, YAML + CLI.

Values come from, in increasing priority: the flag defaults (Megatron's), a ``--config FILE.yaml`` (keys are
flag names with dashes or underscores: ``micro_batch_size: 4`` or ``micro-batch-size: 4``) and explicit
command-line flags. Every flag is defined once, in :data:`megalign.config_flags.FLAGS`; the section
dataclasses below are generated from that table. :meth:`TrainingConfig.validate` checks conflicts and
constraints and raises :class:`~megalign.errors.ConfigError` naming the flags involved.

    cfg = load_config(["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
                       "--train-iters", "100", "--lr", "3e-4"])
    schedule = LRSchedule.from_namespace(cfg.as_namespace())
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from megalign.config_flags import CONFLICTS, FLAGS, FLAGS_BY_DEST, SECTIONS, add_flag_arguments, flags_markdown, \
    parse_value
from megalign.data.dataset_builder import parse_data_path, parse_split
from megalign.errors import ConfigError
from megalign.model.config import ModelConfig, ModelOptions, preset
from megalign.training.lr_schedule import LRSchedule
from megalign.utils.yaml_files import read_yaml_file

__all__ = ["CheckpointingSection", "DataSection", "LoggingSection", "MiscSection", "ModelSection",
           "OptimizationSection", "ParallelSection", "PrecisionSection", "RecomputeSection", "TrainingConfig", "add_arguments",
           "build_parser", "config_from_namespace", "flags_markdown", "load_config", "read_yaml"]

_TYPES = {"int": Optional[int], "float": Optional[float], "str": Optional[str], "bool": bool,
          "list": Optional[List[str]]}
# Model flags that override a ModelConfig field of another name.
_MODEL_FIELDS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
                 "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
                 "max_position_embeddings": "max_position_embeddings", "rotary_base": "rope_theta",
                 "vocab_size": "vocab_size", "norm_epsilon": "rms_norm_eps", "init_method_std": "init_std"}


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


def _section_class(key: str, title: str) -> type:
    """A dataclass with one field per flag of section ``key``, defaults from the flag table."""
    specs = []
    for flag in (f for f in FLAGS if f.section == key):
        default = flag.default
        spec = field(default_factory=lambda d=default: list(d)) if isinstance(default, list) else field(default=default)
        specs.append((flag.dest, _TYPES[flag.kind], spec))
    cls = dataclasses.make_dataclass(f"{key.title()}Section", specs, namespace={"__module__": __name__})
    cls.__doc__ = f"{title} settings (flags of the {title!r} group; see docs/configuration.md)."
    return cls


_SECTION_CLASSES = {key: _section_class(key, title) for key, title in SECTIONS}
ModelSection = _SECTION_CLASSES["model"]
DataSection = _SECTION_CLASSES["data"]
OptimizationSection = _SECTION_CLASSES["optimization"]
PrecisionSection = _SECTION_CLASSES["precision"]
RecomputeSection = _SECTION_CLASSES["recompute"]
ParallelSection = _SECTION_CLASSES["parallel"]
CheckpointingSection = _SECTION_CLASSES["checkpointing"]
LoggingSection = _SECTION_CLASSES["logging"]
MiscSection = _SECTION_CLASSES["misc"]


@dataclass
class TrainingConfig:
    """Everything a training run is configured with, one dataclass per flag group."""

    model: Any = field(default_factory=ModelSection)
    data: Any = field(default_factory=DataSection)
    optimization: Any = field(default_factory=OptimizationSection)
    precision: Any = field(default_factory=PrecisionSection)
    recompute: Any = field(default_factory=RecomputeSection)
    parallel: Any = field(default_factory=ParallelSection)
    checkpointing: Any = field(default_factory=CheckpointingSection)
    logging: Any = field(default_factory=LoggingSection)
    misc: Any = field(default_factory=MiscSection)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "") -> "TrainingConfig":
        """Build from flat ``{dest: value}`` (unset flags keep defaults), checking each value; then validate."""
        unknown = sorted(set(values) - set(FLAGS_BY_DEST))
        if unknown:
            raise ConfigError(f"{where}unknown setting(s) {', '.join(unknown)}")
        config = cls()
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
        p, layers = self.parallel, self._model_fields(None if (self.model.model_preset or self.model.vocab_size)
                                                      else 1)["num_layers"]
        if p.num_layers_per_virtual_pipeline_stage is None:
            return 1
        return layers // p.pipeline_model_parallel_size // p.num_layers_per_virtual_pipeline_stage

    @property
    def global_batch_size(self) -> int:
        """--global-batch-size, or micro batch size x data-parallel size."""
        opt = self.optimization
        if opt.global_batch_size is not None:
            return opt.global_batch_size
        return opt.micro_batch_size * self.data_parallel_size

    @property
    def train_iters(self) -> int:
        """Optimizer steps: --train-iters, or --train-samples // global batch size (Megatron's rule)."""
        opt = self.optimization
        return opt.train_iters if opt.train_iters is not None else opt.train_samples // self.global_batch_size

    @property
    def num_microbatches(self) -> int:
        """Gradient-accumulation steps per optimizer step."""
        return self.global_batch_size // (self.optimization.micro_batch_size * self.data_parallel_size)

    def as_namespace(self) -> argparse.Namespace:
        """Megatron-style flat namespace (flag destinations) with train_iters and global_batch_size resolved;
        what LRSchedule.from_namespace and MixedPrecisionOptimizer.from_args read."""
        values = self.flat()
        values.update(train_iters=self.train_iters, global_batch_size=self.global_batch_size,
                      data_parallel_size=self.data_parallel_size, num_microbatches=self.num_microbatches)
        return argparse.Namespace(**values)

    def _model_fields(self, vocab_size: Optional[int]) -> Dict[str, Any]:
        """ModelConfig keyword arguments: the preset's fields (if any) with the model flags applied."""
        m = self.model
        overrides = {name: getattr(m, dest) for dest, name in _MODEL_FIELDS.items() if getattr(m, dest) is not None}
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        if m.model_preset is not None:
            return {**preset(m.model_preset).to_dict(), **overrides}
        missing = [FLAGS_BY_DEST[d].name for d in ("num_layers", "hidden_size", "num_attention_heads")
                   if getattr(m, d) is None]
        if missing:
            raise ConfigError(f"give --model-preset, or {', '.join(missing)} to define the model")
        if "vocab_size" not in overrides:
            raise ConfigError("the model needs a vocabulary size: give --vocab-size, a --model-preset, or a tokenizer")
        overrides.setdefault("intermediate_size", max(64, int(8 * m.hidden_size / 3 / 64) * 64))
        overrides.setdefault("num_key_value_heads", m.num_attention_heads)
        overrides.setdefault("max_position_embeddings", m.seq_length)
        return overrides

    def model_options(self) -> ModelOptions:
        """How the model runs: --attention-backend and the --recompute-* flags."""
        r = self.recompute
        return ModelOptions(attention_backend=self.model.attention_backend,
                            recompute_granularity=r.recompute_granularity, recompute_method=r.recompute_method,
                            recompute_num_layers=r.recompute_num_layers)

    def model_config(self, vocab_size: Optional[int] = None) -> ModelConfig:
        """The model shape: --model-preset with the model flags as overrides, or the flags alone.

        ``vocab_size`` (the tokenizer's padded size) wins over --vocab-size and the preset's.
        """
        return ModelConfig.from_dict(self._model_fields(vocab_size))

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check required flags, conflicts and constraints; ConfigError names the flags and the constraint."""
        values = self.flat()
        for first, second in CONFLICTS:
            if values[first] != FLAGS_BY_DEST[first].default and values[second] != FLAGS_BY_DEST[second].default:
                raise ConfigError(f"{FLAGS_BY_DEST[first].name} and {FLAGS_BY_DEST[second].name} cannot be used "
                                  "together; give only one")
        for dest in ("seq_length", "micro_batch_size", "lr"):
            if values[dest] is None:
                raise ConfigError(f"{FLAGS_BY_DEST[dest].name} is required")
        if values["train_iters"] is None and values["train_samples"] is None:
            raise ConfigError("give --train-iters or --train-samples (how long to train)")
        self._validate_parallel_layout()
        self._validate_batch()
        self._validate_model()
        self._validate_optimization()
        self._validate_precision()
        self._validate_recompute()
        self._validate_checkpointing()
        self._validate_logging()
        self._validate_data()

    def _validate_parallel_layout(self) -> None:
        """World size vs TP x PP, heads and KV heads vs TP, layers vs pipeline stages, the interleaved schedule."""
        from megalign.parallel.pipeline import stage_layer_ranges
        from megalign.parallel.state import rank_layout

        p = self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        rank_layout(self.world_size, tp, pp)
        if p.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        fields_ = self._model_fields(None if (self.model.model_preset or self.model.vocab_size) else 1)
        heads, groups, layers = fields_["num_attention_heads"], fields_["num_key_value_heads"], fields_["num_layers"]
        if heads % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} must divide --num-attention-heads {heads}")
        if groups % tp and tp % groups:
            raise ConfigError(f"--tensor-model-parallel-size {tp} must divide --num-query-groups {groups} (or be a "
                              "multiple of it: each rank then keeps a copy of one key/value head)")
        uneven = p.decoder_first_pipeline_num_layers is not None or p.decoder_last_pipeline_num_layers is not None
        if uneven and pp == 1:
            raise ConfigError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        chunks = 1
        if p.num_layers_per_virtual_pipeline_stage is not None:
            if pp == 1:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            if uneven:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage cannot be combined with "
                                  "--decoder-first/last-pipeline-num-layers")
            if layers % pp or (layers // pp) % p.num_layers_per_virtual_pipeline_stage:
                raise ConfigError(f"--num-layers {layers} / --pipeline-model-parallel-size {pp} must be a multiple of "
                                  f"--num-layers-per-virtual-pipeline-stage {p.num_layers_per_virtual_pipeline_stage}")
            chunks = layers // pp // p.num_layers_per_virtual_pipeline_stage
        stage_layer_ranges(layers, pp * chunks, p.decoder_first_pipeline_num_layers,
                           p.decoder_last_pipeline_num_layers)

    def _validate_batch(self) -> None:
        opt = self.optimization
        unit = opt.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % unit:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} must be divisible by --micro-batch-size "
                              f"{opt.micro_batch_size} x data-parallel size {self.data_parallel_size}")
        p = self.parallel
        if p.num_layers_per_virtual_pipeline_stage is not None and self.num_microbatches % p.pipeline_model_parallel_size:
            raise ConfigError(f"the interleaved schedule needs the micro-batches per step ({self.num_microbatches} = "
                              f"--global-batch-size / (--micro-batch-size x data-parallel size)) to be a multiple of "
                              f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}")
        if opt.train_samples is not None and opt.train_samples < self.global_batch_size:
            raise ConfigError(f"--train-samples {opt.train_samples} must be at least --global-batch-size "
                              f"{self.global_batch_size} (one optimizer step)")

    def _validate_model(self) -> None:
        m = self.model
        fields_ = self._model_fields(None if (m.model_preset or m.vocab_size) else 1)
        hidden, heads, groups = (fields_["hidden_size"], fields_["num_attention_heads"],
                                 fields_["num_key_value_heads"])
        if hidden % heads:
            raise ConfigError(f"--num-attention-heads {heads} must divide --hidden-size {hidden}")
        if heads % groups:
            raise ConfigError(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
        if m.seq_length > fields_["max_position_embeddings"]:
            raise ConfigError(f"--seq-length {m.seq_length} must not exceed --max-position-embeddings "
                              f"{fields_['max_position_embeddings']}")
        layers = self.recompute.recompute_num_layers
        if layers is not None and layers > fields_["num_layers"]:
            raise ConfigError(f"--recompute-num-layers {layers} must not exceed --num-layers {fields_['num_layers']}")
        ModelConfig.from_dict(fields_)  # the remaining shape checks (even head size, ...)

    def _validate_optimization(self) -> None:
        opt = self.optimization
        if opt.min_lr > opt.lr:
            raise ConfigError(f"--min-lr {opt.min_lr:g} must not exceed --lr {opt.lr:g}")
        for dest in ("adam_beta1", "adam_beta2"):
            if not getattr(opt, dest) < 1.0:
                raise ConfigError(f"{FLAGS_BY_DEST[dest].name} {getattr(opt, dest):g} must be in [0, 1)")
        if opt.adam_eps <= 0.0:
            raise ConfigError(f"--adam-eps {opt.adam_eps:g} must be > 0")
        if opt.lr_wsd_decay_iters is not None and opt.lr_decay_style != "wsd":
            raise ConfigError(f"--lr-wsd-decay-iters is only used with --lr-decay-style wsd, "
                              f"not {opt.lr_decay_style}")
        LRSchedule.from_namespace(self.as_namespace())  # warmup vs decay steps, WSD, ...: messages name flags

    def _validate_precision(self) -> None:
        p = self.precision
        if not p.fp16:
            for dest in ("initial_loss_scale", "loss_scale", "loss_scale_window", "hysteresis", "min_loss_scale"):
                if getattr(p, dest) != FLAGS_BY_DEST[dest].default:
                    raise ConfigError(f"{FLAGS_BY_DEST[dest].name} is only used with --fp16 (bf16 and fp32 need "
                                      "no loss scaling); remove it or add --fp16")
        if p.loss_scale is not None and p.loss_scale <= 0.0:
            raise ConfigError(f"--loss-scale {p.loss_scale:g} must be > 0")
        if not 0.0 < p.min_loss_scale <= p.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale {p.min_loss_scale:g} must be > 0 and must not exceed "
                              f"--initial-loss-scale {p.initial_loss_scale:g}")

    def _validate_recompute(self) -> None:
        r = self.recompute
        if r.recompute_granularity is None:
            if r.recompute_method is not None or r.recompute_num_layers is not None:
                raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")
        elif r.recompute_granularity == "full":
            if r.recompute_method is None or r.recompute_num_layers is None:
                raise ConfigError("--recompute-granularity full needs --recompute-method (uniform or block) and "
                                  "--recompute-num-layers")
        elif r.recompute_method is not None or r.recompute_num_layers is not None:
            raise ConfigError("--recompute-granularity selective takes no --recompute-method or "
                              "--recompute-num-layers (they are for full)")

    def _validate_checkpointing(self) -> None:
        c = self.checkpointing
        for dest in ("save_interval", "keep_last", "async_save"):
            if getattr(c, dest) not in (None, False) and c.save is None:
                raise ConfigError(f"{FLAGS_BY_DEST[dest].name} needs --save (where checkpoints go)")
        if c.finetune and c.load is None:
            raise ConfigError("--finetune needs --load (the checkpoint to start from)")

    def _validate_logging(self) -> None:
        if self.logging.tensorboard_log_interval != 1 and self.logging.tensorboard_dir is None:
            raise ConfigError("--tensorboard-log-interval needs --tensorboard-dir (where the events go)")

    def _validate_data(self) -> None:
        d = self.data
        if self.misc.sft:
            for dest in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
                if getattr(d, dest):
                    raise ConfigError(f"{FLAGS_BY_DEST[dest].name} does not apply to --sft: an SFT sample is one "
                                      "conversation (padding is never trained on); remove it")
        if d.data_path is not None:
            parse_data_path(d.data_path)
        try:
            parse_split(d.split)
        except ConfigError as exc:
            raise ConfigError(f"--{exc}") from None
        if d.tokenizer_model is not None and d.tokenizer_type is None:
            raise ConfigError("--tokenizer-model needs --tokenizer-type (how to read the model file)")
        if self.misc.seed > 2 ** 32 - 1:
            raise ConfigError(f"--seed {self.misc.seed} must be < 2**32")


# ---- YAML and command line --------------------------------------------------------------------------------
def read_yaml(path: str) -> Dict[str, Any]:
    """``{dest: value}`` from a flat YAML file of flag names (dashes or underscores); errors name the file and key."""
    data = read_yaml_file(path, f"--config {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    values: Dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in FLAGS_BY_DEST:
            close = difflib.get_close_matches(dest, list(FLAGS_BY_DEST), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint} (keys are flag names, see docs/configuration.md)")
        if dest in values:
            raise ConfigError(f"{path}: key {key!r} is given twice (as dashes and underscores)")
        values[dest] = parse_value(FLAGS_BY_DEST[dest], value, f"{path}: ")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and every training flag to ``parser`` (for the ``megalign train`` subcommand)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of flag values (keys: flag names); explicit flags override it")
    add_flag_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    """The training argument parser (pretrain_gpt.py, ``megalign train``)."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Flags and defaults: docs/configuration.md")
    add_arguments(parser)
    return parser


def config_from_namespace(args: argparse.Namespace) -> TrainingConfig:
    """The config from parsed :func:`add_arguments` flags: defaults, then ``args.config``'s YAML, then the flags."""
    explicit = {dest: value for dest, value in vars(args).items() if dest in FLAGS_BY_DEST}
    path = getattr(args, "config", None)
    values = read_yaml(os.fspath(path)) if path else {}
    values.update(explicit)
    return TrainingConfig.from_values(values)


def load_config(argv: Sequence[str]) -> TrainingConfig:
    """Parse ``argv`` (flags and an optional ``--config FILE.yaml``) into a validated :class:`TrainingConfig`."""
    return config_from_namespace(build_parser().parse_args(list(argv)))
