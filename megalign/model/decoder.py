"""The LLaMA-3 / Qwen2 decoder as one plain ``nn.Module`` built from megalign.parallel layers.

::

    x = embed_tokens(tokens)
    for layer in layers:                      # pre-norm residual blocks
        x = x + attention(input_norm(x))      # GQA + rotary, causal (document-masked with segment_ids)
        x = x + mlp(mlp_norm(x))              # SwiGLU
    logits = lm_head(final_norm(x))           # or the embedding table when tie_word_embeddings

Initialisation (Megatron's): every matrix from ``normal(0, init_std)``, except the projections that
write into the residual stream (attention ``o_proj`` and MLP ``down_proj``), whose std is divided by
``sqrt(2 * num_layers)`` so the residual's variance does not grow with depth (two such writes per
layer; GPT-2 / Megatron "scaled init"). Norm weights start at 1, biases at 0. The weights depend only on
the seed given to ``torch.manual_seed``: the embedding, each layer and the LM head draw from their own
seed derived from it, and tensor-parallel layers draw the full weights and keep their shard, so a model
built after the same seed is the same at any TP size and any pipeline split.

Pipeline parallelism (``stage``): a :class:`PipelineStage` holds a slice of the layers (stored under their
global numbers, ``layers.17.…``), the embedding on the first stage and the final norm, LM head and loss on
the last; the stages pass hidden states (megalign.parallel.pipeline runs the schedules).

Tensor parallelism (``context``): see :mod:`megalign.parallel.layers`; the loss is the vocabulary-parallel
cross-entropy of the split logits. Sequence parallelism: the embedding reduce-scatters along the
sequence, so the residual stream and the norms hold ``[batch, seq / tp, hidden]``; attention and MLP
all-gather their input and reduce-scatter their output; the LM head all-gathers the final norm's output.
Norm weights are replicated and their gradients summed over TP ranks (each saw part of the sequence).

Megatron's model options: ``apply_layernorm_1p`` stores every norm weight as ``w - 1`` (initialised to 0) and
scales by ``1 + w``; ``hidden_dropout`` drops features of the embedding output and of the attention and MLP
outputs before each residual add, and ``attention_dropout`` attention probabilities, in training only
(``model.train()``; 0 leaves the numerics untouched). The masks come from one seed per forward pass drawn
from the global torch RNG (which the trainer seeds alike on every rank and checkpoints), mixed with the
layer number and the site; each mask is drawn for the whole tensor (per global head for attention) and a
rank keeps its slice, so tensor and sequence parallelism give the masks of one process, and activation
recomputation, which receives the same seed, redraws the same masks.
``rotary_interpolation_factor`` divides the rotary angles (linear position interpolation).

Incremental decoding (``kv_cache``, a :class:`megalign.model.kv_cache.KVCache`): ``tokens`` are only the
new tokens; their keys and values are appended to the cache, positions default to the cache offset
onwards, and attention covers every cached slot (see the cache's module for the padding rule). Without a
cache the model runs exactly as before.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple, Union, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalign.config.model import ModelConfig, ModelOptions
from megalign.model.attention import Attention
from megalign.model.attention_backends import mix_seed
from megalign.model.mlp import MLP
from megalign.ops import rms_norm, rotary_cos_sin
from megalign.ops.rotary import rotary_inv_freq
from megalign.parallel import (
    ColumnParallelLinear,
    InitMethod,
    ParallelContext,
    VocabParallelEmbedding,
    column_parallel_linear,
    gather_from_tensor_parallel,
    init_normal,
    mark_tensor_parallel,
    sequence_parallel_parameter,
    vocab_parallel_cross_entropy,
)

if TYPE_CHECKING:
    from megalign.model.kv_cache import KVCache, LayerCache

__all__ = ["DecoderLayer", "GPTModel", "PipelineStage", "RMSNorm", "recompute_plan"]


@dataclass(frozen=True)
class PipelineStage:
    """The part of the model one pipeline stage holds: decoder ``layers`` (global indices), and whether it is
    the ``first`` stage (token embedding) and the ``last`` (final norm, LM head, loss)."""

    layers: range
    first: bool = True
    last: bool = True


def _module_seed(base: int, index: int) -> int:
    """The init seed of the ``index``-th module (embedding -1, layers 0.., LM head -2) of a model seeded ``base``."""
    return (base * 1_000_003 + index + 3) % (2**63)


def hidden_dropout(x: torch.Tensor, p: float, seed: int, context: ParallelContext) -> torch.Tensor:
    """Dropout of ``x`` ``[batch, seq, hidden]`` (``seq / tp`` rows under sequence parallelism) with a mask drawn
    from ``seed`` for the whole sequence, of which this rank keeps its rows: equal at any TP size."""
    batch, rows, hidden = x.shape
    sharded = context.sequence_parallel and context.tensor_model_parallel_size > 1
    total = rows * context.tensor_model_parallel_size if sharded else rows
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    keep = torch.empty(batch, total, hidden, device=x.device).bernoulli_(1.0 - p, generator=generator)
    if sharded:
        start = context.tensor_model_parallel_rank * rows
        keep = keep[:, start : start + rows]
    return x * (keep / (1.0 - p)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-feature scale (initialised to 1, or stored as ``w - 1`` and initialised to 0
    when ``zero_centered``: Megatron's --apply-layernorm-1p), replicated on every TP rank."""

    def __init__(
        self, hidden_size: int, eps: float, context: ParallelContext = ParallelContext(), zero_centered: bool = False
    ) -> None:
        super().__init__()
        self.eps, self.context, self.zero_centered = eps, context, zero_centered
        initial = torch.zeros(hidden_size) if zero_centered else torch.ones(hidden_size)
        self.weight = mark_tensor_parallel(nn.Parameter(initial), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = sequence_parallel_parameter(self.weight, self.context)
        return rms_norm(x, weight, self.eps, zero_centered=self.zero_centered)


class DecoderLayer(nn.Module):
    """One pre-norm block: attention and MLP, each behind an RMSNorm and added to the residual."""

    def __init__(
        self,
        config: ModelConfig,
        context: ParallelContext,
        init_method: InitMethod,
        output_init_method: InitMethod,
        options: ModelOptions = ModelOptions(),
    ) -> None:
        super().__init__()
        one_p = config.apply_layernorm_1p
        self.context, self.dropout_p = context, config.hidden_dropout
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, context, one_p)
        self.attention = Attention(config, context, init_method, output_init_method, options)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, context, one_p)
        self.mlp = MLP(config, context, init_method, output_init_method)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: Optional[torch.Tensor] = None,
        cache: Optional["LayerCache"] = None,
        dropout_seed: Optional[int] = None,
    ) -> torch.Tensor:
        """``dropout_seed``: this layer's seed for its dropout masks (training; None: no dropout)."""
        attention_seed = None if dropout_seed is None else mix_seed(dropout_seed, 2)
        x = x + self._dropout(
            self.attention(self.input_norm(x), cos, sin, segment_ids, cache, attention_seed), dropout_seed, 0
        )
        return x + self._dropout(self.mlp(self.mlp_norm(x)), dropout_seed, 1)

    def _dropout(self, x: torch.Tensor, seed: Optional[int], site: int) -> torch.Tensor:
        if seed is None or self.dropout_p == 0 or not self.training:
            return x
        return hidden_dropout(x, self.dropout_p, mix_seed(seed, site), self.context)


def recompute_plan(num_layers: int, options: ModelOptions) -> List[Tuple[range, bool]]:
    """The layer stack as consecutive ``(layers, recomputed)`` runs for :meth:`GPTModel.forward`.

    A recomputed run stores only its input and runs its layers again in the backward pass (Megatron's
    full recomputation). ``uniform``: all layers, in runs of ``recompute_num_layers``; ``block``: the first
    ``recompute_num_layers`` layers one run each, the rest as one ordinary run. Without full recomputation,
    one ordinary run of all layers.
    """
    if options.recompute_granularity != "full":
        return [(range(num_layers), False)]
    assert options.recompute_num_layers is not None  # ModelOptions requires it with full recomputation
    n = min(options.recompute_num_layers, num_layers)
    if options.recompute_method == "uniform":
        return [(range(start, min(start + n, num_layers)), True) for start in range(0, num_layers, n)]
    plan = [(range(index, index + 1), True) for index in range(n)]
    return plan + ([(range(n, num_layers), False)] if n < num_layers else [])


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded ``seed``; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class GPTModel(nn.Module):
    """Decoder-only language model of ``config``'s shape; this rank's shards under ``context``.

    ``options`` choose the attention kernel and activation recomputation (they do not change the result).
    """

    def __init__(
        self,
        config: ModelConfig,
        context: ParallelContext = ParallelContext(),
        options: ModelOptions = ModelOptions(),
        stage: Optional[PipelineStage] = None,
    ) -> None:
        super().__init__()
        self.config, self.context, self.options = config, context, options
        self.stage = stage or PipelineStage(range(config.num_layers))
        if self.stage.layers.start < 0 or self.stage.layers.stop > config.num_layers or self.stage.layers.step != 1:
            raise ValueError(
                f"GPTModel: stage layers {self.stage.layers} are not a slice of {config.num_layers} layers"
            )
        init_method = init_normal(config.init_std)
        output_init_method = init_normal(config.init_std / math.sqrt(2.0 * config.num_layers))
        # Each module draws its weights from its own seed derived from torch.manual_seed's seed, so a pipeline
        # stage (or model chunk) holding any subset of the modules builds exactly the weights the whole model has.
        base = torch.initial_seed()
        tied_head = config.tie_word_embeddings and self.stage.last
        self.embed_tokens: Optional[VocabParallelEmbedding] = None
        if self.stage.first or tied_head:  # a tied LM head on a later stage holds its own copy of the table
            with _seeded(_module_seed(base, -1)):
                self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, context, init_method)
        layers = {}
        for index in self.stage.layers:
            with _seeded(_module_seed(base, index)):
                layers[str(index)] = DecoderLayer(config, context, init_method, output_init_method, options)
        self.layers = nn.ModuleDict(layers)  # keys are global layer numbers: names match at any pipeline split
        self.recompute_plan = recompute_plan(len(self.stage.layers), options)
        self.final_norm: Optional[RMSNorm] = None
        self.lm_head: Optional[ColumnParallelLinear] = None
        if self.stage.last:
            self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, context, config.apply_layernorm_1p)
            if not config.tie_word_embeddings:
                with _seeded(_module_seed(base, -2)):
                    self.lm_head = ColumnParallelLinear(
                        config.hidden_size, config.vocab_size, context, bias=False, init_method=init_method
                    )

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        hidden_states: Optional[torch.Tensor] = None,
        kv_cache: Optional["KVCache"] = None,
        logits_to_keep: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of ``tokens`` ``[batch, seq]``, or the training loss when ``labels`` is given.

        A pipeline stage that is not the first takes the previous stage's output as ``hidden_states`` (``tokens``
        still give the shape and positions); a stage that is not the last returns its hidden states
        ``[batch, seq, hidden]`` (``seq / tp`` under sequence parallelism).

        With tensor parallelism every rank takes the same full inputs and returns the same loss (or the
        gathered full logits); under sequence parallelism ``seq`` must be a multiple of the TP size.

        ``position_ids`` ``[batch, seq]`` default to ``0..seq-1``; ``segment_ids`` ``[batch, seq]`` (documents
        packed in one sample) keep attention inside each document. ``labels`` are the next tokens (already
        shifted, as GPTDataset gives them); the loss is ``sum(ce * loss_mask) / sum(loss_mask)`` (0 when the
        mask is empty), or the mean over labels other than -100 without ``loss_mask``.

        ``kv_cache``: incremental decoding, ``tokens`` are the tokens after those already cached (positions
        default to the cache offset onwards; ``segment_ids`` of the new tokens as :class:`KVCache` describes).
        ``logits_to_keep``: return the logits of the last ``logits_to_keep`` positions only (prefill of long
        prompts needs just the last one); not with ``labels``.
        """
        self._check_inputs(
            tokens, position_ids=position_ids, segment_ids=segment_ids, labels=labels, loss_mask=loss_mask
        )
        config, tp = self.config, self.context.tensor_model_parallel_size
        if self.context.sequence_parallel and tokens.shape[1] % tp:
            raise ValueError(
                f"GPTModel: sequence length {tokens.shape[1]} must be a multiple of the tensor-parallel "
                f"size {tp} with --sequence-parallel (the sequence is split over the TP ranks)"
            )
        if (kv_cache is not None or logits_to_keep is not None) and self.context.sequence_parallel:
            raise ValueError("GPTModel: kv_cache and logits_to_keep cannot be used with sequence parallelism")
        if logits_to_keep is not None and (labels is not None or logits_to_keep < 1):
            raise ValueError(
                f"GPTModel: logits_to_keep={logits_to_keep} must be a positive number of positions, "
                "and cannot be combined with labels"
            )
        positions: Union[int, torch.Tensor]
        if position_ids is not None:
            positions = position_ids
        else:
            positions = tokens.shape[1] if kv_cache is None else kv_cache.default_positions(tokens.shape[1])
        cos, sin = self._rotary(positions, tokens.device)
        dropout_seed = self._dropout_seed(kv_cache is None)
        if self.stage.first:
            assert self.embed_tokens is not None  # the first stage holds the embedding
            x = self.embed_tokens(tokens)
            if dropout_seed is not None and config.hidden_dropout > 0:
                x = hidden_dropout(x, config.hidden_dropout, mix_seed(dropout_seed, -1), self.context)
        elif hidden_states is None:
            raise ValueError(
                f"GPTModel: pipeline stage with layers {self.stage.layers} needs the previous stage's hidden_states"
            )
        else:
            x = hidden_states
        recompute = torch.is_grad_enabled()
        if kv_cache is not None:
            x = self._run_cached(x, cos, sin, segment_ids, kv_cache)
        else:
            for layers, recomputed in self.recompute_plan:
                if recomputed and recompute:
                    x = checkpoint(
                        self._run_layers, layers, x, cos, sin, segment_ids, dropout_seed, use_reentrant=False
                    )
                else:
                    x = self._run_layers(layers, x, cos, sin, segment_ids, dropout_seed)
        if not self.stage.last:
            return x
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        assert self.final_norm is not None  # the last stage holds the final norm
        x = self.final_norm(x)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            assert self.embed_tokens is not None  # a tied LM head's stage holds the embedding table
            logits = column_parallel_linear(x, self.embed_tokens.weight, None, self.context)
        logits = self._mask_vocab_padding(logits)
        if labels is None:  # the vocabulary shards gathered (the loss below never gathers them)
            return gather_from_tensor_parallel(logits, self.context)
        if loss_mask is None:
            return vocab_parallel_cross_entropy(logits, labels, self.context)
        losses = vocab_parallel_cross_entropy(logits, labels, self.context, reduction="none")
        mask = loss_mask.to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """``-inf`` for the padding rows (ids >= ``config.true_vocab_size``) in this rank's slice of the logits:
        they never enter the softmax, so the loss, the gradients and the scores do not depend on how many rows
        the tensor-parallel layout pads (Megatron leaves them in; an exported model has none)."""
        real = self.config.true_vocab_size
        local = logits.shape[-1]
        start = self.context.tensor_model_parallel_rank * local
        if real is None or real >= start + local:
            return logits
        logits[..., max(real - start, 0) :] = float("-inf")  # in place: the padding columns are this slice's tail
        return logits

    def decoder_layer(self, index: int) -> DecoderLayer:
        """The decoder layer of global number ``index`` (one of ``stage.layers``)."""
        return cast(DecoderLayer, self.layers[str(index)])  # nn.ModuleDict items are typed as plain Modules

    def _run_layers(
        self,
        positions: range,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: Optional[torch.Tensor],
        dropout_seed: Optional[int] = None,
    ) -> torch.Tensor:
        """Run the stage's layers at ``positions`` (0-based within this stage); ``dropout_seed`` is the forward
        pass's (each layer mixes in its global number)."""
        for position in positions:
            index = self.stage.layers[position]
            seed = None if dropout_seed is None else mix_seed(dropout_seed, index)
            x = self.layers[str(index)](x, cos, sin, segment_ids, None, seed)
        return x

    def _rotary(self, positions: Union[int, torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables of ``positions``; with ``rotary_interpolation_factor`` the angles are divided by it."""
        config = self.config
        factor = config.rotary_interpolation_factor
        if factor is None:
            return rotary_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling, device=device)
        pos = torch.arange(positions, device=device) if isinstance(positions, int) else positions.to(device)
        inv_freq = rotary_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling, device=device) / factor
        angles = pos.float().unsqueeze(-1) * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def _dropout_seed(self, uncached: bool) -> Optional[int]:
        """This forward pass's dropout seed, drawn from the global torch RNG; None when no dropout runs."""
        config = self.config
        if not (self.training and uncached and (config.hidden_dropout > 0 or config.attention_dropout > 0)):
            return None
        return int(torch.randint(0, 2**62, (1,)).item())

    def _run_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: Optional[torch.Tensor],
        kv_cache: "KVCache",
    ) -> torch.Tensor:
        """Run every layer of the stage on the new tokens ``x``, reading and extending ``kv_cache``."""
        kv_cache.begin_step(x.shape[1], segment_ids)
        try:
            for index in self.stage.layers:
                x = self.layers[str(index)](x, cos, sin, None, kv_cache.layer(index))
        except BaseException:
            kv_cache.abort_step()
            raise
        kv_cache.end_step()
        return x

    @staticmethod
    def _check_inputs(tokens: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(
                f"GPTModel: tokens must be an integer tensor [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        for name, value in others.items():
            if value is not None and value.shape != tokens.shape:
                raise ValueError(
                    f"GPTModel: {name} has shape {tuple(value.shape)}; it must match tokens {tuple(tokens.shape)}"
                )
        if others["loss_mask"] is not None and others["labels"] is None:
            raise ValueError("GPTModel: loss_mask was given without labels")
