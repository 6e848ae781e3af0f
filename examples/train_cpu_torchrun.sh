#!/usr/bin/env bash
# CPU quickstart for parallel training: 4 local processes (gloo), tensor parallel 2 x pipeline parallel 2,
# sequence parallelism, on data prepared by `make demo` (or any preprocessed prefix and tokenizer).
#
#   bash examples/train_cpu_torchrun.sh                       # after `make demo`
#   DATA=out/corpus_text_document TOKENIZER=tok/tokenizer.model NPROC=8 TP=2 PP=2 bash examples/train_cpu_torchrun.sh
#
# Memory is tiny here; for a real model see `megalign estimate-memory`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-demo_output}
DATA=${DATA:-$DEMO/data/all_text_document}
TOKENIZER=${TOKENIZER:-$DEMO/tokenizer/tokenizer.model}
NPROC=${NPROC:-4}
TP=${TP:-2}
PP=${PP:-2}
TRAIN_ITERS=${TRAIN_ITERS:-40}
SAVE=${SAVE:-$DEMO/parallel_checkpoints}
PYTHON=${PYTHON:-python}
[ -x .venv/bin/python ] && [ "$PYTHON" = python ] && PYTHON=.venv/bin/python

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    pretrain_gpt.py \
    --model-preset tiny --num-layers 4 --seq-length 64 --micro-batch-size 2 --global-batch-size 8 \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
    --distributed-backend gloo \
    --data-path "$DATA" --split 90,10,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 --train-iters "$TRAIN_ITERS" \
    --log-interval 10 --eval-interval "$TRAIN_ITERS" --eval-iters 2 --save "$SAVE" --save-interval "$TRAIN_ITERS"
