#!/usr/bin/env bash
# Train the alignment worker: supervised fine-tuning on (original, polished) pairs, from a converted chat
# model checkpoint (the paper trained its worker from a Qwen chat model). Single node, 8 GPUs, TP 2 x DP 4.
# Qwen2's 151,936 embedding rows (its tokenizer has 151,665 tokens) are padded to 152,064 for TP 2 at load;
# the worker's checkpoints carry the tokenizer and chat template, so the export at the end is a complete
# Hugging Face folder for vLLM or `megalign align rewrite`.
#
#   PAIRS=alignment/pairs.jsonl TOKENIZER=qwen2-7b-instruct/ LOAD=checkpoints/qwen2-7b-tp2 bash examples/train_worker_sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PAIRS:?set PAIRS to the SFT JSONL}" "${TOKENIZER:?set TOKENIZER}" "${LOAD:?set LOAD to the base checkpoint}"
OUT=${OUT:-data/worker}
SAVE=${SAVE:-checkpoints/worker}
megalign preprocess --sft --input "$PAIRS" --output-prefix "$OUT" --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model "$TOKENIZER" --workers 16
torchrun --standalone --nproc-per-node 8 pretrain_gpt.py --sft --finetune --load "$LOAD" --save "$SAVE" \
    --model-preset qwen2-7b --seq-length 4096 --micro-batch-size 1 --global-batch-size 64 \
    --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --bf16 \
    --data-path "${OUT}_sft_document" --split 98,2,0 \
    --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 20 --train-iters 1000 \
    --save-interval 200 --eval-interval 200 --eval-iters 10 --log-interval 10
megalign convert megalign-to-hf --load "$SAVE" --hf-dir "${SAVE}-hf" --dtype bf16
