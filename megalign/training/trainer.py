"""Train a GPT model on preprocessed data: one process, or a torchrun job with tensor, sequence, pipeline and
data parallelism (gloo on CPUs, NCCL on GPUs).

Builds the tokenizer (vocabulary padded Megatron's way), the train/valid datasets from --data-path and
--split, the model (--bf16/--fp16: parameters in that dtype, fp32 master weights in the optimizer), AdamW,
the learning-rate schedule and the loss scaler, then loops: each step runs the micro-batches of one
global batch (gradient accumulation), takes an optimizer step (a step skipped for NaN/Inf gradients does
not advance the schedule), logs every --log-interval steps, evaluates every --eval-interval steps and
saves every --save-interval steps and at the end. --load resumes model, optimizer, schedule, loss scale,
RNG and data position exactly; with --finetune only the weights are loaded. SIGTERM or SIGUSR1 stops
the run at the next step boundary, after saving a checkpoint when --save is set (exit status 0).

With --sft the data is `preprocess --sft` output: one conversation per sample, the loss only on the
assistant replies (their loss mask). The pieces: model_chunks.py (this rank's pipeline chunks and one
step over a pipeline schedule), checkpoint_io.py (checkpoints at any layout), step_log.py (console and
TensorBoard), the optimizers (optimizer.py, distributed_optimizer.py). Only the logging rank (last
pipeline stage, data- and tensor-parallel rank 0) prints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, TextIO, Tuple

import torch

from megalign.checkpoint.model_record import read_model_record
from megalign.checkpoint.storage import Checkpoint
from megalign.config import TrainingConfig
from megalign.config import add_arguments as add_config_arguments
from megalign.config.model import flops_per_token
from megalign.data.tokenizers import Tokenizer, build_tokenizer, padded_vocab_size
from megalign.data.training_data import build_training_datasets
from megalign.errors import ConfigError, DataFormatError
from megalign.model.attention_backends import check_attention_backend
from megalign.parallel.launch import any_rank, setup_parallel
from megalign.training import batches
from megalign.training.checkpoint_args import (
    open_load_checkpoint,
    run_model_record,
    save_tokenizer_files,
    training_config_from_namespace,
)
from megalign.training.checkpoint_io import CheckpointIO
from megalign.training.distributed_optimizer import build_optimizer
from megalign.training.loss_scale import SkippedStepTracker, TooManyNonFiniteSteps, loss_scaler_from_config
from megalign.training.lr_schedule import LRSchedule
from megalign.training.model_chunks import ModelChunks
from megalign.training.preemption import PreemptionHandler
from megalign.training.run_controls import Clock, RunControls, empty_cache
from megalign.training.step_log import StepLogger
from megalign.training.throughput import ThroughputMeter, peak_tflops
from megalign.utils.progress import format_count

EXAMPLES = """examples:
  megalign train --model-preset tiny --seq-length 128 --micro-batch-size 4 --global-batch-size 8 \\
      --train-iters 200 --lr 3e-4 --lr-warmup-iters 20 --data-path data/sample_text_document \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/tokenizer.model \\
      --save ckpt --save-interval 100 --eval-interval 50 --eval-iters 4 --log-interval 10
  megalign train --config run.yaml --load ckpt --save ckpt      # resume where ckpt stopped
  torchrun --nproc-per-node 4 pretrain_gpt.py --config run.yaml --tensor-model-parallel-size 2 \
      --pipeline-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer
"""


@dataclass
class TrainResult:
    """What a run did: the last step, samples consumed, per-step mean losses, gradient norms and evaluations.

    ``preempted_by`` names the signal (``"SIGTERM"``) that stopped the run early, if one did.
    """

    iteration: int
    consumed_samples: int
    losses: Dict[int, float] = field(default_factory=dict)
    grad_norms: Dict[int, float] = field(default_factory=dict)  # global L2 norm before clipping (not skipped)
    evaluations: Dict[int, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    preempted_by: Optional[str] = None
    out_of_time: bool = False  # --exit-duration-in-mins stopped the run
    logging_rank: bool = True  # False on the ranks of a parallel job that do not print


def check_data_flags(config: TrainingConfig) -> None:
    """Raise ConfigError for missing data/tokenizer flags and combinations the trainer does not run."""
    p = config.parallel
    if config.checkpointing.async_save and config.world_size > 1:
        raise ConfigError("--async-save is for single-process runs; a parallel job saves from every rank at once")
    if p.overlap_grad_reduce and p.pipeline_model_parallel_size > 1 and config.model_config().tie_word_embeddings:
        raise ConfigError(
            "--overlap-grad-reduce cannot be used with tied embeddings and --pipeline-model-parallel-"
            "size > 1 (the two copies of the table are summed before the gradient reduction)"
        )
    if config.data.data_path is None and not config.data.mock_data:
        raise ConfigError(
            "--data-path is required for training (prefixes written by `megalign preprocess`), or --mock-data"
        )


def _model_dtype(config: TrainingConfig) -> torch.dtype:
    if config.precision.bf16:
        return torch.bfloat16
    return torch.float16 if config.precision.fp16 else torch.float32


class Trainer:
    """One training run of ``config``: call :meth:`train`. Log lines go to ``stream``.

    ``clock`` (monotonic seconds) times --exit-duration-in-mins; tests replace it.
    """

    clock: Clock = staticmethod(time.monotonic)

    def __init__(self, config: TrainingConfig, stream: TextIO = sys.stdout) -> None:
        check_data_flags(config)
        self.config = config
        self.device, self.state = setup_parallel(config.parallel)
        self.stream = stream if self.state.is_logging_rank else io.StringIO()
        self.train_iters, self.num_microbatches = config.train_iters, config.num_microbatches
        self.global_batch_size = config.global_batch_size
        self.seq_length = config.seq_length
        workers = config.data.num_workers
        self.num_workers = workers if workers is not None else (2 if self.device.type == "cuda" else 0)
        self.iteration = 0
        self.consumed_samples = 0

        torch.manual_seed(config.misc.seed)
        self.checkpoint = self._open_checkpoint()
        self.record = read_model_record(self.checkpoint) if self.checkpoint is not None else None
        self.tokenizer, padded_rows, true_vocab = self._build_tokenizer()
        self.train_data, self.valid_data = self._build_datasets()
        self._log(f"data loader: {self.num_workers} worker processes (--num-workers)")
        self.model = self._build_model(padded_rows, true_vocab)
        self.checkpoints = CheckpointIO(self.model, self.state, self._log, config.checkpointing)
        self.model_record = run_model_record(self.model.config, self.tokenizer, self.record)
        self.tokenizer_files_saved = False
        if self.checkpoint is not None and config.checkpointing.finetune:
            self._load_weights(self.checkpoint)
        self.optimizer = build_optimizer(
            self.model, config.optimization, config.parallel, self.state if self.state.world_size > 1 else None
        )
        self.schedule = LRSchedule.from_config(config.optimization, self.train_iters, self.global_batch_size)
        self.scaler = loss_scaler_from_config(config.precision)
        self.tracker = SkippedStepTracker(config.checkpointing.max_consecutive_skipped_steps)
        if self.checkpoint is not None and not config.checkpointing.finetune:
            self._resume(self.checkpoint)
        self.schedule.apply(self.optimizer)

    # ---- setup ------------------------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _build_tokenizer(self) -> Tuple[Tokenizer, int, int]:
        """The tokenizer, the embedding's rows for this layout and the true vocabulary.

        The true vocabulary is the --load checkpoint's when there is one (a Qwen2 model has more rows than its
        tokenizer has tokens), else the tokenizer's; the rows pad it Megatron's way for this TP size."""
        d = self.config.data
        record = self.record
        tokenizer_type, tokenizer_model = d.tokenizer_type, d.tokenizer_model
        if tokenizer_type is None and record is not None and record.tokenizer_dir is not None:
            tokenizer_type, tokenizer_model = "HuggingFaceTokenizer", str(record.tokenizer_dir)
            self._log(f"tokenizer: the --load checkpoint's files in {record.tokenizer_dir}")
        if tokenizer_type is None:
            raise ConfigError(
                "--tokenizer-type is required for training (with --tokenizer-model where it needs one), unless "
                "--load names a checkpoint that carries its tokenizer files"
            )
        tokenizer = build_tokenizer(
            tokenizer_type,
            tokenizer_model,
            vocab_size=self.config.model.vocab_size,
            vocab_file=d.vocab_file,
            merge_file=d.merge_file,
        )
        true_vocab = tokenizer.vocab_size if record is None else record.true_vocab_size
        if tokenizer.vocab_size > true_vocab:
            assert record is not None and self.checkpoint is not None  # a tokenizer fits its own vocabulary
            raise ConfigError(
                f"tokenizer {tokenizer_type} ({tokenizer_model}) has {tokenizer.vocab_size} tokens, more than the "
                f"vocabulary of {true_vocab} of the --load checkpoint {self.checkpoint.path} "
                f"({record.model_config.vocab_size} rows); pass the tokenizer that model was trained with"
            )
        padded = padded_vocab_size(
            true_vocab, d.make_vocab_size_divisible_by, self.config.parallel.tensor_model_parallel_size
        )
        source = "the checkpoint's vocabulary" if record is not None else "its vocabulary"
        self._log(
            f"tokenizer {tokenizer_type}: {tokenizer.vocab_size} tokens; {source} of {true_vocab} padded to "
            f"{padded} rows (--make-vocab-size-divisible-by {d.make_vocab_size_divisible_by} x TP)"
        )
        return tokenizer, padded, true_vocab

    def _build_datasets(self) -> Tuple[Any, Optional[Any]]:
        eval_iters = self.config.logging.eval_iters
        sizes = [self.train_iters * self.global_batch_size, eval_iters * self.global_batch_size, 0]
        return build_training_datasets(
            self.config.data,
            seq_length=self.seq_length,
            seed=self.config.misc.seed,
            sft=self.config.misc.sft,
            sizes=sizes,
            tokenizer=self.tokenizer,
            log=self._log,
        )

    def _build_model(self, vocab_size: int, true_vocab_size: int) -> ModelChunks:
        model_config, options, dtype = (
            self.config.model_config(vocab_size=vocab_size, true_vocab_size=true_vocab_size),
            self.config.model_options(),
            _model_dtype(self.config),
        )
        backend = check_attention_backend(options.attention_backend, self.device, dtype, warn=self.state.rank == 0)
        p = self.config.parallel
        model = ModelChunks(
            model_config,
            options,
            self.state,
            self.config.num_model_chunks,
            p.decoder_first_pipeline_num_layers,
            p.decoder_last_pipeline_num_layers,
        )
        model = model.to(device=self.device, dtype=dtype)
        count = sum(param.numel() for param in model.parameters())
        recompute = options.recompute_granularity or "none"
        if options.recompute_granularity == "full":
            recompute += f" ({options.recompute_method}, {options.recompute_num_layers} layers)"
        layout = (
            f"TP {self.state.tensor_model_parallel_size}, PP {self.state.pipeline_model_parallel_size}"
            f"{f' x {model.spec.num_chunks} chunks' if model.spec.num_chunks > 1 else ''}, DP "
            f"{self.state.data_parallel_size}{', sequence parallel' if self.state.sequence_parallel else ''}"
        )
        self._log(
            f"model: {format_count(count)} parameters on this rank, {model_config.num_layers} layers, hidden "
            f"{model_config.hidden_size}, dtype {dtype}, device {self.device}, attention {backend}, "
            f"recompute {recompute}, layout {layout}"
        )
        if self.config.misc.torch_compile:
            for layer in model.layers():  # per layer (as torchtitan does): compiles once, reused by every layer
                layer.compile()
            self._log("torch.compile: decoder layers compile on the first step")
        self.flops_per_token = flops_per_token(model_config, self.seq_length)
        self.vocab_size = model_config.real_vocab_size  # token ids the data may hold
        return model

    def _open_checkpoint(self) -> Optional[Checkpoint]:
        c = self.config.checkpointing
        if c.load is None:
            return None
        checkpoint = open_load_checkpoint(c.load, self._log)
        if checkpoint is None and c.finetune:
            raise DataFormatError(f"--load {c.load}: holds no checkpoint; --finetune needs one to start from")
        if checkpoint is None:
            self._log(f"--load {c.load}: no checkpoint there yet; training starts from scratch")
        return checkpoint

    def _load_weights(self, checkpoint: Checkpoint) -> None:
        self.checkpoints.load_weights(checkpoint)
        self._log(f"loaded weights from {checkpoint.path} (step {checkpoint.step})")

    def _resume(self, checkpoint: Checkpoint) -> None:
        extra = checkpoint.extra
        missing = [key for key in ("lr_schedule", "loss_scaler", "skipped_steps", "optimizer") if key not in extra]
        if missing:
            raise DataFormatError(
                f"{checkpoint.path}: lacks trainer state {missing}; resume needs a checkpoint "
                "written by `megalign train` (or use --finetune to load only the weights)"
            )
        self._load_weights(checkpoint)
        self.checkpoints.load_optimizer(checkpoint, self.optimizer, extra["optimizer"])
        self.schedule.load_state_dict(extra["lr_schedule"])
        self.scaler.load_state_dict(extra["loss_scaler"])
        self.tracker.load_state_dict(extra["skipped_steps"])
        if not self.checkpoints.restore_rng(checkpoint):
            self._log(
                "note: the checkpoint was saved at another layout; RNG states start fresh (the model has "
                "no dropout and the data order follows the consumed samples)"
            )
        self.iteration, self.consumed_samples = checkpoint.step, checkpoint.consumed_samples
        if self.iteration >= self.train_iters:
            raise ConfigError(
                f"--load {self.config.checkpointing.load}: the checkpoint is at step {self.iteration}, "
                f"already at or past --train-iters {self.train_iters}; raise --train-iters"
            )
        self._log(f"resumed at step {self.iteration} ({self.consumed_samples} samples consumed)")

    # ---- the loop ---------------------------------------------------------------------------------------
    def _check_tokens(self, micro: List[Dict[str, torch.Tensor]]) -> None:
        for batch in micro:
            tokens = batch["tokens"]
            high, low = int(tokens.max()), int(tokens.min())
            if high >= self.vocab_size or low < 0:
                bad = high if high >= self.vocab_size else low
                raise DataFormatError(
                    f"--data-path {' '.join(self.config.data.data_path or [])}: token id {bad} is outside "
                    f"the model's vocabulary of {self.vocab_size}; the data was tokenized with "
                    "another tokenizer than --tokenizer-model (or --vocab-size is too small)"
                )

    def _micro_batches(self, dataset: Any, consumed: int) -> Iterator[Dict[str, torch.Tensor]]:
        return batches.micro_batches(
            dataset,
            consumed,
            self.config.micro_batch_size,
            self.state.data_parallel_rank,
            self.state.data_parallel_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _backward_context(self, is_last: bool):
        """No data-parallel gradient reduction before the last backward pass of a step."""
        return contextlib.nullcontext() if is_last else self.optimizer.no_sync()

    def train_step(self, micro: List[Dict[str, torch.Tensor]]):
        """One optimizer step over this rank's micro-batches of a global batch; returns (mean loss, StepResult).

        The loss is the global batch's mean on the logging rank (NaN on pipeline stages without the loss).
        """
        self._check_tokens(micro)
        self.model.train()
        self.optimizer.zero_grad()
        loss = self.model.train_step(
            micro,
            self.device,
            _model_dtype(self.config),
            self.scaler.scale,
            self._backward_context,
            per_token=self.config.optimization.calculate_per_token_loss,
        )
        level = self.config.misc.empty_unused_memory_level
        empty_cache(level, 1, self.device)
        result = self.optimizer.step(self.scaler)
        if not result.skipped:
            self.schedule.step(self.optimizer)  # by the global batch size in a sample-based schedule
        empty_cache(level, 2, self.device)
        return float(loss.item()), result

    def evaluate(self) -> float:
        """Mean validation loss over the first --eval-iters global batches."""
        self.model.eval()
        count = self.config.logging.eval_iters * self.num_microbatches
        micro = batches.take(self._micro_batches(self.valid_data, 0), count, "validation")
        self._check_tokens(micro)
        loss = self.model.evaluate(
            micro, self.device, _model_dtype(self.config), self.config.optimization.calculate_per_token_loss
        )
        self.model.train()
        empty_cache(self.config.misc.empty_unused_memory_level, 1, self.device)
        return float(loss.item())

    def save(self) -> str:
        """Checkpoint the current step to --save (every rank takes part); returns its path."""
        extra = {
            "lr_schedule": self.schedule.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "skipped_steps": self.tracker.state_dict(),
            "optimizer": self.optimizer.state_dict_json(),
            **self.model_record.metadata_extra(),
        }
        save_dir = self.config.checkpointing.save
        if save_dir is not None and self.state.rank == 0 and not self.tokenizer_files_saved:
            self.tokenizer_files_saved = save_tokenizer_files(self.model_record, save_dir)
        return self.checkpoints.save(
            self.iteration,
            self.optimizer,
            config=self.config.to_dict(),
            consumed_samples=self.consumed_samples,
            extra=extra,
        )

    def train(self, stop_after: Optional[int] = None) -> TrainResult:
        """Train to --train-iters (or to step ``stop_after``, saving there like Megatron's --exit-interval).

        SIGTERM/SIGUSR1 (handled while this runs in the main thread) end the loop after the current step,
        saving a checkpoint there when --save is set. Returns once every checkpoint is on disk.
        """
        log_cfg = self.config.logging
        logger = StepLogger(
            self.stream,
            self.device,
            self._throughput_meter(),
            self.global_batch_size * self.seq_length,
            self.global_batch_size,
            self.train_iters,
            log_cfg.log_interval,
            log_cfg.tensorboard_dir if self.state.is_logging_rank else None,
            log_cfg.tensorboard_log_interval,
            log_throughput=log_cfg.log_throughput,
        )
        controls = RunControls(self.config, self.device, self.state.rank, self.clock, self._log)
        try:
            controls.start()
            with PreemptionHandler() as preemption:
                result = self._loop(stop_after, preemption, logger, controls)
        finally:
            controls.close()
            logger.close()
            self.checkpoints.wait()
        result.iteration, result.consumed_samples = self.iteration, self.consumed_samples
        result.logging_rank = self.state.is_logging_rank
        return result

    def _throughput_meter(self) -> ThroughputMeter:
        """TFLOP/s and MFU per device: the job's model FLOPs shared by its ranks."""
        peak = peak_tflops(self.device, _model_dtype(self.config), self.config.logging.peak_tflops)
        return ThroughputMeter(self.flops_per_token // self.state.world_size, peak)

    def _loop(
        self, stop_after: Optional[int], preemption: PreemptionHandler, logger: StepLogger, controls: RunControls
    ) -> TrainResult:
        c, log_cfg = self.config.checkpointing, self.config.logging
        last = self.train_iters if stop_after is None else min(stop_after, self.train_iters)
        result = TrainResult(self.iteration, self.consumed_samples)
        stream = self._micro_batches(self.train_data, self.consumed_samples)
        while self.iteration < last:
            lr = self.schedule.current_lr  # the rate this step uses
            controls.before_step(self.iteration)
            with controls.step_range(self.iteration + 1):
                loss, step = self.train_step(batches.take(stream, self.num_microbatches, "training"))
            self.iteration += 1
            self.consumed_samples += self.global_batch_size
            result.losses[self.iteration] = loss
            if step.grad_norm is not None:
                result.grad_norms[self.iteration] = step.grad_norm
            logger.step(
                self.iteration,
                loss,
                lr,
                step.grad_norm,
                step.skipped,
                self.scaler.scale_value,
                force=self.iteration == last,
            )
            try:
                self.tracker.record(step.skipped, self.iteration, self.scaler.scale_value)
            except TooManyNonFiniteSteps:
                if c.save is not None:
                    result.checkpoint = self.save()
                raise
            if self.valid_data is not None and (
                self.iteration % log_cfg.eval_interval == 0 or self.iteration == self.train_iters
            ):
                controls.gc.around_evaluation()
                loss = self.evaluate()
                controls.gc.around_evaluation()
                result.evaluations[self.iteration] = loss
                logger.validation(self.iteration, loss)
            saved_now = c.save is not None and (
                bool(c.save_interval and self.iteration % c.save_interval == 0) or self.iteration == last
            )
            if saved_now:
                result.checkpoint = self.save()
            controls.after_step(self.iteration)
            if any_rank(preemption.requested, self.device):
                self._stop_for_signal(preemption.signal_name or "a signal on another rank", result, saved_now)
                break
            if self.iteration < last and controls.time_is_up():
                self._stop_for_time(controls.exit_timer.elapsed_minutes, result, saved_now)
                break
        return result

    def _stop_for_time(self, minutes: float, result: TrainResult, saved_now: bool) -> None:
        """--exit-duration-in-mins: checkpoint the current step (unless just saved) when --save is set."""
        result.out_of_time = True
        save = self.config.checkpointing.save
        if save is not None and not saved_now:
            result.checkpoint = self.save()
        where = f"saved checkpoint {result.checkpoint}" if save is not None else "no --save directory, nothing saved"
        self._log(
            f"--exit-duration-in-mins {self.config.misc.exit_duration_in_mins}: {minutes:.1f} minutes of training, "
            f"exiting at step {self.iteration} ({where})"
        )

    def _stop_for_signal(self, name: str, result: TrainResult, saved_now: bool) -> None:
        """Checkpoint the current step (unless just saved) and record that ``name`` stopped the run."""
        result.preempted_by = name
        if self.config.checkpointing.save is None:
            self._log(f"received {name} at step {self.iteration}: no --save directory, nothing could be saved; exiting")
            return
        if not saved_now:
            result.checkpoint = self.save()
        self.checkpoints.wait()
        self._log(
            f"received {name}: saved checkpoint {result.checkpoint} at step {self.iteration}, exiting "
            f"(resume with --load {self.config.checkpointing.save})"
        )

    def close(self) -> None:
        """Finish a background save, detach the optimizer's gradient hooks and close the checkpoint."""
        self.checkpoints.wait()
        self.optimizer.close()
        if self.checkpoint is not None:
            self.checkpoint.close()


def train(config: TrainingConfig, stream: TextIO = sys.stdout, stop_after: Optional[int] = None) -> TrainResult:
    """Run training for ``config`` (see :class:`Trainer`); returns what happened."""
    trainer = Trainer(config, stream)
    try:
        return trainer.train(stop_after)
    finally:
        trainer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``megalign train`` flags: ``--config FILE.yaml`` and every training flag (docs/configuration.md)."""
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``megalign train`` / pretrain_gpt.py."""
    result = train(training_config_from_namespace(args))
    if not result.logging_rank:
        return 0
    if result.preempted_by is not None:
        print(
            f"training stopped by {result.preempted_by} at step {result.iteration} ({result.consumed_samples} samples)",
            flush=True,
        )
        return 0
    if result.out_of_time:
        print(
            f"training stopped by --exit-duration-in-mins at step {result.iteration} "
            f"({result.consumed_samples} samples)",
            flush=True,
        )
        return 0
    print(f"training finished at step {result.iteration} ({result.consumed_samples} samples)", flush=True)
    return 0
